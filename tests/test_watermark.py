"""Watermark keys: bounded perturbation, frozen backbone, seeded training, JPEG approximation,
detection, test-split-only evaluation and hostile key files."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

EPS = 8 / 255


def _trainable(backbone, hidden: int = 0):
    from vprompt.watermark.detector import FrozenFeatures, KeyDetector, feature_dim_of, pixel_spec

    spec = pixel_spec(backbone)
    features = FrozenFeatures(backbone)
    dim = feature_dim_of(features, spec["size"], torch.device("cpu"))
    return KeyDetector(
        features=features, size=spec["size"], mean=spec["mean"], std=spec["std"],
        feature_dim=dim, hidden=hidden,
    )  # fmt: skip


def _config(**kw):
    from vprompt.watermark.train import WatermarkTrainConfig

    base = dict(eps=EPS, hidden=0, epochs=8, batch_size=6, lr_head=0.01, seed=0)
    return WatermarkTrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny_split(tiny_folder):
    from vprompt.data.sources import load_data

    return load_data(f"folder:{tiny_folder}")


@pytest.fixture(scope="module")
def cli_key(run_cli, tiny_folder, tmp_path_factory) -> Path:
    """The one real-CLI run: ``vprompt watermark train`` on clip:tiny."""
    out = tmp_path_factory.mktemp("wm-train")
    result = run_cli(
        "watermark", "train", "--model", "clip:tiny", "--weights", "none",
        "--data", f"folder:{tiny_folder}", "--eps", "8/255", "--epochs", "8",
        "--batch-size", "6", "--hidden", "0", "--lr-head", "0.01", "--out", str(out),
        "--device", "cpu", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["train_tpr"] > summary["train_fpr"]
    for name in ("key.safetensors", "delta.png", "training.png"):
        assert (out / name).is_file()
    return out / "key.safetensors"


def _smooth_image(h: int = 64, w: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w] / 64.0
    rgb = np.stack(
        [
            0.5 + 0.4 * np.sin(2 * np.pi * xx),
            0.5 + 0.4 * np.cos(3 * np.pi * yy),
            0.5 + 0.3 * np.sin(1.4 * np.pi * (xx + yy)),
        ],
        -1,
    )
    rgb += np.random.default_rng(0).normal(0, 0.03, rgb.shape)
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


@pytest.mark.parametrize("quality", [50, 75, 90])
@pytest.mark.parametrize("shape", [(64, 64), (50, 70)])
def test_diff_jpeg_matches_pil(quality, shape):
    """The straight-through forward pass is real JPEG up to libjpeg's integer DCT and chroma
    filters: within ~1 level of PIL on average (measured 0.7-1.2), while JPEG itself moves
    this image ~6 levels; so the bound 1.5 levels and 'at most a quarter of JPEG's own
    change' both fail for an approximation that skips quantisation or subsampling."""
    from vprompt.watermark.channel import diff_jpeg

    array = _smooth_image(*shape)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    pil = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).astype(np.float64)
    x = torch.from_numpy(array).permute(2, 0, 1).float()[None] / 255
    x.requires_grad_(True)
    out = diff_jpeg(x, torch.tensor([quality]))
    ours = out[0].detach().permute(1, 2, 0).numpy() * 255
    error = np.abs(ours - pil).mean()
    jpeg_change = np.abs(array - pil).mean()
    assert error < 1.5
    assert error < 0.25 * jpeg_change
    out.sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


def test_channel_is_seeded_and_differentiable():
    from vprompt.watermark.channel import ChannelConfig, robustness_channel

    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    cfg = ChannelConfig(jpeg_prob=1.0, resize_prob=1.0)
    a = robustness_channel(x, cfg, torch.Generator().manual_seed(3))
    b = robustness_channel(x, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(a, (a * 255).round() / 255)
    a.sum().backward()
    assert x.grad is not None
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kw", [{"jpeg_prob": 1.5}, {"jpeg_quality": (90, 40)}, {"resize_scale": (0.0, 1.0)}]
)
def test_channel_config_refuses_bad_values(kw):
    from vprompt.errors import ConfigError
    from vprompt.watermark.channel import ChannelConfig

    with pytest.raises(ConfigError):
        ChannelConfig(**kw)


