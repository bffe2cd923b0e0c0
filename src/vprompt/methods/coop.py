"""CoOp: learned context vectors around each class name (Zhou et al., IJCV 2022).

The image side never changes, so CoOp declares ``inputs="image-features"``: with a feature
cache the engine encodes every (augmented) training image once and each step runs only the
text encoder on the learned prompts — cut to the longest real prompt (causal tower) and, for
many classes, in checkpointed chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from vprompt.backbones.protocols import ImageTextBackbone
from vprompt.errors import ConfigError
from vprompt.methods.base import Capabilities, MethodExample, MethodOutput, PromptMethod
from vprompt.methods.clip_common import (
    CLIP_IMAGE_FEATURES,
    clip_input_transform,
    clip_logits,
    require_image_text,
    unit_image_features,
)
from vprompt.methods.config import OptimConfig
from vprompt.methods.registry import register_method
from vprompt.methods.text_context import (
    ClassTokenPosition,
    ContextTextFeatures,
    learned_context,
    refuse_class_specific,
)


def coop_optim(epochs: int = 200, batch_size: int = 32) -> OptimConfig:
    """Dassl's CoOp-family optimizer: SGD 0.002, 1 constant-warmup epoch at 1e-5, cosine per
    epoch, weight decay 5e-4; the last partial batch is dropped when a full one exists."""
    return OptimConfig(
        optimizer="sgd",
        lr=0.002,
        momentum=0.9,
        weight_decay=5e-4,
        epochs=epochs,
        warmup_epochs=1,
        warmup_lr=1e-5,
        warmup_type="constant",
        step_unit="epoch",
        batch_size=batch_size,
        drop_last=True,
    )


@dataclass(frozen=True)
class CoOpConfig:
    """CoOp's settings; defaults are the paper's few-shot setting (16 tokens, random init).

    Attributes:
        n_ctx: M, the number of learned context tokens (ignored with ``ctx_init``, whose
            *word* count sets it, as in the reference; a phrase with more tokens than words
            keeps the extra ones frozen after the context).
        ctx_init: Initialise the context from this phrase's token embeddings (e.g. ``"a photo
            of a"``, the base-to-novel setting); empty for N(0, 0.02²) random vectors drawn
            from the run's seeded generator.
        class_specific: One context per class (CSC) instead of one shared context; as in the
            reference, only without ``ctx_init`` (with a phrase the context is shared, and the
            applied config says so).
        class_token_position: ``end``, ``middle`` or ``front``.
        init_std: Standard deviation of the random initialisation.
        augment: Random resized crop (scale 0.08-1, bicubic) and horizontal flip for training,
            as the reference configs do.
        feature_views: With a feature cache and ``augment``, augmented views encoded once per
            training image; epoch e trains on view e mod N. Set it to ``optim.epochs`` for a
            fresh view every epoch, as the reference draws.
        class_chunk: Classes per text-encoder call, with activation checkpointing (bounds
            memory for 1000 classes); None runs all classes at once.
        optim: Optimizer and schedule.
    """

    n_ctx: int = 16
    ctx_init: str = ""
    class_specific: bool = False
    class_token_position: ClassTokenPosition = "end"
    init_std: float = 0.02
    augment: bool = True
    feature_views: int = 10
    class_chunk: int | None = None
    optim: OptimConfig = field(default_factory=coop_optim)

    def __post_init__(self) -> None:
        if self.n_ctx < 1:
            raise ConfigError(f"n_ctx must be >= 1, got {self.n_ctx}")
        if self.class_token_position not in ("end", "middle", "front"):
            raise ConfigError(
                f"class_token_position must be end, middle or front: {self.class_token_position!r}"
            )
        if not isinstance(self.feature_views, int) or self.feature_views < 1:
            raise ConfigError(f"feature_views must be an integer >= 1: {self.feature_views!r}")
        if self.class_chunk is not None and self.class_chunk < 1:
            raise ConfigError(f"class_chunk must be >= 1 or null: {self.class_chunk!r}")
        if not self.init_std > 0:
            raise ConfigError(f"init_std must be > 0: {self.init_std!r}")


@register_method("coop")
class CoOp(PromptMethod):
    """Context Optimization: cross-entropy on the learned prompts' class scores.

    Learned tensors (the pack): ``ctx``, M x W shared or C x M x W class-specific.
    """

    Config = CoOpConfig
    capabilities = Capabilities(inputs="image-features", retargets=True)
    feature_kind = CLIP_IMAGE_FEATURES
    state_hint = "(n_ctx, class-specific context and classes must match)"

    def __init__(
        self,
        backbone: ImageTextBackbone,
        classnames: Sequence[str],
        config: CoOpConfig | None = None,
    ) -> None:
        super().__init__(backbone, classnames, config)
        clip = require_image_text(backbone, "coop")
        self.ctx, self.assembler, self.config = learned_context(clip, self.classnames, self.config)
        self._text = ContextTextFeatures(clip, self.assembler, self.config.class_chunk)
        self.to(clip.logit_scale.device)

    @classmethod
    def examples(cls) -> list[MethodExample]:
        return [
            MethodExample("clip:tiny", {"n_ctx": 4}),
            MethodExample(
                "clip:tiny", {"ctx_init": "a photo of a", "class_token_position": "middle"}
            ),
            MethodExample(
                "clip:tiny", {"class_specific": True, "n_ctx": 2, "class_token_position": "front"}
            ),
        ]

    def text_features(self) -> torch.Tensor:
        """C x D unit-norm class text features of the current context (computed once per
        context value outside training)."""
        return self._text(self.ctx, training=self.training)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W pixels → B x D unit-norm image features (frozen)."""
        return unit_image_features(self.backbone, pixels)

    def forward_features(self, features: torch.Tensor) -> MethodOutput:
        """B x D unit-norm image features → B x C logits."""
        return MethodOutput(logits=clip_logits(self.backbone, features, self.text_features()))

    def input_transform(self, train: bool) -> Callable[[Image.Image], torch.Tensor]:
        return clip_input_transform(self.backbone, train and self.config.augment)

    def retarget(
        self,
        classnames: Sequence[str],
        *,
        templates: Sequence[str] | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> Any:
        """The learned context applied to other class names (new classes, other datasets).

        Raises:
            ConfigError: The context is class-specific, so it has nothing for unseen classes.
        """
        refuse_class_specific(self.name, self.config)
        return super().retarget(classnames, templates=templates, settings=settings)

    def extra_repr(self) -> str:
        return (
            f"backbone={self.backbone.name}, classes={len(self.classnames)}, "
            f"n_ctx={self.config.n_ctx}, class_specific={self.config.class_specific}"
        )
