"""Hardening a prompt against universal patches (adversarial training, ``attack harden``)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from vprompt.attack.eot import PatchTransformConfig
from vprompt.attack.harden import (
    HardenConfig,
    adapt_patch,
    attacked_view,
    harden,
    harden_epoch,
    hardening_optim,
)
from vprompt.attack.harden_report import AttackBudget, harden_pack
from vprompt.attack.universal import iter_batches
from vprompt.attack.victim import split_input_transform
from vprompt.data.dataset import DataSplits
from vprompt.engine.optim import build_optimizer, flat_params
from vprompt.engine.pack import build_from_pack, load_pack, save_pack
from vprompt.engine.runtime import epoch_seed
from vprompt.engine.schedule import LRSchedule
from vprompt.errors import ConfigError
from vprompt.methods.config import config_from_dict
from vprompt.methods.registry import METHODS

NAMES = ["a", "b", "c"]


class ListData:
    """A tiny in-memory dataset of PIL images that records which items were read."""

    def __init__(self, name: str, n: int, log: list[str], classnames: list[str] = NAMES):
        gen = np.random.default_rng(len(name) + n)
        self.name, self.classnames, self.log = name, list(classnames), log
        self.items = [
            (
                Image.fromarray(gen.integers(0, 255, (20, 20, 3), dtype=np.uint8)),
                i % len(classnames),
            )
            for i in range(n)
        ]

    def __len__(self) -> int:
        self.log.append(f"{self.name}:len")
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        self.log.append(f"{self.name}:{index}")
        return self.items[index]


@pytest.fixture(scope="module")
def tv_tiny():
    from vprompt import load_backbone

    return load_backbone("torchvision:tiny", "none")


@pytest.fixture(scope="module")
def vit_tiny():
    from vprompt import load_backbone

    return load_backbone("timm:tiny-vit", "none")


def _method(name, backbone, classnames=NAMES, **config):
    cls = METHODS.get(name)
    return cls(backbone, classnames, config_from_dict(cls.Config, config))


def _vp(backbone, classnames=NAMES, **optim):
    """visual-prompt on torchvision:tiny: [0, 1] input, BatchNorm + dropout in the backbone;
    the label map (zeros at first) set to seeded noise so images change the logits."""
    method = _method(
        "visual-prompt", backbone, classnames, kind="padding", mapping="linear",
        canvas_size=32, inner_size=24, mapping_lr_scale=1.0,
        optim={"optimizer": "sgd", "lr": 0.05, "batch_size": 3, **optim},
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in method.mapping.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return method


def _vpt(backbone, **optim):
    """VPT on timm:tiny-vit: normalised input, prompt tokens + head."""
    return _method(
        "vpt", backbone, num_tokens=2, dropout=0.0,
        optim={"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3,
               "batch_size": 3, "warmup_epochs": 0, **optim},
    )  # fmt: skip


def _cfg(**kw) -> HardenConfig:
    base = {"transform": PatchTransformConfig(size=0.1), "epochs": 2, "patch_steps": 2}
    return HardenConfig(**{**base, **kw})


def _all_tensors(module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (persistent or not), cloned."""
    out = {f"p:{n}": p.detach().clone() for n, p in module.named_parameters()}
    out.update({f"b:{n}": b.detach().clone() for n, b in module.named_buffers()})
    return out


# ---------------------------------------------------------------------- what changes


