"""Epoch checkpoints: tensors in one safetensors file, progress in JSON; never pickle.

``checkpoint.safetensors`` holds the method's prompt tensors (``prompt.*``), the best epoch's
prompt tensors (``best.*``) and the optimizer's state tensors (``optim.*``). Its metadata holds
the JSON progress record, so tensors and progress are replaced together by one atomic rename;
``checkpoint.json`` is a readable copy written next to it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vprompt.errors import ConfigError
from vprompt.utils import jsonio
from vprompt.utils.io import atomic_path, atomic_write_text

CHECKPOINT_FILE = "checkpoint.safetensors"
CHECKPOINT_JSON = "checkpoint.json"
_META_KEY = "vprompt-checkpoint"
_VERSION = 1


@dataclass
class Checkpoint:
    """Everything a run needs to continue after its last completed epoch.

    Attributes:
        run: What identifies the run (method, config, backbone, seed, data size); a resume
            refuses a checkpoint whose ``run`` differs.
        setup_done: Whether the method's ``setup`` hook ran (its results are in ``prompt``).
        epochs_done: Completed epochs (the next epoch index to run).
        global_step: Optimizer iterations done.
        best_epoch: Epoch index with the best validation accuracy so far (None without val).
        best_metric: ``{"val_acc", "val_loss"}`` of ``best_epoch``.
        history: One metrics dict per completed epoch.
        finished: Whether the final artifacts (pack, config, plots) were written.
        selected: Which epoch's prompt the finished run kept (``best-val`` or ``last``).
        prompt: The prompt tensors after ``epochs_done`` epochs; once ``finished``, the kept
            prompt after the ``finish`` hook (what the pack holds).
        best_prompt: The prompt tensors of ``best_epoch``.
        optimizer_tensors / optimizer_scalars: See :func:`vprompt.engine.optim.optimizer_state`.
    """

    run: dict[str, Any]
    setup_done: bool = False
    epochs_done: int = 0
    global_step: int = 0
    best_epoch: int | None = None
    best_metric: dict[str, float] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False
    selected: str = "last"
    prompt: dict[str, torch.Tensor] = field(default_factory=dict)
    best_prompt: dict[str, torch.Tensor] | None = None
    optimizer_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer_scalars: dict[str, dict[str, Any]] = field(default_factory=dict)

    def progress(self) -> dict[str, Any]:
        """The JSON part (no tensors)."""
        return {
            "version": _VERSION,
            "run": self.run,
            "setup_done": self.setup_done,
            "epochs_done": self.epochs_done,
            "global_step": self.global_step,
            "best_epoch": self.best_epoch,
            "best_metric": self.best_metric,
            "finished": self.finished,
            "selected": self.selected,
            "history": self.history,
            "optimizer_scalars": self.optimizer_scalars,
        }


def save_checkpoint(out_dir: Path, ckpt: Checkpoint) -> None:
    """Atomically replace the checkpoint in ``out_dir``."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for key, value in ckpt.prompt.items():
        tensors[f"prompt.{key}"] = value
    for key, value in (ckpt.best_prompt or {}).items():
        tensors[f"best.{key}"] = value
    tensors.update(ckpt.optimizer_tensors)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    text = jsonio.dumps(ckpt.progress(), sort_keys=True)
    with atomic_path(out_dir / CHECKPOINT_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={_META_KEY: text})
    atomic_write_text(
        out_dir / CHECKPOINT_JSON, jsonio.dumps(ckpt.progress(), indent=2, sort_keys=True) + "\n"
    )


def load_checkpoint(out_dir: Path) -> Checkpoint | None:
    """The checkpoint in ``out_dir``, or None when there is none.

    Raises:
        ConfigError: A damaged or tampered checkpoint: unreadable, or a progress record with
            missing fields, wrong types or values that contradict each other.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = out_dir / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(path), device="cpu")
        info = jsonio.loads(meta[_META_KEY], what="checkpoint metadata")
    except Exception as exc:  # safetensors' own error types, missing/garbled metadata
        raise ConfigError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(info, dict):
        raise ConfigError(f"{path}: damaged checkpoint: its progress record is not an object")
    if info.get("version") != _VERSION:
        raise ConfigError(f"{path}: checkpoint version {info.get('version')!r} is not supported")
    try:
        return _checkpoint(info, tensors)
    except _Damaged as exc:
        raise ConfigError(f"{path}: damaged checkpoint: {exc}") from None


class _Damaged(Exception):
    """What is wrong with a checkpoint's progress record."""


