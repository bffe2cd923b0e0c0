"""What fit() tells callbacks while it runs."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class FitEvent:
    """What a callback sees: after every optimizer step (``step``) and every epoch (``epoch``).

    Attributes:
        epoch: 0-based epoch index.
        step: Optimizer steps done so far in the run.
        metrics: ``loss`` and ``lr`` for a step; the epoch's history record for an epoch.
    """

    kind: Literal["step", "epoch"]
    epoch: int
    step: int
    metrics: Mapping[str, Any] = field(default_factory=dict)


Callback = Callable[[FitEvent], None]


def notify(callbacks: Sequence[Callback], event: FitEvent) -> None:
    for callback in callbacks:
        callback(event)
