"""Text features of many prompts that begin with the same tokens, computing that beginning once.

CoOp-style prompts with one shared context are ``[SOS] [V]_1 … [V]_M NAME . [EOT]``: every class
starts with the same M + 1 tokens. In a causal text tower a token's hidden state depends only on
the tokens before it, so those first P tokens have the same hidden states in every prompt, at
every layer. :func:`encode_shared_prefix` runs the prefix once (1 x P tokens) and only the
suffixes per prompt (T x S tokens), whose queries attend to the prefix's keys and values plus
their own. Several prefixes work the same way (CoCoOp: one context per image, shared by that
image's C class prompts). The features equal the full T x (P + S) forward up to float
rounding; for C classes, a 16-token context and short class names this is ~3x less text-tower
work per training step.

Only open_clip's plain ``ResidualAttentionBlock`` stack (fused ``nn.MultiheadAttention``, no
cross-attention) with a causal mask and no padding mask is handled;
:func:`prefix_sharing_problem` says why a tower is not, and callers then run full prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def prefix_sharing_problem(tower: Any) -> str | None:
    """Why ``tower`` (open_clip text parts) cannot share a prefix, or None when it can."""
    mask = getattr(tower, "attn_mask", None)
    if mask is None:
        return "its text attention is not causal"
    if getattr(tower, "use_pad_mask", False):
        return "its text tower masks padding per prompt"
    blocks = getattr(getattr(tower, "transformer", None), "resblocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        return "its text tower has no resblocks"
    for block in blocks:
        if type(block).__name__ != "ResidualAttentionBlock" or hasattr(block, "ln_1_kv"):
            return f"its text blocks are {type(block).__name__}, not plain self-attention"
        attn = getattr(block, "attn", None)
        if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
            return "its text attention is not a fused nn.MultiheadAttention"
        if attn.bias_k is not None or attn.add_zero_attn or attn.dropout:
            return "its text attention adds bias tokens, zero attention or dropout"
    return None


def check_deep(
    deep: Sequence[torch.Tensor], blocks: int, start: int, length: int, where: str
) -> None:
    """Refuse deep prompts for more blocks than the tower has after its first, or reaching
    past ``length`` tokens (``where`` names them)."""
    if len(deep) > blocks - 1:
        raise ValueError(
            f"{len(deep)} deep prompt layers for a tower of {blocks} blocks (at most {blocks - 1})"
        )
    for tokens in deep:
        if tokens.dim() != 2 or start + tokens.shape[0] > length:
            raise ValueError(
                f"deep prompts of shape {tuple(tokens.shape)} must be n x W and lie inside "
                f"{where} ({length} tokens from position {start})"
            )


def replace_tokens(x: torch.Tensor, tokens: torch.Tensor, start: int) -> torch.Tensor:
    """N x L x W hidden states with positions ``start … start + n - 1`` replaced by the
    n x W ``tokens`` (the same for every row)."""
    n = tokens.shape[0]
    new = tokens.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
    return torch.cat([x[:, :start], new, x[:, start + n :]], dim=1)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """N x L x W → N x heads x L x W/heads."""
    n, length, width = x.shape
    return x.view(n, length, heads, width // heads).transpose(1, 2)


def _block_step(
    block: Any,
    prefix: torch.Tensor,
    suffix: torch.Tensor,
    mask: torch.Tensor,
    group: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ResidualAttentionBlock on the prefixes (G x P x W) and the suffixes (T x S x W);
    suffix t follows prefix ``group[t]`` (the only prefix when ``group`` is None).

    ``mask`` is the tower's (P + S) x (P + S) additive causal mask.
    """
    attn: nn.MultiheadAttention = block.attn
    heads, p = attn.num_heads, prefix.shape[1]
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = (None, None, None) if attn.in_proj_bias is None else attn.in_proj_bias.chunk(3)
    h_pre, h_suf = block.ln_1(prefix), block.ln_1(suffix)
    q_pre, k_pre, v_pre = (
        _heads(F.linear(h_pre, w, b), heads) for w, b in ((w_q, b_q), (w_k, b_k), (w_v, b_v))
    )
    q_suf, k_suf, v_suf = (
        _heads(F.linear(h_suf, w, b), heads) for w, b in ((w_q, b_q), (w_k, b_k), (w_v, b_v))
    )
    t = suffix.shape[0]
    dtype = q_pre.dtype
    # The prefix attends only to itself (causally), exactly as inside every full prompt.
    a_pre = F.scaled_dot_product_attention(q_pre, k_pre, v_pre, attn_mask=mask[:p, :p].to(dtype))
    # Suffix queries see the shared prefix keys and values, then their own, causally.
    if group is None:
        k_pre, v_pre = k_pre.expand(t, -1, -1, -1), v_pre.expand(t, -1, -1, -1)
    else:
        k_pre, v_pre = k_pre[group], v_pre[group]
    keys = torch.cat([k_pre, k_suf], dim=2)
    values = torch.cat([v_pre, v_suf], dim=2)
    a_suf = F.scaled_dot_product_attention(q_suf, keys, values, attn_mask=mask[p:, :].to(dtype))

    def finish(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        a = a.transpose(1, 2).reshape(x.shape)
        x = x + block.ls_1(attn.out_proj(a))
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    return finish(prefix, a_pre), finish(suffix, a_suf)


def encode_shared_prefix(
    tower: Any,
    prefix: torch.Tensor,
    suffix: torch.Tensor,
    eot_index: torch.Tensor,
    *,
    pool_type: str,
    group: torch.Tensor | None = None,
    deep: Sequence[torch.Tensor] = (),
    deep_start: int = 1,
) -> torch.Tensor:
    """Pooled, projected text features of T prompts ``[prefix, suffix[t]]``.

    Args:
        tower: open_clip's text parts (``transformer``, ``positional_embedding``, ``attn_mask``,
            ``ln_final``, ``text_projection``), accepted by :func:`prefix_sharing_problem`.
        prefix: P x W token embeddings every prompt starts with, or G x P x W for G prefixes
            (with ``group``).
        suffix: T x S x W token embeddings after the prefix.
        eot_index: T positions (in the whole prompt, ≥ P) of the pooled token. Checked when
            it lives on the CPU; on an accelerator the check would stall the host until the
            device catches up, so there the caller vouches for it.
        pool_type: ``argmax`` or ``eos`` (pool the EOT token).
        group: T indices into the G prefixes (e.g. CoCoOp: one context per image, C classes
            each); required exactly when ``prefix`` is G x P x W.
        deep: Deep prompts (IVLP / MaPLe): ``deep[k]`` (n x W) replaces the hidden states at
            positions ``deep_start … deep_start + n - 1`` entering block ``k + 1``. They must
            lie inside the prefix (the same for every prompt, so still computed once).
        deep_start: The first replaced position (1: right after the start token).

    Returns:
        T x D features, equal to running the T whole prompts.
    """
    if pool_type not in ("argmax", "eos"):
        raise ValueError(f"prefix sharing pools the EOT token, not {pool_type!r}")
    if (prefix.dim() == 3) != (group is not None):
        raise ValueError("give group exactly when there are several (G x P x W) prefixes")
    p, s = prefix.shape[-2], suffix.shape[1]
    if eot_index.device.type == "cpu" and int(eot_index.min()) < p:
        raise ValueError("every pooled token must lie after the shared prefix")
    cast = tower.transformer.get_cast_dtype()
    pos = tower.positional_embedding[: p + s].to(cast)
    x_pre = prefix.to(cast) + pos[:p]
    if x_pre.dim() == 2:
        x_pre = x_pre.unsqueeze(0)
    x_suf = suffix.to(cast) + pos[p:]
    mask = tower.attn_mask[: p + s, : p + s]
    check_deep(deep, len(tower.transformer.resblocks), deep_start, p, "the shared prefix")
    for i, block in enumerate(tower.transformer.resblocks):
        if 1 <= i <= len(deep):
            x_pre = replace_tokens(x_pre, deep[i - 1], deep_start)
        x_pre, x_suf = _block_step(block, x_pre, x_suf, mask, group)
    rows = torch.arange(x_suf.shape[0], device=x_suf.device)
    x = tower.ln_final(x_suf[rows, eot_index - p])
    proj = tower.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return x
