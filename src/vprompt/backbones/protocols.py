"""The small protocols methods program against; adapters in this package implement them."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image
from torch import nn

from vprompt.backbones.preprocess import Preprocess
from vprompt.errors import WeightsError
from vprompt.prompts.resize import ResizeLongestSide
from vprompt.prompts.spatial import PromptArrays


class NotAViTError(WeightsError, AttributeError):
    """Token access asked of a backbone whose vision tower is not a ViT (a CNN, a ResNet CLIP).

    Also an ``AttributeError`` so that ``hasattr`` — and so ``isinstance(b, TokenBackbone)`` —
    answers False for such backbones instead of raising.
    """


@runtime_checkable
class FrozenModel(Protocol):
    """What :func:`~vprompt.backbones.registry.load_backbone` returns, whatever the family: a
    frozen ``nn.Module`` (eval mode, ``requires_grad=False``) that knows its provenance.

    Narrow it with ``isinstance`` to :class:`Backbone` (classifiers and CLIP),
    :class:`ImageTextBackbone`, :class:`TokenBackbone` or :class:`PromptableSegmenter` for
    what a family offers.
    """

    name: str
    """Registered ``family:arch`` name."""
    weights: str
    """Weight source it was built from (tag, ``hf-hub:…``, path, or ``none``)."""

    def fingerprint(self) -> str: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]: ...

    def to(self, *args: Any, **kwargs: Any) -> Any: ...

    def eval(self) -> Any: ...


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
    def truncatable(self) -> bool:
        """Whether token sequences may be cut after the longest prompt's pooled token without
        changing any text feature (causal tower pooled at the end-of-text token)."""
        ...

    @property
    def logit_scale(self) -> torch.Tensor:
        """The learned temperature, already exponentiated (scalar)."""
        ...

    @property
    def vision_blocks(self) -> nn.ModuleList:
        """The vision tower's transformer blocks, in order (for deep visual prompts)."""
        ...


@runtime_checkable
class DeepPromptBackbone(ImageTextBackbone, Protocol):
    """A CLIP-like dual encoder whose two towers take deep prompts (IVLP, MaPLe, PromptSRC …).

    Shapes: B images, T texts, L tokens, n prompt tokens, W text width, D vision width.
    """

    text_width: int

    @property
    def text_layers(self) -> int:
        """Blocks of the text tower."""
        ...

    @property
    def vision_width(self) -> int:
        """D, the vision tower's token width."""
        ...

    def encode_text_embeddings(
        self,
        embeddings: torch.Tensor,
        eot_index: torch.Tensor,
        deep: Sequence[torch.Tensor] = (),
        deep_start: int = 1,
    ) -> torch.Tensor:
        """T x L x W token embeddings + T pooled positions → T x E text features; ``deep[k]``
        (n x W) replaces positions ``deep_start …`` entering text block ``k + 1``."""
        ...

    def encode_image_prompted(
        self, images: torch.Tensor, prompts: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """B x 3 x H x W → B x E image features; ``prompts[0]`` (n x D) is appended to the
        tokens entering block 0, ``prompts[k]`` replaces them before block ``k``."""
        ...


@runtime_checkable
class TokenBackbone(Protocol):
    """A ViT vision tower opened up token by token: the seam visual prompt tuning (VPT) uses.

    ``pool_vision_tokens(run(vision_blocks, vision_tokens(x)))`` equals the model's own image
    features exactly, where ``run`` applies the blocks in order. Shapes: B images, P prefix
    tokens (class / register tokens), N patch tokens, D = ``vision_width``, F pooled features.
    Backbones whose tower is not a ViT have ``is_vit = False`` and raise :class:`NotAViTError`
    from every member below.
    """

    is_vit: bool

    @property
    def num_prefix_tokens(self) -> int:
        """P: tokens before the patch tokens (1 for a class token)."""
        ...

    @property
    def vision_width(self) -> int:
        """D: the token width inside the blocks."""
        ...

    def vision_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W normalized pixels → B x (P + N) x D, exactly what enters block 0."""
        ...

    @property
    def vision_blocks(self) -> nn.ModuleList | nn.Sequential:
        """The transformer blocks in order; each maps B x L x D → B x L x D (batch first)."""
        ...

    def pool_vision_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """B x L x D tokens after the last block → B x F features (final norm, pooling, …)."""
        ...


@runtime_checkable
class PromptableSegmenter(Protocol):
    """A SAM-like segmenter: embed an image once, decode many prompts against it.

    Shapes: B objects, K masks per object, S the input side, L = S / 4 the low-res side.
    Coordinates enter through ``frame`` (:mod:`vprompt.prompts.resize`), nowhere else.
    """

    name: str
    weights: str
    frame: ResizeLongestSide

    def fingerprint(self) -> str: ...

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB images → B x 3 x S x S pixels, as the model's processor prepares them."""
        ...

    def embed(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pixels → named embedding tensors, batch first."""
        ...

    def decode(
        self, parts: dict[str, torch.Tensor], arrays: PromptArrays, *, multimask: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's embeddings + B objects' model-frame prompts → (B x K x L x L logits,
        B x K predicted IoU)."""
        ...
