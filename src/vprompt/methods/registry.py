"""The method registry: names → method classes, each checked against the contract when it is
registered, so an incomplete method fails at import with a message naming what is missing."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

from vprompt.methods.base import Capabilities, MethodExample, PromptMethod
from vprompt.methods.config import OptimConfig
from vprompt.utils.registry import Registry

METHODS: Registry[type[PromptMethod]] = Registry("method")

T = TypeVar("T", bound=type[PromptMethod])
_NO_CONFIG = "needs a dataclass `Config` (frozen, with the paper's defaults)"


def register_method(name: str) -> Callable[[T], T]:
    """Class decorator: check ``cls`` against the method contract, then register it as ``name``.

    Raises:
        TypeError: The class breaks the contract (every problem is named).
        ValueError: The name is malformed or already taken.
    """

    def wrap(cls: T) -> T:
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered")
        problems = contract_problems(cls)
        if problems:
            raise TypeError(f"method {name!r} ({cls.__qualname__}): " + "; ".join(problems))
        cls.name = name
        METHODS.register(name, cls)
        return cls

    return wrap


def _overrides(cls: type, member: str) -> bool:
    """Whether ``cls`` defines ``member`` itself or below ``PromptMethod`` (not the default)."""
    return getattr(cls, member, None) is not getattr(PromptMethod, member, None)


def contract_problems(cls: Any) -> list[str]:
    """Everything ``cls`` lacks to be a method (empty when it is complete)."""
    problems: list[str] = []
    if not (isinstance(cls, type) and issubclass(cls, PromptMethod)):
        problems.append(
            "must subclass vprompt.methods.base.PromptMethod (it provides from_state, "
            "prompt_state, load_prompt_state, train and the lifecycle hooks)"
        )
        config = getattr(cls, "Config", None)
        if not (isinstance(config, type) and dataclasses.is_dataclass(config)):
            problems.append(_NO_CONFIG)
        return problems
    config_cls = cls.__dict__.get("Config", getattr(cls, "Config", None))
    if not (isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls)):
        problems.append(_NO_CONFIG)
    else:
        if not config_cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
            problems.append(
                f"Config {config_cls.__name__} must be frozen (@dataclass(frozen=True))"
            )
        try:
            config_cls()
        except Exception as exc:
            problems.append(f"Config() must build with the paper defaults ({exc})")
    caps = getattr(cls, "capabilities", None)
    if not isinstance(caps, Capabilities):
        problems.append("needs `capabilities = Capabilities(...)` declaring what it can do")
        return problems
    fields = (
        {f.name: f for f in dataclasses.fields(config_cls)}
        if isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls)
        else {}
    )
    if caps.trains and not isinstance(_default(fields.get("optim")), OptimConfig):
        problems.append("trains=True needs a Config field `optim: OptimConfig`")
    if caps.inputs == "image-features":
        missing = [m for m in ("encode_images", "forward_features") if not _overrides(cls, m)]
        if not hasattr(cls, "feature_kind"):
            missing.append("feature_kind")
        if missing:
            problems.append(f"inputs='image-features' needs {', '.join(missing)}")
    elif not _overrides(cls, "forward"):
        problems.append("inputs='images' needs forward(images)")
    if caps.custom_backward != _overrides(cls, "backward"):
        problems.append(
            "custom_backward=True needs backward(loss, output, labels)"
            if caps.custom_backward
            else "defines backward() but does not declare custom_backward=True"
        )
    if caps.template_field is not None and caps.template_field not in fields:
        problems.append(
            f"template_field={caps.template_field!r} is not a field of {config_cls.__name__}"
        )
    unknown = sorted(set(cls.target_settings) - set(fields))
    if unknown:
        problems.append(f"target_settings {unknown} are not fields of {config_cls.__name__}")
    if cls.target_settings and not caps.retargets:
        problems.append("target_settings needs retargets=True")
    if not _overrides(cls, "examples"):
        problems.append("needs the classmethod examples() -> [MethodExample(...)] for its tests")
    else:
        try:
            examples = list(cls.examples())
        except Exception as exc:
            problems.append(f"examples() failed ({exc})")
        else:
            if not examples or not all(isinstance(e, MethodExample) for e in examples):
                problems.append("examples() must return at least one MethodExample")
    shaped = cls.data_shaped_state
    if not isinstance(shaped, frozenset) or not all(isinstance(k, str) for k in shaped):
        problems.append("data_shaped_state must be a frozenset of state names")
    return problems


def _default(spec: dataclasses.Field[Any] | None) -> Any:
    """A dataclass field's default value (built from its factory), or None."""
    if spec is None:
        return None
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return None if spec.default is dataclasses.MISSING else spec.default