def _field(info: dict[str, Any], key: str, kinds: tuple[type, ...], default: Any = ...) -> Any:
    if key not in info:
        if default is ...:
            raise _Damaged(f"no {key!r}")
        return default
    value = info[key]
    if isinstance(value, bool) and bool not in kinds:
        raise _Damaged(f"{key!r} is {value!r}")
    if not isinstance(value, kinds):
        raise _Damaged(
            f"{key!r} is {value!r:.60}, expected {' or '.join(k.__name__ for k in kinds)}"
        )
    return value


def _checkpoint(info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Checkpoint:
    """Parse and cross-check a progress record (every field, as :meth:`Checkpoint.progress`
    writes it)."""
    epochs = _field(info, "epochs_done", (int,))
    steps = _field(info, "global_step", (int,))
    if epochs < 0 or steps < 0:
        raise _Damaged(f"negative progress (epochs_done {epochs}, global_step {steps})")
    history = _field(info, "history", (list,))
    if len(history) != epochs:
        raise _Damaged(f"{len(history)} epochs of history for epochs_done {epochs}")
    for i, record in enumerate(history):
        if not isinstance(record, dict) or record.get("epoch") != i:
            raise _Damaged(f"history entry {i} is not the record of epoch {i}")
        for key in _HISTORY_NUMBERS:
            value = record.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise _Damaged(f"history entry {i} has {key} {value!r:.40}")
    best_epoch = _field(info, "best_epoch", (int, type(None)))
    best_metric = _field(info, "best_metric", (dict, type(None)))
    if (best_epoch is None) != (best_metric is None):
        raise _Damaged("best_epoch and best_metric must both be set or both be null")
    if best_epoch is not None and not 0 <= best_epoch < epochs:
        raise _Damaged(f"best_epoch {best_epoch} is not one of the {epochs} epochs run")
    if best_metric is not None and not all(
        isinstance(best_metric.get(k), int | float) and not isinstance(best_metric.get(k), bool)
        for k in ("val_acc", "val_loss")
    ):
        raise _Damaged(f"best_metric {best_metric!r:.80} lacks numeric val_acc and val_loss")
    selected = _field(info, "selected", (str,), "last")
    if selected not in ("best-val", "last"):
        raise _Damaged(f"selected is {selected!r}, expected best-val or last")
    scalars = _field(info, "optimizer_scalars", (dict,), {})
    if not all(isinstance(v, dict) for v in scalars.values()):
        raise _Damaged("optimizer_scalars must map parameters to objects")
    setup_done = _field(info, "setup_done", (bool,), True)  # older runs set up in epoch 0

    def strip(prefix: str) -> dict[str, torch.Tensor]:
        return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}

    prompt, best = strip("prompt."), strip("best.")
    if (setup_done or epochs) and not prompt:
        raise _Damaged("no prompt tensors after set-up")
    if (best_epoch is not None) != bool(best):
        raise _Damaged("best-epoch tensors and best_epoch disagree")
    return Checkpoint(
        run=_field(info, "run", (dict,)),
        setup_done=setup_done,
        epochs_done=epochs,
        global_step=steps,
        best_epoch=best_epoch,
        best_metric=best_metric,
        history=list(history),
        finished=_field(info, "finished", (bool,)),
        selected=selected,
        prompt=prompt,
        best_prompt=best or None,
        optimizer_tensors={k: v for k, v in tensors.items() if k.startswith("optim.")},
        optimizer_scalars=dict(scalars),
    )


_HISTORY_NUMBERS = ("train_loss", "train_acc", "lr", "seconds")


def clear_checkpoint(out_dir: Path) -> None:
    """Forget a previous run in ``out_dir`` (``resume=False``)."""
    for name in (CHECKPOINT_FILE, CHECKPOINT_JSON):
        (out_dir / name).unlink(missing_ok=True)


def check_same_run(saved: dict[str, Any], current: dict[str, Any], out_dir: Path) -> None:
    """Refuse to resume a checkpoint that another run (method, config, data, seed) wrote."""
    a, b = _flatten(saved), _flatten(_plain(current))
    diffs = [
        f"{key}: checkpoint {a.get(key, '<absent>')!r}, now {b.get(key, '<absent>')!r}"
        for key in sorted(set(a) | set(b))
        if a.get(key) != b.get(key)
    ]
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise ConfigError(f"{out_dir} holds a checkpoint of a different run ({shown})")


def _plain(value: Any) -> Any:
    return json.loads(jsonio.dumps(value))


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): data}
