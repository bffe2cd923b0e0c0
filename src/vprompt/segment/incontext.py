"""In-context segmentation methods: find in new images what reference (image, mask) pairs
show, on a frozen segmenter. Registered by name like prompt methods; the CLI and server read
the registry (each method's default model, model family and config live with the method).

A method class has:

- ``name`` (set on registration), ``family`` (the model family it runs on: ``sam`` …),
  ``default_model`` (a ``family:arch`` name) and ``tiny_model`` (for tests),
- ``config_class``: a frozen dataclass of its settings with the paper's defaults,
- ``load(options, config)``: build it on the frozen model the options name,
- ``fit(references)`` → itself, ``predict(image)`` and ``predict_many(images)`` → results
  with an H x W bool ``mask`` and a ``score``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np
from numpy.typing import NDArray

from vprompt.data.images import DEFAULT_MAX_PIXELS
from vprompt.errors import ConfigError
from vprompt.utils.registry import Registry


@dataclass(frozen=True)
class SegmenterOptions:
    """How to build a frozen segmenter: what ``--model``, ``--weights`` … say.

    Attributes:
        model: ``family:arch``; None takes the method's ``default_model``.
        weights: Weight source (hub id, local folder, ``none``); None: the model's default.
        device: ``cpu``, ``cuda``, ``auto`` …
        precision: ``auto`` (bf16 autocast on CUDA), ``bf16`` or ``fp32``.
        max_pixels: Largest image (in pixels) accepted from files.
        embedding_cache: Disk folder keeping image embeddings across runs (SAM family), or
            None to keep them in memory only.
    """

    model: str | None = None
    weights: str | None = None
    device: str = "auto"
    precision: str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS
    embedding_cache: Path | None = None


def default_embedding_cache() -> Path:
    """``$VPROMPT_CACHE/sam-embeddings`` (default ``~/.cache/vprompt/sam-embeddings``)."""
    base = Path(os.environ.get("VPROMPT_CACHE", Path.home() / ".cache" / "vprompt"))
    return base / "sam-embeddings"


class InContextResult(Protocol):
    """One target's segmentation."""

    @property
    def mask(self) -> NDArray[np.bool_]: ...

    @property
    def score(self) -> float: ...


class SegmentationMethod(Protocol):
    """What the registry holds (see the module docstring)."""

    name: ClassVar[str]
    family: ClassVar[str]
    default_model: ClassVar[str]
    tiny_model: ClassVar[str]
    config_class: ClassVar[type]

    @classmethod
    def load(cls, options: SegmenterOptions, config: Any = None) -> Any: ...

    def fit(self, references: Sequence[Any]) -> Any: ...

    def predict(self, image: Any) -> InContextResult: ...

    def predict_many(self, images: Sequence[Any]) -> list[InContextResult]: ...


SEGMENTATION_METHODS: Registry[Any] = Registry("segmentation method")

T = TypeVar("T", bound=type)


def register_segmentation_method(name: str) -> Callable[[T], T]:
    """Class decorator: check ``cls`` against :class:`SegmentationMethod`, register it.

    Raises:
        TypeError: A member is missing or inconsistent (all problems are named).
        ValueError: The name is malformed or taken.
    """

    def wrap(cls: T) -> T:
        if name in SEGMENTATION_METHODS:
            raise ValueError(f"segmentation method {name!r} is already registered")
        problems = []
        config = getattr(cls, "config_class", None)
        if not (isinstance(config, type) and dataclasses.is_dataclass(config)):
            problems.append("needs `config_class`, a frozen dataclass of its settings")
        else:
            try:
                config()
            except Exception as exc:  # any failure is the problem to report
                problems.append(f"config_class() must build with the paper defaults ({exc})")
        family = getattr(cls, "family", None)
        for attr in ("default_model", "tiny_model"):
            value = getattr(cls, attr, None)
            if not (isinstance(value, str) and isinstance(family, str)):
                problems.append(f"needs `family` and `{attr}` names")
            elif not value.startswith(f"{family}:"):
                problems.append(f"{attr} {value!r} is not a {family}: model")
        for member in ("load", "fit", "predict", "predict_many"):
            if not callable(getattr(cls, member, None)):
                problems.append(f"needs {member}()")
        if problems:
            raise TypeError(f"segmentation method {name!r}: " + "; ".join(problems))
        cls.name = name  # type: ignore[attr-defined]
        SEGMENTATION_METHODS.register(name, cls)
        return cls

    return wrap


def model_for(cls: Any, options: SegmenterOptions) -> str:
    """The model ``options`` name for ``cls``, or its default; refuses another family.

    Raises:
        ConfigError: The model belongs to a family the method does not run on.
    """
    model = options.model or cls.default_model
    if not model.startswith(f"{cls.family}:"):
        raise ConfigError(f"--method {cls.name} needs a {cls.family}:* model, got {model}")
    return str(model)


def method_config(cls: Any, overrides: Sequence[str]) -> Any:
    """``cls.config_class`` with ``KEY=VALUE`` overrides (``--set``) applied."""
    from vprompt.methods.config import apply_overrides

    return apply_overrides(cls.config_class(), overrides)


def load_method(name: str, options: SegmenterOptions, overrides: Sequence[str] = ()) -> Any:
    """The registered method ``name``, built on the model ``options`` name (or its default)
    with its config and ``overrides``."""
    cls = SEGMENTATION_METHODS.get(name)
    return cls.load(options, method_config(cls, overrides))
