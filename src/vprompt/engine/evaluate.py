"""Accuracy, loss, per-class accuracy and the confusion matrix of a method on a dataset."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vprompt.data.dataset import ClassificationDataset
from vprompt.engine.runtime import autocast_for, check_classes, check_labels, iterate_batches


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
    method: Any,
    data: ClassificationDataset,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "evaluate",
) -> EvalResult:
    """Classify every image of ``data`` with ``method`` (moved to ``device``, in eval mode).

    Images go through ``method.input_transform(False)``; the method's train/eval mode is
    restored afterwards.

    Raises:
        ConfigError: The data is empty, its classes differ from the method's, or a label is out
            of range.
    """
    dev = torch.device(device)
    check_classes(method, data, "evaluation")
    num_classes = len(method.classnames)
    method.to(dev)
    was_training = bool(getattr(method, "training", False))
    method.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    loss_sum = 0.0
    bar = tqdm(total=len(data), desc=desc, unit="img", disable=not progress, leave=False)
    try:
        batches = iterate_batches(
            data,
            method.input_transform(False),
            batch_size=batch_size,
            device=dev,
            num_workers=num_workers,
        )
        for images, labels in batches:
            check_labels(labels, num_classes, "evaluation")
            with autocast_for(dev):
                logits = method(images).logits
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
