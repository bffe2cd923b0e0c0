"""Local CLIP weight files: open_clip's format, OpenAI's release format, or TorchScript.

OpenAI's CLIP models were trained with QuickGELU, while open_clip's plain configs
(``ViT-B-16``, …) use GELU: the same weights run through the wrong activation give features
about 1% off, with no error. open_clip's own ``openai`` tags switch QuickGELU on; a *file*
needs its format recognised:

- **OpenAI's release layout**: the state dict of OpenAI's checkpoints keeps the
  ``input_resolution`` / ``context_length`` / ``vocab_size`` entries, and stores linear,
  convolution and attention weights and the projections in float16 with LayerNorms in
  float32 (``clip.model.convert_weights``). Either mark makes a file OpenAI's: it is loaded
  into the architecture with QuickGELU, the marker entries dropped, every tensor in float32.
- **TorchScript archives** (OpenAI's ``ViT-B-16.pt`` downloads) cannot be read without running
  their code; they are refused with what to do instead.
- Anything else is open_clip's format and goes through open_clip's own loader. A state dict
  converted to float32 from OpenAI's weights carries no trace of its origin: such a file
  needs the ``-quickgelu`` architecture (e.g. ``clip:ViT-B-16-quickgelu``).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Literal

import torch

from vprompt.errors import WeightsError

FileFormat = Literal["open_clip", "openai", "torchscript"]
OPENAI_MARKERS = ("input_resolution", "context_length", "vocab_size")


def is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip holding compiled ``code/``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(
            "/code/" in name or name.endswith("/constants.pkl") for name in archive.namelist()
        )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A weights file's tensors (safetensors, or a tensor-only torch file), never unpickling
    anything else; a ``state_dict`` wrapper and DataParallel's ``module.`` prefixes are removed."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        data: Any = load_file(str(path), device="cpu")
    else:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise WeightsError(f"{path}: expected a dict of tensors (a state dict)")
    return {k.removeprefix("module."): v for k, v in data.items()}


def file_format(path: Path) -> FileFormat:
    """Which of the three formats (module docstring) ``path`` holds."""
    if is_torchscript(path):
        return "torchscript"
    try:
        state = read_state_dict(path)
    except Exception:  # any unreadable file: open_clip's loader reports it precisely
        return "open_clip"
    return "openai" if is_openai_layout(state) else "open_clip"


def is_openai_layout(state: dict[str, torch.Tensor]) -> bool:
    """OpenAI's marker entries, or its half-precision projections beside float32 LayerNorms."""
    if any(key in state for key in OPENAI_MARKERS):
        return True
    proj, norm = state.get("text_projection"), state.get("ln_final.weight")
    return (
        proj is not None
        and norm is not None
        and proj.dtype == torch.float16
        and norm.dtype == torch.float32
    )


def torchscript_error(name: str, path: Path) -> WeightsError:
    return WeightsError(
        f"{path}: a TorchScript archive (the format of OpenAI's own CLIP downloads), which "
        f"cannot be read without running its code; use --weights openai (open_clip fetches "
        f"and converts the same weights), or save its state dict as .safetensors and pass "
        f"that with {name}"
    )


def load_openai_state(model: torch.nn.Module, path: Path) -> None:
    """Load an OpenAI-layout file into ``model`` (built with QuickGELU): markers dropped,
    float32 throughout, every key required.

    Raises:
        WeightsError: The tensors do not fit the architecture (missing or unexpected keys,
            other shapes).
    """
    state = {
        k: v.float() if v.is_floating_point() else v
        for k, v in read_state_dict(path).items()
        if k not in OPENAI_MARKERS
    }
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise WeightsError(f"{path}: OpenAI-format weights do not fit: {text[:500]}") from None
