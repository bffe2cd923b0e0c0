"""One result type for every detector: boxes in original-image pixels, scores, labels, masks.

:class:`Detections` holds what any detector found on one image — text-prompted, exemplar-
prompted or a grounded expression — and owns the post-processing every model shares: score
threshold, non-maximum suppression (per label or across labels), top-k, and conversion to
COCO results and to box prompts for a segmenter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torchvision.ops import batched_nms, nms

from vprompt.backbones.detection import DetectorOutput
from vprompt.errors import PromptError
from vprompt.segment.outputs import encode_rle_compressed, mask_area


@dataclass(frozen=True)
class DetectionFilter:
    """The post-processing applied to a detector's candidates, in this order.

    Attributes:
        score_threshold: Keep scores ``>=`` this (in [0, 1]).
        nms_iou: Suppress a box overlapping a higher-scoring one by more than this IoU
            (1.0 turns NMS off).
        class_agnostic: Suppress across labels too (default: only within a label).
        top_k: Keep at most this many, best first (0: all).
    """

    score_threshold: float = 0.1
    nms_iou: float = 0.5
    class_agnostic: bool = False
    top_k: int = 100

    def __post_init__(self) -> None:
        for name in ("score_threshold", "nms_iou"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 1):
                flag = name.replace("_", "-")
                raise PromptError(f"{flag}: expected a number in [0, 1], got {value!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise PromptError(f"top-k: expected an integer >= 0, got {self.top_k!r}")


@dataclass(frozen=True, eq=False)
class Detections:
    """N detections on one ``W x H`` image, best score first after :meth:`filtered`.

    Attributes:
        boxes: N x 4 float32 ``x0, y0, x1, y1`` in original-image pixels.
        scores: N float32 in [0, 1].
        labels: N int64, indices into ``queries``.
        queries: What each label stands for: the text query, or ``exemplar K`` for the K-th
            exemplar group.
        image_size: ``(W, H)`` of the image.
        masks: N x H x W bool instance masks, or None.
    """

    boxes: NDArray[np.float32]
    scores: NDArray[np.float32]
    labels: NDArray[np.int64]
    queries: tuple[str, ...]
    image_size: tuple[int, int]
    masks: NDArray[np.bool_] | None = None

    def __post_init__(self) -> None:
        n = self.boxes.shape[0] if self.boxes.ndim == 2 else -1
        if self.boxes.shape != (n, 4) or self.scores.shape != (n,) or self.labels.shape != (n,):
            raise PromptError(
                f"detections: boxes {self.boxes.shape}, scores {self.scores.shape} and labels "
                f"{self.labels.shape} must be N x 4, N and N"
            )
        w, h = self.image_size
        if self.masks is not None and self.masks.shape != (n, h, w):
            raise PromptError(
                f"detections: masks {self.masks.shape} must be N x H x W = {(n, h, w)}"
            )
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.queries)):
            raise PromptError(
                f"detections: labels must index the {len(self.queries)} queries, got "
                f"{int(self.labels.min())}..{int(self.labels.max())}"
            )

    @classmethod
    def from_output(
        cls, output: DetectorOutput, *, queries: Sequence[str], image_size: tuple[int, int]
    ) -> Detections:
        """Wrap a backbone's raw candidates (unfiltered)."""
        masks = None if output.masks is None else output.masks.detach().cpu().numpy().astype(bool)
        return cls(
            boxes=output.boxes.detach().cpu().float().numpy().reshape(-1, 4),
            scores=output.scores.detach().cpu().float().numpy().reshape(-1),
            labels=output.labels.detach().cpu().long().numpy().reshape(-1),
            queries=tuple(queries),
            image_size=(int(image_size[0]), int(image_size[1])),
            masks=masks,
        )

    @classmethod
    def empty(cls, *, queries: Sequence[str], image_size: tuple[int, int]) -> Detections:
        return cls(
            boxes=np.zeros((0, 4), np.float32),
            scores=np.zeros(0, np.float32),
            labels=np.zeros(0, np.int64),
            queries=tuple(queries),
            image_size=image_size,
        )

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def select(self, index: Sequence[int] | NDArray[np.integer] | NDArray[np.bool_]) -> Detections:
        """The detections at ``index`` (positions or a boolean mask), in that order."""
        idx = np.asarray(index)
        if idx.dtype != bool:
            idx = idx.astype(np.int64).reshape(-1)
        return Detections(
            boxes=self.boxes[idx].reshape(-1, 4),
            scores=self.scores[idx].reshape(-1),
            labels=self.labels[idx].reshape(-1),
            queries=self.queries,
            image_size=self.image_size,
            masks=None if self.masks is None else self.masks[idx],
        )

    def filtered(self, options: DetectionFilter | None = None) -> Detections:
        """Threshold, then NMS, then top-k; the result is sorted by score (ties: input order)."""
        opt = options or DetectionFilter()
        keep = np.flatnonzero(self.scores >= opt.score_threshold)
        # Stable order by score, so equal scores keep the detector's order on every platform.
        keep = keep[np.argsort(-self.scores[keep], kind="stable")]
        if opt.nms_iou < 1.0 and keep.size > 1:
            boxes = torch.from_numpy(self.boxes[keep]).double()
            # Tiny descending offsets make torchvision's sort agree with the stable one above.
            scores = torch.from_numpy(self.scores[keep]).double()
            scores = scores - torch.arange(keep.size, dtype=torch.float64) * 1e-12
            if opt.class_agnostic:
                kept = nms(boxes, scores, opt.nms_iou)
            else:
                kept = batched_nms(boxes, scores, torch.from_numpy(self.labels[keep]), opt.nms_iou)
            keep = keep[np.sort(kept.numpy())]
        if opt.top_k:
            keep = keep[: opt.top_k]
        return self.select(keep)

    def of_label(self, label: int) -> Detections:
        return self.select(self.labels == label)

    def label_names(self) -> list[str]:
        return [self.queries[int(i)] for i in self.labels]

    def to_records(self, *, decimals: int = 2) -> list[dict[str, Any]]:
        """One JSON-ready dict per detection: box, score, label, query, area (with masks:
        the mask's pixel count, else the box's)."""
        records = []
        for i in range(len(self)):
            box = [round(float(v), decimals) for v in self.boxes[i]]
            area = (
                mask_area(self.masks[i])
                if self.masks is not None
                else round((box[2] - box[0]) * (box[3] - box[1]), decimals)
            )
            records.append(
                {
                    "box": box,
                    "score": round(float(self.scores[i]), 6),
                    "label": int(self.labels[i]),
                    "query": self.queries[int(self.labels[i])],
                    "area": area,
                }
            )
        return records

    def to_coco_results(
        self, *, image_id: int, category_ids: Sequence[int] | None = None
    ) -> list[dict[str, Any]]:
        """COCO results-file entries (``image_id``, ``category_id``, ``bbox`` as
        ``[x, y, w, h]``, ``score``, and compressed-RLE ``segmentation`` with masks).

        Args:
            category_ids: The COCO category id of each query (default: ``label + 1``).
        """
        if category_ids is not None and len(category_ids) != len(self.queries):
            raise PromptError(
                f"COCO results: {len(category_ids)} category ids for {len(self.queries)} queries"
            )
        out = []
        for i in range(len(self)):
            x0, y0, x1, y1 = (float(v) for v in self.boxes[i])
            label = int(self.labels[i])
            entry: dict[str, Any] = {
                "image_id": image_id,
                "category_id": int(category_ids[label]) if category_ids is not None else label + 1,
                "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                "score": round(float(self.scores[i]), 6),
            }
            if self.masks is not None:
                entry["segmentation"] = encode_rle_compressed(self.masks[i])
            out.append(entry)
        return out

    def with_masks(self, masks: NDArray[np.bool_]) -> Detections:
        """The same detections with instance masks (N x H x W)."""
        return Detections(
            boxes=self.boxes,
            scores=self.scores,
            labels=self.labels,
            queries=self.queries,
            image_size=self.image_size,
            masks=np.asarray(masks, dtype=bool),
        )


def box_iou(a: NDArray[np.floating], b: NDArray[np.floating]) -> NDArray[np.float64]:
    """IoU of every box in ``a`` (N x 4) with every box in ``b`` (M x 4), ``x0, y0, x1, y1``."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
