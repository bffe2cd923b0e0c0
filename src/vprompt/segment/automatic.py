"""Segment everything: SAM's automatic mask generator over a frozen promptable segmenter.

The algorithm and defaults are those of segment-anything's ``SamAutomaticMaskGenerator``
(Kirillov et al., 2023):

1. **Crops.** Layer 0 is the whole image; layer ``i >= 1`` tiles it with ``2**i x 2**i``
   overlapping crops (:func:`crop_boxes`).
2. **Points.** Each layer has an ``n x n`` grid of pixel-centre points (offset ``1 / (2n)``,
   :func:`point_grid`), scaled to the crop; ``n = points_per_side // factor**layer``.
3. **Decode.** Each crop is embedded once (the segmenter's cache makes repeats free) and its
   points are decoded ``points_per_batch`` at a time, one positive point per object, with all
   three multimask candidates kept as separate candidates.
4. **Filter per batch.** Predicted IoU ``> pred_iou_thresh`` and stability
   ``>= stability_score_thresh`` (each skipped when its threshold is 0), threshold the logits at
   0, drop empty masks, and, for crops other than the whole image, drop masks whose box lies
   within 20 px of a crop edge that is not an image edge.
5. **Deduplicate.** Box NMS within each crop (score: predicted IoU), then across crops
   preferring smaller crops (score: ``1 / crop area``).
6. **Clean up** (``min_mask_region_area > 0``): fill holes, then remove islands, smaller than the
   area (8-connected), keeping the largest island if all are small; then NMS again with
   unchanged masks scored 1 and changed ones 0, so clean masks win over repaired duplicates.

Memory stays bounded: each batch's masks are filtered as soon as they are decoded and survivors
are kept as bool patches cut to their bounding box; full-size masks are built only for the
records returned.

Two deliberate differences from the reference code: ``bbox`` is the true COCO box
(``w = x_max - x_min + 1``; SAM reports one pixel less), and empty masks are never returned.
NMS itself uses SAM's inclusive boxes, so what survives matches the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image
from tqdm.auto import tqdm

from vprompt.data.images import load_image
from vprompt.errors import ConfigError
from vprompt.prompts.spatial import ObjectPrompt, Point, PromptSet
from vprompt.segment.segmenter import (
    STABILITY_OFFSET,
    ImageEmbedding,
    Segmentation,
    Segmenter,
    stability_score,
    upsample_logits,
)

EDGE_TOLERANCE = 20.0  # px: SAM's distance for "touches the crop edge"
_UPSAMPLE_CHUNK = 24  # candidates upsampled at once when stability is recomputed

XYXY = tuple[int, int, int, int]
XYWH = tuple[int, int, int, int]


class PointSegmenter(Protocol):
    """What the generator needs from a segmenter (:class:`Segmenter` fits)."""

    def embed_image(self, image: Image.Image) -> ImageEmbedding: ...

    def decode(
        self, image: ImageEmbedding, prompts: PromptSet, *, multimask: bool = True
    ) -> Segmentation: ...


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}: expected an int >= {minimum}, got {value!r}")


def _check_float(name: str, value: object, low: float, high: float, *, open_low: bool) -> None:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    x = float(value) if number else math.nan  # type: ignore[arg-type]
    above = x > low if open_low else x >= low
    if not (math.isfinite(x) and above and x <= high):
        bounds = f"{'(' if open_low else '['}{low}, {high}{')' if math.isinf(high) else ']'}"
        raise ConfigError(f"{name}: expected a number in {bounds}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class AutomaticMaskConfig:
    """The generator's options, defaulting to SAM's published settings (tuned for ViT-H).

    Args:
        points_per_side: Grid points along each side of the image (``n**2`` points in all).
        points_per_batch: Points decoded together (memory vs. speed).
        pred_iou_thresh: Keep candidates whose predicted IoU is above this (0 disables).
        stability_score_thresh: Keep candidates whose stability is at least this (0 disables).
        stability_score_offset: How far the cutoff shifts (in logits) for the stability score.
            Values other than the segmenter's 1.0 need a :class:`Segmenter`, whose logits are
            upsampled again to score them.
        box_nms_thresh: Box IoU above which NMS drops a duplicate within a crop.
        crop_n_layers: Crop layers beyond the whole image (layer ``i`` has ``4**i`` crops).
        crop_nms_thresh: Box IoU above which NMS drops a duplicate across crops.
        crop_overlap_ratio: Overlap of first-layer crops, as a fraction of the image's short
            side (later layers scale it down).
        crop_n_points_downscale_factor: Layer ``i`` uses ``points_per_side // factor**i``.
        min_mask_region_area: Fill holes and remove islands smaller than this (0 disables).
    """

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0

    def __post_init__(self) -> None:
        _check_int("points_per_side", self.points_per_side, 1)
        _check_int("points_per_batch", self.points_per_batch, 1)
        _check_int("crop_n_layers", self.crop_n_layers, 0)
        _check_int("crop_n_points_downscale_factor", self.crop_n_points_downscale_factor, 1)
        _check_int("min_mask_region_area", self.min_mask_region_area, 0)
        for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh"):
            _check_float(name, getattr(self, name), 0.0, 1.0, open_low=False)
        _check_float("crop_nms_thresh", self.crop_nms_thresh, 0.0, 1.0, open_low=False)
        offset = self.stability_score_offset
        _check_float("stability_score_offset", offset, 0.0, math.inf, open_low=True)
        _check_float("crop_overlap_ratio", self.crop_overlap_ratio, 0.0, 1.0, open_low=False)
        if self.crop_overlap_ratio >= 1.0:
            raise ConfigError(
                f"crop_overlap_ratio: expected a number in [0, 1), got {self.crop_overlap_ratio}"
            )
        last = self.points_per_side // self.crop_n_points_downscale_factor**self.crop_n_layers
        if last < 1:
            raise ConfigError(
                f"crop layer {self.crop_n_layers} would get no points: points_per_side "
                f"{self.points_per_side} // crop_n_points_downscale_factor "
                f"{self.crop_n_points_downscale_factor}**{self.crop_n_layers} is 0"
            )

    def work(self) -> tuple[int, int]:
        """``(point prompts, crops)`` one image costs: layer ``i`` has ``4**i`` crops, each
        decoding ``points_per_layer()[i] ** 2`` points (and encoding its crop once)."""
        per_side = self.points_per_layer()
        prompts = sum(4**i * n * n for i, n in enumerate(per_side))
        return prompts, sum(4**i for i in range(len(per_side)))

    def points_per_layer(self) -> list[int]:
        """Grid side for each crop layer (layer 0 is the whole image)."""
        factor = self.crop_n_points_downscale_factor
        return [self.points_per_side // factor**i for i in range(self.crop_n_layers + 1)]


@dataclass(frozen=True, eq=False)
class MaskRecord:
    """One automatically found mask.

    Attributes:
        segmentation: H x W bool mask of the original image.
        area: Foreground pixels (``segmentation.sum()``).
        bbox: Tight COCO box ``(x, y, w, h)`` in pixels: the mask fills
            ``segmentation[y : y + h, x : x + w]``'s extent.
        predicted_iou: The decoder's predicted IoU.
        stability_score: IoU of the mask thresholded at ``±stability_score_offset``.
        point_coords: The prompt point ``(x, y)`` in original-image pixels.
        crop_box: The crop it was found in, ``(x, y, w, h)``.
    """

    segmentation: NDArray[np.bool_]
    area: int
    bbox: XYWH
    predicted_iou: float
    stability_score: float
    point_coords: tuple[float, float]
    crop_box: XYWH


@dataclass(frozen=True)
class Crop:
    """One crop: ``box`` ``(x0, y0, x1, y1)`` (end exclusive) of crop layer ``layer``."""

    box: XYXY
    layer: int

    @property
    def xywh(self) -> XYWH:
        x0, y0, x1, y1 = self.box
        return x0, y0, x1 - x0, y1 - y0


def point_grid(n: int) -> NDArray[np.float64]:
    """n² x 2 points ``(x, y)`` in [0, 1]², at the centres of an n x n grid, row by row."""
    _check_int("points per side", n, 1)
    offset = 1.0 / (2 * n)
    side = np.linspace(offset, 1.0 - offset, n)
    xs, ys = np.meshgrid(side, side)  # n x n each, x varying along rows
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def crop_boxes(image_size: tuple[int, int], n_layers: int, overlap_ratio: float) -> list[Crop]:
    """The whole image, then ``(2**i)²`` overlapping crops for each layer ``i = 1..n_layers``.

    Layer ``i`` (``m = 2**i`` crops per side) overlaps neighbours by
    ``int(overlap_ratio * short_side * 2 / m)`` px; each crop is
    ``ceil((overlap * (m - 1) + side) / m)`` long, clipped to the image. Crops are ordered by
    layer, then by x0, then by y0 (SAM's order).
    """
    w, h = image_size
    crops = [Crop((0, 0, w, h), 0)]
    short = min(w, h)
    for layer in range(1, n_layers + 1):
        m = 2**layer
        overlap = int(overlap_ratio * short * (2 / m))
        crop_w = math.ceil((overlap * (m - 1) + w) / m)
        crop_h = math.ceil((overlap * (m - 1) + h) / m)
        for i in range(m):
            for j in range(m):
                x0, y0 = int((crop_w - overlap) * i), int((crop_h - overlap) * j)
                box = (x0, y0, min(x0 + crop_w, w), min(y0 + crop_h, h))
                if box[2] > box[0] and box[3] > box[1]:  # tiny images can leave empty tiles
                    crops.append(Crop(box, layer))
    return crops


def mask_boxes(masks: NDArray[np.bool_]) -> NDArray[np.int64]:
    """M x 4 inclusive boxes ``(x0, y0, x_max, y_max)`` of non-empty M x H x W masks."""
    rows: NDArray[np.bool_] = np.asarray(masks.any(axis=2))  # M x H
    cols: NDArray[np.bool_] = np.asarray(masks.any(axis=1))  # M x W
    h, w = masks.shape[1:]
    y0, x0 = rows.argmax(axis=1), cols.argmax(axis=1)
    y1, x1 = h - 1 - rows[:, ::-1].argmax(axis=1), w - 1 - cols[:, ::-1].argmax(axis=1)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.int64)


def remove_small_regions(
    mask: NDArray[np.bool_], min_area: int, mode: Literal["holes", "islands"]
) -> tuple[NDArray[np.bool_], bool]:
    """Fill holes (``mode="holes"``) or remove islands smaller than ``min_area`` pixels.

    Regions are 8-connected. When every island is small, the largest one stays.

    Returns:
        The mask and whether it changed.
    """
    if mode not in ("holes", "islands"):
        raise ConfigError(f"remove_small_regions mode: expected 'holes' or 'islands', got {mode!r}")
    from scipy import ndimage  # lazy: slow to import, needed only for cleanup

    holes = mode == "holes"
    labels, n = ndimage.label(~mask if holes else mask, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]  # label 0 is the other class
    small = np.flatnonzero(sizes < min_area) + 1
    if small.size == 0:
        return mask, False
    if holes:
        return mask | np.isin(labels, small), True
    keep = np.flatnonzero(sizes >= min_area) + 1
    if keep.size == 0:
        keep = np.array([int(sizes.argmax()) + 1])
    return np.isin(labels, keep), True


def _nms(boxes: NDArray[np.int64], scores: NDArray[np.floating], thresh: float) -> NDArray[np.intp]:
    """Greedy box NMS; kept indices by decreasing score, ties broken by input order."""
    from torchvision.ops import nms  # lazy: torchvision is slow to import

    if len(boxes) == 0:
        return np.zeros(0, dtype=np.intp)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    rank = torch.arange(len(order), 0, -1, dtype=torch.float64)  # strictly decreasing: no ties
    keep = nms(torch.from_numpy(boxes[order]).double(), rank, float(thresh))
    return order[keep.numpy()].astype(np.intp)


@dataclass
class _Candidates:
    """Surviving masks as bool patches cut to their inclusive ``boxes`` (M x 4, x0 y0 x1 y1)."""

    boxes: NDArray[np.int64] = field(default_factory=lambda: np.zeros((0, 4), np.int64))
    iou: NDArray[np.float32] = field(default_factory=lambda: np.zeros(0, np.float32))
    stability: NDArray[np.float32] = field(default_factory=lambda: np.zeros(0, np.float32))
    points: NDArray[np.float64] = field(default_factory=lambda: np.zeros((0, 2)))
    crops: NDArray[np.int64] = field(default_factory=lambda: np.zeros((0, 4), np.int64))
    patches: list[NDArray[np.bool_]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.patches)

    def take(self, idx: NDArray[np.intp]) -> _Candidates:
        return _Candidates(
            boxes=self.boxes[idx],
            iou=self.iou[idx],
            stability=self.stability[idx],
            points=self.points[idx],
            crops=self.crops[idx],
            patches=[self.patches[int(i)] for i in idx],
        )

    @staticmethod
    def concat(parts: list[_Candidates]) -> _Candidates:
        if not parts:
            return _Candidates()
        arrays = {
            f.name: np.concatenate([getattr(p, f.name) for p in parts])
            for f in fields(_Candidates)
            if f.name != "patches"
        }
        return _Candidates(**arrays, patches=[m for p in parts for m in p.patches])

    def full_mask(self, i: int, size: tuple[int, int]) -> NDArray[np.bool_]:
        """Candidate ``i`` as an H x W mask of an image of ``size`` (W, H)."""
        out = np.zeros((size[1], size[0]), dtype=bool)
        x0, y0, x1, y1 = (int(v) for v in self.boxes[i])
        out[y0 : y1 + 1, x0 : x1 + 1] = self.patches[i]
        return out


class GenerationStopped(Exception):
    """:meth:`AutomaticMaskGenerator.generate` stopped because ``should_stop`` said so."""


class AutomaticMaskGenerator:
    """Find every object in an image with a grid of single-point prompts (SAM's "everything").

    Args:
        segmenter: A :class:`Segmenter`, or any object with its ``embed_image`` and ``decode``.
        config: Options; SAM's published defaults when omitted.
    """

    def __init__(self, segmenter: PointSegmenter, *, config: AutomaticMaskConfig | None = None):
        self.segmenter = segmenter
        self.config = config if config is not None else AutomaticMaskConfig()
        if not isinstance(self.config, AutomaticMaskConfig):
            raise ConfigError(f"config: expected an AutomaticMaskConfig, got {self.config!r}")
        if self.config.stability_score_offset != STABILITY_OFFSET and not isinstance(
            segmenter, Segmenter
        ):
            raise ConfigError(
                f"stability_score_offset {self.config.stability_score_offset}: only a Segmenter "
                f"can rescore stability; other segmenters report it at {STABILITY_OFFSET}"
            )
        self.grids = [point_grid(n) for n in self.config.points_per_layer()]
        self.last_counts: dict[str, int] = {}
        self._should_stop: Callable[[], bool] | None = None

    @torch.inference_mode()
    def generate(
        self,
        image: Image.Image | str | Path,
        *,
        progress: bool = False,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[MaskRecord]:
        """Masks for everything in ``image``, in SAM's order (the NMS ranking).

        Args:
            image: A PIL image or an image file.
            progress: Show a progress bar over decoded batches.
            should_stop: Asked before every crop and every batch; True stops the work (a
                server whose client went away).

        Raises:
            GenerationStopped: ``should_stop`` said so.
        """
        rgb = image.convert("RGB") if isinstance(image, Image.Image) else load_image(image)
        cfg = self.config
        self._should_stop = should_stop
        # How many candidates each filter kept (reported when nothing is left).
        self.last_counts = dict.fromkeys(("decoded", "pred_iou", "stability", "non_empty"), 0)
        crops = crop_boxes(rgb.size, cfg.crop_n_layers, cfg.crop_overlap_ratio)
        batches = sum(-(-len(self.grids[c.layer]) // cfg.points_per_batch) for c in crops)
        with tqdm(total=batches, desc="automatic masks", unit="batch", disable=not progress) as bar:
            found = _Candidates.concat([self._process_crop(rgb, c, bar) for c in crops])
        if len(crops) > 1 and len(found):
            w = found.crops[:, 2] - found.crops[:, 0]
            h = found.crops[:, 3] - found.crops[:, 1]
            found = found.take(_nms(found.boxes, 1.0 / (w * h), cfg.crop_nms_thresh))
        if cfg.min_mask_region_area > 0 and len(found):
            found = self._clean_small_regions(found, rgb.size)
        return [self._record(found, i, rgb.size) for i in range(len(found))]

    def _check_stop(self) -> None:
        if self._should_stop is not None and self._should_stop():
            raise GenerationStopped("automatic mask generation was stopped")

    def _process_crop(self, rgb: Image.Image, crop: Crop, bar: tqdm) -> _Candidates:
        x0, y0, x1, y1 = crop.box
        full = crop.box == (0, 0, *rgb.size)
        piece = rgb if full else rgb.crop(crop.box)
        self._check_stop()
        emb = self.segmenter.embed_image(piece)
        points = self.grids[crop.layer] * np.array([[x1 - x0, y1 - y0]], dtype=np.float64)
        parts = []
        step = self.config.points_per_batch
        for start in range(0, len(points), step):
            self._check_stop()
            parts.append(self._process_batch(emb, points[start : start + step], crop, rgb.size))
            bar.update(1)
        found = _Candidates.concat(parts)
        found = found.take(_nms(found.boxes, found.iou, self.config.box_nms_thresh))
        shift = np.array([x0, y0, x0, y0], dtype=np.int64)
        found.boxes = found.boxes + shift
        found.points = found.points + shift[:2]
        found.crops = np.tile(np.asarray(crop.box, dtype=np.int64), (len(found), 1))
        return found

    def _process_batch(
        self,
        emb: ImageEmbedding,
        points: NDArray[np.float64],
        crop: Crop,
        image_size: tuple[int, int],
    ) -> _Candidates:
        """Decode, filter and cut one batch of points; boxes and points stay in crop pixels."""
        cfg = self.config
        prompts = PromptSet(
            [ObjectPrompt(points=[Point(float(x), float(y))]) for x, y in points],
            image_size=emb.image_size,
        )
        seg = self.segmenter.decode(emb, prompts, multimask=True)
        k = seg.masks.shape[1]
        masks = seg.masks.reshape(-1, *seg.masks.shape[2:])  # NK x h x w
        iou = seg.iou.reshape(-1).astype(np.float32)
        cand_points = np.repeat(points, k, axis=0)
        keep = np.arange(len(iou))
        counts = self.last_counts
        counts["decoded"] += len(keep)
        if cfg.pred_iou_thresh > 0.0:
            keep = keep[iou[keep] > cfg.pred_iou_thresh]
        counts["pred_iou"] += len(keep)
        if cfg.stability_score_offset == STABILITY_OFFSET:
            stab = seg.stability.reshape(-1).astype(np.float32)[keep]
        else:
            stab = self._rescore(emb, seg.logits.reshape(-1, *seg.logits.shape[2:])[keep])
        if cfg.stability_score_thresh > 0.0:
            ok = stab >= cfg.stability_score_thresh
            keep, stab = keep[ok], stab[ok]
        counts["stability"] += len(keep)
        nonempty = np.asarray(masks.any(axis=(1, 2)), dtype=bool)[keep]
        keep, stab = keep[nonempty], stab[nonempty]
        counts["non_empty"] += len(keep)
        boxes = mask_boxes(masks)[keep]
        edge = _near_crop_edge(boxes, crop.box, image_size)  # never true for the whole image
        keep, stab, boxes = keep[~edge], stab[~edge], boxes[~edge]
        patches = [
            masks[i, b[1] : b[3] + 1, b[0] : b[2] + 1].copy()
            for i, b in zip(keep, boxes, strict=True)
        ]  # copies release the batch's full-size masks
        return _Candidates(
            boxes=boxes,
            iou=iou[keep],
            stability=stab.astype(np.float32),
            points=cand_points[keep],
            crops=np.zeros((len(keep), 4), np.int64),
            patches=patches,
        )

    def _rescore(self, emb: ImageEmbedding, logits: NDArray[np.float32]) -> NDArray[np.float32]:
        """Stability at the configured offset from M x L x L low-res logits, upsampled again."""
        assert isinstance(self.segmenter, Segmenter)  # checked in __init__
        plan = self.segmenter.backbone.frame.postprocess_sizes(emb.image_size)
        out = np.zeros(len(logits), dtype=np.float32)
        for start in range(0, len(logits), _UPSAMPLE_CHUNK):
            low = torch.from_numpy(logits[start : start + _UPSAMPLE_CHUNK])[:, None]  # M x 1 x L²
            full = upsample_logits(low, plan)
            score = stability_score(full, offset=self.config.stability_score_offset)
            out[start : start + len(low)] = score[:, 0].numpy()
        return out

    def _clean_small_regions(self, found: _Candidates, size: tuple[int, int]) -> _Candidates:
        """Fill small holes, remove small islands, then NMS preferring untouched masks."""
        area = self.config.min_mask_region_area
        scores = np.zeros(len(found), dtype=np.float32)
        boxes, patches = found.boxes.copy(), list(found.patches)
        for i in range(len(found)):
            mask, filled = remove_small_regions(found.full_mask(i, size), area, "holes")
            mask, trimmed = remove_small_regions(mask, area, "islands")
            scores[i] = 0.0 if filled or trimmed else 1.0
            if filled or trimmed:
                b = mask_boxes(mask[None])[0]
                boxes[i], patches[i] = b, mask[b[1] : b[3] + 1, b[0] : b[2] + 1].copy()
        cleaned = _Candidates(
            boxes=boxes,
            iou=found.iou,
            stability=found.stability,
            points=found.points,
            crops=found.crops,
            patches=patches,
        )
        thresh = max(self.config.box_nms_thresh, self.config.crop_nms_thresh)
        return cleaned.take(_nms(boxes, scores, thresh))

    @staticmethod
    def _record(found: _Candidates, i: int, size: tuple[int, int]) -> MaskRecord:
        x0, y0, x1, y1 = (int(v) for v in found.boxes[i])
        c = [int(v) for v in found.crops[i]]
        return MaskRecord(
            segmentation=found.full_mask(i, size),
            area=int(found.patches[i].sum()),
            bbox=(x0, y0, x1 - x0 + 1, y1 - y0 + 1),
            predicted_iou=float(found.iou[i]),
            stability_score=float(found.stability[i]),
            point_coords=(float(found.points[i, 0]), float(found.points[i, 1])),
            crop_box=(c[0], c[1], c[2] - c[0], c[3] - c[1]),
        )


def _near_crop_edge(
    boxes: NDArray[np.int64], crop: XYXY, image_size: tuple[int, int]
) -> NDArray[np.bool_]:
    """M: boxes (inclusive, crop pixels) within 20 px of a crop edge that is no image edge."""
    x0, y0, _, _ = crop
    full = boxes + np.array([x0, y0, x0, y0])
    crop_edge = np.abs(full - np.asarray(crop)) <= EDGE_TOLERANCE
    image_edge = np.abs(full - np.array([0, 0, *image_size])) <= EDGE_TOLERANCE
    return np.asarray((crop_edge & ~image_edge).any(axis=1), dtype=bool)


__all__ = [
    "AutomaticMaskConfig",
    "AutomaticMaskGenerator",
    "Crop",
    "MaskRecord",
    "PointSegmenter",
    "crop_boxes",
    "mask_boxes",
    "point_grid",
    "remove_small_regions",
]
