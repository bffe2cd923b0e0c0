"""Defences against a universal patch on the quickstart's Fashion-MNIST visual-prompt pack.

The patch is one trained by ``bench/patch_attack_fmnist.py`` (by default its 10% untargeted
one). Each defence runs before the frozen model (MobileNetV2 + the pack's padding prompt and
label map) exactly as ``vprompt defend eval`` runs it: clean accuracy without and with the
defence, accuracy under the patch at seeded random placements and at the worst grid position
without and with it (the same patched images for both columns), and PatchCleanser's certified
fraction. All on the TEST split. PatchCleanser evaluates every pair of its 36 masks per image
(666 forwards), so it runs on a smaller seeded subset with fewer placements.

CPU (what bench/results/patch_defend_fmnist_cpu records)::

    .venv/bin/python bench/patch_defend_fmnist.py \
        --patch bench/results/patch_attack_fmnist_cpu/size10_untargeted.safetensors \
        --test-size 10000 --cleanser-test-size 200 --out bench/results/patch_defend_fmnist_cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

import vprompt
from vprompt.attack.patch_file import load_patch
from vprompt.attack.robust import RobustConfig
from vprompt.attack.victim import input_size, victim_from_method
from vprompt.data.fashion_mnist import load_fashion_mnist
from vprompt.defend import DEFENSES, build_defense
from vprompt.defend.evaluate import covering_fraction, evaluate_defense_on
from vprompt.engine.pack import build_from_pack, load_pack


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def render(info: dict[str, Any]) -> str:
    lines = [
        f"# Patch defences: quickstart Fashion-MNIST pack ({info['device']}, torch "
        f"{info['torch']})",
        "",
        f"Patch: `{info['patch']}` ({info['patch_kind']}); victim: frozen ImageNet MobileNetV2 "
        "with the quickstart's padding prompt and linear label map. Test split only.",
        "",
        "Command: `" + info["command"] + "`",
        "",
        "| defence | test images | placements / grid | clean | clean, defended | patched random "
        "| defended | patched worst | defended | certified robust | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in info["rows"]:
        lines.append(
            f"| {r['defense']} | {r['images']} | {r['placements']} / {r['grid']}x{r['grid']} | "
            f"{percent(r['clean_accuracy'])} | {percent(r['clean_accuracy_defended'])} | "
            f"{percent(r['patched_accuracy_random'])} | "
            f"{percent(r['patched_accuracy_random_defended'])} | "
            f"{percent(r['patched_accuracy_worst'])} | "
            f"{percent(r['patched_accuracy_worst_defended'])} | "
            f"{percent(r['certified_accuracy'])} | {r['seconds']} |"
        )
    lines += [
        "",
        "Defence settings: each defence's defaults; feature-mask and PatchCleanser expect a "
        f"patch of the square that holds every placement of this one ({info['covering']:.3f} "
        "of the image). The CPU is shared with other work: seconds are indicative.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--pack", default="runs/quickstart/visual-prompt/prompt.safetensors")
    ap.add_argument(
        "--patch", default="bench/results/patch_attack_fmnist_cpu/size10_untargeted.safetensors"
    )
    ap.add_argument("--defenses", default="lgs,feature-mask,patchcleanser")
    ap.add_argument("--test-size", type=int, default=10000)
    ap.add_argument("--cleanser-test-size", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    patch_file = load_patch(args.patch)
    pack = load_pack(args.pack)
    method = build_from_pack(pack, device=args.device)
    victim = victim_from_method(method, {"pack": args.pack, "method": pack.method})
    splits = load_fashion_mnist()
    height, width = input_size(victim, splits.test[0][0])
    covering = covering_fraction(
        patch_file.transform, height, width, int(patch_file.patch.shape[-1])
    )
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.defenses.split(","):
        cleanser = name == "patchcleanser"
        config = RobustConfig(placements=1 if cleanser else 4, grid=2 if cleanser else 3, seed=0)
        subset = args.cleanser_test_size if cleanser else args.test_size
        fields = {f.name for f in dataclasses.fields(DEFENSES.get(name).config_class())}
        sets = [f"patch_size={covering}"] if "patch_size" in fields else []
        defense = build_defense(name, victim, sets)
        start = time.perf_counter()
        report = evaluate_defense_on(
            victim, defense, splits, patch_file, config, test_subset=subset
        )
        row = {
            **report.to_json(),
            "placements": config.placements,
            "grid": config.grid,
            "seconds": round(time.perf_counter() - start, 1),
        }
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("defense", "images", "seconds")}), flush=True)
    info = {
        "device": platform.processor() or "cpu",
        "torch": torch.__version__,
        "vprompt": vprompt.__version__,
        "patch": args.patch,
        "patch_kind": "untargeted" if patch_file.target is None else "targeted",
        "covering": covering,
        "rows": rows,
        "command": "python " + " ".join(sys.argv),
    }
    (args.out / "results.json").write_text(json.dumps(info, indent=1) + "\n")
    text = render(info)
    (args.out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
