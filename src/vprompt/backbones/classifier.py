"""Frozen image classifiers (torchvision, timm) behind one adapter: logits, features, ViT tokens.

The families that build these live in ``torchvision_family.py`` and ``timm_family.py``; this
module never imports either library, it only reaches into the model it is given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from PIL import Image
from torch import nn

from vprompt.backbones.fingerprint import weights_fingerprint
from vprompt.backbones.preprocess import Preprocess, build_eval_transform
from vprompt.backbones.protocols import NotAViTError
from vprompt.errors import WeightsError

ClassifierKind = Literal["torchvision", "timm"]
# How a ViT's tokens are laid out: timm's VisionTransformer or torchvision's.
TokenLayout = Literal["timm-vit", "torchvision-vit"]
_VIT_ONLY = frozenset({"num_prefix_tokens", "vision_width", "vision_blocks"})


class ClassifierBackbone(nn.Module):
    """A frozen classifier behind vprompt's :class:`Backbone` and :class:`TokenBackbone` seams.

    Shapes: B images, H x W the preprocess size, K classes, F penultimate features, and for
    ViTs P prefix tokens, N patch tokens, D token width.

    Attributes:
        model: The wrapped torchvision / timm module.
        num_classes: K, the width of the model's own output.
        source_classes: The K class names of the weights (ImageNet names for ImageNet heads,
            else ``class_0`` …).
        mean: (3,) normalization mean, for methods that prompt in [0, 1] pixel space.
        std: (3,) normalization std.
        is_vit: Whether token access (``vision_tokens`` …) is available.
        channels_last: Whether inputs are handed to the model in the channels-last memory
            layout (every model but the token ViTs): convolutions then take the NHWC kernels,
            ~1.4x faster for MobileNetV2 forward + backward on CPU. Only the order in memory
            changes, never a value; the weights keep the standard layout, so their state dict
            saves as it always did.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        *,
        model: nn.Module,
        name: str,
        weights: str,
        preprocess: Preprocess,
        kind: ClassifierKind,
        source_classes: list[str],
        token_layout: TokenLayout | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.weights = weights
        self.preprocess = preprocess
        self.kind = kind
        self.source_classes = list(source_classes)
        self.num_classes = len(self.source_classes)
        self._token_layout = token_layout
        self.is_vit = token_layout is not None
        self.channels_last = not self.is_vit
        self._transform = build_eval_transform(preprocess)
        self._head = _find_head(model, kind, self.num_classes)
        self.register_buffer("mean", torch.tensor(preprocess.mean), persistent=False)
        self.register_buffer("std", torch.tensor(preprocess.std), persistent=False)

    # ------------------------------------------------------------------ Backbone
    @property
    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """PIL image → 3 x H x W normalized tensor, as the weights expect."""
        return self._transform

    def fingerprint(self) -> str:
        """A short hash of the weights, to check that a prompt pack meets the same backbone."""
        return weights_fingerprint(self.model)

    # ------------------------------------------------------------------ logits and features
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W normalized pixels → B x K logits."""
        return self.model(self._layout(pixels))

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W normalized pixels → B x F pooled penultimate features.

        ``head(features(x))`` equals ``forward(x)``.
        """
        pixels = self._layout(pixels)
        if self.kind == "timm":
            m: Any = self.model
            return m.forward_head(m.forward_features(pixels), pre_logits=True)
        head = self.head
        # The head's input is exactly "everything but the final Linear", for every torchvision
        # layout (Sequential classifiers, `fc`, `heads.head` …) without re-implementing forward.
        captured: list[torch.Tensor] = []
        handle = head.register_forward_hook(lambda _m, inp, _out: captured.append(inp[0]))
        try:
            self.model(pixels)
        finally:
            handle.remove()
        return captured[-1]

    def _layout(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.channels_last and pixels.ndim == 4:
            return pixels.contiguous(memory_format=torch.channels_last)
        return pixels

    @property
    def head(self) -> nn.Linear:
        """The final Linear layer, F → K (for linear-probe init or full fine-tuning)."""
        if self._head is None:
            raise WeightsError(
                f"{self.name}: its classifier is not a final Linear layer "
                f"({type(self.model).__name__}); features() and head are unavailable"
            )
        return self._head

    @property
    def feature_dim(self) -> int:
        """F, the width of :meth:`features`."""
        if self.kind == "timm":
            m: Any = self.model
            return int(getattr(m, "head_hidden_size", None) or m.num_features)
        return self.head.in_features

    # ------------------------------------------------------------------ ViT tokens (VPT)
    @property
    def num_prefix_tokens(self) -> int:
        """P: class (+ register / distillation) tokens before the patch tokens."""
        m = self._vit_model()
        return int(m.num_prefix_tokens) if self._token_layout == "timm-vit" else 1

    @property
    def vision_width(self) -> int:
        """D, the token width."""
        m = self._vit_model()
        return int(m.embed_dim) if self._token_layout == "timm-vit" else int(m.hidden_dim)

    def vision_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W normalized pixels → B x (P + N) x D, exactly what enters block 0."""
        m = self._vit_model()
        if self._token_layout == "timm-vit":
            # timm VisionTransformer.forward_features, up to its blocks.
            x = m.patch_embed(pixels)
            x = m._pos_embed(x)
            x = m.patch_drop(x)
            return m.norm_pre(x)
        # torchvision VisionTransformer.forward + Encoder.forward, up to encoder.layers.
        x = m._process_input(pixels)
        x = torch.cat([m.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + m.encoder.pos_embedding
        return m.encoder.dropout(x)

    @property
    def vision_blocks(self) -> nn.Sequential:
        """The transformer blocks in order, each B x L x D → B x L x D."""
        m = self._vit_model()
        return m.blocks if self._token_layout == "timm-vit" else m.encoder.layers

    def pool_vision_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """B x L x D tokens after the last block → B x F, equal to :meth:`features`."""
        m = self._vit_model()
        if self._token_layout == "timm-vit":
            return m.forward_head(m.norm(tokens), pre_logits=True)
        x = m.encoder.ln(tokens)[:, 0]
        for layer in list(m.heads)[:-1]:  # representation layer + tanh when present
            x = layer(x)
        return x

    # ------------------------------------------------------------------ internals
    def _vit_model(self) -> Any:
        if self._token_layout is None:
            raise NotAViTError(
                f"{self.name} is not a vision transformer ({type(self.model).__name__}); "
                "token prompts (VPT) need a ViT such as timm:vit_base_patch16_224, "
                "torchvision:vit_b_16 or clip:ViT-B-16"
            )
        return self.model

    def __getattr__(self, name: str) -> Any:
        # A ViT-only property raised NotAViTError (an AttributeError), so Python fell back to
        # here; raise it again rather than let nn.Module replace it with a bare "no attribute".
        if name in _VIT_ONLY and self.__dict__.get("_token_layout", "") is None:
            self._vit_model()
        return super().__getattr__(name)


def _find_head(model: nn.Module, kind: ClassifierKind, num_classes: int) -> nn.Linear | None:
    """The Linear layer that produces the logits, or None when the classifier is not one."""
    if kind == "timm":
        get = getattr(model, "get_classifier", None)
        head = get() if callable(get) else None
        return head if isinstance(head, nn.Linear) and head.out_features == num_classes else None
    # torchvision classifiers register their final Linear last (fc, classifier[-1], heads.head);
    # auxiliary heads (GoogLeNet, Inception) come earlier.
    found = None
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.out_features == num_classes:
            found = module
    return found


def class_names(num_classes: int, known: list[str] | None) -> list[str]:
    """``known`` when it fits the head, else ``class_0 … class_{K-1}``."""
    if known is not None and len(known) == num_classes:
        return [str(c) for c in known]
    return [f"class_{i}" for i in range(num_classes)]
