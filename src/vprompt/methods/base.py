"""What every prompt method is: a module with a typed config, registered by name."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch

from vprompt.errors import ConfigError, PackError
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


METHODS: Registry[Any] = Registry("method")


def register_method(name: str) -> Any:
    """Class decorator: register a method under a lower-case name (once)."""

    def wrap(cls: Any) -> Any:
        if not hasattr(cls, "Config") or not dataclasses.is_dataclass(cls.Config):
            raise TypeError(f"method {name!r} needs a dataclass `Config`")
        if not hasattr(cls, "from_state"):
            raise TypeError(f"method {name!r} needs a `from_state` classmethod")
        cls.name = name
        METHODS.register(name, cls)
        return cls

    return wrap


def config_from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Build a frozen config dataclass (nested ones too) from JSON-like data.

    Unknown keys are errors that name the expected keys.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(
            f"{cls.__qualname__}: unknown keys {sorted(unknown)}; expected {sorted(fields)}"
        )
    defaults = cls()
    kw: dict[str, Any] = {}
    for key, value in data.items():
        current = getattr(defaults, key)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            kw[key] = config_from_dict(type(current), value)
        elif isinstance(value, list):
            kw[key] = tuple(value)
        else:
            kw[key] = value
    try:
        return cls(**kw)
    except TypeError as exc:
        raise ConfigError(f"{cls.__qualname__}: {exc}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) config dataclass; tuples become lists."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {k: plain(v) for k, v in dataclasses.asdict(config).items()}


def apply_overrides(config: Any, overrides: Sequence[str]) -> Any:
    """Apply ``key=value`` / ``section.key=value`` strings (values parsed as YAML scalars).

    Raises:
        ConfigError: Malformed items, unknown keys, or values the config rejects.
    """
    import yaml

    data = config_to_dict(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE (e.g. optim.lr=0.1)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a config section")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(
                f"--set {item!r}: unknown key {key!r}; known: {', '.join(sorted(_flat_keys(data)))}"
            )
        node[parts[-1]] = value
    return config_from_dict(type(config), data)


def _flat_keys(data: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k, v in data.items():
        if isinstance(v, dict):
            keys += _flat_keys(v, f"{prefix}{k}.")
        else:
            keys.append(f"{prefix}{k}")
    return keys


def check_state_keys(method: str, expected: set[str], tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse prompt tensors whose names differ from what ``method`` saves, naming both sides."""
    if set(tensors) != expected:
        raise PackError(
            f"{method} state mismatch: missing {sorted(expected - set(tensors))}, "
            f"unexpected {sorted(set(tensors) - expected)}"
        )


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


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and schedule of a trainable method (paper defaults live in each method).

    The schedule is a warmup for ``warmup_epochs`` (``linear``: rising from ``warmup_lr``, or
    from 0 when it is ``None``; ``constant``: held at ``warmup_lr``), then cosine decay.
    ``step_unit="iteration"`` updates the rate every iteration and decays to 0 at the end of
    ``epochs``. ``step_unit="epoch"`` reproduces Dassl's epoch-stepped schedule, which the CoOp
    family's published numbers use: epoch ``e >= W`` trains at
    ``lr * (1 + cos(pi * (e - W) / epochs)) / 2``.
    """

    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    epochs: int = 10
    warmup_epochs: float = 0.0
    warmup_lr: float | None = None
    batch_size: int = 128
    grad_clip: float | None = None
    warmup_type: Literal["linear", "constant"] = "linear"
    step_unit: Literal["iteration", "epoch"] = "iteration"

    def __post_init__(self) -> None:
        if self.warmup_type not in ("linear", "constant"):
            raise ConfigError(f"optim.warmup_type must be linear or constant: {self.warmup_type!r}")
        if self.step_unit not in ("iteration", "epoch"):
            raise ConfigError(f"optim.step_unit must be iteration or epoch: {self.step_unit!r}")
        if self.warmup_type == "constant" and self.warmup_epochs > 0 and self.warmup_lr is None:
            raise ConfigError("optim.warmup_type=constant needs optim.warmup_lr")
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise ConfigError(f"optim.optimizer must be sgd, adam or adamw, got {self.optimizer!r}")
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.epochs < 0 or self.batch_size < 1:
            raise ConfigError(f"optim.epochs must be >= 0 and batch_size >= 1 ({self})")
        if self.warmup_epochs < 0 or self.warmup_epochs > max(self.epochs, 0):
            raise ConfigError(
                f"optim.warmup_epochs must be in [0, epochs], got {self.warmup_epochs}"
            )
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ConfigError(f"optim.weight_decay must be >= 0 and momentum in [0, 1) ({self})")


@runtime_checkable
class TrainableMethod(Protocol):
    """What the engine needs from a method it trains; the engine never asks which method it is.

    A method holds a frozen backbone and only its own prompt tensors are trainable. ``train()``
    must keep the backbone in eval mode (frozen BatchNorm statistics stay frozen).

    Optional hook: a method that shapes its own update defines
    ``backward(loss: Tensor, output: MethodOutput, labels: Tensor) -> None``. The engine then
    calls it, after ``zero_grad`` and before gradient clipping and the optimizer step, instead
    of ``loss.backward()``. ``loss`` is the scalar training loss (cross-entropy of
    ``output.logits`` plus every ``aux_loss`` term), ``output`` what this step's forward
    returned, ``labels`` the B class indices; the hook must leave ``.grad`` on the trainable
    parameters (e.g. ProGrad's gradient projected against a distillation gradient).
    """

    name: ClassVar[str]
    is_prompt_method: ClassVar[bool]
    """False only for reference baselines that change backbone weights (full fine-tuning)."""
    config: Any
    """A frozen dataclass with an ``optim: OptimConfig`` field."""
    classnames: list[str]
    backbone: Any

    def trainable_parameters(self) -> list[Any]:
        """The prompt parameters, or groups ``{"params": [...], "lr_scale": s}`` when some
        learn at ``s`` times the scheduled rate."""
        ...

    def input_transform(self, train: bool) -> Any:
        """PIL image → tensor the method's forward expects (augmentation when ``train``)."""
        ...

    def forward(self, images: torch.Tensor) -> MethodOutput: ...

    def before_epoch(self, epoch: int, train_batches: Any) -> None:
        """Hook run before each training epoch; ``train_batches()`` iterates (images, labels)
        over the training set without augmentation (used e.g. by iterative label mapping).

        For an :class:`ImageFeatureMethod` it iterates (B x D ``encode_images`` features,
        labels) instead, whether they come from a feature cache or are encoded on the fly."""
        ...

    def prompt_state(self) -> dict[str, torch.Tensor]: ...

    def load_prompt_state(self, tensors: Mapping[str, torch.Tensor]) -> None: ...

    def visualizations(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named 3 x H x W images in [0, 1] for reports (the prompt, prompted examples);
        ``images`` is a small batch from ``input_transform(False)``."""
        ...


InputKind = Literal["images", "image-features"]


@runtime_checkable
class ImageFeatureMethod(Protocol):
    """A method that sees images only through frozen, deterministic image features.

    Declaring ``input_kind = "image-features"`` lets the engine encode every image once, keep
    the features in a feature cache and train / evaluate on them directly. The method promises
    that ``forward(images)`` equals ``forward_features(encode_images(images))``, so packs and
    predictions on pixels behave exactly as training on features did.
    """

    input_kind: ClassVar[InputKind]
    feature_kind: str
    """Names what ``encode_images`` extracts (e.g. ``clip-image-embedding-l2``); part of the
    cache key, so two methods share cached features only when they extract the same thing."""
    feature_views: int
    """Augmented training views to cache per image (>= 1); epoch e trains on view e % N."""

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W pixels from ``input_transform`` → B x D features (frozen, no grad)."""
        ...

    def forward_features(self, features: torch.Tensor) -> MethodOutput:
        """B x D features from ``encode_images`` → the output ``forward`` would give."""
        ...


_FEATURE_MEMBERS = ("feature_kind", "encode_images", "forward_features")


def uses_image_features(method: Any) -> bool:
    """Whether ``method`` declares ``input_kind = "image-features"`` (absent means images).

    Raises:
        TypeError: It declares so but lacks a member of :class:`ImageFeatureMethod`, or its
            ``feature_views`` is not an integer >= 1.
    """
    kind = getattr(method, "input_kind", "images")
    if kind == "images":
        return False
    if kind != "image-features":
        raise TypeError(f"input_kind must be 'images' or 'image-features', got {kind!r}")
    missing = [m for m in _FEATURE_MEMBERS if not hasattr(method, m)]
    if missing:
        raise TypeError(
            f"{type(method).__name__} declares input_kind 'image-features' but has no {missing}"
        )
    feature_views(method)
    return True


def feature_views(method: Any) -> int:
    """The method's number of cached augmented training views (default 1)."""
    views = getattr(method, "feature_views", 1)
    if not isinstance(views, int) or isinstance(views, bool) or views < 1:
        raise TypeError(f"{type(method).__name__}.feature_views must be an int >= 1: {views!r}")
    return views
