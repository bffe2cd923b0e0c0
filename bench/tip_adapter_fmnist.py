"""Tip-Adapter, Tip-Adapter-F and a linear probe, 16-shot, on the frozen ImageNet MobileNetV2.

The real check of the method contract's worked example: Fashion-MNIST, 16 training images per
class (the reference's seeded sampler), 4 per class for the α/β search (from the remaining
training images), the full test split; penultimate (1280-d) features, no text tower, so
Tip-Adapter is pure in-context classification from the labelled support set. Every vprompt
run goes through the real engine (``fit`` + ``evaluate``) with one shared feature cache, and
a plain reference-style Tip-Adapter (torchvision's model, the reference's ``build_cache_model``
loop, ``pre_load_features``, ``search_hp``) runs in the same process for the time and accuracy
comparison. Writes ``results.json`` and ``results.md`` to ``--out``.

CPU (what bench/results/tip_adapter_fmnist_cpu records)::

    .venv/bin/python bench/tip_adapter_fmnist.py --device cpu --threads 2 \
        --out bench/results/tip_adapter_fmnist_cpu

GPU (H100/H200; not yet recorded)::

    python bench/tip_adapter_fmnist.py --device cuda --workers 8 \
        --out bench/results/tip_adapter_fmnist_gpu
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import vprompt
from vprompt.data.dataset import Subset, TransformedDataset
from vprompt.data.fashion_mnist import load_fashion_mnist
from vprompt.data.feature_cache import FeatureCache
from vprompt.data.fewshot import sample_indices_per_class
from vprompt.engine import evaluate, fit
from vprompt.methods.config import apply_config_mapping
from vprompt.methods.registry import METHODS
from vprompt.methods.tip_adapter import search_grid

SHOTS, VAL_SHOTS = 16, 4


def few_shot(labels: list[int], seed: int) -> tuple[list[int], list[int]]:
    """16 training and 4 validation images per class, Dassl's sampler, disjoint."""
    rng = random.Random(seed)
    train = sample_indices_per_class(labels, SHOTS, rng)
    taken = set(train)
    rest = [i for i in range(len(labels)) if i not in taken]
    val = [rest[i] for i in sample_indices_per_class([labels[i] for i in rest], VAL_SHOTS, rng)]
    return train, val


def run_vprompt(
    name: str, config: dict[str, Any], backbone: Any, data: dict[str, Any], args: Any, out: Path
) -> dict[str, Any]:
    cls = METHODS.get(name)
    torch.manual_seed(args.seed)
    method = cls(backbone, data["train"].classnames, apply_config_mapping(cls.Config(), config))
    started = time.perf_counter()
    result = fit(
        method, data["train"], val=data["val"], select="last", out_dir=out / name,
        device=args.device, seed=args.seed, progress=False, num_workers=args.workers,
        feature_cache=data["cache"], resume=False,
    )  # fmt: skip
    fitted = time.perf_counter() - started
    started = time.perf_counter()
    scores = evaluate(
        method, data["test"], device=args.device, progress=False, num_workers=args.workers,
        feature_cache=data["cache"],
    )  # fmt: skip
    row = {
        "fit_seconds": fitted,
        "test_seconds": time.perf_counter() - started,
        "test_accuracy": scores.accuracy,
        "epochs": result.epochs_run,
        "pack_numbers": sum(v.numel() for v in method.prompt_state().values()),
    }
    if name.startswith("tip-adapter"):
        row["alpha"], row["beta"] = float(method.alpha), float(method.beta)
    return row


