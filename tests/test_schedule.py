"""The epoch-stepped schedule against Dassl's ConstantWarmupScheduler + CosineAnnealingLR,
re-created here from torch's own schedulers."""

from __future__ import annotations

import pytest
import torch

from vprompt.engine.schedule import LRSchedule
from vprompt.errors import ConfigError
from vprompt.methods.config import OptimConfig


def dassl_epoch_lrs(base: float, epochs: int, warmup: int, cons: float) -> list[float]:
    """What each epoch trains at: the wrapper holds ``cons`` for ``warmup`` epochs, then defers
    to a CosineAnnealingLR that is only stepped once the warmup is over."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=base)
    successor = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    lrs = []
    for last_epoch in range(epochs):  # the wrapper's own epoch counter
        lrs.append(cons if last_epoch < warmup else successor.get_last_lr()[0])
        opt.step()  # the epoch's updates (no gradients here), before the scheduler steps
        if last_epoch >= warmup:  # the wrapper's step() at the end of the epoch
            successor.step()
    return lrs


@pytest.mark.parametrize(("epochs", "warmup"), [(10, 1), (50, 1), (200, 1), (5, 0), (8, 2)])
def test_epoch_stepping_matches_dassl(epochs: int, warmup: int) -> None:
    optim = OptimConfig(
        optimizer="sgd",
        lr=0.002,
        epochs=epochs,
        warmup_epochs=warmup,
        warmup_lr=1e-5,
        warmup_type="constant",
        step_unit="epoch",
    )
    steps = 7
    schedule = LRSchedule.from_config(optim, steps_per_epoch=steps)
    expected = dassl_epoch_lrs(0.002, epochs, warmup, 1e-5)
    for epoch, lr in enumerate(expected):
        for i in range(steps):  # constant within the epoch
            assert schedule(epoch * steps + i) == pytest.approx(lr, rel=1e-9, abs=1e-12)


def test_iteration_constant_warmup_holds_then_decays_to_zero() -> None:
    optim = OptimConfig(lr=0.1, epochs=4, warmup_epochs=1, warmup_lr=0.001, warmup_type="constant")
    schedule = LRSchedule.from_config(optim, steps_per_epoch=10)
    assert [schedule(i) for i in range(10)] == [0.001] * 10
    assert schedule(10) == pytest.approx(0.1)
    assert schedule(40) == pytest.approx(0.0, abs=1e-12)


def test_constant_warmup_needs_a_rate() -> None:
    with pytest.raises(ConfigError, match="warmup_lr"):
        OptimConfig(epochs=2, warmup_epochs=1, warmup_type="constant")
