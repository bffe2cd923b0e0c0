"""Learning a watermark key: a universal L∞-bounded perturbation and a detector head.

The key is a perturbation δ = eps · tanh(w) (3 x H x W at the frozen model's input size; the
tanh parametrisation keeps |δ| ≤ eps without projection, as in Carlini & Wagner 2017) and a
small head on the frozen model's standardised pooled features. Both are trained jointly, as
the encoder and decoder of HiDDeN (Zhu et al. 2018) are, except that the "encoder" is a single
universal pattern (a universal perturbation, Moosavi-Dezfooli et al. 2017) and the decoder's
feature extractor is the frozen backbone. Each step takes B clean training images x and their
marked copies clip(x + δ), sends all 2B through the random robustness channel
(:mod:`vprompt.watermark.channel`: differentiable JPEG, resize, noise, 8-bit rounding) and
minimises the binary cross-entropy of the head's logit (clean 0, marked 1) with Adam.

Only w and the head have ``requires_grad``; the backbone is never updated. Every random draw
(the start of w and the head, the data order, the channel) comes from seeded CPU generators,
so a seed gives the same key bit for bit on the CPU.

After training, the decision threshold is the (1 - target_fpr) quantile of the logits of the
clean training images, so at most ``target_fpr`` of them are called watermarked; the test
split is never looked at.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vprompt.data.dataset import ClassificationDataset
from vprompt.errors import ConfigError, DatasetError
from vprompt.watermark.channel import ChannelConfig, robustness_channel
from vprompt.watermark.detector import KeyDetector, pixel_reader
from vprompt.watermark.key_file import MAX_HIDDEN

STATS_IMAGES = 256


@dataclass(frozen=True)
class WatermarkTrainConfig:
    """How a watermark key is learned.

    Attributes:
        eps: L∞ bound of δ in [0, 1] pixel units (4/255 is invisible to most people).
        hidden: Hidden width of the head; 0 for a linear head.
        epochs: Passes over the training images.
        batch_size: Clean images per step (each also marked, so 2x through the model).
        lr_delta: Adam step size for w (δ = eps · tanh(w)).
        lr_head: Adam step size for the head.
        target_fpr: False-positive rate on clean training images the threshold is set for.
        seed: Seeds the start of w and the head, the data order and the channel.
        channel: The robustness channel.
    """

    eps: float = 4 / 255
    hidden: int = 64
    epochs: int = 5
    batch_size: int = 32
    lr_delta: float = 0.05
    lr_head: float = 1e-2
    target_fpr: float = 0.01
    seed: int = 0
    channel: ChannelConfig = field(default_factory=ChannelConfig)

    def __post_init__(self) -> None:
        if not _real(self.eps) or not 0 < self.eps <= 0.25:
            raise ConfigError(f"eps must be in (0, 0.25] (e.g. 4/255), got {self.eps!r}")
        for name, low, high in (
            ("hidden", 0, MAX_HIDDEN),
            ("epochs", 1, 10**6),
            ("batch_size", 1, 10**6),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        for name in ("lr_delta", "lr_head"):
            value = getattr(self, name)
            if not _real(value) or value <= 0:
                raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
        if not _real(self.target_fpr) or not 0 <= self.target_fpr < 1:
            raise ConfigError(f"target_fpr must be in [0, 1), got {self.target_fpr!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")

    def describe(self) -> dict[str, Any]:
        """The settings as JSON-ready values (for the key file)."""
        return {
            "eps": self.eps,
            "hidden": self.hidden,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr_delta": self.lr_delta,
            "lr_head": self.lr_head,
            "target_fpr": self.target_fpr,
            "seed": self.seed,
            "channel": {
                "jpeg_prob": self.channel.jpeg_prob,
                "jpeg_quality": list(self.channel.jpeg_quality),
                "resize_prob": self.channel.resize_prob,
                "resize_scale": list(self.channel.resize_scale),
                "noise_std": self.channel.noise_std,
            },
        }


def _real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def parse_eps(text: str) -> float:
    """``"4/255"`` or ``"0.0157"`` → a float; a :class:`ConfigError` naming the text otherwise."""
    raw = text.strip()
    try:
        if "/" in raw:
            num, _, den = raw.partition("/")
            value = float(num) / float(den)
        else:
            value = float(raw)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(
            f"--eps {text!r}: expected a number or a fraction such as 4/255"
        ) from None
    if not math.isfinite(value) or not 0 < value <= 0.25:
        raise ConfigError(f"--eps {text!r}: must be in (0, 0.25] pixel units (e.g. 4/255)")
    return value


@dataclass
class TrainedKey:
    """δ (3 x H x W, CPU), the trained detector, the threshold logit and per-epoch metrics."""

    delta: torch.Tensor
    detector: KeyDetector
    threshold: float
    history: list[dict[str, float]]
    train_metrics: dict[str, float]


def _batches(
    data: ClassificationDataset,
    reader: Any,
    batch_size: int,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> Any:
    from vprompt.attack.universal import iter_batches

    return iter_batches(data, reader, batch_size=batch_size, device=device, generator=generator)


@torch.no_grad()
def _feature_stats(
    detector: KeyDetector, data: ClassificationDataset, reader: Any, batch_size: int
) -> None:
    """Set the standardisation to the mean / std of the first clean training images."""
    device = detector.mean.device
    feats, seen = [], 0
    for images, _ in _batches(data, reader, batch_size, device):
        feats.append(detector.raw_features(images).cpu())
        seen += len(images)
        if seen >= STATS_IMAGES:
            break
    z = torch.cat(feats)[:STATS_IMAGES]
    detector.feature_mean.copy_(z.mean(0))
    std = z.std(0, unbiased=False) if len(z) > 1 else torch.ones(z.shape[1])
    detector.feature_std.copy_(std.clamp_min(1e-4))


def _init_head(detector: KeyDetector, generator: torch.Generator) -> None:
    """PyTorch's default Linear init, drawn from ``generator`` instead of the global RNG."""
    with torch.no_grad():
        for layer in detector.head:
            if isinstance(layer, torch.nn.Linear):
                bound = 1 / math.sqrt(layer.in_features)
                layer.weight.copy_(torch.rand(layer.weight.shape, generator=generator) * 2 - 1)
                layer.weight.mul_(bound)
                layer.bias.copy_(
                    (torch.rand(layer.bias.shape, generator=generator) * 2 - 1) * bound
                )


