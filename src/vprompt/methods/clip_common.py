"""Pieces the CLIP-side methods share: the backbone check, unit image features, the logits and
the reference configs' training augmentation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from vprompt.backbones.protocols import ImageTextBackbone
from vprompt.errors import ConfigError

CLIP_IMAGE_FEATURES = "clip-image-embedding-l2"
"""Feature kind of L2-normalised CLIP image embeddings (shared in the feature cache)."""


def require_image_text(backbone: Any, method: str) -> ImageTextBackbone:
    """``backbone`` as a CLIP-like backbone, or a one-line error naming the method."""
    if not isinstance(backbone, ImageTextBackbone):
        name = getattr(backbone, "name", type(backbone).__name__)
        raise ConfigError(
            f"{method} works on image-text prompts: it needs a CLIP-like backbone "
            f"(clip:…), not {name}"
        )
    return backbone


def unit_image_features(backbone: ImageTextBackbone, pixels: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W preprocessed pixels → B x D unit-norm float32 image features (frozen).

    The backbone's parameters never require gradients, so no graph is built here unless the
    pixels themselves require gradients, as an adversarial attack's do (:mod:`vprompt.attack`).
    """
    return F.normalize(backbone.encode_image(pixels).float(), dim=-1)


def clip_logits(
    backbone: ImageTextBackbone, features: torch.Tensor, text: torch.Tensor
) -> torch.Tensor:
    """B x D unit image features and C x D unit class text features → B x C scaled cosines."""
    return backbone.logit_scale.float() * features.float() @ text.float().T


def clip_train_transform(backbone: Any) -> Callable[[Image.Image], torch.Tensor]:
    """Dassl's ``random_resized_crop`` + ``random_flip`` + ``normalize`` at the backbone's size."""
    from torchvision import transforms as T

    pre = backbone.preprocess
    size = pre.size if isinstance(pre.size, int) else tuple(pre.size)
    return T.Compose(
        [
            T.Lambda(_rgb),
            T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(pre.mean, pre.std),
        ]
    )


def clip_input_transform(backbone: Any, augment: bool) -> Callable[[Image.Image], torch.Tensor]:
    """The reference configs' training augmentation when ``augment``, else the backbone's
    own preprocessing."""
    if augment:
        return clip_train_transform(backbone)
    transform: Callable[[Image.Image], torch.Tensor] = backbone.transform
    return transform


def _rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB") if image.mode != "RGB" else image
