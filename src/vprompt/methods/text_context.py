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
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vprompt.backbones.protocols import ImageTextBackbone
from vprompt.errors import ConfigError

ClassTokenPosition = Literal["end", "middle", "front"]
PLACEHOLDER = "X"  # the word whose embedding slots the context replaces (as in CoOp)


@dataclass(frozen=True)
class ContextInit:
    """How a learned context starts.

    Attributes:
        vectors: M x W initial vectors (G x M x W for one context per group).
        prompt_prefix: The text tokenized at the context positions when the class prompts
            are built (``"X X … X"``, or the init phrase): its tokens after the first M stay
            frozen in every prompt, between the context and the class name.
    """

    vectors: torch.Tensor
    prompt_prefix: str

    @property
    def n_ctx(self) -> int:
        return int(self.vectors.shape[-2])


def check_n_ctx(backbone: ImageTextBackbone, n_ctx: int) -> None:
    """Refuse a context length below 1 or beyond the text tower's context (start and end
    tokens included), before anything of that size is allocated."""
    if n_ctx < 1:
        raise ConfigError(f"n_ctx must be >= 1, got {n_ctx}")
    if n_ctx + 2 > backbone.context_length:
        raise ConfigError(
            f"n_ctx {n_ctx} does not fit {backbone.name}'s text context of "
            f"{backbone.context_length} tokens (at most {backbone.context_length - 2})"
        )


def init_context(
    backbone: ImageTextBackbone, *, n_ctx: int, init: str, std: float, groups: int | None = None
) -> ContextInit:
    """The CoOp family's initial context, as its reference PromptLearners make it.

    With an ``init`` phrase (underscores read as spaces) its *word* count sets M
    (``len(init.split(" "))``) and the context starts as the embeddings of its first M tokens;
    a phrase with more tokens than words (``close-up``, ``pet,``) keeps the rest frozen after
    the context (the phrase is the prompt prefix). Without one, M = ``n_ctx`` vectors are drawn
    with ``nn.init.normal_(std)`` from the global generator (seeded by the run), one set per
    group when ``groups`` is given (class-specific contexts).
    """
    if init.strip():
        phrase = init.replace("_", " ")
        m = len(phrase.split(" "))
        with torch.no_grad():
            embedded = backbone.embed_tokens(backbone.tokenize([phrase]))[0]
        return ContextInit(embedded[1 : 1 + m].float().clone(), phrase)
    check_n_ctx(backbone, n_ctx)
    shape = (n_ctx, int(backbone.text_width))
    vectors = torch.empty((groups, *shape) if groups is not None else shape)
    nn.init.normal_(vectors, std=std)
    return ContextInit(vectors, " ".join([PLACEHOLDER] * n_ctx))


