"""Learned text context around class names (the CoOp family's prompt learner).

A prompt for class ``c`` is the token sequence ``[SOS] [V]_1 … [V]_M CLASSNAME . [EOT]`` where the
``[V]`` are learned word vectors (the *context*) and everything else is the frozen token
embedding of the hand-written text. :class:`PromptAssembler` tokenizes the class names once,
keeps the frozen prefix / class / suffix embeddings as buffers, and builds the full embedding
sequence for any context tensor — shared (M x W), per class (C x M x W), or per image
(B x M x W, CoCoOp) — ready for the backbone's ``encode_text_embeddings`` seam.

Because CLIP's text encoder is causal and pools at the end-of-text token, everything after the
longest prompt's EOT is cut before the encoder runs (``truncatable`` backbones only); the
result is identical to running the full 77-token context.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vprompt.backbones.protocols import ImageTextBackbone
from vprompt.errors import ConfigError

ClassTokenPosition = Literal["end", "middle", "front"]
PLACEHOLDER = "X"  # the word whose embedding slots the context replaces (as in CoOp)


def init_context(
    backbone: ImageTextBackbone, *, n_ctx: int, init: str, std: float
) -> tuple[torch.Tensor, int]:
    """Initial context vectors: the token embeddings of ``init`` (its word count sets M), or
    N(0, std²) random vectors. Returns (M x W vectors, M)."""
    if init.strip():
        words = init.replace("_", " ").strip()
        tokens = backbone.tokenize([words])
        eot = int(backbone.eot_index(tokens)[0])
        n = eot - 1  # tokens between SOS and EOT
        if n < 1:
            raise ConfigError(f"ctx_init {init!r} has no tokens")
        with torch.no_grad():
            vectors = backbone.embed_tokens(tokens)[0, 1 : 1 + n].float().clone()
        return vectors, n
    if n_ctx < 1:
        raise ConfigError(f"n_ctx must be >= 1, got {n_ctx}")
    width = int(backbone.embed_tokens(backbone.tokenize(["a"]))[0].shape[-1])
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n_ctx, width, generator=gen) * std, n_ctx


class PromptAssembler(nn.Module):
    """Frozen token embeddings around a learned context, for a fixed list of class names.

    Args:
        backbone: The frozen CLIP backbone (tokenizer, token embedding, causal text tower).
        classnames: Class names (underscores already replaced by spaces).
        n_ctx: M, the number of learned context tokens.
        position: Where the class name goes: after (``end``), between the two halves of
            (``middle``), or before (``front``) the context.
        suffix_text: Text after the class name (CoOp: ``"."``).
    """

    token_prefix: torch.Tensor  # C x 1 x W (SOS)
    token_suffix: torch.Tensor  # C x (L - 1 - M) x W (class name, ".", EOT, padding)
    eot: torch.Tensor  # C

    def __init__(
        self,
        backbone: ImageTextBackbone,
        classnames: Sequence[str],
        *,
        n_ctx: int,
        position: ClassTokenPosition = "end",
        suffix_text: str = ".",
    ) -> None:
        super().__init__()
        if position not in ("end", "middle", "front"):
            raise ConfigError(f"class_token_position must be end, middle or front: {position!r}")
        if not classnames:
            raise ConfigError("learned text context needs at least one class name")
        self.position = position
        self.n_ctx = n_ctx
        placeholder = " ".join([PLACEHOLDER] * n_ctx)
        names = [name.replace("_", " ") for name in classnames]
        tokens = backbone.tokenize([f"{placeholder} {name}{suffix_text}" for name in names])
        eot = backbone.eot_index(tokens)  # C
        # Causal tower: nothing after the longest prompt's EOT can change any feature.
        length = int(eot.max()) + 1 if backbone.truncatable else tokens.shape[1]
        with torch.no_grad():
            emb = backbone.embed_tokens(tokens[:, :length]).float()  # C x L x W
        self.name_lens = [int(n) - 1 for n in backbone.eot_index(backbone.tokenize(names))]
        self.register_buffer("token_prefix", emb[:, :1].clone(), persistent=False)
        self.register_buffer("token_suffix", emb[:, 1 + n_ctx :].clone(), persistent=False)
        self.register_buffer("eot", eot.clone(), persistent=False)
        self.min_eot = int(eot.min())  # read once, so no step waits on the device for it

    @property
    def num_classes(self) -> int:
        return int(self.token_prefix.shape[0])

    def forward(self, ctx: torch.Tensor, classes: slice | None = None) -> torch.Tensor:
        """Prompt embeddings for a context.

        Args:
            ctx: M x W (shared) or C' x M x W (one context per selected class).
            classes: Only these classes (chunking); default all.

        Returns:
            C' x L x W prompt embeddings (EOT positions: :meth:`eot_positions`).
        """
        sel = classes or slice(0, self.num_classes)
        prefix, suffix = self.token_prefix[sel], self.token_suffix[sel]
        c = prefix.shape[0]
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(c, -1, -1)
        elif ctx.shape[0] != c:
            raise ValueError(f"context for {ctx.shape[0]} prompts, expected {c}")
        ctx = ctx.to(prefix.dtype)
        if self.position == "end":
            return torch.cat([prefix, ctx, suffix], dim=1)
        half = self.n_ctx // 2
        rows = []
        for i, n in enumerate(self.name_lens[sel]):
            name, rest = suffix[i, :n], suffix[i, n:]
            if self.position == "middle":
                parts = [prefix[i], ctx[i, :half], name, ctx[i, half:], rest]
            else:
                parts = [prefix[i], name, ctx[i], rest]
            rows.append(torch.cat(parts, dim=0))
        return torch.stack(rows)

    @property
    def shared_prefix_len(self) -> int:
        """P: leading tokens that are the same in every prompt when the context is shared
        (SOS and the context before the class name)."""
        if self.position == "end":
            return 1 + self.n_ctx
        if self.position == "middle":
            return 1 + self.n_ctx // 2
        return 1

    def eot_positions(self, classes: slice | None = None) -> torch.Tensor:
        """EOT position of each prompt (the class-token position does not move it)."""
        return self.eot[classes or slice(0, self.num_classes)]


def encode_prompts(
    backbone: ImageTextBackbone,
    assembler: PromptAssembler,
    ctx: torch.Tensor,
    *,
    chunk: int | None = None,
    checkpointed: bool = False,
    share_prefix: bool = True,
) -> torch.Tensor:
    """C x D unit-norm text features for a shared or class-specific context.

    Args:
        chunk: Classes per text-encoder call (bounds activation memory for 1000 classes).
        checkpointed: Recompute each chunk's activations in the backward pass instead of
            keeping them (with ``chunk``, memory then grows with the chunk, not the classes).
        share_prefix: With a shared context and a causal text tower, run the tokens every
            prompt starts with (SOS and the context before the class name) once per call
            instead of once per class (:mod:`vprompt.backbones.text_prefix`; same features up
            to float rounding).
    """
    total = assembler.num_classes
    step = chunk or total
    prefix_len = assembler.shared_prefix_len
    shared = (
        share_prefix
        and ctx.dim() == 2
        and prefix_len > 1
        and getattr(backbone, "shares_text_prefix", False)
        and assembler.min_eot >= prefix_len  # the pooled token follows the prefix
    )
    feats = []
    for start in range(0, total, step):
        sel = slice(start, min(start + step, total))
        part_ctx = ctx if ctx.dim() == 2 else ctx[sel]

        def run(c: torch.Tensor, sel: slice = sel) -> torch.Tensor:
            emb = assembler(c, sel)
            eot = assembler.eot_positions(sel)
            if shared:
                return backbone.encode_text_shared_prefix(  # type: ignore[attr-defined]
                    emb[0, :prefix_len], emb[:, prefix_len:], eot
                )
            return backbone.encode_text_embeddings(emb, eot)

        if checkpointed and torch.is_grad_enabled():
            out = checkpoint(run, part_ctx, use_reentrant=False)
        else:
            out = run(part_ctx)
        feats.append(out.float())
    return F.normalize(torch.cat(feats), dim=-1)


def learned_context(
    backbone: ImageTextBackbone, classnames: Sequence[str], config: Any
) -> tuple[nn.Parameter, PromptAssembler, Any]:
    """CoOp's learned context for a config with ``n_ctx``, ``ctx_init``, ``class_specific``,
    ``class_token_position`` and ``init_std``.

    Returns:
        The context parameter (M x W shared, or C x M x W class-specific; fp32 even under bf16
        autocast), the assembler of the class prompts around it, and ``config`` with
        ``n_ctx`` = M (the ``ctx_init`` phrase's token count when it is given).
    """
    vectors, m = init_context(
        backbone, n_ctx=config.n_ctx, init=config.ctx_init, std=config.init_std
    )
    if config.class_specific:
        if config.ctx_init.strip():
            vectors = vectors.unsqueeze(0).repeat(len(classnames), 1, 1)
        else:
            gen = torch.Generator().manual_seed(0)
            shape = (len(classnames), m, vectors.shape[-1])
            vectors = torch.randn(shape, generator=gen) * config.init_std
    assembler = PromptAssembler(backbone, classnames, n_ctx=m, position=config.class_token_position)
    return nn.Parameter(vectors.float()), assembler, dataclasses.replace(config, n_ctx=m)


class ContextTextFeatures:
    """The class text features of a learned context through ``assembler`` (``chunk`` classes
    per text-encoder call, checkpointed), computed once per context value while nothing trains
    (eval mode, no grad), so inference costs what zero-shot costs."""

    def __init__(
        self, backbone: ImageTextBackbone, assembler: PromptAssembler, chunk: int | None
    ) -> None:
        self.backbone, self.assembler, self.chunk = backbone, assembler, chunk
        self._key: tuple[int, int, str] | None = None
        self._value: torch.Tensor | None = None

    def __call__(self, ctx: torch.Tensor, *, training: bool) -> torch.Tensor:
        """C x D unit-norm features of ``ctx``."""
        if training or torch.is_grad_enabled():
            return self._compute(ctx)
        # In-place updates bump _version; .to()/load replace the storage (data_ptr).
        key = (ctx._version, ctx.data_ptr(), str(ctx.device))
        if self._value is None or self._key != key:
            self._key, self._value = key, self._compute(ctx)
        return self._value

    def _compute(self, ctx: torch.Tensor) -> torch.Tensor:
        chunk = self.chunk
        return encode_prompts(
            self.backbone, self.assembler, ctx, chunk=chunk, checkpointed=chunk is not None
        )


def refuse_class_specific(method: str, config: Any) -> None:
    """Refuse to move a class-specific context to other classes (it has no vectors for them).

    Raises:
        ConfigError: ``config.class_specific`` is set.
    """
    if config.class_specific:
        raise ConfigError(
            f"a class-specific {method} context has no vectors for unseen classes; "
            "train with class_specific=false to transfer"
        )
