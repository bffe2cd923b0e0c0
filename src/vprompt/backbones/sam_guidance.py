"""PerSAM's target guidance inside a frozen SAM mask decoder, computed as its reference does.

The reference (ZrrSkywalker/Personalize-SAM, ``per_segment_anything/modeling/transformer.py``):

- **target-guided attention**: in every block's token-to-image cross attention the similarity
  map is added to the attention weights *after* the softmax, and the sum goes through a
  softmax again: ``softmax(softmax(q kᵀ / √d) + sim) v``;
- **target-semantic prompting**: the target embedding is added to the queries before every
  block (in place: the tensor is also the queries' positional embedding, so that carries it
  too) and to the query of the final token-to-image attention.

transformers' SAM ports add the similarity *before* the softmax (as an attention mask) and
leave the target embedding out of the final attention. :func:`persam_guidance` fixes both for
the decodes made inside it: the decoder's attention layers run :func:`reference_attention`
(which is plain attention wherever no similarity is given) and a pre-hook adds the target
embedding to the final attention's query. Model calls must not overlap while it is active
(vprompt serialises them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

ATTENTION_NAME = "vprompt_persam_reference"
_registered = False


def reference_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """An attention function for transformers' interface: ``softmax(q kᵀ · scaling)``, then,
    with a similarity map (passed as ``attention_mask``), ``softmax(weights + sim)``.

    Shapes: query B x H x T x d, key and value B x H x N x d, mask broadcastable to
    B x H x T x N; returns (B x T x H x d output, B x H x T x N weights).
    """
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    if attention_mask is not None:
        mixed = weights + attention_mask.to(weights.dtype)
        weights = torch.softmax(mixed, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION_NAME, reference_attention)
        _registered = True


@contextlib.contextmanager
def persam_guidance(model: Any, target_embedding: torch.Tensor | None) -> Iterator[None]:
    """Within: ``model``'s mask decoder applies PerSAM's guidance as the reference does.

    Args:
        model: A transformers SAM-family model (SAM, SAM-HQ, SAM 2: a
            ``mask_decoder.transformer`` with a ``final_attn_token_to_image`` attention).
        target_embedding: The target-semantic prompt (broadcastable to the queries), or None.
    """
    _register()
    transformer = model.mask_decoder.transformer
    configs = {id(m.config): m.config for m in transformer.modules() if _is_attention(m)}
    previous = {key: config._attn_implementation for key, config in configs.items()}
    for config in configs.values():
        config._attn_implementation = ATTENTION_NAME
    handle = None
    if target_embedding is not None:

        def add_target(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            return args, {**kwargs, "query": kwargs["query"] + target_embedding}

        final = transformer.final_attn_token_to_image
        handle = final.register_forward_pre_hook(add_target, with_kwargs=True)
    try:
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation = previous[key]
        if handle is not None:
            handle.remove()


def _is_attention(module: nn.Module) -> bool:
    """The decoder's attention layers: they pick their function by config._attn_implementation."""
    return hasattr(module, "q_proj") and hasattr(
        getattr(module, "config", None), "_attn_implementation"
    )
