"""CoOp: learned context vectors around each class name (Zhou et al., IJCV 2022).

The image side never changes, so CoOp declares ``input_kind = "image-features"``: with a feature
cache the engine encodes every (augmented) training image once and each step runs only the
text encoder on the learned prompts — cut to the longest real prompt (causal tower) and, for
many classes, in checkpointed chunks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vprompt.backbones.protocols import ImageTextBackbone
from vprompt.errors import ConfigError, PackError
from vprompt.methods.base import (
    InputKind,
    MethodOutput,
    OptimConfig,
    check_state_keys,
    register_method,
)
from vprompt.methods.text_context import (
    ClassTokenPosition,
    PromptAssembler,
    encode_prompts,
    init_context,
)


def coop_optim(epochs: int = 200, batch_size: int = 32) -> OptimConfig:
    """Dassl's CoOp-family optimizer: SGD 0.002, 1 constant-warmup epoch at 1e-5, cosine per
    epoch, weight decay 5e-4."""
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
    )


@dataclass(frozen=True)
class CoOpConfig:
    """CoOp's settings; defaults are the paper's few-shot setting (16 tokens, random init).

    Attributes:
        n_ctx: M, the number of learned context tokens (ignored with ``ctx_init``, whose token
            count sets it).
        ctx_init: Initialise the context from this phrase's token embeddings (e.g. ``"a photo
            of a"``, the base-to-novel setting); empty for N(0, 0.02²) random vectors.
        class_specific: One context per class (CSC) instead of one shared context.
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


def _rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB") if image.mode != "RGB" else image


class TextContextMethod(nn.Module):
    """What CoOp, KgCoOp and ProGrad share: a learned context, frozen image features, the
    cached class text features at inference."""

    is_prompt_method: ClassVar[bool] = True
    input_kind: ClassVar[InputKind] = "image-features"
    feature_kind = "clip-image-embedding-l2"
    name: ClassVar[str]
    config: Any

    def __init__(self, backbone: ImageTextBackbone, classnames: Sequence[str], config: Any) -> None:
        super().__init__()
        if not isinstance(backbone, ImageTextBackbone):
            raise ConfigError(
                f"{type(self).__name__} learns text prompts: it needs a CLIP-like backbone"
            )
        self.backbone = backbone
        self.classnames = list(classnames)
        vectors, m = init_context(
            backbone, n_ctx=config.n_ctx, init=config.ctx_init, std=config.init_std
        )
        self.config = dataclasses.replace(config, n_ctx=m)
        if config.class_specific:
            if config.ctx_init.strip():
                vectors = vectors.unsqueeze(0).repeat(len(self.classnames), 1, 1)
            else:
                gen = torch.Generator().manual_seed(0)
                shape = (len(self.classnames), m, vectors.shape[-1])
                vectors = torch.randn(shape, generator=gen) * config.init_std
        self.ctx = nn.Parameter(vectors.float())  # fp32 even under bf16 autocast
        self.assembler = PromptAssembler(
            backbone, self.classnames, n_ctx=m, position=config.class_token_position
        )
        self._cached: tuple[tuple[int, int, str], torch.Tensor] | None = None
        self.to(backbone.logit_scale.device)

    # ------------------------------------------------------------------ prompts
    def text_features(self) -> torch.Tensor:
        """C x D unit-norm class text features of the current context.

        Outside training (no grad, eval mode) they are computed once per context value and
        reused, so inference costs what zero-shot costs.
        """
        frozen = not self.training and not torch.is_grad_enabled()
        # In-place updates bump _version; .to()/load replace the storage (data_ptr).
        key = (self.ctx._version, self.ctx.data_ptr(), str(self.ctx.device))
        if frozen and self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        chunk = self.config.class_chunk
        feats = encode_prompts(
            self.backbone, self.assembler, self.ctx, chunk=chunk, checkpointed=chunk is not None
        )
        if frozen:
            self._cached = (key, feats)
        return feats

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W pixels → B x D unit-norm image features (frozen)."""
        with torch.no_grad():
            return F.normalize(self.backbone.encode_image(pixels).float(), dim=-1)

    def forward_features(self, features: torch.Tensor) -> MethodOutput:
        """B x D unit-norm image features → B x C logits."""
        text = self.text_features()
        scale = self.backbone.logit_scale.float()
        return MethodOutput(logits=scale * features.float() @ text.T)

    def forward(self, images: torch.Tensor) -> MethodOutput:
        return self.forward_features(self.encode_images(images))

    # ------------------------------------------------------------------ engine protocol
    @property
    def feature_views(self) -> int:
        return int(self.config.feature_views)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.ctx]

    def train(self, mode: bool = True) -> TextContextMethod:
        super().train(mode)
        if isinstance(self.backbone, nn.Module):
            self.backbone.eval()  # frozen: never in training mode
        return self

    def input_transform(self, train: bool) -> Callable[[Image.Image], torch.Tensor]:
        if train and self.config.augment:
            return clip_train_transform(self.backbone)
        return self.backbone.transform

    def before_epoch(self, epoch: int, train_batches: Callable[[], Iterable[Any]]) -> None:
        return None

    def visualizations(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    # ------------------------------------------------------------------ state
    def prompt_state(self) -> dict[str, torch.Tensor]:
        return {"ctx": self.ctx.detach().float().cpu().contiguous()}

    def load_prompt_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        check_state_keys(self.name, {"ctx"}, tensors)
        ctx = tensors["ctx"]
        if ctx.shape != self.ctx.shape:
            raise PackError(
                f"{self.name} context has shape {tuple(ctx.shape)}, expected "
                f"{tuple(self.ctx.shape)} (n_ctx, class-specific context and classes must match)"
            )
        with torch.no_grad():
            self.ctx.copy_(ctx.to(self.ctx.device, self.ctx.dtype))

    @classmethod
    def from_state(
        cls,
        backbone: ImageTextBackbone,
        classnames: Sequence[str],
        config: Any,
        tensors: Mapping[str, torch.Tensor],
    ) -> Any:
        method = cls(backbone, classnames, config)
        method.load_prompt_state(tensors)
        return method

    def retarget(self, classnames: Sequence[str], *, templates: Sequence[str] | None = None) -> Any:
        """The learned context applied to other class names (new classes, other datasets).

        Raises:
            ConfigError: The context is class-specific, so it has nothing for unseen classes.
        """
        if self.config.class_specific:
            raise ConfigError(
                f"a class-specific {self.name} context has no vectors for unseen classes; "
                "train with class_specific=false to transfer"
            )
        config = self._retarget_config(templates)
        other = type(self)(self.backbone, classnames, config)
        other.load_prompt_state(self.prompt_state())
        return other.train(self.training)

    def _retarget_config(self, templates: Sequence[str] | None) -> Any:
        return self.config

    def extra_repr(self) -> str:
        return (
            f"backbone={self.backbone.name}, classes={len(self.classnames)}, "
            f"n_ctx={self.config.n_ctx}, class_specific={self.config.class_specific}"
        )


@register_method("coop")
class CoOp(TextContextMethod):
    """Context Optimization: cross-entropy on the learned prompts' class scores."""

    Config = CoOpConfig

    def __init__(
        self,
        backbone: ImageTextBackbone,
        classnames: Sequence[str],
        config: CoOpConfig | None = None,
    ) -> None:
        super().__init__(backbone, classnames, config or CoOpConfig())
