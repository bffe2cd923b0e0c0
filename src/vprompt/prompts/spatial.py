"""Spatial prompts for promptable segmentation (SAM family): points, boxes, masks, scribbles.

Coordinates are in ORIGINAL-image pixels and continuous, x the column and y the row, valid
in ``[0, W] x [0, H]`` for an image of size ``(W, H)`` (both edges included). They reach the
model exactly as given, as Meta's ``SamPredictor`` takes them: SAM's prompt encoder adds half a
pixel (of its input frame) to every coordinate, so the integer coordinates ``(j, i)`` point at
pixel ``(row i, col j)`` — how the interactive benchmarks send their clicks. (Scribble masks
are rasterized geometrically: a pixel is in when its square's centre ``(j + 0.5, i + 0.5)``
lies within the stroke.) Image sizes are ``(W, H)``; mask arrays are ``H x W``.

One :class:`ObjectPrompt` describes one object (points, at most one box, and at most one mask
input); a :class:`PromptSet` holds many objects of one image, is validated against its size, and
turns into padded batched arrays for a single decoder call (:meth:`PromptSet.to_arrays`).

Scribbles become prompts in one of two ways (:class:`Scribble`): points sampled evenly along the
stroke, carrying its polarity (what :meth:`ObjectPrompt.from_scribbles` uses by default), or a
mask rasterized at the stroke width (``use="points+mask"``). Points are the default because
SAM's mask input is meant to be its own previous low-res *logits* for refinement; a thin line
rasterized into that slot is far from what it was trained on and tends to pull the output
towards the line itself.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any, Literal, TypedDict

import numpy as np
from numpy.typing import NDArray

from vprompt.errors import PromptError
from vprompt.prompts.resize import LOW_RES_SIZE, ResizeLongestSide, _check_size

# transformers' SAM prompt encoder zeroes points with this label; SamProcessor pads with it.
POINT_PAD_LABEL = -10


def _finite(what: str, *values: float) -> None:
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float | np.integer | np.floating):
            raise PromptError(f"{what}: coordinates must be numbers, got {v!r}")
        if not math.isfinite(v):
            raise PromptError(f"{what}: coordinates must be finite, got {v}")


def _readonly(array: NDArray[np.generic]) -> NDArray[np.generic]:
    array.setflags(write=False)
    return array


@dataclass(frozen=True)
class Point:
    """A click at ``(x, y)``; ``positive=False`` marks background."""

    x: float
    y: float
    _: KW_ONLY
    positive: bool = True

    def __post_init__(self) -> None:
        _finite(f"point {(self.x, self.y)}", self.x, self.y)


@dataclass(frozen=True)
class Box:
    """An axis-aligned box from corner ``(x0, y0)`` to corner ``(x1, y1)``, non-empty."""

    x0: float
    y0: float
    x1: float
    y1: float

    def __post_init__(self) -> None:
        corners = (self.x0, self.y0, self.x1, self.y1)
        _finite(f"box {corners}", *corners)
        if self.x1 <= self.x0 or self.y1 <= self.y0:
            raise PromptError(
                f"box {corners}: expected x1 > x0 and y1 > y0 (an inverted or empty box)"
            )


@dataclass(frozen=True, eq=False)
class Mask:
    """A binary mask prompt of the ORIGINAL image size (``H x W``).

    Accepts bool, integers in {0, 1} or {0, 255}, or floats in ``[0, 1]`` (>= 0.5 is
    foreground). Stored as a read-only bool array.
    """

    array: NDArray[Any]

    def __post_init__(self) -> None:
        raw = np.asarray(self.array)
        if raw.ndim != 2 or 0 in raw.shape:
            raise PromptError(f"mask: expected a 2-D H x W array, got shape {raw.shape}")
        if raw.dtype == np.bool_:
            out = raw.copy()
        elif np.issubdtype(raw.dtype, np.integer):
            values = set(np.unique(raw).tolist())
            if not (values <= {0, 1} or values <= {0, 255}):
                raise PromptError(
                    f"mask: integer masks must hold only 0/1 or 0/255, got {sorted(values)[:6]}"
                )
            out = raw > 0
        elif np.issubdtype(raw.dtype, np.floating):
            if not np.isfinite(raw).all():
                raise PromptError("mask: values must be finite (got NaN or inf)")
            if raw.min() < 0 or raw.max() > 1:
                raise PromptError(
                    f"mask: float masks must lie in [0, 1], got [{raw.min()}, {raw.max()}]"
                )
            out = raw >= 0.5
        else:
            raise PromptError(f"mask: expected a bool, integer or float array, got {raw.dtype}")
        object.__setattr__(self, "array", _readonly(out))

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)``."""
        h, w = self.array.shape
        return int(h), int(w)


