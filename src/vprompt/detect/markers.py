"""Visual prompts drawn into the image: markers that point a frozen model at one region.

A marker renders one candidate region into a copy of the image, so that a frozen
image-text model (CLIP) scores "this image, with *that* object singled out" against a
text. Two papers set the designs and defaults used here:

- Shtedritski, Rupprecht, Vedaldi, "What does CLIP know about a red circle? Visual prompt
  engineering for VLMs", ICCV 2023: a thin red ellipse drawn around the candidate's box
  steers CLIP to it while keeping the whole scene in view (better than cropping, which
  loses context, or colouring, which hides the object). ``red-circle`` follows it: pure
  red ``(255, 0, 0)``, the ellipse inscribed in the box (centre = box centre, semi-axes =
  half its width and height, as in the FGVP code's reproduction, ``boxes_to_circles``),
  a 2-pixel line at the model's input resolution (FGVP's ``thickness=2`` on images resized
  to a 336-pixel longer side), stored relative to the image's longer side: ``2 / 336``.
- Yang et al., "Fine-Grained Visual Prompting", NeurIPS 2023 (FGVP,
  github.com/ylingfeng/FGVP): with a segmentation mask, blurring everything *outside* it
  ("Blur Reverse Mask") works best; greying out the outside and drawing the mask's contour
  are the other fine-grained marks. ``blur`` uses their Gaussian blur of standard deviation
  100 pixels on images resized to a 384-pixel longer side (their ``--blur_std_dev 100``,
  ``--clip_image_size 384``), stored relative to the longer side: ``100 / 384``.

Markers combine with ``+`` (``red-circle+blur``): the parts are applied to one image in a
fixed order whatever the order written — background effects (``blur``, ``grey``) first,
then outlines (``red-circle``, ``box``, ``contour``), then ``crop``, which changes the
image's size and so must come last. (FGVP's own "ensembles" instead score each mark as a
separate image and sum the scores; :func:`vprompt.detect.referring.rank_regions` does that
when given several markers.)

Every renderer leaves pixels it does not mark bit-identical, draws without anti-aliasing
(the marked pixels are exactly the ones its geometry selects), and refuses a region that
reaches outside the image with a :class:`~vprompt.errors.PromptError`.

Coordinates: boxes are ``x0, y0, x1, y1`` float pixels of the image (``W x H``); pixel
``(row i, col j)`` covers ``[j, j + 1] x [i, i + 1]``, so a box covers the pixels
``floor(x0) .. ceil(x1) - 1`` (its *pixel rectangle*). Masks are ``H x W`` booleans.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageFilter

from vprompt.backbones.detection import check_box
from vprompt.errors import PromptError
from vprompt.utils.registry import Registry

RED = (255, 0, 0)
# The paper's 2-pixel line at CLIP's 336-pixel input, relative to the longer image side.
LINE_WIDTH = 2 / 336
# FGVP's Gaussian blur: standard deviation 100 px at a 384-pixel longer side.
BLUR_SIGMA = 100 / 384

# Stages: the order in which the parts of a combined marker are applied.
BACKGROUND, OUTLINE, GEOMETRY = 0, 1, 2


# ------------------------------------------------------------------------------- regions


@dataclass(frozen=True, eq=False)
class Region:
    """One candidate: a box, optionally with the object's mask.

    Attributes:
        box: ``x0, y0, x1, y1`` in pixels of the image it belongs to.
        mask: H x W bool mask of the object, or None (the box stands for it).
    """

    box: tuple[float, float, float, float]
    mask: NDArray[np.bool_] | None = None

    def __post_init__(self) -> None:
        values = tuple(self.box)
        if len(values) != 4:
            raise PromptError(f"region box {list(values)!r}: expected four numbers X0,Y0,X1,Y1")
        try:
            box = tuple(float(v) for v in values)
        except (TypeError, ValueError):
            raise PromptError(
                f"region box {list(values)!r}: expected four numbers X0,Y0,X1,Y1"
            ) from None
        if not all(math.isfinite(v) for v in box) or not (box[0] < box[2] and box[1] < box[3]):
            raise PromptError(f"region box {list(values)!r}: expected finite X0 < X1 and Y0 < Y1")
        object.__setattr__(self, "box", box)
        if self.mask is not None:
            mask = np.asarray(self.mask)
            if mask.ndim != 2 or mask.dtype.kind not in "biuf":
                raise PromptError(f"region mask: expected an H x W bool array, got {mask.shape}")
            mask = mask.astype(bool)
            if not mask.any():
                raise PromptError("region mask is empty; expected at least one pixel")
            object.__setattr__(self, "mask", mask)

    @classmethod
    def from_mask(cls, mask: Any) -> Region:
        """A region whose box is the tight pixel box of ``mask`` (H x W bool)."""
        m = np.asarray(mask).astype(bool)
        if m.ndim != 2 or not m.any():
            raise PromptError(f"region mask: expected a non-empty H x W mask, got {m.shape}")
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        box = (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))
        return cls(box=box, mask=m)

    def check(self, image_size: tuple[int, int], *, what: str = "region") -> Region:
        """Validate against a ``W x H`` image; returns self.

        Raises:
            PromptError: The box reaches outside the image or the mask is not H x W.
        """
        check_box(self.box, image_size, what=f"{what} box")
        w, h = image_size
        if self.mask is not None and self.mask.shape != (h, w):
            raise PromptError(
                f"{what} mask of shape {self.mask.shape} does not match the image's H x W {(h, w)}"
            )
        return self

    def pixel_rect(self) -> tuple[int, int, int, int]:
        """``c0, r0, c1, r1``: the half-open pixel range the box touches."""
        x0, y0, x1, y1 = self.box
        return math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)

    def pixels(self, image_size: tuple[int, int]) -> NDArray[np.bool_]:
        """H x W: the mask, or the box's pixel rectangle when there is none."""
        if self.mask is not None:
            return self.mask
        w, h = image_size
        c0, r0, c1, r1 = self.pixel_rect()
        out = np.zeros((h, w), dtype=bool)
        out[r0:r1, c0:c1] = True
        return out

    def area(self) -> float:
        """Mask pixel count, or the box's area."""
        if self.mask is not None:
            return float(np.count_nonzero(self.mask))
        x0, y0, x1, y1 = self.box
        return (x1 - x0) * (y1 - y0)


