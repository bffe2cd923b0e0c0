"""PatchCleanser double masking (Xiang, Mahloujifar and Mittal, "PatchCleanser: Certifiably
Robust Defense against Adversarial Patches for Any Image Classifier", USENIX Security 2022,
arXiv:2108.09135). Written from the paper's definitions (no network here, no code copied).

**Mask set.** For a square patch of ``p`` px on an axis of ``n`` px and ``k`` mask positions
per axis, the paper takes the stride ``s = ceil((n - p + 1) / k)`` and the mask size
``m = p + s - 1``; masks start at ``0, s, 2s, …`` (the last one moved to ``n - m`` so it ends
at the border). Any patch position ``x`` lies in the mask starting at ``s floor(x / s)`` (or
the last one), so the k x k set of ``m_y x m_x`` masks is *R-covering*: every ``p x p`` patch
lies inside at least one mask. Here ``p = ceil(sqrt(a H W))`` for a patch of area fraction
``a`` (the paper's default ``k = 6``, 36 masks; its ImageNet patches cover 1-3% of the
image, 2% here by default).

**Masking.** ``x ⊙ r`` replaces the masked pixels by a constant ``fill``. The paper writes the
product (zeros); it masks the model's input, where zero is the dataset's mean colour for
normalised inputs. Masks here act on [0, 1] pixels before normalisation, so mid-grey 0.5 is
the default and ``fill=0`` gives literal zeros. The fill must not depend on the image: a
covered patch must leave the masked image unchanged for the certificate to hold.

**Double masking (the paper's Algorithm 1).** Round 1 predicts ``F(x ⊙ r)`` for every mask
``r``; ``ŷ_maj`` is the most frequent label (ties: the smallest label) and the disagreers are
the masks predicting anything else.

* Case I: no disagreer → ``ŷ_maj``.
* Case II: for each disagreer ``r0`` in mask order, round 2 predicts ``F(x ⊙ r0 ⊙ r1)`` for
  every ``r1`` in the set; if these all agree, the disagreer's label ``ŷ0`` is returned (they
  then equal ``ŷ0``, since ``r1 = r0`` is among them).
* Case III: no disagreer passes → ``ŷ_maj``.

**Certification (the paper's Theorem 1 / Algorithm 2).** An image is certified when its
two-mask predictions all agree: ``F(x ⊙ r0 ⊙ r1) = y`` for *every* pair ``(r0, r1)`` of the
mask set, ``r0 = r1`` included (``K (K + 1) / 2`` forwards for ``K`` masks). Then double
masking returns ``y`` for this image under *any* patch inside a ``p x p`` square anywhere in
the image; certified robust accuracy counts images certified with ``y`` the true label.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vprompt.defend.base import (
    Defense,
    DefenseOutput,
    check_int,
    check_number,
    patch_side,
    register_defense,
)


@dataclass(frozen=True)
class PatchCleanserConfig:
    """Attributes:
    patch_size: Largest patch area covered, as a fraction of the image area (a square of
        ``ceil(sqrt(patch_size H W))`` px).
    k: Mask positions per axis (k x k masks; the paper's default 6).
    fill: The constant masked pixels take, in [0, 1].
    batch_size: Masked images per forward.
    """

    patch_size: float = 0.02
    k: int = 6
    fill: float = 0.5
    batch_size: int = 64

    def __post_init__(self) -> None:
        check_number("patch_size", self.patch_size, low=0, high=1, low_open=True)
        check_int("k", self.k, low=1, high=64)
        check_number("fill", self.fill, low=0, high=1)
        check_int("batch_size", self.batch_size, low=1, high=10**6)


@dataclass(frozen=True)
class AxisMasks:
    """Mask layout along one axis: patch ``p``, stride ``s``, mask size ``m``, starts."""

    patch: int
    stride: int
    size: int
    starts: tuple[int, ...]


def axis_masks(n: int, p: int, k: int) -> AxisMasks:
    """The paper's 1-D mask layout covering every ``p``-px patch on ``n`` px with ``k``
    positions: ``s = ceil((n - p + 1) / k)``, ``m = p + s - 1``, starts ``i s`` (clipped to
    ``n - m``)."""
    p = max(1, min(p, n))
    s = math.ceil((n - p + 1) / k)
    m = min(n, p + s - 1)
    starts = sorted({min(i * s, n - m) for i in range(k)})
    return AxisMasks(patch=p, stride=s, size=m, starts=tuple(starts))


def mask_set(
    height: int, width: int, p: int, k: int, device: torch.device | None = None
) -> torch.Tensor:
    """K x H x W bool masks (True = masked), row-major over (top, left) positions."""
    rows, cols = axis_masks(height, p, k), axis_masks(width, p, k)
    masks = torch.zeros(len(rows.starts), len(cols.starts), height, width, dtype=torch.bool)
    for i, top in enumerate(rows.starts):
        for j, left in enumerate(cols.starts):
            masks[i, j, top : top + rows.size, left : left + cols.size] = True
    return masks.flatten(0, 1).to(device)


def majority(labels: Sequence[int]) -> int:
    """The most frequent label (the smallest on ties)."""
    counts = torch.bincount(torch.tensor(list(labels), dtype=torch.long))
    return int(counts.argmax())


def double_masking(
    one_mask: Sequence[int],
    two_mask: Callable[[list[int]], list[list[int]]],
    *,
    group: int = 1,
) -> tuple[int, str]:
    """Algorithm 1 on one image.

    Args:
        one_mask: The K round-1 labels ``F(x ⊙ r_i)``.
        two_mask: Disagreer indices → for each, its K labels ``F(x ⊙ r_i ⊙ r_j)`` (asked for
            a few disagreers at a time, in mask order, so batching never changes the answer).
        group: How many disagreers ``two_mask`` is asked about at once.

    Returns:
        The label, and the case that gave it (``agreed``, ``disagreer`` or ``majority``).
    """
    top = majority(one_mask)
    disagreers = [i for i, y in enumerate(one_mask) if y != top]
    if not disagreers:
        return top, "agreed"
    group = max(1, group)
    for start in range(0, len(disagreers), group):
        ask = disagreers[start : start + group]
        for i, row in zip(ask, two_mask(ask), strict=True):
            if all(y == row[0] for y in row):
                return one_mask[i], "disagreer"
    return top, "majority"


@register_defense
class PatchCleanser(Defense):
    """PatchCleanser's double masking with its certificate (see the module docstring)."""

    name: ClassVar[str] = "patchcleanser"
    config_class: ClassVar[type] = PatchCleanserConfig
    certifies: ClassVar[bool] = True
    config: PatchCleanserConfig

    def describe(self, height: int, width: int) -> dict[str, Any]:
        p = patch_side(self.config.patch_size, height, width)
        rows, cols = axis_masks(height, p, self.config.k), axis_masks(width, p, self.config.k)
        return {
            **super().describe(height, width),
            "patch_px": [rows.patch, cols.patch],
            "stride_px": [rows.stride, cols.stride],
            "mask_px": [rows.size, cols.size],
            "masks": len(rows.starts) * len(cols.starts),
        }

    def masks(self, height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
        """The K x H x W mask set for H x W images."""
        p = patch_side(self.config.patch_size, height, width)
        return mask_set(height, width, p, self.config.k, device)

    def masked_predictions(
        self, images: torch.Tensor, masks: torch.Tensor, first: torch.Tensor, second: torch.Tensor
    ) -> torch.Tensor:
        """N x M labels: image n under masks ``first[t] ∪ second[t]`` for t < M, batched over
        (image, combination) pairs."""
        n, m = len(images), len(first)
        out = torch.empty(n * m, dtype=torch.long)
        size = self.config.batch_size
        with torch.no_grad():
            for start in range(0, n * m, size):
                t = torch.arange(start, min(n * m, start + size))
                img, combo = t // m, t % m
                region = masks[first[combo]] | masks[second[combo]]  # N' x H x W
                x = images[img.to(images.device)]
                x = torch.where(region.unsqueeze(1), torch.full_like(x, self.config.fill), x)
                out[start : start + len(t)] = self.model(x).argmax(dim=1).cpu()
        return out.view(n, m)

    def defend(self, pixels: torch.Tensor, *, certify: bool = False) -> DefenseOutput:
        """Double-masking labels for B images; with ``certify``, whether each image's
        two-mask predictions all agree (every pair of masks, so K (K + 1) / 2 forwards)."""
        h, w = pixels.shape[-2:]
        masks = self.masks(h, w, pixels.device)
        if certify:
            return self._with_certificate(pixels, masks)
        k = len(masks)
        idx = torch.arange(k)
        one = self.masked_predictions(pixels, masks, idx, idx)  # B x K
        group = max(1, self.config.batch_size // k)
        labels = []
        for n in range(len(pixels)):

            def second_round(rows: list[int], n: int = n) -> list[list[int]]:
                first = torch.tensor(rows).repeat_interleave(k)
                got = self.masked_predictions(
                    pixels[n : n + 1], masks, first, idx.repeat(len(rows))
                )
                return got.view(len(rows), k).tolist()

            labels.append(double_masking(one[n].tolist(), second_round, group=group)[0])
        return DefenseOutput(prediction=torch.tensor(labels, dtype=torch.long))

    def _with_certificate(self, pixels: torch.Tensor, masks: torch.Tensor) -> DefenseOutput:
        """Every two-mask prediction once (the certificate needs them all); both rounds of
        double masking then read that table."""
        b, k = len(pixels), len(masks)
        ii, jj = torch.triu_indices(k, k)
        pairs = self.masked_predictions(pixels, masks, ii, jj)  # B x K(K+1)/2
        table = torch.empty(b, k, k, dtype=torch.long)
        table[:, ii, jj] = pairs
        table[:, jj, ii] = pairs
        labels = []
        for n in range(b):
            rows = table[n]

            def second_round(ask: list[int], rows: torch.Tensor = rows) -> list[list[int]]:
                picked: list[list[int]] = rows[ask].tolist()
                return picked

            labels.append(double_masking(rows.diagonal().tolist(), second_round, group=k)[0])
        certified = (pairs == pairs[:, :1]).all(dim=1)
        prediction = torch.tensor(labels, dtype=torch.long)
        return DefenseOutput(prediction=prediction, certified=certified)
