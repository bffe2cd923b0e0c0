"""The per-iteration learning-rate schedule: linear warmup, then cosine decay to 0."""

from __future__ import annotations

import math
from dataclasses import dataclass

from vprompt.methods.base import OptimConfig


@dataclass(frozen=True)
class LRSchedule:
    """Learning rate of every optimizer iteration (0-based global step).

    During the first ``warmup_steps`` iterations the rate rises linearly from ``warmup_lr`` to
    ``base_lr`` (iteration 0 uses ``warmup_lr``); afterwards it follows a half cosine from
    ``base_lr`` down to 0, which it reaches at ``total_steps``.
    """

    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    warmup_lr: float = 0.0

    @classmethod
    def from_config(cls, optim: OptimConfig, *, steps_per_epoch: int) -> LRSchedule:
        """The schedule an :class:`OptimConfig` describes for ``steps_per_epoch`` iterations."""
        total = max(int(optim.epochs), 0) * max(int(steps_per_epoch), 0)
        warmup = min(math.ceil(optim.warmup_epochs * steps_per_epoch), total)
        start = 0.0 if optim.warmup_lr is None else float(optim.warmup_lr)
        return cls(base_lr=optim.lr, total_steps=total, warmup_steps=warmup, warmup_lr=start)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.base_lr - self.warmup_lr) * step / self.warmup_steps
        decay = self.total_steps - self.warmup_steps
        if decay <= 0:
            return self.base_lr
        progress = min(max((step - self.warmup_steps) / decay, 0.0), 1.0)
        return 0.5 * self.base_lr * (1.0 + math.cos(math.pi * progress))
