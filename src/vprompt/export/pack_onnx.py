"""A prompt pack and its frozen backbone as one ONNX graph: ``pixels -> logits``.

The pack is rebuilt on its backbone (:func:`~vprompt.engine.pack.build_from_pack`, which never
unpickles), put in eval mode and run once, so whatever the method computes once per prompt
value outside training (the class text features of text-context and deep vision-language
packs, Tip-Adapter's cache) is cached; tracing then records those tensors as constants: the
graph holds the image path only (pixel prompt, prompted vision tower, label mapping,
normalise, matmul with a C x D class-feature matrix). Every export is checked against PyTorch
with onnxruntime (when installed) on two batch sizes before it is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vprompt.errors import ConfigError, VPromptError
from vprompt.export.onnx_graph import trace_to_onnx
from vprompt.methods.base import PromptMethod

ONNX_FORMAT = "vprompt-onnx-pack"
INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"
RTOL = 1e-4
ATOL = 1e-4
"""Parity: ``|onnx - torch| <= ATOL * max(1, max|logit|) + RTOL * |torch|`` elementwise."""

_IMAGE_CONDITIONED = (
    "its class text features are generated from each image (a meta-net conditions the "
    "context on the image), so they cannot be folded into the graph and its per-image text "
    "path is not batch-size independent when traced"
)
REFUSED: dict[str, str] = {"cocoop": _IMAGE_CONDITIONED}
"""Methods refused by name, with the reason (the rest are decided by their capabilities and a
parity check of the exported graph)."""


class PackGraph(nn.Module):
    """B x 3 x H x W pixels (as the method's ``input_transform(False)`` makes them) → B x C
    float32 logits, exactly what ``method.predict`` scores in eval mode (on CPU)."""

    def __init__(self, method: PromptMethod) -> None:
        super().__init__()
        self.method = method

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.method(pixels).logits.float()


def refusal(method: type[PromptMethod] | PromptMethod) -> str | None:
    """Why ``method`` cannot become a static graph, or None when it can be tried."""
    cls = method if isinstance(method, type) else type(method)
    caps = cls.capabilities
    if cls.name in REFUSED:
        return REFUSED[cls.name]
    if not caps.trains and not caps.uses_training_data and caps.inputs == "images":
        return (
            "it tunes its prompt on every test image (test-time optimisation), which a "
            "static graph cannot hold"
        )
    return None


def input_spec(method: PromptMethod) -> dict[str, Any]:
    """What the graph's input is: the method's own eval transform, described for users."""
    from PIL import Image

    from vprompt.data.batched import ResizeToTensor

    transform = method.input_transform(False)
    if isinstance(transform, ResizeToTensor):
        return {
            "size": [transform.size, transform.size],
            "mean": list(transform.mean or (0.0, 0.0, 0.0)),
            "std": list(transform.std or (1.0, 1.0, 1.0)),
            "interpolation": "bilinear",
            "resize_mode": "squash",
            "range": "normalised" if transform.mean is not None else "[0, 1]",
        }
    if transform is method.backbone.transform:
        return {**method.backbone.preprocess.to_dict(), "range": "normalised"}
    shape = transform(Image.new("RGB", (64, 64))).shape
    return {"size": [int(shape[-2]), int(shape[-1])], "range": "method-specific"}


def _check_parity(
    graph: PackGraph, model_bytes: bytes, shape: tuple[int, ...], dynamic: bool
) -> float:
    """Largest |onnx - torch| over random inputs of two batch sizes; raises on a mismatch."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for batch in (1, 3) if dynamic else (shape[0],):
        pixels = torch.randn((batch, *shape[1:]), generator=gen)
        with torch.no_grad():
            want = graph(pixels).numpy()
        try:
            (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: pixels.numpy()})
        except Exception as exc:  # onnxruntime's own error types
            raise ConfigError(
                f"the exported graph fails on a batch of {batch} ({str(exc).splitlines()[0]}); "
                "the method's forward fixes the batch size when traced (export with a fixed "
                "batch of 1 instead)"
            ) from None
        if got.shape != want.shape:
            raise ConfigError(
                f"the exported graph returns logits of shape {tuple(got.shape)} for a batch of "
                f"{batch}, PyTorch {tuple(want.shape)}; the method's forward fixes the batch "
                "size when traced (export with a fixed batch of 1 instead)"
            )
        diff = np.abs(got - want)
        scale = max(1.0, float(np.abs(want).max()))
        if not bool(np.all(diff <= ATOL * scale + RTOL * np.abs(want))):
            raise ConfigError(
                f"the exported graph differs from PyTorch on a batch of {batch} (max |diff| "
                f"{float(diff.max()):.3g}); the method's forward depends on Python values that "
                "tracing freezes"
            )
        worst = max(worst, float(diff.max()))
    return worst


