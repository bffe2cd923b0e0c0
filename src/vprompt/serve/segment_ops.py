"""From API requests to the segmenter and back: prompts in, encoded masks out.

Requests become the library's own prompt classes (:mod:`vprompt.prompts.spatial`), which
validate coordinates, boxes and masks; results become PNG, COCO RLE or polygons through
:mod:`vprompt.segment.outputs`.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from vprompt.errors import PromptError
from vprompt.prompts.spatial import Box, Mask, MaskLogits, ObjectPrompt, Point, PromptSet, Scribble
from vprompt.segment.automatic import MaskRecord
from vprompt.segment.outputs import (
    decode_rle,
    encode_rle_compressed,
    mask_area,
    mask_bbox,
    mask_to_polygons,
)
from vprompt.segment.segmenter import Segmentation
from vprompt.serve.schemas import MaskFormat, ObjectIn, SegmentRequest

LogitsLookup = Callable[[str], NDArray[np.float32] | None]


def _mask_prompt(obj: ObjectIn, i: int, size: tuple[int, int]) -> Mask | None:
    if obj.mask is None:
        return None
    w, h = size
    if list(obj.mask.size) != [h, w]:
        # Checked before decoding so a forged size never allocates anything.
        raise PromptError(
            f"object {i}: mask RLE has size {list(obj.mask.size)}, expected the image's "
            f"[H, W] = {[h, w]}"
        )
    try:
        return Mask(decode_rle({"size": [h, w], "counts": obj.mask.counts}))
    except PromptError as exc:
        raise PromptError(f"object {i}: mask: {exc}") from None


def object_prompt(
    obj: ObjectIn, i: int, size: tuple[int, int], previous: LogitsLookup
) -> ObjectPrompt:
    """One request object → an :class:`ObjectPrompt` (scribbles become points).

    Raises:
        PromptError: Bad labels, coordinates, boxes, masks, unknown ``previous`` tokens, or an
            object with no prompt at all.
    """
    points = []
    for x, y, label in obj.points:
        if label not in (0, 1):
            raise PromptError(
                f"object {i}: point ({x}, {y}) has label {label}; expected 1 (object) or "
                "0 (background)"
            )
        points.append(Point(x, y, positive=label == 1))
    for s in obj.scribbles:
        scribble = Scribble(s.points, positive=s.positive, width=s.width)
        points.extend(scribble.to_points())
    box = Box(*obj.box) if obj.box is not None else None
    logits = None
    if obj.previous is not None:
        found = previous(obj.previous)
        if found is None:
            raise PromptError(
                f"object {i}: previous logits token {obj.previous[:64]!r} is unknown or expired "
                "(send the object's prompts without it)"
            )
        logits = MaskLogits(found)
    return ObjectPrompt(
        points=points,
        boxes=() if box is None else (box,),
        mask=_mask_prompt(obj, i, size),
        logits=logits,
    )


def prompt_set(
    request: SegmentRequest, size: tuple[int, int], previous: LogitsLookup, *, max_objects: int
) -> PromptSet:
    """Every object of ``request``, validated against the image ``size`` (W, H)."""
    if len(request.objects) > max_objects:
        raise PromptError(
            f"{len(request.objects)} objects in one request; at most {max_objects} are allowed"
        )
    objects = [object_prompt(o, i, size, previous) for i, o in enumerate(request.objects)]
    return PromptSet(objects, image_size=size)


def encode_mask(mask: NDArray[np.bool_], form: MaskFormat) -> Any:
    """A mask as the response carries it: base64 PNG (0/255), COCO RLE, or COCO polygons."""
    if form == "png":
        buf = io.BytesIO()
        Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode("ascii")
    if form == "rle":
        return encode_rle_compressed(mask)
    return mask_to_polygons(mask)


def finite(value: float, digits: int = 6) -> float:
    """A JSON-safe score (strict JSON has no NaN)."""
    x = float(value)
    return round(x, digits) if math.isfinite(x) else 0.0


def segmented_objects(
    seg: Segmentation, tokens: Sequence[str], form: MaskFormat
) -> list[dict[str, Any]]:
    """Response rows for the best candidate of each object."""
    rows = []
    for i in range(len(seg)):
        mask = seg.mask(i)
        k = int(seg.best_index[i])
        rows.append(
            {
                "score": finite(seg.iou[i, k]),
                "stability": finite(seg.stability[i, k]),
                "area": mask_area(mask),
                "bbox": mask_bbox(mask),
                "mask": encode_mask(mask, form),
                "logits": tokens[i],
            }
        )
    return rows


def candidate_objects(
    segs: Sequence[Segmentation], tokens: Sequence[Sequence[str]], form: MaskFormat
) -> list[dict[str, Any]]:
    """Response rows with every candidate (``segs[i]`` holds object ``i``'s K candidates);
    each row's own fields are its best candidate's."""
    rows = []
    for seg, toks in zip(segs, tokens, strict=True):
        cands = []
        for k in range(seg.masks.shape[1]):
            mask = seg.masks[0, k]
            cands.append(
                {
                    "score": finite(seg.iou[0, k]),
                    "stability": finite(seg.stability[0, k]),
                    "area": mask_area(mask),
                    "bbox": mask_bbox(mask),
                    "mask": encode_mask(mask, form),
                    "logits": toks[k],
                }
            )
        best = int(seg.best_index[0])
        rows.append({**cands[best], "candidates": cands, "best": best})
    return rows


def automatic_objects(records: Sequence[MaskRecord], form: MaskFormat) -> list[dict[str, Any]]:
    """Response rows for automatically found masks."""
    return [
        {
            "score": finite(r.predicted_iou),
            "stability": finite(r.stability_score),
            "area": int(r.area),
            "bbox": [int(v) for v in r.bbox],
            "mask": encode_mask(r.segmentation, form),
            "point": [round(float(v), 2) for v in r.point_coords],
        }
        for r in records
    ]
