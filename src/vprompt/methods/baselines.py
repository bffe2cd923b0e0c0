"""Reference baselines next to the prompt methods: linear probe and full fine-tuning.

``linear-probe`` trains a linear classifier on frozen features (a prompt method's natural
competitor). ``full-finetune`` trains a copy of the whole backbone: it is **not a prompt method**
(``is_prompt_method = False``) and exists only as an upper reference; the frozen backbone it was
copied from stays untouched.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vprompt.backbones.protocols import ImageTextBackbone
from vprompt.data.batched import ResizeToTensor
from vprompt.errors import ConfigError
from vprompt.methods.base import Capabilities, MethodExample, MethodOutput, PromptMethod
from vprompt.methods.clip_common import CLIP_IMAGE_FEATURES
from vprompt.methods.config import OptimConfig
from vprompt.methods.registry import register_method


def frozen_features(backbone: Any, pixels: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W normalized pixels → B x F features (CLIP: unit-norm embeddings;
    classifiers: the penultimate layer)."""
    if isinstance(backbone, ImageTextBackbone):
        return F.normalize(backbone.encode_image(pixels).float(), dim=-1)
    return backbone.features(pixels).float()


def backbone_feature_kind(backbone: Any) -> str:
    """The feature-cache kind of :func:`frozen_features` on ``backbone``."""
    if isinstance(backbone, ImageTextBackbone):
        return CLIP_IMAGE_FEATURES
    return "classifier-penultimate"


def _feature_dim(backbone: Any) -> int:
    if isinstance(backbone, ImageTextBackbone):
        return int(backbone.embed_dim)
    return int(backbone.feature_dim)


def _image_transform(
    backbone: Any, train: bool, augment: bool, image_size: int | None
) -> Callable[[Image.Image], torch.Tensor]:
    """The backbone's own preprocessing, or a plain resize to ``image_size`` (to compare with a
    visual prompt at the same canvas size), plus flips when training with ``augment``."""
    from torchvision import transforms as T

    flip = train and augment
    if image_size is not None:
        pre = backbone.preprocess
        return ResizeToTensor(image_size, flip=flip, mean=pre.mean, std=pre.std)
    base: Callable[[Image.Image], torch.Tensor] = backbone.transform
    if not flip:
        return base
    return T.Compose([T.RandomHorizontalFlip(), base])


def _check_image_size(image_size: int | None) -> None:
    if image_size is not None and (not isinstance(image_size, int) or image_size < 8):
        raise ConfigError(f"image_size must be an integer >= 8 or null, got {image_size!r}")


@dataclass(frozen=True)
class LinearProbeConfig:
    """Linear classifier on frozen features.

    Attributes:
        augment: Random horizontal flips during training.
        image_size: ``None`` uses the backbone's preprocessing; N resizes images to N x N.
        feature_views: With a feature cache and ``augment``, how many augmented views of each
            training image are encoded once and cached; epoch e trains on view e % N (without
            a cache, every epoch draws fresh flips). Without ``augment`` the one plain view is
            cached whatever this says.
        optim: Optimizer and schedule.
    """

    augment: bool = False
    image_size: int | None = None
    feature_views: int = 1
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            optimizer="adamw", lr=1e-3, weight_decay=1e-4, epochs=10, batch_size=256
        )
    )

    def __post_init__(self) -> None:
        _check_image_size(self.image_size)
        views = self.feature_views
        if not isinstance(views, int) or isinstance(views, bool) or views < 1:
            raise ConfigError(f"feature_views must be an integer >= 1, got {views!r}")


@register_method("linear-probe")
class LinearProbe(PromptMethod):
    """Baseline: logistic regression on the frozen backbone's penultimate features.

    It sees images only through frozen features (``inputs="image-features"``), so the engine
    may train it on cached features. Learned tensors: ``head.weight``, ``head.bias``.
    """

    Config = LinearProbeConfig
    capabilities = Capabilities(inputs="image-features")

    def __init__(
        self, backbone: Any, classnames: Sequence[str], config: LinearProbeConfig | None = None
    ) -> None:
        super().__init__(backbone, classnames, config)
        self.head = nn.Linear(_feature_dim(backbone), len(self.classnames))
        self.to(next(backbone.parameters()).device)

    @classmethod
    def examples(cls) -> list[MethodExample]:
        return [MethodExample("torchvision:tiny"), MethodExample("clip:tiny")]

    def input_transform(self, train: bool) -> Callable[[Image.Image], torch.Tensor]:
        return _image_transform(self.backbone, train, self.config.augment, self.config.image_size)

    @property
    def feature_kind(self) -> str:  # type: ignore[override]
        return backbone_feature_kind(self.backbone)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W pixels → B x F frozen features (CLIP: unit-norm embeddings)."""
        with torch.no_grad():
            return frozen_features(self.backbone, pixels)

    def forward_features(self, features: torch.Tensor) -> MethodOutput:
        return MethodOutput(logits=self.head(features))


@dataclass(frozen=True)
class FullFineTuneConfig:
    """Every backbone weight trained (reference only, not a prompt method).

    Attributes:
        augment: Random horizontal flips during training.
        image_size: ``None`` uses the backbone's preprocessing; N resizes images to N x N.
        optim: Optimizer and schedule.
    """

    augment: bool = True
    image_size: int | None = None
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4, epochs=3, batch_size=128
        )
    )

    def __post_init__(self) -> None:
        _check_image_size(self.image_size)


@register_method("full-finetune")
class FullFineTune(PromptMethod):
    """Upper reference: fine-tunes a *copy* of the backbone plus a new linear head.

    Not a prompt method: its pack holds every weight of the tuned copy.
    """

    Config = FullFineTuneConfig
    capabilities = Capabilities(inputs="images", is_prompt_method=False)

    def __init__(
        self, backbone: Any, classnames: Sequence[str], config: FullFineTuneConfig | None = None
    ) -> None:
        super().__init__(backbone, classnames, config)
        self.tuned = copy.deepcopy(backbone)
        for p in self.tuned.parameters():
            p.requires_grad_(True)
        self.head = nn.Linear(_feature_dim(backbone), len(self.classnames))
        self.to(next(backbone.parameters()).device)

    @classmethod
    def examples(cls) -> list[MethodExample]:
        return [MethodExample("torchvision:tiny")]

    def prompt_tensors(self) -> dict[str, torch.Tensor]:
        # The wrapped model's own state dict: adapters may alias sub-modules (e.g. the head).
        state = {f"tuned.{k}": v for k, v in self.tuned.model.state_dict(keep_vars=True).items()}
        state.update({f"head.{k}": v for k, v in self.head.state_dict(keep_vars=True).items()})
        return state

    def input_transform(self, train: bool) -> Callable[[Image.Image], torch.Tensor]:
        return _image_transform(self.backbone, train, self.config.augment, self.config.image_size)

    def forward(self, images: torch.Tensor) -> MethodOutput:
        return MethodOutput(logits=self.head(frozen_features(self.tuned, images)))
