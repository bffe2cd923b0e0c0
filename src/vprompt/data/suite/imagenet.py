"""The ImageNet family: ImageNet and its four test-only variants (V2, Sketch, A, R).

All five read ``classnames.txt`` from their own folder: CoOp's file of CLIP's cleaned class
names, one ``n01440764 tench`` line per class (WNID, a space, the name), in WNID order. The
readers follow CoOp's ``datasets/imagenet*.py``:

- ImageNet: ``images/train/<wnid>/`` and ``images/val/<wnid>/``; a class's label is its
  folder's index in sorted folder order. The reference validates on the test split, so ``val``
  is empty and few-shot sampling does not sample it.
- ImageNet-V2: folders ``0`` … ``999`` hold label ``i``, named by line ``i`` of classnames.txt.
- ImageNet-Sketch: sorted WNID folders, as ImageNet.
- ImageNet-A / -R: sorted WNID folders (200 of the 1000 classes; ``README.txt`` ignored).

Deviations from the reference, none of which changes labels or items of a correct install:

- **Files inside a class folder are sorted** by name (Python string order). The reference
  keeps ``os.listdir`` order, which depends on the file system and differs between machines,
  so its ImageNet item order (and hence its seeded few-shot selection) is not reproducible
  anyway; sorting makes ours the same everywhere.
- Only non-hidden regular files count as images and only non-hidden folders as classes; the
  reference would instead crash (or list a sub-folder as an image) on such stray entries.
- CoOp caches ImageNet's item lists in ``preprocessed.pkl``; that pickle is never read here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from vprompt.data.items import Datum
from vprompt.data.suite.base import (
    SuiteCounts,
    SuiteDataset,
    SuiteSplits,
    read_text_lines,
    register_suite,
)
from vprompt.errors import DatasetError

CLASSNAMES_FILE = "classnames.txt"
_CLASSNAMES_HINT = (
    "it is CoOp's classnames.txt (CLIP's cleaned ImageNet class names, one 'WNID name' line "
    "per class), linked from https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md; copy it "
    "into this folder or run `vprompt data prepare`"
)
# Entries of ImageNet-A/-R's image folder that are not classes (CoOp's ``TO_BE_IGNORED``).
IGNORED_ENTRIES = ("README.txt",)
IMAGENETV2_DIR = "imagenetv2-matched-frequency-format-val"


def read_classnames(path: Path) -> dict[str, str]:
    """``classnames.txt`` → ``{wnid: class name}`` in file order.

    Raises:
        DatasetError: Missing file (with where to get it), a line without a name, or a WNID
            listed twice — each named with file and line.
    """
    names: dict[str, str] = {}
    lines: dict[str, int] = {}
    for lineno, line in enumerate(read_text_lines(path, hint=_CLASSNAMES_HINT), start=1):
        wnid, _, name = line.strip().partition(" ")
        if not wnid or not name:
            raise DatasetError(f"{path}, line {lineno}: expected 'WNID class name', got {line!r}")
        if wnid in names:
            raise DatasetError(
                f"{path}, line {lineno}: {wnid} is already listed on line {lines[wnid]}"
            )
        names[wnid] = name
        lines[wnid] = lineno
    if not names:
        raise DatasetError(f"{path}: lists no classes; {_CLASSNAMES_HINT}")
    return names


def _entries(folder: Path, *, dirs: bool) -> list[str]:
    """Sorted names of the non-hidden sub-folders (``dirs``) or files of ``folder``."""
    try:
        with os.scandir(folder) as it:
            return sorted(
                e.name
                for e in it
                if not e.name.startswith(".") and (e.is_dir() if dirs else e.is_file())
            )
    except FileNotFoundError:
        raise DatasetError(f"{folder}: folder not found") from None
    except NotADirectoryError:
        raise DatasetError(f"{folder}: not a folder") from None
    except OSError as exc:
        raise DatasetError(f"{folder}: cannot list ({exc.strerror})") from None


def _read_classes(folder: Path, rel: str, classes: list[tuple[str, str]]) -> list[Datum]:
    """Items of ``folder/rel/<sub>/*`` for ``classes[label] = (sub, name)``: label order, then
    file-name order."""
    items = []
    for label, (sub, name) in enumerate(classes):
        for fname in _entries(folder / rel / sub, dirs=False):
            items.append(Datum(f"{rel}/{sub}/{fname}", label, name))
    return items


def _wnid_folders(
    folder: Path, rel: str, classnames: dict[str, str], *, ignored: tuple[str, ...] = ()
) -> list[tuple[str, str]]:
    """``(wnid, class name)`` for the sorted WNID folders of ``folder/rel``.

    Raises:
        DatasetError: No class folders, or a folder that classnames.txt does not list.
    """
    wnids = [w for w in _entries(folder / rel, dirs=True) if w not in ignored]
    if not wnids:
        raise DatasetError(f"{folder / rel}: holds no class folders")
    unknown = [w for w in wnids if w not in classnames]
    if unknown:
        raise DatasetError(
            f"{folder / rel}: {len(unknown)} class folder(s) not listed in "
            f"{folder / CLASSNAMES_FILE} (first: {unknown[0]!r})"
        )
    return [(w, classnames[w]) for w in wnids]


def _names(classes: list[tuple[str, str]]) -> list[str]:
    return [name for _, name in classes]


def read_imagenet(folder: Path) -> SuiteSplits:
    """ImageNet: train from ``images/train``, test from ``images/val``; no val split."""
    classnames = read_classnames(folder / CLASSNAMES_FILE)
    train_dirs = _wnid_folders(folder, "images/train", classnames)
    test_dirs = _wnid_folders(folder, "images/val", classnames)
    if train_dirs != test_dirs:
        # Each split is labelled by its own folder order, so the two must hold the same classes.
        only_train = sorted(set(train_dirs) - set(test_dirs))
        only_val = sorted(set(test_dirs) - set(train_dirs))
        raise DatasetError(
            f"{folder / 'images'}: train/ and val/ must hold the same class folders "
            f"(only in train: {[w for w, _ in only_train][:5]}, "
            f"only in val: {[w for w, _ in only_val][:5]})"
        )
    train = _read_classes(folder, "images/train", train_dirs)
    test = _read_classes(folder, "images/val", test_dirs)
    return SuiteSplits(train, [], test, _names(train_dirs))


def read_imagenetv2(folder: Path) -> SuiteSplits:
    """ImageNet-V2 (matched frequency): folder ``i`` holds label ``i`` of classnames.txt."""
    classnames = read_classnames(folder / CLASSNAMES_FILE)
    rel = IMAGENETV2_DIR
    if not (folder / rel).is_dir():
        raise DatasetError(f"{folder / rel}: folder not found")
    pairs: list[tuple[str, str]] = []
    for label, name in enumerate(classnames.values()):
        if not (folder / rel / str(label)).is_dir():
            raise DatasetError(
                f"{folder / rel / str(label)}: class folder for label {label} ({name!r}) "
                f"not found; {rel} must hold folders 0..{len(classnames) - 1}"
            )
        pairs.append((str(label), name))
    test = _read_classes(folder, rel, pairs)
    return SuiteSplits([], [], test, _names(pairs))


def _wnid_test_reader(
    image_dir: str, *, ignored: tuple[str, ...] = ()
) -> Callable[[Path], SuiteSplits]:
    """A test-only reader over the sorted WNID folders of ``image_dir``."""

    def read(folder: Path) -> SuiteSplits:
        classnames = read_classnames(folder / CLASSNAMES_FILE)
        pairs = _wnid_folders(folder, image_dir, classnames, ignored=ignored)
        test = _read_classes(folder, image_dir, pairs)
        return SuiteSplits([], [], test, _names(pairs))

    read.__doc__ = f"Test-only: sorted WNID folders of {image_dir}/, labelled in that order."
    return read


_TEMPLATE = "a photo of a {}."

IMAGENET = register_suite(
    SuiteDataset(
        name="imagenet",
        title="ImageNet",
        folder="imagenet",
        template=_TEMPLATE,
        read=read_imagenet,
        counts=SuiteCounts(classes=1000, train=1281167, val=0, test=50000),
        image_dir="images",
        fewshot_val=False,
        aliases=("ILSVRC2012",),
    )
)
IMAGENETV2 = register_suite(
    SuiteDataset(
        name="imagenetv2",
        title="ImageNetV2",
        folder="imagenetv2",
        template=_TEMPLATE,
        read=read_imagenetv2,
        counts=SuiteCounts(classes=1000, train=0, val=0, test=10000),
        image_dir=IMAGENETV2_DIR,
        eval_only=True,
    )
)
IMAGENET_SKETCH = register_suite(
    SuiteDataset(
        name="imagenet_sketch",
        title="ImageNet-Sketch",
        folder="imagenet-sketch",
        template=_TEMPLATE,
        read=_wnid_test_reader("images"),
        counts=SuiteCounts(classes=1000, train=0, val=0, test=50889),
        image_dir="images",
        eval_only=True,
    )
)
IMAGENET_A = register_suite(
    SuiteDataset(
        name="imagenet_a",
        title="ImageNet-A",
        folder="imagenet-adversarial",
        template=_TEMPLATE,
        read=_wnid_test_reader("imagenet-a", ignored=IGNORED_ENTRIES),
        counts=SuiteCounts(classes=200, train=0, val=0, test=7500),
        image_dir="imagenet-a",
        eval_only=True,
        aliases=("imagenet-adversarial",),
    )
)
IMAGENET_R = register_suite(
    SuiteDataset(
        name="imagenet_r",
        title="ImageNet-R",
        folder="imagenet-rendition",
        template=_TEMPLATE,
        read=_wnid_test_reader("imagenet-r", ignored=IGNORED_ENTRIES),
        counts=SuiteCounts(classes=200, train=0, val=0, test=30000),
        image_dir="imagenet-r",
        eval_only=True,
        aliases=("imagenet-rendition",),
    )
)
