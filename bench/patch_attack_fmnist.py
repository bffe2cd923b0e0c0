"""Universal adversarial patches against the quickstart's Fashion-MNIST visual-prompt pack.

The victim is the pack from ``scripts/quickstart.py`` (frozen ImageNet MobileNetV2 with a
learned padding prompt and a linear label map; 48 px inner image on a 64 px canvas). For each
setting a patch is trained on a seeded subset of the TRAINING split (Brown et al. 2017's EOT:
random location, ±20% area, ±22.5° rotation, ±10% brightness; Adam) and scored on a seeded
subset of the TEST split: clean accuracy, accuracy with the patch at random placements and at
the worst of a 3 x 3 grid of positions, and the attack success rate.

CPU (what bench/results/patch_attack_fmnist_cpu records)::

    .venv/bin/python bench/patch_attack_fmnist.py \
        --pack runs/quickstart/visual-prompt/prompt.safetensors --train-size 1000 \
        --test-size 500 --epochs 2 --out bench/results/patch_attack_fmnist_cpu
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
from vprompt.attack import (
    PatchFile,
    PatchTrainConfig,
    PatchTransformConfig,
    RobustConfig,
    robust_accuracy,
    train_patch,
    victim_from_method,
)
from vprompt.attack.robust import markdown_table
from vprompt.data.fashion_mnist import load_fashion_mnist
from vprompt.engine.experiment import random_subset
from vprompt.engine.pack import build_from_pack, load_pack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pack", default="runs/quickstart/visual-prompt/prompt.safetensors")
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--target", default="Bag")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    torch.set_num_threads(max(1, torch.get_num_threads()))
    pack = load_pack(args.pack)
    method = build_from_pack(pack, device=args.device)
    victim = victim_from_method(method, {"pack": args.pack})
    splits = load_fashion_mnist(None)
    train = random_subset(splits.train, args.train_size, args.seed)
    test = random_subset(splits.test, args.test_size, args.seed)
    target = victim.classnames.index(args.target)
    settings = [(0.05, None), (0.10, None), (0.05, target), (0.10, target)]
    rows: list[dict[str, Any]] = []
    args.out.mkdir(parents=True, exist_ok=True)
    for size, tgt in settings:
        transform = PatchTransformConfig(size=size)
        config = PatchTrainConfig(
            transform=transform,
            target=tgt,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
        )
        start = time.perf_counter()
        trained = train_patch(victim, train, config)
        train_s = time.perf_counter() - start
        patch_file = PatchFile(
            patch=trained.patch, transform=transform, classnames=victim.classnames, target=tgt
        )
        start = time.perf_counter()
        report = robust_accuracy(
            victim, patch_file, test, RobustConfig(placements=4, grid=3, seed=args.seed)
        )
        eval_s = time.perf_counter() - start
        row = {
            **report.to_json(),
            "size": size,
            "target": None if tgt is None else victim.classnames[tgt],
            "patch_pixels": int(trained.patch.shape[-1]),
            "train_seconds": round(train_s, 1),
            "eval_seconds": round(eval_s, 1),
            "history": trained.history,
        }
        rows.append(row)
        name = f"size{int(size * 100):02d}_{'untargeted' if tgt is None else 'targeted'}"
        from vprompt.attack.patch_file import save_patch, save_patch_png

        save_patch_png(trained.patch, args.out / f"{name}.png", transform.shape)
        save_patch(patch_file, args.out / f"{name}.safetensors")  # for `vprompt defend eval`
        print(markdown_table(report, title=name), file=sys.stderr)
    command = " ".join(["python", *sys.argv])
    result = {
        "command": command,
        "vprompt_version": vprompt.__version__,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "pack": args.pack,
        "train_images": len(train),
        "test_images": len(test),
        "epochs": args.epochs,
        "rows": rows,
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# Universal patch vs the quickstart Fashion-MNIST visual-prompt pack (CPU)",
        "",
        f"`{command}`",
        "",
        f"Patch trained on {len(train)} training images ({args.epochs} epochs, Adam), "
        f"scored on {len(test)} test images; random = 4 seeded placements per image, "
        "worst = worst of a 3 x 3 grid of positions.",
        "",
        "| patch area | attack | clean acc | acc (random) | acc (worst) | success (random) "
        "| success (worst) | train s | eval s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    for r in rows:
        lines.append(
            f"| {100 * r['size']:.0f}% | {r['target'] or 'untargeted'} | "
            f"{pct(r['clean_accuracy'])} | {pct(r['patched_accuracy_random'])} | "
            f"{pct(r['patched_accuracy_worst'])} | {pct(r['success_rate_random'])} | "
            f"{pct(r['success_rate_worst'])} | {r['train_seconds']} | {r['eval_seconds']} |"
        )
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
