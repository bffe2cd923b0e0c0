"""Safe checkpoint reading and strict state-dict loading, shared by the classifier families.

Only tensors are ever read: ``.safetensors`` first, otherwise ``torch.load(weights_only=True)``,
which refuses any pickle that would run code.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from vprompt.errors import WeightsError

# Files looked for, in order, inside a weights folder or an ``hf-hub:`` repository.
CHECKPOINT_NAMES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.pth",
    "model.pt",
)
# Containers that training scripts commonly wrap a state dict in.
_WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")
_MAX_NAMED_KEYS = 8


def find_checkpoint(folder: Path) -> Path:
    """The first of :data:`CHECKPOINT_NAMES` inside ``folder``."""
    for name in CHECKPOINT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise WeightsError(f"weights folder {folder} holds none of {', '.join(CHECKPOINT_NAMES)}")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{key: tensor}`` dict on the CPU, never unpickling code.

    Raises:
        WeightsError: Missing or unreadable file, a pickle that needs more than tensors, or a
            file that holds no state dict.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"no such weights file {str(path)!r}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded: object = load_file(str(path), device="cpu")
        else:
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"{path}: refusing to load: the file needs arbitrary unpickling (only tensors are "
            f"accepted; convert it to .safetensors): {_first_line(exc)}"
        ) from exc
    except Exception as exc:  # safetensors and zipfile raise their own error types
        raise WeightsError(f"{path}: cannot read weights: {_first_line(exc)}") from exc
    return _unwrap(loaded, path)


def load_state_dict_strict(
    model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str
) -> None:
    """Copy ``state`` into ``model``, refusing missing, unexpected or mis-shaped keys.

    Raises:
        WeightsError: Naming the offending keys (and shapes) and the weight source.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_names(mismatched)}")
    if problems:
        raise WeightsError(f"{source} does not fit this architecture: {'; '.join(problems)}")
    model.load_state_dict(dict(state), strict=True)


def _unwrap(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(loaded, Mapping):
        for key in _WRAPPER_KEYS:
            inner = loaded.get(key)
            if isinstance(inner, Mapping) and inner and _all_tensors(inner):
                loaded = inner
                break
    if not isinstance(loaded, Mapping) or not loaded or not _all_tensors(loaded):
        raise WeightsError(f"{path}: expected a state dict (a mapping of names to tensors)")
    state = {str(k): v for k, v in loaded.items()}
    # DataParallel / DistributedDataParallel checkpoints prefix every key.
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _all_tensors(mapping: Mapping[object, object]) -> bool:
    return all(isinstance(v, torch.Tensor) for v in mapping.values())


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_NAMED_KEYS])
    more = len(keys) - _MAX_NAMED_KEYS
    return f"{shown} (and {more} more)" if more > 0 else shown


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def download_hf_checkpoint(repo: str) -> Path:
    """Fetch ``model.safetensors`` (else ``pytorch_model.bin``) from a Hugging Face repository.

    Args:
        repo: ``ORG/REPO``, without the ``hf-hub:`` prefix.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    last: Exception | None = None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        try:
            return Path(hf_hub_download(repo, filename))
        except EntryNotFoundError as exc:  # absent from the repo, or from the offline cache
            last = exc
        except Exception as exc:  # unknown repo, gated, network …
            raise WeightsError(
                f"hf-hub:{repo}: cannot download weights: {_first_line(exc)}"
            ) from exc
    raise WeightsError(
        f"hf-hub:{repo}: cannot get model.safetensors or pytorch_model.bin"
        + (f": {_first_line(last)}" if last else "")
    )
