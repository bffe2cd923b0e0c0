"""Tiny fake copies of the benchmark datasets, laid out exactly like the real ones on disk.

:func:`write_fake_dataset` writes the same folder names, list files and split-file format as
the real dataset, with realistic raw class names (including the ones CoOp renames: Caltech's
``Faces`` folder is class ``face``, EuroSAT's ``SeaLake`` is ``Sea or Lake``, UCF101's
``ApplyEyeMakeup`` is ``Apply_Eye_Makeup``, SUN397's ``b/bathroom/indoor`` style paths …) and
real little images that PIL opens. Every image is a flat class colour plus noise, so even a
tiny model can learn the classes. Everything is deterministic given ``seed``.

The items of a split file (and of FGVC-Aircraft's lists) are deliberately shuffled, not grouped
by label: the real files are in their own order, and readers must keep it.

Used by the tests of the readers, ``vprompt data check`` and the protocol runner; never a
substitute for the real data.
"""

from __future__ import annotations

import colorsys
import hashlib
import shutil
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vprompt.data.items import Datum
from vprompt.data.suite.base import SUITE, SuiteDataset, SuiteSplits, get_suite, write_split_file
from vprompt.data.suite.coop_split import (
    CALTECH_IGNORED,
    CALTECH_RENAMES,
    EUROSAT_RENAMES,
    sun397_classname,
    ucf101_classname,
)
from vprompt.errors import DatasetError
from vprompt.utils import jsonio

# Marks a folder this module wrote, so rewriting it may delete it (and nothing else).
MARKER = ".vprompt-synthetic"
SPLITS = ("train", "val", "test")

# Real raw class names, in the reference's label order; more classes get made-up names.
_CALTECH = ["Faces", "Leopards", "Motorbikes", "accordion", "airplanes", "anchor", "ant", "barrel"]
_PETS = ["Abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound",
         "beagle", "Bengal", "Birman", "Bombay"]  # fmt: skip
_CARS = ["2000 AM General Hummer SUV", "2012 Acura RL Sedan", "2012 Acura TL Sedan",
         "2008 Acura TL Type-S", "2012 Acura TSX Sedan", "2001 Acura Integra Type R"]  # fmt: skip
_FLOWERS = ["pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea",
            "english marigold", "tiger lily", "moon orchid"]  # fmt: skip
_FOOD = ["apple_pie", "baby_back_ribs", "baklava", "beef_carpaccio", "beef_tartare", "beet_salad"]
_SUN = ["a/abbey", "a/airplane_cabin", "a/apartment_building/outdoor", "b/bathroom",
        "c/church/indoor", "c/church/outdoor", "d/dining_room"]  # fmt: skip
_DTD = ["banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed"]
_UCF = ["ApplyEyeMakeup", "ApplyLipstick", "Archery", "BabyCrawling", "BalanceBeam",
        "BandMarching", "YoYo"]  # fmt: skip
_AIRCRAFT = ["707-320", "A300B4", "Cessna 172", "F-16A/B", "Il-76", "DHC-1", "Yak-42"]
_IMAGENET = [("n01440764", "tench"), ("n01443537", "goldfish"),
             ("n01484850", "great white shark"), ("n01491361", "tiger shark"),
             ("n01494475", "hammerhead shark"), ("n01496331", "electric ray"),
             ("n01498041", "stingray"), ("n01514668", "rooster")]  # fmt: skip


def _extend(real: Sequence[str], n: int, make: Callable[[int], str]) -> list[str]:
    return [*real[:n], *(make(i) for i in range(len(real), n))]


def _imagenet_classes(n: int) -> list[tuple[str, str]]:
    """``n`` (wnid, name) pairs in WNID order, as classnames.txt lists them."""
    extra = [
        (f"n{3000000 + 37 * i:08d}", f"synthetic object {i}") for i in range(len(_IMAGENET), n)
    ]
    return [*_IMAGENET[:n], *extra]