@dataclass(frozen=True, eq=False)
class MaskLogits:
    """SAM's previous low-res logits (``256 x 256`` float), fed back for iterative refinement.

    They cover the model's padded square frame, not the original image; pass them exactly as
    the decoder returned them. A leading singleton axis (``1 x 256 x 256``) is dropped.
    """

    array: NDArray[Any]

    def __post_init__(self) -> None:
        raw = np.asarray(self.array)
        if raw.ndim == 3 and raw.shape[0] == 1:
            raw = raw[0]
        if raw.ndim != 2 or raw.shape[0] != raw.shape[1] or raw.shape[0] < 4:
            raise PromptError(
                f"mask logits: expected a square low-res array such as "
                f"{(LOW_RES_SIZE, LOW_RES_SIZE)}, got shape {raw.shape}"
            )
        if not np.issubdtype(raw.dtype, np.floating) and not np.issubdtype(raw.dtype, np.integer):
            raise PromptError(f"mask logits: expected a float array, got {raw.dtype}")
        out = raw.astype(np.float32)
        if not np.isfinite(out).all():
            raise PromptError("mask logits: values must be finite (got NaN or inf)")
        object.__setattr__(self, "array", _readonly(out))


@dataclass(frozen=True)
class Scribble:
    """A stroke: a polyline through ``points`` ((x, y) pairs), drawn ``width`` pixels wide.

    It becomes a prompt either as points (:meth:`to_points`: ``max_points`` evenly spaced by
    arc length along the polyline, first and last included, duplicates dropped, each carrying
    the scribble's polarity) or as a mask (:meth:`to_mask`: every pixel whose centre lies within
    ``width / 2`` of the polyline).
    """

    points: Sequence[tuple[float, float]]
    _: KW_ONLY
    positive: bool = True
    width: float = 5.0

    def __post_init__(self) -> None:
        try:
            pts = np.asarray(self.points, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise PromptError(
                f"scribble: expected a sequence of (x, y), got {self.points!r}"
            ) from exc
        if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] == 0:
            raise PromptError(
                f"scribble: expected a non-empty sequence of (x, y) pairs, got shape {pts.shape}"
            )
        if not np.isfinite(pts).all():
            raise PromptError("scribble: coordinates must be finite (got NaN or inf)")
        _finite("scribble width", self.width)
        if self.width <= 0:
            raise PromptError(f"scribble: width must be > 0, got {self.width}")
        object.__setattr__(self, "points", tuple((float(x), float(y)) for x, y in pts))

    def to_points(self, max_points: int = 8) -> tuple[Point, ...]:
        """Up to ``max_points`` points evenly spaced along the stroke (ends included)."""
        if max_points < 1:
            raise PromptError(f"scribble max_points: expected >= 1, got {max_points}")
        pts = np.asarray(self.points, dtype=np.float64)  # K x 2
        seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)  # K-1
        cum = np.concatenate([[0.0], np.cumsum(seg)])  # K
        total = float(cum[-1])
        if total == 0.0 or max_points == 1:
            sampled = pts[:1]
        else:
            targets = np.linspace(0.0, total, max_points)
            sampled = np.stack(
                [np.interp(targets, cum, pts[:, 0]), np.interp(targets, cum, pts[:, 1])], axis=1
            )
            sampled[-1] = pts[-1]  # exact end, free of float drift
        out: list[Point] = []
        seen: set[tuple[float, float]] = set()
        for x, y in sampled:
            key = (float(x), float(y))
            if key not in seen:
                seen.add(key)
                out.append(Point(key[0], key[1], positive=self.positive))
        return tuple(out)

    def to_mask(self, image_size: tuple[int, int]) -> NDArray[np.bool_]:
        """The stroke rasterized as an H x W bool mask of an image of size ``(W, H)``."""
        w, h = _check_size(image_size)
        mask = np.zeros((h, w), dtype=bool)
        pts = np.asarray(self.points, dtype=np.float64)
        radius = self.width / 2.0
        segments = list(itertools.pairwise(pts)) if len(pts) > 1 else [(pts[0], pts[0])]
        for a, b in segments:
            # Only pixels in the segment's bounding box (grown by the radius) can be hit.
            c0 = max(math.floor(min(a[0], b[0]) - radius), 0)
            c1 = min(math.ceil(max(a[0], b[0]) + radius), w)
            r0 = max(math.floor(min(a[1], b[1]) - radius), 0)
            r1 = min(math.ceil(max(a[1], b[1]) + radius), h)
            if c0 >= c1 or r0 >= r1:
                continue
            cx = np.arange(c0, c1) + 0.5  # pixel centres
            cy = np.arange(r0, r1) + 0.5
            px, py = np.meshgrid(cx, cy)  # h_box x w_box
            d = b - a
            length2 = float(d @ d)
            t = (
                np.zeros_like(px)
                if length2 == 0
                else np.clip(((px - a[0]) * d[0] + (py - a[1]) * d[1]) / length2, 0.0, 1.0)
            )
            dist2 = (px - a[0] - t * d[0]) ** 2 + (py - a[1] - t * d[1]) ** 2
            mask[r0:r1, c0:c1] |= dist2 <= radius * radius
        return mask


