"""Locally aware patch features of any frozen backbone (PatchCore's embedding), nearest
neighbours against a bank, and the coreset that keeps the bank small.

The embedding follows Roth et al. 2022 ("Towards Total Recall in Industrial Anomaly
Detection") as its reference code computes it: each chosen layer's map is unfolded into
``patch_size`` x ``patch_size`` neighbourhoods (zero padding, stride 1); deeper layers'
neighbourhood vectors are resized bilinearly onto the first layer's grid; each layer's
flattened (C x p x p, channel-major) vector is average-pooled to ``pretrain_dim`` values
(``adaptive_avg_pool1d``), and the layers' vectors, concatenated, are pooled again to
``target_dim``. Shapes: B images, h x w the first layer's grid, D = ``target_dim``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from vprompt.backbones.dense import dense_features

QUERY_CHUNK_ELEMENTS = 1 << 24
"""Largest query x bank distance block held at once (64 MB of float32)."""


def patch_embeddings(
    backbone: Any,
    pixels: torch.Tensor,
    layers: Sequence[str],
    *,
    patch_size: int,
    pretrain_dim: int,
    target_dim: int,
) -> torch.Tensor:
    """B x 3 x S x S normalised pixels → B x h x w x D locally aggregated patch features."""
    maps = dense_features(backbone, pixels, layers)
    return aggregate_maps(
        maps, patch_size=patch_size, pretrain_dim=pretrain_dim, target_dim=target_dim
    )


def aggregate_maps(
    maps: Sequence[torch.Tensor], *, patch_size: int, pretrain_dim: int, target_dim: int
) -> torch.Tensor:
    """Layer maps (B x C_l x h_l x w_l, first = finest grid) → B x h x w x D."""
    b, _, h, w = maps[0].shape
    pad = (patch_size - 1) // 2
    per_layer = []
    for m in maps:
        m = m.float()
        c, hl, wl = m.shape[1:]
        cols = F.unfold(m, kernel_size=patch_size, padding=pad)  # B x (C p p) x (hl wl)
        if (hl, wl) != (h, w):
            grid = cols.reshape(b, c * patch_size * patch_size, hl, wl)
            grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
            cols = grid.reshape(b, -1, h * w)
        vec = cols.transpose(1, 2).reshape(b * h * w, 1, -1)  # (B h w) x 1 x (C p p)
        per_layer.append(F.adaptive_avg_pool1d(vec, pretrain_dim).squeeze(1))
    stacked = torch.stack(per_layer, dim=1).reshape(b * h * w, 1, -1)
    out = F.adaptive_avg_pool1d(stacked, target_dim).reshape(b, h, w, target_dim)
    return out


def nearest_distances(queries: torch.Tensor, bank: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Q x D queries, N x D bank → Q x k squared L2 distances to the k nearest, ascending.

    Squared, as the reference's faiss ``IndexFlatL2`` returns them. Queries are processed in
    chunks so the distance block never exceeds :data:`QUERY_CHUNK_ELEMENTS`.
    """
    k = min(k, bank.shape[0])
    rows = max(1, QUERY_CHUNK_ELEMENTS // max(1, bank.shape[0]))
    out = []
    bank_sq = (bank * bank).sum(dim=1)
    for start in range(0, queries.shape[0], rows):
        q = queries[start : start + rows]
        d = (q * q).sum(dim=1, keepdim=True) - 2 * q @ bank.T + bank_sq[None]
        out.append(torch.topk(d.clamp_min(0), k, dim=1, largest=False).values)
    return torch.cat(out) if out else queries.new_zeros((0, k))


def greedy_coreset(
    features: torch.Tensor,
    count: int,
    *,
    generator: torch.Generator,
    start_points: int = 10,
    projection_dim: int = 128,
) -> torch.Tensor:
    """Indices of ``count`` rows of ``features`` (N x D) chosen by approximate greedy coreset.

    As the reference's ``ApproximateGreedyCoresetSampler``: features are projected by a random
    bias-free linear map to ``projection_dim`` (when D differs), every row starts at its mean
    distance to ``start_points`` random rows, then ``count`` times the farthest row is taken
    and every row's distance becomes the minimum of its own and its distance to that row.
    Random draws come from ``generator`` (the reference uses the global generators).
    """
    n, d = features.shape
    count = min(count, n)
    x = features.float()
    if d != projection_dim:
        # nn.Linear's default init: U(-1/sqrt(d), 1/sqrt(d)).
        bound = 1.0 / float(np.sqrt(d))
        proj = (torch.rand(projection_dim, d, generator=generator) * 2 - 1) * bound
        x = x @ proj.to(x.device).T
    starts = torch.randperm(n, generator=generator)[: min(start_points, n)].to(x.device)
    sq = (x * x).sum(dim=1)

    def sq_dist_to(rows: torch.Tensor) -> torch.Tensor:  # N x len(rows), squared
        return (sq[:, None] - 2 * x @ x[rows].T + sq[rows][None]).clamp_min(0)

    # The farthest-point loop runs on squared distances (the same order, no square roots);
    # only the starting values need the distances themselves, for their mean.
    nearest = sq_dist_to(starts).sqrt().mean(dim=1).square()
    picked = torch.empty(count, dtype=torch.long)
    for i in range(count):
        j = int(torch.argmax(nearest))
        picked[i] = j
        nearest = torch.minimum(nearest, sq_dist_to(torch.tensor([j], device=x.device))[:, 0])
    return picked


def smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """B x S x S maps smoothed by a Gaussian of ``sigma`` pixels (scipy's ``reflect`` border,
    as the references' ``gaussian_filter``); sigma 0 returns them unchanged."""
    if sigma <= 0:
        return maps
    arr = maps.detach().float().cpu().numpy()
    out = np.stack([ndimage.gaussian_filter(m, sigma=sigma) for m in arr])
    return torch.from_numpy(out).to(maps.device)


def upsample_grid(scores: torch.Tensor, size: int) -> torch.Tensor:
    """B x h x w patch scores → B x S x S (bilinear, ``align_corners=False``)."""
    return F.interpolate(
        scores[:, None].float(), size=(size, size), mode="bilinear", align_corners=False
    )[:, 0]
