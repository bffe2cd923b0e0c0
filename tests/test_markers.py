"""vprompt.detect.markers and vprompt.detect.set_of_mark: pixel-exact checks of every marker.

Each renderer is checked against the geometry it promises, computed here independently:
marked pixels lie where the region is, everything else is bit-identical to the input.
Images are non-square in both orientations (96x64 and 64x96, W x H).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from vprompt.detect.markers import (
    BLUR_SIGMA,
    MARKERS,
    BlurMarker,
    BoxMarker,
    CombinedMarker,
    CropMarker,
    EllipseMarker,
    GreyMarker,
    Region,
    get_marker,
    with_params,
)
from vprompt.detect.set_of_mark import interior_point, render_set_of_marks, text_color
from vprompt.errors import PromptError, UnknownNameError
from vprompt.segment.outputs import PALETTE

SIZES = [(96, 64), (64, 96)]  # W x H, both orientations


def _image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    w, h = size
    # Values 10..240 never equal the pure red marker colour by accident in all channels.
    arr = np.random.default_rng(seed).integers(10, 240, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int16)


def _changed(a: Image.Image, b: Image.Image) -> np.ndarray:
    return (_arr(a) != _arr(b)).any(axis=-1)


def _is_red(img: Image.Image) -> np.ndarray:
    return (np.asarray(img) == np.array([255, 0, 0], np.uint8)).all(axis=-1)


def _disc(size: tuple[int, int], cx: float, cy: float, r: float) -> np.ndarray:
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    return (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 < r**2


# ------------------------------------------------------------------------------ registry


def test_registry_names_and_suggestions() -> None:
    assert set(MARKERS.names()) >= {"red-circle", "box", "contour", "blur", "grey", "crop"}
    with pytest.raises(UnknownNameError, match="did you mean 'red-circle'"):
        get_marker("red-circel")
    with pytest.raises(UnknownNameError, match="unknown marker 'blurr'"):
        get_marker("red-circle+blurr")
    with pytest.raises(PromptError, match="twice"):
        get_marker("blur+blur")
    with pytest.raises(PromptError, match="joined by"):
        get_marker("blur+")


def test_combination_order_is_by_stage() -> None:
    m = get_marker("crop+red-circle+blur")
    assert isinstance(m, CombinedMarker)
    assert m.name == "blur+red-circle+crop"
    assert get_marker("Red-Circle") is MARKERS.get("red-circle")


def test_paper_defaults_and_params() -> None:
    circle = get_marker("red-circle")
    assert isinstance(circle, EllipseMarker)
    assert circle.color == (255, 0, 0)
    assert circle.width == pytest.approx(2 / 336)
    blur = get_marker("blur")
    assert isinstance(blur, BlurMarker)
    assert blur.sigma == pytest.approx(100 / 384) == BLUR_SIGMA
    custom = with_params("blur", sigma=0.05)
    assert isinstance(custom, BlurMarker)
    assert custom.sigma == 0.05
    with pytest.raises(PromptError, match="no parameter 'radius'"):
        with_params("blur", radius=3)
    with pytest.raises(PromptError, match="color"):
        EllipseMarker(color=(300, 0, 0))
    with pytest.raises(PromptError, match="darken"):
        GreyMarker(darken=2.0)


# ------------------------------------------------------------------------------- regions


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", ["red-circle", "box", "contour", "blur", "grey", "crop"])
def test_regions_outside_the_image_are_refused(size: tuple[int, int], name: str) -> None:
    w, h = size
    img = _image(size)
    marker = get_marker(name)
    for box in [(w - 5, 0, w + 1, 10), (-1, 0, 5, 5), (0, h - 2, 4, h + 3), (w + 1, 0, w + 9, 5)]:
        with pytest.raises(PromptError, match="outside"):
            marker.render(img, Region(box=box))
    with pytest.raises(PromptError, match="does not match"):
        marker.render(img, Region(box=(0, 0, 4, 4), mask=np.ones((4, 4), bool)))


def test_region_validation() -> None:
    with pytest.raises(PromptError, match="X0 < X1"):
        Region(box=(5, 5, 5, 9))
    with pytest.raises(PromptError, match="four numbers"):
        Region(box=(1, 2, 3))  # type: ignore[arg-type]
    with pytest.raises(PromptError, match="empty"):
        Region(box=(0, 0, 2, 2), mask=np.zeros((4, 4), bool))
    m = np.zeros((10, 12), bool)
    m[2:5, 3:9] = True
    r = Region.from_mask(m)
    assert r.box == (3.0, 2.0, 9.0, 5.0)
    assert r.area() == 18
    assert Region(box=(0.5, 0, 2.5, 2)).pixel_rect() == (0, 0, 3, 2)


# ------------------------------------------------------------------------------- outlines


@pytest.mark.parametrize("size", SIZES)
def test_red_circle_pixels_lie_on_the_ellipse(size: tuple[int, int]) -> None:
    img = _image(size)
    marker = EllipseMarker(width=3 / max(size))  # 3 pixels
    x0, y0, x1, y1 = 10, 8, 50, 40
    out = marker.render(img, Region(box=(x0, y0, x1, y1)))
    changed = _changed(img, out)
    assert np.array_equal(changed, _is_red(out) & changed)
    assert _is_red(out)[changed].all()
    rows, cols = np.nonzero(changed)
    # Normalised radius of each marked pixel centre: on the line between 1 - 3/axis and 1.
    cx, cy, a, b = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    r = np.hypot((cols + 0.5 - cx) / a, (rows + 0.5 - cy) / b)
    assert r.max() <= 1.0 + 1e-9
    assert r.min() >= 1.0 - 3.0 / min(a, b) - 1e-9
    # The line passes through the box's edge midpoints and goes all around.
    for row, col in [(y0, 29), (y1 - 1, 29), (23, x0), (23, x1 - 1)]:
        assert changed[row, col]
    assert not changed[24, 30]  # the centre is untouched
    for angle in np.linspace(0, 2 * np.pi, 24, endpoint=False):
        px, py = cx + (a - 1) * np.cos(angle), cy + (b - 1) * np.sin(angle)
        assert changed[int(py), int(px)]
    # Untouched elsewhere, bit for bit.
    assert np.array_equal(_arr(out)[~changed], _arr(img)[~changed])


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", ["box", "contour"])
def test_box_outline_is_the_box_edges(size: tuple[int, int], name: str) -> None:
    img = _image(size)
    out = get_marker(name).render(img, Region(box=(5.0, 7.0, 30.0, 20.0)))  # width 1 px
    expected = np.zeros((size[1], size[0]), bool)
    expected[7:20, 5:30] = True
    expected[8:19, 6:29] = False
    assert np.array_equal(_is_red(out), expected)
    assert np.array_equal(_changed(img, out), expected)


@pytest.mark.parametrize("size", SIZES)
def test_outlines_at_image_borders_and_one_pixel(size: tuple[int, int]) -> None:
    w, h = size
    img = _image(size)
    whole = Region(box=(0, 0, w, h))
    out = BoxMarker(width=2 / max(size)).render(img, whole)
    ring = np.ones((h, w), bool)
    ring[2:-2, 2:-2] = False
    assert np.array_equal(_is_red(out), ring)
    circle = get_marker("red-circle").render(img, whole)
    # An ellipse inscribed in the whole image touches all four borders.
    red = _is_red(circle)
    assert red[0].any()
    assert red[-1].any()
    assert red[:, 0].any()
    assert red[:, -1].any()
    for name in ("red-circle", "box", "contour"):
        dot = get_marker(name).render(img, Region(box=(w - 1, h - 1, w, h)))
        expected = np.zeros((h, w), bool)
        expected[h - 1, w - 1] = True
        assert np.array_equal(_changed(img, dot), expected), name
        assert _is_red(dot)[h - 1, w - 1]


@pytest.mark.parametrize("size", SIZES)
def test_contour_follows_the_mask(size: tuple[int, int]) -> None:
    img = _image(size)
    mask = _disc(size, 30, 30, 12)
    out = get_marker("contour").render(img, Region.from_mask(mask))
    changed = _changed(img, out)
    # Hand computation: mask pixels with a 4-neighbour outside the mask.
    p = np.pad(mask, 1)
    interior = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    assert np.array_equal(changed, mask & ~interior)
    assert _is_red(out)[changed].all()


# ------------------------------------------------------------------------------- backgrounds


@pytest.mark.parametrize("size", SIZES)
def test_blur_changes_only_outside_the_region(size: tuple[int, int]) -> None:
    img = _image(size)
    sigma = 0.05
    mask = _disc(size, 32, 40, 15)
    out = BlurMarker(sigma=sigma).render(img, Region.from_mask(mask))
    assert np.array_equal(_arr(out)[mask], _arr(img)[mask])
    reference = img.filter(ImageFilter.GaussianBlur(sigma * max(size)))
    assert np.array_equal(_arr(out)[~mask], _arr(reference)[~mask])
    assert _changed(img, out)[~mask].mean() > 0.9  # random pixels change almost everywhere
    # A box region keeps its pixel rectangle.
    boxed = get_marker("blur").render(img, Region(box=(10.5, 4.0, 20.2, 30.0)))
    keep = np.zeros(mask.shape, bool)
    keep[4:30, 10:21] = True
    assert np.array_equal(_arr(boxed)[keep], _arr(img)[keep])
    assert _changed(img, boxed)[~keep].mean() > 0.9


@pytest.mark.parametrize("size", SIZES)
def test_grey_outside(size: tuple[int, int]) -> None:
    img = _image(size)
    region = Region(box=(3, 4, 20, 25))
    keep = region.pixels(size)
    out = get_marker("grey").render(img, region)
    arr = _arr(out)
    assert np.array_equal(arr[keep], _arr(img)[keep])
    luma = np.asarray(img.convert("L")).astype(np.int16)
    for c in range(3):
        assert np.array_equal(arr[..., c][~keep], luma[~keep])
    dark = GreyMarker(darken=1.0).render(img, region)
    assert (np.asarray(dark)[~keep] == 0).all()


# ------------------------------------------------------------------------------- crop


@pytest.mark.parametrize("size", SIZES)
def test_crop_is_the_slice(size: tuple[int, int]) -> None:
    w, h = size
    img = _image(size)
    src = np.asarray(img)
    out = get_marker("crop").render(img, Region(box=(4.5, 6.0, 30.0, 41.2)))
    assert np.array_equal(np.asarray(out), src[6:42, 4:30])
    # With context: 50% of the box on each side, clipped at the border.
    wide = CropMarker(margin=0.5).render(img, Region(box=(10, 10, 30, 20)))
    assert np.array_equal(np.asarray(wide), src[5:25, 0:40])
    assert np.array_equal(
        np.asarray(get_marker("crop").render(img, Region(box=(w - 1, h - 1, w, h)))),
        src[h - 1 :, w - 1 :],
    )


def test_combined_marker_equals_the_parts_in_order() -> None:
    img = _image((96, 64))
    region = Region.from_mask(_disc((96, 64), 40, 30, 10))
    combined = get_marker("crop+red-circle+blur").render(img, region)
    by_hand = MARKERS.get("crop").render(
        MARKERS.get("red-circle").render(MARKERS.get("blur").render(img, region), region),
        region,
    )
    assert np.array_equal(np.asarray(combined), np.asarray(by_hand))
    assert combined.size == (20, 20)


def test_non_rgb_input_and_input_untouched() -> None:
    img = _image((64, 96)).convert("RGBA")
    before = np.asarray(img).copy()
    out = get_marker("red-circle+grey").render(img, Region(box=(1, 1, 40, 60)))
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(img), before)


# ------------------------------------------------------------------------------- set of mark


@pytest.mark.parametrize("size", SIZES)
def test_set_of_marks_labels_colours_and_legend(size: tuple[int, int]) -> None:
    w, h = size
    img = _image(size, seed=3)
    # A concave "C" shape: its box centre is outside the mask, its label must not be.
    c_shape = _disc(size, 22, 22, 16) & ~_disc(size, 28, 22, 10)
    square = np.zeros((h, w), bool)
    square[44:60, 40:58] = True
    regions = [Region.from_mask(c_shape), Region.from_mask(square), Region(box=(2, 48, 30, 62))]
    som = render_set_of_marks(img, regions, alpha=0.0)
    out = np.asarray(som.image)
    assert som.image.size == size
    legend = json.loads(json.dumps(som.legend))
    assert [e["mark"] for e in legend] == [1, 2, 3]
    assert legend[0]["area"] == int(c_shape.sum())
    assert legend[1]["box"] == [40.0, 44.0, 58.0, 60.0]
    assert legend[2]["area"] == pytest.approx(28 * 14)
    pixels = [c_shape, square, regions[2].pixels(size)]
    x0, y0, x1, y1 = legend[0]["box"]
    assert not c_shape[int((y0 + y1) / 2), int((x0 + x1) / 2)]  # the box centre misses the C
    drawn = np.zeros((h, w), bool)
    for k, (entry, m) in enumerate(zip(legend, pixels, strict=True)):
        color = PALETTE[k]
        assert entry["color"] == "#{:02x}{:02x}{:02x}".format(*color)
        lx, ly = entry["label"]
        assert m[int(ly), int(lx)], f"label {k + 1} is outside its region"
        is_color = (out == np.array(color, np.uint8)).all(axis=-1)
        # Label background in the region's colour around the label point, with text in it.
        patch = (slice(int(ly) - 3, int(ly) + 4), slice(int(lx) - 3, int(lx) + 4))
        assert is_color[patch].any()
        ink = np.array(text_color(color), np.int16)
        assert (np.abs(out[patch].astype(np.int16) - ink).sum(-1) < 60).any()
        # The outline is in the region's colour, inside the region.
        p = np.pad(m, 1)
        boundary = m & ~(p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:])
        assert is_color[boundary & ~_near(entry["label"], size)].all()
        drawn |= m
    # No fill: pixels away from outlines and labels are the input's, bit for bit.
    changed = _changed(img, som.image)
    assert changed.any()
    untouched = ~changed
    assert np.array_equal(out[untouched], np.asarray(img)[untouched])
    assert not changed[~drawn & ~_labels_near(legend, size)].any()


def _near(point: list[float], size: tuple[int, int], r: int = 12) -> np.ndarray:
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    return (np.abs(xx + 0.5 - point[0]) <= r) & (np.abs(yy + 0.5 - point[1]) <= r)


def _labels_near(legend: list[dict], size: tuple[int, int]) -> np.ndarray:
    out = np.zeros((size[1], size[0]), bool)
    for e in legend:
        out |= _near(e["label"], size)
    return out


def test_set_of_marks_fill_and_errors() -> None:
    size = (96, 64)
    img = Image.new("RGB", size, (100, 100, 100))
    m = _disc(size, 60, 30, 14)
    som = render_set_of_marks(img, [Region.from_mask(m)], alpha=0.5, outline=0.0)
    out = np.asarray(som.image).astype(np.int16)
    expected = np.rint(np.array([100, 100, 100]) * 0.5 + np.array(PALETTE[0]) * 0.5)
    label = _near(som.legend[0]["label"], size)
    assert (out[m & ~label] == expected).all()
    assert (out[~m & ~label] == 100).all()
    with pytest.raises(PromptError, match="1 to"):
        render_set_of_marks(img, [])
    with pytest.raises(PromptError, match="outside"):
        render_set_of_marks(img, [Region(box=(90, 0, 100, 5))])
    with pytest.raises(PromptError, match="alpha"):
        render_set_of_marks(img, [Region(box=(0, 0, 5, 5))], alpha=1.5)


def test_interior_point_and_contrast() -> None:
    m = np.zeros((20, 30), bool)
    m[2:18, 5:25] = True
    assert interior_point(m) in {(9, 14), (9, 15), (10, 14), (10, 15)}
    avoid = np.zeros_like(m)
    avoid[5:15, 10:20] = True
    row, col = interior_point(m, avoid)
    assert m[row, col]
    assert not avoid[row, col]
    assert text_color((255, 255, 0)) == (0, 0, 0)
    assert text_color((0, 0, 128)) == (255, 255, 255)


def test_set_of_marks_nested_regions_get_separate_labels() -> None:
    size = (64, 96)
    img = Image.new("RGB", size, (200, 200, 200))
    person = np.zeros((96, 64), bool)
    person[10:90, 8:56] = True
    shirt = np.zeros((96, 64), bool)
    shirt[30:60, 16:48] = True  # inside the person, around its centre
    som = render_set_of_marks(img, [Region.from_mask(person), Region.from_mask(shirt)])
    (px, py), (sx, sy) = som.legend[0]["label"], som.legend[1]["label"]
    assert shirt[int(sy), int(sx)]
    # The larger region is labelled after the smaller one and off its mask.
    assert person[int(py), int(px)]
    assert not shirt[int(py), int(px)]
