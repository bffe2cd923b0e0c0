"""Adversarial patches: EOT placement, the frozen victim, universal training, PGD, robust eval."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from vprompt.attack import (
    PatchError,
    PatchFile,
    PatchTrainConfig,
    PatchTransformConfig,
    Placement,
    RobustConfig,
    Victim,
    apply_patch,
    evaluate_patch_on,
    grid_placements,
    linf_pgd,
    load_patch,
    patch_pgd,
    sample_placements,
    save_patch,
    success_rate,
    train_patch,
    victim_from_backbone,
    victim_from_method,
)
from vprompt.attack.eot import half_extent
from vprompt.data.dataset import DataSplits
from vprompt.errors import ConfigError

# ---------------------------------------------------------------------- helpers


class ListData:
    """A tiny in-memory dataset of PIL images that records which items were read."""

    def __init__(self, name: str, n: int, classnames: list[str], log: list[str], size: int = 20):
        gen = np.random.default_rng(len(name) + n)
        self.name = name
        self.classnames = classnames
        self.items = [
            (
                Image.fromarray(gen.integers(0, 255, (size, size, 3), dtype=np.uint8)),
                i % len(classnames),
            )
            for i in range(n)
        ]
        self.log = log

    def __len__(self) -> int:
        self.log.append(f"{self.name}:len")
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        self.log.append(f"{self.name}:{index}")
        return self.items[index]


class Linear(nn.Module):
    """logits = W · flatten(x) + b on 3 x 4 x 4 pixels."""

    def __init__(self, classes: int = 2, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(classes, 48, generator=gen))
        self.bias = nn.Parameter(torch.zeros(classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T + self.bias


def _identity(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(
        2, 0, 1
    )


def _linear_victim(classes: int = 2) -> Victim:
    return Victim(
        model=Linear(classes),
        classnames=[f"c{i}" for i in range(classes)],
        pixel_transform=_identity,
    )


@pytest.fixture(scope="module")
def tv_tiny():
    from vprompt import load_backbone

    return load_backbone("torchvision:tiny", "none")


@pytest.fixture(scope="module")
def tiny_victim(tv_tiny):
    classes = list(tv_tiny.source_classes[:3])
    return victim_from_backbone(tv_tiny, classes, {"model": "torchvision:tiny"})


# ---------------------------------------------------------------------- EOT placement


@pytest.mark.parametrize("shape", ["square", "circle"])
def test_placements_keep_the_whole_patch_inside(shape):
    """Over many seeded draws at the largest area and rotation, every pasted pixel lies inside
    the image: the same placement on a canvas with a margin puts nothing in the margin."""
    h, w, s, m = 40, 56, 24, 12
    cfg = PatchTransformConfig(
        size=0.5, shape=shape, scale_jitter=0.5, max_rotation=180, brightness=0.5
    )
    gen = torch.Generator().manual_seed(3)
    patch = torch.ones(3, s, s)
    for _ in range(5):
        where = sample_placements(200, h, w, cfg, patch_pixels=s, generator=gen)
        half = half_extent(where.side.double(), where.angle.double(), s, shape)
        cx, cy = where.center[:, 0].double(), where.center[:, 1].double()
        assert bool((cx - half >= -1e-4).all() and (cx + half <= w + 1e-4).all())
        assert bool((cy - half >= -1e-4).all() and (cy + half <= h + 1e-4).all())
        lit = Placement(where.center, where.side, where.angle, torch.ones(200))
        small = apply_patch(torch.zeros(200, 3, h, w), patch, lit, shape)
        shifted = Placement(where.center + m, where.side, where.angle, torch.ones(200))
        big = apply_patch(torch.zeros(200, 3, h + 2 * m, w + 2 * m), patch, shifted, shape)
        inner = big[..., m : m + h, m : m + w]
        margin = big.clone()
        margin[..., m : m + h, m : m + w] = 0
        assert float(margin.abs().max()) == 0.0
        assert torch.allclose(inner, small, atol=1e-5)
        assert float(small.min()) >= 0
        assert float(small.max()) <= 1


def test_paste_covers_the_requested_area_and_keeps_the_rest():
    h = w = 64
    s = 16
    cfg = PatchTransformConfig(size=0.1, scale_jitter=0.0, max_rotation=0.0, brightness=0.0)
    where = sample_placements(
        4, h, w, cfg, patch_pixels=s, generator=torch.Generator().manual_seed(0)
    )
    images = torch.full((4, 3, h, w), 0.25)
    out = apply_patch(images, torch.ones(3, s, s), where, "square")
    alpha = (out - 0.25) / 0.75  # 1 where the patch covers a pixel fully
    area = alpha[:, 0].sum(dim=(1, 2))
    assert torch.allclose(area, torch.full((4,), 0.1 * h * w), rtol=0.05)
    assert bool((alpha > 0.999).sum() > 0)


def test_grid_placements_span_the_image():
    cfg = PatchTransformConfig(size=0.1)
    grid = grid_placements(32, 32, cfg, patch_pixels=10, grid=3)
    assert len(grid) == 9
    half = half_extent(grid.side, grid.angle, 10, "square")
    assert float((grid.center - half.unsqueeze(1)).min()) == pytest.approx(0, abs=1e-4)
    assert float((grid.center + half.unsqueeze(1)).max()) == pytest.approx(32, abs=1e-4)


@pytest.mark.parametrize(
    "kwargs", [{"size": 0.0}, {"size": 0.7}, {"shape": "star"}, {"scale_jitter": 1.0}]
)
def test_transform_config_refuses_bad_values(kwargs):
    with pytest.raises(ConfigError):
        PatchTransformConfig(**kwargs)


# ---------------------------------------------------------------------- victim pipeline


def test_victim_splits_normalisation_from_the_method_transform(tiny_clip):
    """The victim reads [0, 1] pixels and normalises as the method's own transform does."""
    victim = victim_from_backbone(tiny_clip, ["cat", "dog"])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    pixels = victim.pixel_transform(image)
    assert float(pixels.min()) >= 0
    assert float(pixels.max()) <= 1
    method_input = victim.model.input_transform(False)(image)
    assert torch.allclose((pixels.unsqueeze(0) - victim.mean) / victim.std, method_input, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(
            victim(pixels.unsqueeze(0)), victim.model(method_input.unsqueeze(0)).logits, atol=1e-5
        )


def test_visual_prompt_victim_pastes_before_the_prompt(tv_tiny):
    """visual-prompt takes [0, 1] images and normalises inside forward: nothing is split off,
    so the patch lands on the inner image and the learned frame is added around it after."""
    from vprompt.methods.visual_prompt import VisualPrompt, VisualPromptConfig

    method = VisualPrompt(
        tv_tiny, ["a", "b"], VisualPromptConfig(mapping="random", canvas_size=64, inner_size=48)
    )
    victim = victim_from_method(method)
    assert not victim.normalises
    assert victim.pixel_transform(Image.new("RGB", (30, 30))).shape == (3, 48, 48)
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(victim(x), method(x).logits)


def test_classifier_victim_refuses_unknown_classes(tv_tiny):
    with pytest.raises(ConfigError, match="does not know 'zebra'"):
        victim_from_backbone(tv_tiny, ["zebra"])


# ---------------------------------------------------------------------- universal training


def _small_config(**kw):
    base = {
        "transform": PatchTransformConfig(size=0.1),
        "epochs": 2,
        "batch_size": 4,
        "seed": 5,
    }
    return PatchTrainConfig(**{**base, **kw})


def test_training_moves_only_the_patch_and_repeats_bit_for_bit(tiny_victim):
    log: list[str] = []
    train = ListData("train", 8, tiny_victim.classnames, log)
    before = {k: v.clone() for k, v in tiny_victim.state_dict().items()}
    first = train_patch(tiny_victim, train, _small_config(), progress=False)
    for key, value in tiny_victim.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in tiny_victim.parameters())
    second = train_patch(tiny_victim, train, _small_config(), progress=False)
    assert torch.equal(first.patch, second.patch)
    other = train_patch(tiny_victim, train, _small_config(seed=6), progress=False)
    assert not torch.equal(first.patch, other.patch)
    start = torch.rand(3, *first.patch.shape[1:], generator=torch.Generator().manual_seed(5))
    assert not torch.equal(first.patch, start)  # it learned something
    assert float(first.patch.min()) >= 0
    assert float(first.patch.max()) <= 1
    assert len(first.history) == 2


