"""Watermark key files: safetensors tensors plus a JSON header; never a pickle.

Layout: ``delta`` (float32, 3 x H x W, |δ| ≤ eps, H x W the backbone's input size), the
detector head (``feature_mean`` and ``feature_std``, F each, standardising the frozen pooled
features; ``head.0.weight`` / ``head.0.bias``, and for an MLP head ``head.2.weight`` /
``head.2.bias``), and one metadata entry ``vprompt``: a JSON object with ``format:
"vprompt-watermark"``, ``format_version``, ``eps``, ``hidden``, the decision ``threshold`` (a
logit) and the ``target_fpr`` it was chosen for, the ``backbone`` (name, weights, fingerprint),
the ``pixels`` the detector reads (size, mean, std), and ``train`` / ``metrics`` for people.

Loading checks the safetensors framing, the header, every tensor's name, dtype, shape and
finiteness, and |δ| ≤ eps before anything is used; every problem is one
:class:`WatermarkKeyError` line naming the file.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vprompt.errors import VPromptError
from vprompt.utils import jsonio
from vprompt.utils.io import atomic_path
from vprompt.utils.tensor_file import META_KEY, read_artifact_header

FORMAT = "vprompt-watermark"
FORMAT_VERSION = 1
MAX_SIDE = 4096
MAX_FEATURES = 1 << 16
MAX_HIDDEN = 4096
EPS_SLACK = 1e-6  # float32 rounding of eps·tanh(w) may overshoot eps by an ulp
_MAX_FILE = 1 << 30


class WatermarkKeyError(VPromptError):
    """A watermark key file that is unreadable, malformed, or does not fit its use."""


@dataclass
class WatermarkKey:
    """A learned watermark: the perturbation and the detector head that recognises it.

    Attributes:
        delta: 3 x H x W float32, |δ| ≤ eps, at the backbone's input size.
        head: ``feature_mean``, ``feature_std`` (F) and the head's Linear tensors.
        eps: The L∞ bound in [0, 1] pixel units.
        hidden: Width of the head's hidden layer; 0 for a linear head.
        threshold: Decision threshold on the head's logit ("watermarked" when above).
        target_fpr: The false-positive rate on clean training images it was chosen for.
        backbone: ``name``, ``weights`` and ``fingerprint`` of the frozen model.
        pixels: ``size`` [H, W], ``mean`` and ``std`` of the detector's input.
        train: Training settings, for people.
        metrics: Training metrics, for people.
    """

    delta: torch.Tensor
    head: dict[str, torch.Tensor]
    eps: float
    hidden: int
    threshold: float
    target_fpr: float
    backbone: dict[str, Any]
    pixels: dict[str, Any]
    train: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def feature_dim(self) -> int:
        return int(self.head["feature_mean"].shape[0])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.delta.shape[-2]), int(self.delta.shape[-1])

    def metadata(self) -> dict[str, Any]:
        from vprompt import __version__

        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "vprompt_version": __version__,
            "eps": self.eps,
            "hidden": self.hidden,
            "threshold": self.threshold,
            "target_fpr": self.target_fpr,
            "backbone": self.backbone,
            "pixels": self.pixels,
            "train": self.train,
            "metrics": jsonio.finite(self.metrics),
        }


def head_shapes(feature_dim: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """The head tensors' names and shapes for F features and a hidden width (0: linear)."""
    shapes: dict[str, tuple[int, ...]] = {
        "feature_mean": (feature_dim,),
        "feature_std": (feature_dim,),
    }
    if hidden:
        shapes.update(
            {
                "head.0.weight": (hidden, feature_dim),
                "head.0.bias": (hidden,),
                "head.2.weight": (1, hidden),
                "head.2.bias": (1,),
            }
        )
    else:
        shapes.update({"head.0.weight": (1, feature_dim), "head.0.bias": (1,)})
    return shapes


def save_key(key: WatermarkKey, path: str | os.PathLike[str]) -> Path:
    """Write the key atomically as safetensors with its JSON metadata."""
    from safetensors.torch import save_file

    target = Path(path)
    tensors = {"delta": key.delta, **key.head}
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    _check(target, tensors, key.eps, key.hidden)
    header = jsonio.dumps(key.metadata(), sort_keys=True, ensure_ascii=False)
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: header})
    return target


def load_key(path: str | os.PathLike[str]) -> WatermarkKey:
    """Read and validate a key file. Never unpickles.

    Raises:
        WatermarkKeyError: Missing, too large, not safetensors (e.g. a pickle), not a vprompt
            watermark key, or tensors of the wrong names, dtypes or shapes, non-finite, or a
            perturbation larger than its eps.
    """
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise WatermarkKeyError(f"{p}: no such watermark key file")
    size = p.stat().st_size
    if size > _MAX_FILE:
        raise WatermarkKeyError(f"{p}: {size} bytes is too large for a watermark key")
    info = _read_header(p, size)
    eps, hidden = info["eps"], info["hidden"]
    try:
        tensors = load_file(str(p), device="cpu")
    except Exception as exc:  # safetensors' own error types
        raise WatermarkKeyError(f"{p}: cannot read tensors ({exc})") from None
    _check(p, tensors, eps, hidden)
    delta = tensors.pop("delta")
    pixels = info["pixels"]
    if list(pixels["size"]) != list(delta.shape[-2:]):
        raise WatermarkKeyError(
            f"{p}: tensor 'delta' is {list(delta.shape)}, but the key's pixel size is "
            f"{pixels['size']}"
        )
    return WatermarkKey(
        delta=delta,
        head=tensors,
        eps=eps,
        hidden=hidden,
        threshold=info["threshold"],
        target_fpr=info["target_fpr"],
        backbone=info["backbone"],
        pixels=pixels,
        train=info["train"],
        metrics=info["metrics"],
    )


