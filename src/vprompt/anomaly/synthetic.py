"""Synthetic industrial-inspection sets from real textures, in the MVTec AD folder layout.

Each category is one real grayscale photo bundled with scikit-image (``skimage.data.brick``,
``grass``, ``gravel``), tinted with its own fixed colour ramp so categories differ in colour
too. Normal images are random crops of it (mild flips, small brightness jitter) resized to
``size``; defect images are crops of the same kind with one defect drawn in and a pixel-exact
ground-truth mask:

* ``scratch``: thin curved strokes (width 2-5 px at 256 px), lighter or darker than the surface;
* ``hole``: dark filled ellipses with soft edges (radius 6-20 px at 256 px), lit from one side;
* ``spot``: colour stains, an ellipse or a random walk of discs, of a shifted hue and brightness;
* ``crack``: a dark jagged polyline, sometimes with a branch.

Train crops come from the top 60% of the photo and test crops from the bottom 40%, so no test
image shares a pixel of the photo with a training image. Everything is deterministic for a
seed: image ``i`` of a stream depends only on (seed, category, stream, i), so asking for more
images keeps the first ones unchanged.

Layout written (MVTec AD's)::

    ROOT/inspection-set.json                    parameters + summary (marks the folder as ours)
    ROOT/<category>/train/good/000.png
    ROOT/<category>/test/good/000.png
    ROOT/<category>/test/<defect>/000.png
    ROOT/<category>/ground_truth/<defect>/000_mask.png   8-bit, 0 or 255, same size as image
"""

from __future__ import annotations

import colorsys
import functools
import itertools
import math
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

import numpy as np
import skimage
import skimage.data
from PIL import Image

from vprompt.errors import ConfigError, OutputError, UnknownNameError
from vprompt.utils import jsonio
from vprompt.utils.io import atomic_path, clean_stale_temp_files

DefectKind = Literal["scratch", "hole", "spot", "crack"]
DEFECT_KINDS: tuple[DefectKind, ...] = get_args(DefectKind)
MARKER = "inspection-set.json"
FORMAT = "vprompt-inspection-set/1"
TRAIN_FRACTION = 0.6
"""Share of the photo's rows (from the top) that train crops come from; test crops use the rest."""

# The defect sizes above are in pixels of a 256-px image; other sizes scale them.
_REFERENCE_SIDE = 256
_MAX_CROP = 200  # fits the 40% test band of a 512-px photo, with room to move
_MIN_SIDE = 16
_SKIMAGE_VERSION = str(getattr(skimage, "__version__", "unknown"))  # lazily-loaded attribute


@dataclass(frozen=True)
class _Texture:
    loader: str  # the skimage.data function
    dark: tuple[float, float, float]  # RGB the photo's darkest tones map to
    light: tuple[float, float, float]  # RGB its brightest tones map to


TEXTURES: dict[str, _Texture] = {
    "brick": _Texture("brick", (72.0, 30.0, 22.0), (236.0, 168.0, 136.0)),
    "grass": _Texture("grass", (22.0, 48.0, 12.0), (172.0, 214.0, 96.0)),
    "gravel": _Texture("gravel", (46.0, 43.0, 40.0), (216.0, 206.0, 186.0)),
}
"""Categories: each a grayscale skimage photo and the colour ramp that tints it."""


class Defected(NamedTuple):
    """An image with one defect drawn in.

    Attributes:
        image: H x W x 3 uint8, equal to the clean image wherever ``mask`` is False.
        mask: H x W bool, True on every pixel the defect may have changed (its soft edge too).
    """

    image: np.ndarray
    mask: np.ndarray


class Sample(NamedTuple):
    """One image of an inspection set, with the clean crop it was made from.

    Attributes:
        clean: H x W x 3 uint8 crop before any defect.
        image: H x W x 3 uint8 as written (``clean`` itself for good images).
        mask: H x W bool ground truth (all False for good images).
    """

    clean: np.ndarray
    image: np.ndarray
    mask: np.ndarray


