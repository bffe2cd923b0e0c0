"""Image-folder datasets: ``ROOT/<split>/<class>/<image>``."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from vprompt.data.dataset import DataSplits
from vprompt.data.identity import content_identity
from vprompt.data.images import IMAGE_EXTENSIONS, load_image
from vprompt.data.items import check_text
from vprompt.errors import DatasetError


class ImageFolder:
    """One split folder whose sub-folders are classes (sorted names → labels 0..C-1).

    Args:
        root: The split folder (e.g. ``data/train``).
        classnames: Class order to use (e.g. the train split's); folders not listed are errors.
    """

    def __init__(
        self, root: str | os.PathLike[str], *, classnames: list[str] | None = None
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: not a folder")
        found = sorted(
            check_text(d.name, what="class folder name", where=str(self.root))
            for d in self.root.iterdir()
            if d.is_dir() and not d.name.startswith(".")
        )
        if not found:
            raise DatasetError(
                f"{self.root}: no class sub-folders (expected {self.root}/<class>/<image>)"
            )
        if classnames is not None:
            unknown = sorted(set(found) - set(classnames))
            if unknown:
                raise DatasetError(
                    f"{self.root}: class folders {unknown} are not in the train split"
                )
        self.classnames = list(classnames) if classnames is not None else found
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classnames):
            folder = self.root / name
            if not folder.is_dir():
                continue
            files = sorted(
                p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
            self.samples += [(p, label) for p in files]
        if not self.samples:
            raise DatasetError(f"{self.root}: no images found in its class folders")

    def all_labels(self) -> list[int]:
        """Every label in order (no image is decoded)."""
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        return load_image(path), label

    def identity(self, index: int) -> str:
        """A digest of the image file's bytes (for feature caches)."""
        path = self.samples[index][0]
        try:
            return content_identity(path)
        except OSError as exc:
            raise DatasetError(f"{path}: cannot read image ({exc.strerror})") from None


UNLABELED = -1
"""The label of an image without one (training data of methods that learn without labels)."""


class UnlabeledImages:
    """Every image under a folder (recursively, sorted), each labelled :data:`UNLABELED`.

    Args:
        root: The folder.
        classnames: The classes of the task the images serve (the method's), for the engine's
            class check; the images carry no label among them.
    """

    def __init__(self, root: str | os.PathLike[str], classnames: list[str]) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: not a folder of unlabelled images")
        self.classnames = list(classnames)
        self.files = sorted(
            p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not self.files:
            raise DatasetError(
                f"{self.root}: holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
            )

    def all_labels(self) -> list[int]:
        return [UNLABELED] * len(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return load_image(self.files[index]), UNLABELED

    def identity(self, index: int) -> str:
        """A digest of the image file's bytes (for feature caches)."""
        path = self.files[index]
        try:
            return content_identity(path)
        except OSError as exc:
            raise DatasetError(f"{path}: cannot read image ({exc.strerror})") from None


def load_folder(root: str | os.PathLike[str]) -> DataSplits:
    """``ROOT/train``, ``ROOT/test`` and optional ``ROOT/val`` image folders."""
    base = Path(root)
    if not (base / "train").is_dir() or not (base / "test").is_dir():
        raise DatasetError(f"{base}: expected {base}/train/<class>/… and {base}/test/<class>/…")
    train = ImageFolder(base / "train")
    test = ImageFolder(base / "test", classnames=train.classnames)
    val = (
        ImageFolder(base / "val", classnames=train.classnames) if (base / "val").is_dir() else None
    )
    return DataSplits(base.name, train, test, val)
