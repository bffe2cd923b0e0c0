"""The anomaly benchmark protocol: per category, fit (k normal shots) or not, score every test
image, and report image AUROC / F1-max, pixel AUROC / F1-max and AUPRO as the papers do.

Few-shot references are ``shots`` normal training images drawn by a generator seeded with
``seed`` and the category (WinCLIP's protocol draws k random normal training images per
category and seed). Maps and masks are compared in the method's input frame
(:class:`~vprompt.anomaly.base.InputFrame`), where the references compute their metrics; the
pixel metrics stream (:class:`~vprompt.anomaly.metrics.PixelMetrics`), so memory does not grow
with the number of test images.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vprompt.anomaly.base import AnomalyMethod
from vprompt.anomaly.datasets import AnomalyCategory
from vprompt.anomaly.images import batch_to_frame
from vprompt.anomaly.metrics import PixelMetrics, f1_max, image_auroc
from vprompt.anomaly.train import load_sample
from vprompt.data.images import DEFAULT_MAX_PIXELS, load_image
from vprompt.errors import ConfigError

METRICS = ("image_auroc", "image_f1_max", "pixel_auroc", "pixel_f1_max", "aupro")
"""Reported metrics, in the column order of the papers' tables."""


@dataclass
class CategoryResult:
    """One category's metrics (fractions in [0, 1]; NaN where undefined)."""

    name: str
    shots: int
    num_test: int
    num_anomalous: int
    image_auroc: float
    image_f1_max: float
    pixel_auroc: float
    pixel_f1_max: float
    aupro: float
    references: list[str] = field(default_factory=list)
    curves: dict[str, Any] = field(default_factory=dict, repr=False)

    def row(self) -> dict[str, Any]:
        """JSON-ready result (no curves)."""
        out = asdict(self)
        out.pop("curves")
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}


def pick_shots(category: AnomalyCategory, shots: int, seed: int) -> list[Path]:
    """``shots`` normal training images of ``category``, drawn with ``seed`` (same seed, same
    images; the category's name enters the seed so categories draw independently)."""
    if shots > len(category.train):
        raise ConfigError(
            f"category {category.name!r} has {len(category.train)} normal training images, "
            f"fewer than --shots {shots}"
        )
    gen = torch.Generator().manual_seed(seed * 7919 + zlib.crc32(category.name.encode()))
    order = torch.randperm(len(category.train), generator=gen)[:shots].tolist()
    return [category.train[i] for i in sorted(order)]


def fit_references(
    method: AnomalyMethod,
    paths: Sequence[Path],
    *,
    batch_size: int = 8,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> None:
    """Fit ``method`` on normal reference image files (read batch by batch)."""
    device = _device(method)
    frame = method.frame

    def batches() -> Any:
        for start in range(0, len(paths), batch_size):
            images = [
                load_image(p, max_pixels=max_pixels) for p in paths[start : start + batch_size]
            ]
            yield batch_to_frame(images, frame).to(device)

    method.fit_normal(batches())


def evaluate_category(
    method: AnomalyMethod,
    category: AnomalyCategory,
    *,
    shots: int = 0,
    seed: int = 0,
    batch_size: int = 8,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    on_maps: Callable[[Sequence[Any], torch.Tensor, torch.Tensor], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> CategoryResult:
    """Metrics of ``method`` on one category.

    Args:
        shots: Normal training images to fit on first (0: zero-shot; the method must allow it).
        on_maps: Called per batch with (samples, image scores B, maps B x S x S): writes outputs.
        on_progress: Called with the number of test images scored in each batch.
    """
    caps = method.capabilities
    if shots and not caps.few_shot:
        raise ConfigError(f"{method.name} is zero-shot: it uses no normal shots (drop --shots)")
    if not shots and not caps.zero_shot and not method.fitted:
        raise ConfigError(f"{method.name} needs normal reference images: pass --shots K (K >= 1)")
    if not category.test:
        raise ConfigError(f"category {category.name!r} has no test images")
    if caps.uses_object_name:
        method.set_object_name(category.name.replace("_", " "))
    refs: list[Path] = []
    if shots:
        refs = pick_shots(category, shots, seed)
        fit_references(method, refs, batch_size=batch_size, max_pixels=max_pixels)
    method.eval()
    device = _device(method)
    pixel = PixelMetrics()
    scores: list[float] = []
    labels: list[int] = []
    samples = list(category.test)
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        loaded = [load_sample(s, method, max_pixels=max_pixels) for s in batch]
        pixels = torch.stack([x for x, _ in loaded]).to(device)
        with torch.no_grad():
            out = method.score(pixels)
        maps = out.maps.float().cpu()
        for s, (_, mask), m in zip(batch, loaded, maps, strict=True):
            pixel.update(m.numpy(), mask.numpy() > 0.5, name=str(s.image))
        scores.extend(float(v) for v in out.image_scores.float().cpu())
        labels.extend(s.label for s in batch)
        if on_maps is not None:
            on_maps(batch, out.image_scores.float().cpu(), maps)
        if on_progress is not None:
            on_progress(len(batch))
    both = len(set(labels)) == 2
    px = pixel.result()
    fpr, tpr = pixel.roc_curve() if px.num_regions else (np.zeros(0), np.zeros(0))
    return CategoryResult(
        name=category.name,
        shots=shots,
        num_test=len(samples),
        num_anomalous=sum(labels),
        image_auroc=image_auroc(scores, labels) if both else math.nan,
        image_f1_max=f1_max(scores, labels) if both else math.nan,
        pixel_auroc=px.pixel_auroc,
        pixel_f1_max=px.pixel_f1_max,
        aupro=px.aupro,
        references=[str(p) for p in refs],
        curves={
            "image": _image_roc(scores, labels) if both else ([], []),
            "pixel": (fpr.tolist(), tpr.tolist()),
        },
    )


def _image_roc(scores: Sequence[float], labels: Sequence[int]) -> tuple[list[float], list[float]]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    distinct = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp = np.cumsum(y)[distinct]
    fp = np.cumsum(1 - y)[distinct]
    tpr = np.r_[0.0, tp / max(1, y.sum())]
    fpr = np.r_[0.0, fp / max(1, (1 - y).sum())]
    return fpr.tolist(), tpr.tolist()


def mean_row(results: Sequence[CategoryResult]) -> dict[str, float]:
    """The mean of each metric over categories (NaN categories left out, as "n/a")."""
    out: dict[str, float] = {}
    for metric in METRICS:
        vals = [getattr(r, metric) for r in results if not math.isnan(getattr(r, metric))]
        out[metric] = float(np.mean(vals)) if vals else math.nan
    return out


def _device(method: AnomalyMethod) -> torch.device:
    return next((p.device for p in method.backbone.parameters()), torch.device("cpu"))


def heatmap_rgb(score_map: np.ndarray, low: float, high: float) -> Image.Image:
    """An H x W map as a colour heat map (a fixed blue → red ramp over [low, high])."""
    t = np.clip((score_map - low) / max(high - low, 1e-12), 0.0, 1.0)
    # jet-like ramp without matplotlib: blue → cyan → yellow → red
    r = np.clip(1.5 - np.abs(4 * t - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * t - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * t - 1), 0, 1)
    return Image.fromarray((np.stack([r, g, b], axis=-1) * 255).round().astype(np.uint8))


def overlay(
    image: Image.Image, score_map: np.ndarray, low: float, high: float, alpha: float = 0.5
) -> Image.Image:
    """``image`` with its heat map blended in (``score_map`` already at the image's size)."""
    heat = heatmap_rgb(score_map, low, high)
    return Image.blend(image.convert("RGB"), heat, alpha)
