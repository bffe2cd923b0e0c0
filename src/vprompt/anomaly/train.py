"""Training learned anomaly prompts on a labelled auxiliary dataset (AnomalyCLIP's protocol:
train on one dataset's test images and masks, apply zero-shot to others).

Every epoch visits the samples in an order drawn from a generator seeded by ``seed`` and
the epoch, in batches of ``optim.batch_size``; each step back-propagates the sum of the
method's :meth:`~vprompt.anomaly.base.AnomalyMethod.training_loss` terms into
:meth:`~vprompt.anomaly.base.AnomalyMethod.trainable_parameters` only, at the rate the method
declares (:attr:`~vprompt.anomaly.base.AnomalyMethod.lr_schedule`: AnomalyCLIP's constant
``optim.lr``, or Bayes-PFL's warm-up then cosine), per parameter group
(:meth:`~vprompt.anomaly.base.AnomalyMethod.parameter_groups`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vprompt.anomaly.base import AnomalyMethod
from vprompt.anomaly.datasets import AnomalySample, load_mask
from vprompt.anomaly.images import mask_to_frame, to_frame
from vprompt.data.images import DEFAULT_MAX_PIXELS, load_image
from vprompt.engine.optim import build_optimizer, set_lr
from vprompt.engine.schedule import LRSchedule
from vprompt.errors import ConfigError
from vprompt.methods.config import OptimConfig


@dataclass
class EpochLoss:
    """Mean loss terms of one epoch."""

    epoch: int
    terms: dict[str, float]

    @property
    def total(self) -> float:
        return float(sum(self.terms.values()))


def load_sample(
    sample: AnomalySample, method: AnomalyMethod, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample in the method's frame: (3 x S x S pixels, S x S float mask)."""
    frame = method.frame
    image = load_image(sample.image, max_pixels=max_pixels)
    if sample.mask is not None:
        mask = load_mask(sample.mask, (image.size[1], image.size[0]))  # (H, W)
    else:
        mask = np.zeros((image.size[1], image.size[0]), dtype=bool)
    return to_frame(image, frame), torch.from_numpy(mask_to_frame(mask, frame).astype(np.float32))


def train_method(
    method: AnomalyMethod,
    samples: Sequence[AnomalySample],
    *,
    seed: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    on_step: Callable[[int, int, float], None] | None = None,
) -> list[EpochLoss]:
    """Train ``method``'s prompts on labelled ``samples`` with its config's ``optim``.

    Args:
        on_step: Called after every step with (epoch, step, loss) — progress bars.

    Returns:
        The mean loss terms of every epoch.
    """
    if not method.capabilities.trains:
        raise ConfigError(
            f"{method.name} learns nothing from labelled images (it is not trainable)"
        )
    if not samples:
        raise ConfigError("training needs at least one labelled image")
    labels = {s.label for s in samples}
    if labels != {0, 1}:
        raise ConfigError("training needs both normal and anomalous images")
    optim: OptimConfig = method.config.optim
    device = next((p.device for p in method.backbone.parameters()), torch.device("cpu"))
    optimizer = build_optimizer(method.parameter_groups(), optim)
    steps_per_epoch = math.ceil(len(samples) / optim.batch_size)
    schedule = LRSchedule.from_config(optim, steps_per_epoch=steps_per_epoch)
    global_step = 0
    history: list[EpochLoss] = []
    method.train()
    for epoch in range(optim.epochs):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(samples), generator=gen).tolist()
        sums: dict[str, float] = {}
        steps = 0
        for step, start in enumerate(range(0, len(order), optim.batch_size)):
            batch = [samples[i] for i in order[start : start + optim.batch_size]]
            loaded = [load_sample(s, method, max_pixels=max_pixels) for s in batch]
            pixels = torch.stack([x for x, _ in loaded]).to(device)
            masks = torch.stack([m for _, m in loaded]).to(device)
            target = torch.tensor([s.label for s in batch], device=device)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * 1_000_003 + epoch * 10_007 + step)
                terms = method.training_loss(pixels, target, masks)
            loss = sum(terms.values(), torch.zeros((), device=device))
            if not torch.isfinite(loss):
                raise ConfigError(
                    f"{method.name}: the loss became {float(loss)} at epoch {epoch + 1} step "
                    f"{step + 1}; lower optim.lr"
                )
            if method.lr_schedule == "warmup-cosine":
                set_lr(optimizer, schedule(global_step))
            global_step += 1
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
            steps += 1
            if on_step is not None:
                on_step(epoch, step, float(loss.detach()))
        history.append(EpochLoss(epoch, {k: v / steps for k, v in sums.items()}))
    method.eval()
    method.fitted = True
    return history


def history_rows(history: Sequence[EpochLoss]) -> list[dict[str, Any]]:
    """JSON rows of a training history."""
    return [{"epoch": h.epoch + 1, "loss": h.total, **h.terms} for h in history]
