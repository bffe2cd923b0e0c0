"""Optimizers over a method's prompt parameters, and their state as tensors + JSON (no pickle)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from vprompt.errors import ConfigError
from vprompt.methods.config import OptimConfig

_PREFIX = "optim."


def param_groups(params: Sequence[Any]) -> list[dict[str, Any]]:
    """Normalize ``trainable_parameters()``: a list of parameters, or of groups
    ``{"params": [...], "lr_scale": float}`` whose learning rate is ``lr_scale`` times the
    schedule's."""
    items = list(params)
    if items and isinstance(items[0], Mapping):
        groups = []
        for g in items:
            scale = float(g.get("lr_scale", 1.0))
            if not scale > 0:
                raise ConfigError(f"parameter group lr_scale must be > 0, got {scale}")
            groups.append({"params": list(g["params"]), "lr_scale": scale})
        return [g for g in groups if g["params"]]
    return [{"params": items, "lr_scale": 1.0}] if items else []


def flat_params(params: Sequence[Any]) -> list[nn.Parameter]:
    return [p for g in param_groups(params) for p in g["params"]]


def build_optimizer(params: Sequence[Any], optim: OptimConfig) -> torch.optim.Optimizer:
    """SGD (with momentum), Adam or AdamW over ``params`` only (parameters or groups, see
    :func:`param_groups`).

    The learning rate set here is the peak; the schedule overwrites it every iteration.
    """
    groups = param_groups(params)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ConfigError(
            "the method has no trainable parameters, so there is nothing to fit "
            "(set optim.epochs=0 for methods that only derive their prompt from data)"
        )
    frozen = [i for i, p in enumerate(params) if not p.requires_grad]
    if frozen:
        raise ConfigError(f"trainable_parameters() returned frozen parameters (indices {frozen})")
    torch_groups = [{**g, "lr": optim.lr * g["lr_scale"]} for g in groups]
    if optim.optimizer == "sgd":
        return torch.optim.SGD(
            torch_groups, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay
        )
    if optim.optimizer == "adam":
        return torch.optim.Adam(
            torch_groups,
            lr=optim.lr,
            betas=optim.betas,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
        )
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(
            torch_groups,
            lr=optim.lr,
            betas=optim.betas,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
        )
    raise ConfigError(f"unknown optimizer {optim.optimizer!r}; expected sgd, adam or adamw")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


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
    """Restore what :func:`optimizer_state` saved into an optimizer built the same way.

    Raises:
        ConfigError: State that does not fit the optimizer (unknown parameter indices, tensors
            of another shape, NaN or infinite values, scalars that are not numbers).
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = _state_key(key, len(params))
        if value.dim() > 0 and tuple(value.shape) != tuple(params[index].shape):
            raise ConfigError(
                f"optimizer state {key!r} has shape {tuple(value.shape)}, its parameter "
                f"{tuple(params[index].shape)}"
            )
        if value.dtype.is_floating_point and not bool(torch.isfinite(value).all()):
            raise ConfigError(f"optimizer state {key!r} holds NaN or infinite values")
        state.setdefault(index, {})[name] = value
    for raw, entry in scalars.items():
        index, _ = _state_key(f"{_PREFIX}{raw}.scalars", len(params))
        numbers = isinstance(entry, Mapping) and all(
            isinstance(v, int | float | None) and not isinstance(v, bool) for v in entry.values()
        )
        if not numbers:
            raise ConfigError(f"optimizer scalars of parameter {raw!r} are not numbers: {entry!r}")
        state.setdefault(index, {}).update(entry)
    full = optimizer.state_dict()
    full["state"] = state
    try:
        optimizer.load_state_dict(full)
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise ConfigError(f"the checkpoint's optimizer state does not fit: {exc}") from None


def _state_key(key: str, n_params: int) -> tuple[int, str]:
    """``optim.<index>.<name>`` → (index, name), the index within the optimizer's parameters."""
    index, _, name = key.removeprefix(_PREFIX).partition(".")
    if not (index.isascii() and index.isdigit()) or not name:
        raise ConfigError(f"malformed optimizer state name {key!r}")
    if int(index) >= n_params:
        raise ConfigError(
            f"the checkpoint's optimizer state names parameter {index}, the method has {n_params}"
        )
    return int(index), name
