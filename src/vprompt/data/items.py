"""Datasets as lists of ``(image path, label, class name)`` items — the CoOp suite's unit.

A :class:`Datum` is exactly one entry of a ``split_zhou_*.json`` file (path relative to the
dataset folder), so few-shot selections and split files round-trip through JSON unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from vprompt.data.identity import content_identity
from vprompt.data.images import ImageReader, load_image
from vprompt.errors import DatasetError


@dataclass(frozen=True)
class Datum:
    """One labelled image.

    Attributes:
        path: Image path relative to the dataset's root folder (POSIX separators).
        label: Class index.
        classname: The class name as the split file spells it (underscores kept).
    """

    path: str
    label: int
    classname: str

    def to_json(self) -> list[str | int]:
        return [self.path, self.label, self.classname]

    @classmethod
    def from_json(cls, entry: object, *, where: str) -> Datum:
        """Parse ``[path, label, classname]`` with a clear error naming ``where``: a
        non-empty path, a JSON integer label >= 0 and a non-empty printable class name."""
        if (
            not isinstance(entry, list | tuple)
            or len(entry) != 3
            or not isinstance(entry[0], str)
            or not isinstance(entry[2], str)
        ):
            raise DatasetError(f"{where}: expected [path, label, classname], got {entry!r:.200}")
        label = entry[1]
        if isinstance(label, bool) or not isinstance(label, int):
            raise DatasetError(f"{where}: label {label!r:.50} is not an integer")
        if label < 0:
            raise DatasetError(f"{where}: negative label {label}")
        path = check_text(entry[0], what="path", where=where)
        name = check_text(entry[2], what="class name", where=where)
        return cls(path.replace("\\", "/"), label, name)


_CONTROL = {chr(c) for c in (*range(0x20), 0x7F)}


def check_text(value: str, *, what: str, where: str) -> str:
    """``value`` if it is non-empty, valid UTF-8 (no undecodable bytes from a file name) and
    free of control characters (newlines, tabs, NUL); otherwise a DatasetError naming
    ``where`` and ``what`` (path, label, class name)."""
    if not value.strip():
        raise DatasetError(f"{where}: empty {what}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DatasetError(f"{where}: {what} {value!r:.80} is not UTF-8 text") from None
    bad = next((c for c in value if c in _CONTROL), None)
    if bad is not None:
        raise DatasetError(f"{where}: {what} {value!r:.80} holds the control character {bad!r}")
    return value


def prompt_name(classname: str) -> str:
    """The name CoOp-suite code puts in prompts: underscores become spaces."""
    return classname.replace("_", " ")


def label_names(items: Iterable[Datum]) -> list[str]:
    """Class names in label order, as Dassl's ``get_lab2cname`` derives them from a split.

    Raises:
        DatasetError: Labels are not 0..C-1 or one label has two names.
    """
    names: dict[int, str] = {}
    for item in items:
        seen = names.setdefault(item.label, item.classname)
        if seen != item.classname:
            raise DatasetError(
                f"label {item.label} is both {seen!r} and {item.classname!r} in the split"
            )
    if any(label >= len(names) for label in names):  # then some label below is missing
        missing = [i for i in range(len(names)) if i not in names][:10]
        raise DatasetError(
            f"labels must be 0..{len(names) - 1}; got {max(names)}, missing {missing}"
        )
    return [names[i] for i in range(len(names))]


class ItemDataset:
    """A :class:`~vprompt.data.dataset.ClassificationDataset` over items under ``root``.

    Args:
        root: Folder the item paths are relative to.
        items: The labelled images, in order.
        classnames: Names for labels 0..C-1 (prompt-ready: underscores already replaced).
            Defaults to the items' own names via :func:`label_names` and :func:`prompt_name`.
        reader: How images are decoded (:func:`~vprompt.data.images.load_image`): ``exif``
            for user data, ``reference`` (as the papers' code reads them) for the benchmark
            suite.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        items: Sequence[Datum],
        classnames: Sequence[str] | None = None,
        *,
        reader: ImageReader = "exif",
    ) -> None:
        self.root = Path(root)
        self.reader: ImageReader = reader
        self.items = list(items)
        if classnames is None:
            classnames = [prompt_name(n) for n in label_names(self.items)]
        self.classnames = list(classnames)
        bad = [d for d in self.items if d.label >= len(self.classnames)]
        if bad:
            raise DatasetError(
                f"{bad[0].path}: label {bad[0].label} but only {len(self.classnames)} classes"
            )

    def __len__(self) -> int:
        return len(self.items)

    def all_labels(self) -> list[int]:
        """Every label in order (no image is decoded)."""
        return [item.label for item in self.items]

    def path(self, index: int) -> Path:
        return self.root / self.items[index].path

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        item = self.items[index]
        return load_image(self.root / item.path, reader=self.reader), item.label

    def identity(self, index: int) -> str:
        """A digest of the image file's bytes and the reader (for feature caches)."""
        path = self.root / self.items[index].path
        # The reader changes the pixels (rotation, alpha), so it is part of the identity.
        reader = "" if self.reader == "exif" else self.reader
        try:
            return content_identity(path, reader=reader)
        except OSError as exc:
            raise DatasetError(f"{path}: cannot read image ({exc.strerror})") from None
