"""ONNX export of a prompt pack with its frozen backbone (``vprompt.export.pack_onnx``).

Each registered method's first ``examples()`` entry is built on its tiny backbone (weights
``none``), saved as a pack and exported. One pack per distinct graph path (``CHECKED``) is run
with onnxruntime here: its logits must equal the rebuilt method's within ``RTOL`` / ``ATOL``
(ATOL scaled by max(1, max|logit|)) with the same argmax, for batches of 1 and 3.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import vprompt
from vprompt.engine.pack import build_from_pack, load_pack, save_pack
from vprompt.errors import ConfigError, PackError
from vprompt.export.pack_onnx import ATOL, INPUT_NAME, ONNX_FORMAT, RTOL, export_pack_onnx
from vprompt.methods import METHODS, MethodExample, PromptMethod
from vprompt.methods.config import apply_config_mapping

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

CLASSES = ["zero", "one", "two"]
BUILT_IN = [n for n in METHODS.names() if METHODS.get(n).__module__.startswith("vprompt.")]

REFUSED = {
    "cocoop": "generated from each image",
    "tpt": "test-time optimisation",
    "difftpt": "test-time optimisation",
}
"""Methods no export accepts, and a phrase of the reason given."""
FIXED_BATCH_ONLY = {
    # Its forward routes each image to a cluster's prompt (a Python loop over the batch), so
    # the traced graph only takes the batch it was traced with.
    ("dam-vp", 0): "fixes the batch size",
}
CHECKED = [
    ("visual-prompt", 0),  # padding frame + label mapping, torchvision
    ("visual-prompt", 1),  # fixed patch, broadcast over the batch
    ("vpt", 1),  # deep VPT tokens, timm ViT
    ("vpt", 3),  # deep VPT tokens, CLIP ViT
    ("coop", 0),  # learned text context, class features folded in
    ("maple", 0),  # deep vision prompts + folded text features
    ("tip-adapter", 0),  # cache keys / values as constants, CLIP
    ("tip-adapter", 1),  # cache only (no text tower), torchvision
    ("linear-probe", 0),  # a trained head on the frozen features
    ("dam-vp-meta", 0),  # a canvas prompt with an active-neuron read-out
]
"""One pack per distinct graph path, checked here against PyTorch independently of the
export's own parity check."""
EXPORTABLE = [
    pytest.param(name, index, id=f"{name}-{index}")
    for name, index in [(n, 0) for n in BUILT_IN if n not in REFUSED]
    if (name, index) not in FIXED_BATCH_ONLY and (name, index) not in CHECKED
]
"""Every other method: the export succeeds, which includes the export's own onnxruntime
parity check at batches 1 and 3 (a mismatch raises and writes nothing)."""
BACKBONES: dict[str, Any] = {}


def _backbone(name: str) -> Any:
    if name not in BACKBONES:
        BACKBONES[name] = vprompt.load_backbone(name, "none")
    return BACKBONES[name]


def _pack(name: str, index: int, tmp_path: Path) -> Path:
    cls = METHODS.get(name)
    example: MethodExample = cls.examples()[index]
    config = apply_config_mapping(cls.Config(), example.config, what=f"{name} example")
    torch.manual_seed(0)
    method = cls(_backbone(example.backbone), CLASSES, config)
    with torch.no_grad():  # learned prompts off their init, so their path counts in the parity
        for key, value in method.named_parameters():
            if not key.startswith("backbone.") and value.dtype.is_floating_point:
                value.add_(0.05 * torch.randn_like(value))
    return save_pack(method, tmp_path / f"{name}-{index}.safetensors")


def _images(method: PromptMethod, n: int) -> torch.Tensor:
    rng = np.random.default_rng(n)
    transform = method.input_transform(False)
    pils = [Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)) for _ in range(n)]
    return torch.stack([transform(im) for im in pils])


def _session(path: Path) -> Any:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _assert_parity(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    atol = ATOL * max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=atol)
    assert (got.argmax(-1) == want.argmax(-1)).all() or np.allclose(want, want[:, :1])


@pytest.mark.parametrize(("name", "index"), EXPORTABLE)
def test_every_other_method_exports_with_a_dynamic_batch(
    name: str, index: int, tmp_path: Path
) -> None:
    out = tmp_path / "model.onnx"
    summary = export_pack_onnx(_pack(name, index, tmp_path), out)
    assert summary["batch_dynamic"]
    assert out.is_file()