def test_gradient_reaches_only_the_patch(tiny_victim):
    patch = torch.rand(3, 8, 8, requires_grad=True)
    images = torch.rand(2, 3, 64, 64, requires_grad=False)
    cfg = PatchTransformConfig(size=0.1)
    where = sample_placements(
        2, 64, 64, cfg, patch_pixels=8, generator=torch.Generator().manual_seed(0)
    )
    tiny_victim(apply_patch(images, patch, where)).sum().backward()
    assert patch.grad is not None
    assert float(patch.grad.abs().sum()) > 0
    assert images.grad is None
    assert all(not p.requires_grad and p.grad is None for p in tiny_victim.parameters())


def test_sign_sgd_targeted_patch_pushes_towards_the_target():
    """On a linear victim the targeted objective is easy: the patch raises the target's share."""
    victim = _linear_victim(2)
    log: list[str] = []
    data = ListData("train", 8, victim.classnames, log, size=4)
    cfg = PatchTrainConfig(
        transform=PatchTransformConfig(size=0.5, max_rotation=0, scale_jitter=0),
        target=1,
        optimizer="sign-sgd",
        lr=0.1,
        epochs=3,
        batch_size=8,
    )
    trained = train_patch(victim, data, cfg, progress=False)
    assert trained.history[-1]["objective"] <= trained.history[0]["objective"]