def _read_header(p: Path, size: int) -> dict[str, Any]:
    """The ``vprompt`` metadata object, after checking the framing and every field's type."""
    info = read_artifact_header(
        p,
        size,
        kind="watermark key",
        fmt=FORMAT,
        max_version=FORMAT_VERSION,
        error=WatermarkKeyError,
    )
    _check_fields(p, info)
    return info


def _real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_fields(p: Path, info: dict[str, Any]) -> None:
    eps: Any = info.get("eps")
    hidden: Any = info.get("hidden")
    if not _real(eps) or not 0 < eps <= 1:
        raise WatermarkKeyError(f"{p}: metadata 'eps' must be a number in (0, 1], got {eps!r}")
    info["eps"] = float(eps)
    if isinstance(hidden, bool) or not isinstance(hidden, int) or not 0 <= hidden <= MAX_HIDDEN:
        raise WatermarkKeyError(f"{p}: metadata 'hidden' must be an integer in [0, {MAX_HIDDEN}]")
    if not _real(info.get("threshold")):
        raise WatermarkKeyError(f"{p}: metadata 'threshold' must be a finite number")
    fpr: Any = info.get("target_fpr")
    if not _real(fpr) or not 0 <= fpr <= 1:
        raise WatermarkKeyError(f"{p}: metadata 'target_fpr' must be a number in [0, 1]")
    info["threshold"], info["target_fpr"] = float(info["threshold"]), float(fpr)
    backbone = info.get("backbone")
    if not isinstance(backbone, dict) or not all(
        isinstance(backbone.get(k), str) for k in ("name", "weights", "fingerprint")
    ):
        raise WatermarkKeyError(
            f"{p}: metadata 'backbone' must name the model's 'name', 'weights' and 'fingerprint'"
        )
    pixels: Any = info.get("pixels")
    ok = isinstance(pixels, dict)
    if ok:
        size, mean, std = pixels.get("size"), pixels.get("mean"), pixels.get("std")
        ok = (
            isinstance(size, list)
            and len(size) == 2
            and all(
                isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= MAX_SIDE for s in size
            )
            and all(isinstance(v, list) and len(v) == 3 and all(map(_real, v)) for v in (mean, std))
            and min(std) > 0
        )
    if not ok:
        raise WatermarkKeyError(
            f"{p}: metadata 'pixels' must hold 'size' [H, W] (1-{MAX_SIDE}) and 3 'mean' / "
            "3 positive 'std' values"
        )
    for key in ("train", "metrics"):
        value = info.setdefault(key, {})
        if not isinstance(value, dict):
            raise WatermarkKeyError(f"{p}: metadata {key!r} must be an object")


def _check(p: Path, tensors: dict[str, torch.Tensor], eps: float, hidden: int) -> None:
    """Names, dtypes, shapes, finiteness and the L∞ bound of a key's tensors."""
    mean = tensors.get("feature_mean")
    if mean is None or mean.dim() != 1 or not 1 <= mean.shape[0] <= MAX_FEATURES:
        raise WatermarkKeyError(
            f"{p}: a watermark key needs a 1-D tensor 'feature_mean' of 1-{MAX_FEATURES} values"
        )
    expected = {"delta": None, **head_shapes(int(mean.shape[0]), hidden)}
    if set(tensors) != set(expected):
        raise WatermarkKeyError(
            f"{p}: a watermark key with hidden={hidden} holds tensors {sorted(expected)}, "
            f"found {sorted(tensors)}"
        )
    for name, tensor in tensors.items():
        if tensor.dtype != torch.float32:
            dtype = str(tensor.dtype).replace("torch.", "")
            raise WatermarkKeyError(f"{p}: tensor {name!r} must be float32, got {dtype}")
        shape = expected[name]
        if shape is None:
            ok = (
                tensor.dim() == 3
                and tensor.shape[0] == 3
                and all(1 <= s <= MAX_SIDE for s in tensor.shape[1:])
            )
            if not ok:
                raise WatermarkKeyError(
                    f"{p}: tensor 'delta' must be 3 x H x W (1 <= H, W <= {MAX_SIDE}), got "
                    f"{list(tensor.shape)}"
                )
        elif tuple(tensor.shape) != shape:
            raise WatermarkKeyError(
                f"{p}: tensor {name!r} must have shape {list(shape)}, got {list(tensor.shape)}"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise WatermarkKeyError(f"{p}: tensor {name!r} holds NaN or infinite values")
    if bool((tensors["feature_std"] <= 0).any()):
        raise WatermarkKeyError(f"{p}: tensor 'feature_std' must be positive")
    largest = float(tensors["delta"].abs().max())
    if largest > eps + EPS_SLACK:
        raise WatermarkKeyError(
            f"{p}: tensor 'delta' reaches {largest:.6g}, more than the key's eps {eps:.6g}"
        )
