"""One-shot evaluation of in-context segmentation (the PerSeg protocol PerSAM reports).

Per concept, the first image (sorted by name) and its mask are the reference; every other
image of the concept is a target, scored by IoU against its own mask. The report gives the
mean IoU per concept and mIoU, the mean over concepts (so a concept with many images does not
dominate), and the overall IoU over all targets.

A data folder is one concept (``images/`` + ``masks/``, masks named ``STEM.png``) or holds
one such folder per concept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from tqdm import tqdm

from vprompt.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, load_image
from vprompt.errors import DatasetError
from vprompt.segment.clicks import iou

# (reference image, reference mask, targets) → one predicted mask per target
OneShotMethod = Callable[
    [Image.Image, NDArray[np.bool_], Sequence[Image.Image]], list[NDArray[np.bool_]]
]


@dataclass(frozen=True)
class Concept:
    """One concept: its name and (image, mask) files, the reference first."""

    name: str
    images: tuple[Path, ...]
    masks: tuple[Path, ...]


@dataclass(frozen=True)
class OneShotReport:
    """Per-concept mean IoU, their mean (mIoU) and the overall mean over all targets."""

    per_concept: dict[str, float]
    per_target: dict[str, list[float]] = field(default_factory=dict)

    @property
    def miou(self) -> float:
        return float(np.mean(list(self.per_concept.values())))

    @property
    def overall_iou(self) -> float:
        return float(np.mean([v for vs in self.per_target.values() for v in vs]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "miou": self.miou,
            "overall_iou": self.overall_iou,
            "per_concept": self.per_concept,
            "per_target": self.per_target,
        }


def _concept(folder: Path, name: str) -> Concept:
    images = sorted(
        p for p in (folder / "images").iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
    )
    masks = []
    for image in images:
        mask = folder / "masks" / f"{image.stem}.png"
        if not mask.is_file():
            raise DatasetError(f"{image}: no mask {mask}")
        masks.append(mask)
    if len(images) < 2:
        raise DatasetError(f"{folder}: a concept needs a reference and at least one target image")
    return Concept(name=name, images=tuple(images), masks=tuple(masks))


def load_concepts(root: str | Path) -> list[Concept]:
    """The concepts of a one-shot data folder (see the module docstring)."""
    base = Path(root)
    if (base / "images").is_dir() and (base / "masks").is_dir():
        return [_concept(base, base.name)]
    if not base.is_dir():
        raise DatasetError(f"{base}: no such folder")
    subs = sorted(d for d in base.iterdir() if (d / "images").is_dir() and (d / "masks").is_dir())
    if not subs:
        raise DatasetError(f"{base}: expected images/ and masks/, or one such folder per concept")
    return [_concept(d, d.name) for d in subs]


def _mask(path: Path, size: tuple[int, int]) -> NDArray[np.bool_]:
    with Image.open(path) as m:
        arr = np.asarray(m.convert("L")) > 0
    if arr.shape != (size[1], size[0]):
        raise DatasetError(f"{path}: mask size differs from its image {size[0]}x{size[1]}")
    return arr


def evaluate_oneshot(
    concepts: Sequence[Concept],
    method: OneShotMethod,
    *,
    max_pixels: int | None = None,
    progress: bool = True,
) -> OneShotReport:
    """Run ``method`` once per concept (reference → all targets) and score every target."""
    limit = max_pixels or DEFAULT_MAX_PIXELS
    per_concept: dict[str, float] = {}
    per_target: dict[str, list[float]] = {}
    for concept in tqdm(concepts, desc="one-shot", unit="concept", disable=not progress):
        images = [load_image(p, max_pixels=limit) for p in concept.images]
        masks = [_mask(m, im.size) for m, im in zip(concept.masks, images, strict=True)]
        if not masks[0].any():
            raise DatasetError(f"{concept.masks[0]}: the reference mask is empty")
        predicted = method(images[0], masks[0], images[1:])
        if len(predicted) != len(images) - 1:
            raise DatasetError(
                f"{concept.name}: the method returned {len(predicted)} masks for "
                f"{len(images) - 1} targets"
            )
        scores = [iou(p, gt) for p, gt in zip(predicted, masks[1:], strict=True)]
        per_target[concept.name] = scores
        per_concept[concept.name] = float(np.mean(scores))
    return OneShotReport(per_concept=per_concept, per_target=per_target)
