"""Accuracy, loss, per-class accuracy and the confusion matrix of a method on a dataset."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vprompt.data.dataset import ClassificationDataset, as_dataset
from vprompt.data.feature_cache import FeatureCache
from vprompt.engine.features import FeatureSource, FeatureTable, takes_feature_path
from vprompt.engine.runtime import check_classes, check_labels, iterate_batches
from vprompt.methods.base import PromptMethod
from vprompt.utils.precision import autocast_for


@dataclass(frozen=True)
class EvalResult:
    """How well a method classifies one dataset.

    Attributes:
        accuracy: Top-1 accuracy in [0, 1].
        loss: Mean cross-entropy of the logits (auxiliary losses excluded).
        n: Number of images.
        per_class_accuracy: Class name → accuracy on that class's images, in class order; classes
            without images are left out.
        confusion: C x C counts; row = true class, column = predicted class.
    """

    accuracy: float
    loss: float
    n: int
    per_class_accuracy: dict[str, float]
    confusion: list[list[int]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def evaluate(
    method: PromptMethod,
    data: ClassificationDataset,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "evaluate",
    feature_cache: FeatureCache | None = None,
) -> EvalResult:
    """Classify every image of ``data`` with ``method`` (moved to ``device``, in eval mode).

    Images go through ``method.input_transform(False)``; the method's train/eval mode is
    restored afterwards. With ``feature_cache``, a method that uses image features is evaluated
    on cached features of datasets with image identities (see :mod:`vprompt.engine.features`).

    Raises:
        ConfigError: The data is empty, its classes differ from the method's, or a label is out
            of range.
    """
    dev = torch.device(device)
    data = as_dataset(data)  # torchvision-style datasets (``classes``) too
    check_classes(method, data, "evaluation")
    method.to(dev)
    if takes_feature_path(method, data, feature_cache):
        assert feature_cache is not None
        source = FeatureSource(
            method,
            data,
            feature_cache,
            device=dev,
            batch_size=batch_size,
            num_workers=num_workers,
            progress=progress,
        )
        return evaluate_table(
            method, source.table(), batch_size=batch_size, device=dev, progress=progress, desc=desc
        )
    if method.max_eval_batch is not None:  # e.g. test-time methods: many views per image
        batch_size = max(1, min(batch_size, method.max_eval_batch))
    batches = iterate_batches(
        data,
        method.input_transform(False),
        batch_size=batch_size,
        device=dev,
        num_workers=num_workers,
    )
    return _score(method, method, batches, len(data), device=dev, progress=progress, desc=desc)


@torch.no_grad()
def evaluate_table(
    method: PromptMethod,
    table: FeatureTable,
    *,
    batch_size: int = 256,
    device: torch.device,
    progress: bool = True,
    desc: str = "evaluate",
) -> EvalResult:
    """:func:`evaluate` on already computed features (``method.forward_features``)."""
    batches = table.batches(batch_size)
    return _score(
        method,
        method.forward_features,
        batches,
        len(table),
        device=device,
        progress=progress,
        desc=desc,
    )


def _score(
    method: PromptMethod,
    forward: Callable[[torch.Tensor], Any],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    total: int,
    *,
    device: torch.device,
    progress: bool,
    desc: str,
) -> EvalResult:
    num_classes = len(method.classnames)
    was_training = method.training
    method.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    loss_sum = 0.0
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False)
    try:
        for inputs, labels in batches:
            check_labels(labels, num_classes, "evaluation")
            with autocast_for(device):
                logits = forward(inputs).logits
            logits = logits.float()  # B x C
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            pred = logits.argmax(dim=1)
            flat = (labels * num_classes + pred).cpu()
            confusion += torch.bincount(flat, minlength=num_classes**2).view_as(confusion)
            bar.update(len(labels))
    finally:
        bar.close()
        method.train(was_training)
    n = int(confusion.sum())
    correct = confusion.diagonal()
    totals = confusion.sum(dim=1)
    per_class = {
        name: float(correct[i]) / float(totals[i])
        for i, name in enumerate(method.classnames)
        if totals[i] > 0
    }
    return EvalResult(
        accuracy=float(correct.sum()) / n,
        loss=loss_sum / n,
        n=n,
        per_class_accuracy=per_class,
        confusion=confusion.tolist(),
    )
