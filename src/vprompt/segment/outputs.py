"""Binary masks as the files people use: PNGs, overlays, COCO RLE, polygons and JSON.

Masks are ``H x W`` bool arrays (0/1 integer or float arrays are accepted too). COCO
conventions throughout:

- RLE runs are counted in column-major (Fortran) order and start with background, so a mask
  whose first pixel is foreground starts with a 0 run. The compressed form is pycocotools'
  ASCII string: from the fourth run on, each run is stored as the difference to the run two
  before; every number is written in 5-bit chunks (low first) plus 48, with 0x20 marking that
  another chunk follows and 0x10 in the last chunk as the sign bit.
- Boxes are ``[x, y, w, h]`` in pixels.
- Polygons are flat ``[x0, y0, x1, y1, ...]`` lists where pixel ``(row i, col j)`` covers
  ``[j, j+1] x [i, i+1]``. COCO polygons cannot express holes (rasterising fills them in):
  use RLE when masks have holes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw

from vprompt.errors import PromptError
from vprompt.utils import jsonio
from vprompt.utils.io import atomic_write_text, atomic_write_with

# A fixed palette so the same object index always gets the same colour.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190), (0, 128, 128),
    (170, 110, 40), (128, 0, 0), (170, 255, 195), (128, 128, 0), (0, 0, 128), (255, 225, 25),
)  # fmt: skip


def _check_mask(mask: Any, what: str = "mask") -> NDArray[np.bool_]:
    """``mask`` as a 2-D bool array; raises PromptError naming ``what`` otherwise."""
    arr = np.asarray(mask)
    if arr.ndim != 2 or 0 in arr.shape:
        raise PromptError(f"{what}: expected a non-empty 2-D H x W array, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        return arr
    if arr.dtype.kind not in "iuf" or not np.isin(arr, (0, 1)).all():
        raise PromptError(f"{what}: expected a bool or 0/1 array, got dtype {arr.dtype}")
    return arr.astype(bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


# ------------------------------------------------------------------------------------- RLE


def encode_rle(mask: Any) -> dict[str, Any]:
    """Uncompressed COCO RLE of a mask.

    Args:
        mask: H x W bool mask.

    Returns:
        ``{"size": [H, W], "counts": [int, ...]}``; runs alternate background / foreground in
        column-major order, starting with background (possibly a 0 run).

    Raises:
        PromptError: If ``mask`` is not a non-empty 2-D bool or 0/1 array.
    """
    m = _check_mask(mask)
    flat = m.ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate(([0], change, [flat.size])))
    if flat[0]:
        counts = np.concatenate(([0], counts))
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": counts.tolist()}


_CHUNKS = 13  # 5-bit chunks of an int64 (65 bits)
_BLOCK = 1 << 16  # counts encoded per vectorised block (bounds memory to ~7 MB)


def _compress(counts: Sequence[int]) -> str:
    """pycocotools' counts string: each count (from the 4th on, its difference to the count two
    before) in 5-bit chunks, low first, 0x20 on every chunk but the last, + 48. Vectorised: a
    noisy 1080p mask has a million runs."""
    values = np.asarray(counts, dtype=np.int64)
    if values.size == 0:
        return ""
    deltas = values.copy()
    deltas[3:] -= values[1:-2]
    shifts = 5 * np.arange(_CHUNKS, dtype=np.int64)
    parts = []
    for start in range(0, deltas.size, _BLOCK):
        x = deltas[start : start + _BLOCK, None]
        chunks = (x >> shifts) & 0x1F  # N x K
        rest = x >> (shifts + 5)  # what is left after each chunk (arithmetic shift)
        done = np.where(chunks & 0x10, rest == -1, rest == 0)
        last = done.argmax(axis=1)  # the first chunk after which nothing is left
        k = np.arange(_CHUNKS)[None, :]
        codes = np.where(k == last[:, None], chunks, chunks | 0x20) + 48
        parts.append(codes[k <= last[:, None]].astype(np.uint8).tobytes())
    return b"".join(parts).decode("ascii")


def _decompress(text: str) -> list[int]:
    counts: list[int] = []
    pos = 0
    while pos < len(text):
        x, shift = 0, 0
        while True:
            if pos >= len(text):
                raise PromptError("RLE counts string ends in the middle of a number")
            c = ord(text[pos]) - 48
            if not 0 <= c < 64:
                raise PromptError(
                    f"RLE counts string: invalid character {text[pos]!r} at position {pos}"
                )
            x |= (c & 0x1F) << shift
            pos += 1
            shift += 5
            if not c & 0x20:
                if c & 0x10:
                    x |= -1 << shift  # sign-extend
                break
        counts.append(x + counts[-2] if len(counts) > 2 else x)
    return counts


def encode_rle_compressed(mask: Any) -> dict[str, Any]:
    """Compressed COCO RLE, as ``pycocotools.mask.encode`` writes it (counts as ``str``).

    Args:
        mask: H x W bool mask.

    Returns:
        ``{"size": [H, W], "counts": str}``, ready for JSON.

    Raises:
        PromptError: If ``mask`` is not a non-empty 2-D bool or 0/1 array.
    """
    rle = encode_rle(mask)
    return {"size": rle["size"], "counts": _compress(rle["counts"])}


def decode_rle(rle: Any) -> NDArray[np.bool_]:
    """The mask a COCO RLE describes, compressed or not.

    Args:
        rle: ``{"size": [H, W], "counts": ...}`` with counts a list of ints (uncompressed) or
            a ``str``/``bytes`` in pycocotools' compressed form.

    Returns:
        H x W bool mask.

    Raises:
        PromptError: If the dict lacks ``size`` or ``counts``, the size is not two positive
            ints, the counts are not ints / a valid string, a run is negative, or the runs do
            not add up to ``H * W``.
    """
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise PromptError(f"RLE: expected a dict with 'size' and 'counts', got {type(rle)}")
    size = rle["size"]
    if (
        not isinstance(size, list | tuple)
        or len(size) != 2
        or not all(_is_int(v) and v > 0 for v in size)
    ):
        raise PromptError(f"RLE size: expected [H, W] as two positive ints, got {size!r}")
    h, w = int(size[0]), int(size[1])
    raw = rle["counts"]
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", errors="replace")  # a bad byte becomes an invalid character
    counts: list[int]
    if isinstance(raw, str):
        counts = _decompress(raw)
    elif isinstance(raw, np.ndarray) and raw.ndim == 1 and raw.dtype.kind in "iu":
        counts = raw.tolist()
    elif isinstance(raw, list | tuple) and all(_is_int(c) for c in raw):
        counts = [int(c) for c in raw]
    else:
        kind = type(raw).__name__
        raise PromptError(f"RLE counts: expected a list of ints or a compressed string, got {kind}")
    # Checked on Python ints, so that hostile huge runs cannot overflow.
    if counts and min(counts) < 0:
        raise PromptError(f"RLE counts: runs must be non-negative, got {min(counts)}")
    total = sum(counts)
    if total != h * w:
        raise PromptError(f"RLE counts sum to {total}, but the size {h}x{w} has {h * w} pixels")
    values = np.arange(len(counts)) % 2 == 1  # background first
    runs = np.asarray(counts, dtype=np.int64)
    return np.repeat(values, runs).reshape((h, w), order="F")


# --------------------------------------------------------------------- geometry, polygons


def mask_area(mask: Any) -> int:
    """Number of foreground pixels of an H x W mask."""
    return int(np.count_nonzero(_check_mask(mask)))


def mask_bbox(mask: Any) -> list[int]:
    """COCO ``[x, y, w, h]`` box of the foreground of an H x W mask (``[0, 0, 0, 0]`` if empty)."""
    m = _check_mask(mask)
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if rows.size == 0:
        return [0, 0, 0, 0]
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def _signed_area(xy: NDArray[np.float64]) -> float:
    """Shoelace area of an N x 2 ring; positive for the winding find_contours gives outer rings."""
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def mask_to_polygons(mask: Any, *, tolerance: float = 0.0) -> list[list[float]]:
    """Outer boundaries of a mask as COCO polygons, one per 4-connected component.

    The boundary is the 0.5 iso-line of the zero-padded mask, so it follows pixel edges and cuts
    each corner diagonally; rasterising it at pixel centres (:func:`polygons_to_mask`) gives
    the mask back (holes aside). Hole boundaries are dropped: COCO polygons cannot express
    holes, use RLE for such masks.

    Args:
        mask: H x W bool mask.
        tolerance: Maximum distance in pixels that simplification
            (``skimage.measure.approximate_polygon``) may move the boundary; 0 keeps every
            vertex.

    Returns:
        Flat ``[x0, y0, x1, y1, ...]`` polygons (not repeating the first vertex), each with at
        least 3 vertices; empty for an empty mask.

    Raises:
        PromptError: If ``mask`` is not a 2-D bool mask or ``tolerance`` is negative.
    """
    from skimage.measure import approximate_polygon, find_contours

    if not math.isfinite(tolerance) or tolerance < 0:
        raise PromptError(f"polygon tolerance: expected a number >= 0, got {tolerance}")
    m = _check_mask(mask)
    # Padding closes the contours of objects touching the image border.
    padded = np.pad(m, 1).astype(np.float32)
    polygons = []
    for contour in find_contours(padded, 0.5):  # N x 2 (row, col), last point == first
        ring = contour[:-1] if np.array_equal(contour[0], contour[-1]) else contour
        # padded (r, c) → (x, y) = (c - 1 + 0.5, r - 1 + 0.5)
        xy = ring[:, ::-1] - 0.5
        if _signed_area(xy) <= 0:
            continue  # a hole: find_contours winds those the other way
        if tolerance > 0:
            xy = approximate_polygon(np.vstack([xy, xy[:1]]), tolerance)[:-1]
        if len(xy) < 3 or _signed_area(xy) <= 0:
            continue
        polygons.append(xy.ravel().astype(float).tolist())
    return polygons


def polygons_to_mask(
    polygons: Sequence[Sequence[float]], size: tuple[int, int]
) -> NDArray[np.bool_]:
    """Rasterise COCO polygons: a pixel is foreground when its centre lies inside one.

    Args:
        polygons: Flat ``[x0, y0, x1, y1, ...]`` polygons, at least 3 vertices each.
        size: ``(W, H)`` of the mask.

    Returns:
        H x W bool mask, the union of the polygons.

    Raises:
        PromptError: If ``size`` is not two positive ints or a polygon is malformed.
    """
    from skimage.draw import polygon as fill

    if len(size) != 2 or not all(_is_int(v) and v > 0 for v in size):
        raise PromptError(f"polygon mask size: expected (W, H) as positive ints, got {size!r}")
    w, h = int(size[0]), int(size[1])
    out = np.zeros((h, w), dtype=bool)
    for i, poly in enumerate(polygons):
        xy = np.asarray(poly, dtype=np.float64)
        if xy.ndim != 1 or xy.size % 2 or xy.size < 6 or not np.isfinite(xy).all():
            raise PromptError(f"polygon {i}: expected a flat list of >= 3 finite x, y pairs")
        xy = xy.reshape(-1, 2)
        # pixel (i, j) has its centre at (j + 0.5, i + 0.5); skimage puts it at (i, j)
        rr, cc = fill(xy[:, 1] - 0.5, xy[:, 0] - 0.5, shape=(h, w))
        out[rr, cc] = True
    return out


# ------------------------------------------------------------------------------ image files


def _checked_masks(masks: Sequence[Any], what: str) -> list[NDArray[np.bool_]]:
    checked = [_check_mask(m, f"{what}: mask {i}") for i, m in enumerate(masks)]
    if any(m.shape != checked[0].shape for m in checked):
        shapes = sorted({m.shape for m in checked})
        raise PromptError(f"{what}: masks have different sizes {shapes}")
    return checked


def save_mask_png(mask: Any, path: str | Path) -> None:
    """Write an H x W mask as an 8-bit single-channel PNG (0 background, 255 foreground).

    The file appears atomically: it is written next to ``path`` and renamed into place.
    """
    img = Image.fromarray(_check_mask(mask).astype(np.uint8) * 255)  # mode "L"
    atomic_write_with(path, lambda tmp: img.save(tmp, format="PNG"))


def save_label_png(masks: Sequence[Any], path: str | Path) -> None:
    """Write several masks as one paletted PNG, atomically.

    Pixel value k is object k (1-based, in the order of ``masks``) and 0 is background; where
    objects overlap, later ones are drawn over earlier ones. The palette gives object k the
    overlay colour ``PALETTE[(k - 1) % len(PALETTE)]``.

    Args:
        masks: 1 to 255 H x W bool masks of the same size.
        path: Where to write the PNG.

    Raises:
        PromptError: If there are no masks, more than 255, or their sizes differ.
    """
    if not 0 < len(masks) <= 255:
        raise PromptError(f"label PNG: expected 1 to 255 masks (8 bits), got {len(masks)}")
    checked = _checked_masks(masks, "label PNG")
    labels = np.zeros(checked[0].shape, dtype=np.uint8)
    for k, m in enumerate(checked, start=1):
        labels[m] = k
    img = Image.fromarray(labels)
    palette = [0, 0, 0]
    for k in range(255):
        palette.extend(PALETTE[k % len(PALETTE)])
    img.putpalette(palette)  # turns the "L" image into a "P" one
    atomic_write_with(path, lambda tmp: img.save(tmp, format="PNG"))


def _boundary(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """Foreground pixels with a 4-neighbour outside the mask (the image border counts)."""
    p = np.pad(mask, 1)
    interior = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~interior


def overlay(
    image: Image.Image,
    masks: Sequence[Any],
    *,
    alpha: float = 0.5,
    colors: Sequence[tuple[int, int, int]] | None = None,
    outline: bool = True,
) -> Image.Image:
    """The image with each mask tinted in its own colour and, optionally, outlined.

    Args:
        image: The image the masks belong to (any PIL mode; W x H).
        masks: H x W bool masks, drawn in order (later ones on top).
        alpha: Opacity of the tint, in [0, 1].
        colors: RGB colour per object, cycled; defaults to :data:`PALETTE`.
        outline: Draw each mask's boundary pixels in its colour at full opacity.

    Returns:
        A new RGB image of the same size.

    Raises:
        PromptError: If a mask does not match the image size, ``alpha`` is outside [0, 1] or a
            colour is not three ints in [0, 255].
    """
    if not isinstance(image, Image.Image):
        raise PromptError(f"overlay: expected a PIL image, got {type(image).__name__}")
    if not 0.0 <= alpha <= 1.0:
        raise PromptError(f"overlay alpha: expected a value in [0, 1], got {alpha}")
    palette = PALETTE if colors is None else tuple(colors)
    if len(palette) == 0 or not all(
        len(c) == 3 and all(_is_int(v) and 0 <= v <= 255 for v in c) for c in palette
    ):
        raise PromptError(f"overlay colors: expected RGB triples of ints in [0, 255], got {colors}")
    base = np.asarray(image.convert("RGB"), dtype=np.float32)  # H x W x 3
    h, w = base.shape[:2]
    for i, mask in enumerate(masks):
        m = _check_mask(mask, f"overlay: mask {i}")
        if m.shape != (h, w):
            raise PromptError(
                f"overlay: mask {i} of shape {m.shape} does not match the image's H x W {(h, w)}"
            )
        color = np.asarray(palette[i % len(palette)], dtype=np.float32)
        base[m] = base[m] * (1.0 - alpha) + color * alpha
        if outline:
            base[_boundary(m)] = color
    return Image.fromarray(np.rint(base).clip(0, 255).astype(np.uint8))


def save_overlay(
    image: Image.Image,
    masks: Sequence[Any],
    path: str | Path,
    *,
    alpha: float = 0.5,
    colors: Sequence[tuple[int, int, int]] | None = None,
    outline: bool = True,
) -> None:
    """Write :func:`overlay` of ``image`` and ``masks`` as a PNG, atomically."""
    img = overlay(image, masks, alpha=alpha, colors=colors, outline=outline)
    atomic_write_with(path, lambda tmp: img.save(tmp, format="PNG"))


def mark_prompts(image: Image.Image, objects: Sequence[dict[str, Any]]) -> Image.Image:
    """A copy of the image with each object's prompts drawn: its box as a rectangle in the
    object's colour, its clicks as green (positive) / red (negative) dots.

    Args:
        objects: Per object, its prompt (under ``"prompt"``, or the object itself) with
            optional ``"box": [x0, y0, x1, y1]`` and ``"points": [[x, y, positive], …]`` in
            image pixels, as ``vprompt segment`` records them; or the grid ``"point": [x, y]``
            that found it (``segment-all``).
    """
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    width = max(2, round(min(out.size) / 200))
    clicks: list[tuple[float, float, bool]] = []
    for i, record in enumerate(objects):
        obj = record.get("prompt") or record
        if record.get("point") is not None and len(record["point"]) == 2:
            clicks.append((float(record["point"][0]), float(record["point"][1]), True))
        box = obj.get("box")
        if box is not None and len(box) == 4:
            x0, y0, x1, y1 = (float(v) for v in box)
            draw.rectangle((x0, y0, x1, y1), outline=PALETTE[i % len(PALETTE)], width=width)
        for point in obj.get("points") or []:
            if len(point) >= 3:
                clicks.append((float(point[0]), float(point[1]), bool(point[2])))
    return draw_points(out, clicks) if clicks else out


def draw_points(image: Image.Image, points: Sequence[tuple[float, float, bool]]) -> Image.Image:
    """A copy of the image with clicks ``(x, y, positive)`` as green / red dots."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    r = max(3, round(min(out.size) / 150))
    for x, y, positive in points:
        fill = (40, 220, 40) if positive else (230, 30, 30)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill, outline=(255, 255, 255))
    return out


