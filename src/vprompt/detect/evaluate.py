"""Text-prompted detection on a COCO-format set, scored by pycocotools' COCOeval.

Every category name is a text query. A detector that takes at most ``max_queries`` queries per
call sees the names in consecutive chunks of that size (in category-id order); each chunk's
labels are mapped back to their category ids, the chunks' detections joined, and the
:class:`~vprompt.detect.result.DetectionFilter` (threshold, NMS per label, top-k) applied once
per image to the whole. The detections become a COCO results file and are scored with
``COCOeval`` (``bbox``, and ``segm`` when the detector returns masks and every ground-truth
object has a segmentation), exactly as the COCO benchmark does.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from tqdm import tqdm

from vprompt.data.images import DEFAULT_MAX_PIXELS
from vprompt.detect.coco_data import CocoDetectionSet
from vprompt.detect.result import DetectionFilter, Detections
from vprompt.errors import ConfigError, DatasetError, PromptError
from vprompt.segment.outputs import write_json_atomic

IouType = Literal["bbox", "segm"]
# (image, text queries) → detections whose labels index those queries
DetectFn = Callable[[Image.Image, list[str]], Detections]
# COCO's own evaluation keeps up to 100 detections per image, scored from 0 up.
EVAL_FILTER = DetectionFilter(score_threshold=0.0, nms_iou=0.5, top_k=100)


@dataclass(frozen=True)
class CocoMetrics:
    """COCOeval's summary for one IoU type. None: undefined (no ground truth in that range).

    Attributes:
        ap: AP averaged over IoU 0.50:0.95 (the COCO AP).
        ap50: AP at IoU 0.50.
        ap75: AP at IoU 0.75.
        ap_small: AP of objects under 32² px area.
        ap_medium: AP of objects of 32² to 96² px.
        ap_large: AP of objects over 96² px.
        ar100: Recall with at most 100 detections per image, averaged over IoUs.
        per_category: AP (IoU 0.50:0.95) of each category, by name.
    """

    ap: float | None
    ap50: float | None
    ap75: float | None
    ap_small: float | None
    ap_medium: float | None
    ap_large: float | None
    ar100: float | None
    per_category: dict[str, float | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "AP": self.ap,
            "AP50": self.ap50,
            "AP75": self.ap75,
            "APs": self.ap_small,
            "APm": self.ap_medium,
            "APl": self.ap_large,
            "AR100": self.ar100,
            "per_category": self.per_category,
        }


@dataclass(frozen=True)
class DetectionReport:
    """What :func:`evaluate_detection` measured.

    Attributes:
        bbox: Box AP.
        segm: Mask AP, or None (no masks returned, or ground truth without segmentations).
        images: Images evaluated.
        detections: Detections kept after the filter, over all images.
        notes: Why something was not measured.
    """

    bbox: CocoMetrics
    segm: CocoMetrics | None
    images: int
    detections: int
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "bbox": self.bbox.to_dict(),
            "segm": None if self.segm is None else self.segm.to_dict(),
            "images": self.images,
            "detections": self.detections,
            "notes": list(self.notes),
        }


def _defined(value: float) -> float | None:
    return None if value < 0 else float(value)  # COCOeval writes -1 for "undefined"


def run_cocoeval(
    ground_truth: Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    *,
    iou_type: IouType = "bbox",
    image_ids: Sequence[int] | None = None,
    category_ids: Sequence[int] | None = None,
) -> CocoMetrics:
    """Score COCO results against a ground-truth dict with pycocotools (its output silenced).

    Args:
        ground_truth: ``{"images", "annotations", "categories"}`` as COCO writes them.
        results: Results-file entries (``image_id``, ``category_id``, ``bbox`` and / or
            ``segmentation``, ``score``); not modified.
        iou_type: ``bbox`` or ``segm`` (then each entry's ``bbox`` is dropped, so areas come
            from the masks, as COCO's segm evaluation expects).
        image_ids: Evaluate only these images (default: all of ``ground_truth``).
        category_ids: Evaluate only these categories (default: all).
    """
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise ConfigError(
            "COCO AP needs pycocotools, which is not installed (pip install 'vprompt[detect]')"
        ) from None

    entries = [
        dict(r) for r in copy.deepcopy(list(results))
    ]  # loadRes writes ids and areas into them
    if iou_type == "segm":
        for entry in entries:
            entry.pop("bbox", None)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(dict(ground_truth))
        gt.createIndex()
        if entries:
            dt = gt.loadRes(entries)
        else:  # loadRes refuses an empty list; no detections scores 0 wherever there is truth
            dt = COCO()
            dt.dataset = {
                "images": gt.dataset["images"],
                "categories": gt.dataset["categories"],
                "annotations": [],
            }
            dt.createIndex()
        evaluator = COCOeval(gt, dt, iouType=iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        if category_ids is not None:
            evaluator.params.catIds = sorted(int(c) for c in category_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    # precision: T IoUs x R recall points x K categories x A area ranges x M max-dets
    precision = evaluator.eval["precision"]
    names = {c["id"]: c["name"] for c in ground_truth["categories"]}
    per_category: dict[str, float | None] = {}
    for k, cat in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_category[names[cat]] = float(np.mean(p)) if p.size else None
    return CocoMetrics(
        ap=_defined(stats[0]),
        ap50=_defined(stats[1]),
        ap75=_defined(stats[2]),
        ap_small=_defined(stats[3]),
        ap_medium=_defined(stats[4]),
        ap_large=_defined(stats[5]),
        ar100=_defined(stats[8]),
        per_category=per_category,
    )


def chunks(names: Sequence[str], size: int) -> list[tuple[int, list[str]]]:
    """``(offset, names)`` for consecutive groups of at most ``size`` names (0: one group)."""
    if size < 0:
        raise PromptError(f"max_queries: expected an integer >= 0, got {size}")
    step = size or max(len(names), 1)
    return [(i, list(names[i : i + step])) for i in range(0, len(names), step)]


def check_detections(
    found: Any, image: Image.Image, queries: Sequence[str], what: str
) -> Detections:
    """``found`` if it is :class:`Detections` for ``queries`` on ``image``, else a PromptError."""
    if not isinstance(found, Detections):
        raise PromptError(f"{what} returned {type(found).__name__}; expected Detections")
    if len(found.queries) != len(queries):
        raise PromptError(
            f"{what} returned detections for {len(found.queries)} queries; expected "
            f"{len(queries)} (one per query given)"
        )
    if tuple(found.image_size) != image.size:
        raise PromptError(
            f"{what} returned detections for a {found.image_size[0]}x{found.image_size[1]} "
            f"image; expected {image.width}x{image.height} (boxes in original-image pixels)"
        )
    return found


def join_detections(parts: Sequence[tuple[int, Detections]], queries: Sequence[str]) -> Detections:
    """One :class:`Detections` over ``queries`` from per-chunk ones (labels shifted by each
    chunk's offset). Masks are kept when every non-empty part has them."""
    size = parts[0][1].image_size
    full = [(o, d) for o, d in parts if len(d)]
    masks = None
    if full and all(d.masks is not None for _, d in full):
        masks = np.concatenate([d.masks for _, d in full if d.masks is not None])
    return Detections(
        boxes=np.concatenate([d.boxes for _, d in parts]).astype(np.float32).reshape(-1, 4),
        scores=np.concatenate([d.scores for _, d in parts]).astype(np.float32),
        labels=np.concatenate([d.labels + o for o, d in parts]).astype(np.int64),
        queries=tuple(queries),
        image_size=size,
        masks=masks,
    )


def write_report(
    folder: str | Path, results: list[dict[str, Any]], metrics: Mapping[str, Any]
) -> None:
    """``results.json`` (COCO results file) and ``metrics.json`` in ``folder``, atomically."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(results, out / "results.json")
    write_json_atomic(dict(metrics), out / "metrics.json", indent=2)


def evaluate_detection(
    detect_fn: DetectFn,
    dataset: CocoDetectionSet,
    *,
    filter: DetectionFilter = EVAL_FILTER,
    max_queries: int = 0,
    image_ids: Sequence[int] | None = None,
    output: str | Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> DetectionReport:
    """Detect every category by name on every image and score the result with COCOeval.

    Args:
        detect_fn: ``(image, queries) -> Detections`` with labels indexing ``queries``
            (unfiltered or filtered: the filter here runs either way).
        dataset: The ground truth (:func:`~vprompt.detect.coco_data.read_coco_detection`).
        filter: Post-processing per image over all categories (COCO keeps 100 per image).
        max_queries: Most queries per call (the detector's ``capabilities.max_queries``);
            0: all names at once.
        image_ids: Evaluate only these images (default: all).
        output: Folder for ``results.json`` and ``metrics.json`` (default: none written).
        max_pixels: Larger images are refused.
        progress: Show a progress bar over images.

    Raises:
        DatasetError: Unknown ``image_ids``, or an image whose size differs from its entry.
        PromptError: ``detect_fn`` returned something other than detections for its queries.
    """
    names = [c.name for c in dataset.categories]
    category_ids = [c.id for c in dataset.categories]
    groups = chunks(names, max_queries)
    images = list(dataset.images)
    if image_ids is not None:
        wanted = {int(i) for i in image_ids}
        unknown = sorted(wanted - {i.id for i in images})
        if unknown:
            raise DatasetError(f"{dataset.annotation_file}: no images with ids {unknown[:5]}")
        images = [i for i in images if i.id in wanted]
    results: list[dict[str, Any]] = []
    with_masks = without_masks = 0
    for entry in tqdm(images, desc="detect", unit="img", disable=not progress):
        image = dataset.load(entry, max_pixels=max_pixels)
        parts = [
            (offset, check_detections(detect_fn(image, group), image, group, "detect_fn"))
            for offset, group in groups
        ]
        found = join_detections(parts, names).filtered(filter)
        if len(found):
            with_masks += found.masks is not None
            without_masks += found.masks is None
        results.extend(found.to_coco_results(image_id=entry.id, category_ids=category_ids))
    gt = dataset.ground_truth()
    evaluated = [i.id for i in images]
    bbox = run_cocoeval(gt, results, iou_type="bbox", image_ids=evaluated)
    notes: list[str] = []
    segm = None
    if with_masks and without_masks:
        notes.append(
            f"no mask AP: {without_masks} of {with_masks + without_masks} images "
            "came back without masks"
        )
    elif with_masks and not dataset.has_segmentation:
        notes.append("no mask AP: some ground-truth annotations have no segmentation")
    elif with_masks:
        segm = run_cocoeval(gt, results, iou_type="segm", image_ids=evaluated)
    report = DetectionReport(
        bbox=bbox, segm=segm, images=len(images), detections=len(results), notes=tuple(notes)
    )
    if output is not None:
        write_report(output, results, report.to_dict())
    return report
