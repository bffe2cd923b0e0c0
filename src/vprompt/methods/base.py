"""What every prompt method is: a module with a typed config, registered by name."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import torch

from vprompt.errors import ConfigError
from vprompt.utils.registry import Registry


@dataclass(frozen=True)
class MethodOutput:
    """What a method's forward returns.

    Attributes:
        logits: B x C class scores (before softmax).
        aux_loss: Extra loss terms the method adds during training (name → scalar).
    """

    logits: torch.Tensor
    aux_loss: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Prediction:
    """One ranked label for one image."""

    label: str
    score: float
    index: int


@runtime_checkable
class PromptMethod(Protocol):
    """The contract the engine, packs and interfaces rely on."""

    name: ClassVar[str]
    config: Any
    classnames: list[str]

    def prompt_state(self) -> dict[str, torch.Tensor]:
        """Only the learned / derived prompt tensors: what a pack stores."""
        ...


M = TypeVar("M", bound=type)

METHODS: Registry[type] = Registry("method")


def register_method(name: str) -> Any:
    """Class decorator: register a method under a lower-case name (once)."""

    def wrap(cls: M) -> M:
        if not hasattr(cls, "Config") or not dataclasses.is_dataclass(cls.Config):
            raise TypeError(f"method {name!r} needs a dataclass `Config`")
        if not hasattr(cls, "from_state"):
            raise TypeError(f"method {name!r} needs a `from_state` classmethod")
        cls.name = name
        METHODS.register(name, cls)
        return cls

    return wrap


def config_from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Build a frozen config dataclass from JSON-like data, naming unknown keys."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(
            f"{cls.__qualname__}: unknown keys {sorted(unknown)}; expected {sorted(fields)}"
        )
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**kw)


def config_to_dict(config: Any) -> dict[str, Any]:
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
    }


def topk_predictions(
    probs: torch.Tensor, classnames: Sequence[str], top_k: int
) -> list[list[Prediction]]:
    """B x C probabilities → per image, the ``top_k`` labels, highest first."""
    k = max(1, min(int(top_k), probs.shape[1]))
    scores, idx = probs.float().topk(k, dim=1)
    return [
        [Prediction(classnames[i], float(s), int(i)) for s, i in zip(row_s, row_i, strict=True)]
        for row_s, row_i in zip(scores.tolist(), idx.tolist(), strict=True)
    ]
