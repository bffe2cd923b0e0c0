"""fit(): run a method's lifecycle on a frozen backbone, with checkpoints, metrics and a pack.

The engine never asks which method it runs: it reads the method's declared
:class:`~vprompt.methods.base.Capabilities` and calls the lifecycle hooks of
:class:`~vprompt.methods.base.PromptMethod` in order — ``setup`` (before the optimizer is
built), ``before_epoch`` and the training steps (methods that train), ``finish`` (after epoch
selection) — then writes the pack.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from vprompt.data.dataset import ClassificationDataset, as_dataset
from vprompt.data.feature_cache import FeatureCache
from vprompt.engine import distributed
from vprompt.engine.checkpoint import (
    CHECKPOINT_FILE,
    CHECKPOINT_JSON,
    Checkpoint,
    check_same_run,
    load_checkpoint,
    save_checkpoint,
)
from vprompt.engine.epoch import train_one_epoch
from vprompt.engine.evaluate import EvalResult, evaluate, evaluate_table
from vprompt.engine.events import Callback, FitEvent, notify
from vprompt.engine.features import (
    FeatureSource,
    augmented_views,
    takes_feature_path,
    view_for_epoch,
)
from vprompt.engine.fit_data import FitData
from vprompt.engine.optim import build_optimizer, load_optimizer_state, optimizer_state
from vprompt.engine.pack import save_pack
from vprompt.engine.report import plot_learning_curves, save_visualizations
from vprompt.engine.runtime import (
    check_classes,
    derived_seed,
    epoch_seed,
    iterate_batches,
    seed_everything,
)
from vprompt.engine.schedule import LRSchedule
from vprompt.errors import ConfigError, PackError
from vprompt.methods.base import PromptMethod
from vprompt.methods.config import OptimConfig, config_from_dict, config_to_dict
from vprompt.utils import jsonio
from vprompt.utils.io import atomic_write_text
from vprompt.utils.precision import autocast_for

PACK_FILE = "prompt.safetensors"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
CURVES_FILE = "learning_curves.png"
TEST_METRICS_FILE = "test_metrics.json"
RUN_FILES = (PACK_FILE, METRICS_FILE, CONFIG_FILE, CURVES_FILE)
"""What a finished run leaves besides its checkpoint (and the method's visualizations)."""
_VIS_IMAGES = 16
_FINAL_EVAL_BATCH = 256  # evaluate()'s default: what packs of 0-epoch runs always reported
_SETUP_BATCH = 256  # batch size of the hooks' data for methods without an optimizer

Selection = Literal["best-val", "last"]


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
    selected: Selection
    out_dir: Path
    best_val_acc: float | None = None


def fit(
    method: PromptMethod,
    train: ClassificationDataset,
    *,
    val: ClassificationDataset | None = None,
    select: Selection | None = None,
    out_dir: str | Path,
    device: str | torch.device = "cpu",
    seed: int = 0,
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    num_workers: int = 0,
    max_steps_per_epoch: int | None = None,
    callbacks: Sequence[Callback] = (),
    feature_cache: FeatureCache | None = None,
) -> FitResult:
    """Run ``method``'s lifecycle on ``train`` and write its pack.

    1. **Set-up**: ``method.setup(data)`` once per run, in eval mode, before the optimizer is
       built (state whose shape or value comes from the data: a cache model, a label mapping).
    2. **Training** (methods that declare ``trains``): each epoch reseeds Python, NumPy and
       torch from ``(seed, epoch)``, calls ``method.before_epoch(epoch, data)`` in eval mode,
       then steps the optimizer of the config's ``optim`` section over shuffled batches, so a
       run resumed from an epoch checkpoint matches an uninterrupted one exactly (with the
       same ``num_workers``: with workers, augmentation draws from per-worker generators).
       With ``optim.epochs == 0`` nothing is trained and ``before_epoch(0, data)`` runs once.
    3. **Selection**: ``best-val`` restores the epoch with the best validation accuracy (ties:
       lower validation loss, then earlier); ``last`` keeps the last epoch.
    4. **Finish**: ``method.finish(data)`` in eval mode (e.g. a hyper-parameter search on the
       validation data), then the pack, config and plots are written.

    Under ``torchrun`` (a process group of several ranks, see
    :mod:`vprompt.engine.distributed`) the same call on every rank trains one prompt
    data-parallel: ``optim.batch_size`` is the global batch, split across the ranks, and the
    result matches one process with that batch (up to float summation order, for methods whose
    training transform and forward draw no random numbers). Hooks run on every rank and rank
    0's prompt is broadcast after each; rank 0 alone validates and writes files; every rank
    resumes from the same checkpoint. Methods with ``custom_backward`` or batch statistics in
    their prompt are refused there.

    ``data`` (:class:`~vprompt.engine.fit_data.FitData`) serves the training set (plain or an
    augmented view) and the validation set; an ``image-features`` method gets features, from
    ``feature_cache`` when the dataset's images have identities (every needed view is encoded
    once before the first epoch, and epochs run on feature batches shuffled exactly as image
    batches would be; see :mod:`vprompt.engine.features`), else encoded on the fly. No test
    data is ever seen here.

    Args:
        method: The method (its backbone stays frozen).
        val: Validation data: for ``best-val`` selection and the hooks.
        select: ``best-val`` or ``last``; default ``best-val`` when ``val`` is given. With
            ``last`` the epochs are not validated (``val`` still reaches the hooks).
        out_dir: Receives ``checkpoint.safetensors``/``.json`` (every epoch), ``metrics.jsonl``,
            ``config.json``, ``prompt.safetensors``, ``learning_curves.png`` and the method's
            visualizations.
        resume: Continue after the last completed epoch of this run's checkpoint in
            ``out_dir`` (a finished run returns at once); False starts this run over.
        overwrite: Replace whatever run ``out_dir`` holds (another run's checkpoint, a
            damaged one, or run files without a checkpoint); without it they are refused.
        max_steps_per_epoch: Cap on iterations per epoch (quick runs, benchmarks).
        callbacks: Called with a :class:`FitEvent` after every step and every epoch; an
            exception (e.g. ``KeyboardInterrupt``) stops the run, leaving the last epoch
            checkpoint to resume from.
        feature_cache: Where image-feature methods keep encoded images; ``None`` always feeds
            pixels. Using it (and its dtype and view seed) is part of the run's identity.

    Raises:
        ConfigError: ``out_dir`` holds a different run, a damaged checkpoint or a run's files
            without its checkpoint (and ``overwrite`` is False), classes differ between the
            data and the method, ``best-val`` without validation data, or a trainable method
            with nothing to train.
        VPromptError: The loss became NaN or infinite.
    """
    out = Path(out_dir)
    main = distributed.is_main()
    if main:
        out.mkdir(parents=True, exist_ok=True)
    progress = progress and main
    dev = torch.device(device)
    caps = method.capabilities
    distributed.check_data_parallel(method)
    train = as_dataset(train)  # torchvision-style datasets (``classes``) too
    val = as_dataset(val) if val is not None else None
    selection: Selection = select or ("best-val" if val is not None else "last")
    if selection not in ("best-val", "last"):
        raise ConfigError(f"select must be best-val or last, got {selection!r}")
    if selection == "best-val" and val is None:
        raise ConfigError("select=best-val needs validation data")
    optim = _optim_config(method) if caps.trains else None
    check_classes(method, train, "training")
    if val is not None:
        check_classes(method, val, "validation")
    method.to(dev)
    batch_size = optim.batch_size if optim is not None else _SETUP_BATCH
    train_source, val_source = (
        _feature_source(method, data, feature_cache, dev, batch_size, num_workers, progress)
        for data in (train, val)
    )
    run = _run_identity(
        method, train, val, seed=seed, select=selection, max_steps_per_epoch=max_steps_per_epoch
    )
    if train_source is not None:
        assert feature_cache is not None
        views = augmented_views(method)
        run["feature_cache"] = {
            "dtype": feature_cache.dtype,
            "views": views,
            "view_seed": feature_cache.view_seed if views else None,
        }
    data = FitData(
        method,
        train,
        val,
        train_source=train_source,
        val_source=val_source,
        batch_size=batch_size,
        device=dev,
        num_workers=num_workers,
        view_seed=feature_cache.view_seed if feature_cache is not None else 0,
        progress=progress,
    )

    ckpt, stale = _open_checkpoint(
        method,
        out,
        run,
        resume=resume,
        overwrite=overwrite,
        epochs=optim.epochs if optim is not None else None,
    )
    distributed.barrier()  # every rank has read the checkpoint before rank 0 replaces it
    if main:
        for path in stale:
            path.unlink(missing_ok=True)
    if distributed.world_size() > 1:
        # Rank 0 fills the feature cache; the others then only read it.
        with distributed.main_first():
            _prepare_sources(method, ckpt, optim, train_source, val_source, selection)
    if not ckpt.setup_done:
        _run_hook(dev, derived_seed(seed, "setup"), lambda: method.setup(data), method)
        ckpt.setup_done, ckpt.prompt = True, _prompt_state(method)
        _save(out, ckpt)

    if optim is not None and not ckpt.finished:
        _train(
            method,
            train,
            data,
            ckpt,
            optim,
            out=out,
            device=dev,
            seed=seed,
            select=selection,
            validate=lambda show: _validate(
                method, val, val_source, batch_size, dev, show, num_workers
            ),
            num_workers=num_workers,
            max_steps_per_epoch=max_steps_per_epoch,
            progress=progress,
            callbacks=callbacks,
            train_source=train_source,
            val_source=val_source,
        )

    selected: Selection = (
        "best-val" if selection == "best-val" and ckpt.best_prompt is not None else "last"
    )
    if not ckpt.finished or not (out / PACK_FILE).is_file():
        if not ckpt.finished:
            if selected == "best-val":
                assert ckpt.best_prompt is not None
                method.load_prompt_state(ckpt.best_prompt)
            _run_hook(dev, derived_seed(seed, "finish"), lambda: method.finish(data), method)
            ckpt.prompt = _prompt_state(method)
        if main:
            _finalize(
                method,
                train,
                val,
                out,
                ckpt,
                selected=selected,
                run=run,
                device=dev,
                validate=lambda show: _validate(
                    method, val, val_source, _FINAL_EVAL_BATCH, dev, show, 0
                ),
            )
        ckpt.finished, ckpt.selected = True, selected
        _save(out, ckpt)
    distributed.barrier()  # the pack exists on return, on every rank
    method.eval()
    return _result(ckpt, out, selected)


# ---------------------------------------------------------------------------- steps
def _open_checkpoint(
    method: PromptMethod,
    out: Path,
    run: dict[str, Any],
    *,
    resume: bool,
    overwrite: bool,
    epochs: int | None,
) -> tuple[Checkpoint, list[Path]]:
    """The run's checkpoint (its prompt loaded into ``method``), or a fresh one, and the
    files to remove before the run writes (removed by the caller, once every rank has read).

    Only this run's own checkpoint is resumed (or, with ``resume=False``, started over), with
    or without ``overwrite``; another run's, a damaged one, or run files without a checkpoint
    are refused unless ``overwrite``, which removes them.
    """
    fresh = Checkpoint(run=json.loads(jsonio.dumps(run)))
    checkpoint_files = [out / CHECKPOINT_FILE, out / CHECKPOINT_JSON]
    try:
        ckpt = load_checkpoint(out)
        if ckpt is None:
            leftovers = [name for name in RUN_FILES if (out / name).exists()]
            if leftovers:
                raise ConfigError(
                    f"{out} holds a run's files ({', '.join(leftovers)}) but no checkpoint "
                    "to tell which run"
                )
            return fresh, []
        check_same_run(_with_defaults(ckpt.run, method), run, out)
        if not resume:
            return fresh, checkpoint_files
        damaged = f"{out / CHECKPOINT_FILE}: damaged checkpoint"
        if epochs is not None and ckpt.epochs_done > epochs:
            raise ConfigError(f"{damaged}: {ckpt.epochs_done} epochs done of {epochs}")
        if ckpt.prompt:
            try:
                method.load_prompt_state(ckpt.prompt)  # checks everything before copying
            except PackError as exc:
                raise ConfigError(f"{damaged}: {exc}") from None
        return ckpt, []
    except ConfigError as exc:
        if not overwrite:
            raise ConfigError(
                f"{exc}; pass --overwrite (overwrite=True) to start over there, or choose a "
                "new out dir"
            ) from None
        return fresh, [*checkpoint_files, *(out / n for n in (*RUN_FILES, TEST_METRICS_FILE))]


def _run_hook(
    device: torch.device, seed: int, hook: Callable[[], None], method: PromptMethod
) -> None:
    """Run a lifecycle hook in eval mode, seeded, under the run's autocast (on every rank
    of a data-parallel run, which then all take rank 0's prompt)."""
    seed_everything(seed)
    method.eval()
    with autocast_for(device):
        hook()
    distributed.broadcast_prompt(method)


def _train(
    method: PromptMethod,
    train: ClassificationDataset,
    data: FitData,
    ckpt: Checkpoint,
    optim: OptimConfig,
    *,
    out: Path,
    device: torch.device,
    seed: int,
    select: Selection,
    validate: Callable[[bool], EvalResult],
    num_workers: int,
    max_steps_per_epoch: int | None,
    progress: bool,
    callbacks: Sequence[Callback],
    train_source: FeatureSource | None,
    val_source: FeatureSource | None,
) -> None:
    """Every remaining epoch: before_epoch, the steps, validation, the checkpoint."""
    if optim.epochs == 0:
        if ckpt.epochs_done == 0 and not ckpt.history:
            _run_hook(device, epoch_seed(seed, 0), lambda: method.before_epoch(0, data), method)
            ckpt.prompt = _prompt_state(method)
            _save(out, ckpt)
        return
    if ckpt.epochs_done >= optim.epochs:
        return
    steps_per_epoch = epoch_steps(len(train), optim)
    if max_steps_per_epoch is not None:
        steps_per_epoch = max(1, min(steps_per_epoch, int(max_steps_per_epoch)))
    schedule = LRSchedule.from_config(optim, steps_per_epoch=steps_per_epoch)
    optimizer = build_optimizer(method.trainable_parameters(), optim)
    if ckpt.optimizer_tensors or ckpt.optimizer_scalars:
        try:
            load_optimizer_state(optimizer, ckpt.optimizer_tensors, ckpt.optimizer_scalars)
        except ConfigError as exc:
            raise ConfigError(
                f"{out / CHECKPOINT_FILE}: damaged checkpoint: {exc}; pass --no-resume "
                "(resume=False) to start this run over"
            ) from None
    # Encode what the cache lacks now, so no epoch's timing includes it.
    if train_source is not None:
        train_source.prepare(
            view_for_epoch(method, e) for e in range(ckpt.epochs_done, optim.epochs)
        )
    if val_source is not None and select == "best-val":
        val_source.prepare([None])
    for epoch in range(ckpt.epochs_done, optim.epochs):
        started = time.perf_counter()
        _run_hook(
            device, epoch_seed(seed, epoch), partial(method.before_epoch, epoch, data), method
        )
        record = train_one_epoch(
            method,
            train,
            optimizer,
            schedule,
            epoch=epoch,
            start_step=ckpt.global_step,
            optim=optim,
            steps_per_epoch=steps_per_epoch,
            device=device,
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
        _run_hook(
            device,
            derived_seed(seed, f"after-epoch-{epoch}"),
            partial(method.after_epoch, epoch, data),
            method,
        )
        record["val_acc"] = record["val_loss"] = None
        if select == "best-val":
            acc, loss = _validated(validate, progress)
            record["val_acc"], record["val_loss"] = acc, loss
            if _better(acc, loss, ckpt.best_metric):
                ckpt.best_epoch = epoch
                ckpt.best_metric = {"val_acc": acc, "val_loss": loss}
                ckpt.best_prompt = _prompt_state(method)
        ckpt.global_step = record["step"]
        record["seconds"] = time.perf_counter() - started
        ckpt.history.append(record)
        ckpt.epochs_done = epoch + 1
        ckpt.prompt = _prompt_state(method)
        ckpt.optimizer_tensors, ckpt.optimizer_scalars = optimizer_state(optimizer)
        _save(out, ckpt)
        if distributed.is_main():
            _write_metrics(out, ckpt.history)
        notify(callbacks, FitEvent("epoch", epoch, ckpt.global_step, dict(record)))
        if progress:
            tqdm.write(_summary(record, optim.epochs), file=sys.stderr)


def _validated(validate: Callable[[bool], EvalResult], show: bool) -> tuple[float, float]:
    """Validation accuracy and loss: computed by rank 0 alone, the same on every rank."""
    result = validate(show) if distributed.is_main() else None
    values = None if result is None else (result.accuracy, result.loss)
    acc, loss = distributed.broadcast_floats(values, 2)
    return acc, loss


def _prepare_sources(
    method: PromptMethod,
    ckpt: Checkpoint,
    optim: OptimConfig | None,
    train_source: FeatureSource | None,
    val_source: FeatureSource | None,
    select: Selection,
) -> None:
    """Encode into the feature cache the views the epochs will read (what ``_train``
    prepares), so that the ranks do not encode them side by side."""
    if train_source is not None and optim is not None:
        epochs = range(ckpt.epochs_done, optim.epochs)
        train_source.prepare(view_for_epoch(method, e) for e in epochs)
    if val_source is not None and select == "best-val":
        val_source.prepare([None])


def epoch_steps(n: int, optim: OptimConfig) -> int:
    """Optimizer steps per epoch over ``n`` images: every batch, or without the last partial
    one when ``optim.drop_last`` and a full batch exists (the shuffled order is the same, the
    epoch simply stops before it)."""
    if optim.drop_last and n >= optim.batch_size:
        return n // optim.batch_size
    return math.ceil(n / optim.batch_size)


def _validate(
    method: PromptMethod,
    val: ClassificationDataset | None,
    source: FeatureSource | None,
    batch_size: int,
    device: torch.device,
    show: bool,
    workers: int,
) -> EvalResult:
    assert val is not None
    if source is not None:
        return evaluate_table(
            method,
            source.table(None),
            batch_size=batch_size,
            device=device,
            progress=show,
            desc="val",
        )
    return evaluate(
        method,
        val,
        batch_size=batch_size,
        device=device,
        num_workers=workers,
        progress=show,
        desc="val",
    )


# ---------------------------------------------------------------------------- end of run
def _finalize(
    method: PromptMethod,
    train: ClassificationDataset,
    val: ClassificationDataset | None,
    out: Path,
    ckpt: Checkpoint,
    *,
    selected: str,
    run: Mapping[str, Any],
    device: torch.device,
    validate: Callable[[bool], EvalResult],
) -> None:
    """Write config.json, the prompt pack and the plots for the kept prompt."""
    config = dict(run)
    config["device"] = str(device)
    config["selected"] = selected
    atomic_write_text(out / CONFIG_FILE, jsonio.dumps(config, indent=2, sort_keys=True) + "\n")
    metrics = _pack_metrics(val, ckpt, selected, validate)
    save_pack(method, out / PACK_FILE, metrics=metrics)
    plot_learning_curves(ckpt.history, out / CURVES_FILE)
    source = val if val is not None else train
    batch, labels = next(
        iterate_batches(
            source,
            method.input_transform(False),
            batch_size=_VIS_IMAGES,
            device=device,
            limit=_VIS_IMAGES,
        )
    )
    method.eval()
    with torch.no_grad(), autocast_for(device):
        images = method.visualizations(batch)
        if not images:
            return
        predicted = method(batch).logits.argmax(dim=1).tolist()
    names = method.classnames
    captions = [
        f"{names[t]}" if t == p else f"{names[t]} -> {names[p]}"
        for t, p in zip(labels.tolist(), predicted, strict=True)
        if 0 <= t < len(names)
    ]
    save_visualizations(images, out, captions if len(captions) == len(predicted) else None)


def _pack_metrics(
    val: ClassificationDataset | None,
    ckpt: Checkpoint,
    selected: str,
    validate: Callable[[bool], EvalResult],
) -> dict[str, Any]:
    metrics: dict[str, Any] = {"selected": selected, "epochs": ckpt.epochs_done}
    kept = _kept_epoch(ckpt, selected)
    if kept is not None:
        record = ckpt.history[kept]
        metrics["epoch"] = kept
        for key in ("train_loss", "train_acc", "val_acc", "val_loss"):
            if record.get(key) is not None:
                metrics[key] = record[key]
    if val is not None and (kept is None or selected == "last"):
        # Nothing was validated per epoch (no training, or last-epoch selection): report the
        # kept prompt on the validation data.
        result = validate(False)
        metrics["val_acc"], metrics["val_loss"] = result.accuracy, result.loss
    return metrics


def _kept_epoch(ckpt: Checkpoint, selected: str) -> int | None:
    if selected == "best-val":
        return ckpt.best_epoch
    return ckpt.epochs_done - 1 if ckpt.epochs_done > 0 else None


def _result(ckpt: Checkpoint, out: Path, selected: Selection) -> FitResult:
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
def _optim_config(method: PromptMethod) -> OptimConfig:
    optim = method.config.optim
    if not isinstance(optim, OptimConfig):
        raise ConfigError(f"{method.name}: config.optim must be an OptimConfig")
    return optim


def _feature_source(
    method: PromptMethod,
    data: ClassificationDataset | None,
    cache: FeatureCache | None,
    device: torch.device,
    batch_size: int,
    num_workers: int,
    progress: bool,
) -> FeatureSource | None:
    if data is None or not takes_feature_path(method, data, cache):
        return None
    assert cache is not None
    return FeatureSource(
        method,
        data,
        cache,
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
    )


def _run_identity(
    method: PromptMethod,
    train: ClassificationDataset,
    val: ClassificationDataset | None,
    *,
    seed: int,
    select: Selection,
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
        "select": select,
        "max_steps_per_epoch": max_steps_per_epoch,
    }


def _with_defaults(saved: dict[str, Any], method: PromptMethod) -> dict[str, Any]:
    """A checkpoint's run identity with what it predates filled in: config fields added later
    take their defaults, and ``select`` the rule of the time (best-val exactly when validation
    data was given), so older runs still resume (and differ only where the current value is
    not that default)."""
    filled = dict(saved)
    if "select" not in filled:
        data = filled.get("data")
        has_val = isinstance(data, dict) and data.get("val") is not None
        filled["select"] = "best-val" if has_val else "last"
    config = saved.get("config")
    if not isinstance(config, dict):
        return filled
    # Not this method's config: the comparison will say what differs.
    with contextlib.suppress(ConfigError, TypeError, ValueError):
        filled["config"] = config_to_dict(config_from_dict(type(method.config), config))
    return filled


def _save(out: Path, ckpt: Checkpoint) -> None:
    if distributed.is_main():  # one writer per run folder
        save_checkpoint(out, ckpt)


def _prompt_state(method: PromptMethod) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone().contiguous() for k, v in method.prompt_state().items()}


def _better(acc: float, loss: float, best: Mapping[str, float] | None) -> bool:
    if best is None:
        return True
    return acc > best["val_acc"] or (acc == best["val_acc"] and loss < best["val_loss"])


def _write_metrics(out: Path, history: Sequence[Mapping[str, Any]]) -> None:
    # Rewritten whole from the checkpoint's history, so it always matches what a resume sees.
    lines = "".join(jsonio.dumps(h, sort_keys=True) + "\n" for h in history)
    atomic_write_text(out / METRICS_FILE, lines)


def _summary(record: Mapping[str, Any], epochs: int) -> str:
    text = (
        f"epoch {record['epoch'] + 1}/{epochs}: loss {record['train_loss']:.4f} "
        f"acc {record['train_acc']:.3f}"
    )
    if record.get("val_acc") is not None:
        text += f" | val acc {record['val_acc']:.3f} loss {record['val_loss']:.4f}"
    return text + f" | lr {record['lr']:.3g} | {record['seconds']:.1f}s"
