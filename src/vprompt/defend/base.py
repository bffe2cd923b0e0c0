"""What every input defence shares: its output, its registry, config checks, masked fills.

A defence runs *before* the frozen model, or around it, on [0, 1] pixels (the space a
:class:`~vprompt.attack.victim.Victim` reads, where the patch is pasted). It never changes the
model: it only reads the model's outputs and, for :mod:`~vprompt.defend.feature_mask`, the
gradient of an output with respect to the *image* (taken with ``torch.autograd.grad``, so no
``.grad`` of any parameter is ever written). Every defence is deterministic.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vprompt.errors import ConfigError
from vprompt.utils.registry import Registry

Model = Callable[[torch.Tensor], torch.Tensor]
"""B x 3 x H x W pixels in [0, 1] → B x C logits (a Victim, or any such module)."""


@dataclass
class DefenseOutput:
    """What a defence says about B images.

    Attributes:
        prediction: B predicted class indices (long, CPU).
        logits: B x C logits of the model on the sanitised images (float, CPU), or None for a
            defence that only votes on labels (PatchCleanser).
        certified: B booleans (CPU): the prediction provably cannot be changed by any patch
            of the size the defence was set up for; None when certification was not asked
            for or the defence has no certificate.
    """

    prediction: torch.Tensor
    logits: torch.Tensor | None = None
    certified: torch.Tensor | None = None


class Defense(ABC):
    """A defence of a frozen model against adversarial patches.

    Subclasses set ``name``, ``config_class`` (a frozen, validated dataclass of the paper's
    defaults), ``certifies`` (whether :meth:`defend` can return certificates), and implement
    :meth:`defend`.

    Args:
        model: The frozen model (a Victim): [0, 1] pixels → logits. Never modified.
        config: An instance of ``config_class``; its defaults when None.
    """

    name: ClassVar[str]
    config_class: ClassVar[type]
    certifies: ClassVar[bool] = False

    def __init__(self, *, model: Model, config: Any = None) -> None:
        cfg = config if config is not None else self.config_class()
        if not isinstance(cfg, self.config_class):
            raise ConfigError(
                f"defense {self.name!r} takes a {self.config_class.__name__}, "
                f"got {type(cfg).__name__}"
            )
        self.model = model
        self.config = cfg

    @abstractmethod
    def defend(self, pixels: torch.Tensor, *, certify: bool = False) -> DefenseOutput:
        """Defended predictions for B x 3 x H x W pixels in [0, 1] (certificates too when
        ``certify`` and the defence has them)."""

    def __call__(self, pixels: torch.Tensor, *, certify: bool = False) -> DefenseOutput:
        check_pixels(pixels)
        return self.defend(pixels, certify=certify)

    def describe(self, height: int, width: int) -> dict[str, Any]:
        """The settings as resolved for H x W inputs (window sizes, mask layout …), for
        reports."""
        from vprompt.methods.config import config_to_dict

        return dict(config_to_dict(self.config))


class SanitisingDefense(Defense):
    """A defence that rewrites the image and lets the model predict on the result."""

    @abstractmethod
    def sanitise(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W in [0, 1] → the sanitised B x 3 x H x W in [0, 1]."""

    def defend(self, pixels: torch.Tensor, *, certify: bool = False) -> DefenseOutput:
        clean = self.sanitise(pixels)
        with torch.no_grad():
            logits = self.model(clean).float()
        return DefenseOutput(prediction=logits.argmax(dim=1).cpu(), logits=logits.cpu())


DEFENSES: Registry[type[Defense]] = Registry("defense")


def register_defense(cls: type[Defense]) -> type[Defense]:
    """Class decorator: register ``cls`` under ``cls.name`` (names are validated, once each)."""
    DEFENSES.register(cls.name, cls)
    return cls


def build_defense(name: str, model: Model, overrides: Sequence[str] = ()) -> Defense:
    """The registered defence ``name`` on ``model``, with ``key=value`` ``overrides`` applied
    to its paper defaults.

    Raises:
        UnknownNameError: No defence of that name (the message lists the known ones).
        ConfigError: A malformed override, an unknown key, or a value out of range.
    """
    from vprompt.methods.config import apply_overrides

    cls = DEFENSES.get(name)
    config = apply_overrides(cls.config_class(), list(overrides))
    return cls(model=model, config=config)


# ---------------------------------------------------------------------- config checks


def check_number(name: str, value: Any, *, low: float, high: float, low_open: bool = False) -> None:
    """``value`` is a finite real (not a bool) in [low, high] (or (low, high])."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise ConfigError(f"{name} must be in {bracket}{low:g}, {high:g}], got {value!r}")


def check_int(name: str, value: Any, *, low: int, high: int, optional: bool = False) -> None:
    """``value`` is an int (not a bool) in [low, high], or None when ``optional``."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        what = " or null" if optional else ""
        raise ConfigError(f"{name} must be an integer in [{low}, {high}]{what}, got {value!r}")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def check_pixels(pixels: Any) -> None:
    """B x 3 x H x W floating-point pixels (range is the caller's promise)."""
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or not pixels.is_floating_point():
        shape = list(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ConfigError(f"a defence reads B x C x H x W float pixels in [0, 1], got {shape}")
    if pixels.shape[-1] < 2 or pixels.shape[-2] < 2:
        raise ConfigError(f"images of {tuple(pixels.shape[-2:])} pixels are too small to defend")


# ---------------------------------------------------------------------- shared pieces


def patch_side(fraction: float, height: int, width: int) -> int:
    """The side in pixels of a square covering ``fraction`` of an H x W image, rounded up
    (so a patch of that area always fits in it), at most the image's shorter side."""
    return max(1, min(height, width, math.ceil(math.sqrt(fraction * height * width) - 1e-9)))


def chunks(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``size`` items covering range(n)."""
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def predict_in_chunks(model: Model, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """N labels (CPU) of ``model`` on N images, ``batch_size`` per forward, without grads."""
    out = []
    with torch.no_grad():
        for part in chunks(len(images), batch_size):
            out.append(model(images[part]).argmax(dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
