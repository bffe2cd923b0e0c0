"""One folder per segmented image: mask PNGs, a label PNG, an overlay and COCO JSON.

Layout of ``out_dir``::

    mask_000.png …    one 0/255 PNG per object, in prompt order
    labels.png        all objects in one paletted PNG (pixel value k = object k, 1-based)
    overlay.png       the image with every object in its own colour, and its clicks and box
    annotations.json  COCO: images / annotations (RLE or polygons) / categories
    result.json       what the command did: model, prompts, per-object scores
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from vprompt.segment.outputs import (
    coco_annotations,
    mark_prompts,
    mask_area,
    mask_bbox,
    overlay,
    save_label_png,
    save_mask_png,
)
from vprompt.utils import jsonio
from vprompt.utils.io import atomic_write_text, atomic_write_with


def write_mask_files(out: Path, masks: Sequence[NDArray[np.bool_]]) -> list[str]:
    """``mask_000.png`` … (one 0/255 PNG per mask) and, with any mask, ``labels.png`` in
    ``out``; returns the mask file names in order."""
    files = []
    for i, mask in enumerate(masks):
        path = out / f"mask_{i:03d}.png"
        save_mask_png(mask, path)
        files.append(path.name)
    if masks:
        save_label_png(list(masks), out / "labels.png")
    return files


def write_image_results(
    out_dir: str | Path,
    image: Image.Image,
    masks: Sequence[NDArray[np.bool_]],
    *,
    scores: Sequence[float],
    file_name: str,
    form: Literal["rle", "polygon"] = "rle",
    objects: Sequence[dict[str, Any]] | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write every output for one image and return the ``result.json`` content.

    Args:
        masks: One H x W bool mask per object, each of the image's size.
        scores: One score per object (predicted IoU, or the method's own score).
        file_name: The image's name, recorded in the COCO ``images`` entry.
        form: Segmentation encoding in ``annotations.json``.
        objects: Extra per-object fields for ``result.json`` (e.g. the prompts used).
        meta: Extra top-level fields for ``result.json`` (model, weights, method …).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = write_mask_files(out, masks)
    if masks:
        shown = overlay(image, list(masks))
        if objects is not None:  # the clicks and boxes that made each object, on top
            shown = mark_prompts(shown, objects)
        atomic_write_with(out / "overlay.png", lambda tmp: shown.save(tmp, format="PNG"))
    coco = coco_annotations(
        list(masks), scores=list(scores), file_name=file_name, size=image.size, form=form
    )
    atomic_write_text(out / "annotations.json", jsonio.dumps(coco))
    rows = []
    for i, mask in enumerate(masks):
        row: dict[str, Any] = {
            "index": i,
            "mask": files[i],
            "score": round(float(scores[i]), 6),
            "area": int(mask_area(mask)),
            "bbox": [int(v) for v in mask_bbox(mask)],
        }
        if objects is not None:
            row.update(objects[i])
        rows.append(row)
    result = {
        **(meta or {}),
        "image": file_name,
        "size": list(image.size),
        "objects": rows,
        "files": {
            "masks": files,
            "labels": "labels.png" if masks else None,
            "overlay": "overlay.png" if masks else None,
            "annotations": "annotations.json",
        },
    }
    atomic_write_text(out / "result.json", jsonio.dumps(result, indent=1))
    return result
