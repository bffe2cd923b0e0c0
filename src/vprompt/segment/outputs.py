"""Binary masks as the files people use: PNGs, overlays, COCO RLE and polygons.

Masks are ``H x W`` bool arrays. COCO conventions throughout: RLE runs are counted in
column-major (Fortran) order starting with background, so a mask whose first pixel is
foreground starts with a 0 run; compressed RLE is pycocotools' ASCII form; boxes are
``[x, y, w, h]``; polygons are flat ``[x0, y0, x1, y1, ...]`` lists in pixel coordinates where
pixel ``(row i, col j)`` covers ``[j, j+1] x [i, i+1]``. COCO polygons cannot express holes:
use RLE when masks have them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw

from vprompt.errors import PromptError
from vprompt.utils.io import atomic_path

# A fixed palette so the same object index always gets the same colour.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190), (0, 128, 128),
    (170, 110, 40), (128, 0, 0), (170, 255, 195), (128, 128, 0), (0, 0, 128), (255, 225, 25),
)  # fmt: skip


def _check_mask(mask: Any, what: str = "mask") -> NDArray[np.bool_]:
    arr = np.asarray(mask)
    if arr.ndim != 2 or 0 in arr.shape:
        raise PromptError(f"{what}: expected a non-empty 2-D H x W array, got shape {arr.shape}")
    if arr.dtype != np.bool_:
        if not np.isin(arr, (0, 1)).all():
            raise PromptError(f"{what}: expected a bool or 0/1 array, got dtype {arr.dtype}")
        arr = arr.astype(bool)
    return arr


# ------------------------------------------------------------------------------------- RLE


def encode_rle(mask: Any) -> dict[str, Any]:
    """Uncompressed COCO RLE ``{"size": [H, W], "counts": [...]}``."""
    m = _check_mask(mask)
    flat = m.ravel(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0, *counts]
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": [int(c) for c in counts]}


def _compress(counts: Sequence[int]) -> str:
    out = []
    for i, c in enumerate(counts):
        x = int(c) - int(counts[i - 2]) if i > 2 else int(c)
        more = True
        while more:
            chunk = x & 0x1F
            x >>= 5
            more = not ((x == 0 and not chunk & 0x10) or (x == -1 and chunk & 0x10))
            if more:
                chunk |= 0x20
            out.append(chr(chunk + 48))
    return "".join(out)


def _decompress(text: str) -> list[int]:
    counts: list[int] = []
    pos = 0
    while pos < len(text):
        x, shift, more = 0, 0, True
        while more:
            if pos >= len(text):
                raise PromptError("RLE counts string ends in the middle of a number")
            c = ord(text[pos]) - 48
            if not 0 <= c < 64:
                raise PromptError(f"RLE counts string has an invalid character {text[pos]!r}")
            x |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            pos += 1
            shift += 5
            if not more and c & 0x10:
                x |= -1 << shift
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def encode_rle_compressed(mask: Any) -> dict[str, Any]:
    """Compressed COCO RLE (``counts`` as pycocotools' ASCII string)."""
    rle = encode_rle(mask)
    return {"size": rle["size"], "counts": _compress(rle["counts"])}


def decode_rle(rle: dict[str, Any]) -> NDArray[np.bool_]:
    """An H x W bool mask from COCO RLE, compressed (str/bytes) or not (list of ints)."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise PromptError("RLE: expected a dict with 'size' and 'counts'")
    size = rle["size"]
    if (
        not isinstance(size, list | tuple)
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        raise PromptError(f"RLE size: expected [H, W] as positive ints, got {size!r}")
    h, w = size
    raw = rle["counts"]
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", errors="replace")
    counts = _decompress(raw) if isinstance(raw, str) else raw
    if not isinstance(counts, list) or not all(
        isinstance(c, int | np.integer) and not isinstance(c, bool) for c in counts
    ):
        raise PromptError("RLE counts: expected a list of ints or a compressed string")
    if any(c < 0 for c in counts):
        raise PromptError("RLE counts: runs must be non-negative")
    if sum(counts) != h * w:
        raise PromptError(f"RLE counts sum to {sum(counts)}, but the size {h}x{w} has {h * w}")
    values = np.arange(len(counts)) % 2 == 1
    flat = np.repeat(values, counts)
    return flat.reshape((h, w), order="F")


# --------------------------------------------------------------------- geometry, polygons


def mask_area(mask: Any) -> int:
    return int(_check_mask(mask).sum())


def mask_bbox(mask: Any) -> list[int]:
    """COCO ``[x, y, w, h]`` of the foreground (``[0, 0, 0, 0]`` when empty)."""
    m = _check_mask(mask)
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if rows.size == 0:
        return [0, 0, 0, 0]
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def mask_to_polygons(mask: Any, *, tolerance: float = 0.0) -> list[list[float]]:
    """Outer boundaries as COCO polygons (holes are not representable; see module docstring).

    Contours run through pixel centres of the boundary at the 0.5 level of a zero-padded mask,
    so a polygon rasterised back at pixel centres gives the mask again (up to the corners).
    """
    from skimage.measure import approximate_polygon, find_contours

    m = _check_mask(mask)
    padded = np.pad(m.astype(np.float32), 1)
    polygons = []
    for contour in find_contours(padded, 0.5):
        if tolerance > 0:
            contour = approximate_polygon(contour, tolerance)
        if len(contour) < 3:
            continue
        # padded (row, col) → original pixel-centre coordinates (x, y)
        xy = np.stack([contour[:, 1] - 1 + 0.5, contour[:, 0] - 1 + 0.5], axis=1)
        ring = xy[:-1] if np.allclose(xy[0], xy[-1]) else xy
        if len(ring) < 3:
            continue
        signed = np.sum(ring[:, 0] * np.roll(ring[:, 1], -1) - np.roll(ring[:, 0], -1) * ring[:, 1])
        inside = _centre_inside(m, ring)
        if signed == 0 or not inside:
            continue  # a hole's boundary (its inside is background)
        polygons.append([round(float(v), 2) for v in ring.ravel()])
    return polygons


def _centre_inside(mask: NDArray[np.bool_], ring: NDArray[np.float64]) -> bool:
    """Whether the region a contour encloses is foreground (outer boundary) or not (a hole)."""
    from skimage.draw import polygon as fill

    rr, cc = fill(ring[:, 1] - 0.5, ring[:, 0] - 0.5, shape=mask.shape)
    if rr.size == 0:
        return bool(mask[int(ring[0, 1]), int(ring[0, 0])])
    return bool(mask[rr, cc].mean() >= 0.5)


def polygons_to_mask(
    polygons: Sequence[Sequence[float]], size: tuple[int, int]
) -> NDArray[np.bool_]:
    """Rasterise COCO polygons (pixel centres inside) as an H x W mask; ``size`` is (W, H)."""
    from skimage.draw import polygon as fill

    w, h = size
    out = np.zeros((h, w), dtype=bool)
    for poly in polygons:
        xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        rr, cc = fill(xy[:, 1] - 0.5, xy[:, 0] - 0.5, shape=(h, w))
        out[rr, cc] = True
    return out


# ------------------------------------------------------------------------------ image files


def save_mask_png(mask: Any, path: str | Path) -> None:
    """A 0/255 single-channel PNG, written atomically."""
    img = Image.fromarray(_check_mask(mask).astype(np.uint8) * 255, mode="L")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def save_label_png(masks: Sequence[Any], path: str | Path) -> None:
    """Several masks in one paletted PNG: pixel value k is object k (1-based), 0 background;
    later objects are drawn over earlier ones."""
    if not masks:
        raise PromptError("label PNG: no masks")
    checked = [_check_mask(m, f"mask {i}") for i, m in enumerate(masks)]
    shape = checked[0].shape
    if any(m.shape != shape for m in checked):
        raise PromptError("label PNG: masks have different sizes")
    if len(checked) > 255:
        raise PromptError(f"label PNG: at most 255 objects fit in 8 bits, got {len(checked)}")
    labels = np.zeros(shape, dtype=np.uint8)
    for k, m in enumerate(checked, start=1):
        labels[m] = k
    img = Image.fromarray(labels, mode="P")
    palette = [0, 0, 0]
    for k in range(255):
        palette.extend(PALETTE[k % len(PALETTE)])
    img.putpalette(palette)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def overlay(
    image: Image.Image,
    masks: Sequence[Any],
    *,
    alpha: float = 0.5,
    colors: Sequence[tuple[int, int, int]] | None = None,
    outline: bool = True,
) -> Image.Image:
    """The image with each mask tinted in its own colour and outlined."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w = base.shape[:2]
    colors = colors or PALETTE
    for i, mask in enumerate(masks):
        m = _check_mask(mask, f"mask {i}")
        if m.shape != (h, w):
            raise PromptError(f"mask {i}: shape {m.shape} does not match the image {h}x{w}")
        color = np.asarray(colors[i % len(colors)], dtype=np.float32)
        base[m] = base[m] * (1 - alpha) + color * alpha
        if outline:
            edge = m & ~(
                np.pad(m, 1)[:-2, 1:-1]
                & np.pad(m, 1)[2:, 1:-1]
                & np.pad(m, 1)[1:-1, :-2]
                & np.pad(m, 1)[1:-1, 2:]
            )
            base[edge] = color
    return Image.fromarray(base.clip(0, 255).astype(np.uint8), mode="RGB")


def save_overlay(image: Image.Image, masks: Sequence[Any], path: str | Path, **kwargs: Any) -> None:
    """:func:`overlay`, saved atomically as PNG."""
    img = overlay(image, masks, **kwargs)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def draw_points(image: Image.Image, points: Sequence[tuple[float, float, bool]]) -> Image.Image:
    """Clicks drawn as green (positive) / red (negative) dots."""
    out = image.convert("RGB").copy()
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
    file_name: str | None = None,
    size: tuple[int, int],
    form: Literal["rle", "polygon"] = "rle",
) -> dict[str, Any]:
    """A COCO-style dict (images, annotations, categories) for one image of ``size`` (W, H)."""
    if form not in ("rle", "polygon"):
        raise PromptError(f"COCO segmentation form: expected rle or polygon, got {form!r}")
    if scores is not None and len(scores) != len(masks):
        raise PromptError(f"COCO: {len(masks)} masks but {len(scores)} scores")
    w, h = size
    annotations = []
    for i, mask in enumerate(masks):
        m = _check_mask(mask, f"mask {i}")
        if m.shape != (h, w):
            raise PromptError(f"mask {i}: shape {m.shape} does not match the image {h}x{w}")
        seg: Any = encode_rle_compressed(m) if form == "rle" else mask_to_polygons(m)
        ann: dict[str, Any] = {
            "id": i + 1,
            "image_id": image_id,
            "category_id": category_id,
            "segmentation": seg,
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
        "categories": [{"id": category_id, "name": "object"}],
    }
