"""Token-level access to an open_clip vision tower (the VPT / MaPLe seam of :class:`ClipBackbone`).

Mirrors open_clip's ``VisionTransformer.forward`` (3.x; same order in 2.2x): patch conv →
class token → positional embedding → patch dropout → ``ln_pre`` → blocks → ``_pool``
(``ln_post`` and token / average / attention pooling) → ``proj``. Towers built on a timm
ViT trunk (``TimmModel``) go through the trunk's own pieces and open_clip's projection head.
Shapes: B images, P prefix tokens, N patch tokens, D width, E joint embedding size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

VisionLayout = Literal["open_clip-vit", "timm-trunk-vit"]


def vision_layout(visual: Any) -> VisionLayout | None:
    """Which token layout ``visual`` has, or None when it is not a ViT (e.g. ModifiedResNet)."""
    needed = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer")
    if all(hasattr(visual, a) for a in needed) and hasattr(visual.transformer, "resblocks"):
        return "open_clip-vit"
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:
        from timm.models.vision_transformer import VisionTransformer

        if isinstance(trunk, VisionTransformer):
            return "timm-trunk-vit"
    return None


def num_prefix_tokens(visual: Any, layout: VisionLayout) -> int:
    return 1 if layout == "open_clip-vit" else int(visual.trunk.num_prefix_tokens)


def vision_width(visual: Any, layout: VisionLayout) -> int:
    if layout == "open_clip-vit":
        return int(visual.class_embedding.shape[-1])
    return int(visual.trunk.embed_dim)


def vision_tokens(visual: Any, layout: VisionLayout, pixels: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W → B x (P + N) x D, exactly what enters the first block."""
    if layout == "timm-trunk-vit":
        t = visual.trunk
        return t.norm_pre(t.patch_drop(t._pos_embed(t.patch_embed(pixels))))
    x = visual.conv1(pixels)  # B x D x gh x gw
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # B x N x D
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
    x = torch.cat([cls, x], dim=1)
    x = x + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x)
    return visual.ln_pre(x)


def pre_norm(visual: Any, layout: VisionLayout) -> nn.Module:
    """The norm applied to the tokens that enter the first block (``ln_pre`` / ``norm_pre``)."""
    if layout == "timm-trunk-vit":
        return visual.trunk.norm_pre
    return visual.ln_pre


def prompted_features(
    visual: Any, layout: VisionLayout, pixels: torch.Tensor, prompts: Sequence[torch.Tensor]
) -> torch.Tensor:
    """B x E image features with deep prompts appended after the tower's tokens.

    ``prompts[0]`` (n x D) joins the sequence before the pre-norm (the norm is per token, so
    normalising it separately is the same); ``prompts[k]`` replaces the last n tokens entering
    block ``k``; the n prompt tokens are dropped before pooling.
    """
    tower = blocks(visual, layout)
    if len(prompts) > len(tower):
        raise ValueError(f"{len(prompts)} vision prompt layers for a tower of {len(tower)} blocks")
    n = prompts[0].shape[0]
    if any(p.dim() != 2 or p.shape[0] != n for p in prompts):
        raise ValueError("every layer's vision prompts must be n x D with the same n")
    x = vision_tokens(visual, layout, pixels)
    b = x.shape[0]
    first = pre_norm(visual, layout)(prompts[0].to(x.dtype))
    x = torch.cat([x, first.unsqueeze(0).expand(b, -1, -1)], dim=1)
    for i, block in enumerate(tower):
        if 1 <= i < len(prompts):
            deep = prompts[i].to(x.dtype).unsqueeze(0).expand(b, -1, -1)
            x = torch.cat([x[:, :-n], deep], dim=1)
        x = block(x)
    return pool_tokens(visual, layout, x[:, :-n])


def blocks(visual: Any, layout: VisionLayout) -> nn.ModuleList | nn.Sequential:
    """The blocks, each mapping B x L x D → B x L x D."""
    if layout == "timm-trunk-vit":
        return visual.trunk.blocks
    transformer = visual.transformer
    if getattr(transformer, "batch_first", True):
        return transformer.resblocks
    # Older open_clip towers run sequence-first; present them batch-first like every other.
    return nn.ModuleList(_BatchFirst(b) for b in transformer.resblocks)


def pool_tokens(visual: Any, layout: VisionLayout, tokens: torch.Tensor) -> torch.Tensor:
    """B x L x D after the last block → B x E image embedding (``encode_image``'s output)."""
    if layout == "timm-trunk-vit":
        t = visual.trunk
        return visual.head(t.forward_head(t.norm(tokens)))
    pooled = _pool(visual, tokens)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled


def project_tokens(visual: Any, layout: VisionLayout, tokens: torch.Tensor) -> torch.Tensor:
    """B x L x D tokens (from any block) → B x L x E in the joint space: the final norm and
    projection the pooled token gets, applied to every token (the anomaly references' patch
    features: WinCLIP, AnomalyCLIP)."""
    if layout == "timm-trunk-vit":
        return visual.head(visual.trunk.norm(tokens))
    x = visual.ln_post(tokens)
    return x @ visual.proj if visual.proj is not None else x


def _pool(visual: Any, x: torch.Tensor) -> torch.Tensor:
    # open_clip VisionTransformer._pool (pooled output only).
    if getattr(visual, "attn_pool", None) is not None:
        if getattr(visual, "attn_pool_contrastive", None) is not None:
            x = visual.ln_post(x)
            tokens = visual.attn_pool(x)
            if visual.attn_pool_type == "parallel":
                return visual.attn_pool_contrastive(x)
            return visual.attn_pool_contrastive(tokens)
        x = visual.ln_post(visual.attn_pool(x))
        return _global_pool(visual, x)
    if getattr(visual, "final_ln_after_pool", False):
        return visual.ln_post(_global_pool(visual, x))
    return _global_pool(visual, visual.ln_post(x))


def _global_pool(visual: Any, x: torch.Tensor) -> torch.Tensor:
    pool_type = getattr(visual, "pool_type", "tok")
    if pool_type == "avg":
        return x[:, 1:].mean(dim=1)
    if pool_type == "tok":
        return x[:, 0]
    return x


class _BatchFirst(nn.Module):
    """Runs a sequence-first block on batch-first tokens."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x.transpose(0, 1)).transpose(0, 1)
