"""Anomaly detection datasets on disk: MVTec AD, VisA and a plain folder layout.

:func:`read_anomaly_data` turns ``mvtec:ROOT``, ``visa:ROOT`` or ``folder:ROOT`` into
:class:`AnomalyCategory` lists (paths only; nothing is decoded) and stops at the first problem
with a one-line :class:`~vprompt.errors.DatasetError`. :func:`check_anomaly_data` walks the same
layout and reports every problem, each with how to fix it. :func:`load_mask` reads a
ground-truth mask as a boolean array.

Layouts (file extensions png, jpg, jpeg, bmp, tif, tiff in any case):

- ``mvtec``: ``ROOT/<category>/train/good/*``, ``ROOT/<category>/test/good/*`` (normal),
  ``ROOT/<category>/test/<defect>/*`` and their masks
  ``ROOT/<category>/ground_truth/<defect>/<stem>_mask.png``.
- ``visa``: ``ROOT/split_csv/1cls.csv`` with columns ``object,split,label,image,mask``
  (``label`` normal/anomaly, paths relative to ROOT, ``mask`` empty for normal images).
- ``folder``: one category named after ROOT: ``ROOT/good/*`` (normal test images),
  ``ROOT/defect/**`` (anomalous test images, optionally in one sub-folder per defect type),
  ``ROOT/ground_truth/**`` (masks at the defect image's relative path and stem, any image
  extension, optionally with a ``_mask`` suffix; a missing mask leaves the image without one),
  optional ``ROOT/train/**`` (normal training images).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

from vprompt.data.check import Problem, Severity
from vprompt.data.images import DEFAULT_MAX_PIXELS
from vprompt.errors import DatasetError, ImageLoadError

ANOMALY_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LAYOUTS = ("mvtec", "visa", "folder")
VISA_CSV = Path("split_csv") / "1cls.csv"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")
GOOD = "good"
MAX_LISTED = 3

MVTEC_URL = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
VISA_URL = "https://github.com/amazon-science/spot-diff"


@dataclass(frozen=True)
class AnomalySample:
    """One test image.

    Attributes:
        image: The image file.
        label: 0 normal, 1 anomalous.
        mask: The ground-truth mask file (None for normal images, and for anomalous images of
            the folder layout that have none).
        defect: The defect type; ``good`` for normal images.
    """

    image: Path
    label: int
    mask: Path | None
    defect: str


@dataclass(frozen=True)
class AnomalyCategory:
    """One object / texture category.

    Attributes:
        name: Category name (``bottle``, ``candle``, the folder's name).
        train: Normal training images, sorted.
        test: Test samples, sorted by defect type then file.
    """

    name: str
    train: tuple[Path, ...]
    test: tuple[AnomalySample, ...]


class _Findings:
    """Problems found while walking a layout: raised at once (reader) or collected (checker).

    Problems added with a ``group`` are folded into one line per group when collected, so a
    dataset with thousands of missing masks yields one problem, not thousands.
    """

    def __init__(self, *, strict: bool) -> None:
        self.strict = strict
        self.problems: list[Problem] = []
        self.groups: dict[str, list[Problem]] = {}

    def add(self, severity: Severity, what: str, fix: str, *, group: str | None = None) -> None:
        if self.strict and severity == "error":
            raise DatasetError(what)
        problem = Problem(severity, what, fix)
        if group is None:
            self.problems.append(problem)
        else:
            self.groups.setdefault(group, []).append(problem)

    def collected(self) -> list[Problem]:
        out = list(self.problems)
        for group, items in self.groups.items():
            if len(items) == 1:
                out.append(items[0])
                continue
            listed = "; ".join(p.what for p in items[:MAX_LISTED])
            more = " …" if len(items) > MAX_LISTED else ""
            out.append(
                Problem(items[0].severity, f"{len(items)} {group}: {listed}{more}", items[0].fix)
            )
        # Errors first, in the order found.
        return sorted(out, key=lambda p: p.severity != "error")


def parse_spec(spec: str) -> tuple[str, Path]:
    """``"mvtec:ROOT"`` → ``("mvtec", Path(ROOT))``.

    Raises:
        DatasetError: An unknown layout or an empty root.
    """
    layout, sep, root = str(spec).partition(":")
    if not sep or layout not in LAYOUTS or not root:
        raise DatasetError(
            f"anomaly data {spec!r}: expected LAYOUT:ROOT with LAYOUT one of "
            f"{', '.join(LAYOUTS)} (e.g. mvtec:/data/mvtec_ad)"
        )
    return layout, Path(root).expanduser()


def _images_in(folder: Path, *, recursive: bool = False) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p
        for p in found
        if p.suffix.lower() in ANOMALY_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _select(available: list[str], categories: Sequence[str] | None, spec: str) -> list[str]:
    if categories is None:
        return available
    wanted = [categories] if isinstance(categories, str) else list(categories)
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise DatasetError(
            f"{spec}: unknown categories {', '.join(unknown)}; available: "
            f"{', '.join(available) or 'none'}"
        )
    return [c for c in available if c in set(wanted)]


def _check_classes(category: AnomalyCategory, where: Path, found: _Findings) -> None:
    normal = sum(1 for s in category.test if s.label == 0)
    if normal == 0 or normal == len(category.test):
        which = "normal" if normal else "anomalous"
        found.add(
            "warning",
            f"{where}: the {category.name} test set holds only {which} images "
            f"({len(category.test)}); image AUROC is undefined for it",
            "add test images of the other class",
        )


# ---------------------------------------------------------------------------------------- MVTec
def _mvtec_categories(root: Path, found: _Findings) -> list[str]:
    if not root.is_dir():
        found.add(
            "error",
            f"MVTec AD root {root} does not exist (expected ROOT/<category>/train/good)",
            f"download MVTec AD ({MVTEC_URL}) and extract it there",
        )
        return []
    names = [
        d.name
        for d in _subdirs(root)
        if any((d / part).is_dir() for part in ("train", "test", "ground_truth"))
    ]
    if not names:
        found.add(
            "error",
            f"{root} is not an MVTec AD folder: no <category>/train or <category>/test "
            "sub-folders in it",
            "point mvtec: at the folder that holds bottle/, cable/, … (one per category)",
        )
    return names


def _read_mvtec_category(root: Path, name: str, found: _Findings) -> AnomalyCategory | None:
    folder = root / name
    fix = f"re-extract {name} from the MVTec AD archive ({MVTEC_URL})"
    train_dir = folder / "train" / GOOD
    train: list[Path] = []
    if not train_dir.is_dir():
        found.add("error", f"{train_dir} is missing (expected the normal training images)", fix)
    else:
        train = _images_in(train_dir)
        if not train:
            found.add(
                "error", f"{train_dir} holds no images (expected normal training images)", fix
            )
    test_dir = folder / "test"
    if not test_dir.is_dir():
        found.add("error", f"{test_dir} is missing (expected test/good and test/<defect>)", fix)
        return None
    samples: list[AnomalySample] = []
    used_masks: set[Path] = set()
    for defect_dir in _subdirs(test_dir):
        defect = defect_dir.name
        for image in _images_in(defect_dir):
            if defect == GOOD:
                samples.append(AnomalySample(image, 0, None, GOOD))
                continue
            mask = folder / "ground_truth" / defect / f"{image.stem}_mask.png"
            if not mask.is_file():
                found.add(
                    "error",
                    f"mask {mask} is missing (expected the ground truth of {image})",
                    fix,
                    group="defect images without a mask",
                )
            else:
                used_masks.add(mask)
            samples.append(AnomalySample(image, 1, mask, defect))
    if not samples:
        found.add(
            "error", f"{test_dir} holds no images (expected test/good and test/<defect>)", fix
        )
        return None
    if not found.strict:
        gt_dir = folder / "ground_truth"
        if gt_dir.is_dir():
            for mask in _images_in(gt_dir, recursive=True):
                if mask not in used_masks:
                    found.add(
                        "warning",
                        f"{mask} belongs to no test image",
                        "remove it, or restore the test image it belongs to",
                        group="masks without a test image",
                    )
    return AnomalyCategory(name, tuple(train), tuple(samples))


# ----------------------------------------------------------------------------------------- VisA
def _visa_row_problem(cells: list[str]) -> str | None:
    """What is wrong with one 1cls.csv row (stripped cells), or None."""
    if len(cells) < len(VISA_COLUMNS):
        return f"{len(cells)} columns; expected {len(VISA_COLUMNS)} ({','.join(VISA_COLUMNS)})"
    obj, split, label, image, mask = cells[:5]
    checks = (
        (not obj, "empty object"),
        (split not in ("train", "test"), f"split {split!r}; expected train or test"),
        (label not in ("normal", "anomaly"), f"label {label!r}; expected normal or anomaly"),
        (not image, "empty image path"),
        (label == "anomaly" and not mask, "an anomaly without a mask path"),
        (
            split == "train" and label == "anomaly",
            "a train image labelled anomaly (train images must be normal)",
        ),
    )
    return next((message for failed, message in checks if failed), None)


def _read_visa(
    root: Path, categories: Sequence[str] | None, spec: str, found: _Findings
) -> list[AnomalyCategory]:
    fix = f"download VisA ({VISA_URL}) with its split_csv/1cls.csv, paths relative to ROOT"
    if not root.is_dir():
        found.add("error", f"VisA root {root} does not exist (expected ROOT/{VISA_CSV})", fix)
        return []
    csv_path = root / VISA_CSV
    if not csv_path.is_file():
        found.add("error", f"{csv_path} is missing (expected VisA's split file {VISA_CSV})", fix)
        return []
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        found.add("error", f"{csv_path}: cannot read ({exc})", fix)
        return []
    header = tuple(c.strip() for c in rows[0]) if rows else ()
    if header[: len(VISA_COLUMNS)] != VISA_COLUMNS:
        found.add(
            "error",
            f"{csv_path}: header is {','.join(header) or '(empty)'}; expected "
            f"{','.join(VISA_COLUMNS)}",
            fix,
        )
        return []
    train: dict[str, list[Path]] = {}
    test: dict[str, list[AnomalySample]] = {}
    parsed: list[tuple[int, list[str]]] = []
    for number, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue  # blank lines (a trailing newline) carry nothing
        cells = [c.strip() for c in row]
        problem = _visa_row_problem(cells)
        if problem is not None:
            found.add("error", f"{csv_path} row {number}: {problem}", fix, group="malformed rows")
            continue
        parsed.append((number, cells))
        train.setdefault(cells[0], [])
        test.setdefault(cells[0], [])
    available = sorted(train)
    if not available and not found.groups:
        found.add("error", f"{csv_path} lists no images", fix)
    selected = set(_select(available, categories, spec))
    for number, (obj, split, label, image, mask) in ((n, c[:5]) for n, c in parsed):
        if obj not in selected:
            continue
        where = f"{csv_path} row {number}"
        paths = [image] + ([mask] if label == "anomaly" else [])
        for rel in paths:
            if Path(rel).is_absolute() or not (root / rel).is_file():
                found.add(
                    "error",
                    f"{where}: {rel} does not exist under {root} (expected a file at a path "
                    "relative to ROOT)",
                    fix,
                    group="rows naming missing files",
                )
        if split == "train":
            train[obj].append(root / image)
        else:
            anomalous = label == "anomaly"
            sample = AnomalySample(
                root / image,
                int(anomalous),
                root / mask if anomalous else None,
                "anomaly" if anomalous else GOOD,
            )
            test[obj].append(sample)
    out = []
    for obj in sorted(selected):
        for part, items in (("train", train[obj]), ("test", test[obj])):
            if not items:
                found.add("error", f"{csv_path}: object {obj} has no {part} rows", fix)
        samples = sorted(test[obj], key=lambda s: (s.defect, str(s.image)))
        out.append(AnomalyCategory(obj, tuple(sorted(train[obj])), tuple(samples)))
    return out


# --------------------------------------------------------------------------------------- folder
def _find_mask(gt_dir: Path, relative: Path) -> Path | None:
    parent = gt_dir / relative.parent
    for stem in (f"{relative.stem}_mask", relative.stem):
        for ext in ANOMALY_EXTENSIONS:
            for candidate in (parent / f"{stem}{ext}", parent / f"{stem}{ext.upper()}"):
                if candidate.is_file():
                    return candidate
    return None


def _read_folder(root: Path, found: _Findings) -> list[AnomalyCategory]:
    fix = "arrange the images as ROOT/good/*, ROOT/defect/[<type>/]*, ROOT/ground_truth/…"
    if not root.is_dir():
        found.add("error", f"anomaly folder {root} does not exist (expected ROOT/good)", fix)
        return []
    good_dir, defect_dir, gt_dir = root / GOOD, root / "defect", root / "ground_truth"
    if not good_dir.is_dir() and not defect_dir.is_dir():
        found.add(
            "error",
            f"{root} is not an anomaly folder: it has neither good/ (normal test images) nor "
            "defect/ (anomalous test images)",
            fix,
        )
        return []
    samples = (
        [AnomalySample(p, 0, None, GOOD) for p in _images_in(good_dir)] if good_dir.is_dir() else []
    )
    if defect_dir.is_dir():
        for image in _images_in(defect_dir, recursive=True):
            relative = image.relative_to(defect_dir)
            defect = relative.parts[0] if len(relative.parts) > 1 else "defect"
            mask = _find_mask(gt_dir, relative) if gt_dir.is_dir() else None
            if mask is None:
                found.add(
                    "warning",
                    f"{image} has no mask under {gt_dir} (only image-level metrics use it)",
                    f"add {gt_dir / relative.parent / relative.stem}_mask.png for pixel metrics",
                    group="defect images without a mask",
                )
            samples.append(AnomalySample(image, 1, mask, defect))
    if not samples:
        found.add("error", f"{root}: good/ and defect/ hold no images", fix)
        return []
    train_dir = root / "train"
    train = _images_in(train_dir, recursive=True) if train_dir.is_dir() else []
    samples.sort(key=lambda s: (s.defect, str(s.image)))
    name = root.resolve().name or str(root)
    return [AnomalyCategory(name, tuple(train), tuple(samples))]


# ------------------------------------------------------------------------------------ entry points
def _walk(spec: str, categories: Sequence[str] | None, found: _Findings) -> list[AnomalyCategory]:
    try:
        layout, root = parse_spec(spec)
    except DatasetError as exc:
        found.add("error", str(exc), "write mvtec:ROOT, visa:ROOT or folder:ROOT")
        return []
    if layout == "visa":
        return _read_visa(root, categories, spec, found)
    if layout == "folder":
        out = _read_folder(root, found)
        if out and categories is not None:
            _select([out[0].name], categories, spec)
        return out
    names = _select(_mvtec_categories(root, found), categories, spec)
    read = (_read_mvtec_category(root, name, found) for name in names)
    return [category for category in read if category is not None]


def read_anomaly_data(
    spec: str, *, categories: Sequence[str] | None = None
) -> list[AnomalyCategory]:
    """Read an anomaly detection dataset's file lists.

    Args:
        spec: ``mvtec:ROOT``, ``visa:ROOT`` or ``folder:ROOT`` (layouts in the module docstring).
        categories: Read only these categories (default: all). The result stays sorted by name.

    Returns:
        The categories, sorted by name; within each, images sorted.

    Raises:
        DatasetError: One line naming the missing or malformed part and what was expected:
            a missing root, a root of another layout, a category without ``train/good``, a
            defect image without its mask (MVTec), a bad CSV header or row (VisA, with its row
            number), a row naming a missing file, unknown category names.
    """
    return _walk(spec, categories, _Findings(strict=True))


def check_anomaly_data(spec: str, *, decode: bool = False) -> list[Problem]:
    """Every problem of an anomaly dataset, each with how to fix it (an empty list: all good).

    Finds missing roots, split files and folders, malformed CSV rows, defect images without a
    mask, masks without a test image, empty categories and single-class test sets; with
    ``decode`` also images and masks that do not decode and masks whose size differs from
    their image's (slow: opens every file).
    """
    found = _Findings(strict=False)
    where = Path(spec.partition(":")[2]).expanduser()
    for category in _walk(spec, None, found):
        _check_classes(category, where, found)
        if decode:
            _check_decoding(category, found)
    return found.collected()


def _open_size(path: Path) -> tuple[tuple[int, int] | None, str]:
    """``((H, W), "")`` of a decodable image, else ``(None, reason)``."""
    try:
        with Image.open(path) as img:
            img.load()
            return (img.height, img.width), ""
    except (
        OSError,
        SyntaxError,
        ValueError,
        UnidentifiedImageError,
        Image.DecompressionBombError,
    ) as exc:
        return None, f"{path}: does not decode ({exc})"


def _check_decoding(category: AnomalyCategory, found: _Findings) -> None:
    fix = "re-extract these files from the original archive (they are truncated or corrupt)"
    for path in category.train:
        size, reason = _open_size(path)
        if size is None:
            found.add("error", reason, fix, group="files that do not decode")
    for sample in category.test:
        size, reason = _open_size(sample.image)
        if size is None:
            found.add("error", reason, fix, group="files that do not decode")
        if sample.mask is None or not sample.mask.is_file():
            continue
        mask_size, reason = _open_size(sample.mask)
        if mask_size is None:
            found.add("error", reason, fix, group="files that do not decode")
        elif size is not None and mask_size != size:
            found.add(
                "error",
                f"mask {sample.mask} is {mask_size[1]}x{mask_size[0]} but its image "
                f"{sample.image} is {size[1]}x{size[0]} (expected the same size)",
                "replace the mask with one of the image's size",
                group="masks whose size differs from their image",
            )


def load_mask(
    path: str | os.PathLike[str], size: tuple[int, int] | None = None
) -> NDArray[np.bool_]:
    """A ground-truth mask as an H x W boolean array (any nonzero pixel is anomalous).

    Args:
        path: The mask file (any mode: 1-bit, grey, palette, RGB, 16-bit).
        size: ``(H, W)`` to resize to with nearest-neighbour sampling; None keeps the file's.

    Raises:
        ImageLoadError: A missing, unreadable or oversized file, in one line naming it.
    """
    p = Path(path)
    if not p.is_file():
        raise ImageLoadError(p, "mask file does not exist")
    try:
        with Image.open(p) as img:
            if img.width * img.height > DEFAULT_MAX_PIXELS:
                raise ImageLoadError(
                    p,
                    f"mask too large: {img.width}x{img.height} pixels (limit {DEFAULT_MAX_PIXELS})",
                )
            img.load()
            # Palette indices say nothing about colour: index 0 may well be white.
            arr: NDArray[Any] = np.asarray(img.convert("RGB") if img.mode == "P" else img)
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(p, "not a recognised image format (expected a mask image)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(p, f"cannot decode mask ({exc})") from None
    if arr.ndim == 3:
        # Colour masks: any channel counts, except alpha (it only says where the mask is drawn).
        channels = arr[..., :3] if arr.shape[2] == 4 else arr
        mask = (channels != 0).any(axis=2)
    else:
        mask = arr != 0
    if size is not None and tuple(size) != mask.shape:
        h, w = int(size[0]), int(size[1])
        if h <= 0 or w <= 0:
            raise ImageLoadError(p, f"cannot resize the mask to {h}x{w} (H x W)")
        small = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
        mask = np.asarray(small.resize((w, h), Image.Resampling.NEAREST)) != 0
    return np.ascontiguousarray(mask, dtype=bool)
