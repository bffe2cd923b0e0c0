"""The learning-rate schedule: warmup (linear or constant), then cosine decay, stepped every
iteration or (as Dassl does for the CoOp family) every epoch."""

from __future__ import annotations

import math
from dataclasses import dataclass

from vprompt.methods.config import OptimConfig


@dataclass(frozen=True)
class LRSchedule:
    """Learning rate of every optimizer iteration (0-based global step).

    During the first ``warmup_steps`` iterations the rate rises linearly from ``warmup_lr`` to
    ``base_lr`` (iteration 0 uses ``warmup_lr``), or stays at ``warmup_lr`` with
    ``constant_warmup``; afterwards it follows a half cosine from ``base_lr`` down to 0, which it
    reaches at ``total_steps``.

    With ``steps_per_epoch`` set (epoch stepping), the rate is constant within an epoch: epoch
    ``e`` below ``warmup_epochs`` uses the warmup rate, and later epochs
    ``base_lr * (1 + cos(pi * (e - warmup_epochs) / epochs)) / 2`` — Dassl's
    ``ConstantWarmupScheduler`` around ``CosineAnnealingLR(T_max=epochs)``.
    """

    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    warmup_lr: float = 0.0
    constant_warmup: bool = False
    steps_per_epoch: int | None = None
    epochs: int = 0
    warmup_epochs: int = 0

    @classmethod
    def from_config(cls, optim: OptimConfig, *, steps_per_epoch: int) -> LRSchedule:
        """The schedule an :class:`OptimConfig` describes for ``steps_per_epoch`` iterations."""
        total = max(int(optim.epochs), 0) * max(int(steps_per_epoch), 0)
        warmup = min(math.ceil(optim.warmup_epochs * steps_per_epoch), total)
        start = 0.0 if optim.warmup_lr is None else float(optim.warmup_lr)
        per_epoch = optim.step_unit == "epoch"
        return cls(
            base_lr=optim.lr,
            total_steps=total,
            warmup_steps=warmup,
            warmup_lr=start,
            constant_warmup=optim.warmup_type == "constant",
            steps_per_epoch=max(int(steps_per_epoch), 1) if per_epoch else None,
            epochs=int(optim.epochs),
            warmup_epochs=math.ceil(optim.warmup_epochs),
        )

    def __call__(self, step: int) -> float:
        if self.steps_per_epoch is not None:
            epoch = step // self.steps_per_epoch
            if epoch < self.warmup_epochs:
                return (
                    self.warmup_lr
                    if self.constant_warmup
                    else (
                        self.warmup_lr
                        + (self.base_lr - self.warmup_lr) * epoch / self.warmup_epochs
                    )
                )
            angle = math.pi * (epoch - self.warmup_epochs) / max(self.epochs, 1)
            return 0.5 * self.base_lr * (1.0 + math.cos(angle))
        if step < self.warmup_steps:
            if self.constant_warmup:
                return self.warmup_lr
            return self.warmup_lr + (self.base_lr - self.warmup_lr) * step / self.warmup_steps
        decay = self.total_steps - self.warmup_steps
        if decay <= 0:
            return self.base_lr
        progress = min(max((step - self.warmup_steps) / decay, 0.0), 1.0)
        return 0.5 * self.base_lr * (1.0 + math.cos(math.pi * progress))
