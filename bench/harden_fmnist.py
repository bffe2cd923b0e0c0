"""Hardening the quickstart's Fashion-MNIST visual-prompt pack against a 10% universal patch.

The pack is the one ``scripts/quickstart.py`` trains (frozen ImageNet MobileNetV2, a learned
padding prompt and a linear label map; 48 px inner image on a 64 px canvas). On a seeded subset
of the TRAINING split, :func:`vprompt.attack.harden_report.harden_pack`

1. trains a patch from scratch against the original pack (Brown et al. 2017, EOT placements),
2. hardens the prompt (Madry et al. 2018's adversarial training, the patch re-trained against
   the current prompt for ``--patch-steps`` steps every epoch, warm-started),
3. trains a patch from scratch against the hardened pack (same budget and seed),

then scores both packs on a seeded subset of the TEST split with the same seeded placements:
clean accuracy, accuracy with the patch at random placements and at the worst of a 3 x 3 grid
of positions. The last column (the hardened pack under the original's patch) is not adaptive
and only shows how a transfer evaluation would flatter the defence.

CPU (what bench/results/harden_fmnist_cpu records)::

    .venv/bin/python bench/harden_fmnist.py \
        --pack runs/quickstart/visual-prompt/prompt.safetensors --train-size 2000 \
        --test-size 10000 --epochs 3 --patch-steps 10 --attack-epochs 2 \
        --out bench/results/harden_fmnist_cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import vprompt
from vprompt.attack.eot import PatchTransformConfig
from vprompt.attack.harden import HardenConfig
from vprompt.attack.harden_report import AttackBudget, harden_pack, markdown_comparison
from vprompt.data.fashion_mnist import load_fashion_mnist
from vprompt.engine.pack import load_pack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pack", default="runs/quickstart/visual-prompt/prompt.safetensors")
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--size", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--patch-steps", type=int, default=10)
    parser.add_argument("--mix", type=float, default=0.5)
    parser.add_argument("--attack-epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    pack = load_pack(args.pack)
    splits = load_fashion_mnist(None)
    config = HardenConfig(
        transform=PatchTransformConfig(size=args.size),
        epochs=args.epochs,
        patch_steps=args.patch_steps,
        mix=args.mix,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    budget = AttackBudget(
        epochs=args.attack_epochs,
        placements=4,
        grid=3,
        train_subset=args.train_size,
        test_subset=args.test_size,
    )
    start = time.perf_counter()
    outcome = harden_pack(
        pack,
        splits,
        config,
        budget,
        args.out / "run",
        pack_source=args.pack,
        data_spec="fashion-mnist",
        device=args.device,
        batch_size=args.batch_size,
        progress=False,
    )
    seconds = time.perf_counter() - start
    command = " ".join([".venv/bin/python", *sys.argv])
    result = {
        "command": command,
        "seconds": round(seconds, 1),
        "vprompt_version": vprompt.__version__,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        **outcome.summary,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown_comparison(outcome)
    text = f"{table}\n`{command}`\n\n{seconds:.0f} s on {torch.get_num_threads()} CPU threads.\n"
    (args.out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
