"""Optimizers over a method's prompt parameters, and their state as tensors + JSON (no pickle)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from vprompt.errors import ConfigError
from vprompt.methods.base import OptimConfig

_PREFIX = "optim."


def build_optimizer(params: Sequence[nn.Parameter], optim: OptimConfig) -> torch.optim.Optimizer:
    """SGD (with momentum), Adam or AdamW over ``params`` only.

    The learning rate set here is the peak; the schedule overwrites it every iteration.
    """
    params = list(params)
    if not params:
        raise ConfigError(
            "the method has no trainable parameters, so there is nothing to fit "
            "(set optim.epochs=0 for methods that only derive their prompt from data)"
        )
    frozen = [i for i, p in enumerate(params) if not p.requires_grad]
    if frozen:
        raise ConfigError(f"trainable_parameters() returned frozen parameters (indices {frozen})")
    if optim.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay
        )
    if optim.optimizer == "adam":
        return torch.optim.Adam(params, lr=optim.lr, weight_decay=optim.weight_decay)
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    raise ConfigError(f"unknown optimizer {optim.optimizer!r}; expected sgd, adam or adamw")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_state(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Per-parameter state split into tensors (``optim.<index>.<name>``) and JSON scalars.

    Hyper-parameters (param groups) are not saved: they are rebuilt from the config, which a
    resume checks is unchanged, and the schedule sets the learning rate every iteration.
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in optimizer.state_dict()["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{_PREFIX}{index}.{name}"] = value.detach().cpu().clone().contiguous()
            elif value is None or isinstance(value, bool | int | float):
                scalars.setdefault(str(index), {})[name] = value
            else:
                raise TypeError(f"optimizer state {name!r} of type {type(value).__name__}")
    return tensors, scalars


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    tensors: Mapping[str, torch.Tensor],
    scalars: Mapping[str, Mapping[str, Any]],
) -> None:
    """Restore what :func:`optimizer_state` saved into an optimizer built the same way."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.removeprefix(_PREFIX).split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, entry in scalars.items():
        state.setdefault(int(index), {}).update(entry)
    n_params = sum(len(g["params"]) for g in optimizer.param_groups)
    if any(i >= n_params for i in state):
        raise ConfigError(
            f"the checkpoint's optimizer state covers {max(state) + 1} parameters, "
            f"the method has {n_params}"
        )
    full = optimizer.state_dict()
    full["state"] = state
    optimizer.load_state_dict(full)