@dataclass
class _Writer:
    """What every layout writer needs: where, how many, and a seeded random source."""

    spec: SuiteDataset
    folder: Path
    num_classes: int
    per_class: tuple[int, int, int]
    size: int
    seed: int
    rng: np.random.Generator

    def image(self, rel: str, label: int) -> None:
        """Write a class-coloured noisy image at ``folder/rel`` (JPEG for .jpg/.jpeg)."""
        r, g, b = colorsys.hsv_to_rgb((label * 0.381966) % 1.0, 0.8, 0.55 + 0.35 * (label % 2))
        base = np.array([r, g, b]) * 255.0
        noise = self.rng.normal(0.0, 12.0, size=(self.size, self.size, 3))
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        path = self.folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        is_jpeg = path.suffix.lower() in {".jpg", ".jpeg"}
        Image.fromarray(pixels, mode="RGB").save(
            path, format="JPEG" if is_jpeg else "PNG", **({"quality": 90} if is_jpeg else {})
        )

    def token(self, number: int, length: int, alphabet: str = "abcdefghijklmnopqrstuvwxyz") -> str:
        """A deterministic pseudo-random name for image ``number`` (hash-style file names)."""
        digest = hashlib.sha256(f"{self.spec.name}:{self.seed}:{number}".encode()).digest()
        return "".join(alphabet[byte % len(alphabet)] for byte in digest[:length])

    def slots(self, splits: Sequence[str] = SPLITS) -> list[tuple[int, str, int]]:
        """``(label, split, number)`` for every image; numbers 1..N, unique, in random order."""
        counts = dict(zip(SPLITS, self.per_class, strict=True))
        pairs = [(y, s) for y in range(self.num_classes) for s in splits for _ in range(counts[s])]
        numbers = self.rng.permutation(len(pairs)) + 1
        return [(y, s, int(k)) for (y, s), k in zip(pairs, numbers, strict=True)]

    def shuffled(self, items: list[Datum]) -> list[Datum]:
        return [items[i] for i in self.rng.permutation(len(items))]

    def split_dataset(self, names: list[str], path_of: Callable[[int, str, int], str]) -> None:
        """Images plus a shuffled split file; ``path_of(label, split, number)`` is the path
        relative to the image folder, ``names`` the split file's class names by label."""
        image_dir = self.spec.image_dir
        prefix = f"{image_dir}/" if image_dir else ""
        out: dict[str, list[Datum]] = {s: [] for s in SPLITS}
        for label, split, number in self.slots():
            rel = prefix + path_of(label, split, number)
            self.image(rel, label)
            out[split].append(Datum(rel, label, names[label]))
        train, val, test = (self.shuffled(out[s]) for s in SPLITS)
        splits = SuiteSplits(train, val, test, names)
        assert self.spec.split_file is not None
        write_split_file(self.folder / self.spec.split_file, splits, image_dir)

    def text(self, rel: str, lines: Sequence[str]) -> None:
        path = self.folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


# --------------------------------------------------------------------------- split-file sets


def _caltech101(w: _Writer) -> None:
    extra = _extend(_CALTECH, w.num_classes, lambda i: f"object{i:02d}")
    folders = sorted(extra)  # the reference labels categories in sorted order
    names = [CALTECH_RENAMES.get(f, f) for f in folders]
    w.split_dataset(names, lambda y, s, k: f"{folders[y]}/image_{k:04d}.jpg")
    for ignored in CALTECH_IGNORED:  # present on disk, never in the split
        for k in (1, 2):
            w.image(f"{w.spec.image_dir}/{ignored}/image_{k:04d}.jpg", 0)


def _oxford_pets(w: _Writer) -> None:
    breeds = _extend(_PETS, w.num_classes, lambda i: f"synthetic_breed_{i}")
    w.split_dataset([b.lower() for b in breeds], lambda y, s, k: f"{breeds[y]}_{k}.jpg")


def _stanford_cars(w: _Writer) -> None:
    names = _extend(_CARS, w.num_classes, lambda i: f"{2000 + i % 13} Synthetic Model{i} Sedan")
    w.split_dataset(
        names, lambda y, s, k: f"{'cars_test' if s == 'test' else 'cars_train'}/{k:05d}.jpg"
    )


def _oxford_flowers(w: _Writer) -> None:
    names = _extend(_FLOWERS, w.num_classes, lambda i: f"synthetic flower {i}")
    w.split_dataset(names, lambda y, s, k: f"image_{k:05d}.jpg")
    w.text("cat_to_name.json", [jsonio.dumps({str(i + 1): n for i, n in enumerate(names)})])


def _food101(w: _Writer) -> None:
    names = sorted(_extend(_FOOD, w.num_classes, lambda i: f"synthetic_dish_{i}"))
    w.split_dataset(names, lambda y, s, k: f"{names[y]}/{100003 + 7919 * k}.jpg")