# ---------------------------------------------------------------------------- the reference
def reference_tip_adapter(data: dict[str, Any], args: Any) -> dict[str, Any]:
    """The reference's pipeline on torchvision's own model (no vprompt method code)."""
    from torchvision import models
    from torchvision import transforms as T

    weights = models.MobileNet_V2_Weights.IMAGENET1K_V1
    model = models.mobilenet_v2(weights=weights).eval().to(args.device)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    rgb = T.Lambda(lambda im: im.convert("RGB"))
    crop = T.RandomResizedCrop(224, scale=(0.5, 1), interpolation=T.InterpolationMode.BICUBIC)
    train_tf = T.Compose(
        [rgb, crop, T.RandomHorizontalFlip(p=0.5), T.ToTensor(), T.Normalize(mean, std)]
    )
    test_tf = T.Compose([rgb, weights.transforms()])

    @torch.no_grad()
    def features(dataset: Any, transform: Any) -> tuple[torch.Tensor, torch.Tensor]:
        loader = DataLoader(TransformedDataset(dataset, transform), batch_size=256,
                            num_workers=args.workers)  # fmt: skip
        feats, labels = [], []
        for images, target in loader:
            x = model.features(images.to(args.device))
            feats.append(F.adaptive_avg_pool2d(x, 1).flatten(1).float().cpu())
            labels.append(target)
        return torch.cat(feats), torch.cat(labels)

    features(Subset(data["test"], list(range(64))), test_tf)  # warm-up, not timed
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    views = []
    for _ in range(10):  # augment_epoch
        feats, labels = features(data["train"], train_tf)
        views.append(feats.unsqueeze(0))
    keys = torch.cat(views).mean(dim=0)
    keys /= keys.norm(dim=-1, keepdim=True)
    keys = keys.permute(1, 0)
    values = F.one_hot(labels).float()
    cache_seconds = time.perf_counter() - started
    started = time.perf_counter()
    val_f, val_l = features(data["val"], test_tf)
    val_f /= val_f.norm(dim=-1, keepdim=True)
    best, best_beta, best_alpha = 0.0, 0.0, 0.0
    for beta in search_grid(7.0, 200):
        for alpha in search_grid(3.0, 20):
            tip = ((-1) * (beta - beta * (val_f @ keys))).exp() @ values * alpha
            acc = 100 * float((tip.argmax(1) == val_l).float().mean())
            if acc > best:
                best, best_beta, best_alpha = acc, beta, alpha
    search_seconds = time.perf_counter() - started
    started = time.perf_counter()
    test_f, test_l = features(data["test"], test_tf)
    test_f /= test_f.norm(dim=-1, keepdim=True)
    tip = ((-1) * (best_beta - best_beta * (test_f @ keys))).exp() @ values * best_alpha
    test_seconds = time.perf_counter() - started
    return {
        "fit_seconds": cache_seconds + search_seconds,
        "test_seconds": test_seconds,
        "test_accuracy": float((tip.argmax(1) == test_l).float().mean()),
        "alpha": best_alpha,
        "beta": best_beta,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="Fashion-MNIST folder (default: Debian's)")
    parser.add_argument("--test-size", type=int, default=None, help="Subset of the test split")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/tip_adapter_fmnist_cpu"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    splits = load_fashion_mnist(args.data, download=False)
    train_idx, val_idx = few_shot(splits.train.all_labels(), args.seed)
    test = splits.test
    if args.test_size:
        gen = torch.Generator().manual_seed(args.seed)
        test = Subset(
            test, sorted(torch.randperm(len(test), generator=gen)[: args.test_size].tolist())
        )
    backbone = vprompt.load_backbone(
        "torchvision:mobilenet_v2", "IMAGENET1K_V1", device=args.device
    )
    runs = {
        "tip-adapter (training-free)": ("tip-adapter", {}),
        "tip-adapter-f": ("tip-adapter-f", {}),
        "linear-probe (16-shot)": (
            "linear-probe",
            {"optim": {"epochs": 100, "batch_size": 32}},
        ),
    }
    with torch.no_grad():  # warm-up (thread pools, first kernels), not timed
        backbone.features(torch.zeros(64, 3, 224, 224, device=args.device))
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = {
            "train": Subset(splits.train, train_idx),
            "val": Subset(splits.train, val_idx),
            "test": test,
            "cache": FeatureCache(Path(tmp) / "features"),
        }
        rows["reference Tip-Adapter (plain loop)"] = reference_tip_adapter(data, args)
        for label, (name, config) in runs.items():
            rows[label] = run_vprompt(name, config, backbone, data, args, Path(tmp))
            print(label, rows[label], file=sys.stderr)
        # The same training-free run again: the cache now holds every feature it needs.
        rows["tip-adapter, warm feature cache"] = run_vprompt(
            "tip-adapter", {}, backbone, data, args, Path(tmp) / "warm"
        )

    ref = rows["reference Tip-Adapter (plain loop)"]
    cold = rows["tip-adapter (training-free)"]
    warm = rows["tip-adapter, warm feature cache"]
    summary = {
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv]),
        "backbone": "torchvision:mobilenet_v2 (IMAGENET1K_V1, frozen)",
        "device": args.device,
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "train_images": len(train_idx),
        "val_images": len(val_idx),
        "test_images": len(test),
        "runs": rows,
        "ratios": {
            "cold run time, reference / vprompt": (ref["fit_seconds"] + ref["test_seconds"])
            / (cold["fit_seconds"] + cold["test_seconds"]),
            "warm run time, reference / vprompt": (ref["fit_seconds"] + ref["test_seconds"])
            / (warm["fit_seconds"] + warm["test_seconds"]),
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        "# 16-shot Fashion-MNIST on the frozen ImageNet MobileNetV2: Tip-Adapter vs a linear probe",
        "",
        f"`{summary['command']}`",
        "",
        f"{summary['backbone']} on {args.device} ({args.threads} threads, torch "
        f"{torch.__version__}); {len(train_idx)} training images (16 per class, seed "
        f"{args.seed}), {len(val_idx)} validation images (4 per class, for the α/β search), "
        f"{len(test)} test images; penultimate features at 224 px.",
        "",
        "| run | test acc. | fit (s) | test (s) | α | β | pack numbers |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, row in rows.items():
        alpha = f"{row['alpha']:.3g}" if "alpha" in row else "–"
        beta = f"{row['beta']:.3g}" if "beta" in row else "–"
        numbers = f"{row['pack_numbers']:,}" if "pack_numbers" in row else "–"
        lines.append(
            f"| {label} | {100 * row['test_accuracy']:.1f}% | {row['fit_seconds']:.1f} | "
            f"{row['test_seconds']:.1f} | {alpha} | {beta} | {numbers} |"
        )
    lines += [
        "",
        "Run time of the reference's plain loop over vprompt's, same process: "
        f"{summary['ratios']['cold run time, reference / vprompt']:.2f}x with an empty feature "
        f"cache, {summary['ratios']['warm run time, reference / vprompt']:.1f}x once the cache "
        "holds the features (a second method, another α/β, a re-run). The cold runs encode "
        "the same images (10 augmented views of each training image, the validation and test "
        "splits); Tip-Adapter-F and the linear probe then reuse the cached features.",
        "",
        "Most of the cold-run difference is the input layout: vprompt hands CNNs channels-last "
        "batches (the NHWC kernels), the reference loop feeds torchvision's model the usual "
        "NCHW ones.",
        "",
        "Accuracies of the reference loop and vprompt's training-free run differ only through "
        "the random augmentations of the cache views (vprompt draws each view from a seed per "
        "image and view). No text tower: the zero-shot term is absent, so α only scales the "
        "logits and the search effectively picks β. Read the accuracies with that in mind: "
        "the reference's grid (β from 0.1, made for CLIP) ends at its lowest β here, because "
        "MobileNetV2's penultimate features are non-negative (after a ReLU) and so all "
        "cosine-similar; the linear probe wins on these features, and Tip-Adapter-F recovers "
        "most of the gap.",
    ]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
