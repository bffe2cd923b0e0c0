"""Detections as the files ``vprompt segment`` writes, plus boxes and labels.

Layout of one image's folder::

    overlay.png       the image, masks tinted (when there are masks), every box outlined in
                      its query's colour with "query score" above it
    mask_000.png …    one 0/255 PNG per detection (only with masks)
    labels.png        all masks in one paletted PNG (only with masks)
    annotations.json  COCO: one image, one category per query, bbox (+ RLE / polygons), score
    result.json       model, queries, filter and per-detection box / score / query / area
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageDraw, ImageFont

from vprompt.detect.result import Detections
from vprompt.errors import PromptError
from vprompt.segment.export import write_mask_files
from vprompt.segment.outputs import (
    PALETTE,
    encode_rle_compressed,
    mask_area,
    mask_to_polygons,
    overlay,
)
from vprompt.utils import jsonio
from vprompt.utils.io import atomic_write_text, atomic_write_with


def label_color(label: int) -> tuple[int, int, int]:
    """The colour of a query: the same label is the same colour in every output."""
    return PALETTE[label % len(PALETTE)]


def draw_detections(
    image: Image.Image, detections: Detections, *, alpha: float = 0.45
) -> Image.Image:
    """The image with masks tinted, boxes outlined and ``query score`` written on each box,
    colours by query (a new RGB image; the input is untouched)."""
    if image.size != detections.image_size:
        raise PromptError(
            f"image {image.size} does not match the detections' {detections.image_size}"
        )
    labels = [int(v) for v in detections.labels]
    if detections.masks is not None and len(detections):
        shown = overlay(
            image, list(detections.masks), alpha=alpha, colors=[label_color(i) for i in labels]
        )
    else:
        shown = image.convert("RGB")
    draw = ImageDraw.Draw(shown)
    width = max(1, round(min(shown.size) / 250))
    font = ImageFont.load_default(size=max(10, round(min(shown.size) / 40)))
    for i in range(len(detections) - 1, -1, -1):  # best drawn last, on top
        x0, y0, x1, y1 = (float(v) for v in detections.boxes[i])
        color = label_color(labels[i])
        # Pixel (i, j) covers [j, j+1] x [i, i+1]: the outline's last pixels are x1-1, y1-1.
        draw.rectangle((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), outline=color, width=width)
        text = f"{detections.queries[labels[i]]} {float(detections.scores[i]):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top + 2
        ty = y0 - th if y0 - th >= 0 else y0
        draw.rectangle((x0, ty, x0 + tw + 2, ty + th), fill=color)
        draw.text((x0 + 1 - left, ty + 1 - top), text, fill=(255, 255, 255), font=font)
    return shown


def coco_detections(
    detections: Detections,
    *,
    file_name: str,
    image_id: int = 1,
    form: Literal["rle", "polygon"] = "rle",
) -> dict[str, Any]:
    """A COCO dict for one image: a category per query (id = label + 1), an annotation per
    detection with ``bbox`` ``[x, y, w, h]``, ``area``, ``score`` and, with masks,
    ``segmentation`` (compressed RLE with ``iscrowd`` 1, or polygons)."""
    w, h = detections.image_size
    annotations = []
    for i, rec in enumerate(detections.to_records()):
        x0, y0, x1, y1 = rec["box"]
        ann: dict[str, Any] = {
            "id": i + 1,
            "image_id": image_id,
            "category_id": rec["label"] + 1,
            "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)],
            "area": rec["area"],
            "iscrowd": 0,
            "score": rec["score"],
        }
        if detections.masks is not None:
            mask = detections.masks[i]
            if form == "rle":
                ann["segmentation"], ann["iscrowd"] = encode_rle_compressed(mask), 1
            else:
                ann["segmentation"] = mask_to_polygons(mask)
        annotations.append(ann)
    return {
        "images": [{"id": image_id, "width": w, "height": h, "file_name": file_name}],
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": q} for k, q in enumerate(detections.queries)],
    }


def write_detections(
    out_dir: str | Path,
    image: Image.Image,
    detections: Detections,
    *,
    file_name: str,
    form: Literal["rle", "polygon"] = "rle",
    objects: Sequence[dict[str, Any]] | None = None,
    meta: dict[str, Any] | None = None,
    image_id: int = 1,
) -> dict[str, Any]:
    """Write every output for one image (layout in the module docstring); return result.json.

    Args:
        objects: Extra per-detection fields for ``result.json`` (e.g. a ranking score).
        meta: Extra top-level fields for ``result.json`` (model, weights, filter …).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    masks = [] if detections.masks is None else list(detections.masks)
    files = write_mask_files(out, masks)
    shown = draw_detections(image, detections)
    atomic_write_with(out / "overlay.png", lambda tmp: shown.save(tmp, format="PNG"))
    coco = coco_detections(detections, file_name=file_name, image_id=image_id, form=form)
    atomic_write_text(out / "annotations.json", jsonio.dumps(coco))
    rows = []
    for i, rec in enumerate(detections.to_records()):
        row: dict[str, Any] = {"index": i, **rec}
        if masks:
            row["mask"], row["mask_area"] = files[i], int(mask_area(masks[i]))
        if objects is not None:
            row.update(objects[i])
        rows.append(row)
    result = {
        **(meta or {}),
        "image": file_name,
        "size": list(image.size),
        "queries": list(detections.queries),
        "objects": rows,
        "files": {
            "masks": files,
            "labels": "labels.png" if masks else None,
            "overlay": "overlay.png",
            "annotations": "annotations.json",
        },
    }
    atomic_write_text(out / "result.json", jsonio.dumps(result, indent=1))
    return result