# ---------------------------------------------------------------------- PGD


def test_linf_pgd_reaches_the_known_optimum_of_a_linear_model():
    """For two classes, CE(true) rises monotonically along sign(w_other - w_true), so the L∞
    optimum in [0, 1] is clip(x + eps * that sign): PGD must land exactly there."""
    victim = _linear_victim(2)
    x = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 0])
    w = victim.model.weight.detach()
    direction = torch.stack([w[1 - int(t)] - w[int(t)] for t in y]).view(3, 3, 4, 4).sign()
    eps = 0.1
    adv = linf_pgd(victim, x, y, eps=eps, step_size=0.03, steps=10, random_start=True,
                   generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert torch.equal(
        adv, (x + eps * direction).clamp(torch.clamp(x - eps, 0, 1), torch.clamp(x + eps, 0, 1))
    )
    targeted = linf_pgd(
        victim, x, y, eps=eps, step_size=0.03, steps=10, random_start=False, target=1
    )
    towards = (w[1] - w[0]).view(3, 4, 4).sign()
    expected = torch.minimum(
        torch.maximum(x + eps * towards, (x - eps).clamp(0, 1)), (x + eps).clamp(0, 1)
    )
    assert torch.equal(targeted, expected)


def test_linf_pgd_matches_an_independent_loop(tiny_victim):
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 2])
    eps, alpha, steps = 4 / 255, 1 / 255, 3
    ours = linf_pgd(tiny_victim, x, y, eps=eps, step_size=alpha, steps=steps, random_start=False)
    ref = x.clone()
    for _ in range(steps):  # Madry et al.: ascend, then project onto the ball and [0, 1]
        ref.requires_grad_(True)
        loss = nn.functional.cross_entropy(tiny_victim(ref), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, ref)
        ref = ref.detach() + alpha * g.sign()
        ref = torch.clamp(torch.min(torch.max(ref, x - eps), x + eps), 0, 1)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert float((ours - x).abs().max()) <= eps + 1e-6


def test_patch_pgd_changes_only_the_region_and_finds_the_box_optimum():
    victim = _linear_victim(2)
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([0, 1])
    adv = patch_pgd(victim, x, y, top=1, left=0, side=2, step_size=0.25, steps=8)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 1:3, 0:2] = 1
    assert torch.equal(adv * (1 - mask), x * (1 - mask))
    w = victim.model.weight.detach()
    for i, t in enumerate(y.tolist()):
        up = (w[1 - t] - w[t]).view(3, 4, 4) > 0
        best = torch.where(up, 1.0, 0.0)
        assert torch.equal(adv[i][:, 1:3, 0:2], best[:, 1:3, 0:2])


# ---------------------------------------------------------------------- success rates