def test_backbone_bit_identical_and_only_the_prompt_moves(tv_tiny):
    """Every backbone tensor (weights, BatchNorm statistics, counters) is bit-identical after
    hardening, and of the method's own tensors exactly the trainable parameters change."""
    method = _vp(tv_tiny)
    trainable = {id(p) for p in flat_params(method.trainable_parameters())}
    names = {n for n, p in method.named_parameters() if id(p) in trainable}
    backbone_before = _all_tensors(tv_tiny)
    before = _all_tensors(method)
    flags = {n: p.requires_grad for n, p in method.named_parameters()}
    log: list[str] = []
    harden(method, ListData("train", 7, log), _cfg(mix=0.5), progress=False)
    after_backbone = _all_tensors(tv_tiny)
    assert backbone_before.keys() == after_backbone.keys()
    for key, value in backbone_before.items():
        assert torch.equal(value, after_backbone[key]), key
    after = _all_tensors(method)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"p:{n}" for n in names}
    assert {n: p.requires_grad for n, p in method.named_parameters()} == flags
    assert not tv_tiny.training


def test_patch_step_never_reaches_the_prompt(tv_tiny):
    """Step (1): the prompt is frozen while the patch learns (no .grad, no change), and its
    flags come back afterwards."""
    method = _vp(tv_tiny)
    params = flat_params(method.trainable_parameters())
    before = [p.detach().clone() for p in params]
    seen_flags: list[bool] = []
    method.register_forward_pre_hook(lambda *_: seen_flags.extend(p.requires_grad for p in params))
    victim = attacked_view(method)
    assert all(p.requires_grad for p in params)
    start = torch.full((3, 8, 8), 0.5)
    patch, stats = adapt_patch(
        victim, ListData("train", 6, []), start, _cfg().patch_config(3), steps=3,
        order=torch.Generator().manual_seed(0), placements=torch.Generator().manual_seed(1),
    )  # fmt: skip
    assert seen_flags
    assert not any(seen_flags)
    assert all(p.grad is None for p in params)
    assert all(torch.equal(a, p) for a, p in zip(before, params, strict=True))
    assert all(p.requires_grad for p in params)
    assert not torch.equal(patch, start)  # the patch did learn
    assert torch.equal(start, torch.full((3, 8, 8), 0.5))  # warm start copied, not mutated
    assert stats["patch_fooled"] is not None


def test_prompt_step_never_changes_the_patch(tv_tiny):
    """Step (2): the patch is a constant: no gradient reaches it and its values stay."""
    method = _vp(tv_tiny)
    config = _cfg(mix=1.0)
    optim = hardening_optim(method.config.optim, config)
    groups = method.trainable_parameters()
    params = flat_params(groups)
    before = [p.detach().clone() for p in params]
    victim = attacked_view(method)
    patch = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    kept = patch.detach().clone()
    train = ListData("train", 6, [])
    record = harden_epoch(
        method, victim, train, patch, build_optimizer(groups, optim),
        LRSchedule.from_config(optim, steps_per_epoch=2), params=params, optim=optim, epoch=0,
        start_step=0, steps=2, mix=1.0, transform=config.transform, seed=0,
        placements=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert patch.grad is None
    assert torch.equal(patch.detach(), kept)
    assert not all(torch.equal(a, p) for a, p in zip(before, params, strict=True))
    assert record["clean_loss"] is None
    assert record["patched_loss"] is not None


# ---------------------------------------------------------------------- the definition


def _ordinary_epoch(method, train, *, seed: int, lr: float, momentum: float, wd: float, bs: int):
    """One epoch of plain prompt training, written from the definition: the method's forward in
    train mode on normalised pixels, cross-entropy, SGD with momentum and weight decay, the
    cosine rate (no warm-up) set before every step, batches shuffled by epoch_seed."""
    pixel, mean, std = split_input_transform(method.input_transform(False))
    params = flat_params(method.trainable_parameters())
    sgd = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd)
    total = math.ceil(len(train) / bs)
    order = torch.Generator().manual_seed(epoch_seed(seed, 0))
    method.train()
    batches = iter_batches(train, pixel, batch_size=bs, device=torch.device("cpu"), generator=order)
    for step, (images, labels) in enumerate(batches):
        for group in sgd.param_groups:
            group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / total))
        x = images
        if mean is not None:
            x = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        loss = F.cross_entropy(method(x).logits.float(), labels)
        sgd.zero_grad(set_to_none=True)
        loss.backward()
        sgd.step()
    method.eval()


