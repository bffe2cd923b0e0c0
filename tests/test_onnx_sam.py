"""SAM's prompt encoder + mask decoder exported to ONNX: parity with PyTorch, runtime, CLI.

Tolerances: low-res logits and predicted IoU within atol 1e-4 + rtol 1e-4 of PyTorch's
(measured: ~5e-7 on O(1) logits); thresholded masks identical wherever |logit| >= 1e-3.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from vprompt.errors import ConfigError
from vprompt.export.sam_onnx import export_sam_decoder
from vprompt.prompts.spatial import Box, MaskLogits, ObjectPrompt, Point, PromptSet
from vprompt.segment import Segmenter
from vprompt.segment.onnx_runtime import OnnxSamDecoder

ATOL = RTOL = 1e-4
NEAR_ZERO = 1e-3
TINY = ("--model", "sam:tiny", "--weights", "none", "--device", "cpu")


@pytest.fixture(scope="module")
def segmenters(tmp_path_factory: pytest.TempPathFactory) -> tuple[Segmenter, Segmenter, Path]:
    """(torch, onnx) segmenters on one tiny SAM whose decoder weights are scaled up so that
    logits are O(1) (random-init tiny logits are ~1e-4, too small to test parity on)."""
    torch_seg = Segmenter.load("sam:tiny", "none", device="cpu")
    backbone = torch_seg.backbone
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in [
            *backbone.model.mask_decoder.parameters(),
            *backbone.model.prompt_encoder.parameters(),
        ]:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    backbone._fingerprint = None
    path = tmp_path_factory.mktemp("onnx") / "decoder.onnx"
    export_sam_decoder(backbone, path, upscale=True)
    onnx_seg = Segmenter(backbone, decoder=OnnxSamDecoder(path, backbone=backbone, threads=1))
    onnx_seg.cache = torch_seg.cache
    return torch_seg, onnx_seg, path


def _image(w: int, h: int):
    from PIL import Image

    rng = np.random.default_rng(w * h)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _check(torch_seg: Segmenter, onnx_seg: Segmenter, size: tuple[int, int], objects, multimask):
    image = _image(*size)
    prompts = PromptSet(objects, image_size=size)
    ref = torch_seg.decode(image, prompts, multimask=multimask)
    got = onnx_seg.decode(image, prompts, multimask=multimask)
    assert np.abs(ref.logits).max() > 0.1  # parity on logits of a meaningful size
    np.testing.assert_allclose(got.logits, ref.logits, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(got.iou, ref.iou, atol=ATOL, rtol=RTOL)
    from vprompt.prompts.resize import MaskPostprocess  # noqa: F401  (same post-processing)

    full = torch.from_numpy(ref.logits)
    plan = torch_seg.backbone.frame.postprocess_sizes(size)
    from vprompt.segment.segmenter import upsample_logits

    confident = upsample_logits(full, plan).abs().numpy() >= NEAR_ZERO
    assert (got.masks == ref.masks)[confident].all()
    return ref, got


@pytest.mark.parametrize("size", [(64, 48), (48, 64), (50, 50)])
def test_onnx_decode_matches_torch(segmenters, size) -> None:
    torch_seg, onnx_seg, _ = segmenters
    w, h = size
    one = [ObjectPrompt(points=[Point(w * 0.3, h * 0.6)])]
    _check(torch_seg, onnx_seg, size, one, True)
    _check(torch_seg, onnx_seg, size, one, False)
    several = [
        ObjectPrompt(
            points=[Point(5, 6), Point(w * 0.5, h * 0.5, positive=False), Point(w - 3, 2)],
            boxes=[Box(1, 2, w * 0.8, h * 0.9)],
        )
    ]
    _check(torch_seg, onnx_seg, size, several, True)
    box_only = [ObjectPrompt(boxes=[Box(3, 4, w - 5, h - 2)])]
    _check(torch_seg, onnx_seg, size, box_only, False)


def test_onnx_decode_many_objects_and_mask_input(segmenters) -> None:
    torch_seg, onnx_seg, _ = segmenters
    size = (64, 48)
    rng = np.random.default_rng(3)
    clicks = rng.uniform(0, 1, (9, 2)) * (63, 47)
    many = [ObjectPrompt(points=[Point(*c)]) for c in clicks]
    ref, _ = _check(torch_seg, onnx_seg, size, many, "auto")
    low = torch_seg.backbone.frame.low_res
    refine = [
        ObjectPrompt(
            points=[Point(*c), Point(*clicks[0], positive=False)],
            logits=MaskLogits(ref.logits[i, 0]),
        )
        for i, c in enumerate(clicks[1:4], start=1)
    ]
    _check(torch_seg, onnx_seg, size, refine, True)
    noisy = rng.normal(0, 3, (low, low)).astype(np.float32)
    _check(
        torch_seg,
        onnx_seg,
        size,
        [ObjectPrompt(points=[Point(10, 10)], logits=MaskLogits(noisy))],
        False,
    )


def test_upscaled_masks_output_matches_sam_postprocessing(segmenters) -> None:
    torch_seg, onnx_seg, _ = segmenters
    for size in ((64, 48), (40, 64)):
        image = _image(*size)
        prompts = PromptSet([ObjectPrompt(points=[Point(7, 9)])], image_size=size)
        emb = torch_seg.embed_image(image)
        arrays = prompts.to_arrays(torch_seg.backbone.frame)
        from vprompt.segment.onnx_runtime import onnx_feeds

        dec = onnx_seg.decoder
        emb_np = emb.parts["embeddings"].numpy()
        _, low, masks = dec.run(emb_np, onnx_feeds(arrays, dec.meta.low_res), (size[1], size[0]))
        assert masks.shape == (1, 4, size[1], size[0])
        plan = torch_seg.backbone.frame.postprocess_sizes(size)
        from vprompt.segment.segmenter import upsample_logits

        ref = upsample_logits(torch.from_numpy(low), plan).numpy()
        np.testing.assert_allclose(masks, ref, atol=ATOL, rtol=RTOL)


def test_bad_or_mismatched_decoder_is_one_line(segmenters, tmp_path: Path) -> None:
    torch_seg, _, path = segmenters
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not an onnx model at all")
    with pytest.raises(ConfigError) as exc:
        OnnxSamDecoder(junk, backbone=torch_seg.backbone)
    assert "\n" not in str(exc.value)
    other = Segmenter.load("sam:tiny", "none", device="cpu").backbone  # original weights
    with pytest.raises(ConfigError, match="re-export") as exc:
        OnnxSamDecoder(path, backbone=other)
    assert "\n" not in str(exc.value)


def test_cli_segment_onnx_runtime_matches_torch(run_cli, tmp_path: Path, monkeypatch) -> None:
    """`vprompt export onnx` through the real CLI; `segment --runtime onnx` (auto-exported into
    the cache, or given the exported file) in-process through the same CLI entry point."""
    from click.testing import CliRunner

    from vprompt.cli import main

    monkeypatch.setenv("VPROMPT_CACHE", str(tmp_path / "cache"))

    def segment(*extra: object) -> Any:
        args = [*map(str, (image, *TINY, "--point", "20,30", "--box", "5,5,70,50")), *extra]
        return CliRunner().invoke(main, ["segment", *args, "--no-embedding-cache"])

    image = tmp_path / "photo.png"
    _image(80, 56).save(image)
    ref = segment("--out", tmp_path / "t")
    assert ref.exit_code == 0, ref.output
    onnx_out = tmp_path / "decoder.onnx"
    exp = run_cli("export", "onnx", "--model", "sam:tiny", "--weights", "none", "--out", onnx_out)
    assert exp.returncode == 0, exp.stderr
    assert json.loads(exp.stdout.strip().splitlines()[-1])["model"] == "sam:tiny"
    for i, extra in enumerate(((), ("--onnx-decoder", onnx_out))):
        got = segment("--runtime", "onnx", *extra, "--out", tmp_path / f"o{i}")
        assert got.exit_code == 0, got.output
        a = json.loads((tmp_path / "t" / "annotations.json").read_text())
        b = json.loads((tmp_path / f"o{i}" / "annotations.json").read_text())
        assert [x["segmentation"] for x in a["annotations"]] == [
            x["segmentation"] for x in b["annotations"]
        ]
        np.testing.assert_allclose(
            [x["score"] for x in a["annotations"]],
            [x["score"] for x in b["annotations"]],
            atol=1e-4,
        )
    assert list((tmp_path / "cache" / "onnx").glob("*.onnx"))  # the auto-export's copy
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage")
    bad = segment("--runtime", "onnx", "--onnx-decoder", junk, "--out", tmp_path / "b")
    assert bad.exit_code != 0
    assert len(bad.output.strip().splitlines()) == 1, bad.output


def test_serve_runtime_onnx_answers_like_torch(tmp_path: Path, monkeypatch) -> None:
    import io

    from fastapi.testclient import TestClient

    from vprompt.serve import ServeSettings, create_app

    monkeypatch.setenv("VPROMPT_CACHE", str(tmp_path / "cache"))
    png = io.BytesIO()
    _image(72, 40).save(png, format="PNG")
    request = {"objects": [{"points": [[30, 20, 1]], "box": [4, 4, 60, 36]}], "format": "rle"}
    answers = []
    for runtime in ("torch", "onnx"):
        settings = ServeSettings(model="sam:tiny", weights="none", device="cpu", runtime=runtime)
        with TestClient(create_app(settings), base_url="http://localhost") as client:
            up = client.post("/api/images", files={"file": ("x.png", png.getvalue(), "image/png")})
            assert up.status_code == 201, up.text
            r = client.post(f"/api/images/{up.json()['image_id']}/segment", json=request)
            assert r.status_code == 200, r.text
            answers.append(r.json())
    assert list((tmp_path / "cache" / "onnx").glob("*.onnx"))
    torch_obj, onnx_obj = (a["objects"][0] for a in answers)
    assert torch_obj["mask"] == onnx_obj["mask"]
    np.testing.assert_allclose(torch_obj["score"], onnx_obj["score"], atol=1e-4)


def test_split_export_decodes_like_the_single_graph(segmenters, tmp_path: Path) -> None:
    """The runtime's split export (image graph once per embedding, prompt graph per click)
    matches PyTorch, and a new embedding replaces the cached image side."""
    from vprompt.export.sam_onnx import image_graph_path
    from vprompt.segment.onnx_runtime import read_meta

    torch_seg, _, _ = segmenters
    backbone = torch_seg.backbone
    path = tmp_path / "split.onnx"
    export_sam_decoder(backbone, path, upscale=False, split=True)
    assert read_meta(path).graph == "prompt"
    assert read_meta(path).image_graph == image_graph_path(path).name
    assert read_meta(image_graph_path(path)).graph == "image"
    decoder = OnnxSamDecoder(path, backbone=backbone, threads=1)
    split_seg = Segmenter(backbone, decoder=decoder)
    split_seg.cache = torch_seg.cache
    objects = [ObjectPrompt(points=[Point(10, 20)]), ObjectPrompt(points=[Point(40, 5)])]
    for size in [(64, 48), (48, 64), (64, 48)]:  # back and forth between two embeddings
        _check(torch_seg, split_seg, size, objects, True)
        assert decoder._image is not None
    with pytest.raises(ConfigError, match="image"):
        OnnxSamDecoder(image_graph_path(path), backbone=backbone)
    image_graph_path(path).unlink()
    with pytest.raises(ConfigError, match="no such file"):
        OnnxSamDecoder(path, backbone=backbone)
