"""Prompts without labels or training: zero-shot CLIP against the label-free and test-time
methods, on the same data and backbone in one run.

Rows (``--methods``, any registered method; these by default):

* ``zeroshot``: the class names in the template, nothing learned;
* ``tpt``: test-time prompt tuning, the context tuned on each test image's views on its own
  (nothing learned beforehand);
* ``tfup`` / ``tfup-t``: a cache of pseudo-labelled training images (TFUP-T also trains
  adapters on pseudo-labels); they see the K-shot training images **with every label
  hidden** (each item's label is -1), or with ``--transductive`` the test images themselves,
  unlabelled, as the reference runs them;
* ``proapo``: a training-free search over text prompts scored on the labelled K-shot images.

Every row builds its method with the engine's config rule (``Experiment.build``: the method's
defaults, its reference settings and the template of a benchmark dataset, then ``--set``),
runs ``fit`` (set-up, search or training) when it uses training data and ``evaluate`` on the
same test images, and reports test accuracy, the change against zero-shot, the fit and test
seconds and the test throughput. No feature cache: every row encodes its own images, so the
seconds compare whole runs. Writes ``results.json`` and ``results.md`` to ``--out``.

Real accuracy (CLIP weights; GPU)::

    python bench/label_free_accuracy.py --model clip:ViT-B-16 --weights openai \
        --data oxford_pets --data-root DIR --shots 16 --device cuda \
        --out bench/results/label_free_accuracy_oxford_pets

Machinery check with random weights (what bench/results/label_free_accuracy_tiny records;
accuracies meaningless)::

    .venv/bin/python bench/label_free_accuracy.py --model clip:tiny --weights none \
        --data fashion-mnist --test-size 200 --shots 4 --device cpu --threads 2 \
        --out bench/results/label_free_accuracy_tiny
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

import vprompt
from vprompt.data.dataset import ClassificationDataset, DataSplits, Subset, labels_of
from vprompt.data.fewshot import sample_indices_per_class
from vprompt.data.folder import UNLABELED
from vprompt.engine import evaluate, fit
from vprompt.engine.experiment import Experiment, benchmark_dataset, random_subset
from vprompt.engine.runtime import seed_everything
from vprompt.errors import VPromptError
from vprompt.methods.base import PromptMethod
from vprompt.utils.io import atomic_write_text

DEFAULT_METHODS = ("zeroshot", "tpt", "tfup", "tfup-t", "proapo")


class WithoutLabels:
    """A dataset's images, each labelled -1 (unlabelled), so a label-free row cannot read one."""

    def __init__(self, base: ClassificationDataset) -> None:
        self.base = base
        self.classnames = list(base.classnames)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        image, _ = self.base[index]
        return image, UNLABELED

    def all_labels(self) -> list[int]:
        return [UNLABELED] * len(self.base)


def load_splits(args: argparse.Namespace) -> tuple[DataSplits, ClassificationDataset, Any]:
    """The data, its K-shot training split and the test subset; the benchmark dataset (or
    None) whose reference settings and template the methods take."""
    suite = benchmark_dataset(args.data)
    if suite is not None:  # the reference's seeded K-shot split (CoOp's split files)
        splits = vprompt.load_data(
            args.data, data_root=args.data_root, shots=args.shots, seed=args.seed
        )
        train: ClassificationDataset = splits.train
    else:  # other sources: K images per class, the same sampler, seeded
        splits = vprompt.load_data(args.data, data_root=args.data_root)
        rng = random.Random(args.seed)
        chosen = sample_indices_per_class(labels_of(splits.train), args.shots, rng)
        train = Subset(splits.train, chosen)
    return splits, train, suite


def overrides_for(name: str, sets: Sequence[str]) -> tuple[str, ...]:
    """The ``KEY=VALUE`` overrides of one row from ``METHOD:KEY=VALUE`` strings."""
    return tuple(s.split(":", 1)[1] for s in sets if s.split(":", 1)[0] == name)


def learns_from(method: type[PromptMethod], transductive: bool) -> str:
    """What the row's method sees besides the class names (from its declared capabilities)."""
    caps = method.capabilities
    if not caps.uses_training_data:
        return "each test image, at test time" if caps.inputs == "images" else "nothing"
    if not caps.uses_labels:
        return "test images, unlabelled" if transductive else "K-shot images, unlabelled"
    return "K-shot images + labels"


def run_row(
    name: str,
    args: argparse.Namespace,
    backbone: Any,
    data: dict[str, Any],
    suite: Any,
    folder: Path,
) -> dict[str, Any]:
    """Build, fit (when the method uses training data) and test one method; times each."""
    sets = overrides_for(name, args.set)
    experiment = Experiment(name, None, sets)
    cls = experiment.method_class
    config, notes = experiment.config(
        shots=args.shots,
        dataset=suite.name if suite else None,
        template=suite.template if suite else None,
    )
    seed_everything(args.seed)
    method = cls(backbone, data["test"].classnames, config)
    row: dict[str, Any] = {"method": name, "learns_from": learns_from(cls, args.transductive)}
    row["overrides"], row["config_notes"] = list(sets), notes
    fit_seconds, epochs = 0.0, None
    if cls.capabilities.uses_training_data:
        train = data["train"]
        if not cls.capabilities.uses_labels:
            train = WithoutLabels(data["test"] if args.transductive else train)
        started = time.perf_counter()
        result = fit(
            method, train, select="last", out_dir=folder / name, device=args.device,
            seed=args.seed, resume=False, progress=args.progress,
        )  # fmt: skip
        fit_seconds, epochs = time.perf_counter() - started, result.epochs_run
        row["train_images"] = len(train)
    trains = cls.capabilities.trains
    batch = max(method.config.optim.batch_size, 64) if trains else 256  # as train_and_test
    started = time.perf_counter()
    scores = evaluate(
        method, data["test"], device=args.device, batch_size=batch, progress=args.progress,
        desc=f"{name} test",
    )  # fmt: skip
    test_seconds = time.perf_counter() - started
    row.update(
        test_accuracy=scores.accuracy,
        test_images=scores.n,
        fit_seconds=fit_seconds,
        test_seconds=test_seconds,
        test_images_per_s=scores.n / test_seconds if test_seconds > 0 else None,
        epochs=epochs,
    )
    return row


