"""Detection rate, false positives and survival of a watermark key on the TEST split.

Each test image is read as the detector reads it (squashed to the model's H x W, 8-bit), and
marked as ``vprompt watermark embed`` marks an image of that size (δ added, clipped, rounded
to 8 bits). Clean and marked copies then go through each *real* distortion — PIL JPEG
re-encoding at several qualities, PIL bilinear resizing down by a factor and back — and the
detector scores both. Per distortion: the detection rate (true-positive rate at the key's
threshold) on marked images, the false-positive rate on clean ones, and the AUROC (the
Mann-Whitney probability that a marked image scores above a clean one, ties counting half).
PSNR compares marked and clean pixels before any distortion.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vprompt.data.dataset import ClassificationDataset
from vprompt.errors import ConfigError, DatasetError
from vprompt.utils import jsonio
from vprompt.utils.io import atomic_path
from vprompt.watermark.detector import KeyDetector, embed_pixels, pixel_reader, to_pil, to_tensor


@dataclass(frozen=True)
class EvalConfig:
    """Which real distortions the evaluation applies.

    Attributes:
        jpeg_qualities: PIL JPEG qualities to re-encode at.
        resize_scales: Factors to resize down by (bilinear) and back up.
        batch_size: Images scored at once.
    """

    jpeg_qualities: tuple[int, ...] = (90, 75, 50)
    resize_scales: tuple[float, ...] = (0.5,)
    batch_size: int = 32

    def __post_init__(self) -> None:
        if not all(
            isinstance(q, int) and not isinstance(q, bool) and 1 <= q <= 100
            for q in self.jpeg_qualities
        ):
            raise ConfigError(
                f"jpeg_qualities must be integers in [1, 100], got {self.jpeg_qualities!r}"
            )
        if not all(
            isinstance(s, int | float) and not isinstance(s, bool) and 0.05 <= s <= 1
            for s in self.resize_scales
        ):
            raise ConfigError(f"resize_scales must be in [0.05, 1], got {self.resize_scales!r}")
        if (
            isinstance(self.batch_size, bool)
            or not isinstance(self.batch_size, int)
            or self.batch_size < 1
        ):
            raise ConfigError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")

    def conditions(self) -> list[str]:
        """Condition names in report order: ``none``, ``jpeg-Q`` …, ``resize-S`` …."""
        return [
            "none",
            *(f"jpeg-{q}" for q in self.jpeg_qualities),
            *(f"resize-{s:g}" for s in self.resize_scales),
        ]


@dataclass
class WatermarkReport:
    """Per condition: ``tpr``, ``fpr``, ``auroc``, ``mean_prob_marked``, ``mean_prob_clean``."""

    rows: dict[str, dict[str, float]]
    psnr: float
    images: int
    threshold: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return jsonio.finite(
            {
                "split": "test",
                "images": self.images,
                "psnr_db": self.psnr,
                "threshold_logit": self.threshold,
                "threshold_prob": _sigmoid(self.threshold),
                "conditions": self.rows,
                **self.extra,
            }
        )


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x > -700 else 0.0


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(score of a positive > score of a negative) + ½ P(tie), exactly (chunked pairs)."""
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    pos, neg = positive.double(), negative.double()
    total = 0.0
    for i in range(0, len(pos), 1024):
        chunk = pos[i : i + 1024, None]
        total += float((chunk > neg[None]).sum()) + 0.5 * float((chunk == neg[None]).sum())
    return total / (len(pos) * len(neg))


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of B x 3 x H x W images in [0, 1] (inf when identical)."""
    mse = (a - b).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse)


def jpeg(pixels: torch.Tensor, quality: int) -> torch.Tensor:
    """B x 3 x H x W → PIL JPEG (default 4:2:0) encode and decode of each image."""
    from PIL import Image

    out = []
    for image in pixels:
        buf = io.BytesIO()
        to_pil(image).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as decoded:
            out.append(to_tensor(decoded))
    return torch.stack(out).to(pixels.device)


def resize_back(pixels: torch.Tensor, scale: float) -> torch.Tensor:
    """B x 3 x H x W → PIL bilinear resize to ``scale`` of the size and back, 8-bit each way."""
    from PIL import Image

    out = []
    for image in pixels:
        pil = to_pil(image)
        w, h = pil.size
        small = pil.resize(
            (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR
        )
        out.append(to_tensor(small.resize((w, h), Image.Resampling.BILINEAR)))
    return torch.stack(out).to(pixels.device)


def distort(pixels: torch.Tensor, condition: str) -> torch.Tensor:
    """Apply one named condition (``none``, ``jpeg-Q``, ``resize-S``)."""
    kind, _, arg = condition.partition("-")
    if kind == "none":
        return pixels
    if kind == "jpeg":
        return jpeg(pixels, int(arg))
    return resize_back(pixels, float(arg))


@torch.no_grad()
def evaluate_key(
    detector: KeyDetector,
    delta: torch.Tensor,
    threshold: float,
    test: ClassificationDataset,
    config: EvalConfig,
    *,
    progress: bool | None = None,
) -> WatermarkReport:
    """Score clean and marked test images under every condition of ``config``."""
    from vprompt.attack.universal import iter_batches

    if len(test) == 0:
        raise DatasetError("the test split is empty: nothing to evaluate the watermark on")
    device = detector.mean.device
    names = config.conditions()
    clean: dict[str, list[torch.Tensor]] = {c: [] for c in names}
    marked: dict[str, list[torch.Tensor]] = {c: [] for c in names}
    psnrs: list[torch.Tensor] = []
    reader = pixel_reader(detector.size)
    bar = tqdm(total=len(test), desc="watermark eval", unit="img", leave=False,
               disable=True if progress is False else None)  # fmt: skip
    for images, _ in iter_batches(test, reader, batch_size=config.batch_size, device=device):
        images = (images.clamp(0, 1) * 255).round() / 255
        marks = embed_pixels(images, delta)
        psnrs.append(psnr(marks, images).cpu())
        for condition in names:
            clean[condition].append(detector(distort(images, condition)).cpu())
            marked[condition].append(detector(distort(marks, condition)).cpu())
        bar.update(len(images))
    bar.close()
    rows = {}
    for condition in names:
        neg, pos = torch.cat(clean[condition]), torch.cat(marked[condition])
        rows[condition] = {
            "tpr": float((pos > threshold).float().mean()),
            "fpr": float((neg > threshold).float().mean()),
            "auroc": auroc(pos, neg),
            "mean_prob_marked": float(torch.sigmoid(pos).mean()),
            "mean_prob_clean": float(torch.sigmoid(neg).mean()),
        }
    values = torch.cat(psnrs)
    finite = values[torch.isfinite(values)]
    mean_psnr = float(finite.mean()) if len(finite) else float("inf")
    return WatermarkReport(rows=rows, psnr=mean_psnr, images=len(test), threshold=threshold)


def markdown_table(report: WatermarkReport) -> str:
    """The report as a markdown table, one row per condition."""
    lines = [
        f"Watermark detection on {report.images} test images (PSNR {report.psnr:.2f} dB, "
        f"threshold p > {_sigmoid(report.threshold):.4f})",
        "",
        "| condition | detection rate (TPR) | false positives (FPR) | AUROC |",
        "|---|---:|---:|---:|",
    ]
    for name, row in report.rows.items():
        lines.append(
            f"| {name} | {100 * row['tpr']:.1f}% | {100 * row['fpr']:.1f}% | {row['auroc']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def write_report(report: WatermarkReport, out_dir: str | Path, extra: dict[str, Any]) -> list[Path]:
    """OUT/watermark.json, OUT/watermark.md and OUT/watermark.png (when matplotlib is there)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (
        (
            "watermark.json",
            jsonio.dumps({**extra, **report.to_json()}, indent=1, ensure_ascii=False) + "\n",
        ),
        ("watermark.md", markdown_table(report)),
    ):
        with atomic_path(out / name) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
        written.append(out / name)
    plot = plot_report(report, out / "watermark.png")
    if plot is not None:
        written.append(plot)
    return written


