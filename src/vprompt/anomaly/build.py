"""Build a registered anomaly method on its frozen backbone (by name, model, weights, ``--set``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from vprompt.anomaly.base import ANOMALY_METHODS, AnomalyMethod
from vprompt.backbones.protocols import ImageTextBackbone
from vprompt.backbones.registry import load_backbone
from vprompt.errors import ConfigError
from vprompt.methods.config import apply_overrides


def build_anomaly_method(
    name: str,
    *,
    model: str | None = None,
    weights: str | None = None,
    device: str | torch.device = "cpu",
    overrides: Sequence[str] = (),
    object_name: str = "object",
    seed: int = 0,
    backbone: Any = None,
) -> AnomalyMethod:
    """The method ``name`` (``--set`` ``overrides`` applied) on ``model`` (default: the method's).

    ``seed`` seeds the initial values of learned prompts and, unless ``overrides`` set it, the
    config's own ``seed`` (coreset draws, test-time samples), so the same seed builds the same
    method bit for bit and another seed another one.

    Raises:
        UnknownNameError: No such method or model.
        ConfigError: A bad override, or a model of a family the method cannot use.
    """
    cls = ANOMALY_METHODS.get(name)
    config = apply_overrides(cls.Config(), list(overrides))
    seeded = any(o.split("=", 1)[0].strip() == "seed" for o in overrides)
    if "seed" in {f.name for f in dataclasses.fields(cls.Config)} and not seeded:
        # The run's seed also drives the method's own draws (coreset, test-time samples).
        config = dataclasses.replace(config, seed=seed)
    if backbone is None:
        backbone = load_backbone(model or cls.default_model, weights, device=device)
    check_family(cls, backbone)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        method = cls(backbone, config, object_name=object_name)
    return method.to(device)


def check_family(cls: type[AnomalyMethod], backbone: Any) -> None:
    """Refuse a backbone the method cannot run on (one line naming both)."""
    if cls.capabilities.family == "clip" and not isinstance(backbone, ImageTextBackbone):
        raise ConfigError(
            f"{cls.name} needs a CLIP-like image-text model (e.g. {cls.default_model}); "
            f"{backbone.name} has no text tower"
        )
