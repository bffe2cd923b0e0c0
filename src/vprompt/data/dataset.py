"""The minimal dataset shape the engine trains and evaluates on."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image


@runtime_checkable
class ClassificationDataset(Protocol):
    """Indexable (image, label) pairs with class names in label order.

    Optional extras the engine uses when present: ``identity(index) -> str`` (a key that
    changes with the image, for feature caches), ``all_labels() -> list[int]`` (every label
    without decoding images) and ``pixel_array()`` (every image as one N x H x W or
    N x H x W x 3 uint8 array, or None; see :mod:`vprompt.data.batched`).
    """

    classnames: list[str]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Image.Image, int]: ...


@dataclass(frozen=True)
class DataSplits:
    """Train / optional validation / test splits of one task, sharing class names.

    Model selection (best epoch, hyper-parameters) may only look at ``val``, never ``test``.
    """

    name: str
    train: ClassificationDataset
    test: ClassificationDataset
    val: ClassificationDataset | None = None

    @property
    def classnames(self) -> list[str]:
        return self.train.classnames


def labels_of(data: ClassificationDataset) -> list[int]:
    """Every label in dataset order: ``all_labels()`` when the dataset has it (no image is
    decoded), else by loading each item once."""
    all_labels = getattr(data, "all_labels", None)
    if callable(all_labels):
        return [int(v) for v in all_labels()]
    return [int(data[i][1]) for i in range(len(data))]


class Subset:
    """A view on some indices of a dataset (keeps ``classnames``)."""

    def __init__(self, base: ClassificationDataset, indices: Sequence[int]) -> None:
        self.base = base
        self.indices = list(indices)
        self.classnames = base.classnames

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.base[self.indices[index]]

    @property
    def identity(self) -> Callable[[int], str]:
        """``identity(index)``: the base dataset's image identity (for feature caches).

        Raises:
            AttributeError: The base dataset has none, so ``hasattr(subset, "identity")`` is
                False exactly when ``hasattr(base, "identity")`` is.
        """
        base_identity: Callable[[int], str] = self.base.identity  # type: ignore[attr-defined]
        indices = self.indices
        return lambda index: base_identity(indices[index])

    def all_labels(self) -> list[int]:
        """Every label in order, without decoding images when the base can say them."""
        if hasattr(self.base, "all_labels"):
            labels = self.base.all_labels()
            return [int(labels[i]) for i in self.indices]
        return [int(self.base[i][1]) for i in self.indices]

    def pixel_array(self) -> np.ndarray | None:
        """The base's pixel array at these indices, or None when the base keeps none."""
        from vprompt.data.batched import pixel_array

        pixels = pixel_array(self.base)
        return None if pixels is None else pixels[self.indices]


class TransformedDataset:
    """Applies ``transform`` to each image: what a DataLoader consumes."""

    def __init__(
        self, base: ClassificationDataset, transform: Callable[[Image.Image], Any]
    ) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.base[index]
        return self.transform(image), label


class TorchvisionStyle:
    """A dataset with torchvision's ``classes`` (e.g. ``torchvision.datasets.ImageFolder``,
    built without a ``transform``) seen as a :class:`ClassificationDataset`; items that are
    not PIL images (arrays, image tensors) are converted with
    :func:`~vprompt.data.images.array_to_pil`."""

    def __init__(self, base: Any) -> None:
        self.base = base
        self.classnames = [str(c) for c in base.classes]

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        from vprompt.data.images import open_rgb

        image, label = self.base[index]
        return open_rgb(image), int(label)

    def all_labels(self) -> list[int]:
        targets = getattr(self.base, "targets", None)
        if targets is not None:
            return [int(t) for t in targets]
        return [int(self.base[i][1]) for i in range(len(self.base))]


def as_dataset(data: Any) -> Any:
    """``data`` as vprompt reads datasets: unchanged when it has ``classnames``; wrapped
    (:class:`TorchvisionStyle`) when it has torchvision's ``classes`` instead."""
    if hasattr(data, "classnames") or not hasattr(data, "classes"):
        return data
    return TorchvisionStyle(data)
