"""What the anomaly commands write: heat-map overlays, thresholded masks, per-category tables
laid out like the papers', ROC plots, and the find-similar results.

Every file is written atomically; file names come from the inputs' names, made unique.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image
from tqdm.auto import tqdm

from vprompt.anomaly.base import AnomalyMethod
from vprompt.anomaly.datasets import AnomalyCategory
from vprompt.anomaly.evaluate import METRICS, CategoryResult, evaluate_category, mean_row, overlay
from vprompt.anomaly.images import batch_to_frame, map_to_image
from vprompt.data.images import expand_image_inputs, load_image
from vprompt.errors import ConfigError
from vprompt.utils import jsonio
from vprompt.utils.io import atomic_path, atomic_write_text

_TITLES = {
    "image_auroc": "Image AUROC",
    "image_f1_max": "Image F1-max",
    "pixel_auroc": "Pixel AUROC",
    "pixel_f1_max": "Pixel F1-max",
    "aupro": "AUPRO",
}


def _save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def unique_stems(paths: Sequence[Path]) -> list[str]:
    """A file-name-safe, unique stem per path (``a.png``, ``a-2.png`` …)."""
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", p.stem)[:80] or "image"
        n = seen.get(stem, 0) + 1
        seen[stem] = n
        out.append(stem if n == 1 else f"{stem}-{n}")
    return out


def score_images(
    method: AnomalyMethod,
    inputs: Sequence[str],
    out: Path,
    *,
    threshold: float | None = None,
    batch_size: int = 8,
    max_pixels: int,
) -> list[dict[str, Any]]:
    """Score image files; write heat maps (and masks with ``threshold``) and ``result.json``."""
    paths, bad = expand_image_inputs(inputs)
    if bad:
        raise ConfigError("; ".join(bad[:5]))
    method.eval()
    frame = method.frame
    device = next((p.device for p in method.backbone.parameters()), torch.device("cpu"))
    stems = unique_stems(paths)
    rows: list[dict[str, Any]] = []
    # Only the S x S maps stay in memory: the images and their full-size maps are rebuilt for
    # the overlays, which need the run's colour scale and so wait for the last image.
    framed: list[NDArray[np.float32]] = []
    low, high = math.inf, -math.inf
    for start in tqdm(range(0, len(paths), batch_size), desc="scoring", unit="batch", leave=False):
        chunk = paths[start : start + batch_size]
        images = [load_image(p, max_pixels=max_pixels) for p in chunk]
        with torch.no_grad():
            res = method.score(batch_to_frame(images, frame).to(device))
        for i, (p, im) in enumerate(zip(chunk, images, strict=True)):
            small = res.maps[i].float().cpu().numpy()
            full = map_to_image(small, frame, im.size)
            low, high = min(low, float(full.min())), max(high, float(full.max()))
            stem = stems[start + i]
            row: dict[str, Any] = {"image": str(p), "score": float(res.image_scores[i])}
            if threshold is not None:
                row["defect"] = bool(full.max() > threshold)
                row["defect_fraction"] = float((full > threshold).mean())
            row["heatmap"] = f"heatmaps/{stem}.png"
            if threshold is not None:
                mask = Image.fromarray(((full > threshold) * 255).astype(np.uint8))
                _save_png(mask, out / "masks" / f"{stem}.png")
                row["mask"] = f"masks/{stem}.png"
            rows.append(row)
            framed.append(small)
    # One colour scale for the whole run, so heat maps compare across images.
    for p, small, row in zip(paths, framed, rows, strict=True):
        im = load_image(p, max_pixels=max_pixels)
        full = map_to_image(small, frame, im.size)
        _save_png(overlay(im, full, low, high), out / row["heatmap"])
    summary = {
        "method": method.name,
        "model": method.backbone.name,
        "object": method.object_name,
        "threshold": threshold,
        "heatmap_range": [low, high],
        "images": rows,
    }
    atomic_write_text(out / "result.json", jsonio.dumps(summary, indent=2) + "\n")
    return rows


def run_evaluation(
    method: AnomalyMethod,
    categories: Sequence[AnomalyCategory],
    out: Path,
    *,
    data: str,
    shots: int,
    seed: int,
    batch_size: int,
    save_maps: int,
    max_pixels: int,
) -> dict[str, Any]:
    """Evaluate every category; write ``table.md``, ``results.json``, ``roc.png`` and maps."""
    total = sum(len(c.test) for c in categories)
    results: list[CategoryResult] = []
    with tqdm(total=total, desc=f"{method.name} eval", unit="img", leave=False) as bar:
        for cat in categories:
            written = [0]

            def keep_maps(
                samples: Sequence[Any],
                scores: torch.Tensor,
                maps: torch.Tensor,
                cat: AnomalyCategory = cat,
                written: list[int] = written,
            ) -> None:
                for s, m in zip(samples, maps, strict=True):
                    if written[0] >= save_maps or s.label != 1:
                        continue
                    im = load_image(s.image, max_pixels=max_pixels)
                    full = map_to_image(m.numpy(), method.frame, im.size)
                    name = f"{s.defect}_{s.image.stem}"
                    _save_png(
                        overlay(im, full, float(full.min()), float(full.max())),
                        out / "maps" / cat.name / f"{name}.png",
                    )
                    written[0] += 1

            results.append(
                evaluate_category(
                    method,
                    cat,
                    shots=shots,
                    seed=seed,
                    batch_size=batch_size,
                    max_pixels=max_pixels,
                    on_maps=keep_maps if save_maps else None,
                    on_progress=bar.update,
                )
            )
    mean = mean_row(results)
    table = results_table(
        results,
        mean,
        title=f"{method.name} on {method.backbone.name}, {data}, {shots}-shot, seed {seed}",
    )
    atomic_write_text(out / "table.md", table)
    summary = {
        "method": method.name,
        "model": method.backbone.name,
        "data": data,
        "shots": shots,
        "seed": seed,
        "categories": [r.row() for r in results],
        "mean": {k: (None if math.isnan(v) else v) for k, v in mean.items()},
    }
    atomic_write_text(out / "results.json", jsonio.dumps(summary, indent=2) + "\n")
    plot_roc(results, out / "roc.png")
    return summary


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}"


def results_table(results: Sequence[CategoryResult], mean: dict[str, float], *, title: str) -> str:
    """Markdown: one row per category, the papers' metric columns (percent), a mean row."""
    head = "| Category | " + " | ".join(_TITLES[m] for m in METRICS) + " |"
    rule = "|---|" + "---:|" * len(METRICS)
    rows = [
        f"| {r.name} | " + " | ".join(_pct(getattr(r, m)) for m in METRICS) + " |" for r in results
    ]
    rows.append("| **mean** | " + " | ".join(_pct(mean[m]) for m in METRICS) + " |")
    return f"{title}\n\n" + "\n".join([head, rule, *rows]) + "\n"