@pytest.mark.parametrize("which", ["vp", "vpt"])
def test_mix0_without_patch_steps_is_ordinary_training(tv_tiny, vit_tiny, which):
    """mix=0 and patch-steps=0: one hardening epoch equals one epoch of plain training of the
    prompt (same optimizer settings, same batches) bit for bit; mix=0.5 does not."""

    def build():
        if which == "vp":
            return _vp(tv_tiny, momentum=0.9, weight_decay=1e-3)
        return _vpt(vit_tiny)

    train = ListData("train", 8, [])
    ours, ref, mixed = build(), build(), build()
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), ref.parameters(), strict=True))
    harden(ours, train, _cfg(epochs=1, patch_steps=0, mix=0.0, seed=3), progress=False)
    _ordinary_epoch(ref, train, seed=3, lr=0.05, momentum=0.9, wd=1e-3, bs=3)
    for (name, a), b in zip(ours.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b), name
    harden(mixed, train, _cfg(epochs=1, patch_steps=0, mix=0.5, seed=3), progress=False)
    assert not all(
        torch.equal(a, b) for a, b in zip(mixed.parameters(), ref.parameters(), strict=True)
    )


def test_same_seed_same_prompt_other_seed_differs(tv_tiny):
    train = ListData("train", 6, [])
    runs = {}
    for key, seed in (("a", 0), ("b", 0), ("c", 1)):
        method = _vp(tv_tiny)
        result = harden(method, train, _cfg(seed=seed), progress=False)
        runs[key] = (method.prompt_state(), result.patch, result.history)
    (sa, pa, ha), (sb, pb, hb), (sc, pc, _) = runs["a"], runs["b"], runs["c"]
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(pa, pb)
    assert ha == hb
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert not torch.equal(pa, pc)


# ---------------------------------------------------------------------- packs and data


def test_pipeline_reads_test_only_after_training_and_the_pack_round_trips(tv_tiny, tmp_path):
    """harden_pack: hardening and both from-scratch attacks read only the training split, the
    test split is read afterwards, the validation split never; the hardened pack is the same
    method, says it was hardened, loads and predicts."""
    source = tmp_path / "original.safetensors"
    save_pack(_vp(tv_tiny), source)
    pack = load_pack(source)
    log: list[str] = []
    splits = DataSplits(
        name="t", train=ListData("train", 6, log), val=ListData("val", 3, log),
        test=ListData("test", 5, log),
    )  # fmt: skip
    budget = AttackBudget(epochs=1, placements=2, grid=2)
    outcome = harden_pack(
        pack, splits, _cfg(epochs=1, patch_steps=2), budget, tmp_path / "out",
        pack_source=str(source), data_spec="list", batch_size=3, progress=False,
    )  # fmt: skip
    split_of = [entry.split(":")[0] for entry in log]
    assert "val" not in split_of
    first_test = split_of.index("test")
    assert "train" not in split_of[first_test:]
    assert outcome.original.images == outcome.hardened.images == 5
    out = tmp_path / "out"
    for name in (
        "prompt.safetensors",
        "patch.safetensors",
        "patch.png",
        "harden.json",
        "harden.md",
        "attack_original.safetensors",
        "attack_hardened.safetensors",
    ):
        assert (out / name).is_file(), name  # fmt: skip
    report = json.loads((out / "harden.json").read_text())
    assert report["split"] == "test"
    assert report["settings"]["mix"] == 0.5
    hardened = load_pack(out / "prompt.safetensors")
    assert hardened.method == pack.method
    assert hardened.config == pack.config
    assert hardened.extra["hardened"]["patch_steps"] == 2
    assert hardened.extra["hardened"]["from_pack"] == str(source.absolute())
    method = build_from_pack(hardened, backbone=tv_tiny)
    images = [splits.test.items[i][0] for i in range(2)]
    assert len(method.predict(images, top_k=1)) == 2
    assert not all(torch.equal(pack.tensors[k], hardened.tensors[k]) for k in pack.tensors)


