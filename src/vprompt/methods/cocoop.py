"""CoCoOp: a context conditioned on each image (Zhou et al., CVPR 2022).

A small Meta-Net π maps the image's unit-norm CLIP feature to a shift of the learned context:
image b gets the context ``ctx + π(x_b)`` (B x M x W), the text encoder runs on the prompts of
every class under every image's context (B·C prompts), and ``logits_b = s · f(x_b) · g_b(·)ᵀ``.
There is no class-feature cache: each image needs its own text features, so the B·C prompts go
through the text encoder in micro-batches of at most ``prompt_batch``.

Defaults follow KaiyangZhou/CoOp: ``configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml``
(4 tokens from ``"a photo of a"``, batch 1, SGD lr 0.002, 10 epochs, 1 constant warm-up epoch
at 1e-5, cosine) and ``trainers/cocoop.py`` (Meta-Net ``Linear(D, D // 16) → ReLU →
Linear(D // 16, W)`` on the normalized image features, the class name at the end).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vprompt.backbones.protocols import ImageTextBackbone
from vprompt.errors import ConfigError
from vprompt.methods.base import Capabilities, MethodExample, MethodOutput, PromptMethod
from vprompt.methods.clip_common import (
    CLIP_IMAGE_FEATURES,
    clip_input_transform,
    require_image_text,
    unit_image_features,
)
from vprompt.methods.config import OptimConfig
from vprompt.methods.coop import coop_optim
from vprompt.methods.registry import register_method
from vprompt.methods.text_context import PromptAssembler, init_context


@dataclass(frozen=True)
class CoCoOpConfig:
    """CoCoOp's settings; defaults are the reference's base-to-novel setting.

    Attributes:
        n_ctx: M (ignored with ``ctx_init``, whose word count sets it, as in the reference).
        ctx_init: Initialise the context from this phrase's token embeddings; empty for
            N(0, ``init_std``²) random vectors.
        class_token_position: Only ``end`` (the reference has no other).
        init_std: Standard deviation of the random initialisation.
        meta_reduction: The Meta-Net's hidden width is the image feature size divided by this.
        augment: Random resized crop and flip for training, as the reference configs do.
        feature_views: With a feature cache and ``augment``, augmented views encoded once per
            training image; epoch e trains on view e mod N (10 = one per reference epoch).
        prompt_batch: At most this many prompts per text-encoder call (B images x C classes
            are split into micro-batches); bounds memory for large batches or many classes.
        optim: Batch 1, 10 epochs, Dassl's CoOp optimizer and schedule.
    """

    n_ctx: int = 4
    ctx_init: str = "a photo of a"
    class_token_position: Literal["end"] = "end"
    init_std: float = 0.02
    meta_reduction: int = 16
    augment: bool = True
    feature_views: int = 10
    prompt_batch: int = 2048
    optim: OptimConfig = field(default_factory=lambda: coop_optim(epochs=10, batch_size=1))

    def __post_init__(self) -> None:
        if self.n_ctx < 1:
            raise ConfigError(f"n_ctx must be >= 1, got {self.n_ctx}")
        if self.class_token_position != "end":
            raise ConfigError(
                "cocoop puts the class name after the context (class_token_position=end); "
                f"got {self.class_token_position!r}"
            )
        if not self.init_std > 0:
            raise ConfigError(f"init_std must be > 0: {self.init_std!r}")
        if not isinstance(self.meta_reduction, int) or self.meta_reduction < 1:
            raise ConfigError(f"meta_reduction must be an integer >= 1: {self.meta_reduction!r}")
        if not isinstance(self.feature_views, int) or self.feature_views < 1:
            raise ConfigError(f"feature_views must be an integer >= 1: {self.feature_views!r}")
        if not isinstance(self.prompt_batch, int) or self.prompt_batch < 1:
            raise ConfigError(f"prompt_batch must be an integer >= 1: {self.prompt_batch!r}")


def build_meta_net(in_dim: int, out_dim: int, reduction: int) -> nn.Sequential:
    """π: ``Linear(D, D // r) → ReLU → Linear(D // r, W)``, PyTorch's default initialisation
    from the global generator (seeded by the run)."""
    hidden = in_dim // reduction
    if hidden < 1:
        raise ConfigError(
            f"meta_reduction={reduction} leaves no hidden units for {in_dim}-dim image features"
        )
    return nn.Sequential(
        OrderedDict(
            [
                ("linear1", nn.Linear(in_dim, hidden)),
                ("relu", nn.ReLU()),
                ("linear2", nn.Linear(hidden, out_dim)),
            ]
        )
    )


def assemble_conditional(
    assembler: PromptAssembler, ctx: torch.Tensor, images: torch.Tensor, classes: torch.Tensor
) -> torch.Tensor:
    """Prompt embeddings ``[SOS] ctx_b CLASSNAME . [EOT]`` for (image, class) pairs.

    Args:
        assembler: Frozen token embeddings of the class names (position ``end``).
        ctx: B x M x W per-image contexts.
        images: N image indices into ``ctx``.
        classes: N class indices.

    Returns:
        N x L x W prompt embeddings (EOT positions: ``assembler.eot[classes]``).
    """
    if assembler.position != "end":
        raise ConfigError("per-image contexts need the class name at the end of the prompt")
    prefix = assembler.token_prefix[classes]  # N x 1 x W
    suffix = assembler.token_suffix[classes]  # N x (L - 1 - M) x W
    return torch.cat([prefix, ctx[images].to(prefix.dtype), suffix], dim=1)


@register_method("cocoop")
class CoCoOp(PromptMethod):
    """Conditional Context Optimization: a shared context shifted by a Meta-Net of the image.

    Learned tensors (the pack): ``ctx`` (M x W) and the Meta-Net's ``meta_net.*`` weights.
    """

    Config = CoCoOpConfig
    capabilities = Capabilities(inputs="image-features", retargets=True)
    feature_kind = CLIP_IMAGE_FEATURES
    state_hint = "(n_ctx, meta_reduction and the backbone must match)"

    def __init__(
        self,
        backbone: ImageTextBackbone,
        classnames: Sequence[str],
        config: CoCoOpConfig | None = None,
    ) -> None:
        super().__init__(backbone, classnames, config)
        clip = require_image_text(backbone, "cocoop")
        cfg = self.config
        start = init_context(clip, n_ctx=cfg.n_ctx, init=cfg.ctx_init, std=cfg.init_std)
        m = start.n_ctx
        self.config = dataclasses.replace(cfg, n_ctx=m)
        self.ctx = nn.Parameter(start.vectors.float())  # M x W, fp32 even under bf16 autocast
        # Drawn after the context from the run's seeded generator, as the reference does.
        self.meta_net = build_meta_net(clip.embed_dim, clip.text_width, cfg.meta_reduction)
        self.assembler = PromptAssembler(
            clip, self.classnames, n_ctx=m, position="end", prompt_prefix=start.prompt_prefix
        )
        self.to(clip.logit_scale.device)

    @classmethod
    def examples(cls) -> list[MethodExample]:
        return [
            MethodExample("clip:tiny"),
            MethodExample("clip:tiny", {"ctx_init": "", "n_ctx": 3, "prompt_batch": 5}),
        ]

    # ------------------------------------------------------------------ prompts
    def conditional_context(self, features: torch.Tensor) -> torch.Tensor:
        """B x D unit-norm image features → B x M x W contexts ``ctx + π(x)``."""
        shift = self.meta_net(features.to(self.ctx.dtype))  # B x W
        return self.ctx.unsqueeze(0) + shift.unsqueeze(1)

    def text_features(self, features: torch.Tensor) -> torch.Tensor:
        """B x D unit-norm image features → B x C x D unit-norm class text features, one set
        per image, at most ``prompt_batch`` prompts per text-encoder call."""
        ctx = self.conditional_context(features)  # B x M x W
        b, c = ctx.shape[0], self.assembler.num_classes
        total, step = b * c, self.config.prompt_batch
        shared = (
            getattr(self.backbone, "shares_text_prefix", False)
            and self.assembler.min_eot >= self.assembler.shared_prefix_len
        )
        feats = []
        for start in range(0, total, step):
            stop = min(start + step, total)
            rows = torch.arange(start, stop, device=ctx.device)
            images, classes = rows // c, rows % c
            eot = self.assembler.eot[classes]
            if shared:
                # Each image's [SOS] + context runs once, not once per class. A chunk's rows
                # are consecutive, so its images are too: first .. last.
                first, last = start // c, (stop - 1) // c
                sos = self.assembler.token_prefix[:1].expand(last - first + 1, -1, -1)
                own = ctx[first : last + 1].to(sos.dtype)
                out = self.backbone.encode_text_shared_prefix(
                    torch.cat([sos, own], dim=1),  # G x (1 + M) x W
                    self.assembler.token_suffix[classes],
                    eot,
                    images - first,
                )
            else:
                emb = assemble_conditional(self.assembler, ctx, images, classes)
                out = self.backbone.encode_text_embeddings(emb, eot)
            feats.append(out.float())
        return F.normalize(torch.cat(feats), dim=-1).view(b, c, -1)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W pixels → B x D unit-norm image features (frozen)."""
        return unit_image_features(self.backbone, pixels)

    def forward_features(self, features: torch.Tensor) -> MethodOutput:
        """B x D unit-norm image features → B x C logits."""
        feats = features.float()
        text = self.text_features(feats)  # B x C x D
        scale = self.backbone.logit_scale.float()
        return MethodOutput(logits=scale * torch.einsum("bd,bcd->bc", feats, text))

    def input_transform(self, train: bool) -> Callable[[Image.Image], torch.Tensor]:
        return clip_input_transform(self.backbone, train and self.config.augment)

    def extra_repr(self) -> str:
        return (
            f"backbone={self.backbone.name}, classes={len(self.classnames)}, "
            f"n_ctx={self.config.n_ctx}, prompt_batch={self.config.prompt_batch}"
        )