@functools.lru_cache(maxsize=8)
def texture_rgb(category: str) -> np.ndarray:
    """The category's whole photo, tinted: H x W x 3 uint8, read-only.

    Raises:
        UnknownNameError: ``category`` is not one of :data:`TEXTURES`, or this scikit-image
            does not ship its photo.
    """
    texture = TEXTURES.get(category)
    if texture is None:
        raise UnknownNameError(
            f"unknown inspection category {category!r}; expected one of {', '.join(TEXTURES)}"
        )
    loader = getattr(skimage.data, texture.loader, None)
    if loader is None:
        raise UnknownNameError(
            f"inspection category {category!r}: scikit-image {_SKIMAGE_VERSION} has no "
            f"skimage.data.{texture.loader}"
        )
    gray = np.asarray(loader(), dtype=np.float64)
    # Stretch the 1st-99th percentiles over the ramp so every category uses its full range.
    lo, hi = np.percentile(gray, (1.0, 99.0))
    t = np.clip((gray - lo) / max(hi - lo, 1.0), 0.0, 1.0)[..., None]
    dark, light = np.array(texture.dark), np.array(texture.light)
    rgb = np.rint(dark + (light - dark) * t).astype(np.uint8)
    rgb.setflags(write=False)
    return rgb


def _stream_rng(seed: int, category: str, stream: str, index: int) -> np.random.Generator:
    # crc32, not hash(): Python salts str hashes per process.
    key = [seed, zlib.crc32(category.encode()), zlib.crc32(stream.encode()), index]
    return np.random.default_rng(key)


def normal_crop(
    texture: np.ndarray, *, split: Literal["train", "test"], size: int, rng: np.random.Generator
) -> np.ndarray:
    """A random defect-free crop of ``texture`` (H x W x 3 uint8) from the split's band of rows.

    Returns:
        size x size x 3 uint8.
    """
    cut = int(texture.shape[0] * TRAIN_FRACTION)
    band = texture[:cut] if split == "train" else texture[cut:]
    h, w = band.shape[:2]
    largest = min(h, w, _MAX_CROP)
    side = int(rng.integers(int(largest * 0.84), largest + 1))  # mild zoom jitter
    top = int(rng.integers(0, h - side + 1))
    left = int(rng.integers(0, w - side + 1))
    crop = band[top : top + side, left : left + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1]
    resized = Image.fromarray(np.ascontiguousarray(crop)).resize(
        (size, size), Image.Resampling.BICUBIC
    )
    gain = 1.0 + rng.uniform(-0.06, 0.06)
    return np.rint(np.clip(np.asarray(resized, np.float64) * gain, 0, 255)).astype(np.uint8)


# --- defects: each draws a coverage map alpha (H x W in [0, 1]) and a target colour ----------


def _alpha(signed_distance: np.ndarray, soft: float) -> np.ndarray:
    """Coverage from a signed distance to a shape's outline (px, negative inside): a ramp
    ``soft`` px wide centred on the outline, so the edge reaches at most soft/2 px outside."""
    return np.clip(0.5 - signed_distance / soft, 0.0, 1.0)


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:h, 0:w]
    return xs.astype(np.float64), ys.astype(np.float64)