def test_config_refuses_bad_values():
    for bad in (-0.1, 1.5, math.nan, True):
        with pytest.raises(ConfigError, match="mix"):
            HardenConfig(mix=bad)
    with pytest.raises(ConfigError, match="patch_steps"):
        HardenConfig(patch_steps=-1)
    with pytest.raises(ConfigError, match="epochs"):
        HardenConfig(epochs=0)
    with pytest.raises(ConfigError, match="optimizer"):
        HardenConfig(patch_optimizer="sgd")  # type: ignore[arg-type]


def test_training_free_method_is_refused(tiny_clip):
    zeroshot = _method("zeroshot", tiny_clip)
    with pytest.raises(ConfigError, match="does not train a prompt"):
        harden(zeroshot, ListData("train", 3, []), _cfg(), progress=False)


# ---------------------------------------------------------------------- CLI


def _folder_pack(tv_tiny, tiny_folder, tmp_path):
    from vprompt.data.sources import load_data

    names = list(load_data(f"folder:{tiny_folder}").train.classnames)
    path = tmp_path / "vp.safetensors"
    save_pack(_vp(tv_tiny, names, batch_size=4), path)
    return path


def test_cli_harden_end_to_end(run_cli, tiny_folder, tv_tiny, tmp_path):
    """The real CLI: a visual-prompt pack hardened on the folder's training split, compared on
    its 6 test images; the hardened pack then serves `attack eval --pack`."""
    pack = _folder_pack(tv_tiny, tiny_folder, tmp_path)
    out = tmp_path / "hard"
    result = run_cli(
        "attack", "harden", "--pack", pack, "--data", f"folder:{tiny_folder}", "--size", "0.1",
        "--shape", "circle", "--epochs", "1", "--patch-steps", "2", "--mix", "0.5",
        "--attack-epochs", "1", "--placements", "1", "--grid", "1", "--batch-size", "4",
        "--seed", "1", "--out", out, "--device", "cpu", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["split"] == "test"
    assert summary["original"]["images"] == summary["hardened"]["images"] == 6
    assert summary["settings"]["transform"]["shape"] == "circle"
    assert summary["settings"]["train_images"] == 12
    assert load_pack(out / "prompt.safetensors").extra["hardened"]["seed"] == 1
    from vprompt.cli import main

    evaluated = CliRunner().invoke(
        main,
        ["attack", "eval", "--patch", str(out / "attack_hardened.safetensors"),
         "--pack", str(out / "prompt.safetensors"), "--data", f"folder:{tiny_folder}",
         "--placements", "1", "--grid", "1", "--out", str(tmp_path / "eval"), "--json"],
    )  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.output)["images"] == 6


@pytest.mark.parametrize("case", ["zeroshot", "mix"])
def test_cli_hostile_inputs_are_one_line_errors(case, tiny_clip, tv_tiny, tiny_folder, tmp_path):
    from vprompt.cli import main

    mix = "0.5"
    if case == "zeroshot":
        from vprompt.data.sources import load_data

        names = list(load_data(f"folder:{tiny_folder}").train.classnames)
        pack = tmp_path / "zs.safetensors"
        save_pack(_method("zeroshot", tiny_clip, names), pack)
    else:
        pack, mix = _folder_pack(tv_tiny, tiny_folder, tmp_path), "1.5"
    result = CliRunner().invoke(
        main,
        ["attack", "harden", "--pack", str(pack), "--data", f"folder:{tiny_folder}",
         "--mix", mix, "--out", str(tmp_path / "out")],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("vprompt: error: ")
    assert ("does not train a prompt" if case == "zeroshot" else "mix") in lines[0]
    assert "Traceback" not in result.output
