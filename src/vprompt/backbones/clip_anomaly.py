"""The anomaly seam of an open_clip ViT tower: V-V attention (DPAM) and resized inputs.

AnomalyCLIP (Zhou et al., ICLR 2024; zqhang/AnomalyCLIP ``AnomalyCLIP_lib/AnomalyCLIP.py``)
reads dense features from a second, *diagonally prominent* path through the last blocks of the
frozen vision tower (DPAM). From the first DPAM block on, every block runs twice on the same
attention weights:

* the original path is the block itself (q-k attention and MLP, each with its residual);
* the V-V path replaces the query and key by the value (``softmax(v vᵀ · scale) v``), keeps the
  block's out-projection, skips the MLP, and adds the result to its own running sum. The
  attention input is always ``ln_1`` of the *original* path's tokens, so the V-V path is
  ``x_vv ← x_vv + out_proj(vv_attn(ln_1(x_orig)))``, starting from the tokens that enter the
  first DPAM block.

Blocks before the first DPAM block are the tower's own. The global (class-token) feature comes
from the original path. The tower also runs at sides other than the one it was trained at: its
patch positional embeddings are resized bilinearly (the reference's ``VisionTransformer.forward``).
Shapes: B images, N patch tokens, D tower width, E joint embedding size, H heads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vprompt.backbones import clip_vision
from vprompt.errors import WeightsError


@dataclass
class DualPathFeatures:
    """What the DPAM forward gives the anomaly method.

    Attributes:
        image: B x E class-token feature of the original path (not normalized).
        patches: One B x N x E tensor per requested block (class token dropped), in the joint
            space (the tower's final norm and projection applied to every token).
        grid: The side of the patch grid (N = grid²).
    """

    image: torch.Tensor
    patches: list[torch.Tensor]
    grid: int


def _visual(backbone: Any) -> Any:
    """The open_clip ``VisionTransformer`` of a :class:`ClipBackbone` (others refused)."""
    layout = backbone._require_vit()
    if layout != "open_clip-vit":
        raise WeightsError(
            f"{backbone.name}: V-V attention needs open_clip's own ViT tower, not a {layout} "
            "(use an OpenAI-layout CLIP such as clip:ViT-L-14-336)"
        )
    return backbone.model.visual


def patch_size(backbone: Any) -> int:
    """The side of one patch of the tower (its patch convolution's stride)."""
    stride = _visual(backbone).conv1.stride
    return int(stride[0] if isinstance(stride, tuple | list) else stride)


def vision_blocks(backbone: Any) -> int:
    """How many blocks the vision tower has."""
    return len(_visual(backbone).transformer.resblocks)


def resized_vision_tokens(backbone: Any, pixels: torch.Tensor) -> torch.Tensor:
    """B x 3 x S x S pixels → B x (1 + N) x D tokens entering block 0, at any side S.

    Like :func:`clip_vision.vision_tokens`, but when the patch grid differs from the one the
    positional embedding was trained for, its patch rows are resized bilinearly (no corner
    alignment) as the reference does; the class token's row stays as it is.
    """
    visual = _visual(backbone)
    x = visual.conv1(pixels)  # B x D x g x g
    b, d, gh, gw = x.shape
    if gh != gw:
        raise ValueError(f"the patch grid must be square, got {gh} x {gw}")
    x = x.reshape(b, d, -1).permute(0, 2, 1)  # B x N x D
    cls = visual.class_embedding.view(1, 1, -1).expand(b, -1, -1).to(x.dtype)
    x = torch.cat([cls, x], dim=1)
    x = x + resized_positions(visual.positional_embedding, gh).to(x.dtype)
    x = visual.patch_dropout(x)
    return visual.ln_pre(x)


def resized_positions(positions: torch.Tensor, grid: int) -> torch.Tensor:
    """(1 + n²) x D positional embedding → (1 + grid²) x D (bilinear on the patch rows)."""
    side = math.isqrt(positions.shape[0] - 1)
    if side == grid:
        return positions
    d = positions.shape[-1]
    patch = positions[1:].reshape(1, side, side, d).permute(0, 3, 1, 2)  # 1 x D x n x n
    patch = F.interpolate(patch, size=(grid, grid), mode="bilinear", align_corners=False)
    patch = patch.reshape(d, grid * grid).transpose(0, 1)
    return torch.cat([positions[:1], patch], dim=0)


def _check_block(block: nn.Module) -> nn.MultiheadAttention:
    attn = getattr(block, "attn", None)
    plain = all(hasattr(block, a) for a in ("ln_1", "ln_2", "mlp"))
    if not plain or not isinstance(attn, nn.MultiheadAttention) or hasattr(block, "ln_1_kv"):
        raise WeightsError(
            f"V-V attention needs open_clip's plain ResidualAttentionBlock, got "
            f"{type(block).__name__}"
        )
    if attn.in_proj_weight is None or not attn._qkv_same_embed_dim:
        raise WeightsError("V-V attention needs a packed q/k/v input projection (in_proj_weight)")
    return attn


def vv_attention(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both attentions of one block on the same (already ``ln_1``-normed) tokens.

    Args:
        block: An open_clip ``ResidualAttentionBlock`` (packed q/k/v projection).
        x: B x L x D normed tokens.

    Returns:
        ``(original, vv)``: B x L x D after the out-projection, of ``softmax(q kᵀ · s) v`` and
        of ``softmax(v vᵀ · s) v`` with ``s = 1 / sqrt(D / H)``.
    """
    attn = _check_block(block)
    b, n, d = x.shape
    h = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # B x L x 3D
    q, k, v = (t.reshape(b, n, h, d // h).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    original = F.scaled_dot_product_attention(q, k, v)  # B x H x L x D/H
    vv = F.scaled_dot_product_attention(v, v, v)

    def out(t: torch.Tensor) -> torch.Tensor:
        return F.linear(
            t.transpose(1, 2).reshape(b, n, d), attn.out_proj.weight, attn.out_proj.bias
        )

    return out(original), out(vv)


def dual_path_block(
    block: nn.Module, x: torch.Tensor, x_vv: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DPAM block: the original path and the V-V path's next running sum.

    Args:
        block: An open_clip ``ResidualAttentionBlock``.
        x: B x L x D original-path tokens entering the block.
        x_vv: B x L x D V-V path tokens, or None at the first DPAM block (it starts from ``x``).

    Returns:
        ``(x_next, x_vv_next)``: the block's own output (equal to ``block(x)``) and
        ``x_vv + out_proj(vv_attn(ln_1(x)))`` — no MLP on the V-V path.
    """
    ls_1: nn.Module = getattr(block, "ls_1", nn.Identity())
    ls_2: nn.Module = getattr(block, "ls_2", nn.Identity())
    ln_1: nn.Module = block.ln_1  # type: ignore[assignment]
    ln_2: nn.Module = block.ln_2  # type: ignore[assignment]
    mlp: nn.Module = block.mlp  # type: ignore[assignment]
    original, vv = vv_attention(block, ln_1(x))
    x_next = x + ls_1(original)
    x_next = x_next + ls_2(mlp(ln_2(x_next)))
    vv_next = (x if x_vv is None else x_vv) + ls_1(vv)
    return x_next, vv_next


def dual_path_features(
    backbone: Any,
    pixels: torch.Tensor,
    *,
    dpam_start: int,
    layers: Sequence[int],
    global_norm: bool = False,
) -> DualPathFeatures:
    """The AnomalyCLIP vision forward: global feature and dense features of chosen blocks.

    Args:
        backbone: A :class:`ClipBackbone` with an open_clip ViT tower.
        pixels: B x 3 x S x S normalised pixels (S a multiple of the patch size).
        dpam_start: The first block (0-based) that runs the V-V path; the number of blocks
            leaves it off.
        layers: 0-based blocks whose output tokens become dense features: the V-V path's
            from ``dpam_start`` on, the tower's own before it.
        global_norm: Apply the tower's final norm (``ln_post``) to the class token before its
            projection. The reference does not (it projects the raw class token).

    Returns:
        The global feature, one B x N x E tensor per entry of ``layers`` and the grid side.
    """
    visual = _visual(backbone)
    tower = visual.transformer.resblocks
    wanted = set(layers)
    if any(not 0 <= i < len(tower) for i in wanted):
        raise ValueError(f"feature layers {sorted(wanted)} outside the {len(tower)} blocks")
    batch_first = getattr(visual.transformer, "batch_first", True)
    x = resized_vision_tokens(backbone, pixels)
    grid = math.isqrt(x.shape[1] - 1)
    x_vv: torch.Tensor | None = None
    kept: dict[int, torch.Tensor] = {}
    for i, block in enumerate(tower):
        if i >= dpam_start:
            x, x_vv = dual_path_block(block, x, x_vv)
        elif batch_first:
            x = block(x)
        else:
            x = block(x.transpose(0, 1)).transpose(0, 1)
        if i in wanted:
            kept[i] = x if x_vv is None else x_vv
    layout = backbone._require_vit()
    if global_norm:
        image = clip_vision.pool_tokens(visual, layout, x)
    else:
        image = x[:, 0] @ visual.proj if visual.proj is not None else x[:, 0]
    patches = [clip_vision.project_tokens(visual, layout, kept[i][:, 1:]) for i in layers]
    return DualPathFeatures(image=image, patches=patches, grid=grid)