@dataclass(frozen=True, eq=False)
class ObjectPrompt:
    """One object's prompt: clicks, at most one box, and at most one mask input.

    Args:
        points: Positive and negative clicks.
        boxes: Zero or one :class:`Box` (SAM's decoder takes one box per object; give each box
            its own object).
        mask: A binary mask of the original image size, turned into a mask input.
        logits: SAM's previous low-res logits for refinement. Only one of ``mask``/``logits``.
    """

    points: Sequence[Point] = ()
    boxes: Sequence[Box] = ()
    mask: Mask | None = None
    logits: MaskLogits | None = None

    def __post_init__(self) -> None:
        points = tuple(self.points)
        boxes = (self.boxes,) if isinstance(self.boxes, Box) else tuple(self.boxes)
        for p in points:
            if not isinstance(p, Point):
                raise PromptError(f"object prompt: points must be Point, got {p!r}")
        for b in boxes:
            if not isinstance(b, Box):
                raise PromptError(f"object prompt: boxes must be Box, got {b!r}")
        if len(boxes) > 1:
            raise PromptError(
                f"object prompt: expected at most one box per object, got {len(boxes)} "
                "(give each box its own ObjectPrompt)"
            )
        if self.mask is not None and not isinstance(self.mask, Mask):
            raise PromptError(f"object prompt: mask must be a Mask, got {type(self.mask).__name__}")
        if self.logits is not None and not isinstance(self.logits, MaskLogits):
            raise PromptError(
                f"object prompt: logits must be MaskLogits, got {type(self.logits).__name__}"
            )
        if self.mask is not None and self.logits is not None:
            raise PromptError("object prompt: give a mask or previous logits, not both")
        if not points and not boxes and self.mask is None and self.logits is None:
            raise PromptError("object prompt: empty (expected at least a point, box or mask)")
        object.__setattr__(self, "points", points)
        object.__setattr__(self, "boxes", boxes)

    @property
    def box(self) -> Box | None:
        """The object's box, if any."""
        return self.boxes[0] if self.boxes else None

    @property
    def has_mask_input(self) -> bool:
        """Whether the object carries a mask or previous logits."""
        return self.mask is not None or self.logits is not None

    @classmethod
    def from_scribbles(
        cls,
        scribbles: Sequence[Scribble],
        *,
        max_points: int = 8,
        use: Literal["points", "points+mask"] = "points",
        image_size: tuple[int, int] | None = None,
        box: Box | None = None,
    ) -> ObjectPrompt:
        """An object prompt from strokes.

        By default (``use="points"``) each scribble becomes up to ``max_points`` points with its
        polarity. ``use="points+mask"`` also adds a mask: the union of the positive strokes
        minus the negative ones, rasterized at their widths (needs ``image_size``). Points are
        the default because SAM's mask input expects its own previous logits, not a thin line.
        """
        if not scribbles:
            raise PromptError("from_scribbles: expected at least one scribble")
        points = tuple(p for s in scribbles for p in s.to_points(max_points))
        mask = None
        if use == "points+mask":
            if image_size is None:
                raise PromptError("from_scribbles: use='points+mask' needs image_size (W, H)")
            w, h = _check_size(image_size)
            union = np.zeros((h, w), dtype=bool)
            for s in (s for s in scribbles if s.positive):
                union |= s.to_mask((w, h))
            for s in (s for s in scribbles if not s.positive):
                union &= ~s.to_mask((w, h))
            if not union.any():
                raise PromptError("from_scribbles: no positive scribble pixel inside the image")
            mask = Mask(union)
        elif use != "points":
            raise PromptError(f"from_scribbles: use must be 'points' or 'points+mask', got {use!r}")
        return cls(points=points, boxes=() if box is None else (box,), mask=mask)