def _sun397(w: _Writer) -> None:
    cats = _extend(_SUN, w.num_classes, lambda i: f"s/synthetic_scene_{i}")
    w.split_dataset(
        [sun397_classname(c) for c in cats], lambda y, s, k: f"{cats[y]}/sun_{w.token(k, 16)}.jpg"
    )
    w.text("ClassName.txt", [f"/{c}" for c in cats])


def _dtd(w: _Writer) -> None:
    names = sorted(_extend(_DTD, w.num_classes, lambda i: f"synthetic{i}"))
    w.split_dataset(names, lambda y, s, k: f"{names[y]}/{names[y]}_{k:04d}.jpg")


def _eurosat(w: _Writer) -> None:
    folders = sorted(_extend(sorted(EUROSAT_RENAMES), w.num_classes, lambda i: f"Synthetic{i}"))
    names = [EUROSAT_RENAMES.get(f, f) for f in folders]
    w.split_dataset(names, lambda y, s, k: f"{folders[y]}/{folders[y]}_{k}.jpg")


def _ucf101(w: _Writer) -> None:
    actions = _extend(_UCF, w.num_classes, lambda i: f"SyntheticAction{i}")
    names = [ucf101_classname(a) for a in actions]
    # The mid-frame folders carry the renamed action; the file names keep the original one.
    w.split_dataset(
        names, lambda y, s, k: f"{names[y]}/v_{actions[y]}_g{k // 7 + 1:02d}_c{k % 7 + 1:02d}.jpg"
    )
    w.text("ucfTrainTestlist/classInd.txt", [f"{i + 1} {a}" for i, a in enumerate(actions)])


# --------------------------------------------------------------------------- list-file sets


def _fgvc_aircraft(w: _Writer) -> None:
    variants = _extend(_AIRCRAFT, w.num_classes, lambda i: f"Synthetic-{i}")
    w.text("variants.txt", variants)
    lines: dict[str, list[str]] = {s: [] for s in SPLITS}
    for label, split, number in w.slots():
        image_id = f"{34309 + 7 * number:07d}"
        w.image(f"{w.spec.image_dir}/{image_id}.jpg", label)
        lines[split].append(f"{image_id} {variants[label]}")
    for split in SPLITS:
        order = w.rng.permutation(len(lines[split]))
        w.text(f"images_variant_{split}.txt", [lines[split][i] for i in order])


def _class_folders(
    w: _Writer, rel: str, folders: list[str], split: str, name: Callable[[int, int], str]
) -> None:
    """Images ``rel/<folders[label]>/<name(label, number)>`` for one split's count."""
    for label, _, number in w.slots((split,)):
        w.image(f"{rel}/{folders[label]}/{name(label, number)}", label)


def _imagenet(w: _Writer) -> None:
    classes = _imagenet_classes(w.num_classes)
    w.text("classnames.txt", [f"{wnid} {name}" for wnid, name in classes])
    wnids = [wnid for wnid, _ in classes]
    # ImageNet's val/ images are the test split; the per-class val count has no place here.
    _class_folders(w, "images/train", wnids, "train", lambda y, k: f"{wnids[y]}_{k}.JPEG")
    _class_folders(w, "images/val", wnids, "test", lambda y, k: f"ILSVRC2012_val_{k:08d}.JPEG")


def _imagenetv2(w: _Writer) -> None:
    classes = _imagenet_classes(w.num_classes)
    w.text("classnames.txt", [f"{wnid} {name}" for wnid, name in classes])
    labels = [str(i) for i in range(w.num_classes)]
    _class_folders(
        w,
        w.spec.image_dir,
        labels,
        "test",
        lambda y, k: f"{w.token(k, 40, '0123456789abcdef')}.jpeg",
    )


def _imagenet_sketch(w: _Writer) -> None:
    classes = _imagenet_classes(w.num_classes)
    w.text("classnames.txt", [f"{wnid} {name}" for wnid, name in classes])
    wnids = [wnid for wnid, _ in classes]
    _class_folders(w, w.spec.image_dir, wnids, "test", lambda y, k: f"sketch_{k}.JPEG")


def _imagenet_subset(w: _Writer, name: Callable[[str, int], str]) -> None:
    """ImageNet-A/-R: the full classnames.txt, folders for only some of its classes."""
    total = w.num_classes + max(3, w.num_classes)
    classes = _imagenet_classes(total)
    w.text("classnames.txt", [f"{wnid} {cname}" for wnid, cname in classes])
    chosen = sorted(int(i) for i in w.rng.choice(total, size=w.num_classes, replace=False))
    wnids = [classes[i][0] for i in chosen]
    names = [classes[i][1] for i in chosen]
    _class_folders(w, w.spec.image_dir, wnids, "test", lambda y, k: name(names[y], k))
    w.text(f"{w.spec.image_dir}/README.txt", [f"{w.spec.title}: {w.num_classes} classes."])


