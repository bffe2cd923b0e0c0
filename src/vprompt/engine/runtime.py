"""Small pieces fit and evaluate share: devices, autocast, seeding, batch iteration."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vprompt.data.batched import array_batches
from vprompt.data.dataset import ClassificationDataset, TransformedDataset
from vprompt.errors import ConfigError
from vprompt.methods.base import PromptMethod


def epoch_seed(seed: int, epoch: int) -> int:
    """A 32-bit seed derived from (run seed, epoch); stable across runs and processes."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])


def derived_seed(seed: int, stage: str) -> int:
    """A 32-bit seed for a named stage of a run (``setup``, ``finish``), stable across runs and
    processes and unrelated to the epoch seeds."""
    digest = hashlib.sha256(f"{int(seed)}:{stage}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_classes(method: PromptMethod, data: ClassificationDataset, what: str) -> None:
    """Label indices only mean something when both sides list the same classes in order."""
    ours, theirs = list(method.classnames), list(data.classnames)
    if ours != theirs:
        raise ConfigError(
            f"the {what} data's {len(theirs)} classes {theirs[:5]}… do not match the method's "
            f"{len(ours)} classes {ours[:5]}… (same names in the same order are required, "
            "since labels are indices into the class list)"
        )
    if len(data) == 0:
        raise ConfigError(f"the {what} data is empty")


def make_loader(
    data: ClassificationDataset,
    transform: Callable[[Any], Any],
    *,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    generator: torch.Generator | None = None,
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """A loader of (images, labels); shuffled (reproducibly) when ``generator`` is given.

    Datasets held as one pixel array, with a transform that has a batched twin, are served
    whole batches from the array on ``device`` (:mod:`vprompt.data.batched`: same images, same
    order); everything else goes through a ``DataLoader`` with ``num_workers`` workers.
    """
    fast = array_batches(data, transform, batch_size=batch_size, device=device, generator=generator)
    if fast is not None:
        return fast
    return DataLoader(
        cast("Dataset[Any]", TransformedDataset(data, transform)),
        batch_size=batch_size,
        shuffle=generator is not None,
        generator=generator,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
    )


def iterate_batches(
    data: ClassificationDataset,
    transform: Callable[[Any], Any],
    *,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    limit: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches on ``device`` in dataset order; at most ``limit`` images."""
    seen = 0
    loader = make_loader(
        data, transform, batch_size=batch_size, device=device, num_workers=num_workers
    )
    for images, labels in loader:
        if limit is not None:
            if seen >= limit:
                break
            images, labels = images[: limit - seen], labels[: limit - seen]
        seen += len(labels)
        yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def check_labels(
    labels: torch.Tensor, num_classes: int, what: str, *, unlabeled_ok: bool = False
) -> None:
    """Refuse labels that are not indices into the class list (-1, unlabelled, is allowed
    with ``unlabeled_ok``)."""
    low = -1 if unlabeled_ok else 0
    bad = labels[(labels < low) | (labels >= num_classes)]
    if bad.numel():
        raise ConfigError(
            f"the {what} data has label {int(bad[0])}, outside 0..{num_classes - 1} "
            f"for its {num_classes} classes"
        )