def plot_report(report: WatermarkReport, path: Path) -> Path | None:
    """TPR and FPR per condition as grouped bars (None when matplotlib is missing)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    names = list(report.rows)
    fig = Figure(figsize=(max(5, 1.2 * len(names)), 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = range(len(names))
    ax.bar(
        [x - 0.2 for x in xs], [report.rows[n]["tpr"] for n in names], 0.4, label="detection (TPR)"
    )
    ax.bar(
        [x + 0.2 for x in xs],
        [report.rows[n]["fpr"] for n in names],
        0.4,
        label="false positives (FPR)",
    )
    ax.set_xticks(list(xs), names)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"watermark on {report.images} test images, PSNR {report.psnr:.1f} dB")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def plot_training(history: Sequence[dict[str, float]], path: Path) -> Path | None:
    """Training loss and accuracy (clean vs marked, through the channel) per epoch."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    if not history:
        return None
    fig = Figure(figsize=(8, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    epochs = [h["epoch"] for h in history]
    for i, (metric, title) in enumerate((("loss", "BCE loss"), ("train_acc", "train accuracy")), 1):
        ax = fig.add_subplot(1, 2, i)
        ax.plot(epochs, [h[metric] for h in history], "o-")
        ax.set_xlabel("epoch")
        ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def save_delta_png(delta: torch.Tensor, eps: float, path: Path) -> Path:
    """δ amplified to the full range: 0.5 + δ / (2 eps), as an RGB PNG."""
    image = to_pil((0.5 + delta / (2 * eps)).clamp(0, 1))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path
