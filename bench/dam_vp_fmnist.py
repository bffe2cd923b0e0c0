"""DAM-VP against one visual prompt: frozen ImageNet MobileNetV2 → Fashion-MNIST.

Trains, through the real engine and at the same budget (same training images, epochs, batch
size and canvas), the single-prompt ``visual-prompt`` (padding around a 48 px image on a 64 px
canvas, linear label mapping, its Adam defaults) and ``dam-vp`` (one 8 px frame per cluster of
the training features, routed by nearest prototype, the same linear mapping): with the
reference's SGD schedule, with Adam at visual-prompt's rate, with fewer, larger clusters (a
higher cut) and the diversity-unaware variant (one frame, the reference's ``--wo_da``). Reports
test accuracy, the number of clusters, train images/s and the fit time, as a Markdown table and
JSON in ``--out``. Throughputs on a shared CPU vary with its load: compare them on a quiet
machine or the GPU.

CPU (what bench/results/dam_vp_fmnist_cpu records)::

    .venv/bin/python bench/dam_vp_fmnist.py --device cpu --train-size 2000 --test-size 1000 \
        --epochs 3 --canvas 64 --batch-size 64 --out bench/results/dam_vp_fmnist_cpu

GPU (paper-scale canvas, full 60k/10k)::

    python bench/dam_vp_fmnist.py --device cuda --epochs 10 --canvas 224 --batch-size 128 \
        --workers 8 --out bench/results/dam_vp_fmnist_gpu
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
from visual_prompt_fmnist import subset
from vprompt.data.fashion_mnist import load_fashion_mnist
from vprompt.engine import evaluate, fit
from vprompt.methods.config import apply_overrides
from vprompt.methods.registry import METHODS


def recipes(args: argparse.Namespace) -> dict[str, tuple[str, list[str]]]:
    """Row name → (method, ``--set`` overrides); every row shares epochs and batch size."""
    common = [f"optim.epochs={args.epochs}", f"optim.batch_size={args.batch_size}"]
    inner = args.canvas * 3 // 4
    pad = (args.canvas - inner) // 2  # DAM-VP's frame as wide as visual-prompt's
    dam = [*common, f"canvas_size={args.canvas}", f"pad_width={pad}", "mapping=linear"]
    adam = ["optim.optimizer=adam", "optim.lr=0.01", "optim.warmup_epochs=0"]
    sgd = [f"optim.lr={args.sgd_lr}", f"optim.warmup_epochs={args.epochs / 5}"]
    return {
        "visual-prompt": (
            "visual-prompt",
            [*common, f"canvas_size={args.canvas}", f"inner_size={inner}", "mapping=linear"],
        ),
        "dam-vp (reference SGD)": ("dam-vp", [*dam, *sgd]),
        "dam-vp (Adam 0.01)": ("dam-vp", [*dam, *adam]),
        "dam-vp fewer clusters (Adam 0.01, threshold_ratio 1.15)": (
            "dam-vp",
            [*dam, *adam, "threshold_ratio=1.15"],
        ),
        "dam-vp single prompt (Adam 0.01)": ("dam-vp", [*dam, *adam, "diversity_aware=false"]),
    }


def render(info: dict[str, Any]) -> str:
    """The Markdown table of a results.json."""
    a = info["args"]
    lines = [
        f"# DAM-VP vs visual prompt: frozen MobileNetV2 → Fashion-MNIST ({info['device']}, "
        f"torch {info['torch']})",
        "",
        f"train {info['train_images']} / test {info['test_images']} images, canvas "
        f"{a['canvas']}, {a['epochs']} epochs, batch {a['batch_size']} (same for every row)",
        "",
        "Command: `" + info["command"] + "`",
        "",
        "| method | clusters | test acc. | train img/s | fit s | numbers in the pack |",
        "|---|---|---|---|---|---|",
    ]
    for r in info["rows"]:
        speed = f"{r['train_images_per_s']:.0f}" if r["train_images_per_s"] else "–"
        lines.append(
            f"| {r['method']} | {r['clusters'] or '–'} | {100 * r['test_accuracy']:.1f}% | "
            f"{speed} | {r['fit_seconds']} | {r['trainable_params']} |"
        )
    lines += [
        "",
        "DAM-VP rows: canvas-sized image, 8 px frame added to the normalised image, one per "
        "cluster of the frozen penultimate features of 1000 random training images "
        "(average linkage cut at threshold_ratio x their mean pairwise distance; default 1.0). "
        "visual-prompt: 48 px image inside a 64 px canvas, 8 px frame. Pack numbers count "
        "every cluster's full 3 x canvas² prompt (zero inside the frame) and the K x 1280 "
        "prototypes. Train img/s include DAM-VP's routing pass (one extra frozen forward per "
        "batch); the CPU is shared with other work, so throughputs are indicative only.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--train-size", type=int, default=None)
    ap.add_argument("--test-size", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--canvas", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--sgd-lr", type=float, default=None, help="default: dam-vp's optim.lr")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--rows", default=None, help="comma-separated row names (default: all)")
    ap.add_argument("--out", default="bench/results/dam_vp_fmnist")
    args = ap.parse_args()
    if args.sgd_lr is None:
        args.sgd_lr = METHODS.get("dam-vp").Config().optim.lr

    torch.manual_seed(0)
    splits = load_fashion_mnist()
    train = subset(splits.train, args.train_size, 0)
    test = subset(splits.test, args.test_size, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = recipes(args)
    chosen = args.rows.split(",") if args.rows else list(table)
    rows = []
    for key in chosen:
        method_name, sets = table[key]
        backbone = vprompt.load_backbone(
            "torchvision:mobilenet_v2", "IMAGENET1K_V1", device=args.device
        )
        cls = METHODS.get(method_name)
        method = cls(backbone, splits.classnames, apply_overrides(cls.Config(), sets))
        start = time.perf_counter()
        result = fit(
            method,
            train,
            out_dir=out / "runs" / "".join(ch if ch.isalnum() else "-" for ch in key),
            device=args.device,
            resume=False,
            num_workers=args.workers,
            progress=False,
        )
        seconds = time.perf_counter() - start
        scores = evaluate(
            method, test, device=args.device, num_workers=args.workers, progress=False
        )
        speeds = [h["images_per_s"] for h in result.history]
        state = method.prompt_state()
        rows.append(
            {
                "method": key,
                "set": sets,
                "clusters": int(state["prompts"].shape[0]) if method_name == "dam-vp" else None,
                "test_accuracy": scores.accuracy,
                "train_images_per_s": max(speeds) if speeds else None,
                "fit_seconds": round(seconds, 1),
                "trainable_params": sum(t.numel() for t in state.values()),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    info = {
        "device": torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "args": vars(args),
        "rows": rows,
        "train_images": len(train),
        "test_images": len(test),
        "command": "python " + " ".join(sys.argv),
    }
    (out / "results.json").write_text(json.dumps(info, indent=1) + "\n")
    text = render(info)
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
