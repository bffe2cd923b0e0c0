"""Personalized segmentation in context: show SegGPT an object, find it in new images.

:class:`SegGptSegmenter` takes a few reference (image, mask) pairs and segments the same
object or category in each target image with a frozen
:class:`~vprompt.backbones.seggpt.SegGptBackbone`. One reference conditions the model alone;
several are combined by SegGPT's feature ensemble. No weights or prompts are learned.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from PIL import Image

from vprompt.backbones.registry import load_backbone
from vprompt.backbones.seggpt import EmbeddingType, SegGptBackbone
from vprompt.data.images import DEFAULT_MAX_PIXELS, open_rgb
from vprompt.errors import ConfigError, PromptError
from vprompt.segment.incontext import (
    SegmenterOptions,
    model_for,
    register_segmentation_method,
)
from vprompt.utils.precision import precision_autocast, resolve_precision

ImageInput = Image.Image | str | os.PathLike[str]


@dataclass(frozen=True, eq=False)
class InContextMask:
    """One target's segmentation.

    Attributes:
        mask: H x W bool mask of the target at its original size.
        foreground: H x W float32 foreground probability in [0, 1] (the brightness SegGPT
            paints: black is background, white foreground; ``mask`` is ``foreground > 0.5``
            up to float rounding).
        score: Confidence: the mean foreground probability inside ``mask`` (0 when the mask
            is empty). Near 1 when the model paints the object a clean white.
    """

    mask: NDArray[np.bool_]
    foreground: NDArray[np.float32]
    score: float


class SegGptSegmenter:
    """Segment targets from reference (image, mask) pairs with a frozen SegGPT.

    Args:
        backbone: The frozen SegGPT.
        embedding_type: SegGPT's task token: ``instance`` (the released default) or
            ``semantic``.
        precision: ``auto`` (bf16 autocast on CUDA, fp32 elsewhere), ``bf16`` or ``fp32``.
        batch_size: Targets per forward with a single reference.
        max_pixels: Largest image (in pixels) accepted from files.
    """

    def __init__(
        self,
        backbone: SegGptBackbone,
        *,
        embedding_type: EmbeddingType = "instance",
        precision: str = "auto",
        batch_size: int = 8,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if embedding_type not in ("instance", "semantic"):
            raise ConfigError(
                f"embedding_type: expected instance or semantic, got {embedding_type!r}"
            )
        resolved = resolve_precision(precision, backbone.device)
        if batch_size < 1:
            raise ConfigError(f"batch_size: expected a positive integer, got {batch_size!r}")
        self.backbone = backbone
        self.embedding_type: EmbeddingType = embedding_type
        self.precision = resolved
        self.batch_size = batch_size
        self.max_pixels = max_pixels

    @classmethod
    def load(
        cls,
        name: str = "seggpt:vit-large",
        weights: str | None = None,
        *,
        device: str | torch.device | None = "auto",
        **kwargs: Any,
    ) -> SegGptSegmenter:
        """Build a segmenter from a ``seggpt:ARCH`` name and a weight source."""
        backbone = load_backbone(name, weights, device=device)
        if not isinstance(backbone, SegGptBackbone):
            raise ConfigError(f"{name} is not an in-context segmenter (expected a seggpt:* model)")
        return cls(backbone, **kwargs)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return precision_autocast(self.precision, self.backbone.device)

    def _open(self, image: ImageInput) -> Image.Image:
        return open_rgb(image, max_pixels=self.max_pixels)

    def personalize(
        self,
        refs: Sequence[tuple[ImageInput, ArrayLike]],
        targets: Sequence[ImageInput],
    ) -> list[InContextMask]:
        """Segment in every target what the reference masks show.

        Args:
            refs: (image, H x W bool mask) pairs; each mask the size of its image and not empty.
            targets: Images to segment.

        Returns:
            One result per target, in order.

        Raises:
            PromptError: No references, or a reference mask that is empty, not H x W, not
                binary, or not the size of its image.
        """
        if not refs:
            raise PromptError("personalize needs at least one reference (image, mask) pair")
        images, masks = [], []
        for i, (image, mask) in enumerate(refs):
            rgb = self._open(image)
            arr = np.asarray(mask)
            if arr.ndim == 2 and arr.shape == (rgb.height, rgb.width) and not arr.any():
                raise PromptError(f"reference mask {i} is empty: it must mark the object")
            images.append(rgb)
            masks.append(arr)
        opened = [self._open(t) for t in targets]
        with self._autocast():
            preds = self.backbone.segment(
                images,
                masks,
                opened,
                embedding_type=self.embedding_type,
                batch_size=self.batch_size,
            )
        results = []
        for pred in preds:
            mask = pred.mask.numpy().astype(bool)
            fg = pred.foreground.numpy().astype(np.float32)
            score = float(fg[mask].mean()) if mask.any() else 0.0
            results.append(InContextMask(mask=mask, foreground=fg, score=score))
        return results


@dataclass(frozen=True)
class SegGptConfig:
    """SegGPT's settings as an in-context segmentation method.

    Attributes:
        embedding_type: SegGPT's task token: ``instance`` (the released default) or
            ``semantic``.
        batch_size: Targets per forward with a single reference.
    """

    embedding_type: EmbeddingType = "instance"
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.embedding_type not in ("instance", "semantic"):
            raise ConfigError(
                f"embedding_type: expected instance or semantic, got {self.embedding_type!r}"
            )
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int):
            raise ConfigError(f"batch_size: expected a positive integer, got {self.batch_size!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: expected a positive integer, got {self.batch_size!r}")


@register_segmentation_method("seggpt")
class SegGPT:
    """SegGPT as a registered in-context method: ``fit`` keeps the references, ``predict``
    paints each target (a frozen model; nothing is learned).

    Args:
        segmenter: The frozen SegGPT segmenter.
    """

    name: ClassVar[str]
    family: ClassVar[str] = "seggpt"
    default_model: ClassVar[str] = "seggpt:vit-large"
    tiny_model: ClassVar[str] = "seggpt:tiny"
    config_class: ClassVar[type] = SegGptConfig

    def __init__(self, segmenter: SegGptSegmenter) -> None:
        self.segmenter = segmenter
        self._references: list[tuple[ImageInput, ArrayLike]] | None = None

    @classmethod
    def load(cls, options: SegmenterOptions, config: SegGptConfig | None = None) -> SegGPT:
        """SegGPT on the ``seggpt:`` model ``options`` name (default ``seggpt:vit-large``)."""
        cfg = config or SegGptConfig()
        return cls(
            SegGptSegmenter.load(
                model_for(cls, options),
                options.weights,
                device=options.device,
                precision=options.precision,
                max_pixels=options.max_pixels,
                embedding_type=cfg.embedding_type,
                batch_size=cfg.batch_size,
            )
        )

    def fit(self, references: Sequence[tuple[ImageInput, ArrayLike]]) -> SegGPT:
        """Keep the (image, mask) references; they condition every prediction."""
        if not references:
            raise PromptError("personalize needs at least one reference (image, mask) pair")
        self._references = list(references)
        return self

    def predict(self, image: ImageInput) -> InContextMask:
        return self.predict_many([image])[0]

    def predict_many(self, images: Sequence[ImageInput]) -> list[InContextMask]:
        """The targets painted in batches (one forward per ``batch_size`` targets)."""
        if self._references is None:
            raise PromptError(f"{self.name}: call fit(references) first")
        return self.segmenter.personalize(self._references, list(images))