def export_pack_onnx(
    pack_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    weights: str | None = None,
    allow_download: bool = False,
    opset: int = 17,
    batch_dynamic: bool = True,
) -> dict[str, Any]:
    """Write a prompt pack and its frozen backbone as one ONNX graph ``pixels -> logits``.

    Args:
        pack_path: The pack (a file or ``hf-hub:ORG/REPO``).
        out_path: The ``.onnx`` file to write (atomically).
        weights: Backbone weights to use instead of the pack's source (as for every pack).
        allow_download: Let the pack's own weight source download.
        opset: ONNX opset.
        batch_dynamic: A dynamic batch axis (else the graph takes one image).

    Returns:
        A summary: path, method, classes, input and output names and shapes, opset, bytes, the
        largest |onnx - torch| of the parity check (None without onnxruntime).

    Raises:
        PackError: An unreadable pack, or weights not on this machine.
        ConfigError: A method that cannot be a static graph (with the reason), or a graph that
            does not reproduce PyTorch's logits.
    """
    from vprompt import __version__
    from vprompt.engine.pack import build_from_pack, load_pack
    from vprompt.utils.io import atomic_path

    pack = load_pack(pack_path)
    cls_reason = refusal(_method_class(pack.method))
    if cls_reason:
        raise ConfigError(f"cannot export a {pack.method} pack to ONNX: {cls_reason}")
    method = build_from_pack(pack, weights=weights, allow_download=allow_download, device="cpu")
    method.eval()
    spec = input_spec(method)
    height, width = spec["size"]
    example = torch.randn(2 if batch_dynamic else 1, 3, height, width)
    graph = PackGraph(method).eval()
    with torch.no_grad():
        graph(example)  # fills the method's once-per-prompt caches: traced as constants

    props = {
        "format": ONNX_FORMAT,
        "method": pack.method,
        "classnames": json.dumps(pack.classnames, ensure_ascii=False),
        "backbone": pack.backbone.name,
        "backbone_weights": pack.backbone.weights,
        "backbone_fingerprint": pack.backbone.fingerprint,
        "preprocess": json.dumps(pack.preprocess, sort_keys=True),
        "input": json.dumps(spec, sort_keys=True),
        "vprompt_version": __version__,
        "pack_vprompt_version": pack.vprompt_version,
    }
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if batch_dynamic else None
    try:
        model = trace_to_onnx(
            graph,
            [example],
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes=axes,
            opset=opset,
            props=props,
        )
    except VPromptError:
        raise
    except Exception as exc:  # the exporter's many error types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:240]
        raise ConfigError(
            f"cannot export a {pack.method} pack to ONNX (opset {opset}): {first}"
        ) from exc
    model_bytes = model.SerializeToString()
    max_diff: float | None = None
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        pass
    else:
        shape = (2 if batch_dynamic else 1, 3, height, width)
        try:
            max_diff = _check_parity(graph, model_bytes, shape, batch_dynamic)
        except ConfigError as exc:
            raise ConfigError(f"cannot export a {pack.method} pack to ONNX: {exc}") from None
    target = Path(out_path)
    with atomic_path(target) as tmp_path:
        tmp_path.write_bytes(model_bytes)
    return {
        "path": str(target),
        "method": pack.method,
        "backbone": pack.backbone.name,
        "classes": len(pack.classnames),
        "input": {"name": INPUT_NAME, "shape": ["batch" if batch_dynamic else 1, 3, height, width]},
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch" if batch_dynamic else 1, len(pack.classnames)],
        },
        "opset": opset,
        "batch_dynamic": batch_dynamic,
        "bytes": len(model_bytes),
        "max_abs_diff": max_diff,
        "tolerance": {"rtol": RTOL, "atol": ATOL, "atol_scaled_by": "max(1, max|logit|)"},
    }


def _method_class(name: str) -> type[PromptMethod]:
    from vprompt.methods.registry import METHODS

    return METHODS.get(name)
