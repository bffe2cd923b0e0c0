"""vprompt's main job: adapt the frozen ImageNet MobileNetV2 to Fashion-MNIST with a pixel prompt.

Runs two real CLI commands — the mapping-only baseline with the frequency label mapping
("before") and a learned padding prompt with a learned linear label mapping ("after") — and
prints where the pack and plots were written.
The last line is ``accuracy: before=NN.N% after=NN.N%`` on the full 10,000-image test set.
Sizes are chosen so the whole job fits in ~10 minutes on a 2-core CPU; on a GPU use the
``bench/`` script for the paper-scale setting.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart")
COMMON = [
    "--model",
    "torchvision:mobilenet_v2",
    "--weights",
    "IMAGENET1K_V1",
    "--data",
    "fashion-mnist",
    "--json",
]
# A small canvas keeps the CPU budget: the 28x28 images are resized to INNER inside CANVAS.
CANVAS, INNER = 64, 48
PROMPT = [f"--set=canvas_size={CANVAS}", f"--set=inner_size={INNER}", "--set=optim.batch_size=64"]


def run(name: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "vprompt", "train", *COMMON, "--out", str(OUT / name), *extra]
    print("$ vprompt " + " ".join(cmd[3:]), flush=True)
    start = time.time()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"quickstart: `{name}` failed with exit code {proc.returncode}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"  {name}: test accuracy {100 * report['test_accuracy']:.1f}% "
        f"({time.time() - start:.0f} s)",
        flush=True,
    )
    return report


def main() -> None:
    # "before": the frozen model read out through the frequency label mapping (FLM), the
    # standard visual-prompting baseline; "after": a learned padding prompt (free pixel values
    # starting black, i.e. from the mapping-only input) read out through a learned linear label
    # mapping (AutoVP's FullyMap) that learns at a tenth of the frame's rate. See README for
    # the linear mapping alone.
    before = run("mapping-only", [*PROMPT, "--method", "mapping-only", "--set=mapping=frequency"])
    after = run(
        "visual-prompt",
        [
            *PROMPT,
            "--method",
            "visual-prompt",
            "--set=kind=padding",
            "--set=pixel_range=free",
            "--set=mapping=linear",
            "--set=mapping_lr_scale=0.1",
            "--set=optim.epochs=1",
        ],
    )
    folder = Path(after["pack"]).parent
    print(f"prompt pack: {after['pack']}")
    print(
        f"plots:       {folder}/learning_curves.png, {folder}/prompt.png, "
        f"{folder}/prompted_examples.png"
    )
    print(
        f"accuracy: before={100 * before['test_accuracy']:.1f}% "
        f"after={100 * after['test_accuracy']:.1f}%"
    )


if __name__ == "__main__":
    main()
