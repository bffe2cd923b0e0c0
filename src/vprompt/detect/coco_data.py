"""COCO-format detection folders: read, validate every field, report every problem with a fix.

A folder ``DIR`` holds one instances JSON and the images it names:

- The JSON is ``DIR/instances.json``, ``DIR/annotations.json`` or the only
  ``DIR/annotations/instances_*.json`` (several of those: name one with ``annotations=``).
- Images are found by ``file_name`` (a relative path, never absolute, never through ``..``)
  under the first of these folders that exists: ``images_dir=`` when given, ``DIR/images``,
  ``DIR/<split>`` for ``instances_<split>.json`` (COCO's own ``val2017`` layout), ``DIR``.
- ``width`` / ``height`` of an image may be left out; they are then read from the file's
  header (EXIF rotation applied), without decoding the pixels.

:func:`check_coco_detection` returns every problem found (file, entry and field named, each
with how to fix it); :func:`read_coco_detection` raises one :class:`CocoDataError` listing
them. Nothing is decoded: images are opened one at a time by the evaluation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from vprompt.data.check import Problem
from vprompt.data.images import DEFAULT_MAX_PIXELS, load_image
from vprompt.detect.checks import (
    CocoDataError,
    Findings,
    header_size,
    is_int,
    is_number,
    read_json_bounded,
    unsafe_relative_path,
)
from vprompt.errors import DatasetError, ImageLoadError

MAX_JSON_BYTES = 2 << 30  # LVIS v1 train (1.1 GB) fits; larger is almost surely a wrong file
BOX_TOLERANCE = 2.0  # pixels a box may reach past the image (COCO rounds some outward)
JSON_NAMES = ("instances.json", "annotations.json")


@dataclass(frozen=True)
class CocoImage:
    """One image entry: its id, file, and ``W x H`` size as the annotations use it."""

    id: int
    file_name: str
    path: Path
    width: int
    height: int

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


@dataclass(frozen=True)
class CocoCategory:
    """One category: its id and name (the name is the text query)."""

    id: int
    name: str


@dataclass(frozen=True)
class CocoAnnotation:
    """One ground-truth object.

    Attributes:
        bbox: COCO ``x, y, w, h`` in image pixels.
        area: As given (COCO: the mask's area), else ``w * h``.
        iscrowd: 1 marks a crowd region (ignored by the AP, neither hit nor miss).
        segmentation: Polygons or RLE as given, or None.
    """

    id: int
    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float]
    area: float
    iscrowd: int = 0
    segmentation: Any = None

    @property
    def box(self) -> tuple[float, float, float, float]:
        """``x0, y0, x1, y1``."""
        x, y, w, h = self.bbox
        return x, y, x + w, y + h


@dataclass(frozen=True)
class CocoDetectionSet:
    """A validated COCO-format detection set (paths only; no pixels).

    Attributes:
        root: The dataset folder.
        annotation_file: The instances JSON read.
        images_dir: Where ``file_name`` paths start.
        images: Sorted by id.
        categories: Sorted by id.
        annotations: Sorted by id.
    """

    root: Path
    annotation_file: Path
    images_dir: Path
    images: tuple[CocoImage, ...]
    categories: tuple[CocoCategory, ...]
    annotations: tuple[CocoAnnotation, ...]

    @property
    def has_segmentation(self) -> bool:
        """Whether every annotation carries a segmentation (so mask AP can be computed)."""
        return bool(self.annotations) and all(a.segmentation for a in self.annotations)

    def image(self, image_id: int) -> CocoImage:
        return next(i for i in self.images if i.id == image_id)

    def annotations_of(self, image_id: int) -> list[CocoAnnotation]:
        return [a for a in self.annotations if a.image_id == image_id]

    def load(self, image: CocoImage, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        """Decode one image as RGB, in the pixel grid its annotations use.

        EXIF orientation is applied unless that gives another size than the JSON's, in which
        case the pixels as stored are used (annotation tools differ on this).

        Raises:
            DatasetError: Neither reading has the JSON's ``width x height``.
        """
        img = load_image(image.path, max_pixels=max_pixels)
        if img.size == image.size:
            return img
        raw = load_image(image.path, max_pixels=max_pixels, reader="reference")
        if raw.size == image.size:
            return raw
        raise DatasetError(
            f"{image.path}: the image is {img.width}x{img.height} but {self.annotation_file.name} "
            f"says {image.width}x{image.height} (image id {image.id}); expected the same size"
        )

    def ground_truth(self) -> dict[str, Any]:
        """The set as a COCO ground-truth dict (for pycocotools)."""
        annotations = []
        for a in self.annotations:
            entry: dict[str, Any] = {
                "id": a.id,
                "image_id": a.image_id,
                "category_id": a.category_id,
                "bbox": list(a.bbox),
                "area": a.area,
                "iscrowd": a.iscrowd,
            }
            if a.segmentation:
                entry["segmentation"] = a.segmentation
            annotations.append(entry)
        return {
            "images": [
                {"id": i.id, "file_name": i.file_name, "width": i.width, "height": i.height}
                for i in self.images
            ],
            "categories": [{"id": c.id, "name": c.name} for c in self.categories],
            "annotations": annotations,
        }


# ------------------------------------------------------------------------------ locating
def find_instances_file(root: Path, annotations: str | Path | None, found: Findings) -> Path | None:
    """The instances JSON of ``root`` (see the module docstring), or None with a problem."""
    if annotations is not None:
        path = Path(annotations).expanduser()
        if not path.is_absolute() and not path.exists():
            path = root / path
        if not path.is_file():
            found.error(f"annotations file {annotations} does not exist", "name an instances JSON")
            return None
        return path
    if not root.is_dir():
        found.error(
            f"COCO folder {root} does not exist",
            "point it at the folder holding instances.json (or annotations/instances_*.json)",
        )
        return None
    for name in JSON_NAMES:
        if (root / name).is_file():
            return root / name
    candidates = sorted((root / "annotations").glob("instances_*.json"))
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        found.error(
            f"{root / 'annotations'} holds {len(candidates)} instances files "
            f"({', '.join(p.name for p in candidates)})",
            "name the one to use with annotations=",
        )
    else:
        found.error(
            f"{root} holds no instances JSON (expected {' or '.join(JSON_NAMES)}, or "
            "annotations/instances_*.json)",
            "add the COCO instances file, or name it with annotations=",
        )
    return None


def images_folder(root: Path, json_path: Path, images_dir: str | Path | None) -> Path:
    """Where ``file_name`` paths start (the first existing of the module docstring's list)."""
    if images_dir is not None:
        return Path(images_dir).expanduser()
    candidates = [root / "images"]
    stem = json_path.stem
    if stem.startswith("instances_"):
        candidates.append(root / stem.removeprefix("instances_"))
    return next((c for c in candidates if c.is_dir()), root)


# ------------------------------------------------------------------------------ sections
def _entries(
    doc: Mapping[str, Any], key: str, keys: Sequence[str], where: Path, found: Findings
) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(label, entry)`` for each object of ``doc[key]`` that has ``keys`` and an integer id
    seen for the first time; everything else becomes a problem."""
    items = doc.get(key)
    if not isinstance(items, list):
        kind = "missing" if items is None else type(items).__name__
        found.error(f"{where}: {key!r} is {kind}; expected a list", f"add a {key!r} list")
        return
    seen: Counter[int] = Counter()
    for n, entry in enumerate(items):
        label = f"{where.name} {key}[{n}]"
        if not isinstance(entry, dict):
            found.error(
                f"{label} is {type(entry).__name__}; expected an object",
                "write each entry as a JSON object",
                group="entries that are not objects",
            )
            continue
        missing = [repr(k) for k in keys if k not in entry]
        if missing:
            found.error(
                f"{label} lacks {', '.join(missing)}",
                f"give every entry {', '.join(keys)}",
                group="entries with missing keys",
            )
            continue
        value = entry["id"]
        if not is_int(value):
            found.error(
                f"{label}: id {value!r} is not an integer",
                "use integer ids",
                group="non-integer ids",
            )
            continue
        seen[value] += 1
        if seen[value] > 1:
            found.error(
                f"{label}: id {value} is used twice",
                "give each entry its own id",
                group="duplicate ids",
            )
            continue
        yield label, entry


def _read_categories(doc: Mapping[str, Any], where: Path, found: Findings) -> list[CocoCategory]:
    out: list[CocoCategory] = []
    names: dict[str, int] = {}
    for label, entry in _entries(doc, "categories", ("id", "name"), where, found):
        name = entry["name"]
        if not isinstance(name, str) or not " ".join(name.split()):
            found.error(
                f"{label}: name {name!r} is not a non-empty string",
                "name every category (the name is the text query)",
            )
            continue
        name = " ".join(name.split())
        if name in names:
            found.error(
                f"{label}: name {name!r} is also category {names[name]}'s",
                "give categories distinct names (each name is one text query)",
            )
            continue
        names[name] = entry["id"]
        out.append(CocoCategory(id=entry["id"], name=name))
    if doc.get("categories") == []:
        found.error(f"{where}: no categories", "list the categories to detect")
    return sorted(out, key=lambda c: c.id)


def _read_images(
    doc: Mapping[str, Any], where: Path, folder: Path, found: Findings
) -> list[CocoImage]:
    out: list[CocoImage] = []
    for label, entry in _entries(doc, "images", ("id", "file_name"), where, found):
        name = entry["file_name"]
        why = unsafe_relative_path(name) if isinstance(name, str) else "is not a string"
        if why is not None:
            found.error(
                f"{label}: file_name {name!r} {why}",
                f"use a path relative to {folder}",
                group="unsafe file names",
            )
            continue
        path = folder / name
        if not path.is_file():
            found.error(
                f"{label}: {path} does not exist",
                f"put the image there (file_name is relative to {folder})",
                group="missing image files",
            )
            continue
        width: Any = entry.get("width")
        height: Any = entry.get("height")
        if width is None and height is None:
            try:
                width, height = header_size(path)
            except ImageLoadError as exc:
                found.error(
                    f"{label}: {exc}",
                    "replace the file with a readable image",
                    group="unreadable images",
                )
                continue
        if not (is_int(width) and is_int(height) and width > 0 and height > 0):
            found.error(
                f"{label}: width {width!r} / height {height!r} are not positive integers",
                "give both, in pixels, or leave both out",
                group="images with a bad size",
            )
            continue
        out.append(CocoImage(id=entry["id"], file_name=name, path=path, width=width, height=height))
    if doc.get("images") == []:
        found.error(f"{where}: no images", "list the images with their file_name")
    return sorted(out, key=lambda i: i.id)


def _bbox_problem(bbox: Any, image: CocoImage | None, tolerance: float) -> str | None:
    if not isinstance(bbox, list | tuple) or len(bbox) != 4 or not all(map(is_number, bbox)):
        return f"bbox {bbox!r} is not 4 finite numbers [x, y, w, h]"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return f"bbox {list(bbox)} has width or height <= 0"
    if image is not None and (
        x < -tolerance
        or y < -tolerance
        or x + w > image.width + tolerance
        or y + h > image.height + tolerance
    ):
        return (
            f"bbox {list(bbox)} (x1={x + w:g}, y1={y + h:g}) reaches outside image {image.id} "
            f"of {image.width}x{image.height} by more than {tolerance:g} px"
        )
    return None


def _segmentation_ok(seg: Any) -> bool:
    if isinstance(seg, list):
        return all(
            isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(map(is_number, p))
            for p in seg
        )
    return isinstance(seg, dict) and "counts" in seg and "size" in seg


def _annotation_problems(
    entry: dict[str, Any],
    images: Mapping[int, CocoImage | None],
    categories: set[int],
    tolerance: float,
) -> list[tuple[str, str, str]]:
    """``(what, fix, group)`` for everything wrong with one annotation (keys present)."""
    image_id, category_id = entry["image_id"], entry["category_id"]
    known_image = is_int(image_id) and image_id in images
    known_category = is_int(category_id) and category_id in categories
    image = images.get(image_id) if known_image and known_category else None
    iscrowd, area = entry.get("iscrowd", 0), entry.get("area")
    seg = entry.get("segmentation") or None
    bbox = _bbox_problem(entry["bbox"], image, tolerance)
    checks = (
        (not known_image, f"image_id {image_id!r} is no image's id",
         "remove the annotation or add its image", "annotations of unknown images"),
        (not known_category, f"category_id {category_id!r} is no category's id",
         "remove the annotation or add its category", "annotations of unknown categories"),
        (bbox is not None, bbox, "fix or remove the box", "bad boxes"),
        (not is_int(iscrowd) or iscrowd not in (0, 1), f"iscrowd {iscrowd!r}; expected 0 or 1",
         "set it to 0 or 1", "bad iscrowd values"),
        (area is not None and not (is_number(area) and area >= 0),
         f"area {area!r} is not a number >= 0", "fix it or leave it out (then w * h is used)",
         "bad areas"),
        (seg is not None and not _segmentation_ok(seg),
         "segmentation is neither polygons [[x, y, ...]] nor RLE {counts, size}",
         "fix it or leave it out", "bad segmentations"),
    )  # fmt: skip
    return [(str(what), fix, group) for failed, what, fix, group in checks if failed]


def _read_annotations(
    doc: Mapping[str, Any],
    where: Path,
    images: Mapping[int, CocoImage | None],
    categories: set[int],
    tolerance: float,
    found: Findings,
) -> list[CocoAnnotation]:
    out: list[CocoAnnotation] = []
    keys = ("id", "image_id", "category_id", "bbox")
    for label, entry in _entries(doc, "annotations", keys, where, found):
        problems = _annotation_problems(entry, images, categories, tolerance)
        for what, fix, group in problems:
            found.error(f"{label}: {what}", fix, group=group)
        if problems or images[entry["image_id"]] is None:
            continue  # an image with its own problem was reported already
        x, y, w, h = (float(v) for v in entry["bbox"])
        area = entry.get("area")
        out.append(
            CocoAnnotation(
                id=entry["id"],
                image_id=entry["image_id"],
                category_id=entry["category_id"],
                bbox=(x, y, w, h),
                area=float(area) if area is not None else w * h,
                iscrowd=int(entry.get("iscrowd", 0)),
                segmentation=entry.get("segmentation") or None,
            )
        )
    return sorted(out, key=lambda a: a.id)


# ------------------------------------------------------------------------------ entry points
def _ids(doc: Mapping[str, Any], key: str) -> set[int]:
    items = doc.get(key)
    entries = items if isinstance(items, list) else []
    return {e["id"] for e in entries if isinstance(e, dict) and is_int(e.get("id"))}


def _walk(
    root: str | Path,
    annotations: str | Path | None,
    images_dir: str | Path | None,
    box_tolerance: float,
    max_json_bytes: int,
    found: Findings,
) -> CocoDetectionSet | None:
    base = Path(root).expanduser()
    json_path = find_instances_file(base, annotations, found)
    if json_path is None:
        return None
    fix = "write the instances file as COCO JSON: {images, annotations, categories}"
    doc = read_json_bounded(json_path, max_bytes=max_json_bytes, fix=fix, found=found)
    if doc is None:
        return None
    if not isinstance(doc, dict):
        found.error(f"{json_path} holds a {type(doc).__name__}; expected an object", fix)
        return None
    folder = images_folder(base, json_path, images_dir)
    if not folder.is_dir():
        found.error(f"images folder {folder} does not exist", "point images_dir at it")
        return None
    categories = _read_categories(doc, json_path, found)
    images = _read_images(doc, json_path, folder, found)
    # Ids of entries with their own problem still count as known (one problem, not two).
    known: dict[int, CocoImage | None] = dict.fromkeys(_ids(doc, "images"))
    known.update({i.id: i for i in images})
    anns = _read_annotations(doc, json_path, known, _ids(doc, "categories"), box_tolerance, found)
    return CocoDetectionSet(
        root=base,
        annotation_file=json_path,
        images_dir=folder,
        images=tuple(images),
        categories=tuple(categories),
        annotations=tuple(anns),
    )


def check_coco_detection(
    root: str | Path,
    *,
    annotations: str | Path | None = None,
    images_dir: str | Path | None = None,
    box_tolerance: float = BOX_TOLERANCE,
    max_json_bytes: int = MAX_JSON_BYTES,
) -> list[Problem]:
    """Every problem of a COCO-format folder, errors first, each naming the file and entry
    and saying how to fix it (an empty list: all good). Arguments as :func:`read_coco_detection`."""
    found = Findings()
    _walk(root, annotations, images_dir, box_tolerance, max_json_bytes, found)
    return found.collected()


def read_coco_detection(
    root: str | Path,
    *,
    annotations: str | Path | None = None,
    images_dir: str | Path | None = None,
    box_tolerance: float = BOX_TOLERANCE,
    max_json_bytes: int = MAX_JSON_BYTES,
) -> CocoDetectionSet:
    """Read and validate a COCO-format detection folder (layout in the module docstring).

    Args:
        root: The dataset folder.
        annotations: The instances JSON (absolute, or relative to the working directory or
            to ``root``); default: found in ``root``.
        images_dir: Where ``file_name`` paths start; default: found in ``root``.
        box_tolerance: Pixels a box may reach past its image before it is an error.
        max_json_bytes: Larger instances files are refused before reading.

    Raises:
        CocoDataError: Listing every error (unreadable or non-object JSON, missing lists or
            keys, duplicate ids, unknown image / category ids, bad boxes, unsafe or missing
            image files, …); ``.problems`` holds them all with their fixes.
    """
    found = Findings()
    dataset = _walk(root, annotations, images_dir, box_tolerance, max_json_bytes, found)
    problems = found.collected()
    if dataset is None or any(p.severity == "error" for p in problems):
        raise CocoDataError(Path(root), problems)
    return dataset
