"""Industrial inspection on real pretrained weights: few-shot PatchCore and defect search.

Frozen torchvision ImageNet MobileNetV2 (``IMAGENET1K_V1``, from the local torch hub cache) on
a synthetic inspection set built from real textures (``vprompt.anomaly.synthetic``: skimage's
brick / grass / gravel photos, MVTec layout, 20 normal train + 10 good test + 6 x 4 defect
types per category at 256 px, written once into ``--data-dir`` with ``--data-seed``).

Part 1, ``patch-memory`` (PatchCore, the paper's default config: layers at stride 8 and 16,
3 x 3 aggregation, 1024 / 1024 dims, 10% coreset, resize 256 → crop 224): image AUROC /
F1-max, pixel AUROC / F1-max and AUPRO per category for every k in ``--shots`` normal shots
and every seed in ``--seeds`` (the references drawn by ``evaluate_category``'s seeded pick),
as mean ± std over seeds; CPU time per test image (``method.score`` only, and the whole
evaluation including metrics); a per-category ROC plot at k = 4, seed 0.

Part 2, find-similar recall@k (``DefectSearch``, default config). For each category and defect
type, the FIRST test image of that type is the example, marked either by its ground-truth mask
or by the mask's bounding box; the search runs over every OTHER test image of the category
(the other 5 of its type, the 18 of the other types, the 10 good ones). A same-type target
image's defect (its whole ground-truth mask, one defect per image) is found at k when one of
the top-k regions of the global ranking hits it; hit = the region's mask and the ground-truth
mask share at least one pixel (primary), also reported with IoU >= 0.1. recall@k = found / 5;
precision@k = hitting regions among the top k / k (an empty slot counts as a miss). The plain
reference in the same run scores every cell by its cosine to the example's mean marked
feature (no negatives) and, having no margin to threshold at 0, keeps cells in the top
``--baseline-top`` fraction of all searched cells' cosines; regions and ranking as above. Both
use the same cached features, so only the scoring differs.

CPU (what bench/results/anomaly_inspection.md records)::

    .venv/bin/python bench/anomaly_inspection.py --data-dir runs/anomaly_inspection/data \
        --seeds 0 1 2 --shots 1 4 16 --out bench/results

GPU (not run: no GPU was lent; the metrics are the same, only the per-image time differs)::

    .venv/bin/python bench/anomaly_inspection.py --data-dir runs/anomaly_inspection/data \
        --seeds 0 1 2 --shots 1 4 16 --device cuda --out bench/results/gpu
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import vprompt
from vprompt.anomaly import build_anomaly_method
from vprompt.anomaly.datasets import AnomalyCategory, load_mask, read_anomaly_data
from vprompt.anomaly.evaluate import METRICS, CategoryResult, evaluate_category, mean_row
from vprompt.anomaly.find_similar import DefectSearch, FindSimilarConfig, region_mask
from vprompt.anomaly.output import plot_roc
from vprompt.anomaly.synthetic import write_inspection_set
from vprompt.backbones import load_backbone

MODEL = "torchvision:mobilenet_v2"
WEIGHTS = "IMAGENET1K_V1"
TITLES = {
    "image_auroc": "Image AUROC",
    "image_f1_max": "Image F1-max",
    "pixel_auroc": "Pixel AUROC",
    "pixel_f1_max": "Pixel F1-max",
    "aupro": "AUPRO",
}
KS = (1, 3, 5, 10)
NAME = "anomaly_inspection"


# --- Part 1 ---------------------------------------------------------------------------------


def part1(
    categories: Sequence[AnomalyCategory],
    backbone: Any,
    shots: Sequence[int],
    seeds: Sequence[int],
    out: Path,
) -> dict[str, Any]:
    device = next(backbone.parameters()).device
    method = build_anomaly_method(
        "patch-memory", model=MODEL, weights=WEIGHTS, backbone=backbone, device=device
    )
    timer = {"score_s": 0.0, "images": 0}
    score = method.score

    def timed_score(pixels: torch.Tensor) -> Any:
        start = time.perf_counter()
        result = score(pixels)
        timer["score_s"] += time.perf_counter() - start
        timer["images"] += int(pixels.shape[0])
        return result

    method.score = timed_score  # type: ignore[method-assign]
    runs: list[dict[str, Any]] = []
    roc: list[CategoryResult] = []
    eval_s = 0.0
    tested = 0
    for k in shots:
        for seed in seeds:
            results = []
            for category in categories:
                start = time.perf_counter()
                r = evaluate_category(method, category, shots=k, seed=seed)
                seconds = time.perf_counter() - start
                eval_s += seconds
                tested += r.num_test
                results.append(r)
                runs.append({**r.row(), "seed": seed, "seconds": round(seconds, 2)})
                print(
                    f"k={k} seed={seed} {category.name}: image AUROC {100 * r.image_auroc:.1f} "
                    f"pixel AUROC {100 * r.pixel_auroc:.1f} AUPRO {100 * r.aupro:.1f} "
                    f"({seconds:.1f} s)",
                    file=sys.stderr,
                )
            means = {m: None if math.isnan(v) else v for m, v in mean_row(results).items()}
            runs.append({"name": "mean", "shots": k, "seed": seed, **means})
            if k == 4 and seed == 0:
                roc = results
    names = [c.name for c in categories]
    summary: dict[str, Any] = {}
    for k in shots:
        table: dict[str, Any] = {}
        for name in [*names, "mean"]:
            rows = [r for r in runs if r["shots"] == k and r["name"] == name]
            table[name] = {m: _mean_std([r[m] for r in rows]) for m in METRICS}
        summary[str(k)] = table
    roc_path = plot_roc(roc, out / f"{NAME}_roc.png") if roc else None
    return {
        "method": "patch-memory",
        "config": {
            k: list(v) if isinstance(v, tuple) else v for k, v in vars(method.config).items()
        },
        "frame": vars(method.frame),
        "runs": runs,
        "summary": summary,
        "time": {
            "score_ms_per_image": round(1000 * timer["score_s"] / max(1, timer["images"]), 1),
            "eval_ms_per_image": round(1000 * eval_s / max(1, tested), 1),
            "eval_seconds": round(eval_s, 1),
            "test_images_scored": tested,
        },
        "roc_plot": None if roc_path is None else roc_path.name,
    }


def _mean_std(values: Sequence[float | None]) -> dict[str, float | None]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"mean": None, "std": None}
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals))}


# --- Part 2 ---------------------------------------------------------------------------------


class CachedSearch(DefectSearch):
    """``DefectSearch`` unchanged, except that features of an image already seen (same object)
    come from a cache shared between searches: the same numbers, computed once."""

    def __init__(self, backbone: Any, config: FindSimilarConfig, cache: dict[int, Any]) -> None:
        super().__init__(backbone, config)
        self.cache = cache

    def _embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        missing = [im for im in images if id(im) not in self.cache]
        if missing:
            for im, feats in zip(missing, super()._embed(missing), strict=True):
                self.cache[id(im)] = feats
        return torch.stack([self.cache[id(im)] for im in images])


class CosineSearch(CachedSearch):
    """Plain reference: a cell's score is its cosine to the mean marked feature (no negatives),
    shifted by ``offset`` so that the library's regions (score > 0) are the cells above it."""

    offset = 0.0

    def cosines(self, images: Sequence[Image.Image]) -> torch.Tensor:
        assert self.positives is not None
        mean = torch.nn.functional.normalize(self.positives.mean(dim=0), dim=0)
        return self._embed(images) @ mean  # B x h x w

    def margins(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.cosines(images) - self.offset


def part2(
    categories: Sequence[AnomalyCategory], backbone: Any, baseline_top: float
) -> dict[str, Any]:
    config = FindSimilarConfig(top_k=10_000)  # the default search, every region kept
    cache: dict[int, Any] = {}
    searches: list[dict[str, Any]] = []
    start_all = time.perf_counter()
    for category in categories:
        samples = list(category.test)
        images = [Image.open(s.image).convert("RGB") for s in samples]
        cache.clear()  # keyed by id(): only this category's images, alive until the next one
        masks = [
            load_mask(s.mask, (im.height, im.width))
            if s.mask is not None
            else np.zeros((im.height, im.width), bool)
            for s, im in zip(samples, images, strict=True)
        ]
        kinds = sorted({s.defect for s in samples if s.label == 1})
        for kind in kinds:
            ex = next(i for i, s in enumerate(samples) if s.defect == kind)
            targets = [i for i in range(len(samples)) if i != ex]
            same = [i for i in targets if samples[i].defect == kind]
            ys, xs = np.nonzero(masks[ex])
            box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
            marks = {
                "mask": masks[ex],
                "box": region_mask(images[ex].size, boxes=[box]),
            }
            for mark, marked in marks.items():
                for scorer in ("margin", "cosine"):
                    start = time.perf_counter()
                    search = (CachedSearch if scorer == "margin" else CosineSearch)(
                        backbone, config, cache
                    )
                    search.add_examples([(images[ex], marked)])
                    target_images = [images[i] for i in targets]
                    threshold = None
                    if isinstance(search, CosineSearch):
                        cos = search.cosines(target_images).flatten()
                        threshold = float(torch.quantile(cos, 1.0 - baseline_top))
                        search.offset = threshold
                    result = search.search(target_images)
                    seconds = time.perf_counter() - start
                    searches.append(
                        _score_search(
                            result.regions,
                            targets=targets,
                            same=same,
                            masks=masks,
                            samples=samples,
                            meta={
                                "category": category.name,
                                "defect": kind,
                                "example": str(samples[ex].image),
                                "mark": mark,
                                "scorer": scorer,
                                "positives": int(search.positives.shape[0]),  # type: ignore[union-attr]
                                "negatives": int(search.negatives.shape[0]),  # type: ignore[union-attr]
                                "cosine_threshold": threshold,
                                "seconds": round(seconds, 2),
                            },
                        )
                    )
                    s = searches[-1]
                    print(
                        f"{category.name}/{kind} {mark} {scorer}: {s['regions_found']} regions, "
                        f"recall@5 {s['overlap']['recall'][str(5)]:.2f} ({seconds:.1f} s)",
                        file=sys.stderr,
                    )
    return {
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(config).items()},
        "baseline_top": baseline_top,
        "searches": searches,
        "summary": _summarize(searches),
        "seconds": round(time.perf_counter() - start_all, 1),
    }