def _polyline_distance(points: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Distance of every pixel centre to the polyline ``points`` (N x 2, x then y)."""
    best = np.full(xs.shape, np.inf)
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        dx, dy = x1 - x0, y1 - y0
        length2 = dx * dx + dy * dy
        t = ((xs - x0) * dx + (ys - y0) * dy) / length2 if length2 > 0 else np.zeros_like(xs)
        t = np.clip(t, 0.0, 1.0)
        np.minimum(best, np.hypot(xs - (x0 + t * dx), ys - (y0 + t * dy)), out=best)
    return best


def _ellipse_distance(
    xs: np.ndarray, ys: np.ndarray, centre: np.ndarray, radii: tuple[float, float], angle: float
) -> np.ndarray:
    """Signed distance (px) to a rotated ellipse, to first order: exact on the outline, which
    is all the soft-edge ramp needs."""
    c, s = math.cos(angle), math.sin(angle)
    u = (xs - centre[0]) * c + (ys - centre[1]) * s
    v = -(xs - centre[0]) * s + (ys - centre[1]) * c
    a, b = radii
    f = (u / a) ** 2 + (v / b) ** 2 - 1.0
    grad = 2.0 * np.hypot(u / a**2, v / b**2)
    return f / np.maximum(grad, 1e-9)


def _interior_point(rng: np.random.Generator, h: int, w: int, margin: float) -> np.ndarray:
    mx, my = min(margin, w / 4), min(margin, h / 4)
    return np.array([rng.uniform(mx, w - mx), rng.uniform(my, h - my)])


def _scratch(clean: np.ndarray, rng: np.random.Generator, scale: float) -> tuple[Any, Any]:
    h, w = clean.shape[:2]
    xs, ys = _grid(h, w)
    alpha = np.zeros((h, w))
    for _ in range(1 + int(rng.random() < 0.35)):
        start = _interior_point(rng, h, w, 24 * scale)
        heading = rng.uniform(0, 2 * math.pi)
        length = rng.uniform(0.2, 0.45) * min(h, w)
        end = start + length * np.array([math.cos(heading), math.sin(heading)])
        bend = rng.uniform(-0.3, 0.3) * length  # quadratic Bezier: a gentle curve
        control = (start + end) / 2 + bend * np.array([-math.sin(heading), math.cos(heading)])
        t = np.linspace(0.0, 1.0, 24)[:, None]
        curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end
        width = max(1.0, rng.uniform(2.0, 5.0) * scale)
        dist = _polyline_distance(curve, xs, ys) - width / 2
        np.maximum(alpha, _alpha(dist, 1.0), out=alpha)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    shift = sign * rng.uniform(45, 90) * (1.0 + rng.uniform(-0.15, 0.15, size=3))
    return alpha, clean + shift


def _hole(clean: np.ndarray, rng: np.random.Generator, scale: float) -> tuple[Any, Any]:
    h, w = clean.shape[:2]
    xs, ys = _grid(h, w)
    alpha = np.zeros((h, w))
    shade = np.zeros((h, w))
    for _ in range(1 + int(rng.random() < 0.25)):
        radius = rng.uniform(6.0, 20.0) * scale
        radii = (max(radius, 1.5), max(radius * rng.uniform(0.6, 1.0), 1.5))
        centre = _interior_point(rng, h, w, radii[0] + 2)
        angle = rng.uniform(0, math.pi)
        a = _alpha(_ellipse_distance(xs, ys, centre, radii, angle), rng.uniform(2.0, 3.0))
        # Light from one side: the far wall of the hole is a little less dark.
        light = rng.uniform(0, 2 * math.pi)
        side = ((xs - centre[0]) * math.cos(light) + (ys - centre[1]) * math.sin(light)) / radii[0]
        depth = rng.uniform(0.55, 0.85) * (0.9 - 0.1 * np.clip(side, -1, 1))
        shade = np.where(a > alpha, depth, shade)
        np.maximum(alpha, a, out=alpha)
    return alpha, clean * (1.0 - shade[..., None])


def _spot(clean: np.ndarray, rng: np.random.Generator, scale: float) -> tuple[Any, Any]:
    h, w = clean.shape[:2]
    xs, ys = _grid(h, w)
    soft = rng.uniform(2.0, 4.0)
    if rng.random() < 0.5:
        radius = max(rng.uniform(8.0, 28.0) * scale, 2.0)
        radii = (radius, radius * rng.uniform(0.5, 1.0))
        centre = _interior_point(rng, h, w, radius)
        dist = _ellipse_distance(xs, ys, centre, radii, rng.uniform(0, math.pi))
    else:  # a random walk of discs: an irregular stain
        point = _interior_point(rng, h, w, 24 * scale)
        heading = rng.uniform(0, 2 * math.pi)
        dist = np.full((h, w), np.inf)
        for _ in range(int(rng.integers(6, 15))):
            r = max(rng.uniform(5.0, 14.0) * scale, 1.5)
            np.minimum(dist, np.hypot(xs - point[0], ys - point[1]) - r, out=dist)
            heading += rng.normal(0.0, 0.8)
            point = point + r * rng.uniform(0.4, 0.9) * np.array(
                [math.cos(heading), math.sin(heading)]
            )
    # The stain's hue is turned away from the surface's so it shows on every category, and it
    # is darker or lighter than the surface by a moderate step.
    hue, _, value = colorsys.rgb_to_hsv(*(clean.reshape(-1, 3).mean(axis=0) / 255.0))
    value *= rng.uniform(0.45, 0.7) if rng.random() < 0.6 else rng.uniform(1.25, 1.5)
    stain = np.array(
        colorsys.hsv_to_rgb(
            (hue + rng.uniform(0.25, 0.75)) % 1.0, rng.uniform(0.5, 0.9), min(value, 1.0)
        )
    )
    # The stain keeps the surface's texture: its colour is modulated by the local brightness.
    lum = clean.mean(axis=2, keepdims=True) / 255.0
    strength = rng.uniform(0.55, 0.8)
    target = clean + strength * (255.0 * stain * (0.5 + lum) - clean)
    return _alpha(dist, soft), target


def _crack(clean: np.ndarray, rng: np.random.Generator, scale: float) -> tuple[Any, Any]:
    h, w = clean.shape[:2]
    xs, ys = _grid(h, w)

    def walk(start: np.ndarray, heading: float, steps: int) -> np.ndarray:
        points = [start]
        for _ in range(steps):
            heading += rng.normal(0.0, 0.5)  # jagged: the direction jumps at every vertex
            step = rng.uniform(3.0, 8.0) * max(scale, 0.25)
            points.append(points[-1] + step * np.array([math.cos(heading), math.sin(heading)]))
        return np.array(points)

    heading = rng.uniform(0, 2 * math.pi)
    trunk = walk(_interior_point(rng, h, w, 24 * scale), heading, int(rng.integers(12, 25)))
    width = max(1.0, rng.uniform(1.2, 2.5) * scale)
    dist = _polyline_distance(trunk, xs, ys) - width / 2
    if rng.random() < 0.5:
        fork = trunk[int(rng.integers(2, len(trunk) - 2))]
        branch = walk(fork, heading + rng.choice([-1.0, 1.0]) * 0.8, int(rng.integers(5, 11)))
        np.minimum(dist, _polyline_distance(branch, xs, ys) - width / 3, out=dist)
    return _alpha(dist, 1.0), clean * (1.0 - rng.uniform(0.5, 0.75))


_DRAW = {"scratch": _scratch, "hole": _hole, "spot": _spot, "crack": _crack}


def make_defect(image: np.ndarray, kind: DefectKind, rng: np.random.Generator) -> Defected:
    """Draw one defect of ``kind`` into a copy of ``image``.

    Sizes scale with the image (the ranges in the module docstring are for 256 px); pixels
    outside the returned mask are exactly the input's.

    Args:
        image: H x W x 3 uint8, both sides at least 16 px.
        kind: One of :data:`DEFECT_KINDS`.
        rng: Source of every random choice (the same state gives the same defect).

    Returns:
        The defected image and its non-empty H x W bool mask.

    Raises:
        ConfigError: ``image`` is not an H x W x 3 uint8 array of at least 16 x 16.
        UnknownNameError: ``kind`` is not a defect kind.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3:
        raise ConfigError("image: expected an H x W x 3 uint8 array")
    if image.shape[2] != 3 or min(image.shape[:2]) < _MIN_SIDE:
        raise ConfigError(
            f"image: expected H x W x 3 with sides >= {_MIN_SIDE}, got {tuple(image.shape)}"
        )
    draw = _DRAW.get(kind)
    if draw is None:
        raise UnknownNameError(
            f"unknown defect kind {kind!r}; expected one of {', '.join(DEFECT_KINDS)}"
        )
    clean = image.astype(np.float64)
    scale = min(image.shape[:2]) / _REFERENCE_SIDE
    for _ in range(8):  # a shape is centred inside the image, so a retry is next to never used
        alpha, target = draw(clean, rng, scale)
        mask = alpha > 0
        if mask.any():
            break
    else:  # pragma: no cover - every shape covers its interior centre pixel
        raise RuntimeError(f"could not place a {kind} defect in a {image.shape} image")
    blended = np.rint(np.clip(clean + alpha[..., None] * (target - clean), 0, 255))
    # np.where, not the blend alone: outside the mask the pixels stay bit-identical.
    out = np.where(mask[..., None], blended.astype(np.uint8), image)
    return Defected(out, mask)


def inspection_sample(
    category: str,
    stream: Literal["train", "good"] | DefectKind,
    index: int,
    *,
    size: int,
    seed: int,
) -> Sample:
    """Image ``index`` of one stream of a category, exactly as :func:`write_inspection_set`
    writes it: ``train`` (train/good), ``good`` (test/good) or a defect kind (test/<kind>)."""
    rng = _stream_rng(seed, category, stream, index)
    split: Literal["train", "test"] = "train" if stream == "train" else "test"
    clean = normal_crop(texture_rgb(category), split=split, size=size, rng=rng)
    if stream in ("train", "good"):
        return Sample(clean, clean, np.zeros(clean.shape[:2], bool))
    image, mask = make_defect(clean, stream, rng)  # type: ignore[arg-type]
    return Sample(clean, image, mask)


# --- writing a set ----------------------------------------------------------------------


def _check_count(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name}: expected an integer from {low} to {high}, got {value!r}")
    return value


def _parameters(
    categories: Sequence[str],
    train_per_category: int,
    good_test: int,
    defects_per_type: int,
    size: int,
    seed: int,
    defect_kinds: Sequence[str],
) -> dict[str, Any]:
    if isinstance(categories, str):  # a bare "brick" would iterate its letters
        categories = (categories,)
    if isinstance(defect_kinds, str):
        defect_kinds = (defect_kinds,)
    cats, kinds = list(categories), list(defect_kinds)
    for cat in cats:
        if cat not in TEXTURES:
            raise UnknownNameError(
                f"unknown inspection category {cat!r}; expected one of {', '.join(TEXTURES)}"
            )
    for kind in kinds:
        if kind not in DEFECT_KINDS:
            raise UnknownNameError(
                f"unknown defect kind {kind!r}; expected one of {', '.join(DEFECT_KINDS)}"
            )
    if not cats or len(set(cats)) != len(cats):
        raise ConfigError(f"categories: expected one or more distinct names, got {cats}")
    if len(set(kinds)) != len(kinds):
        raise ConfigError(f"defect_kinds: expected distinct names, got {kinds}")
    return {
        "categories": cats,
        "train_per_category": _check_count("train_per_category", train_per_category, 1, 10000),
        "good_test": _check_count("good_test", good_test, 0, 10000),
        "defects_per_type": _check_count("defects_per_type", defects_per_type, 0, 10000),
        "size": _check_count("size", size, 32, 2048),
        "seed": _check_count("seed", seed, 0, 2**32 - 1),
        "defect_kinds": kinds,
    }


def _name(index: int, count: int) -> str:
    return f"{index:0{max(3, len(str(count - 1)))}d}"


def _plan(params: dict[str, Any]) -> Iterator[tuple[str, str, int, str, str | None]]:
    """Every file to write: (category, stream, index, image path, mask path or None)."""
    for cat in params["categories"]:
        n = params["train_per_category"]
        for i in range(n):
            yield cat, "train", i, f"{cat}/train/good/{_name(i, n)}.png", None
        n = params["good_test"]
        for i in range(n):
            yield cat, "good", i, f"{cat}/test/good/{_name(i, n)}.png", None
        n = params["defects_per_type"]
        for kind in params["defect_kinds"]:
            for i in range(n):
                stem = _name(i, n)
                mask = f"{cat}/ground_truth/{kind}/{stem}_mask.png"
                yield cat, kind, i, f"{cat}/test/{kind}/{stem}.png", mask


def _summary(params: dict[str, Any]) -> dict[str, Any]:
    per_cat = {
        cat: {
            "train/good": params["train_per_category"],
            "test/good": params["good_test"],
            **{f"test/{k}": params["defects_per_type"] for k in params["defect_kinds"]},
        }
        for cat in params["categories"]
    }
    masks = len(params["categories"]) * len(params["defect_kinds"]) * params["defects_per_type"]
    images = sum(sum(counts.values()) for counts in per_cat.values())
    return {"categories": per_cat, "images": images, "masks": masks}


def _write_json(path: Path, value: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(jsonio.dumps(value, indent=2) + "\n", encoding="utf-8")


def _write_png(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")  # PNG has no timestamp: same bytes


def _previous(root: Path, params: dict[str, Any]) -> dict[str, Any] | None:
    """The marker of an earlier run with the same parameters (None for an empty folder);
    refuses any other non-empty folder."""
    if root.exists() and not root.is_dir():
        raise OutputError(f"{root}: exists and is not a folder")
    if not root.exists() or not any(root.iterdir()):
        return None
    marker = root / MARKER
    if not marker.is_file():
        raise OutputError(
            f"{root}: folder is not empty and holds no {MARKER} (not an inspection set); "
            "choose an empty or new folder"
        )
    try:
        found = jsonio.loads(marker.read_bytes(), what=str(marker))
    except (OSError, jsonio.JSONInputError) as exc:
        raise OutputError(f"{marker}: unreadable inspection-set marker ({exc})") from exc
    if not isinstance(found, dict) or found.get("format") != FORMAT:
        raise OutputError(f"{marker}: not a {FORMAT} marker; choose an empty or new folder")
    old = found.get("parameters")
    if old != params:
        changed = sorted(k for k in params if not isinstance(old, dict) or old.get(k) != params[k])
        raise OutputError(
            f"{root}: holds an inspection set made with other parameters "
            f"({', '.join(changed) or 'unknown'}); choose another folder"
        )
    return found


def write_inspection_set(
    root: str | Path,
    *,
    categories: Sequence[str] = ("brick", "grass", "gravel"),
    train_per_category: int = 20,
    good_test: int = 10,
    defects_per_type: int = 6,
    size: int = 256,
    seed: int = 0,
    defect_kinds: Sequence[str] = DEFECT_KINDS,
) -> dict[str, Any]:
    """Write a synthetic inspection set in the MVTec AD layout under ``root``.

    Every file is written to a temporary name and renamed, so a crash never leaves a partial
    PNG. ``root`` is claimed first with :data:`MARKER` (the parameters): running again with the
    same parameters finishes an interrupted set or, when it is complete, does nothing.

    Args:
        root: Folder to write; created if missing. Must be empty or an earlier output of this
            function with the same parameters.
        categories: Names from :data:`TEXTURES`.
        train_per_category: Normal training images per category.
        good_test: Normal test images per category.
        defects_per_type: Test images (and masks) per category and defect kind.
        size: Side of every square image, px.
        seed: Seed of every random choice; the same seed writes byte-identical files.
        defect_kinds: Kinds from :data:`DEFECT_KINDS`.

    Returns:
        ``categories`` (per category, the image count of each folder, as ``train/good``,
        ``test/good``, ``test/<kind>``), total ``images`` and ``masks``, ``root``, and
        ``reused`` (True when the complete set was already there and nothing was written).

    Raises:
        ConfigError: A count, size or seed out of range, or repeated names.
        UnknownNameError: An unknown category or defect kind.
        OutputError: ``root`` is a file, a non-empty folder that is not an inspection set, or
            an inspection set made with other parameters.
    """
    params = _parameters(
        categories, train_per_category, good_test, defects_per_type, size, seed, defect_kinds
    )
    root = Path(root)
    summary = _summary(params)
    plan = list(_plan(params))
    previous = _previous(root, params)
    if previous is not None and previous.get("complete"):
        expected = [p for *_, image, mask in plan for p in (image, mask) if p is not None]
        if all((root / p).is_file() for p in expected):
            return {**summary, "root": str(root), "reused": True}
    marker = {
        "format": FORMAT,
        "parameters": params,
        "textures": {c: f"skimage.data.{TEXTURES[c].loader}" for c in params["categories"]},
        "skimage": _SKIMAGE_VERSION,
        "complete": False,
        "summary": summary,
    }
    _write_json(root / MARKER, marker)  # claim the folder before the first image
    cleaned: set[Path] = set()
    for cat, stream, index, image_path, mask_path in plan:
        sample = inspection_sample(cat, stream, index, size=size, seed=seed)  # type: ignore[arg-type]
        for rel, array in ((image_path, sample.image), (mask_path, sample.mask)):
            if rel is None:
                continue
            target = root / rel
            if target.parent not in cleaned and target.parent.is_dir():
                clean_stale_temp_files(target.parent)  # leftovers of an interrupted run
                cleaned.add(target.parent)
            _write_png(target, array if array.dtype == np.uint8 else array.astype(np.uint8) * 255)
    _write_json(root / MARKER, {**marker, "complete": True})
    return {**summary, "root": str(root), "reused": False}
