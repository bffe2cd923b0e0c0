"""Visual Prompt Tuning (VPT; Jia et al., ECCV 2022): learned tokens inside a frozen ViT.

VPT-shallow inserts ``num_tokens`` learned tokens after the prefix (class) tokens of the
sequence that enters the first block; their outputs then flow through every later block.
VPT-deep gives each block its own fresh tokens: before block ``i >= 1`` the previous block's
outputs at the prompt positions ``[P : P + n]`` are replaced by block ``i``'s tokens. In both
the prompt positions are dropped after the last block, so the backbone's own pooling (class
token, average of patch tokens, …) sees exactly the original tokens. Prompts enter where the
backbone's token seam hands the sequence to block 0 (after position embeddings and any
pre-norm such as CLIP's ``ln_pre``), as the paper's code inserts them after its embeddings.

Size: the prompt is ``n x D`` (shallow) or ``depth x n x D`` (deep). For ViT-B/16 (D = 768,
12 blocks, 86.6M parameters) 10 shallow tokens are 7,680 parameters (0.009%) and 10 deep
tokens 92,160 (0.11%); a linear head adds ``(F + 1) x C`` (76,900 for 100 classes on F = 768).
See :func:`prompt_parameter_count`.

Reference implementation consulted for details: github.com/KMnP/vpt
(``src/models/vit_prompt/vit.py``, ``configs/base-prompt.yaml``, ``tune_fgvc.py``, ``demo.ipynb``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vprompt.backbones.protocols import ImageTextBackbone, TokenBackbone
from vprompt.errors import ConfigError
from vprompt.methods.base import (
    Capabilities,
    MethodExample,
    MethodOutput,
    PromptMethod,
    ValueImage,
)
from vprompt.methods.config import OptimConfig
from vprompt.methods.registry import register_method

PromptInit = Literal["xavier", "normal", "zeros"]
HeadChoice = Literal["auto", "linear", "text"]
_NORMAL_STD = 0.02  # timm's std for ViT class / position tokens
MAX_TOKENS = 1024
"""Most prompt tokens per layer a config may ask for (the VPT paper goes up to 200)."""


def _paper_optim() -> OptimConfig:
    # KMnP/vpt configs/base-prompt.yaml: SGD, momentum 0.9, weight decay 1e-4, 10 warmup of 100
    # epochs, cosine, batch 128. The learning rate is the paper's grid value 1.0 (the one its
    # demo runs use) scaled by batch / 256 as in tune_fgvc.py.
    return OptimConfig(
        optimizer="sgd",
        lr=0.5,
        momentum=0.9,
        weight_decay=1e-4,
        epochs=100,
        warmup_epochs=10,
        batch_size=128,
    )


@dataclass(frozen=True)
class VPTConfig:
    """Learned tokens inside a frozen ViT; defaults follow the paper's official code.

    Attributes:
        num_tokens: Prompt tokens per prompted layer (0: none, i.e. the frozen model + head).
        deep: VPT-deep (a fresh token set before every block) instead of VPT-shallow (first
            block only).
        dropout: Dropout on the prompt tokens during training (the official demo uses 0.1 for
            VPT-deep; it notes 0.0 for VPT-shallow).
        init: ``xavier``: uniform(-v, v) with v = sqrt(6 / (3 * patch**2 + D)), Xavier over the
            patch-embedding fan-in as in the paper's code; ``normal``: N(0, 0.02²); ``zeros``.
        head: ``auto`` (``text`` for CLIP backbones, ``linear`` for classifiers); ``text``:
            logit scale x cosine similarity to class embeddings built from ``templates``;
            ``linear``: a new Linear(F, C) trained with the prompts (as in the paper), on the
            pooled features (unit-norm for CLIP, like ``linear-probe``).
        templates: Text templates for CLIP's class embeddings.
        augment: Random horizontal flips during training.
        seed: Seed of the prompt and head initialization.
        optim: Optimizer and schedule. The defaults are the paper's for a linear head on a
            supervised ViT; CLIP's text head (logit scale 100) usually wants a far lower rate.
    """

    num_tokens: int = 10
    deep: bool = False
    dropout: float = 0.1
    init: PromptInit = "xavier"
    head: HeadChoice = "auto"
    templates: tuple[str, ...] = ("a photo of a {}.",)
    augment: bool = True
    seed: int = 0
    optim: OptimConfig = field(default_factory=_paper_optim)

    def __post_init__(self) -> None:
        if (
            isinstance(self.num_tokens, bool)
            or not isinstance(self.num_tokens, int)
            or not 0 <= self.num_tokens <= MAX_TOKENS
        ):
            raise ConfigError(
                f"num_tokens must be an integer from 0 to {MAX_TOKENS}, got {self.num_tokens!r}"
            )
        if not isinstance(self.deep, bool):
            raise ConfigError(f"deep must be true or false, got {self.deep!r}")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, int | float)
            or not 0 <= self.dropout < 1
        ):
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in ("xavier", "normal", "zeros"):
            raise ConfigError(f"init must be xavier, normal or zeros, got {self.init!r}")
        if self.head not in ("auto", "linear", "text"):
            raise ConfigError(f"head must be auto, linear or text, got {self.head!r}")
        if not self.templates:
            raise ConfigError("templates must hold at least one template")
        for t in self.templates:
            if not isinstance(t, str) or t.count("{}") != 1:
                raise ConfigError(f"template {t!r} must contain exactly one '{{}}'")


def prompt_parameter_count(*, num_tokens: int, width: int, depth: int, deep: bool) -> int:
    """Learned prompt values of VPT on a ViT of ``depth`` blocks and token width ``width``."""
    return num_tokens * width * (depth if deep else 1)


def _resolve(config: VPTConfig, backbone: Any) -> VPTConfig:
    """Check the backbone is a ViT and turn ``head=auto`` into a concrete head for packs."""
    name = getattr(backbone, "name", type(backbone).__name__)
    if not (isinstance(backbone, TokenBackbone) and getattr(backbone, "is_vit", True)):
        raise ConfigError(
            f"vpt inserts tokens between transformer blocks, so it needs a vision transformer; "
            f"{name} is not one "
            "(try timm:vit_base_patch16_224, torchvision:vit_b_16 or clip:ViT-B-16)"
        )
    is_text = isinstance(backbone, ImageTextBackbone)
    head = config.head
    if head == "auto":
        head = "text" if is_text else "linear"
    if head == "text" and not is_text:
        raise ConfigError(f"head=text needs a CLIP-like backbone, {name} is a classifier")
    return dataclasses.replace(config, head=head)


def _patch_size(backbone: Any) -> int:
    """The side of one patch, from how many patch tokens an input of the expected size makes."""
    h, w = (int(s) for s in backbone.preprocess.size)
    device = next(backbone.parameters()).device
    with torch.no_grad():
        tokens = backbone.vision_tokens(torch.zeros(1, 3, h, w, device=device))
    num_patches = tokens.shape[1] - int(backbone.num_prefix_tokens)
    return max(1, round(math.sqrt(h * w / max(1, num_patches))))


@register_method("vpt")
class VPT(PromptMethod):
    """Visual Prompt Tuning: learned tokens in a frozen ViT, read out by a linear or text head.

    Shapes: B images, P prefix tokens, n = ``num_tokens``, N patch tokens, D token width,
    F pooled features, C classes.

    Args:
        backbone: Frozen ViT: a timm / torchvision ViT classifier or a ViT CLIP
            (:class:`~vprompt.backbones.protocols.TokenBackbone`).
        classnames: Target classes in label order.
        config: See :class:`VPTConfig`.
    """

    Config = VPTConfig
    # CLIP's text head is built from ``templates``.
    capabilities = Capabilities(inputs="images", template_field="templates")
    state_hint = "(layers x tokens x width)"

    def __init__(
        self, backbone: Any, classnames: Sequence[str], config: VPTConfig | None = None
    ) -> None:
        super().__init__(backbone, classnames, config)
        self.config = cfg = _resolve(self.config, backbone)
        self.num_prefix_tokens = int(backbone.num_prefix_tokens)
        self._is_clip = isinstance(backbone, ImageTextBackbone)
        width = int(backbone.vision_width)
        depth = len(backbone.vision_blocks)
        self.dropout = nn.Dropout(cfg.dropout)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.prompts: nn.Parameter | None = None
            if cfg.num_tokens > 0:
                layers = depth if cfg.deep else 1
                prompts = torch.zeros(layers, cfg.num_tokens, width)  # layers x n x D
                if cfg.init == "xavier":
                    bound = math.sqrt(6.0 / (3 * _patch_size(backbone) ** 2 + width))
                    prompts.uniform_(-bound, bound)
                elif cfg.init == "normal":
                    prompts.normal_(0.0, _NORMAL_STD)
                self.prompts = nn.Parameter(prompts)
            self.head: nn.Linear | None = None
            if cfg.head == "linear":
                self.head = nn.Linear(self._feature_dim(), len(self.classnames))
        if cfg.head == "text":
            from vprompt.methods.zeroshot import encode_class_prompts

            prompts_text = [[t.format(c) for t in cfg.templates] for c in self.classnames]
            self.register_buffer(
                "class_embeddings", encode_class_prompts(backbone, prompts_text), persistent=False
            )
        self.to(self._backbone_device())

    @classmethod
    def examples(cls) -> list[MethodExample]:
        return [
            MethodExample("timm:tiny-vit", {"num_tokens": 4}),
            MethodExample("timm:tiny-vit", {"num_tokens": 3, "deep": True}),
            MethodExample("clip:tiny", {"num_tokens": 4}),
            MethodExample("clip:tiny", {"num_tokens": 3, "deep": True}),
        ]

    # ------------------------------------------------------------------ engine contract
    @property
    def num_prompt_parameters(self) -> int:
        """Learned prompt values (the head excluded)."""
        return 0 if self.prompts is None else self.prompts.numel()

    def input_transform(self, train: bool) -> Callable[[Image.Image], torch.Tensor]:
        from torchvision import transforms as T

        if not (train and self.config.augment):
            return self.backbone.transform
        return T.Compose([T.RandomHorizontalFlip(), self.backbone.transform])

    def visualizations(self, images: torch.Tensor) -> dict[str, torch.Tensor | ValueImage]:
        """The prompt values as a grey image: one row per token, layer after layer."""
        if self.prompts is None:
            return {}
        tokens = self.prompts.detach().float().cpu().flatten(0, 1)  # (layers * n) x D
        return {"prompt_tokens": ValueImage.stretch(tokens)}

    # ------------------------------------------------------------------ forward
    def layer_prompts(self, layer: int, batch: int, dtype: torch.dtype) -> torch.Tensor | None:
        """B x n x D tokens entering block ``layer`` (after dropout), or None when it has none."""
        if self.prompts is None or layer >= self.prompts.shape[0]:
            return None
        # Expanded before dropout so every image draws its own mask, as in the paper's code.
        return self.dropout(self.prompts[layer].to(dtype).expand(batch, -1, -1))

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W normalized pixels → B x F prompted features (not normalized)."""
        bb = self.backbone
        p, n = self.num_prefix_tokens, self.config.num_tokens
        x = bb.vision_tokens(pixels)  # B x (P + N) x D
        for i, block in enumerate(bb.vision_blocks):
            prompt = self.layer_prompts(i, x.shape[0], x.dtype)
            if prompt is not None:
                # Block 0 gets new positions; later blocks overwrite the previous prompt outputs.
                rest = x[:, p:] if i == 0 else x[:, p + n :]
                x = torch.cat([x[:, :p], prompt, rest], dim=1)  # B x (P + n + N) x D
            x = block(x)
        if n:
            x = torch.cat([x[:, :p], x[:, p + n :]], dim=1)  # B x (P + N) x D
        return bb.pool_vision_tokens(x)

    def forward(self, images: torch.Tensor) -> MethodOutput:
        """B x 3 x H x W images from :meth:`input_transform` → B x C logits."""
        feats = self.features(images).float()
        if self.head is None:
            feats = F.normalize(feats, dim=-1)
            logits = self.backbone.logit_scale.float() * feats @ self.class_embeddings.T
        else:
            if self._is_clip:
                feats = F.normalize(feats, dim=-1)
            logits = self.head(feats)
        return MethodOutput(logits=logits.float())

    # ------------------------------------------------------------------ helpers
    def _feature_dim(self) -> int:
        if self._is_clip:
            return int(self.backbone.embed_dim)
        return int(self.backbone.feature_dim)

    def _backbone_device(self) -> torch.device:
        return next(self.backbone.parameters()).device