def _score_search(
    regions: Sequence[Any],
    *,
    targets: Sequence[int],
    same: Sequence[int],
    masks: Sequence[np.ndarray],
    samples: Sequence[Any],
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Hits of the ranked regions against the same-type ground truths, both criteria."""
    ranked = []
    for r in regions:
        index = targets[r.image]
        gt = masks[index]
        inter = int((r.mask & gt).sum())
        union = int((r.mask | gt).sum())
        is_same = index in same
        ranked.append(
            {
                "image": str(samples[index].image),
                "target": index,
                "defect": samples[index].defect,
                "score": r.score,
                "area": r.area,
                "overlap": is_same and inter > 0,
                "iou10": is_same and union > 0 and inter / union >= 0.1,
                "iou": inter / union if union else 0.0,
            }
        )
    out: dict[str, Any] = {**meta, "same_type_targets": len(same), "regions_found": len(ranked)}
    for crit in ("overlap", "iou10"):
        recall, precision = {}, {}
        for k in KS:
            top = ranked[:k]
            found = {r["target"] for r in top if r[crit]}
            recall[str(k)] = len(found) / len(same)
            precision[str(k)] = sum(r[crit] for r in top) / k
        out[crit] = {"recall": recall, "precision": precision}
    out["mean_area_top10"] = float(np.mean([r["area"] for r in ranked[:10]])) if ranked else None
    out["top10"] = ranked[:10]
    return out


def _summarize(searches: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per (mark, scorer): recall and precision @k pooled over categories and defect types
    (found / total same-type targets; mean precision), overall and per defect type."""
    out: dict[str, Any] = {}
    for mark in ("mask", "box"):
        for scorer in ("margin", "cosine"):
            rows = [s for s in searches if s["mark"] == mark and s["scorer"] == scorer]
            key = f"{mark}/{scorer}"
            out[key] = {"all": _pool(rows)}
            for kind in sorted({s["defect"] for s in rows}):
                out[key][kind] = _pool([s for s in rows if s["defect"] == kind])
    return out


def _pool(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    total = sum(s["same_type_targets"] for s in rows)
    pooled: dict[str, Any] = {"searches": len(rows), "same_type_targets": total}
    for crit in ("overlap", "iou10"):
        pooled[crit] = {
            "recall": {
                str(k): sum(s[crit]["recall"][str(k)] * s["same_type_targets"] for s in rows)
                / total
                for k in KS
            },
            "precision": {
                str(k): float(np.mean([s[crit]["precision"][str(k)] for s in rows])) for k in KS
            },
        }
    pooled["mean_regions"] = float(np.mean([s["regions_found"] for s in rows]))
    pooled["no_region_searches"] = sum(s["regions_found"] == 0 for s in rows)
    areas = [s["mean_area_top10"] for s in rows if s["mean_area_top10"] is not None]
    pooled["mean_area_top10"] = float(np.mean(areas)) if areas else None
    return pooled


# --- report ---------------------------------------------------------------------------------


def _pm(cell: dict[str, float | None]) -> str:
    if cell["mean"] is None:
        return "n/a"
    return f"{100 * cell['mean']:.1f} ± {100 * (cell['std'] or 0.0):.1f}"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def markdown(result: dict[str, Any]) -> str:
    p1, p2, env = result["part1"], result["part2"], result["environment"]
    seeds = ", ".join(str(s) for s in result["seeds"])
    lines = [
        "# Industrial inspection on ImageNet MobileNetV2: PatchCore few-shot and defect search",
        "",
        f"Command: `{result['command']}`",
        "",
        "GPU command (not run: no GPU was lent to this work): the same with `--device cuda "
        "--out bench/results/gpu`.",
        "",
        f"Environment: {env['cpu']} ({env['threads']} torch threads, shared machine), "
        f"torch {env['torch']}, vprompt {env['vprompt']}, {env['platform']}, {env['date']}. "
        f"Wall time {result['wall_seconds']:.0f} s (data {result['data_seconds']:.0f} s, "
        f"part 1 {p1['time']['eval_seconds']:.0f} s, part 2 {p2['seconds']:.0f} s). The 2 "
        "cores are shared with other work (1-minute load average at start / end: "
        + " / ".join(f"{x:g}" for x in env["load_average_start_end"])
        + "): times are indicative; the metrics are deterministic.",
        "",
        f"Model `{MODEL}` weights `{WEIGHTS}` (frozen). Data: `write_inspection_set(seed="
        f"{result['data']['seed']})` in `{result['data']['root']}`: categories "
        f"{', '.join(result['data']['categories'])}, each 20 normal train, 10 good test, 6 test "
        "images per defect type (scratch, hole, spot, crack), 256 px; textures are real photos "
        "(skimage), defects are drawn.",
        "",
        "## Part 1: `patch-memory` (PatchCore), paper defaults",
        "",
        "Layers "
        + ", ".join(f"`{x}`" for x in result["layers"])
        + ", 3 x 3 aggregation, 1024/1024 dims, 10% coreset, resize 256 → crop 224; metrics in "
        f"the 224 frame. Percent, mean ± std over seeds {seeds} (the seed picks the k normal "
        "references).",
        "",
    ]
    summary = p1["summary"]
    for k, table in summary.items():
        lines += [
            f"### k = {k} normal shot{'s' if k != '1' else ''}",
            "",
            "| Category | " + " | ".join(TITLES[m] for m in METRICS) + " |",
            "|---|" + "---:|" * len(METRICS),
        ]
        for name, row in table.items():
            label = "**mean**" if name == "mean" else name
            lines.append(f"| {label} | " + " | ".join(_pm(row[m]) for m in METRICS) + " |")
        lines.append("")
    lines += [
        "### Summary (mean over categories; ± std over seeds)",
        "",
        "| k | Image AUROC | Pixel AUROC | AUPRO | Image F1-max | Pixel F1-max |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for k, table in summary.items():
        m = table["mean"]
        lines.append(
            f"| {k} | {_pm(m['image_auroc'])} | {_pm(m['pixel_auroc'])} | {_pm(m['aupro'])} | "
            f"{_pm(m['image_f1_max'])} | {_pm(m['pixel_f1_max'])} |"
        )
    t = p1["time"]
    lines += [
        "",
        f"CPU time per test image: {t['score_ms_per_image']} ms in `method.score` (224 px, "
        f"batches of 8), {t['eval_ms_per_image']} ms for the whole `evaluate_category` "
        f"(image decoding, fitting the bank, metrics); {t['test_images_scored']} test images "
        "scored in all.",
        "",
    ]
    if p1["roc_plot"]:
        lines += [f"ROC curves at k = 4, seed 0: `{p1['roc_plot']}`.", ""]
    lines += [
        "## Part 2: find-similar recall@k",
        "",
        "Protocol: per category and defect type, the first test image of that type is the "
        "example, marked by its ground-truth mask (`mask`) or by the mask's bounding box "
        "(`box`); the search runs over the category's 33 other test images (5 of the same "
        "type, 18 of other types, 10 good). A same-type target's defect (its whole ground-truth "
        "mask) is found at k when one of the top-k regions of the global ranking hits it. "
        "**Hit (primary) = the region mask and the ground-truth mask share at least one "
        "pixel**; the IoU >= 0.1 variant follows. recall@k = found / 5 (so recall@1 <= 20%), "
        "pooled over the 3 categories x 4 types = 12 searches per row (60 targets); "
        "precision@k = hitting regions among the top k / k, averaged over searches (an empty "
        "slot is a miss).",
        "",
        "Scorers, on the same cached features: `margin` is `DefectSearch` as shipped "
        "(default config: threshold 0, relative coverage 0.5, guard 2 cells, min_area 0.0005, "
        "layers as above, 224 px without crop): max cosine to the marked cells (those the mark "
        "covers at least half as much as its best-covered cell) minus max cosine to the "
        "example's clean cells (more than 2 cells away from the mark). `cosine` is the plain "
        "reference with no negatives: cosine "
        "to the mean marked feature, regions where it is in the top "
        f"{100 * p2['baseline_top']:g}% of all searched cells, ranked by peak cosine.",
        "",
    ]
    for crit, title in (("overlap", "hit = any overlap"), ("iou10", "hit = IoU >= 0.1")):
        lines += [
            f"### All types, {title}",
            "",
            "| mark | scorer | R@1 | R@3 | R@5 | R@10 | P@1 | P@3 | P@5 | P@10 | regions / search "
            "| searches with no region | mean area of top 10 |",
            "|---|---|" + "---:|" * 11,
        ]
        for key, pooled in p2["summary"].items():
            mark, scorer = key.split("/")
            a = pooled["all"]
            rec = " | ".join(f"{100 * a[crit]['recall'][str(k)]:.1f}" for k in KS)
            prec = " | ".join(f"{100 * a[crit]['precision'][str(k)]:.1f}" for k in KS)
            area = "n/a" if a["mean_area_top10"] is None else f"{100 * a['mean_area_top10']:.2f}%"
            lines.append(
                f"| {mark} | {scorer} | {rec} | {prec} | {a['mean_regions']:.1f} | "
                f"{a['no_region_searches']}/{a['searches']} | {area} |"
            )
        lines.append("")
    kinds = [k for k in next(iter(p2["summary"].values())) if k != "all"]
    lines += [
        "### Per defect type, hit = any overlap (3 searches, 15 targets each)",
        "",
        "| defect | mark | scorer | R@1 | R@3 | R@5 | R@10 | P@5 | regions / search |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in kinds:
        for key, pooled in p2["summary"].items():
            mark, scorer = key.split("/")
            a = pooled[kind]
            rec = " | ".join(f"{100 * a['overlap']['recall'][str(k)]:.1f}" for k in KS)
            lines.append(
                f"| {kind} | {mark} | {scorer} | {rec} | "
                f"{100 * a['overlap']['precision']['5']:.1f} | {a['mean_regions']:.1f} |"
            )
    lines += ["", "Recall and precision in percent. Per-search details: the JSON.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("runs/anomaly_inspection/data"))
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--baseline-top", type=float, default=0.01)
    parser.add_argument("--skip-search", action="store_true", help="run part 1 only")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the GPU command)")
    args = parser.parse_args()

    wall = time.perf_counter()
    load_start = os.getloadavg()[0]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    data = write_inspection_set(args.data_dir, seed=args.data_seed)
    data_s = time.perf_counter() - start
    categories = read_anomaly_data(f"mvtec:{args.data_dir}")
    backbone = load_backbone(MODEL, WEIGHTS, device=args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    p1 = part1(categories, backbone, args.shots, args.seeds, args.out)
    p2 = (
        part2(categories, backbone, args.baseline_top)
        if not args.skip_search
        else {"searches": [], "summary": {}, "seconds": 0.0}
    )
    from vprompt.backbones.dense import default_layers

    result = {
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "environment": {
            "cpu": _cpu(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "vprompt": vprompt.__version__,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "load_average_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        },
        "model": MODEL,
        "weights": WEIGHTS,
        "layers": list(default_layers(backbone)),
        "data": {
            "root": str(args.data_dir),
            "seed": args.data_seed,
            "categories": [c.name for c in categories],
            "summary": data["categories"],
            "reused": data["reused"],
        },
        "seeds": args.seeds,
        "shots": args.shots,
        "data_seconds": round(data_s, 1),
        "part1": p1,
        "part2": p2,
    }
    result["wall_seconds"] = round(time.perf_counter() - wall, 1)
    (args.out / f"{NAME}.json").write_text(json.dumps(result, indent=1) + "\n")
    if not args.skip_search:
        text = markdown(result)
        (args.out / f"{NAME}.md").write_text(text)
        print(text)


if __name__ == "__main__":
    main()
