"""Clusters in a frozen model's feature space, as DAM-VP uses them: a random sample of training
features, average-linkage clustering cut at a distance threshold, nearest-prototype routing,
and the "most active neurons" read-out (Huang et al., CVPR 2023; reference:
github.com/shikiw/DAM-VP ``coarse_clustering``, ``get_prompted_image``,
``get_active_neuron_index``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from vprompt.errors import ConfigError

MAX_CLUSTER_SAMPLES = 5000
"""Most training images clustered (the distance matrix is N x N)."""
MAX_CLUSTERS = 256
"""Most clusters (each holds a 3 x canvas² prompt)."""
MAX_ACTIVE_SAMPLES = 8192
"""Most noise images the active-neuron ranking averages over."""


def average_linkage(
    features: torch.Tensor, threshold: float, max_clusters: int = MAX_CLUSTERS
) -> torch.Tensor:
    """Agglomerative clustering with average linkage on Euclidean distances.

    Merges the two closest clusters (mean pairwise distance between their members) while that
    distance is below ``threshold``, or while more than ``max_clusters`` remain.

    Args:
        features: N x D.
        threshold: Cut distance.
        max_clusters: Most clusters kept.

    Returns:
        N cluster indices, numbered 0, 1, … in order of each cluster's first member.
    """
    x = features.detach().double().cpu()
    n = len(x)
    dist = torch.cdist(x, x)  # N x N
    dist.fill_diagonal_(math.inf)
    sizes = torch.ones(n, dtype=torch.float64)
    owner = torch.arange(n)
    remaining = n
    while remaining > 1:
        flat = int(torch.argmin(dist))
        i, j = divmod(flat, n)
        if float(dist[i, j]) >= threshold and remaining <= max_clusters:
            break
        # Lance-Williams update for average linkage: the merged cluster's mean distance.
        merged = (sizes[i] * dist[i] + sizes[j] * dist[j]) / (sizes[i] + sizes[j])
        dist[i], dist[:, i] = merged, merged
        dist[i, i] = math.inf
        dist[j], dist[:, j] = math.inf, math.inf
        sizes[i] += sizes[j]
        owner[owner == j] = i
        remaining -= 1
    _, first = torch.unique(owner, return_inverse=True)
    order = {int(c): k for k, c in enumerate(dict.fromkeys(first.tolist()))}
    return torch.tensor([order[int(c)] for c in first.tolist()], dtype=torch.long)


def nearest_prototype(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """B x D features, K x D prototypes → B indices of the nearest prototype (Euclidean)."""
    # Exact differences: the matmul shortcut loses the small distances of tiny features.
    dist = torch.cdist(
        features.float(), prototypes.float(), compute_mode="donot_use_mm_for_euclid_dist"
    )
    return dist.argmin(dim=1)


def sample_features(
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    encode: Callable[[torch.Tensor], torch.Tensor],
    n: int,
) -> torch.Tensor:
    """N x D features (``encode``) of ``n`` images drawn uniformly at random from ``batches``
    (the global torch generator draws the keys), in their order; all of them when fewer. The
    reference takes the first 1000 of its shuffled loader."""
    feats = keys = order = None
    seen = 0
    for images, _ in batches:
        batch = encode(images).cpu()
        idx = torch.arange(seen, seen + len(batch))
        rand = torch.rand(len(batch))
        seen += len(batch)
        if feats is None or keys is None or order is None:
            feats, keys, order = batch, rand, idx
        else:
            feats, keys = torch.cat([feats, batch]), torch.cat([keys, rand])
            order = torch.cat([order, idx])
        if len(keys) > n:  # keep the smallest random keys
            keep = keys.topk(n, largest=False).indices
            feats, keys, order = feats[keep], keys[keep], order[keep]
    if feats is None or order is None:
        raise ConfigError("dam-vp needs training images to cluster")
    return feats[order.argsort()]


def cluster_prototypes(feats: torch.Tensor, cfg: Any) -> torch.Tensor:
    """K x D prototypes (cluster means) of ``feats`` under the config's threshold rule."""
    threshold = cfg.distance_threshold
    if threshold is None:
        n = len(feats)
        mean = (
            float(torch.cdist(feats.double(), feats.double()).sum()) / (n * (n - 1)) if n > 1 else 0
        )
        threshold = cfg.threshold_ratio * mean if mean > 0 else math.inf
    labels = average_linkage(feats, float(threshold), cfg.max_clusters)
    return torch.stack([feats[labels == i].mean(0) for i in range(int(labels.max()) + 1)])


def active_neurons(
    features: Callable[[torch.Tensor], torch.Tensor],
    canvas: int,
    *,
    samples: int,
    seed: int,
    device: torch.device,
    batch_size: int = 64,
) -> torch.Tensor:
    """Feature indices by decreasing standard deviation (population) of ``features`` over
    ``samples`` seeded standard-normal images (the reference's ``get_active_neuron_index``)."""
    gen = torch.Generator().manual_seed(seed)
    outs = []
    with torch.no_grad():
        for start in range(0, samples, batch_size):
            n = min(batch_size, samples - start)
            noise = torch.randn(n, 3, canvas, canvas, generator=gen).to(device)
            outs.append(features(noise).float().cpu())
    spread = torch.cat(outs).std(dim=0, unbiased=False)
    return spread.argsort(descending=True, stable=True)


def most_active(order: torch.Tensor, count: int, what: str) -> torch.Tensor:
    """The ``count`` most active feature indices of ``order`` (:func:`active_neurons`), in
    increasing index order (the reference's ``torch.unique``): one class each for ``what``."""
    if count > len(order):
        raise ConfigError(
            f"{what} has {count} classes, more than the {len(order)} features the active "
            "read-out picks from"
        )
    return order[:count].sort().values
