"""Training and evaluating on cached image features (DESIGN.md: never recompute what is frozen).

The engine takes the feature path for a dataset exactly when

1. the method declares ``capabilities.inputs == "image-features"``,
2. a :class:`~vprompt.data.feature_cache.FeatureCache` is given, and
3. the dataset exposes ``identity(index)``;

otherwise it feeds pixels as usual. It never asks which method it runs.

Training views: when the method's training transform differs from its evaluation transform
(random augmentation), ``feature_views`` = N augmented views of every training image are
encoded once and cached; epoch e trains on view ``e % N``. When both transforms are the same,
all views would be equal, so the evaluation view is cached once and used every epoch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vprompt.data.dataset import ClassificationDataset, labels_of
from vprompt.data.feature_cache import (
    FeatureCache,
    FeatureKey,
    describe_transform,
    has_identity,
    identities_of,
)
from vprompt.methods.base import PromptMethod
from vprompt.utils.precision import autocast_for, precision_tag


def takes_feature_path(method: PromptMethod, data: Any, cache: FeatureCache | None) -> bool:
    """Whether ``data`` is fed to ``method`` as cached features (see the module docstring)."""
    features = method.capabilities.inputs == "image-features"
    return cache is not None and features and has_identity(data)


def augmented_views(method: PromptMethod) -> int:
    """How many augmented training views to cache: 0 when training does not augment."""
    train_tf = describe_transform(method.input_transform(True))
    if train_tf == describe_transform(method.input_transform(False)):
        return 0
    return method.feature_views


def view_for_epoch(method: PromptMethod, epoch: int) -> int | None:
    """The cached training view epoch ``epoch`` uses (``None``: the evaluation view)."""
    views = augmented_views(method)
    return None if views == 0 else epoch % views


def dataset_labels(data: ClassificationDataset) -> torch.Tensor:
    """N labels in dataset order (see :func:`vprompt.data.dataset.labels_of`)."""
    return torch.as_tensor(np.asarray(labels_of(data), dtype=np.int64))


@dataclass(frozen=True)
class FeatureTable:
    """One view of a dataset's features, ready to batch.

    Attributes:
        features: N x D features on the training / evaluation device.
        labels: N labels on the same device.
    """

    features: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def batches(
        self, batch_size: int, *, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(B x D features, B labels) in order, or shuffled with ``generator`` exactly as the
        image path's DataLoader shuffles with it (same batches of the same indices)."""
        order: DataLoader[Any] = DataLoader(
            cast("Dataset[Any]", range(len(self))),
            batch_size=batch_size,
            shuffle=generator is not None,
            generator=generator,
        )
        for index in order:
            index = index.to(self.features.device)
            yield self.features[index], self.labels[index]


class FeatureSource:
    """A dataset's features for one method: identities, labels and weight hash read once, each
    view computed (only where missing) or loaded from the cache when asked for.

    Constructing one is cheap; nothing is read before the first :meth:`table` / :meth:`prepare`.
    """

    def __init__(
        self,
        method: PromptMethod,
        data: Any,
        cache: FeatureCache,
        *,
        device: torch.device,
        batch_size: int,
        num_workers: int = 0,
        progress: bool = True,
    ) -> None:
        self.method, self.data, self.cache = method, data, cache
        self.device, self.batch_size = device, batch_size
        self.num_workers, self.progress = num_workers, progress
        self._identities: list[str] | None = None
        self._labels: torch.Tensor | None = None
        self._base_key: FeatureKey | None = None
        self._last: tuple[int | None, FeatureTable] | None = None

    def prepare(self, views: Iterable[int | None]) -> None:
        """Make sure ``views`` are cached (encoding missing rows now, not mid-training)."""
        for view in dict.fromkeys(views):
            self._compute(view, load=False)

    def table(self, view: int | None = None) -> FeatureTable:
        """The features of ``view`` (``None``: evaluation view); the last one is kept in memory."""
        if self._last is not None and self._last[0] == view:
            return self._last[1]
        features = self._compute(view, load=True)
        assert features is not None
        if self._labels is None:
            self._labels = dataset_labels(self.data)
        table = FeatureTable(features.to(self.device), self._labels.to(self.device))
        self._last = (view, table)
        return table

    def _compute(self, view: int | None, *, load: bool) -> torch.Tensor | None:
        method = self.method
        transform = method.input_transform(view is not None)
        if self._base_key is None:
            self._base_key = FeatureKey.create(
                kind=str(method.feature_kind),
                backbone=method.backbone,
                transform=transform,
                compute=precision_tag(self.device),
            )
        key = dataclasses.replace(
            self._base_key,
            preprocessing=describe_transform(transform),
            view=view,
            view_seed=self.cache.view_seed if view is not None else 0,
        )
        if self._identities is None:
            self._identities = identities_of(self.data)
        was_training = method.training
        method.eval()

        def encode(pixels: torch.Tensor) -> torch.Tensor:
            with autocast_for(self.device):
                return method.encode_images(pixels)

        try:
            args: dict[str, Any] = {
                "transform": transform,
                "key": key,
                "identities": self._identities,
                "batch_size": self.batch_size,
                "device": self.device,
                "num_workers": self.num_workers,
                "progress": self.progress,
            }
            if not load:
                self.cache.ensure(self.data, encode, **args)
                return None
            return self.cache.features(self.data, encode, **args)
        finally:
            method.train(was_training)


def encoded_batches(
    method: PromptMethod, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(pixels, labels) batches → (``method.encode_images`` features, labels) batches."""
    for images, labels in batches:
        with torch.no_grad():
            yield method.encode_images(images), labels