# ------------------------------------------------------------------------------- helpers


def _rgb(image: Image.Image) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise PromptError(f"marker: expected a PIL image, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


def _check_color(color: Sequence[int], what: str) -> None:
    if len(color) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in color):
        raise PromptError(f"{what} color: expected three ints in [0, 255], got {color!r}")


def _check_fraction(value: float, what: str, *, upper: float = 1.0) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and 0 <= value <= upper):
        raise PromptError(f"{what}: expected a number in [0, {upper:g}], got {value!r}")


def line_pixels(width: float, image_size: tuple[int, int]) -> int:
    """A line width relative to the longer image side, in whole pixels (at least 1)."""
    return max(1, round(width * max(image_size)))


def band(pixels: NDArray[np.bool_], width: int) -> NDArray[np.bool_]:
    """The inner band of ``width`` pixels along the edge of ``pixels`` (H x W bool).

    A pixel belongs to it when it is in ``pixels`` and within ``width`` 4-neighbour steps of
    a pixel outside (the image border counts as outside), so a box's band is its outline
    drawn just inside its pixel rectangle and a mask's band is its contour.
    """
    from scipy.ndimage import binary_erosion

    out = np.zeros(pixels.shape, dtype=bool)
    rows, cols = np.flatnonzero(pixels.any(axis=1)), np.flatnonzero(pixels.any(axis=0))
    if rows.size == 0:
        return out
    # Everything outside the bounding rectangle is background, which is what erosion's
    # border value assumes too: eroding only the rectangle gives the same band, faster.
    window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    local = pixels[window]
    cross = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)
    inner = binary_erosion(local, structure=cross, iterations=width, border_value=0)
    out[window] = local & ~inner
    return out


def ellipse_band(
    rect: tuple[int, int, int, int], width: int, image_size: tuple[int, int]
) -> NDArray[np.bool_]:
    """H x W: the pixels whose centres lie on an ellipse line of ``width`` pixels inscribed
    in the pixel rectangle ``c0, r0, c1, r1`` (between the ellipse with the rectangle's
    half sides as semi-axes and the one ``width`` smaller)."""
    w, h = image_size
    c0, r0, c1, r1 = rect
    cx, cy = (c0 + c1) / 2, (r0 + r1) / 2
    a, b = (c1 - c0) / 2, (r1 - r0) / 2
    ys = np.arange(r0, r1, dtype=np.float64)[:, None] + 0.5  # rows of the rectangle
    xs = np.arange(c0, c1, dtype=np.float64)[None, :] + 0.5
    outer = ((xs - cx) / a) ** 2 + ((ys - cy) / b) ** 2 <= 1.0
    ai, bi = a - width, b - width
    if ai > 0 and bi > 0:
        inner = ((xs - cx) / ai) ** 2 + ((ys - cy) / bi) ** 2 < 1.0
    else:
        inner = np.zeros_like(outer)  # too small for a hole: a filled spot stays visible
    out = np.zeros((h, w), dtype=bool)
    out[r0:r1, c0:c1] = outer & ~inner
    return out


