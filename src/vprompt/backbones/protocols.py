"""The small protocols methods program against; adapters in this package implement them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch
from PIL import Image
from torch import nn

from vprompt.backbones.preprocess import Preprocess


@runtime_checkable
class Backbone(Protocol):
    """What every frozen backbone carries, whatever its family."""

    name: str
    """Registered ``family:arch`` name."""
    weights: str
    """Weight source it was built from (tag, ``hf-hub:…``, path, or ``none``)."""
    preprocess: Preprocess

    @property
    def transform(self) -> Callable[[Image.Image], torch.Tensor]: ...

    def fingerprint(self) -> str: ...


@runtime_checkable
class ImageTextBackbone(Backbone, Protocol):
    """A CLIP-like dual encoder; the seam every text-prompt method uses.

    Shapes: B images, T texts, L tokens, W text width, D joint embedding size.
    """

    embed_dim: int
    context_length: int
    text_width: int

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W preprocessed pixels → B x D image features (not normalized)."""
        ...

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """T strings → T x context_length token ids."""
        ...

    def eot_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """T x L token ids → T positions whose feature is pooled (the end-of-text token)."""
        ...

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """T x L token ids → T x L x W token embeddings (no positional embedding)."""
        ...

    def encode_text_embeddings(
        self, embeddings: torch.Tensor, eot_index: torch.Tensor
    ) -> torch.Tensor:
        """T x L x W token embeddings + T pooled positions → T x D text features."""
        ...

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """T x L token ids → T x D text features (not normalized)."""
        ...

    @property
    def logit_scale(self) -> torch.Tensor:
        """The learned temperature, already exponentiated (scalar)."""
        ...

    @property
    def vision_blocks(self) -> nn.ModuleList:
        """The vision tower's transformer blocks, in order (for deep visual prompts)."""
        ...
