"""Referring-expression grounding (RefCOCO / RefCOCO+ / RefCOCOg style): read, validate, score.

A refs file is JSON, either an object ``{"images_dir": DIR, "refs": [REF, ...]}`` (``DIR``
relative to the JSON's folder unless absolute; default the JSON's folder) or a bare list
``[REF, ...]`` with images relative to the JSON's folder. Each ``REF`` is an object::

    {"image": "file.jpg", "expression": "the man on the left", "box": [x0, y0, x1, y1]}

The box format follows from the key, never from a flag: ``box`` is always the corners
``x0, y0, x1, y1``, ``bbox`` always COCO's ``x, y, w, h`` (as RefCOCO's own annotations store
it); an entry has exactly one of them. A ``box_format`` of ``"xyxy"`` / ``"xywh"`` may be
given, and must then agree with the key. Optional: ``id`` (default: the entry's index),
``split``. Image sizes come from the file headers (EXIF rotation applied); pixels are decoded
only during evaluation.

Scoring: a ref is correct when the IoU of the predicted box with its box is ``>=``
``iou_threshold`` (0.5, the RefCOCO protocol); accuracy is the fraction correct.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from vprompt.backbones.detection import MAX_QUERY_CHARS
from vprompt.data.check import Problem
from vprompt.data.images import DEFAULT_MAX_PIXELS, load_image
from vprompt.detect.checks import (
    CocoDataError,
    Findings,
    header_size,
    is_number,
    read_json_bounded,
    unsafe_relative_path,
)
from vprompt.detect.coco_data import BOX_TOLERANCE, MAX_JSON_BYTES
from vprompt.detect.result import box_iou
from vprompt.errors import DatasetError, ImageLoadError, PromptError
from vprompt.segment.outputs import write_json_atomic

Box = tuple[float, float, float, float]
# (image, referring expression) → x0, y0, x1, y1, or None for "nothing found"
GroundFn = Callable[[Image.Image, str], Sequence[float] | None]
_FORMATS = {"box": "xyxy", "bbox": "xywh"}


@dataclass(frozen=True)
class Ref:
    """One referring expression and the box it refers to (``x0, y0, x1, y1`` pixels)."""

    id: str
    image: Path
    expression: str
    box: Box
    image_size: tuple[int, int]
    split: str | None = None


@dataclass(frozen=True)
class GroundingReport:
    """Accuracy at ``iou_threshold`` and one record per ref (in the file's order)."""

    accuracy: float
    mean_iou: float
    iou_threshold: float
    records: tuple[dict[str, Any], ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "mean_iou": self.mean_iou,
            "iou_threshold": self.iou_threshold,
            "refs": len(self.records),
            "records": list(self.records),
        }


def _box(entry: dict[str, Any], label: str, found: Findings) -> Box | None:
    keys = [k for k in _FORMATS if k in entry]
    fix = "give box [x0, y0, x1, y1] or bbox [x, y, w, h] (one of them)"
    if len(keys) != 1:
        what = "both 'box' and 'bbox'" if keys else "neither 'box' nor 'bbox'"
        found.error(f"{label} has {what}", fix, group="refs with bad boxes")
        return None
    key = keys[0]
    declared = entry.get("box_format", _FORMATS[key])
    if declared != _FORMATS[key]:
        found.error(
            f"{label}: box_format {declared!r} contradicts {key!r} (which is "
            f"always {_FORMATS[key]})",
            fix,
            group="refs with bad boxes",
        )
        return None
    value = entry[key]
    if not isinstance(value, list) or len(value) != 4 or not all(map(is_number, value)):
        found.error(
            f"{label}: {key} {value!r} is not 4 finite numbers",
            fix,
            group="refs with bad boxes",
        )
        return None
    a, b, c, d = (float(v) for v in value)
    x0, y0, x1, y1 = (a, b, a + c, b + d) if key == "bbox" else (a, b, c, d)
    if not (x1 > x0 and y1 > y0):
        found.error(
            f"{label}: {key} {value} is empty (needs positive width and height)",
            fix,
            group="refs with bad boxes",
        )
        return None
    return x0, y0, x1, y1


def _ref(
    n: int,
    entry: Any,
    where: Path,
    folder: Path,
    sizes: dict[Path, Any],
    tolerance: float,
    found: Findings,
) -> Ref | None:
    label = f"{where.name} refs[{n}]"
    if not isinstance(entry, dict):
        found.error(
            f"{label} is {type(entry).__name__}; expected an object",
            "write each ref as {image, expression, box}",
            group="refs that are not objects",
        )
        return None
    missing = [k for k in ("image", "expression") if k not in entry]
    if missing:
        found.error(
            f"{label} lacks {', '.join(map(repr, missing))}",
            "give every ref image, expression and box",
            group="refs with missing keys",
        )
        return None
    expression = entry["expression"]
    text = " ".join(expression.split()) if isinstance(expression, str) else ""
    if not text or len(text) > MAX_QUERY_CHARS:
        found.error(
            f"{label}: expression {str(expression)[:40]!r} is not a non-empty "
            f"string of at most {MAX_QUERY_CHARS} characters",
            "fix the expression",
            group="refs with bad expressions",
        )
        return None
    box = _box(entry, label, found)
    name = entry["image"]
    why = unsafe_relative_path(name) if isinstance(name, str) else "is not a string"
    if why is not None:
        found.error(
            f"{label}: image {name!r} {why}",
            f"use a path relative to {folder}",
            group="unsafe image paths",
        )
        return None
    path = folder / name
    if path not in sizes:
        try:
            sizes[path] = header_size(path) if path.is_file() else None
        except ImageLoadError as exc:
            sizes[path] = exc
    size = sizes[path]
    if size is None:
        found.error(
            f"{label}: {path} does not exist",
            f"put the image there (paths are relative to {folder})",
            group="missing images",
        )
        return None
    if isinstance(size, ImageLoadError):
        found.error(
            f"{label}: {size}",
            "replace it with a readable image",
            group="unreadable images",
        )
        return None
    if box is None:
        return None
    w, h = size
    x0, y0, x1, y1 = box
    t = tolerance
    if x0 < -t or y0 < -t or x1 > w + t or y1 > h + t:
        found.error(
            f"{label}: box ({x0:g},{y0:g},{x1:g},{y1:g}) reaches outside the "
            f"{w}x{h} image {name} by more than {t:g} px",
            "fix the box (pixels of that image)",
            group="refs with boxes outside their image",
        )
        return None
    ref_id = entry.get("id", n)
    split = entry.get("split")
    return Ref(
        id=str(ref_id),
        image=path,
        expression=text,
        box=box,
        image_size=(w, h),
        split=None if split is None else str(split),
    )


def _walk(path: Path, tolerance: float, max_json_bytes: int, found: Findings) -> list[Ref]:
    fix = 'write {"images_dir": DIR, "refs": [{image, expression, box}, ...]} or a list of refs'
    if not path.is_file():
        found.error(f"refs file {path} does not exist", fix)
        return []
    doc = read_json_bounded(path, max_bytes=max_json_bytes, fix=fix, found=found)
    if doc is None:
        return []
    folder = path.parent
    if isinstance(doc, dict):
        if not isinstance(doc.get("refs"), list):
            found.error(f"{path}: 'refs' is missing or not a list", fix)
            return []
        images_dir = doc.get("images_dir", ".")
        if not isinstance(images_dir, str) or not images_dir.strip():
            found.error(f"{path}: images_dir {images_dir!r} is not a path", fix)
            return []
        folder = folder / Path(images_dir).expanduser()  # an absolute DIR replaces the base
        entries = doc["refs"]
    elif isinstance(doc, list):
        entries = doc
    else:
        found.error(f"{path} holds a {type(doc).__name__}; expected an object or a list", fix)
        return []
    if not folder.is_dir():
        found.error(f"{path}: images folder {folder} does not exist", "fix images_dir")
        return []
    if not entries:
        found.error(f"{path} lists no refs", fix)
    sizes: dict[Path, Any] = {}
    refs = [_ref(n, e, path, folder, sizes, tolerance, found) for n, e in enumerate(entries)]
    return [r for r in refs if r is not None]


def check_refs(
    path: str | Path, *, box_tolerance: float = BOX_TOLERANCE, max_json_bytes: int = MAX_JSON_BYTES
) -> list[Problem]:
    """Every problem of a refs file (an empty list: all good), each with its fix."""
    found = Findings()
    _walk(Path(path).expanduser(), box_tolerance, max_json_bytes, found)
    return found.collected()


def read_refs(
    path: str | Path, *, box_tolerance: float = BOX_TOLERANCE, max_json_bytes: int = MAX_JSON_BYTES
) -> list[Ref]:
    """Read and validate a refs file (format in the module docstring).

    Args:
        box_tolerance: Pixels a box may reach past its image before it is an error; boxes
            within it are clipped to the image.

    Raises:
        CocoDataError: Listing every problem (not JSON, not an object / list, missing keys,
            empty expressions, both or neither of box / bbox, bad or out-of-image boxes,
            unsafe, missing or unreadable images); ``.problems`` holds them all.
    """
    found = Findings()
    p = Path(path).expanduser()
    refs = _walk(p, box_tolerance, max_json_bytes, found)
    problems = found.collected()
    if any(q.severity == "error" for q in problems):
        raise CocoDataError(p, problems)
    return [_clipped(r) for r in refs]


def _clipped(ref: Ref) -> Ref:
    w, h = ref.image_size
    x0, y0, x1, y1 = ref.box
    box = (max(x0, 0.0), max(y0, 0.0), min(x1, float(w)), min(y1, float(h)))
    return Ref(ref.id, ref.image, ref.expression, box, ref.image_size, ref.split)


def _predicted(value: Any, ref: Ref) -> Box | None:
    if value is None:
        return None
    try:
        box = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        box = ()
    if len(box) != 4 or not all(np.isfinite(box)):
        raise PromptError(
            f"ground_fn returned {value!r} for ref {ref.id}; expected x0, y0, x1, y1 or None"
        )
    return box[0], box[1], box[2], box[3]


def evaluate_grounding(
    ground_fn: GroundFn,
    refs: Sequence[Ref],
    *,
    iou_threshold: float = 0.5,
    output: str | Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> GroundingReport:
    """Ground every expression and score it against its box.

    Each image is decoded once (its refs are grounded together). A prediction of None, or a
    box without area, counts as a miss (IoU 0).

    Args:
        ground_fn: ``(image, expression) -> (x0, y0, x1, y1)`` in that image's pixels, or None.
        refs: From :func:`read_refs`.
        iou_threshold: A ref is correct at IoU ``>=`` this.
        output: Folder for ``grounding.json`` (summary and per-ref records).
        max_pixels: Larger images are refused.
        progress: Show a progress bar over refs.

    Raises:
        DatasetError: No refs, or an image whose size changed since it was read.
        PromptError: ``ground_fn`` returned something other than four numbers or None.
    """
    if not refs:
        raise DatasetError("grounding: no refs to evaluate")
    if not 0 < iou_threshold <= 1:
        raise PromptError(f"iou_threshold: expected a number in (0, 1], got {iou_threshold!r}")
    by_image: dict[Path, list[int]] = {}
    for n, ref in enumerate(refs):
        by_image.setdefault(ref.image, []).append(n)
    records: list[dict[str, Any]] = [{} for _ in refs]
    bar = tqdm(total=len(refs), desc="ground", unit="ref", disable=not progress)
    with bar:
        for path, members in by_image.items():
            image = load_image(path, max_pixels=max_pixels)
            for n in members:
                ref = refs[n]
                if image.size != ref.image_size:
                    raise DatasetError(
                        f"{path}: now {image.width}x{image.height}, was "
                        f"{ref.image_size[0]}x{ref.image_size[1]} when read"
                    )
                box = _predicted(ground_fn(image, ref.expression), ref)
                valid = box is not None and box[2] > box[0] and box[3] > box[1]
                iou = float(box_iou(np.array([box]), np.array([ref.box]))[0, 0]) if valid else 0.0
                records[n] = {
                    "id": ref.id,
                    "image": str(ref.image),
                    "expression": ref.expression,
                    "box": [round(v, 2) for v in ref.box],
                    "predicted": None if box is None else [round(v, 2) for v in box],
                    "iou": round(iou, 6),
                    "correct": iou >= iou_threshold,
                }
                bar.update(1)
    correct = sum(r["correct"] for r in records)
    report = GroundingReport(
        accuracy=correct / len(records),
        mean_iou=float(np.mean([r["iou"] for r in records])),
        iou_threshold=iou_threshold,
        records=tuple(records),
    )
    if output is not None:
        Path(output).mkdir(parents=True, exist_ok=True)
        write_json_atomic(report.to_dict(), Path(output) / "grounding.json", indent=1)
    return report