def _paint(image: Image.Image, where: NDArray[np.bool_], color: Sequence[int]) -> Image.Image:
    arr = np.array(image, dtype=np.uint8)  # H x W x 3, a copy
    arr[where] = np.asarray(color, dtype=np.uint8)
    return Image.fromarray(arr)


# ------------------------------------------------------------------------------- markers


@runtime_checkable
class Marker(Protocol):
    """Renders one region into a copy of an image."""

    @property
    def name(self) -> str: ...

    @property
    def stage(self) -> int: ...

    def render(self, image: Image.Image, region: Region) -> Image.Image: ...


@dataclass(frozen=True)
class _LineMarker(abc.ABC):
    """A line of one colour drawn over the region (the outline markers' shared part).

    Attributes:
        color: RGB of the line.
        width: Line width as a fraction of the image's longer side (at least 1 pixel).
    """

    color: tuple[int, int, int] = RED
    width: float = LINE_WIDTH
    name: str = ""
    stage: ClassVar[int] = OUTLINE

    def __post_init__(self) -> None:
        _check_color(self.color, self.name)
        _check_fraction(self.width, f"{self.name} width")

    @abc.abstractmethod
    def lines(self, region: Region, image_size: tuple[int, int], width: int) -> NDArray[np.bool_]:
        """H x W: the pixels of a ``width``-pixel line for ``region``."""

    def render(self, image: Image.Image, region: Region) -> Image.Image:
        img = _rgb(image)
        region.check(img.size)
        return _paint(
            img, self.lines(region, img.size, line_pixels(self.width, img.size)), self.color
        )


@dataclass(frozen=True)
class EllipseMarker(_LineMarker):
    """An ellipse line inscribed in the region's box (Shtedritski et al.'s red circle)."""

    name: str = "red-circle"

    def lines(self, region: Region, image_size: tuple[int, int], width: int) -> NDArray[np.bool_]:
        return ellipse_band(region.pixel_rect(), width, image_size)


@dataclass(frozen=True)
class BoxMarker(_LineMarker):
    """The region's box outline, drawn just inside its pixel rectangle."""

    name: str = "box"

    def lines(self, region: Region, image_size: tuple[int, int], width: int) -> NDArray[np.bool_]:
        return band(Region(box=region.box).pixels(image_size), width)


@dataclass(frozen=True)
class ContourMarker(_LineMarker):
    """The mask's contour (FGVP's "contour"; its default ``color_line`` is red), drawn just
    inside the mask; the box outline when the region has no mask."""

    name: str = "contour"

    def lines(self, region: Region, image_size: tuple[int, int], width: int) -> NDArray[np.bool_]:
        return band(region.pixels(image_size), width)


@dataclass(frozen=True)
class BlurMarker:
    """FGVP's reverse blur: a Gaussian blur everywhere outside the region (its mask, or its
    box's pixel rectangle), the region's own pixels untouched.

    Attributes:
        sigma: Standard deviation of the blur as a fraction of the image's longer side.
    """

    sigma: float = BLUR_SIGMA
    name: str = "blur"
    stage: ClassVar[int] = BACKGROUND

    def __post_init__(self) -> None:
        _check_fraction(self.sigma, f"{self.name} sigma", upper=10.0)

    def render(self, image: Image.Image, region: Region) -> Image.Image:
        img = _rgb(image)
        region.check(img.size)
        keep = region.pixels(img.size)
        # PIL's radius is the Gaussian's standard deviation.
        blurred = np.asarray(img.filter(ImageFilter.GaussianBlur(self.sigma * max(img.size))))
        out = np.where(keep[..., None], np.asarray(img), blurred)
        return Image.fromarray(out.astype(np.uint8))


