"""Adversarial patch files: one safetensors tensor plus a JSON header; never a pickle.

Layout: the tensor ``patch`` (float32, 3 x s x s, values in [0, 1]) and one metadata entry,
``vprompt``, a JSON object with ``format: "vprompt-patch"``, ``format_version``, the placement
distribution (``transform``), the ``target`` class (or null), the victim's ``classnames``, a
description of the ``victim``, the training settings (``train``) and ``metrics``. Loading checks
the safetensors framing, the header, and the tensor's name, dtype, shape and value range
before anything is used; every problem is one :class:`PatchError` line naming the file.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vprompt.attack.eot import PatchTransformConfig
from vprompt.errors import ConfigError, VPromptError
from vprompt.utils import jsonio
from vprompt.utils.io import atomic_path
from vprompt.utils.tensor_file import META_KEY, read_artifact_header

FORMAT = "vprompt-patch"
FORMAT_VERSION = 1
MAX_PATCH_PIXELS = 4096
_MAX_FILE = 4 * 3 * MAX_PATCH_PIXELS**2 + (1 << 20)


class PatchError(VPromptError):
    """An adversarial patch file that is unreadable, malformed, or does not fit its use."""


@dataclass
class PatchFile:
    """A universal adversarial patch with what it was made for.

    Attributes:
        patch: 3 x s x s float32 in [0, 1].
        transform: The placement distribution it was trained under.
        classnames: The victim's classes, in label order.
        target: The targeted class index, or None for an untargeted patch.
        victim: How the victim was built (``model``, ``weights``, ``pack``, ``method``).
        train: Training settings (optimizer, epochs, seed …), for people.
        metrics: Training metrics, for people.
    """

    patch: torch.Tensor
    transform: PatchTransformConfig
    classnames: list[str]
    target: int | None = None
    victim: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        from vprompt import __version__

        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "vprompt_version": __version__,
            "transform": asdict(self.transform),
            "classnames": list(self.classnames),
            "target": self.target,
            "target_name": None if self.target is None else self.classnames[self.target],
            "victim": self.victim,
            "train": self.train,
            "metrics": jsonio.finite(self.metrics),
        }


def save_patch(patch_file: PatchFile, path: str | os.PathLike[str]) -> Path:
    """Write the patch atomically as safetensors with its JSON metadata."""
    from safetensors.torch import save_file

    _check_tensor(Path(path), patch_file.patch)
    header = jsonio.dumps(patch_file.metadata(), sort_keys=True, ensure_ascii=False)
    target = Path(path)
    tensor = patch_file.patch.detach().float().cpu().contiguous()
    with atomic_path(target) as tmp:
        save_file({"patch": tensor}, str(tmp), metadata={META_KEY: header})
    return target


def save_patch_png(patch: torch.Tensor, path: str | os.PathLike[str], shape: str) -> Path:
    """Write the patch at its own resolution as a PNG (RGBA for a circle: outside is clear)."""
    from PIL import Image

    from vprompt.attack.eot import patch_mask

    rgb = (patch.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    array = rgb.permute(1, 2, 0).contiguous().numpy()
    image = Image.fromarray(array, mode="RGB")
    if shape == "circle":
        alpha = (patch_mask(patch.shape[-1], "circle")[0] * 255).to(torch.uint8).numpy()
        image.putalpha(Image.fromarray(alpha, mode="L"))
    target = Path(path)
    with atomic_path(target) as tmp:
        image.save(tmp, format="PNG")
    return target


def load_patch(path: str | os.PathLike[str]) -> PatchFile:
    """Read and validate a patch file. Never unpickles.

    Raises:
        PatchError: Missing, too large, not safetensors (e.g. a pickle), not a vprompt patch,
            or a tensor of the wrong name, dtype, shape or range.
    """
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise PatchError(f"{p}: no such patch file")
    size = p.stat().st_size
    if size > _MAX_FILE:
        raise PatchError(f"{p}: {size} bytes is too large for a patch file")
    info = _read_header(p, size)
    try:
        tensors = load_file(str(p), device="cpu")
    except Exception as exc:  # safetensors' own error types
        raise PatchError(f"{p}: cannot read tensors ({exc})") from None
    if set(tensors) != {"patch"}:
        raise PatchError(
            f"{p}: a patch file holds exactly one tensor 'patch', found {sorted(tensors)}"
        )
    patch = tensors["patch"]
    _check_tensor(p, patch)
    return _patch_file(p, info, patch)


def _read_header(p: Path, size: int) -> dict[str, Any]:
    """The ``vprompt`` metadata object, after checking the safetensors framing."""
    return read_artifact_header(
        p, size, kind="patch file", fmt=FORMAT, max_version=FORMAT_VERSION, error=PatchError
    )


def _check_tensor(p: Path, patch: torch.Tensor) -> None:
    if patch.dtype != torch.float32:
        raise PatchError(
            f"{p}: tensor 'patch' must be float32, got {str(patch.dtype).replace('torch.', '')}"
        )
    shape = tuple(patch.shape)
    if (
        len(shape) != 3
        or shape[0] != 3
        or shape[1] != shape[2]
        or not 1 <= shape[1] <= MAX_PATCH_PIXELS
    ):
        raise PatchError(
            f"{p}: tensor 'patch' must be 3 x s x s with 1 <= s <= {MAX_PATCH_PIXELS}, "
            f"got {list(shape)}"
        )
    if not bool(torch.isfinite(patch).all()):
        raise PatchError(f"{p}: tensor 'patch' holds NaN or infinite values")
    if float(patch.min()) < 0 or float(patch.max()) > 1:
        raise PatchError(
            f"{p}: tensor 'patch' must hold pixel values in [0, 1], got "
            f"[{float(patch.min()):.4g}, {float(patch.max()):.4g}]"
        )


def _patch_file(p: Path, info: dict[str, Any], patch: torch.Tensor) -> PatchFile:
    """The metadata's fields, each checked for its JSON type."""
    transform = info.get("transform")
    if not isinstance(transform, dict):
        raise PatchError(f"{p}: metadata 'transform' must be an object")
    try:
        config = PatchTransformConfig(**transform)
    except (TypeError, ConfigError) as exc:
        raise PatchError(f"{p}: metadata 'transform' is invalid: {exc}") from None
    names = info.get("classnames")
    if not isinstance(names, list) or not names or not all(isinstance(c, str) for c in names):
        raise PatchError(f"{p}: metadata 'classnames' must be a non-empty list of strings")
    target = info.get("target")
    if target is not None and (
        not isinstance(target, int) or isinstance(target, bool) or not 0 <= target < len(names)
    ):
        raise PatchError(f"{p}: metadata 'target' must be null or a class index below {len(names)}")
    extra = {}
    for key in ("victim", "train", "metrics"):
        value = info.get(key, {})
        if not isinstance(value, dict):
            raise PatchError(f"{p}: metadata {key!r} must be an object")
        extra[key] = value
    return PatchFile(patch=patch, transform=config, classnames=names, target=target, **extra)
