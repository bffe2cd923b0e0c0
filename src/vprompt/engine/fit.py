"""fit(): train a method's prompt on a frozen backbone, with checkpoints, metrics and a pack.

The engine never asks which method it runs: everything goes through the
:class:`~vprompt.methods.base.TrainableMethod` protocol.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from vprompt.data.dataset import ClassificationDataset
from vprompt.data.feature_cache import FeatureCache
from vprompt.engine.checkpoint import (
    Checkpoint,
    check_same_run,
    clear_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from vprompt.engine.epoch import train_one_epoch
from vprompt.engine.evaluate import EvalResult, evaluate, evaluate_table
from vprompt.engine.events import Callback, FitEvent, notify
from vprompt.engine.features import (
    FeatureSource,
    augmented_views,
    encoded_batches,
    takes_feature_path,
    view_for_epoch,
)
from vprompt.engine.optim import build_optimizer, load_optimizer_state, optimizer_state
from vprompt.engine.pack import save_pack
from vprompt.engine.report import plot_learning_curves, save_visualizations
from vprompt.engine.runtime import (
    autocast_for,
    check_classes,
    epoch_seed,
    iterate_batches,
    seed_everything,
)
from vprompt.engine.schedule import LRSchedule
from vprompt.errors import ConfigError
from vprompt.methods.base import (
    OptimConfig,
    config_from_dict,
    config_to_dict,
    uses_image_features,
)
from vprompt.utils.io import atomic_write_text

PACK_FILE = "prompt.safetensors"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
CURVES_FILE = "learning_curves.png"
_VIS_IMAGES = 16
_FINAL_EVAL_BATCH = 256  # evaluate()'s default: what packs of 0-epoch runs always reported


@dataclass(frozen=True)
class FitResult:
    """The outcome of :func:`fit`.

    Attributes:
        best_epoch: 0-based index of the epoch whose prompt was kept (None if no epoch ran).
        epochs_run: Epochs completed by the run (including those before a resume).
        history: One record per epoch, as in ``metrics.jsonl``.
        pack_path: The prompt pack written at the end.
        selected: ``best-val`` (best validation accuracy) or ``last`` (no validation data).
        out_dir: Where checkpoint, metrics, config, pack and plots live.
        best_val_acc: Validation accuracy of the kept prompt (None without validation data).
    """

    best_epoch: int | None
    epochs_run: int
    history: list[dict[str, Any]]
    pack_path: Path
    selected: Literal["best-val", "last"]
    out_dir: Path
    best_val_acc: float | None = None


def fit(
    method: Any,
    train: ClassificationDataset,
    *,
    val: ClassificationDataset | None = None,
    out_dir: str | Path,
    device: str | torch.device = "cpu",
    seed: int = 0,
    resume: bool = True,
    progress: bool = True,
    num_workers: int = 0,
    max_steps_per_epoch: int | None = None,
    callbacks: Sequence[Callback] = (),
    feature_cache: FeatureCache | None = None,
) -> FitResult:
    """Train ``method``'s prompt parameters with the optimizer and schedule of its config.

    Each epoch reseeds Python, NumPy and torch from ``(seed, epoch)`` and shuffles with a
    generator seeded the same way, so a run resumed from an epoch checkpoint matches an
    uninterrupted one exactly (with the same ``num_workers``: with workers, augmentation draws
    from per-worker generators). Before each epoch ``method.before_epoch(epoch, train_batches)``
    runs in eval mode; ``train_batches()`` iterates the training set without augmentation, in
    order, on ``device``. With ``optim.epochs == 0`` nothing is trained: the hook runs once
    (``epoch=0``) so prompts derived from data (e.g. a frequency label mapping) are estimated.

    A method that declares ``input_kind = "image-features"`` trains on features: with
    ``feature_cache`` and a training set whose images have identities, every needed view is
    encoded once (or loaded from the cache) before the first epoch and epochs run on feature
    batches, shuffled exactly as image batches would be; see :mod:`vprompt.engine.features`
    for the augmented views. For such a method ``train_batches()`` yields (B x D features,
    labels) of the unaugmented view, from the cache or encoded on the fly.

    With ``val``, the prompt of the epoch with the best validation accuracy (ties: lower
    validation loss, then earlier) is restored at the end; without it, the last epoch's is kept.
    No test data is ever seen here.

    Args:
        method: A :class:`~vprompt.methods.base.TrainableMethod` (an ``nn.Module``).
        out_dir: Receives ``checkpoint.safetensors``/``.json`` (every epoch), ``metrics.jsonl``,
            ``config.json``, ``prompt.safetensors``, ``learning_curves.png`` and the method's
            visualizations.
        resume: Continue after the last completed epoch of a checkpoint in ``out_dir`` (a
            finished run returns at once); False discards it.
        max_steps_per_epoch: Cap on iterations per epoch (quick runs, benchmarks).
        callbacks: Called with a :class:`FitEvent` after every step and every epoch; an
            exception (e.g. ``KeyboardInterrupt``) stops the run, leaving the last epoch
            checkpoint to resume from.
        feature_cache: Where image-feature methods keep encoded images; ``None`` always feeds
            pixels. Using it (and its dtype and view seed) is part of the run's identity.

    Raises:
        ConfigError: A checkpoint of a different run is in ``out_dir``, classes differ between
            the data and the method, or the method has nothing to train.
        VPromptError: The loss became NaN or infinite.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    optim = _optim_config(method)
    check_classes(method, train, "training")
    if val is not None:
        check_classes(method, val, "validation")
    method.to(dev)
    batch_size = optim.batch_size
    steps_per_epoch = math.ceil(len(train) / batch_size)
    if max_steps_per_epoch is not None:
        steps_per_epoch = max(1, min(steps_per_epoch, int(max_steps_per_epoch)))
    schedule = LRSchedule.from_config(optim, steps_per_epoch=steps_per_epoch)
    feature_method = uses_image_features(method)
    train_source = val_source = None
    if takes_feature_path(method, train, feature_cache):
        assert feature_cache is not None
        train_source = FeatureSource(
            method,
            train,
            feature_cache,
            device=dev,
            batch_size=batch_size,
            num_workers=num_workers,
            progress=progress,
        )
    if val is not None and takes_feature_path(method, val, feature_cache):
        assert feature_cache is not None
        val_source = FeatureSource(
            method,
            val,
            feature_cache,
            device=dev,
            batch_size=batch_size,
            num_workers=num_workers,
            progress=progress,
        )
    run = _run_identity(method, train, val, seed=seed, max_steps_per_epoch=max_steps_per_epoch)
    if train_source is not None:
        assert feature_cache is not None
        views = augmented_views(method)
        run["feature_cache"] = {
            "dtype": feature_cache.dtype,
            "views": views,
            "view_seed": feature_cache.view_seed if views else None,
        }

    ckpt = load_checkpoint(out) if resume else None
    if not resume:
        clear_checkpoint(out)
    if ckpt is not None:
        check_same_run(_with_config_defaults(ckpt.run, method), run, out)
        method.load_prompt_state(ckpt.prompt)
    else:
        ckpt = Checkpoint(run=json.loads(json.dumps(run)))

    def train_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if train_source is not None:
            return train_source.table(None).batches(batch_size)
        batches = iterate_batches(
            train,
            method.input_transform(False),
            batch_size=batch_size,
            device=dev,
            num_workers=num_workers,
        )
        return encoded_batches(method, batches) if feature_method else batches

    def validate(show: bool, *, batch: int = batch_size, workers: int = num_workers) -> EvalResult:
        assert val is not None
        if val_source is not None:
            return evaluate_table(
                method,
                val_source.table(None),
                batch_size=batch,
                device=dev,
                progress=show,
                desc="val",
            )
        return evaluate(
            method,
            val,
            batch_size=batch,
            device=dev,
            num_workers=workers,
            progress=show,
            desc="val",
        )

    if optim.epochs == 0 and ckpt.epochs_done == 0 and not ckpt.finished:
        seed_everything(epoch_seed(seed, 0))
        method.eval()
        with autocast_for(dev):
            method.before_epoch(0, train_batches)
        ckpt.prompt = _prompt_state(method)
        save_checkpoint(out, ckpt)

    if ckpt.epochs_done < optim.epochs:
        optimizer = build_optimizer(method.trainable_parameters(), optim)
        if ckpt.optimizer_tensors or ckpt.optimizer_scalars:
            load_optimizer_state(optimizer, ckpt.optimizer_tensors, ckpt.optimizer_scalars)
        # Encode what the cache lacks now, so no epoch's timing includes it.
        if train_source is not None:
            epochs = range(ckpt.epochs_done, optim.epochs)
            train_source.prepare(view_for_epoch(method, e) for e in epochs)
        if val_source is not None:
            val_source.prepare([None])
        for epoch in range(ckpt.epochs_done, optim.epochs):
            started = time.perf_counter()
            seed_everything(epoch_seed(seed, epoch))
            method.eval()
            with autocast_for(dev):
                method.before_epoch(epoch, train_batches)
            record = train_one_epoch(
                method,
                train,
                optimizer,
                schedule,
                epoch=epoch,
                start_step=ckpt.global_step,
                optim=optim,
                steps_per_epoch=steps_per_epoch,
                device=dev,
                seed=seed,
                num_workers=num_workers,
                progress=progress,
                callbacks=callbacks,
                features=(
                    train_source.table(view_for_epoch(method, epoch))
                    if train_source is not None
                    else None
                ),
            )
            if val is not None:
                result = validate(progress)
                record["val_acc"], record["val_loss"] = result.accuracy, result.loss
                if _better(result.accuracy, result.loss, ckpt.best_metric):
                    ckpt.best_epoch = epoch
                    ckpt.best_metric = {"val_acc": result.accuracy, "val_loss": result.loss}
                    ckpt.best_prompt = _prompt_state(method)
            else:
                record["val_acc"] = record["val_loss"] = None
            ckpt.global_step = record["step"]
            record["seconds"] = time.perf_counter() - started
            ckpt.history.append(record)
            ckpt.epochs_done = epoch + 1
            ckpt.prompt = _prompt_state(method)
            ckpt.optimizer_tensors, ckpt.optimizer_scalars = optimizer_state(optimizer)
            save_checkpoint(out, ckpt)
            _write_metrics(out, ckpt.history)
            notify(callbacks, FitEvent("epoch", epoch, ckpt.global_step, dict(record)))
            if progress:
                tqdm.write(_summary(record, optim.epochs), file=sys.stderr)

    selected: Literal["best-val", "last"] = (
        "best-val" if val is not None and ckpt.best_prompt is not None else "last"
    )
    if selected == "best-val":
        assert ckpt.best_prompt is not None
        method.load_prompt_state(ckpt.best_prompt)
    if not ckpt.finished or not (out / PACK_FILE).is_file():
        _finalize(
            method,
            train,
            val,
            out,
            ckpt,
            selected=selected,
            run=run,
            device=dev,
            validate=validate,
        )
        ckpt.finished, ckpt.selected = True, selected
        save_checkpoint(out, ckpt)
    method.eval()
    return _result(ckpt, out, selected)