def _imagenet_a(w: _Writer) -> None:
    _imagenet_subset(w, lambda n, k: f"0.{k:06d}_{n} _ {n}_0.{(k * 7919) % 999999:06d}.jpg")


def _imagenet_r(w: _Writer) -> None:
    styles = ("art", "cartoon", "deviantart", "painting", "sketch", "toy")
    _imagenet_subset(w, lambda n, k: f"{styles[k % len(styles)]}_{k}.jpg")


_WRITERS: dict[str, Callable[[_Writer], None]] = {
    "caltech101": _caltech101,
    "oxford_pets": _oxford_pets,
    "stanford_cars": _stanford_cars,
    "oxford_flowers": _oxford_flowers,
    "food101": _food101,
    "sun397": _sun397,
    "dtd": _dtd,
    "eurosat": _eurosat,
    "ucf101": _ucf101,
    "fgvc_aircraft": _fgvc_aircraft,
    "imagenet": _imagenet,
    "imagenetv2": _imagenetv2,
    "imagenet_sketch": _imagenet_sketch,
    "imagenet_a": _imagenet_a,
    "imagenet_r": _imagenet_r,
}


def _prepare_folder(folder: Path) -> None:
    """An empty folder to write into; only a folder this module wrote may be replaced."""
    if folder.exists():
        if (folder / MARKER).is_file():
            shutil.rmtree(folder)
        elif folder.is_dir() and not any(folder.iterdir()):
            pass
        else:
            raise DatasetError(
                f"{folder}: already exists and was not written by write_fake_dataset; "
                "refusing to write fake data over it (choose an empty data root)"
            )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text("synthetic fixture written by vprompt\n", encoding="utf-8")


def write_fake_dataset(
    name: str,
    data_root: str | Path,
    *,
    num_classes: int | None = None,
    images_per_class: tuple[int, int, int] = (6, 3, 3),
    image_size: int = 16,
    seed: int = 0,
) -> Path:
    """Write a tiny fake copy of dataset ``name``'s real layout under ``data_root``.

    Args:
        name: A registered dataset name or alias.
        data_root: The folder holding the datasets; the fake goes into the dataset's folder
            there (e.g. ``data_root/oxford_pets``), replacing an earlier fake.
        num_classes: Classes to write; defaults to min(real count, 5). Larger values (up to
            any number) get made-up names after the real ones.
        images_per_class: Images per class for train, val and test. ImageNet writes train and
            test (its ``val/`` folder), the test-only variants the test count only.
        image_size: Side of the square images, in pixels.
        seed: Makes the images, file names and item order reproducible.

    Returns:
        The dataset folder.

    Raises:
        DatasetError: The dataset folder exists and holds something this function did not
            write (it never writes over real data).
        ValueError: Non-positive ``num_classes`` or ``image_size``, negative counts.
    """
    spec = get_suite(name)
    n = min(spec.counts.classes, 5) if num_classes is None else num_classes
    if n < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    per_class = tuple(int(c) for c in images_per_class)
    if len(per_class) != 3 or min(per_class) < 0:
        raise ValueError(f"images_per_class must be 3 counts >= 0, got {images_per_class!r}")
    if image_size < 1:
        raise ValueError(f"image_size must be at least 1, got {image_size}")
    folder = spec.path(data_root)
    _prepare_folder(folder)
    writer = _Writer(
        spec=spec,
        folder=folder,
        num_classes=n,
        per_class=(per_class[0], per_class[1], per_class[2]),
        size=image_size,
        seed=seed,
        rng=np.random.default_rng([seed, zlib.crc32(spec.name.encode())]),
    )
    _WRITERS[spec.name](writer)
    return folder


def write_fake_suite(
    data_root: str | Path,
    names: Sequence[str] | None = None,
    **kw: Any,
) -> dict[str, Path]:
    """:func:`write_fake_dataset` for several datasets (default: every registered one).

    Returns:
        Registry name → dataset folder.
    """
    wanted = list(SUITE.names()) if names is None else [get_suite(n).name for n in names]
    return {n: write_fake_dataset(n, data_root, **kw) for n in wanted}