class PromptAssembler(nn.Module):
    """Frozen token embeddings around a learned context, for a fixed list of class names.

    Args:
        backbone: The frozen CLIP backbone (tokenizer, token embedding, causal text tower).
        classnames: Class names (underscores already replaced by spaces).
        n_ctx: M, the number of learned context tokens.
        position: Where the class name goes: after (``end``), between the two halves of
            (``middle``), or before (``front``) the context.
        suffix_text: Text after the class name (CoOp: ``"."``).
        prompt_prefix: The text at the context positions when the prompts are tokenized
            (``"X X … X"`` by default; an init phrase whose tokens beyond M stay frozen).
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
        prompt_prefix: str | None = None,
    ) -> None:
        super().__init__()
        if position not in ("end", "middle", "front"):
            raise ConfigError(f"class_token_position must be end, middle or front: {position!r}")
        if not classnames:
            raise ConfigError("learned text context needs at least one class name")
        self.position = position
        self.n_ctx = n_ctx
        placeholder = (
            prompt_prefix if prompt_prefix is not None else " ".join([PLACEHOLDER] * n_ctx)
        )
        names = [name.replace("_", " ") for name in classnames]
        self.name_lens = [int(n) - 1 for n in backbone.eot_index(backbone.tokenize(names))]
        _check_prompt_length(backbone, placeholder, suffix_text, names, self.name_lens)
        tokens = backbone.tokenize([f"{placeholder} {name}{suffix_text}" for name in names])
        eot = backbone.eot_index(tokens)  # C
        # Causal tower: nothing after the longest prompt's EOT can change any feature.
        length = int(eot.max()) + 1 if backbone.truncatable else tokens.shape[1]
        with torch.no_grad():
            emb = backbone.embed_tokens(tokens[:, :length]).float()  # C x L x W
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


def _check_prompt_length(
    backbone: ImageTextBackbone,
    placeholder: str,
    suffix_text: str,
    names: Sequence[str],
    name_lens: Sequence[int],
) -> None:
    """Refuse prompts longer than the text context (the tokenizer would cut them silently;
    the reference's ``clip.tokenize`` raises)."""
    pieces = [placeholder, suffix_text] if suffix_text else [placeholder]
    counts = [int(n) - 1 for n in backbone.eot_index(backbone.tokenize(pieces))]
    fixed = 2 + sum(counts)  # start and end tokens, the context phrase, the suffix
    longest = max(range(len(names)), key=lambda i: name_lens[i])
    if fixed + name_lens[longest] > backbone.context_length:
        raise ConfigError(
            f"the prompt for class {names[longest]!r} needs {fixed + name_lens[longest]} "
            f"tokens, more than {backbone.name}'s text context of {backbone.context_length} "
            "(shorten n_ctx, ctx_init or the class name)"
        )


def encode_prompts(
    backbone: ImageTextBackbone,
    assembler: PromptAssembler,
    ctx: torch.Tensor,
    *,
    chunk: int | None = None,
    checkpointed: bool = False,
    share_prefix: bool = True,
    deep: Sequence[torch.Tensor] = (),
    normalize: bool = True,
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
        deep: Deep text prompts (IVLP, MaPLe): ``deep[k]`` (M x W) replaces the context
            positions entering text block ``k + 1`` (class name at the end only).
        normalize: False returns the features before L2 normalisation (for adapters).
    """
    if deep and assembler.position != "end":
        raise ConfigError("deep text prompts need the class name at the end of the prompt")
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
            if shared and deep:
                return backbone.encode_text_shared_prefix(  # type: ignore[attr-defined]
                    emb[0, :prefix_len], emb[:, prefix_len:], eot, deep=deep
                )
            if shared:
                return backbone.encode_text_shared_prefix(  # type: ignore[attr-defined]
                    emb[0, :prefix_len], emb[:, prefix_len:], eot
                )
            if deep:
                return backbone.encode_text_embeddings(emb, eot, deep=deep)  # type: ignore[call-arg]
            return backbone.encode_text_embeddings(emb, eot)

        if checkpointed and torch.is_grad_enabled():
            out = checkpoint(run, part_ctx, use_reentrant=False)
        else:
            out = run(part_ctx)
        feats.append(out.float())
    joined = torch.cat(feats)
    return F.normalize(joined, dim=-1) if normalize else joined


def learned_context(
    backbone: ImageTextBackbone,
    classnames: Sequence[str],
    config: Any,
    start: ContextInit | None = None,
) -> tuple[nn.Parameter, PromptAssembler, Any]:
    """CoOp's learned context for a config with ``n_ctx``, ``ctx_init``, ``class_specific``,
    ``class_token_position`` and ``init_std`` (:func:`init_context`, or ``start``).

    As in the reference, a class-specific context exists only without an init phrase (or a
    ``start``): with one, every class shares the context initialised from it.

    Returns:
        The context parameter (M x W shared, or C x M x W class-specific; fp32 even under bf16
        autocast), the assembler of the class prompts around it, and ``config`` as it was
        applied (``n_ctx`` = M, ``class_specific`` false when an init phrase made it shared).
    """
    specific = bool(config.class_specific) and not config.ctx_init.strip() and start is None
    if start is None:
        start = init_context(
            backbone,
            n_ctx=config.n_ctx,
            init=config.ctx_init,
            std=config.init_std,
            groups=len(classnames) if specific else None,
        )
    m = start.n_ctx
    assembler = PromptAssembler(
        backbone,
        classnames,
        n_ctx=m,
        position=config.class_token_position,
        prompt_prefix=start.prompt_prefix,
    )
    applied = dataclasses.replace(config, n_ctx=m, class_specific=specific)
    return nn.Parameter(start.vectors.float()), assembler, applied


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
