"""DAM-VP's meta-prompt: does a prompt meta-learned on some classes help on unseen ones?

Frozen ImageNet MobileNetV2, Fashion-MNIST split by class into three datasets: two meta-training
tasks (classes 0-2 and 3-5) and a held-out target (classes 6-9, never seen by the meta-training).
``dam-vp-meta`` learns the meta-prompt on the two tasks (Reptile, through the real engine and
its multi-dataset data); then ``dam-vp`` adapts to the target at one budget from three starting
points: the meta-prompt, the reference's random-normal prompt, and zeros (the plain image). All
rows read out through the most active neurons (``mapping=active``, the reference's
head-freezing set-up: no trained head, so the prompt does all the work). Reports target test
accuracy, the meta-training's steps and time, as Markdown and JSON in ``--out``.

CPU (what bench/results/dam_vp_meta_fmnist_cpu records)::

    .venv/bin/python bench/dam_vp_meta_fmnist.py --device cpu --meta-size 600 \
        --train-size 800 --test-size 2000 --meta-epochs 3 --epochs 3 --canvas 64 \
        --out bench/results/dam_vp_meta_fmnist_cpu

GPU (paper-scale canvas and meta-training length)::

    python bench/dam_vp_meta_fmnist.py --device cuda --meta-epochs 50 --epochs 20 --canvas 224 \
        --batch-size 128 --out bench/results/dam_vp_meta_fmnist_gpu
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
from PIL import Image

import vprompt
from vprompt.data.dataset import labels_of
from vprompt.data.fashion_mnist import load_fashion_mnist
from vprompt.data.union import DatasetUnion
from vprompt.engine import evaluate, fit
from vprompt.methods.config import apply_overrides
from vprompt.methods.registry import METHODS

META_TASKS = {"fmnist-0-2": (0, 1, 2), "fmnist-3-5": (3, 4, 5)}
TARGET = (6, 7, 8, 9)


class ClassSubset:
    """The items of some classes of a dataset, relabelled 0..k-1, at most ``n`` (seeded)."""

    def __init__(self, data: Any, classes: tuple[int, ...], n: int | None, seed: int) -> None:
        keep = {c: i for i, c in enumerate(classes)}
        labels = labels_of(data)
        index = [i for i, y in enumerate(labels) if y in keep]
        if n is not None and n < len(index):
            gen = torch.Generator().manual_seed(seed)
            index = sorted(index[int(j)] for j in torch.randperm(len(index), generator=gen)[:n])
        self.data, self.index = data, index
        self.labels = [keep[labels[i]] for i in index]
        self.classnames = [data.classnames[c] for c in classes]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return self.data[self.index[i]][0], self.labels[i]

    def all_labels(self) -> list[int]:
        return list(self.labels)


def build(name: str, backbone: Any, classes: list[str], sets: list[str]) -> Any:
    cls = METHODS.get(name)
    return cls(backbone, classes, apply_overrides(cls.Config(), sets))


def render(info: dict[str, Any]) -> str:
    a, meta = info["args"], info["meta"]
    lines = [
        f"# DAM-VP meta-prompt → unseen Fashion-MNIST classes, frozen MobileNetV2 "
        f"({info['device']}, torch {info['torch']})",
        "",
        f"meta-training: classes 0-2 and 3-5, {a['meta_size']} images each, {a['meta_epochs']} "
        f"epochs = {meta['steps']} meta steps ({meta['seconds']} s, kept step "
        f"{meta['kept_step']}); target: classes 6-9, train {info['train_images']} / test "
        f"{info['test_images']} images, {a['epochs']} epochs of dam-vp (Adam 0.01, batch "
        f"{a['batch_size']}), canvas {a['canvas']}, read-out: the 4 most active neurons",
        "",
        "Command: `" + info["command"] + "`",
        "",
        "| dam-vp starts from | clusters | target test acc. | fit s |",
        "|---|---|---|---|",
    ]
    for r in info["rows"]:
        lines.append(
            f"| {r['init']} | {r['clusters']} | {100 * r['test_accuracy']:.1f}% | "
            f"{r['fit_seconds']} |"
        )
    lines += [
        "",
        f"Meta-prompt's loss after each meta step (first → last): {meta['first_loss']:.4f} → "
        f"{meta['last_loss']:.4f}. The CPU is shared with other work: times are indicative.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--meta-size", type=int, default=None, help="images per meta task")
    ap.add_argument("--train-size", type=int, default=None)
    ap.add_argument("--test-size", type=int, default=None)
    ap.add_argument("--meta-epochs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--canvas", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default="bench/results/dam_vp_meta_fmnist")
    args = ap.parse_args()

    splits = load_fashion_mnist()
    tasks = [
        (name, ClassSubset(splits.train, classes, args.meta_size, k))
        for k, (name, classes) in enumerate(META_TASKS.items())
    ]
    union = DatasetUnion(tasks)
    train = ClassSubset(splits.train, TARGET, args.train_size, 10)
    test = ClassSubset(splits.test, TARGET, args.test_size, 11)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pad = args.canvas // 8
    geometry = [f"canvas_size={args.canvas}", f"pad_width={pad}"]

    def backbone() -> Any:
        return vprompt.load_backbone(
            "torchvision:mobilenet_v2", "IMAGENET1K_V1", device=args.device
        )

    torch.manual_seed(0)
    meta_sets = [*geometry, f"optim.epochs={args.meta_epochs}", "optim.batch_size=32"]
    meta = build("dam-vp-meta", backbone(), union.classnames, meta_sets)
    start = time.perf_counter()
    meta_fit = fit(meta, union, out_dir=out / "runs" / "meta", device=args.device,
                   resume=False, progress=True)  # fmt: skip
    meta_seconds = round(time.perf_counter() - start, 1)
    notes = meta.pack_notes()

    adapt = [*geometry, "mapping=active", f"optim.epochs={args.epochs}",
             f"optim.batch_size={args.batch_size}", "optim.optimizer=adam", "optim.lr=0.01",
             "optim.warmup_epochs=0"]  # fmt: skip
    rows = []
    for init, extra in (
        ("the meta-prompt (dam-vp-meta)", [f"meta_prompt={meta_fit.pack_path}"]),
        ("random normal (the reference without meta-training)", ["prompt_init=normal"]),
        ("zeros (the plain image)", ["prompt_init=zeros"]),
    ):
        torch.manual_seed(0)
        method = build("dam-vp", backbone(), train.classnames, [*adapt, *extra])
        start = time.perf_counter()
        fit(method, train, out_dir=out / "runs" / init.split()[0], device=args.device,
            resume=False, progress=False)  # fmt: skip
        seconds = round(time.perf_counter() - start, 1)
        scores = evaluate(method, test, device=args.device, progress=False)
        rows.append(
            {
                "init": init,
                "clusters": int(method.prototypes.shape[0]),
                "test_accuracy": scores.accuracy,
                "fit_seconds": seconds,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    losses = notes["meta_losses"]
    info = {
        "device": torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "args": vars(args),
        "meta": {
            "steps": len(losses),
            "seconds": meta_seconds,
            "kept_step": notes["kept_step"],
            "first_loss": losses[0],
            "last_loss": losses[-1],
        },
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