@dataclass(frozen=True)
class GreyMarker:
    """Grey-out: everything outside the region turned to its luma (FGVP's grayscale reverse
    mask), optionally darkened too.

    Attributes:
        darken: 0 keeps the grey's brightness, 1 turns the outside black.
    """

    darken: float = 0.0
    name: str = "grey"
    stage: ClassVar[int] = BACKGROUND

    def __post_init__(self) -> None:
        _check_fraction(self.darken, f"{self.name} darken")

    def render(self, image: Image.Image, region: Region) -> Image.Image:
        img = _rgb(image)
        region.check(img.size)
        outside = ~region.pixels(img.size)
        luma = np.asarray(img.convert("L"), dtype=np.float64)  # ITU-R 601-2, as PIL
        grey = np.rint(luma * (1.0 - self.darken)).clip(0, 255).astype(np.uint8)
        arr = np.array(img, dtype=np.uint8)
        arr[outside] = grey[outside][:, None]
        return Image.fromarray(arr)


@dataclass(frozen=True)
class CropMarker:
    """The region's pixel rectangle cut out (ReCLIP's crop), optionally with context.

    Attributes:
        margin: Context added on each side as a fraction of the box's width / height
            (clipped at the image border); 0 crops to the box.
    """

    margin: float = 0.0
    name: str = "crop"
    stage: ClassVar[int] = GEOMETRY

    def __post_init__(self) -> None:
        _check_fraction(self.margin, f"{self.name} margin", upper=10.0)

    def crop_rect(self, region: Region, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
        """``c0, r0, c1, r1`` of the output in the input image's pixels."""
        w, h = image_size
        x0, y0, x1, y1 = region.box
        mx, my = self.margin * (x1 - x0), self.margin * (y1 - y0)
        c0, r0 = max(0, math.floor(x0 - mx)), max(0, math.floor(y0 - my))
        c1, r1 = min(w, math.ceil(x1 + mx)), min(h, math.ceil(y1 + my))
        return c0, r0, c1, r1

    def render(self, image: Image.Image, region: Region) -> Image.Image:
        img = _rgb(image)
        region.check(img.size)
        return img.crop(self.crop_rect(region, img.size))


@dataclass(frozen=True)
class CombinedMarker:
    """Several markers applied to one image, in stage order (background, outline, crop).

    Attributes:
        parts: The markers, already in the order they are applied.
    """

    parts: tuple[Marker, ...]

    @property
    def name(self) -> str:
        return "+".join(p.name for p in self.parts)

    @property
    def stage(self) -> int:
        return max(p.stage for p in self.parts)

    def render(self, image: Image.Image, region: Region) -> Image.Image:
        out = _rgb(image)
        region.check(out.size)
        for part in self.parts:
            out = part.render(out, region)
        return out


MARKERS: Registry[Marker] = Registry("marker")
for _marker in (
    EllipseMarker(),
    BoxMarker(),
    ContourMarker(),
    BlurMarker(),
    GreyMarker(),
    CropMarker(),
):
    MARKERS.register(_marker.name, _marker)


def get_marker(spec: str | Marker) -> Marker:
    """A marker from a registered name or a ``+``-joined combination (``red-circle+blur``);
    a :class:`Marker` instance is returned as is.

    Raises:
        UnknownNameError: A part is not a registered marker (with suggestions).
        PromptError: An empty part or the same marker twice.
    """
    if not isinstance(spec, str):
        if not isinstance(spec, Marker):
            raise PromptError(f"marker: expected a name or a Marker, got {type(spec).__name__}")
        return spec
    names = [part.strip().lower() for part in spec.split("+")]
    if not all(names):
        raise PromptError(f"marker {spec!r}: expected names joined by '+', e.g. red-circle+blur")
    if len(set(names)) != len(names):
        raise PromptError(f"marker {spec!r} names the same marker twice")
    parts = [MARKERS.get(n) for n in names]
    if len(parts) == 1:
        return parts[0]
    # Stable: parts of the same stage keep the order written.
    return CombinedMarker(parts=tuple(sorted(parts, key=lambda p: p.stage)))


def with_params(marker: str | Marker, **params: Any) -> Marker:
    """A registered marker with some parameters changed (``with_params("blur", sigma=0.1)``).

    Raises:
        PromptError: A parameter the marker does not have.
    """
    base = get_marker(marker)
    if not dataclasses.is_dataclass(base) or isinstance(base, CombinedMarker):
        raise PromptError(f"marker {base.name!r}: parameters can be set on single markers only")
    names = {f.name for f in dataclasses.fields(base)} - {"name"}
    unknown = sorted(set(params) - names)
    if unknown:
        raise PromptError(
            f"marker {base.name!r} has no parameter {unknown[0]!r} "
            f"(it has {', '.join(sorted(names))})"
        )
    return dataclasses.replace(base, **params)