@pytest.mark.parametrize(("name", "index"), CHECKED)
def test_onnx_logits_equal_pytorch(name: str, index: int, tmp_path: Path) -> None:
    pack_path = _pack(name, index, tmp_path)
    out = tmp_path / "model.onnx"
    summary = export_pack_onnx(pack_path, out)
    assert summary["path"] == str(out)
    assert out.is_file()
    assert summary["classes"] == len(CLASSES)
    assert summary["batch_dynamic"]
    method = build_from_pack(load_pack(pack_path)).eval()
    session = _session(out)
    for n in (1, 3):
        pixels = _images(method, n)
        (got,) = session.run(None, {INPUT_NAME: pixels.numpy()})
        want = method.predict_proba(pixels).log().numpy()  # what predict ranks
        probs = torch.from_numpy(got).softmax(-1).log().numpy()
        _assert_parity(probs, want)
        with torch.no_grad():
            _assert_parity(got, method(pixels).logits.float().numpy())


@pytest.mark.parametrize(("name", "index"), sorted(FIXED_BATCH_ONLY))
def test_batch_fixing_methods_export_with_a_fixed_batch(
    name: str, index: int, tmp_path: Path
) -> None:
    pack_path = _pack(name, index, tmp_path)
    with pytest.raises(ConfigError, match=FIXED_BATCH_ONLY[(name, index)]):
        export_pack_onnx(pack_path, tmp_path / "dynamic.onnx")
    assert not (tmp_path / "dynamic.onnx").exists()
    out = tmp_path / "fixed.onnx"
    summary = export_pack_onnx(pack_path, out, batch_dynamic=False)
    assert summary["input"]["shape"][0] == 1
    method = build_from_pack(load_pack(pack_path)).eval()
    pixels = _images(method, 1)
    (got,) = _session(out).run(None, {INPUT_NAME: pixels.numpy()})
    with torch.no_grad():
        _assert_parity(got, method(pixels).logits.float().numpy())


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unexportable_methods_are_refused_with_a_reason(name: str, tmp_path: Path) -> None:
    pack_path = _pack(name, 0, tmp_path)
    with pytest.raises(ConfigError) as info:
        export_pack_onnx(pack_path, tmp_path / "model.onnx")
    message = str(info.value)
    assert "\n" not in message
    assert name in message
    assert REFUSED[name] in message
    assert not (tmp_path / "model.onnx").exists()


def test_every_built_in_method_is_exported_or_listed() -> None:
    listed = set(REFUSED) | {n for n, _ in FIXED_BATCH_ONLY}
    exported = {p.values[0] for p in EXPORTABLE} | {n for n, _ in CHECKED}
    assert set(BUILT_IN) <= listed | exported


def test_metadata_describes_the_pack(tmp_path: Path) -> None:
    pack_path = _pack("coop", 0, tmp_path)
    out = tmp_path / "model.onnx"
    export_pack_onnx(pack_path, out, opset=17)
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    props = {p.key: p.value for p in model.metadata_props}
    pack = load_pack(pack_path)
    assert props["format"] == ONNX_FORMAT
    assert props["method"] == "coop"
    assert json.loads(props["classnames"]) == CLASSES
    assert props["backbone"] == "clip:tiny"
    assert props["backbone_fingerprint"] == pack.backbone.fingerprint
    assert json.loads(props["preprocess"]) == pack.preprocess
    assert json.loads(props["input"])["size"] == list(pack.preprocess["size"])
    assert props["vprompt_version"] == vprompt.__version__
    assert model.opset_import[0].version == 17
    # Folded in: no text-encoder weights (token embedding) travel in the graph.
    names = [i.name for i in model.graph.initializer]
    text_tower = [
        n
        for n in names
        if "token_embedding" in n or n.startswith("method.backbone.model.transformer")
    ]
    assert not text_tower
    assert _session(out).get_inputs()[0].shape[0] == "batch"


def test_pixel_prompt_input_is_described(tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    export_pack_onnx(_pack("visual-prompt", 0, tmp_path), out)
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    spec = json.loads(props["input"])
    assert spec["size"] == [48, 48]
    assert spec["range"] == "[0, 1]"


def test_pickle_pack_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "pack.safetensors"
    torch.save({"ctx": torch.zeros(2, 3)}, path)
    with pytest.raises(PackError) as info:
        export_pack_onnx(path, tmp_path / "model.onnx")
    assert "pickle" in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "model.onnx").exists()


def test_export_onnx_command_writes_a_pack_graph(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from vprompt.cli import main

    pack_path = _pack("coop", 0, tmp_path)
    out = tmp_path / "coop.onnx"
    result = CliRunner().invoke(
        main, ["export", "onnx", "--what", "pack", "--pack", str(pack_path), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["method"] == "coop"
    assert out.is_file()
    missing = CliRunner().invoke(main, ["export", "onnx", "--what", "pack", "--out", str(out)])
    assert missing.exit_code != 0
    assert "--pack" in missing.output