def threshold_for(clean_logits: torch.Tensor, target_fpr: float) -> float:
    """The smallest logit t with at most ``target_fpr`` of ``clean_logits`` above t."""
    ranked = torch.sort(clean_logits.double(), descending=True).values
    allowed = math.floor(target_fpr * len(ranked) + 1e-9)
    return float(ranked[min(allowed, len(ranked) - 1)])


def train_key(
    detector: KeyDetector,
    train: ClassificationDataset,
    config: WatermarkTrainConfig,
    *,
    progress: bool | None = None,
    on_step: Callable[[torch.Tensor, KeyDetector], None] | None = None,
) -> TrainedKey:
    """Learn δ and the head of ``detector`` (its features stay frozen) on ``train``.

    Args:
        on_step: Called after each step's backward pass with (w, detector), before the update
            (tests use it to check where gradients go).
    """
    if len(train) == 0:
        raise DatasetError("the training split is empty: a watermark key needs images")
    device = detector.mean.device
    h, w_side = detector.size
    reader = pixel_reader(detector.size)
    init = torch.Generator().manual_seed(config.seed)
    order = torch.Generator().manual_seed(config.seed + 1)
    noise = torch.Generator().manual_seed(config.seed + 2)
    _feature_stats(detector, train, reader, config.batch_size)
    _init_head(detector, init)
    w = (0.5 * torch.randn(3, h, w_side, generator=init)).to(device).requires_grad_(True)
    for p in detector.features.parameters():
        p.requires_grad_(False)
    head_params = list(detector.head.parameters())
    adam = torch.optim.Adam(
        [{"params": [w], "lr": config.lr_delta}, {"params": head_params, "lr": config.lr_head}]
    )
    steps = -(-len(train) // config.batch_size)
    bar = tqdm(
        total=config.epochs * steps,
        desc="watermark",
        unit="step",
        leave=False,
        disable=True if progress is False else None,
    )
    history: list[dict[str, float]] = []
    detector.head.train()
    for epoch in range(config.epochs):
        total, correct, seen = 0.0, 0, 0
        for images, _ in _batches(train, reader, config.batch_size, device, order):
            delta = config.eps * torch.tanh(w)
            marked = (images + delta).clamp(0, 1)
            both = robustness_channel(torch.cat([images, marked]), config.channel, noise)
            target = torch.cat([torch.zeros(len(images)), torch.ones(len(images))]).to(device)
            logits = detector(both)
            loss = F.binary_cross_entropy_with_logits(logits, target)
            adam.zero_grad(set_to_none=True)
            loss.backward()
            if on_step is not None:
                on_step(w, detector)
            adam.step()
            total += float(loss.detach()) * len(both)
            correct += int(((logits.detach() > 0).float() == target).sum())
            seen += len(both)
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        history.append(
            {"epoch": float(epoch + 1), "loss": total / seen, "train_acc": correct / seen}
        )
    bar.close()
    detector.eval()
    delta = (config.eps * torch.tanh(w)).detach().cpu().clamp(-config.eps, config.eps)
    clean, marked_logits = training_logits(detector, train, delta, config.batch_size)
    threshold = threshold_for(clean, config.target_fpr)
    metrics = {
        "train_fpr": float((clean > threshold).float().mean()),
        "train_tpr": float((marked_logits > threshold).float().mean()),
        "train_images": float(len(train)),
    }
    return TrainedKey(
        delta=delta, detector=detector, threshold=threshold, history=history, train_metrics=metrics
    )


@torch.no_grad()
def training_logits(
    detector: KeyDetector, data: ClassificationDataset, delta: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the clean and of the marked (8-bit) images of ``data``, in dataset order."""
    from vprompt.watermark.detector import embed_pixels

    device = detector.mean.device
    reader = pixel_reader(detector.size)
    clean, marked = [], []
    for images, _ in _batches(data, reader, batch_size, device):
        clean.append(detector(images).cpu())
        marked.append(detector(embed_pixels(images, delta)).cpu())
    return torch.cat(clean), torch.cat(marked)
