"""Linear probe on a frozen backbone: training on pixels vs on cached image features.

Trains ``linear-probe`` through the real engine three times on the same Fashion-MNIST subset:
without a feature cache (every epoch decodes, transforms and encodes every image), with an
empty cache (encodes each image once, then trains on features) and with the warm cache (encodes
nothing), and checks that the three agree. Writes ``results.json`` and ``results.md`` to
``--out``.

CPU (what bench/results/feature_cache_cpu records)::

    .venv/bin/python bench/feature_cache.py --backbone clip:tiny --weights none \
        --train-size 10000 --val-size 2000 --epochs 5 --threads 2 \
        --out bench/results/feature_cache_cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import vprompt
from vprompt.data.dataset import Subset
from vprompt.data.fashion_mnist import load_fashion_mnist
from vprompt.data.feature_cache import FeatureCache
from vprompt.engine import evaluate, fit
from vprompt.methods.baselines import LinearProbe, LinearProbeConfig


def subset(data: Any, n: int, seed: int) -> Subset:
    gen = torch.Generator().manual_seed(seed)
    return Subset(data, sorted(torch.randperm(len(data), generator=gen)[:n].tolist()))


def run(
    backbone: Any, train: Any, val: Any, args: argparse.Namespace, out: Path, cache: Any
) -> dict[str, Any]:
    torch.manual_seed(0)
    config = LinearProbeConfig()
    config = replace(config, optim=replace(config.optim, epochs=args.epochs))
    method = LinearProbe(backbone, train.classnames, config)
    started = time.perf_counter()
    result = fit(
        method, train, val=val, out_dir=out, device=args.device, progress=False,
        feature_cache=cache, resume=False,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    return {
        "fit_seconds": seconds,
        "epoch_seconds": [h["seconds"] for h in result.history],
        "images_per_s": [h["images_per_s"] for h in result.history],
        "val_acc": result.history[-1]["val_acc"],
        "best_val_acc": result.best_val_acc,
        "method": method,
    }


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="clip:tiny")
    parser.add_argument("--weights", default="none")
    parser.add_argument("--data", default=None, help="Fashion-MNIST folder (default: Debian's)")
    parser.add_argument("--train-size", type=int, default=10000)
    parser.add_argument("--val-size", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/feature_cache_cpu"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    splits = load_fashion_mnist(args.data, download=False)
    train = subset(splits.train, args.train_size, seed=0)
    val = subset(splits.test, args.val_size, seed=1)
    backbone = vprompt.load_backbone(args.backbone, args.weights, device=args.device)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cache = FeatureCache(root / "features")
        # Warm-up (first imports, thread pools, plotting) so it counts against no run.
        warm_args = argparse.Namespace(**{**vars(args), "epochs": 1})
        run(backbone, subset(train, 64, 0), subset(val, 32, 0), warm_args, root / "w", None)
        rows = {
            "pixels (no cache)": run(backbone, train, val, args, root / "a", None),
            "cold cache (encode once)": run(backbone, train, val, args, root / "b", cache),
            "warm cache": run(backbone, train, val, args, root / "c", cache),
        }
        cache_bytes = sum(p.stat().st_size for p in (root / "features").rglob("*") if p.is_file())
        plain, cached = rows["pixels (no cache)"]["method"], rows["warm cache"]["method"]
        test = subset(splits.test, args.val_size, seed=2)
        started = time.perf_counter()
        acc_plain = evaluate(plain, test, device=args.device, progress=False).accuracy
        eval_pixels = time.perf_counter() - started
        evaluate(cached, test, device=args.device, progress=False, feature_cache=cache)
        started = time.perf_counter()
        acc_cached = evaluate(
            cached, test, device=args.device, progress=False, feature_cache=cache
        ).accuracy
        eval_warm = time.perf_counter() - started
        head_diff = max(
            float((plain.prompt_state()[k] - v).abs().max())
            for k, v in cached.prompt_state().items()
        )

    base = rows["pixels (no cache)"]["fit_seconds"]
    summary = {
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv]),
        "backbone": f"{args.backbone} ({args.weights})",
        "device": args.device,
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "train_images": len(train),
        "val_images": len(val),
        "epochs": args.epochs,
        "runs": {
            name: {k: v for k, v in row.items() if k != "method"}
            | {
                "speedup_vs_pixels": base / row["fit_seconds"],
                "median_epoch_seconds": _median(row["epoch_seconds"]),
                "epoch_speedup_vs_pixels": _median(rows["pixels (no cache)"]["epoch_seconds"])
                / _median(row["epoch_seconds"]),
            }
            for name, row in rows.items()
        },
        "cache_bytes": cache_bytes,
        "test_accuracy": {"pixels": acc_plain, "warm cache": acc_cached},
        "evaluate_seconds": {"pixels": eval_pixels, "warm cache": eval_warm},
        "max_abs_head_difference": head_diff,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        "# Linear probe: pixels vs cached image features",
        "",
        f"`{summary['command']}`",
        "",
        f"{summary['backbone']} on {args.device} ({args.threads} threads, torch "
        f"{torch.__version__}); Fashion-MNIST subset: {len(train)} train / {len(val)} val "
        f"images, {args.epochs} epochs, batch {LinearProbeConfig().optim.batch_size}.",
        "",
        "| run | fit (s) | fit speed-up | median epoch (s) | epoch speed-up | "
        "median train images/s | val acc |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in summary["runs"].items():
        lines.append(
            f"| {name} | {row['fit_seconds']:.2f} | {row['speedup_vs_pixels']:.1f}x | "
            f"{row['median_epoch_seconds']:.3f} | {row['epoch_speedup_vs_pixels']:.0f}x | "
            f"{_median(row['images_per_s']):,.0f} | {row['val_acc']:.4f} |"
        )
    lines += [
        "",
        f"Evaluate {args.val_size} test images: {eval_pixels:.2f} s on pixels, "
        f"{eval_warm:.3f} s from the warm cache; test accuracy {acc_plain:.4f} vs "
        f"{acc_cached:.4f}. Largest head-weight difference between the pixel and cached runs: "
        f"{head_diff:.2e}. Cache on disk: {cache_bytes / 1e6:.1f} MB.",
        "",
        "The cold-cache fit includes encoding every training and validation image once (before "
        "its first epoch, so not in its epoch times); fit times include the final pack, plots "
        "and config writes. An epoch is training plus validation; epoch figures are medians "
        "because the CPU is shared (per-epoch times are in results.json). Accuracies are low "
        "because the weights are random (`none`); what matters is that all runs agree.",
    ]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