def test_parse_eps():
    from vprompt.errors import ConfigError
    from vprompt.watermark.train import parse_eps

    assert parse_eps("4/255") == pytest.approx(4 / 255)
    assert parse_eps("0.01") == pytest.approx(0.01)
    for bad in ("4/0", "abc", "-1", "nan", "1"):
        with pytest.raises(ConfigError):
            parse_eps(bad)


@pytest.mark.parametrize("size", [(17, 23), (32, 32), (100, 80)])
def test_embedding_changes_pixels_by_at_most_eps(size):
    from vprompt.watermark.detector import embed_image, resize_delta

    gen = torch.Generator().manual_seed(0)
    delta = EPS * (torch.rand(3, 32, 32, generator=gen) * 2 - 1).sign()  # worst case: ±eps
    h, w = size
    assert float(resize_delta(delta, h, w).abs().max()) <= EPS + 1e-7
    array = np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)
    marked = np.asarray(embed_image(Image.fromarray(array), delta)).astype(int)
    change = np.abs(marked - array.astype(int))
    assert marked.shape == array.shape
    assert change.max() <= round(EPS * 255 + 0.5)
    assert change.max() >= 1  # the mark is really there


def test_training_freezes_backbone_and_grads_reach_only_delta_and_head(tiny_split):
    from vprompt import load_backbone
    from vprompt.watermark.train import train_key

    backbone = load_backbone("clip:tiny", "none")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    detector = _trainable(backbone, hidden=8)
    seen = []

    def check(w, det):
        assert w.grad is not None
        assert w.grad.abs().sum() > 0
        for p in det.head.parameters():
            assert p.grad is not None
        assert all(p.grad is None for p in det.features.parameters())
        seen.append(1)

    trained = train_key(detector, tiny_split.train, _config(epochs=1, hidden=8), on_step=check)
    assert seen
    after = backbone.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert float(trained.delta.abs().max()) <= EPS


def test_same_seed_same_key_other_seed_differs(tiny_split):
    from vprompt import load_backbone
    from vprompt.watermark.train import train_key

    backbone = load_backbone("clip:tiny", "none")
    keys = []
    for seed in (0, 0, 1):
        detector = _trainable(backbone)
        trained = train_key(detector, tiny_split.train, _config(epochs=2, seed=seed))
        keys.append((trained.delta, detector.head_tensors(), trained.threshold))
    (d0, h0, t0), (d1, h1, t1), (d2, h2, _) = keys
    assert torch.equal(d0, d1)
    assert t0 == t1
    assert all(torch.equal(h0[k], h1[k]) for k in h0)
    assert not torch.equal(d0, d2)
    assert not torch.equal(h0["head.0.weight"], h2["head.0.weight"])


def test_detector_separates_marked_from_clean_training_images(tiny_split):
    from vprompt import load_backbone
    from vprompt.watermark.evaluate import auroc
    from vprompt.watermark.train import train_key, training_logits

    detector = _trainable(load_backbone("clip:tiny", "none"))
    trained = train_key(detector, tiny_split.train, _config())
    clean, marked = training_logits(detector, tiny_split.train, trained.delta, 6)
    assert auroc(marked, clean) >= 0.9
    assert trained.train_metrics["train_fpr"] <= 0.1
    assert trained.train_metrics["train_tpr"] >= 0.5


def test_threshold_keeps_false_positives_at_target():
    from vprompt.watermark.train import threshold_for

    logits = torch.arange(100, dtype=torch.float32)
    t = threshold_for(logits, 0.05)
    assert float((logits > t).float().mean()) == pytest.approx(0.05)
    assert float((logits > threshold_for(logits, 0.0)).float().mean()) == 0.0