# ---------------------------------------------------------------------------- end of run
def _finalize(
    method: Any,
    train: ClassificationDataset,
    val: ClassificationDataset | None,
    out: Path,
    ckpt: Checkpoint,
    *,
    selected: str,
    run: Mapping[str, Any],
    device: torch.device,
    validate: Callable[..., EvalResult],
) -> None:
    """Write config.json, the prompt pack and the plots for the kept prompt."""
    config = dict(run)
    config["device"] = str(device)
    config["selected"] = selected
    atomic_write_text(out / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
    metrics = _pack_metrics(val, ckpt, selected, validate)
    save_pack(method, out / PACK_FILE, metrics=metrics)
    plot_learning_curves(ckpt.history, out / CURVES_FILE)
    source = val if val is not None else train
    batch = next(
        iterate_batches(
            source,
            method.input_transform(False),
            batch_size=_VIS_IMAGES,
            device=device,
            limit=_VIS_IMAGES,
        )
    )[0]
    method.eval()
    with torch.no_grad(), autocast_for(device):
        images = method.visualizations(batch)
    save_visualizations(images, out)


def _pack_metrics(
    val: ClassificationDataset | None,
    ckpt: Checkpoint,
    selected: str,
    validate: Callable[..., EvalResult],
) -> dict[str, Any]:
    metrics: dict[str, Any] = {"selected": selected, "epochs": ckpt.epochs_done}
    kept = _kept_epoch(ckpt, selected)
    if kept is not None:
        record = ckpt.history[kept]
        metrics["epoch"] = kept
        for key in ("train_loss", "train_acc", "val_acc", "val_loss"):
            if record.get(key) is not None:
                metrics[key] = record[key]
    elif val is not None:
        # Nothing trained (epochs == 0): report the derived prompt on the validation data.
        result = validate(False, batch=_FINAL_EVAL_BATCH, workers=0)
        metrics["val_acc"], metrics["val_loss"] = result.accuracy, result.loss
    return metrics


def _kept_epoch(ckpt: Checkpoint, selected: str) -> int | None:
    if selected == "best-val":
        return ckpt.best_epoch
    return ckpt.epochs_done - 1 if ckpt.epochs_done > 0 else None


def _result(ckpt: Checkpoint, out: Path, selected: Literal["best-val", "last"]) -> FitResult:
    kept = _kept_epoch(ckpt, selected)
    best_val = ckpt.history[kept].get("val_acc") if kept is not None else None
    return FitResult(
        best_epoch=kept,
        epochs_run=ckpt.epochs_done,
        history=[dict(h) for h in ckpt.history],
        pack_path=out / PACK_FILE,
        selected=selected,
        out_dir=out,
        best_val_acc=best_val,
    )


# ---------------------------------------------------------------------------- helpers
def _optim_config(method: Any) -> OptimConfig:
    optim = getattr(method.config, "optim", None)
    if not isinstance(optim, OptimConfig):
        raise ConfigError(
            f"method {getattr(method, 'name', type(method).__name__)!r} has no trainable "
            "schedule: its config needs an `optim: OptimConfig` field"
        )
    return optim


def _run_identity(
    method: Any,
    train: ClassificationDataset,
    val: ClassificationDataset | None,
    *,
    seed: int,
    max_steps_per_epoch: int | None,
) -> dict[str, Any]:
    backbone = method.backbone
    return {
        "method": method.name,
        "config": config_to_dict(method.config),
        "backbone": {
            "name": backbone.name,
            "weights": str(backbone.weights),
            "fingerprint": backbone.fingerprint(),
        },
        "classnames": list(method.classnames),
        "seed": int(seed),
        "data": {"train": len(train), "val": None if val is None else len(val)},
        "max_steps_per_epoch": max_steps_per_epoch,
    }


def _with_config_defaults(saved: dict[str, Any], method: Any) -> dict[str, Any]:
    """A checkpoint's run identity with config fields it predates filled with their defaults,
    so runs written before a field was added still resume (and differ only if the current
    value is not the default)."""
    config = saved.get("config")
    if not isinstance(config, dict):
        return saved
    try:
        filled = config_to_dict(config_from_dict(type(method.config), config))
    except (ConfigError, TypeError, ValueError):
        return saved  # not this method's config: the comparison will say what differs
    return {**saved, "config": filled}


def _prompt_state(method: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone().contiguous() for k, v in method.prompt_state().items()}


def _better(acc: float, loss: float, best: Mapping[str, float] | None) -> bool:
    if best is None:
        return True
    return acc > best["val_acc"] or (acc == best["val_acc"] and loss < best["val_loss"])


def _write_metrics(out: Path, history: Sequence[Mapping[str, Any]]) -> None:
    # Rewritten whole from the checkpoint's history, so it always matches what a resume sees.
    lines = "".join(json.dumps(h, sort_keys=True) + "\n" for h in history)
    atomic_write_text(out / METRICS_FILE, lines)


def _summary(record: Mapping[str, Any], epochs: int) -> str:
    text = (
        f"epoch {record['epoch'] + 1}/{epochs}: loss {record['train_loss']:.4f} "
        f"acc {record['train_acc']:.3f}"
    )
    if record.get("val_acc") is not None:
        text += f" | val acc {record['val_acc']:.3f} loss {record['val_loss']:.4f}"
    return text + f" | lr {record['lr']:.3g} | {record['seconds']:.1f}s"
