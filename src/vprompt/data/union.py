"""Several datasets as one: the training data of methods that learn across datasets.

Dataset ``t``'s class ``c`` becomes label ``offset[t] + c`` and is named ``"NAME: class"``, so
the run's classes are the datasets' classes one after the other and no two names collide. Each
part keeps its own images, order and identities (prefixed with its position, so the feature
cache and seeded views never confuse two datasets' images).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image

from vprompt.data.dataset import ClassificationDataset, DataSplits, labels_of
from vprompt.errors import DatasetError

SEPARATOR = ": "
"""Between a dataset's name and its class name in the run's class names."""


@dataclass(frozen=True)
class UnionPart:
    """One dataset of a :class:`DatasetUnion`: its name, its own classes and where its labels
    and items start in the union."""

    name: str
    classnames: tuple[str, ...]
    offset: int
    start: int
    size: int


class DatasetUnion:
    """The items of several classification datasets one after the other, labels offset.

    Args:
        parts: ``(name, dataset)`` pairs; names must be distinct.
    """

    def __init__(self, parts: Sequence[tuple[str, ClassificationDataset]]) -> None:
        if not parts:
            raise DatasetError("a union of datasets needs at least one dataset")
        names = [name for name, _ in parts]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise DatasetError(f"--data {twice[0]} is given twice; give each dataset once")
        self._data = [data for _, data in parts]
        self.parts: list[UnionPart] = []
        offset = start = 0
        for name, data in parts:
            classes = tuple(data.classnames)
            self.parts.append(UnionPart(name, classes, offset, start, len(data)))
            offset, start = offset + len(classes), start + len(data)
        self.classnames = [f"{p.name}{SEPARATOR}{c}" for p in self.parts for c in p.classnames]
        self._length = start

    def __len__(self) -> int:
        return self._length

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range for {self._length} items")
        for k, part in enumerate(self.parts):
            if index < part.start + part.size:
                return k, index - part.start
        raise IndexError(index)  # unreachable: the parts cover every index

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        k, local = self._locate(index)
        image, label = self._data[k][local]
        return image, label + self.parts[k].offset if label >= 0 else label

    def all_labels(self) -> list[int]:
        """Every item's label, without reading an image."""
        out: list[int] = []
        for part, data in zip(self.parts, self._data, strict=True):
            out += [y + part.offset if y >= 0 else y for y in labels_of(data)]
        return out

    @property
    def identity(self) -> Callable[[int], str]:
        """A stable key per item: the part's position and the item's own key."""
        from vprompt.data.feature_cache import has_identity

        def identify(index: int) -> str:
            k, local = self._locate(index)
            data = self._data[k]
            own = data.identity(local) if has_identity(data) else f"#{local}"  # type: ignore[attr-defined]
            return f"{k}/{own}"

        return identify


def union_splits(named: Sequence[tuple[str, DataSplits]]) -> DataSplits:
    """The splits of several datasets as one run's: train, validation (when every dataset
    has one) and test are unions in the same dataset order."""
    train = DatasetUnion([(name, s.train) for name, s in named])
    test = DatasetUnion([(name, s.test) for name, s in named])
    val = None
    if all(s.val is not None for _, s in named):
        val = DatasetUnion([(name, s.val) for name, s in named if s.val is not None])
    name = " + ".join(name for name, _ in named)
    return DataSplits(name=name, train=train, val=val, test=test)
