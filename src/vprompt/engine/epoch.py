"""One training epoch: shuffled augmented batches, loss, backward, clipped step, schedule."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vprompt.data.dataset import ClassificationDataset
from vprompt.engine import distributed
from vprompt.engine.events import Callback, FitEvent, notify
from vprompt.engine.features import FeatureTable
from vprompt.engine.optim import flat_params, set_lr
from vprompt.engine.runtime import check_labels, epoch_seed, make_loader
from vprompt.engine.schedule import LRSchedule
from vprompt.errors import VPromptError
from vprompt.methods.base import MethodOutput, PromptMethod
from vprompt.methods.config import OptimConfig
from vprompt.utils.precision import autocast_for


def train_one_epoch(
    method: PromptMethod,
    train: ClassificationDataset,
    optimizer: torch.optim.Optimizer,
    schedule: LRSchedule,
    *,
    epoch: int,
    start_step: int,
    optim: OptimConfig,
    steps_per_epoch: int,
    device: torch.device,
    seed: int,
    num_workers: int,
    progress: bool,
    callbacks: Sequence[Callback],
    features: FeatureTable | None = None,
) -> dict[str, Any]:
    """Run one epoch of optimizer steps from global step ``start_step``.

    With ``features`` (this epoch's view of the cached training features), batches of features
    go through ``method.forward_features``, shuffled by the same generator as images would be.

    Under ``torchrun`` (:mod:`vprompt.engine.distributed`) every rank walks the same global
    batches and trains on its slice of each; the gradients and the step's loss and hits are
    summed over the ranks, so the record is the global batch's, as one process would log it.

    Returns:
        The epoch's history record (``epoch``, ``step`` after the epoch, ``train_loss``,
        ``train_acc``, ``lr`` of the last step, ``images_per_s``); no validation metrics.
    """
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]]
    forward: Callable[[torch.Tensor], MethodOutput]
    if features is None:
        forward = method
        loader = make_loader(
            train,
            method.input_transform(True),
            batch_size=optim.batch_size,
            device=device,
            num_workers=num_workers,
            generator=generator,
        )
    else:
        forward = method.forward_features
        loader = features.batches(optim.batch_size, generator=generator)
    params = flat_params(method.trainable_parameters())
    # Declared, not probed: a method that shapes its own update (e.g. a projected gradient)
    # fills .grad on its parameters in backward(loss, output, labels).
    custom_backward = method.capabilities.custom_backward
    num_classes = len(method.classnames)
    # Methods that learn without labels take unlabelled images (label -1) and no cross-entropy.
    supervised = method.capabilities.uses_labels
    data_parallel = distributed.world_size() > 1
    method.train()
    step = start_step
    loss_sum, correct, seen, lr = 0.0, 0, 0, schedule(step)
    bar = tqdm(
        total=steps_per_epoch,
        desc=f"epoch {epoch + 1}/{optim.epochs}",
        unit="it",
        disable=not progress,
        leave=False,
    )
    started = time.perf_counter()
    # ~20 windowed points per epoch, so one-epoch runs still get a learning curve.
    every = max(1, steps_per_epoch // 20)
    curve: list[list[float]] = []
    win_loss, win_correct, win_seen = 0.0, 0, 0
    # The host reads losses back only at the end of a curve window (every step when callbacks
    # want step events), so it can queue the next steps while the device computes them.
    pending: list[tuple[int, int, float, torch.Tensor, torch.Tensor]] = []

    def settle() -> None:
        nonlocal loss_sum, correct, seen, win_loss, win_correct, win_seen
        if not pending:
            return
        values = torch.stack([p[3] for p in pending]).tolist()
        hits = [int(h) for h in torch.stack([p[4] for p in pending]).tolist()]
        for (at, n, step_lr, _, _), value, hit in zip(pending, values, hits, strict=True):
            if not math.isfinite(value):
                raise VPromptError(
                    f"the training loss became {value} at epoch {epoch}, step {at}; "
                    "lower optim.lr or set optim.grad_clip"
                )
            loss_sum, correct, seen = loss_sum + value * n, correct + int(hit), seen + n
            win_loss, win_correct, win_seen = win_loss + value * n, win_correct + hit, win_seen + n
            notify(callbacks, FitEvent("step", epoch, at + 1, {"loss": value, "lr": step_lr}))
        pending.clear()
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}", refresh=False)

    try:
        for index, (inputs, labels) in enumerate(loader):
            if index >= steps_per_epoch:
                break
            # Checked before the copy: no device sync.
            check_labels(labels, num_classes, "training", unlabeled_ok=not supervised)
            lr = schedule(step)
            set_lr(optimizer, lr)
            total = len(labels)
            if data_parallel:
                optimizer.zero_grad(set_to_none=True)
                loss, hits = _shard_step(
                    forward, inputs, labels, total, device=device, supervised=supervised
                )
                # One all-reduce: every rank then holds the global batch's gradient, loss, hits.
                summed = distributed.all_reduce_gradients(params, torch.stack([loss, hits]))
                loss, hits = summed[0], summed[1]
            else:
                inputs = inputs.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                with autocast_for(device):
                    out = forward(inputs)
                logits = out.logits.float()  # B x C
                if supervised:
                    loss = F.cross_entropy(logits, labels)
                    for term in out.aux_loss.values():
                        loss = loss + term.float()
                else:
                    loss = sum((t.float() for t in out.aux_loss.values()), logits.new_zeros(()))
                optimizer.zero_grad(set_to_none=True)
                if custom_backward:
                    method.backward(loss, out, labels)
                else:
                    loss.backward()
                # Unlabelled images (-1) never count as hits; train_acc is then a lower bound.
                hits = (logits.detach().argmax(dim=1) == labels).sum()
                loss = loss.detach().float()
            if optim.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
            optimizer.step()
            pending.append((step, total, lr, loss, hits))
            step += 1
            window_end = (index + 1) % every == 0 or index + 1 == steps_per_epoch
            if window_end or callbacks:
                settle()
            if window_end:
                position = epoch + (index + 1) / steps_per_epoch
                curve.append([position, win_loss / win_seen, win_correct / win_seen])
                win_loss, win_correct, win_seen = 0.0, 0, 0
            bar.update(1)
        settle()
    finally:
        bar.close()
    elapsed = time.perf_counter() - started
    return {
        "epoch": epoch,
        "step": step,
        "train_loss": loss_sum / max(seen, 1),
        "train_acc": correct / max(seen, 1),
        "lr": lr,
        "images_per_s": seen / elapsed if elapsed > 0 else None,
        "curve": curve,  # [epoch position, window train loss, window train acc]
    }


def _shard_step(
    forward: Callable[[torch.Tensor], MethodOutput],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    total: int,
    *,
    device: torch.device,
    supervised: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward this rank's slice of a global batch of ``total`` images.

    The loss is this rank's share of the global mean loss: cross-entropy summed over its
    images / ``total``, each auxiliary term (a per-image mean, or batch-independent) weighted
    by its share of the images; so the ranks' gradients sum to the global batch's.

    Returns:
        This rank's (detached) share of the loss and its hits, as float scalars on ``device``.
    """
    part = distributed.shard(total)
    inputs, labels = inputs[part], labels[part]
    n = len(labels)
    if n == 0:  # fewer images than ranks in the last batch: only the all-reduce to join
        zero = torch.zeros((), device=device)
        return zero, zero.clone()
    inputs = inputs.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    with autocast_for(device):
        out = forward(inputs)
    logits = out.logits.float()  # b x C
    share = n / total
    aux = sum((t.float() for t in out.aux_loss.values()), logits.new_zeros(()))
    if supervised:
        loss = F.cross_entropy(logits, labels, reduction="sum") / total + aux * share
    else:
        loss = aux * share
    loss.backward()
    hits = (logits.detach().argmax(dim=1) == labels).sum().float()
    return loss.detach().float(), hits
