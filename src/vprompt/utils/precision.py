"""The one precision rule: bf16 autocast on CUDA with fp32 parameters, fp32 elsewhere."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from vprompt.errors import ConfigError


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA (prompt parameters stay fp32); nothing elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` (bf16 on CUDA, fp32 elsewhere), ``bf16`` or ``fp32`` → ``bf16`` or ``fp32``."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"precision: expected auto, bf16 or fp32, got {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def precision_autocast(
    precision: str, device: torch.device
) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on ``device`` for a resolved ``precision`` of ``bf16``; nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def precision_tag(device: torch.device) -> str:
    """How :func:`autocast_for` makes ``device`` compute (part of cached-feature keys)."""
    return "bf16-autocast" if device.type == "cuda" else "float32"
