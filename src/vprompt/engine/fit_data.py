"""The data a method's lifecycle hooks see during :func:`~vprompt.engine.fit.fit`.

:class:`FitData` implements :class:`vprompt.methods.base.MethodData`: the training set (plain
or one augmented view) and the validation set, as batches on the training device, in dataset
order. ``image-features`` methods get features: from the feature cache when the run has one,
else encoded on the fly with the method's ``encode_images``; other methods get pixels.

Augmented view ``v`` of image ``i`` is drawn with the training transform under
``view_seed(seed, v, identity of i)`` (the image's index when the dataset has no identities),
exactly as the feature cache draws it, so a run sees the same views with or without a cache.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vprompt.data.dataset import ClassificationDataset, Subset
from vprompt.data.feature_cache import SeededImages, has_identity, view_seed
from vprompt.data.union import DatasetUnion
from vprompt.engine.features import (
    FeatureSource,
    augmented_views,
    dataset_labels,
    encoded_batches,
)
from vprompt.engine.runtime import iterate_batches, make_loader
from vprompt.errors import ConfigError
from vprompt.methods.base import Batch, DataTask, PromptMethod


class FitData:
    """Training and validation batches for ``setup`` / ``before_epoch`` / ``finish``.

    Args:
        method: The method being fitted.
        train: Training set.
        val: Validation set, if any.
        train_source / val_source: Their cached features (``image-features`` methods on the
            feature path), or None.
        batch_size: Images per batch.
        device: Where batches go.
        num_workers: Data-loading workers.
        view_seed: Seed of the augmented views (the feature cache's, 0 without one).
        progress: Show a progress bar (stderr) while a hook reads images from disk, so a
            set-up that reads tens of thousands of images (a frequency label mapping) is not
            a silent wait.
    """

    def __init__(
        self,
        method: PromptMethod,
        train: ClassificationDataset,
        val: ClassificationDataset | None,
        *,
        train_source: FeatureSource | None,
        val_source: FeatureSource | None,
        batch_size: int,
        device: torch.device,
        num_workers: int = 0,
        view_seed: int = 0,
        progress: bool = False,
    ) -> None:
        self.method, self._train, self._val = method, train, val
        self.progress = progress
        self._sources = {"train": train_source, "val": val_source}
        self.batch_size, self.device = batch_size, device
        self.num_workers, self.view_seed = num_workers, view_seed
        self._features = method.capabilities.inputs == "image-features"

    @property
    def views(self) -> int:
        return augmented_views(self.method)

    @property
    def has_val(self) -> bool:
        return self._val is not None

    @property
    def tasks(self) -> tuple[DataTask, ...]:
        data = self._train
        if isinstance(data, DatasetUnion):
            return tuple(DataTask(p.name, p.classnames, p.offset, p.size) for p in data.parts)
        return (DataTask("data", tuple(self.method.classnames), 0, len(data)),)

    def _task_data(self, task: int | None) -> ClassificationDataset:
        if task is None:
            return self._train
        tasks = self.tasks
        if not 0 <= task < len(tasks):
            raise ConfigError(
                f"{self.method.name} asked for dataset {task}; this run has {len(tasks)}"
            )
        if len(tasks) == 1:
            return self._train
        part = cast(DatasetUnion, self._train).parts[task]
        return Subset(self._train, range(part.start, part.start + part.size))

    def train(self, view: int | None = None, *, task: int | None = None) -> Iterator[Batch]:
        if view is not None and not 0 <= view < max(self.views, 1):
            raise ConfigError(
                f"{self.method.name} asked for augmented view {view}; this run offers "
                f"{self.views} (feature_views, with augmentation)"
            )
        if view is not None and self.views == 0:
            view = None  # the training transform does not augment: every view is the plain one
        data = self._task_data(task)
        source = self._sources["train"]
        if source is not None and data is not self._train:
            raise ConfigError(f"{self.method.name}: one dataset's features are not cached apart")
        return self._batches(data, source, view)

    def shuffled(
        self, generator: torch.Generator, *, task: int | None = None, batch_size: int | None = None
    ) -> Iterator[Batch]:
        if self._features:
            raise ConfigError(f"{self.method.name} takes features: shuffled() serves images")
        loader = make_loader(
            self._task_data(task),
            self.method.input_transform(True),
            batch_size=batch_size or self.batch_size,
            device=self.device,
            num_workers=self.num_workers,
            generator=generator,
        )
        for images, labels in loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device)

    def val(self) -> Iterator[Batch]:
        if self._val is None:
            raise ConfigError(f"{self.method.name} needs validation data, and this run has none")
        return self._batches(self._val, self._sources["val"], None)

    def _batches(
        self, data: ClassificationDataset, source: FeatureSource | None, view: int | None
    ) -> Iterator[Batch]:
        if source is not None:
            return source.table(view).batches(self.batch_size)
        return self._shown(self._image_batches(data, view), len(data), view)

    def _shown(self, batches: Iterator[Batch], total: int, view: int | None) -> Iterator[Batch]:
        """``batches`` with a progress bar over their images (when ``progress``)."""
        if not self.progress:
            yield from batches
            return
        what = "plain view" if view is None else f"view {view}"
        with tqdm(total=total, unit="img", desc=f"{self.method.name}: reading images ({what})",
                  leave=False, file=sys.stderr) as bar:  # fmt: skip
            for batch in batches:
                yield batch
                bar.update(len(batch[1]))

    def _image_batches(self, data: ClassificationDataset, view: int | None) -> Iterator[Batch]:
        if view is None:
            batches: Iterator[Batch] = iterate_batches(
                data,
                self.method.input_transform(False),
                batch_size=self.batch_size,
                device=self.device,
                num_workers=self.num_workers,
            )
        else:
            batches = self._view_batches(data, view)
        return encoded_batches(self.method, batches) if self._features else batches

    def _view_batches(self, data: ClassificationDataset, view: int) -> Iterator[Batch]:
        """Augmented view ``view`` of ``data``, one seed per image (as the feature cache)."""
        identify = cast(Any, data).identity if has_identity(data) else (lambda i: f"#{i}")
        seeds = [view_seed(self.view_seed, view, identify(i)) for i in range(len(data))]
        images = SeededImages(
            data, list(range(len(data))), self.method.input_transform(True), seeds
        )
        loader = DataLoader(
            cast("Dataset[Any]", images),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            generator=torch.Generator(),  # its seed draw must not move the global generator
        )
        labels = dataset_labels(data)
        start = 0
        for pixels in loader:
            stop = start + len(pixels)
            yield pixels.to(self.device), labels[start:stop].to(self.device)
            start = stop