def test_success_rate_definitions():
    labels = torch.tensor([0, 1, 2, 2])
    clean = torch.tensor([0, 1, 0, 2])  # image 2 is wrong when clean: not eligible untargeted
    adv = torch.tensor([[1, 0], [1, 1], [2, 2], [2, 0]])
    # untargeted, eligible 0, 1, 3: per image 1/2, 0/2, 1/2 → mean 1/3; any: 2/3
    assert success_rate(clean, adv, labels) == pytest.approx(1 / 3)
    assert success_rate(clean, adv, labels, reduce="any") == pytest.approx(2 / 3)
    # targeted at 0, eligible images whose label is not 0 (1, 2, 3): hits 0/2, 0/2, 1/2
    assert success_rate(clean, adv, labels, target=0) == pytest.approx(1 / 6)
    assert success_rate(clean, adv, labels, target=0, reduce="any") == pytest.approx(1 / 3)
    assert success_rate(torch.tensor([1]), torch.tensor([1]), torch.tensor([0])) is None


# ---------------------------------------------------------------------- robust eval, files


def test_robust_eval_reads_only_the_test_split(tiny_victim, tmp_path):
    log: list[str] = []
    names = tiny_victim.classnames
    splits = DataSplits(
        name="t",
        train=ListData("train", 4, names, log),
        val=ListData("val", 4, names, log),
        test=ListData("test", 5, names, log),
    )
    patch_file = PatchFile(
        patch=torch.rand(3, 6, 6), transform=PatchTransformConfig(size=0.1), classnames=names
    )
    report = evaluate_patch_on(
        tiny_victim, patch_file, splits, RobustConfig(placements=2, grid=2, batch_size=2),
        progress=False,
    )  # fmt: skip
    assert {entry.split(":")[0] for entry in log} == {"test"}
    assert report.images == 5
    for value in (report.clean_accuracy, report.patched_accuracy_random):
        assert 0 <= value <= 1
    # The worst case over positions can only be below the accuracy at any one of them.
    assert 0 <= report.patched_accuracy_worst <= 1
    again = evaluate_patch_on(
        tiny_victim, patch_file, splits, RobustConfig(placements=2, grid=2, batch_size=2),
        progress=False,
    )  # fmt: skip
    assert again.to_json() == report.to_json()


def test_patch_file_round_trip(tmp_path):
    original = PatchFile(
        patch=torch.rand(3, 5, 5),
        transform=PatchTransformConfig(size=0.05, shape="circle"),
        classnames=["a", "b"],
        target=1,
        victim={"model": "clip:tiny"},
    )
    path = save_patch(original, tmp_path / "p.safetensors")
    loaded = load_patch(path)
    assert torch.equal(loaded.patch, original.patch)
    assert loaded.transform == original.transform
    assert loaded.target == 1
    assert loaded.classnames == ["a", "b"]


def _write_raw(path: Path, tensor: torch.Tensor, meta: str | None = None) -> Path:
    from safetensors.torch import save_file

    save_file({"patch": tensor}, str(path), metadata={"vprompt": meta} if meta else None)
    return path


@pytest.mark.parametrize("case", ["shape", "nan", "range", "dtype", "pickle", "text", "nometa"])
def test_hostile_patch_files_are_refused(tmp_path, case):
    good = PatchFile(patch=torch.rand(3, 4, 4), transform=PatchTransformConfig(), classnames=["a"])
    meta = __import__("json").dumps(good.metadata())
    path = tmp_path / "bad.safetensors"
    if case == "shape":
        _write_raw(path, torch.rand(4, 4, 4), meta)
    elif case == "nan":
        _write_raw(path, torch.full((3, 4, 4), math.nan), meta)
    elif case == "range":
        _write_raw(path, torch.full((3, 4, 4), 2.0), meta)
    elif case == "dtype":
        _write_raw(path, torch.rand(3, 4, 4).double(), meta)
    elif case == "pickle":
        torch.save({"patch": torch.rand(3, 4, 4)}, path)
    elif case == "text":
        path.write_bytes(struct.pack("<Q", 10) + b"not json!!")
    else:
        _write_raw(path, torch.rand(3, 4, 4))
    with pytest.raises(PatchError, match=str(path)):
        load_patch(path)