def render(r: dict[str, Any]) -> str:
    """results.md from a results.json."""
    lines = []
    if r["weights"] == "none":
        lines += [
            "> **Random weights (`--weights none`): these rows check the machinery (every method "
            "runs end to end on the same data, with its times); the accuracies are meaningless.** "
            "Real accuracy needs CLIP weights, e.g. "
            "`python bench/label_free_accuracy.py --model clip:ViT-B-16 --weights openai "
            "--data oxford_pets --data-root DIR --shots 16 --device cuda "
            "--out bench/results/label_free_accuracy_oxford_pets`.",
            "",
        ]
    lines += [
        f"# Prompts without labels or training: {r['data']} ({r['machine']})",
        "",
        f"`{r['command']}`",
        "",
        f"{r['model']} ({r['weights']}) on {r['device']} (torch {r['torch']}, {r['threads']} "
        f"threads); {r['classes']} classes, {r['test_images']} test images, {r['shots']}-shot "
        f"training split ({r['train_images']} images, seed {r['seed']}).",
        "",
        "| method | learns from | test acc. | Δ vs zero-shot | fit s | test s | test img/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        delta = row.get("delta_vs_zeroshot")
        shown = "–" if delta is None else f"{100 * delta:+.1f} pt"
        speed = row["test_images_per_s"]
        label = row["method"] + (f" ({', '.join(row['overrides'])})" if row["overrides"] else "")
        lines.append(
            f"| {label} | {row['learns_from']} | {100 * row['test_accuracy']:.1f}% | "
            f"{shown} | {row['fit_seconds']:.1f} | {row['test_seconds']:.1f} | "
            f"{'–' if speed is None else f'{speed:.1f}'} |"
        )
    lines += [
        "",
        "Every row builds its method with the engine's config rule (defaults, the reference "
        "settings and template of a benchmark dataset, `--set`), runs `fit` when it uses "
        "training data (`select=last`: no validation labels either) and `evaluate` on the same "
        "test images, without a feature cache (every row encodes its own images). The "
        "label-free rows (tfup, tfup-t) get their images with every label replaced by -1. "
        "tpt tunes its context on 1 + views augmented views of every test image, so its "
        "throughput is per original image. Seconds are wall-clock after one untimed warm-up "
        "batch; on a shared CPU they vary with its load.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="clip:ViT-B-16")
    ap.add_argument("--weights", default="openai")
    ap.add_argument(
        "--data",
        default="oxford_pets",
        help="A --data spec (benchmark name, folder:PATH, fashion-mnist …)",
    )
    ap.add_argument("--data-root", default=None, help="Folder of the benchmark datasets")
    ap.add_argument("--shots", type=int, default=16, help="Training images per class")
    ap.add_argument("--test-size", type=int, default=None, help="Seeded subset of the test split")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="Comma list")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="METHOD:KEY=VALUE",
        help="Config override of one row (repeatable), e.g. tpt:views=15",
    )
    ap.add_argument(
        "--transductive",
        action="store_true",
        help="tfup/tfup-t learn from the test images, unlabelled (as the reference does)",
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    ap.add_argument("--out", type=Path, default=Path("bench/results/label_free_accuracy"))
    args = ap.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [s for s in args.set if ":" not in s or s.split(":", 1)[0] not in args.methods]
    if bad:
        ap.error(f"--set takes METHOD:KEY=VALUE for one of --methods; got {', '.join(bad)}")
    if args.shots < 1:
        ap.error("--shots must be at least 1")
    for name in args.methods:  # unknown names and bad overrides fail before any model loads
        try:
            Experiment(name, None, overrides_for(name, args.set))
        except VPromptError as exc:
            ap.error(str(exc))
    return args


def main(argv: Sequence[str] | None = None) -> None:
    from vprompt.backbones.registry import resolve_device

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = resolve_device(args.device)
    splits, train, suite = load_splits(args)
    test = random_subset(splits.test, args.test_size, args.seed + 1)
    backbone: Any = vprompt.load_backbone(args.model, args.weights, device=args.device)
    with torch.no_grad():  # warm-up (image decoding, thread pools, first kernels), not timed
        first = [backbone.transform(test[i][0]) for i in range(min(64, len(test)))]
        backbone.encode_image(torch.stack(first).to(args.device))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods:
            row = run_row(name, args, backbone, {"train": train, "test": test}, suite, Path(tmp))
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    zero = next((r["test_accuracy"] for r in rows if r["method"] == "zeroshot"), None)
    for row in rows:
        row["delta_vs_zeroshot"] = None if zero is None else row["test_accuracy"] - zero
    result = {
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv]),
        "model": args.model,
        "weights": args.weights,
        "data": args.data,
        "benchmark_dataset": suite.name if suite else None,
        "device": str(args.device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "vprompt": vprompt.__version__,
        "machine": platform.machine(),
        "classes": len(test.classnames),
        "shots": args.shots,
        "seed": args.seed,
        "train_images": len(train),
        "test_images": len(test),
        "transductive": args.transductive,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "results.json", json.dumps(result, indent=1) + "\n")
    text = render(result)
    atomic_write_text(args.out / "results.md", text)
    print(text)


if __name__ == "__main__":
    main()
