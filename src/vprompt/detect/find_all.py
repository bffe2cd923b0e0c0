"""Image-guided "find all similar" on a COCO-format set: one exemplar box per category.

Per category, the exemplar is chosen by a fixed rule:

1. The candidate images are those with at least one non-crowd instance of the category,
   sorted by image id.
2. One of them is drawn with ``numpy.random.default_rng([seed, category_id])`` (so a
   category's choice depends only on the seed and its own id, not on the other categories).
3. In that image, the instance with the largest box area is the exemplar (ties: the lowest
   annotation id); its box is clipped to the image.

The detector then looks for that exemplar on every *other* image of the set (with or without
the category, so false positives count), one call per image and category, and each category's
AP is computed with COCOeval on those other images only. The report gives the AP per category,
its mean over categories (mAP) and which image and box was each category's exemplar.
A category found in one image only has no other image to search and is skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from vprompt.backbones.detection import Exemplar
from vprompt.data.images import DEFAULT_MAX_PIXELS
from vprompt.detect.coco_data import CocoAnnotation, CocoDetectionSet
from vprompt.detect.evaluate import (
    EVAL_FILTER,
    CocoMetrics,
    check_detections,
    run_cocoeval,
    write_report,
)
from vprompt.detect.result import DetectionFilter, Detections
from vprompt.errors import DatasetError

# (target image, exemplars) → detections; every label stands for the exemplar's concept
FindFn = Callable[[Image.Image, list[Exemplar]], Detections]


@dataclass(frozen=True)
class ExemplarChoice:
    """The exemplar of one category: its image, annotation and ``x0, y0, x1, y1`` box."""

    category_id: int
    category: str
    image_id: int
    file_name: str
    annotation_id: int
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class FindAllReport:
    """Per-category AP on the images other than the exemplar's, and their means.

    Attributes:
        map: Mean over categories of AP at IoU 0.50:0.95 (None: no category evaluated).
        map50: Mean over categories of AP at IoU 0.50.
        per_category: Category name → its metrics on the other images.
        exemplars: Category name → the exemplar used.
        skipped: Category name → why it was not evaluated.
        seed: The seed of the exemplar choice.
    """

    map: float | None
    map50: float | None
    per_category: dict[str, CocoMetrics]
    exemplars: dict[str, ExemplarChoice]
    skipped: dict[str, str]
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "mAP": self.map,
            "mAP50": self.map50,
            "seed": self.seed,
            "per_category": {
                name: {
                    "AP": m.ap,
                    "AP50": m.ap50,
                    "AP75": m.ap75,
                    "AR100": m.ar100,
                    "exemplar": {
                        "image_id": self.exemplars[name].image_id,
                        "file_name": self.exemplars[name].file_name,
                        "annotation_id": self.exemplars[name].annotation_id,
                        "box": [round(v, 2) for v in self.exemplars[name].box],
                    },
                }
                for name, m in self.per_category.items()
            },
            "skipped": self.skipped,
        }


def _largest(annotations: Sequence[CocoAnnotation]) -> CocoAnnotation:
    return min(annotations, key=lambda a: (-a.bbox[2] * a.bbox[3], a.id))


def choose_exemplars(
    dataset: CocoDetectionSet, *, seed: int = 0
) -> tuple[dict[int, ExemplarChoice], dict[str, str]]:
    """Each category's exemplar by the rule in the module docstring.

    Returns:
        Category id → its exemplar, and category name → why it has none (no non-crowd
        instance, or instances in one image only).
    """
    by_category: dict[int, dict[int, list[CocoAnnotation]]] = {}
    for a in dataset.annotations:
        if not a.iscrowd:
            by_category.setdefault(a.category_id, {}).setdefault(a.image_id, []).append(a)
    chosen: dict[int, ExemplarChoice] = {}
    skipped: dict[str, str] = {}
    for category in dataset.categories:
        per_image = by_category.get(category.id, {})
        candidates = sorted(per_image)
        if not candidates:
            skipped[category.name] = "no non-crowd instance"
            continue
        if len(candidates) < 2:
            skipped[category.name] = "instances in one image only (nothing left to find)"
            continue
        pick = int(np.random.default_rng([seed, category.id]).integers(len(candidates)))
        image = dataset.image(candidates[pick])
        ann = _largest(per_image[image.id])
        x0, y0, x1, y1 = ann.box
        box = (
            max(x0, 0.0),
            max(y0, 0.0),
            min(x1, float(image.width)),
            min(y1, float(image.height)),
        )
        chosen[category.id] = ExemplarChoice(
            category_id=category.id,
            category=category.name,
            image_id=image.id,
            file_name=image.file_name,
            annotation_id=ann.id,
            box=box,
        )
    return chosen, skipped


def _mean(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def evaluate_find_all(
    detect_fn: FindFn,
    dataset: CocoDetectionSet,
    *,
    seed: int = 0,
    filter: DetectionFilter = EVAL_FILTER,
    output: str | Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> FindAllReport:
    """Run the find-all-similar protocol (module docstring) and score it with COCOeval.

    Args:
        detect_fn: ``(image, [exemplar]) -> Detections`` (one query: the exemplar's concept;
            every label counts for it).
        dataset: The ground truth (:func:`~vprompt.detect.coco_data.read_coco_detection`).
        seed: Seeds the exemplar choice.
        filter: Post-processing of each (image, category) call's detections.
        output: Folder for ``results.json`` and ``metrics.json``.
        max_pixels: Larger images are refused.
        progress: Show a progress bar over images.

    Raises:
        DatasetError: No category has an exemplar and another image to search.
        PromptError: ``detect_fn`` returned something other than detections for one query.
    """
    chosen, skipped = choose_exemplars(dataset, seed=seed)
    if not chosen:
        why = "; ".join(f"{name}: {reason}" for name, reason in skipped.items())
        raise DatasetError(f"{dataset.annotation_file}: no category can be evaluated ({why})")
    # Exemplar images stay decoded for the whole run: each is used on every other image.
    references = {
        image_id: dataset.load(dataset.image(image_id), max_pixels=max_pixels)
        for image_id in sorted({c.image_id for c in chosen.values()})
    }
    exemplars = {
        cid: Exemplar(image=references[c.image_id], box=c.box) for cid, c in chosen.items()
    }
    results: list[dict[str, Any]] = []
    for entry in tqdm(dataset.images, desc="find all", unit="img", disable=not progress):
        if entry.id in references:
            image = references[entry.id]
        else:
            image = dataset.load(entry, max_pixels=max_pixels)
        for cid, choice in chosen.items():
            if choice.image_id == entry.id:
                continue  # the exemplar's own image is not searched
            found = check_detections(
                detect_fn(image, [exemplars[cid]]), image, [choice.category], "detect_fn"
            )
            results.extend(
                found.filtered(filter).to_coco_results(image_id=entry.id, category_ids=[cid])
            )
    gt = dataset.ground_truth()
    all_ids = [i.id for i in dataset.images]
    per_category: dict[str, CocoMetrics] = {}
    for cid, choice in chosen.items():
        others = [i for i in all_ids if i != choice.image_id]
        mine = [r for r in results if r["category_id"] == cid]
        per_category[choice.category] = run_cocoeval(
            gt, mine, iou_type="bbox", image_ids=others, category_ids=[cid]
        )
    report = FindAllReport(
        map=_mean([m.ap for m in per_category.values()]),
        map50=_mean([m.ap50 for m in per_category.values()]),
        per_category=per_category,
        exemplars={c.category: c for c in chosen.values()},
        skipped=skipped,
        seed=seed,
    )
    if output is not None:
        write_report(output, results, report.to_dict())
    return report
