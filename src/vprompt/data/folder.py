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


TEST_SHARE = 0.2
"""Share of each class's images a plain ``ROOT/<class>/…`` folder gives the test split."""


class FolderSplitNotice(UserWarning):
    """A plain class folder was split into train and test (said once per load)."""


def split_plain_folder(base: Path) -> DataSplits:
    """``ROOT/<class>/…`` without split folders: each class's images, in a seeded shuffle of
    their sorted paths, go 80% to train and 20% to test (at least one to each when a class has
    two or more; a class of one image trains only). The same every run."""
    import random
    import warnings

    from vprompt.data.dataset import Subset

    everything = ImageFolder(base)
    by_class: dict[int, list[int]] = {}
    for index, (_, label) in enumerate(everything.samples):
        by_class.setdefault(label, []).append(index)
    rng = random.Random(0)
    train: list[int] = []
    test: list[int] = []
    for label in sorted(by_class):
        indices = list(by_class[label])
        rng.shuffle(indices)
        n_test = 0 if len(indices) < 2 else max(1, round(TEST_SHARE * len(indices)))
        test += indices[:n_test]
        train += indices[n_test:]
    if not test:
        raise DatasetError(
            f"{base}: every class has a single image, so nothing is left to test on; add "
            f"images or make {base}/train/<class>/… and {base}/test/<class>/…"
        )
    warnings.warn(
        FolderSplitNotice(
            f"{base} has no train/ and test/ folders: split each class's images "
            f"{100 - 100 * TEST_SHARE:.0f}/{100 * TEST_SHARE:.0f} into train ({len(train)}) "
            f"and test ({len(test)}), the same every run; make {base}/train and {base}/test "
            "to choose"
        ),
        stacklevel=3,
    )
    return DataSplits(
        base.name, Subset(everything, sorted(train)), Subset(everything, sorted(test))
    )


def load_folder(root: str | os.PathLike[str]) -> DataSplits:
    """``ROOT/train``, ``ROOT/test`` and optional ``ROOT/val`` image folders, or a plain
    ``ROOT/<class>/…`` folder split by :func:`split_plain_folder`."""
    base = Path(root)
    has_splits = (base / "train").is_dir() or (base / "test").is_dir()
    if not has_splits and base.is_dir():
        return split_plain_folder(base)
    if not (base / "train").is_dir() or not (base / "test").is_dir():
        raise DatasetError(f"{base}: expected {base}/train/<class>/… and {base}/test/<class>/…")
    train = ImageFolder(base / "train")
    test = ImageFolder(base / "test", classnames=train.classnames)
    val = (
        ImageFolder(base / "val", classnames=train.classnames) if (base / "val").is_dir() else None
    )
    return DataSplits(base.name, train, test, val)
