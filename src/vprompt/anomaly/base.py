"""The anomaly-method contract: what every anomaly scorer declares, holds and returns.

An anomaly method scores how far each image — and each pixel — is from "normal", on a frozen
backbone. Like prompt methods it is registered by name (:func:`register_anomaly_method`) and
declares what it can do (:class:`AnomalyCapabilities`); the fitting, training, evaluation,
packs, CLI and server read those declarations and never name a method.

Three ways a method can learn, each declared:

* ``zero_shot``: it scores with no image at all (WinCLIP's state prompts, AnomalyCLIP's learned
  object-agnostic prompts once trained).
* ``few_shot``: :meth:`AnomalyMethod.fit_normal` takes k normal reference images and keeps what
  it needs from them (a memory bank of patch features, WinCLIP+'s reference windows) as
  ``data_shaped_state`` tensors, so the state's size follows the references.
* ``trains``: :meth:`AnomalyMethod.training_loss` gives the loss terms on a labelled auxiliary
  dataset (images, image labels, pixel masks); :func:`vprompt.anomaly.train.train_method` runs
  the optimizer over :meth:`AnomalyMethod.trainable_parameters` with the config's ``optim``.

Shapes: B images, S the square side the model sees (:class:`InputFrame`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

import torch
from torch import nn

from vprompt.backbones.preprocess import Preprocess
from vprompt.errors import ConfigError, PackError
from vprompt.utils.registry import Registry

Family = Literal["clip", "any"]


@dataclass(frozen=True)
class AnomalyCapabilities:
    """What an anomaly method can do (read by fitting, training, evaluation and the CLI).

    Attributes:
        family: ``clip``: needs an image-text backbone; ``any``: any frozen backbone with
            dense features (CNN classifiers, ViTs, CLIP image towers).
        zero_shot: Scores without any reference image once built (and trained, when it trains).
        few_shot: :meth:`AnomalyMethod.fit_normal` uses k normal reference images.
        trains: Learns prompts from a labelled auxiliary dataset (:meth:`training_loss`).
        uses_object_name: Its text prompts name the inspected object (``"bottle"``); the
            evaluation passes each category's name, others ignore it.
    """

    family: Family = "any"
    zero_shot: bool = False
    few_shot: bool = False
    trains: bool = False
    uses_object_name: bool = False

    def __post_init__(self) -> None:
        if self.family not in ("clip", "any"):
            raise ValueError(f"family must be clip or any: {self.family!r}")
        if not (self.zero_shot or self.few_shot):
            raise ValueError("an anomaly method scores zero-shot, few-shot or both")


@dataclass(frozen=True)
class InputFrame:
    """How an image becomes the S x S input the method sees (and masks the same way).

    The image (and its ground-truth mask, nearest-neighbour) is resized to ``resize`` x
    ``resize`` — ignoring its aspect ratio, as the anomaly references do — then centre-cropped
    to ``size`` x ``size``. Metrics are computed in this frame, as the papers compute them.

    Attributes:
        size: S, the side the model sees.
        resize: The side before the centre crop (``>= size``; ``size``: no crop).
        mean: Per-channel normalisation mean.
        std: Per-channel normalisation std.
        interpolation: Image resampling (masks always use nearest).
    """

    size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bicubic"

    def __post_init__(self) -> None:
        if not 8 <= self.size <= 4096 or not self.size <= self.resize <= 4096:
            raise ConfigError(
                f"input frame: need 8 <= size <= resize <= 4096, got size {self.size} "
                f"resize {self.resize}"
            )

    @property
    def crop_offset(self) -> int:
        """Pixels cut from each side of the resized square."""
        return (self.resize - self.size) // 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, what: str = "input frame") -> InputFrame:
        try:
            return cls(
                size=int(data["size"]),
                resize=int(data["resize"]),
                mean=_triple(data["mean"]),
                std=_triple(data["std"]),
                interpolation=data.get("interpolation", "bicubic"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PackError(f"{what}: malformed input frame ({exc})") from None


def _triple(value: Any) -> tuple[float, float, float]:
    vals = tuple(float(v) for v in value)
    if len(vals) != 3:
        raise ValueError("mean/std need 3 values")
    return (vals[0], vals[1], vals[2])


def frame_for(
    preprocess: Preprocess, *, size: int | None = None, resize: int | None = None
) -> InputFrame:
    """The frame a method uses on a backbone: its config's sides, else the backbone's own."""
    side = size or int(preprocess.size[0])
    interp = preprocess.interpolation if preprocess.interpolation != "nearest" else "bilinear"
    return InputFrame(
        size=side,
        resize=resize or side,
        mean=_triple(preprocess.mean),
        std=_triple(preprocess.std),
        interpolation=interp,
    )


@dataclass
class AnomalyOutput:
    """Scores of a batch.

    Attributes:
        image_scores: B, higher = more anomalous.
        maps: B x S x S pixel scores in the input frame, higher = more anomalous.
    """

    image_scores: torch.Tensor
    maps: torch.Tensor


@dataclass(frozen=True)
class AnomalyExample:
    """A tiny case the contract tests build: a registered model and config overrides."""

    model: str
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class AnomalyMethod(nn.Module):
    """Base of every anomaly method: holds the frozen backbone, the config and the object name.

    Subclasses set ``Config`` (a frozen dataclass with the paper's defaults), ``capabilities``,
    ``default_model`` / ``tiny_model`` and implement :meth:`score`, plus :meth:`fit_normal`
    (few-shot) and :meth:`training_loss` (trains). The learned / fitted state is every
    persistent buffer and parameter outside ``backbone`` (:meth:`state`); tensors whose first
    dimension comes from the references are listed in ``data_shaped_state``.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type]
    capabilities: ClassVar[AnomalyCapabilities]
    default_model: ClassVar[str]
    tiny_model: ClassVar[str]
    data_shaped_state: ClassVar[tuple[str, ...]] = ()
    lr_schedule: ClassVar[Literal["constant", "warmup-cosine"]] = "constant"
    """How :func:`~vprompt.anomaly.train.train_method` moves the rate: ``constant`` at
    ``optim.lr`` (AnomalyCLIP's reference), or ``warmup-cosine``, the config's ``optim``
    warm-up then cosine decay per iteration (Bayes-PFL's)."""

    def __init__(self, backbone: Any, config: Any = None, *, object_name: str = "object") -> None:
        super().__init__()
        self.backbone = backbone
        self.config = self.Config() if config is None else config
        if not isinstance(self.config, self.Config):
            raise ConfigError(f"{self.name}: config must be a {self.Config.__name__}")
        self.object_name = check_object_name(object_name)
        self.fitted = not self.capabilities.few_shot or self.capabilities.zero_shot

    # ------------------------------------------------------------------ what subclasses give
    @classmethod
    def examples(cls) -> list[AnomalyExample]:
        """Tiny cases for the contract tests (default: the tiny model, paper config)."""
        return [AnomalyExample(cls.tiny_model)]

    @property
    def frame(self) -> InputFrame:
        """The input frame (default: the config's ``image_size`` / ``resize`` on the backbone)."""
        return frame_for(
            self.backbone.preprocess,
            size=getattr(self.config, "image_size", None),
            resize=getattr(self.config, "resize", None),
        )

    def fit_normal(self, batches: Iterable[torch.Tensor]) -> None:
        """Keep what the method needs from normal references (B x 3 x S x S batches)."""
        raise ConfigError(f"{self.name} does not use normal reference images (zero-shot only)")

    def score(self, pixels: torch.Tensor) -> AnomalyOutput:
        """B x 3 x S x S normalised pixels → image scores and S x S maps."""
        raise NotImplementedError

    def training_loss(
        self, pixels: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Named loss terms on B images, B labels (0/1) and B x S x S float masks."""
        raise ConfigError(f"{self.name} learns nothing from labelled anomalies")

    # ------------------------------------------------------------------ shared
    def set_object_name(self, name: str) -> None:
        """Name the inspected object (text methods rebuild their prompts on the next score)."""
        self.object_name = check_object_name(name)

    def train(self, mode: bool = True) -> AnomalyMethod:
        super().train(mode)
        self.backbone.eval()  # frozen: dropout / norm statistics never change
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter outside the backbone that requires grad."""
        return [p for n, p in self.named_parameters() if not n.startswith("backbone.")]

    def parameter_groups(self) -> list[Any]:
        """What the optimizer trains: :meth:`trainable_parameters`, or groups
        ``{"params": [...], "lr_scale": s}`` for parts the reference trains at other rates."""
        return list(self.trainable_parameters())

    def state(self) -> dict[str, torch.Tensor]:
        """The fitted / learned tensors (persistent, outside the backbone), detached on CPU."""
        return {
            k: v.detach().cpu().contiguous()
            for k, v in self.state_dict().items()
            if not k.startswith("backbone.")
        }

    def load_state(self, tensors: Mapping[str, torch.Tensor], *, source: str = "pack") -> None:
        """Load :meth:`state`'s tensors, checking names, shapes, dtypes and finiteness first.

        ``data_shaped_state`` tensors may have any first dimension (they are resized).

        Raises:
            PackError: A tensor is missing, unexpected, of another shape or dtype, or not finite.
        """
        own = self.state()
        missing = sorted(set(own) - set(tensors))
        extra = sorted(set(tensors) - set(own))
        if missing or extra:
            parts = [f"missing {', '.join(missing)}" if missing else ""]
            parts.append(f"unexpected {', '.join(extra)}" if extra else "")
            raise PackError(
                f"{source}: tensors do not fit {self.name}: " + "; ".join(filter(None, parts))
            )
        for key, value in tensors.items():
            want = own[key]
            same_tail = (
                tuple(value.shape[1:]) == tuple(want.shape[1:]) and value.dim() == want.dim()
            )
            shaped = key in self.data_shaped_state
            if (shaped and not same_tail) or (not shaped and value.shape != want.shape):
                raise PackError(
                    f"{source}: tensor {key} has shape {tuple(value.shape)}, {self.name} "
                    f"expects {tuple(want.shape)}"
                )
            if value.dtype != want.dtype:
                raise PackError(f"{source}: tensor {key} is {value.dtype}, expected {want.dtype}")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise PackError(f"{source}: tensor {key} holds NaN or infinite values")
        device = next((t.device for t in self.backbone.parameters()), torch.device("cpu"))
        for key in self.data_shaped_state:
            self._resize_state(key, tensors[key].shape[0])
        self.load_state_dict({k: v.to(device) for k, v in tensors.items()}, strict=False)
        self.fitted = True

    def _resize_state(self, key: str, rows: int) -> None:
        module: nn.Module = self
        *path, leaf = key.split(".")
        for part in path:
            module = getattr(module, part)
        old = getattr(module, leaf)
        new = old.new_zeros((rows, *old.shape[1:]))
        if isinstance(old, nn.Parameter):
            setattr(module, leaf, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            module.register_buffer(leaf, new)

    def require_fitted(self) -> None:
        if not self.fitted:
            raise ConfigError(
                f"{self.name} needs normal reference images first (fit_normal, or "
                "`vprompt anomaly fit --normal DIR`)"
            )


def check_object_name(name: str) -> str:
    text = " ".join(str(name).split())
    if not text or len(text) > 60:
        raise ConfigError(f"object name must be 1-60 characters: {name!r}")
    return text


ANOMALY_METHODS: Registry[type[AnomalyMethod]] = Registry("anomaly method")

M = TypeVar("M", bound=type[AnomalyMethod])


def register_anomaly_method(name: str) -> Callable[[M], M]:
    """Class decorator: check ``cls`` against the contract, then register it under ``name``.

    Raises:
        TypeError: Something the contract needs is missing (all problems are named).
        ValueError: The name is malformed or taken.
    """

    def wrap(cls: M) -> M:
        problems = []
        config = getattr(cls, "Config", None)
        if not (isinstance(config, type) and dataclasses.is_dataclass(config)):
            problems.append("needs `Config`, a frozen dataclass with the paper's defaults")
        else:
            try:
                config()
            except Exception as exc:  # any failure is the problem to report
                problems.append(f"Config() must build with the paper defaults ({exc})")
        caps = getattr(cls, "capabilities", None)
        if not isinstance(caps, AnomalyCapabilities):
            problems.append("needs `capabilities`, an AnomalyCapabilities")
        for attr in ("default_model", "tiny_model"):
            if not isinstance(getattr(cls, attr, None), str):
                problems.append(f"needs `{attr}`, a registered model name")
        if cls.score is AnomalyMethod.score:
            problems.append("needs score()")
        if isinstance(caps, AnomalyCapabilities):
            if caps.few_shot and cls.fit_normal is AnomalyMethod.fit_normal:
                problems.append("declares few_shot but has no fit_normal()")
            if caps.trains and cls.training_loss is AnomalyMethod.training_loss:
                problems.append("declares trains but has no training_loss()")
            fields = getattr(config, "__dataclass_fields__", {})
            if caps.trains and "optim" not in fields:
                problems.append("declares trains but its Config has no `optim` section")
        if problems:
            raise TypeError(f"anomaly method {name!r}: " + "; ".join(problems))
        ANOMALY_METHODS.register(name, cls)
        cls.name = name
        return cls

    return wrap