# ------------------------------------------------------------------------------------ COCO


def coco_annotations(
    masks: Sequence[Any],
    *,
    scores: Sequence[float] | None = None,
    image_id: int = 0,
    category_id: int = 1,
    category_name: str = "object",
    file_name: str | None = None,
    size: tuple[int, int] | None = None,
    form: Literal["rle", "polygon"] = "rle",
) -> dict[str, Any]:
    """A COCO-style dict for the objects of one image.

    Annotation ids run 1, 2, ... in mask order. ``segmentation`` is compressed RLE with
    ``iscrowd`` 1 for ``form="rle"``, or polygons (holes filled in) with ``iscrowd`` 0 for
    ``form="polygon"``, as COCO itself stores them. ``area`` is the mask's pixel count and
    ``bbox`` its ``[x, y, w, h]`` box.

    Args:
        masks: H x W bool masks, one per object.
        scores: One score per mask, stored as ``score`` (results-file style).
        image_id: Id of the image entry, repeated in every annotation.
        category_id: Category of every annotation.
        category_name: Name of that category.
        file_name: Stored in the image entry when given.
        size: ``(W, H)`` of the image; defaults to the size of the masks.
        form: Segmentation encoding.

    Returns:
        ``{"images": [...], "annotations": [...], "categories": [...]}``, JSON-ready.

    Raises:
        PromptError: On an unknown ``form``, a scores / masks count mismatch, masks that do
            not match ``size``, or no masks and no ``size``.
    """
    if form not in ("rle", "polygon"):
        raise PromptError(f"COCO segmentation form: expected 'rle' or 'polygon', got {form!r}")
    if scores is not None and len(scores) != len(masks):
        raise PromptError(f"COCO: {len(masks)} masks but {len(scores)} scores")
    checked = [_check_mask(m, f"COCO: mask {i}") for i, m in enumerate(masks)]
    if size is None:
        if not checked:
            raise PromptError("COCO: no masks, so the image size must be given")
        size = (checked[0].shape[1], checked[0].shape[0])
    if len(size) != 2 or not all(_is_int(v) and v > 0 for v in size):
        raise PromptError(f"COCO image size: expected (W, H) as positive ints, got {size!r}")
    w, h = int(size[0]), int(size[1])
    annotations = []
    for i, m in enumerate(checked):
        if m.shape != (h, w):
            raise PromptError(f"COCO: mask {i} of shape {m.shape} does not match H x W {(h, w)}")
        segmentation: Any = encode_rle_compressed(m) if form == "rle" else mask_to_polygons(m)
        ann: dict[str, Any] = {
            "id": i + 1,
            "image_id": image_id,
            "category_id": category_id,
            "segmentation": segmentation,
            "area": mask_area(m),
            "bbox": mask_bbox(m),
            "iscrowd": 1 if form == "rle" else 0,
        }
        if scores is not None:
            ann["score"] = round(float(scores[i]), 6)
        annotations.append(ann)
    image: dict[str, Any] = {"id": image_id, "width": w, "height": h}
    if file_name is not None:
        image["file_name"] = file_name
    return {
        "images": [image],
        "annotations": annotations,
        "categories": [{"id": category_id, "name": category_name}],
    }


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_json_atomic(obj: Any, path: str | Path, *, indent: int | None = None) -> None:
    """Write ``obj`` as UTF-8 JSON, atomically; numpy scalars and arrays become plain JSON."""
    text = jsonio.dumps(obj, indent=indent, ensure_ascii=False, default=_json_default)
    atomic_write_text(path, text + "\n")
