"""Data and predictor for the interactive protocol (:mod:`vprompt.segment.clicks`).

A click-evaluation folder holds ``images/`` and ``masks/``: ``masks/STEM.png`` is the ground
truth of ``images/STEM.*``. A mask PNG with only 0 and one other value is one object; an
instance PNG (0 = background, every other value one object) yields one object per value, as
in the COCO-style instance benchmarks. A GrabCut trimap (0 background, 128 unknown, 255
object) is one object whose unknown band is ignored, as the reference loaders read it
(``instances_mask[mask == 128] = -1``). ``ignore_value`` (e.g. 255 for VOC-style borders) is
never an object of an instance PNG and its pixels are ignored; a binary mask is one object
whatever its value. Ignored pixels count neither in the clicks nor in the IoU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from vprompt.data.images import IMAGE_EXTENSIONS
from vprompt.errors import DatasetError, ImageLoadError
from vprompt.prompts.spatial import MaskLogits, ObjectPrompt, Point, PromptSet
from vprompt.segment.clicks import ClickPredictor
from vprompt.segment.segmenter import ImageEmbedding, Segmenter

GRABCUT_UNKNOWN = 128  # the trimap's "unknown" band
GRABCUT_OBJECT = 255


@dataclass(frozen=True)
class ClickSample:
    """One object to segment: its image file, ground-truth mask and ignored pixels (H x W
    bool, or None when every pixel counts)."""

    image: Path
    object_id: int
    mask: NDArray[np.bool_]
    ignore: NDArray[np.bool_] | None = None


def load_click_folder(root: str | Path, *, ignore_value: int | None = None) -> list[ClickSample]:
    """Every (image, object mask) pair of a click-evaluation folder, sorted by image name.

    Raises:
        DatasetError: missing ``images/`` or ``masks/``, an image without a mask, a mask of
            another size than its image, or no object at all.
    """
    base = Path(root)
    images_dir, masks_dir = base / "images", base / "masks"
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise DatasetError(f"{base}: expected sub-folders images/ and masks/; {d} is missing")
    samples: list[ClickSample] = []
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise DatasetError(f"{images_dir}: no images")
    for image in images:
        mask_path = masks_dir / f"{image.stem}.png"
        if not mask_path.is_file():
            raise DatasetError(f"{image}: no ground-truth mask {mask_path}")
        try:
            with Image.open(mask_path) as m:
                labels = np.asarray(m.convert("L") if m.mode not in ("L", "P", "I") else m)
            with Image.open(image) as im:
                size = im.size
        except OSError as exc:
            raise ImageLoadError(mask_path, f"cannot decode ({exc})") from None
        if labels.shape != (size[1], size[0]):
            raise DatasetError(
                f"{mask_path}: size {labels.shape[1]}x{labels.shape[0]} differs from its image "
                f"{size[0]}x{size[1]}"
            )
        values = [int(v) for v in np.unique(labels) if v != 0]
        ignored: list[int] = []
        if values == [GRABCUT_UNKNOWN, GRABCUT_OBJECT]:  # a GrabCut trimap
            ignored, values = [GRABCUT_UNKNOWN], [GRABCUT_OBJECT]
        elif len(values) > 1 and ignore_value in values:
            # A binary 0/255 mask is one object even when 255 is "ignore".
            ignored, values = [int(ignore_value)], [v for v in values if v != ignore_value]
        ignore = np.isin(labels, ignored) if ignored else None
        for value in values:
            samples.append(
                ClickSample(image=image, object_id=value, mask=labels == value, ignore=ignore)
            )
    if not samples:
        raise DatasetError(f"{base}: no object in any mask")
    return samples


class SamClickPredictor:
    """SAM answering simulated clicks on one image, the way interactive tools use it.

    The first click asks for three candidates and keeps the highest predicted IoU (one click is
    ambiguous); later clicks get one mask, with the previous low-res logits fed back.
    """

    def __init__(self, segmenter: Segmenter, embedding: ImageEmbedding) -> None:
        self.segmenter = segmenter
        self.embedding = embedding

    def __call__(
        self, points: Sequence[Point], previous: MaskLogits | None
    ) -> tuple[NDArray[np.bool_], MaskLogits | None]:
        first = len(points) == 1 and previous is None
        obj = ObjectPrompt(points=list(points), logits=None if first else previous)
        prompts = PromptSet([obj], image_size=self.embedding.image_size)
        result = self.segmenter.decode(self.embedding, prompts, multimask=first, best_only=True)
        return result.masks[0, 0], result.prompt_logits(0)


def sam_predictor_factory(
    segmenter: Segmenter, samples: Sequence[ClickSample]
) -> tuple[
    list[tuple[int, NDArray[np.bool_], NDArray[np.bool_] | None]], Callable[[int], ClickPredictor]
]:
    """``(pairs, make_predictor)`` for :func:`~vprompt.segment.clicks.evaluate_clicks`.

    Each image is embedded once (the segmenter's cache), however many objects it holds.
    """
    pairs = [(i, s.mask, s.ignore) for i, s in enumerate(samples)]

    def make(index: int) -> ClickPredictor:
        embedding = segmenter.embed_image(samples[index].image)
        return SamClickPredictor(segmenter, embedding)

    return pairs, make
