""" "Circle a defect, find all similar": defect search from one or a few marked examples.

The user marks defect regions (boxes, masks or scribbles, as an H x W mask) on example images.
Every image — examples and targets — is embedded into locally aggregated patch features of a
frozen backbone (:func:`~vprompt.anomaly.patch_features.patch_embeddings`, any CNN or ViT).
Patch cells the mark covers at least half as much as its best-covered cell are the
*positives* (relative, so a thin scratch still has cells); the examples' cells at least
``guard`` cells away from the mark are the *negatives* (what the surface looks like without
the defect; nearer cells mix the defect in through the local aggregation). A target patch's
score is a nearest-neighbour margin,

    margin(p) = max_pos cos(p, pos) − max_neg cos(p, neg),

positive where the patch is closer to a marked defect than to any unmarked part of the
examples: a 1-NN vote with the examples' own background as the rejection class, so no
absolute similarity threshold has to be guessed per backbone. Regions are the connected
components (8-connected) of ``margin > threshold`` on the S x S map, ranked over all images by
their peak margin; each comes with its box in the image's own pixels and, when a ``sam:``
segmenter is given, a mask decoded from that box (all of an image's boxes in one decode).

Shapes: E examples, h x w the patch grid, D feature width, S the frame side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from PIL import Image
from scipy import ndimage

from vprompt.anomaly.base import InputFrame, frame_for
from vprompt.anomaly.images import map_to_image, mask_to_frame, to_frame
from vprompt.anomaly.patch_features import patch_embeddings, upsample_grid
from vprompt.backbones.dense import check_layers, default_layers
from vprompt.errors import ConfigError, PromptError
from vprompt.methods.config import check_int

MAX_NEGATIVES = 16_384
"""Negative cells kept (a seeded random subset beyond this): bounds the similarity matrix."""


@dataclass(frozen=True)
class FindSimilarConfig:
    """Settings of the defect search.

    Attributes:
        layers: Feature layers (default: the stride-8 and stride-16 stages / mid ViT blocks).
        patch_size: Neighbourhood of the local aggregation (PatchCore's 3).
        pretrain_dim: Per-layer pooled width.
        target_dim: Final feature width D.
        image_size: Frame side S (None: the backbone's own input size).
        threshold: Margin above which a pixel belongs to a found region.
        min_area: Smallest region kept, as a fraction of the frame's area.
        top_k: Regions returned, best first, over all images.
        coverage: A marked cell is a candidate positive when the mark covers at least this
            fraction of what it covers in its best-covered cell (relative, so thin marks work).
        guard: Cells within this many cells of the mark are neither positives nor negatives
            (the local aggregation mixes them with the defect).
        seed: Seeds the negatives' subsampling.
    """

    layers: tuple[str, ...] = ()
    patch_size: int = 3
    pretrain_dim: int = 1024
    target_dim: int = 1024
    image_size: int | None = None
    threshold: float = 0.0
    min_area: float = 0.0005
    top_k: int = 20
    coverage: float = 0.5
    guard: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(str(x) for x in self.layers))
        check_int(self.patch_size, "patch_size", 1, 15)
        check_int(self.pretrain_dim, "pretrain_dim", 1, 8192)
        check_int(self.target_dim, "target_dim", 1, 8192)
        check_int(self.top_k, "top_k", 1, 10_000)
        check_int(self.seed, "seed", 0, 2**63 - 1)
        check_int(self.guard, "guard", 0, 64)
        if self.image_size is not None:
            check_int(self.image_size, "image_size", 8, 4096)
        if not -2 <= float(self.threshold) <= 2:
            raise ConfigError(f"threshold is a cosine margin in [-2, 2]: {self.threshold!r}")
        if not 0 <= float(self.min_area) < 1 or not 0 < float(self.coverage) <= 1:
            raise ConfigError("min_area must be in [0, 1) and coverage in (0, 1]")


@dataclass
class FoundRegion:
    """One similar region.

    Attributes:
        image: Index of the image in the searched list.
        box: (x0, y0, x1, y1) in the image's own pixels.
        score: Peak margin inside the region.
        area: Fraction of the image the region covers.
        mask: H x W bool mask in the image's pixels (the SAM mask when refined).
        refined: Whether ``mask`` came from a segmenter.
    """

    image: int
    box: tuple[float, float, float, float]
    score: float
    area: float
    mask: NDArray[np.bool_] = field(repr=False)
    refined: bool = False


@dataclass
class SearchResult:
    """What :meth:`DefectSearch.search` returns: ranked regions and every image's heat map."""

    regions: list[FoundRegion]
    heatmaps: list[NDArray[np.float32]] = field(repr=False)
    """Per image, the H x W margin map in its own pixels."""


class DefectSearch:
    """Find regions like the marked examples (see the module docstring)."""

    def __init__(self, backbone: Any, config: FindSimilarConfig | None = None) -> None:
        self.backbone = backbone
        self.config = config or FindSimilarConfig()
        self.layers = check_layers(backbone, self.config.layers or default_layers(backbone))
        self.frame: InputFrame = frame_for(backbone.preprocess, size=self.config.image_size)
        self.positives: torch.Tensor | None = None
        self.negatives: torch.Tensor | None = None

    def _embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        cfg = self.config
        device = next((p.device for p in self.backbone.parameters()), torch.device("cpu"))
        pixels = torch.stack([to_frame(im, self.frame) for im in images]).to(device)
        with torch.no_grad():
            feats = patch_embeddings(
                self.backbone,
                pixels,
                self.layers,
                patch_size=cfg.patch_size,
                pretrain_dim=cfg.pretrain_dim,
                target_dim=cfg.target_dim,
            )
        return F.normalize(feats.float(), dim=-1)  # B x h x w x D

    def add_examples(self, examples: Sequence[tuple[Image.Image, NDArray[np.bool_]]]) -> None:
        """Take example images with their H x W defect masks (image pixels)."""
        if not examples:
            raise PromptError("find-similar needs at least one marked example")
        cfg = self.config
        candidates, neg = [], []
        for i, (image, mask) in enumerate(examples):
            m = np.asarray(mask, dtype=bool)
            if m.shape != (image.size[1], image.size[0]):
                raise PromptError(
                    f"example {i + 1}: its mask is {m.shape[1]}x{m.shape[0]}, the image "
                    f"{image.size[0]}x{image.size[1]}"
                )
            if not m.any():
                raise PromptError(f"example {i + 1}: the marked region is empty")
            feats = self._embed([image])[0]  # h x w x D
            cover = self._coverage(m, (int(feats.shape[0]), int(feats.shape[1])))
            if not bool((cover > 0).any()):
                raise PromptError(f"example {i + 1}: the marked region lies outside the frame")
            # Relative coverage: a thin scratch covers no cell by half, but its best cells.
            candidates.append(feats[cover >= cfg.coverage * cover.max()])
            # Aggregated features see their neighbours: cells near the mark are not clean.
            near = F.max_pool2d(
                (cover > 0).float()[None, None], 2 * cfg.guard + 1, stride=1, padding=cfg.guard
            )[0, 0]
            neg.append(feats[near == 0])
        negatives = torch.cat(neg)
        if negatives.shape[0] > MAX_NEGATIVES:
            gen = torch.Generator().manual_seed(cfg.seed)
            keep = torch.randperm(negatives.shape[0], generator=gen)[:MAX_NEGATIVES]
            negatives = negatives[keep.to(negatives.device)]
        self.negatives = negatives
        self.positives = torch.cat(candidates)

    def _coverage(self, mask: NDArray[np.bool_], grid: tuple[int, int]) -> torch.Tensor:
        """Fraction of each patch cell the mask covers, in the frame (h x w)."""
        framed = torch.from_numpy(mask_to_frame(mask, self.frame).astype(np.float32))
        return F.adaptive_avg_pool2d(framed[None, None], grid)[0, 0]

    def margins(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """B images → B x h x w margins (nearest positive minus nearest negative cosine)."""
        if self.positives is None or self.negatives is None:
            raise PromptError("find-similar: add_examples() first")
        feats = self._embed(images)
        b, h, w, d = feats.shape
        flat = feats.reshape(-1, d)
        best_pos = (flat @ self.positives.T).max(dim=1).values
        if self.negatives.shape[0]:
            best_neg = (flat @ self.negatives.T).max(dim=1).values
        else:  # the marked region covers the whole example: no background to reject
            best_neg = torch.zeros_like(best_pos)
        return (best_pos - best_neg).reshape(b, h, w)

    def search(
        self,
        images: Sequence[Image.Image],
        *,
        segmenter: Any = None,
        batch_size: int = 8,
    ) -> SearchResult:
        """Rank regions similar to the examples across ``images``."""
        cfg = self.config
        side = self.frame.size
        regions: list[FoundRegion] = []
        heatmaps: list[NDArray[np.float32]] = []
        for start in range(0, len(images), batch_size):
            batch = list(images[start : start + batch_size])
            framed = upsample_grid(self.margins(batch), side).cpu().numpy()
            for j, (image, m) in enumerate(zip(batch, framed, strict=True)):
                heat = map_to_image(m, self.frame, image.size)
                heatmaps.append(heat)
                regions.extend(self._regions(start + j, m, heat))
        regions.sort(key=lambda r: (-r.score, r.image, r.box))
        regions = regions[: cfg.top_k]
        if segmenter is not None and regions:
            refine_with_segmenter(regions, images, segmenter)
        return SearchResult(regions=regions, heatmaps=heatmaps)

    def _regions(
        self, index: int, framed: NDArray[np.float32], heat: NDArray[np.float32]
    ) -> list[FoundRegion]:
        cfg = self.config
        above = heat > cfg.threshold
        labels, _ = ndimage.label(above, structure=np.ones((3, 3), dtype=int))
        out = []
        total = heat.size
        for k, sl in enumerate(ndimage.find_objects(labels), start=1):
            if sl is None:
                continue
            region = labels[sl] == k
            area = float(region.sum()) / total
            if area < cfg.min_area:
                continue
            mask = np.zeros_like(above)
            mask[sl] = region
            ys, xs = sl
            out.append(
                FoundRegion(
                    image=index,
                    box=(float(xs.start), float(ys.start), float(xs.stop), float(ys.stop)),
                    score=float(heat[sl][region].max()),
                    area=area,
                    mask=mask,
                )
            )
        return out


def refine_with_segmenter(
    regions: list[FoundRegion], images: Sequence[Image.Image], segmenter: Any
) -> None:
    """Replace each region's mask by the segmenter's mask for its box (one decode per image)."""
    from vprompt.prompts.spatial import Box, ObjectPrompt, PromptSet

    by_image: dict[int, list[FoundRegion]] = {}
    for r in regions:
        by_image.setdefault(r.image, []).append(r)
    for index, found in by_image.items():
        prompts = PromptSet(
            [ObjectPrompt(boxes=(Box(*r.box),)) for r in found], image_size=images[index].size
        )
        seg = segmenter.segment(images[index], prompts, multimask=True)
        for i, r in enumerate(found):
            r.mask = seg.mask(i)
            r.refined = True


def region_mask(
    size: tuple[int, int],
    *,
    boxes: Sequence[tuple[float, float, float, float]] = (),
    masks: Sequence[NDArray[np.bool_]] = (),
    scribbles: Sequence[Any] = (),
) -> NDArray[np.bool_]:
    """The union of marked boxes, masks and scribbles on an image of ``size`` = (W, H)."""
    w, h = size
    out = np.zeros((h, w), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise PromptError(
                f"box {x0:g},{y0:g},{x1:g},{y1:g} is not inside the {w}x{h} image "
                "(expected 0 <= X0 < X1 <= width, 0 <= Y0 < Y1 <= height)"
            )
        out[int(np.floor(y0)) : int(np.ceil(y1)), int(np.floor(x0)) : int(np.ceil(x1))] = True
    for m in masks:
        arr = np.asarray(m, dtype=bool)
        if arr.shape != (h, w):
            raise PromptError(f"mask is {arr.shape[1]}x{arr.shape[0]}, the image {w}x{h}")
        out |= arr
    for s in scribbles:
        out |= s.to_mask((w, h))
    if not out.any():
        raise PromptError("the marked region is empty (give a box, a mask or a scribble)")
    return out