def test_auroc():
    from vprompt.watermark.evaluate import auroc

    assert auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert auroc(torch.tensor([0.0]), torch.tensor([1.0])) == 0.0
    assert auroc(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5


def test_key_round_trip_and_embed_detect_cli(cli_key, tiny_folder, tmp_path):
    from vprompt.cli import main
    from vprompt.watermark.key_file import load_key

    key = load_key(cli_key)
    assert float(key.delta.abs().max()) <= key.eps
    assert key.backbone["name"] == "clip:tiny"
    runner = CliRunner()
    clean_dir = tiny_folder / "train" / "red_thing"
    result = runner.invoke(
        main,
        ["watermark", "embed", "--key", str(cli_key), str(clean_dir), "--out", str(tmp_path / "m")],
    )
    assert result.exit_code == 0, result.output
    marked = sorted((tmp_path / "m").glob("*.png"))
    assert len(marked) == 4
    for m in marked:
        a = np.asarray(Image.open(m)).astype(int)
        b = np.asarray(Image.open(clean_dir / m.name)).astype(int)
        assert np.abs(a - b).max() <= round(key.eps * 255 + 0.5)
    result = runner.invoke(
        main,
        ["watermark", "detect", "--key", str(cli_key), *map(str, marked), str(clean_dir), "--json"],
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert len(rows) == 8
    hits = {Path(r["path"]).parent.name: 0 for r in rows}
    for r in rows:
        assert 0 <= r["probability"] <= 1
        hits[Path(r["path"]).parent.name] += r["watermarked"]
    assert hits[tmp_path.joinpath("m").name] > hits["red_thing"]


def test_eval_reads_only_the_test_split(cli_key, tiny_folder, tmp_path):
    import shutil

    from vprompt.cli import main

    data = tmp_path / "data"
    shutil.copytree(tiny_folder, data)
    for png in (data / "train").rglob("*.png"):
        png.write_bytes(b"not an image: eval must never read the training split")
    result = CliRunner().invoke(
        main,
        ["watermark", "eval", "--key", str(cli_key), "--data", f"folder:{data}",
         "--jpeg", "75", "--out", str(tmp_path / "eval"), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["split"] == "test"
    assert report["images"] == 6  # 2 test images x 3 classes
    assert set(report["conditions"]) == {"none", "jpeg-75", "resize-0.5"}
    assert report["psnr_db"] > 30
    for name in ("watermark.json", "watermark.md", "watermark.png"):
        assert (tmp_path / "eval" / name).is_file()


def _hostile(cli_key: Path, path: Path, case: str) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(cli_key))
    with cli_key.open("rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        meta = json.loads(fh.read(n))["__metadata__"]
    info = json.loads(meta["vprompt"])
    if case == "pickle":
        path.write_bytes(pickle.dumps({"delta": torch.zeros(3, 32, 32)}))
        return
    if case == "torch-save":
        torch.save(tensors, path)
        return
    if case == "shape":
        tensors["delta"] = torch.zeros(3, 16, 16)
    elif case == "nan":
        tensors["head.0.weight"][0, 0] = float("nan")
    elif case == "over-eps":
        tensors["delta"][0, 0, 0] = info["eps"] * 1.5
    elif case == "backbone":
        info["backbone"]["name"] = "torchvision:tiny"
    elif case == "fingerprint":
        info["backbone"]["fingerprint"] = "0" * 16
    elif case == "format":
        info["format"] = "vprompt-patch"
    save_file(tensors, str(path), {"vprompt": json.dumps(info)})


@pytest.mark.parametrize(
    "case",
    ["pickle", "torch-save", "shape", "nan", "over-eps", "backbone", "fingerprint", "format"],
)
def test_hostile_key_is_one_line_error(cli_key, tiny_folder, tmp_path, case):
    from vprompt.cli import main

    bad = tmp_path / f"{case}.safetensors"
    _hostile(cli_key, bad, case)
    image = next((tiny_folder / "test").rglob("*.png"))
    result = CliRunner().invoke(main, ["watermark", "detect", "--key", str(bad), str(image)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("vprompt: error: ")
    assert str(bad) in lines[0]
    assert "Traceback" not in result.output


def test_key_for_another_model_is_refused(cli_key, tiny_folder):
    from vprompt.cli import main

    image = next((tiny_folder / "test").rglob("*.png"))
    result = CliRunner().invoke(
        main,
        ["watermark", "detect", "--key", str(cli_key), "--model", "torchvision:tiny", str(image)],
    )
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"vprompt: error: {cli_key}: this key was trained for clip:tiny, not torchvision:tiny"
    ]


def test_detect_reports_a_bad_image_in_one_line(cli_key, tmp_path):
    from vprompt.cli import main

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = CliRunner().invoke(main, ["watermark", "detect", "--key", str(cli_key), str(bad)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert any(line.startswith(f"vprompt: error: {bad}") for line in result.output.splitlines())
