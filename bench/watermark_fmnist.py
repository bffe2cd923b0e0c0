"""Watermark keys on the frozen ImageNet MobileNetV2 with Fashion-MNIST images.

For each eps a key (δ + MLP head on the frozen pooled features) is trained on a seeded subset
of the TRAINING split through the robustness channel (differentiable JPEG q 40-95, resize
0.5-1x, noise), its threshold set for 1% false positives on the clean training images; then
it is scored on a seeded subset of the TEST split: detection rate, false-positive rate and
AUROC, clean and after real PIL JPEG (q 90 / 75 / 50) and a 0.5x resize and back, and PSNR.
Images are read at the model's 224 x 224 input (Fashion-MNIST's 28 x 28 upsampled).

CPU (what bench/results/watermark_fmnist_cpu records)::

    .venv/bin/python bench/watermark_fmnist.py --train-size 1024 --test-size 256 --epochs 1 \
        --out bench/results/watermark_fmnist_cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

import vprompt
from vprompt import load_backbone
from vprompt.data.fashion_mnist import load_fashion_mnist
from vprompt.engine.experiment import random_subset
from vprompt.watermark.detector import (
    FrozenFeatures,
    KeyDetector,
    backbone_record,
    feature_dim_of,
    pixel_spec,
)
from vprompt.watermark.evaluate import EvalConfig, evaluate_key, markdown_table, save_delta_png
from vprompt.watermark.key_file import WatermarkKey, save_key
from vprompt.watermark.train import WatermarkTrainConfig, parse_eps, train_key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="IMAGENET1K_V1")
    parser.add_argument("--eps", default="4/255,8/255")
    parser.add_argument("--train-size", type=int, default=1024)
    parser.add_argument("--test-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    splits = load_fashion_mnist(None)
    train = random_subset(splits.train, args.train_size, args.seed)
    test = random_subset(splits.test, args.test_size, args.seed)
    device = torch.device(args.device)
    backbone = load_backbone("torchvision:mobilenet_v2", args.weights, device=device)
    spec = pixel_spec(backbone)
    args.out.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    for eps_text in args.eps.split(","):
        eps = parse_eps(eps_text)
        config = WatermarkTrainConfig(
            eps=eps, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed
        )
        features = FrozenFeatures(backbone)
        detector = KeyDetector(
            features=features, size=spec["size"], mean=spec["mean"], std=spec["std"],
            feature_dim=feature_dim_of(features, spec["size"], device), hidden=config.hidden,
        ).to(device)  # fmt: skip
        start = time.perf_counter()
        trained = train_key(detector, train, config, progress=False)
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        report = evaluate_key(
            detector, trained.delta, trained.threshold, test, EvalConfig(), progress=False
        )
        eval_s = time.perf_counter() - start
        tag = eps_text.replace("/", "_")
        key = WatermarkKey(
            delta=trained.delta, head=detector.head_tensors(), eps=eps, hidden=config.hidden,
            threshold=trained.threshold, target_fpr=config.target_fpr,
            backbone=backbone_record(backbone), pixels=spec,
            train={**config.describe(), "data": "fashion-mnist", "images": len(train)},
            metrics={"history": trained.history, **trained.train_metrics},
        )  # fmt: skip
        save_key(key, args.out / f"key_eps{tag}.safetensors")
        save_delta_png(trained.delta, eps, args.out / f"delta_eps{tag}.png")
        runs.append(
            {
                "eps": eps_text,
                "train_seconds": round(train_s, 1),
                "eval_seconds": round(eval_s, 1),
                "train": trained.train_metrics,
                "history": trained.history,
                **report.to_json(),
                "markdown": markdown_table(report),
            }
        )
        print(f"eps {eps_text}: train {train_s:.0f} s, eval {eval_s:.0f} s", file=sys.stderr)
        print(markdown_table(report), file=sys.stderr)
    command = "  ".join([".venv/bin/python", *sys.argv])
    meta = {
        "command": command,
        "model": "torchvision:mobilenet_v2",
        "weights": backbone.weights,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "vprompt": vprompt.__version__,
        "python": platform.python_version(),
        "train_images": len(train),
        "test_images": len(test),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seed": args.seed,
    }
    (args.out / "results.json").write_text(json.dumps({**meta, "runs": runs}, indent=1) + "\n")
    lines = [
        "# Watermark keys: frozen MobileNetV2, Fashion-MNIST",
        "",
        f"Command: `{' '.join(['.venv/bin/python', *sys.argv])}`",
        "",
        f"{meta['model']} ({meta['weights']}, frozen) on {args.device} ({meta['threads']} "
        f"threads, torch {meta['torch']}); {len(train)} training images (seeded subset), "
        f"{args.epochs} epoch(s), batch {args.batch_size}; {len(test)} test images (seeded "
        "subset); read at 224 x 224. Threshold: 1% false positives on clean training images.",
        "",
    ]
    for run in runs:
        lines += [
            f"## eps {run['eps']} (train {run['train_seconds']} s, eval {run['eval_seconds']} s; "
            f"training images: TPR {100 * run['train']['train_tpr']:.1f}%, FPR "
            f"{100 * run['train']['train_fpr']:.1f}%)",
            "",
            run["markdown"],
        ]
    (args.out / "results.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