def plot_roc(results: Sequence[CategoryResult], path: Path) -> Path | None:
    """Image- and pixel-level ROC curves of every category (None without matplotlib)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn(
            "matplotlib is not installed; skipping ROC plots (pip install 'vprompt[plots]')",
            stacklevel=2,
        )
        return None
    fig = Figure(figsize=(10, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    for col, (level, metric) in enumerate(
        (("image", "image_auroc"), ("pixel", "pixel_auroc")), start=1
    ):
        ax = fig.add_subplot(1, 2, col)
        for r in results:
            fpr, tpr = r.curves.get(level, ([], []))
            if len(fpr):
                ax.plot(fpr, tpr, label=f"{r.name} ({_pct(getattr(r, metric))})")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"{level}-level ROC")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.9, wspace=0.22)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def run_find_similar(
    *,
    example: Path,
    example_mask: NDArray[np.bool_],
    example_image: Image.Image,
    targets: Sequence[str],
    backbone: Any,
    overrides: Sequence[str],
    segmenter: Any,
    max_pixels: int,
    out: Path,
) -> dict[str, Any]:
    """Search ``targets`` for regions like the marked one; write regions.json and heat maps."""
    from vprompt.anomaly.find_similar import DefectSearch, FindSimilarConfig
    from vprompt.methods.config import apply_overrides

    config = apply_overrides(FindSimilarConfig(), list(overrides))
    paths, bad = expand_image_inputs(targets)
    if bad:
        raise ConfigError("; ".join(bad[:5]))
    images = [load_image(p, max_pixels=max_pixels) for p in paths]
    search = DefectSearch(backbone, config)
    search.add_examples([(example_image, example_mask)])
    result = search.search(images, segmenter=segmenter)
    stems = unique_stems(paths)
    low = min(float(h.min()) for h in result.heatmaps)
    high = max(float(h.max()) for h in result.heatmaps)
    for im, heat, stem in zip(images, result.heatmaps, stems, strict=True):
        _save_png(overlay(im, heat, low, high), out / "heatmaps" / f"{stem}.png")
    regions = []
    for rank, r in enumerate(result.regions, start=1):
        mask_name = f"regions/{rank:03d}_{stems[r.image]}.png"
        _save_png(Image.fromarray(r.mask.astype(np.uint8) * 255), out / mask_name)
        regions.append(
            {
                "rank": rank,
                "image": str(paths[r.image]),
                "box": list(r.box),
                "score": r.score,
                "area": r.area,
                "mask": mask_name,
                "refined": r.refined,
            }
        )
    summary = {
        "example": str(example),
        "model": backbone.name,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(config).items()},
        "images": [str(p) for p in paths],
        "heatmap_range": [low, high],
        "regions": regions,
    }
    atomic_write_text(out / "regions.json", jsonio.dumps(summary, indent=2) + "\n")
    return summary
