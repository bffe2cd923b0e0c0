"""Spatial prompts written on the command line.

``--point X,Y[,L]`` (L = 1 positive, 0 negative; default 1), ``--box X0,Y0,X1,Y1``,
``--scribble X,Y;X,Y;...[:L]``, ``--mask PNG`` and ``--object SPEC`` where SPEC joins
``point=X,Y[,L]``, ``box=X0,Y0,X1,Y1``, ``scribble=X,Y;X,Y...[:L]`` and ``mask=PNG`` items
with ``|``: ``--object "point=10,20|point=40,50,0|box=0,0,80,90"``. Coordinates are
original-image pixels.

Without ``--object`` the loose prompts form objects this way: every box is its own object; the
points, scribbles and mask join the box when there is exactly one box, or form one object of
their own when there is none. Points together with several boxes are ambiguous and refused
(say which box they belong to with ``--object``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from vprompt.errors import ImageLoadError, PromptError
from vprompt.prompts.spatial import Box, Mask, ObjectPrompt, Point, Scribble


def _numbers(text: str, what: str, counts: tuple[int, ...]) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise PromptError(f"{what} {text!r}: expected comma-separated numbers") from None
    if len(values) not in counts:
        want = " or ".join(str(c) for c in counts)
        raise PromptError(f"{what} {text!r}: expected {want} numbers, got {len(values)}")
    return values


def _label(value: float, text: str) -> bool:
    if value not in (0.0, 1.0):
        raise PromptError(f"point {text!r}: the label must be 1 (object) or 0 (background)")
    return value == 1.0


def parse_point(text: str) -> Point:
    """``X,Y`` or ``X,Y,L``."""
    values = _numbers(text, "point", (2, 3))
    positive = _label(values[2], text) if len(values) == 3 else True
    return Point(values[0], values[1], positive=positive)


def parse_box(text: str) -> Box:
    """``X0,Y0,X1,Y1`` (corners)."""
    return Box(*_numbers(text, "box", (4,)))


def parse_scribble(text: str, *, width: float = 5.0) -> Scribble:
    """``X,Y;X,Y;...`` with an optional ``:L`` polarity suffix."""
    body, _, label = text.partition(":")
    positive = True
    if label:
        positive = _label(_numbers(label, "scribble label", (1,))[0], text)
    points = [tuple(_numbers(p, "scribble point", (2,))) for p in body.split(";") if p.strip()]
    return Scribble([(p[0], p[1]) for p in points], positive=positive, width=width)


def load_mask_file(path: str | Path, image_size: tuple[int, int]) -> Mask:
    """A mask prompt from a PNG (any non-zero pixel is foreground) of the image's size."""
    p = Path(path)
    if not p.is_file():
        raise ImageLoadError(p, "no such mask file")
    try:
        with Image.open(p) as img:
            array = np.asarray(img.convert("L")) > 0
    except (OSError, ValueError) as exc:
        raise ImageLoadError(p, f"cannot decode mask ({exc})") from None
    w, h = image_size
    if array.shape != (h, w):
        raise PromptError(
            f"mask {p}: size {array.shape[1]}x{array.shape[0]} does not match the image {w}x{h}"
        )
    return Mask(array)


def _build(
    points: list[Point],
    boxes: list[Box],
    scribbles: list[Scribble],
    mask: Mask | None,
    *,
    scribble_mode: str,
    image_size: tuple[int, int],
) -> ObjectPrompt:
    if scribbles:
        from_scribbles = ObjectPrompt.from_scribbles(
            scribbles,
            use="points+mask" if scribble_mode == "points+mask" else "points",
            image_size=image_size,
        )
        points = [*points, *from_scribbles.points]
        if mask is None:
            mask = from_scribbles.mask
    return ObjectPrompt(points=points, boxes=boxes, mask=mask)


def parse_object(text: str, *, image_size: tuple[int, int], scribble_mode: str) -> ObjectPrompt:
    """One ``--object`` SPEC (see the module docstring)."""
    points: list[Point] = []
    boxes: list[Box] = []
    scribbles: list[Scribble] = []
    mask = None
    for item in (t.strip() for t in text.split("|")):
        if not item:
            continue
        kind, sep, value = item.partition("=")
        kind = kind.strip().lower()
        if not sep:
            raise PromptError(f"object {text!r}: item {item!r} must look like KIND=VALUE")
        if kind == "point":
            points.append(parse_point(value))
        elif kind == "box":
            boxes.append(parse_box(value))
        elif kind == "scribble":
            scribbles.append(parse_scribble(value))
        elif kind == "mask":
            if mask is not None:
                raise PromptError(f"object {text!r}: at most one mask per object")
            mask = load_mask_file(value, image_size)
        else:
            raise PromptError(
                f"object {text!r}: unknown item {kind!r} (expected point, box, scribble or mask)"
            )
    return _build(
        points, boxes, scribbles, mask, scribble_mode=scribble_mode, image_size=image_size
    )


def objects_from_cli(
    *,
    points: Sequence[str],
    boxes: Sequence[str],
    scribbles: Sequence[str],
    mask: str | None,
    objects: Sequence[str],
    image_size: tuple[int, int],
    scribble_mode: str = "points",
) -> list[ObjectPrompt]:
    """Every object the options describe, ``--object`` ones last (see the module docstring)."""
    loose_points = [parse_point(p) for p in points]
    loose_boxes = [parse_box(b) for b in boxes]
    loose_scribbles = [parse_scribble(s) for s in scribbles]
    loose_mask = load_mask_file(mask, image_size) if mask else None
    extras = bool(loose_points or loose_scribbles or loose_mask is not None)
    result: list[ObjectPrompt] = []
    if len(loose_boxes) > 1:
        if extras:
            raise PromptError(
                "points, scribbles or a mask together with several --box options are "
                "ambiguous; group each object's prompts with "
                "--object 'point=X,Y|box=X0,Y0,X1,Y1'"
            )
        result = [ObjectPrompt(boxes=[b]) for b in loose_boxes]
    elif loose_boxes or extras:
        result = [
            _build(
                loose_points,
                loose_boxes,
                loose_scribbles,
                loose_mask,
                scribble_mode=scribble_mode,
                image_size=image_size,
            )
        ]
    result.extend(
        parse_object(o, image_size=image_size, scribble_mode=scribble_mode) for o in objects
    )
    if not result:
        raise PromptError(
            "no prompt given: add --point X,Y, --box X0,Y0,X1,Y1, --scribble, --mask or --object"
        )
    return result