class PromptArrays(TypedDict):
    """Batched model-frame arrays for one decoder call (B objects, N points each).

    ``points``: B x N x 2 float32 (pads hold -10), ``labels``: B x N int64 (1 positive,
    0 negative, -10 padding), ``boxes``: B x 4 float32, ``masks``: B x 1 x 256 x 256 float32
    logits; each is None when no object of the batch has that prompt. ``original_size`` and
    ``resized_size`` are (H, W), as transformers' processor reports them.
    """

    points: NDArray[np.float32] | None
    labels: NDArray[np.int64] | None
    boxes: NDArray[np.float32] | None
    masks: NDArray[np.float32] | None
    original_size: tuple[int, int]
    resized_size: tuple[int, int]


@dataclass(frozen=True, kw_only=True)
class PromptGroup:
    """Objects of a :class:`PromptSet` that can share one decoder call."""

    indices: tuple[int, ...]
    prompts: PromptSet


def _kind(obj: ObjectPrompt) -> tuple[bool, bool, bool]:
    return bool(obj.points), obj.box is not None, obj.has_mask_input


@dataclass(frozen=True, eq=False)
class PromptSet:
    """Many objects' prompts for one image of size ``image_size`` (W, H), validated against it.

    SAM batches objects in one decode only if they share the same *kind* of prompt: with or
    without points, with or without a box, with or without a mask input (transformers takes
    ``input_boxes``/``input_masks`` for the whole batch, and a box-less batch gets a padding
    point). :meth:`to_arrays` therefore refuses mixed sets; :meth:`groups` splits a set into
    batchable groups, keeping each object's index.
    """

    objects: Sequence[ObjectPrompt]
    _: KW_ONLY
    image_size: tuple[int, int]

    def __post_init__(self) -> None:
        objects = tuple(self.objects)
        w, h = _check_size(self.image_size)
        if not objects:
            raise PromptError("prompt set: expected at least one object, got none")
        for i, obj in enumerate(objects):
            if not isinstance(obj, ObjectPrompt):
                raise PromptError(f"object {i}: expected an ObjectPrompt, got {type(obj).__name__}")
            for p in obj.points:
                if not (0 <= p.x <= w and 0 <= p.y <= h):
                    raise PromptError(
                        f"object {i}: point ({p.x}, {p.y}) is outside the image [0, {w}] x [0, {h}]"
                    )
            for b in obj.boxes:
                if not (b.x0 >= 0 and b.x1 <= w and b.y0 >= 0 and b.y1 <= h):
                    raise PromptError(
                        f"object {i}: box ({b.x0}, {b.y0}, {b.x1}, {b.y1}) is outside the image "
                        f"[0, {w}] x [0, {h}]"
                    )
            if obj.mask is not None and obj.mask.shape != (h, w):
                raise PromptError(
                    f"object {i}: mask has shape {obj.mask.shape}, expected (H, W) = {(h, w)}"
                )
        object.__setattr__(self, "objects", objects)
        object.__setattr__(self, "image_size", (w, h))

    def __len__(self) -> int:
        return len(self.objects)

    def groups(self) -> list[PromptGroup]:
        """Batchable groups, in order of each group's first object.

        Objects also group by their number of points, so no group needs padding points: a
        padding point is still a token the decoder attends to, so a padded batch would not
        equal decoding each object alone. Grouped decoding does, exactly.
        """
        by_kind: dict[tuple[int, bool, bool, bool], list[int]] = {}
        for i, obj in enumerate(self.objects):
            by_kind.setdefault((len(obj.points), *_kind(obj)), []).append(i)
        return [
            PromptGroup(
                indices=tuple(idx),
                prompts=PromptSet([self.objects[i] for i in idx], image_size=self.image_size),
            )
            for idx in by_kind.values()
        ]

    def to_arrays(self, transform: ResizeLongestSide | None = None) -> PromptArrays:
        """Padded batched arrays in the model frame (see :class:`PromptArrays`).

        Objects with fewer points are padded with ``(-10, -10)`` and label -10, which SAM's
        prompt encoder ignores.

        Raises:
            PromptError: if objects mix kinds of prompt; use :meth:`groups` first.
        """
        transform = transform or ResizeLongestSide()
        kinds = {_kind(o) for o in self.objects}
        if len(kinds) > 1:
            raise PromptError(
                "prompt set: objects mix prompt kinds (points / box / mask input), which SAM "
                "cannot decode in one batch; split them with PromptSet.groups()"
            )
        has_points, has_box, has_mask = kinds.pop()
        w, h = self.image_size
        new_w, new_h = transform.resized_size(w, h)
        n_obj = len(self.objects)
        points = labels = boxes = masks = None
        if has_points:
            n_pts = max(len(o.points) for o in self.objects)
            points = np.full((n_obj, n_pts, 2), POINT_PAD_LABEL, dtype=np.float32)
            labels = np.full((n_obj, n_pts), POINT_PAD_LABEL, dtype=np.int64)
            for i, obj in enumerate(self.objects):
                xy = np.array([(p.x, p.y) for p in obj.points], dtype=np.float64)
                points[i, : len(xy)] = transform.apply_points(xy, (w, h))
                labels[i, : len(xy)] = [1 if p.positive else 0 for p in obj.points]
        if has_box:
            raw = np.array(
                [(b.x0, b.y0, b.x1, b.y1) for o in self.objects for b in o.boxes], dtype=np.float64
            )
            boxes = transform.apply_boxes(raw, (w, h)).astype(np.float32)
        if has_mask:
            side = transform.low_res
            masks = np.empty((n_obj, 1, side, side), dtype=np.float32)
            for i, obj in enumerate(self.objects):
                if obj.logits is not None:
                    if obj.logits.array.shape != (side, side):
                        raise PromptError(
                            f"object {i}: previous logits have shape {obj.logits.array.shape}, "
                            f"but this model's decoder works at {(side, side)}"
                        )
                    masks[i, 0] = obj.logits.array
                elif obj.mask is not None:
                    masks[i, 0] = transform.mask_to_low_res(obj.mask.array, (w, h))
        return PromptArrays(
            points=points,
            labels=labels,
            boxes=boxes,
            masks=masks,
            original_size=(h, w),
            resized_size=(new_h, new_w),
        )


__all__ = [
    "POINT_PAD_LABEL",
    "Box",
    "Mask",
    "MaskLogits",
    "ObjectPrompt",
    "Point",
    "PromptArrays",
    "PromptGroup",
    "PromptSet",
    "Scribble",
]
