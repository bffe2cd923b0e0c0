"""Set-of-Mark rendering: numbered marks on regions, for multimodal LLMs to refer to.

Yang et al., "Set-of-Mark Prompting Unleashes Extraordinary Visual Grounding in GPT-4V",
2023: over-segment the image, draw every region with a distinct colour and a number, and
hand the marked image to a multimodal LLM, which can then answer "which object?" with a
number that maps back to a region. This module draws the marks and returns a JSON-ready
legend (mark number → box, area, label position, colour) that travels with the image.

Choices, following the paper's mark allocation:

- Labels 1..N in the order the regions are given; region k gets colour
  ``PALETTE[(k - 1) % len(PALETTE)]`` (the same colours as :func:`vprompt.segment.outputs.
  overlay`).
- A mask's label sits at its most interior point: the maximum of the Euclidean distance
  transform of the mask (the image border counts as outside), so it lands inside the
  object even for concave shapes, where the box centre may not. As in the paper's mark
  allocation, regions are placed smallest first and a region's label avoids the masks of
  the smaller regions placed before it (a person's number does not land on their shirt's
  mask); here it also avoids the labels already drawn. Where nothing would be left, the
  label avoids only the labels, then nothing. A region without a mask is labelled at its
  box centre.
- Each label is its number on a filled rectangle in the region's colour, the text in
  black or white, whichever contrasts more with that colour (WCAG relative luminance).
- Regions get a translucent fill (``alpha``; 0 leaves them unfilled) and an outline just
  inside their mask / box; pixels that no fill, outline or label touches stay
  bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont

from vprompt.detect.markers import Region, band, line_pixels
from vprompt.errors import PromptError
from vprompt.segment.outputs import PALETTE

MAX_MARKS = 999


@dataclass(frozen=True, eq=False)
class SetOfMarks:
    """A marked image and what each mark stands for.

    Attributes:
        image: The image with the marks drawn (RGB, the input's size).
        legend: Per mark, ``{"mark": k, "box": [x0, y0, x1, y1], "area": …,
            "label": [x, y], "color": "#rrggbb"}``; ``area`` is the mask's pixel count or
            the box's area, ``label`` the centre of the drawn number.
    """

    image: Image.Image
    legend: list[dict[str, Any]]


def _luminance(color: Sequence[int]) -> float:
    """WCAG relative luminance of an sRGB colour."""
    channels = []
    for v in color:
        c = v / 255.0
        channels.append(c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4)
    return 0.2126 * channels[0] + 0.7152 * channels[1] + 0.0722 * channels[2]


def text_color(background: Sequence[int]) -> tuple[int, int, int]:
    """Black or white, whichever has the higher WCAG contrast ratio on ``background``."""
    lum = _luminance(background)
    on_black = (lum + 0.05) / 0.05
    on_white = 1.05 / (lum + 0.05)
    return (0, 0, 0) if on_black >= on_white else (255, 255, 255)


def interior_point(
    mask: NDArray[np.bool_], avoid: NDArray[np.bool_] | None = None
) -> tuple[int, int]:
    """``(row, col)`` of the mask pixel farthest from the mask's edge (and from ``avoid``
    pixels, when the mask has pixels outside them); among equally deep pixels the one
    nearest the mask's centroid, then the first in row order."""
    from scipy.ndimage import distance_transform_edt

    usable = mask if avoid is None or not (mask & ~avoid).any() else mask & ~avoid
    # Padding makes the image border count as the region's edge.
    dist = distance_transform_edt(np.pad(usable, 1))[1:-1, 1:-1]
    rows, cols = np.nonzero(dist >= dist.max())
    cy, cx = np.argwhere(usable).mean(axis=0)
    best = int(np.argmin((rows - cy) ** 2 + (cols - cx) ** 2))
    return int(rows[best]), int(cols[best])


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def render_set_of_marks(
    image: Image.Image,
    regions: Sequence[Region],
    *,
    alpha: float = 0.4,
    outline: float = 2 / 336,
    label_size: float = 0.04,
    colors: Sequence[tuple[int, int, int]] | None = None,
) -> SetOfMarks:
    """Draw numbered Set-of-Mark labels, fills and outlines for ``regions`` on ``image``.

    Args:
        image: The image (W x H, any PIL mode).
        regions: The regions to mark; region ``k - 1`` gets mark ``k``.
        alpha: Opacity of each region's colour fill, in [0, 1] (0: no fill).
        outline: Outline width as a fraction of the longer image side (0: no outline).
        label_size: Label text height as a fraction of the longer image side (at least
            10 pixels).
        colors: RGB colour per region, cycled; defaults to :data:`PALETTE`.

    Returns:
        The marked image and its legend.

    Raises:
        PromptError: A region outside the image or with a mask of another size, no regions
            or more than :data:`MAX_MARKS`, ``alpha`` outside [0, 1], bad colours.
    """
    if not isinstance(image, Image.Image):
        raise PromptError(f"set-of-mark: expected a PIL image, got {type(image).__name__}")
    if not 0 < len(regions) <= MAX_MARKS:
        raise PromptError(f"set-of-mark: expected 1 to {MAX_MARKS} regions, got {len(regions)}")
    if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise PromptError(f"set-of-mark alpha: expected a number in [0, 1], got {alpha!r}")
    for name, value in (("outline", outline), ("label size", label_size)):
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise PromptError(f"set-of-mark {name}: expected a number in [0, 1], got {value!r}")
    palette = tuple(PALETTE if colors is None else colors)
    if not palette or not all(
        len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c) for c in palette
    ):
        raise PromptError(f"set-of-mark colors: expected RGB triples of ints, got {colors!r}")
    rgb = image.convert("RGB")
    size = rgb.size
    w, h = size
    for i, region in enumerate(regions):
        if not isinstance(region, Region):
            raise PromptError(f"set-of-mark: region {i + 1} is a {type(region).__name__}")
        region.check(size, what=f"set-of-mark region {i + 1}")

    arr = np.asarray(rgb, dtype=np.float64).copy()  # H x W x 3
    pixels = [r.pixels(size) for r in regions]
    color = [palette[i % len(palette)] for i in range(len(regions))]
    if alpha > 0:
        for m, c in zip(pixels, color, strict=True):
            arr[m] = arr[m] * (1.0 - alpha) + np.asarray(c, np.float64) * alpha
    out = np.rint(arr).astype(np.uint8)
    if outline > 0:
        width = line_pixels(outline, size)
        for m, c in zip(pixels, color, strict=True):
            out[band(m, width)] = c
    canvas = Image.fromarray(out)
    draw = ImageDraw.Draw(canvas)

    font = _font(max(10, round(label_size * max(size))))
    pad = max(1, round(0.2 * max(10, round(label_size * max(size)))) // 2)
    taken = np.zeros((h, w), dtype=bool)  # labels drawn so far
    covered = np.zeros((h, w), dtype=bool)  # masks of the regions placed so far
    labels: dict[int, tuple[float, float]] = {}
    # Smallest regions first: they have the fewest places for a label.
    for i in sorted(range(len(regions)), key=lambda k: (regions[k].area(), k)):
        region = regions[i]
        if region.mask is not None:
            free = region.mask & ~taken
            avoid = taken | covered if (free & ~covered).any() else taken
            row, col = interior_point(region.mask, avoid)
            covered |= region.mask
            cx, cy = col + 0.5, row + 0.5
        else:
            x0, y0, x1, y1 = region.box
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        text = str(i + 1)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        bw, bh = right - left + 2 * pad, bottom - top + 2 * pad
        # The label box is centred on the point, moved inside the image when it would
        # cross the border.
        bx0 = min(max(0, round(cx - bw / 2)), max(0, w - bw))
        by0 = min(max(0, round(cy - bh / 2)), max(0, h - bh))
        draw.rectangle((bx0, by0, bx0 + bw - 1, by0 + bh - 1), fill=color[i])
        draw.text((bx0 + pad - left, by0 + pad - top), text, font=font, fill=text_color(color[i]))
        taken[by0 : by0 + bh, bx0 : bx0 + bw] = True
        labels[i] = (bx0 + bw / 2, by0 + bh / 2)

    legend = []
    for i, region in enumerate(regions):
        area = region.area()
        legend.append(
            {
                "mark": i + 1,
                "box": [round(v, 2) for v in region.box],
                "area": int(area) if region.mask is not None else round(area, 2),
                "label": [round(labels[i][0], 2), round(labels[i][1], 2)],
                "color": "#{:02x}{:02x}{:02x}".format(*color[i]),
            }
        )
    return SetOfMarks(image=canvas, legend=legend)
