"""MaPLe against the multimodal-prompt-learning reference, written from the paper in the test."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vl_reference as ref
from vprompt.engine.experiment import Experiment
from vprompt.engine.pack import load_pack
from vprompt.errors import ConfigError
from vprompt.methods.maple import MaPLe, MaPLeConfig

CLASSES = ["cat", "golden_retriever", "moth"]


def _maple(backbone, seed: int = 0, **config) -> MaPLe:
    torch.manual_seed(seed)
    return MaPLe(backbone, CLASSES, MaPLeConfig(**{"depth": 2, **config}))


def _reference_learner(backbone, seed: int, depth: int):
    """``MultiModalPromptLearner.__init__``'s parameters, created in its order."""
    torch.manual_seed(seed)
    width_t, width_v = backbone.text_width, backbone.vision_width
    with torch.no_grad():
        ctx = backbone.embed_tokens(backbone.tokenize(["a photo of a"]))[0, 1:3]
    proj = nn.Linear(width_t, width_v)
    deep = [nn.init.normal_(torch.empty(2, width_t), std=0.02) for _ in range(depth - 1)]
    single = nn.Linear(width_t, width_v)
    couplings = [copy.deepcopy(single) for _ in range(depth - 1)]
    return ctx, proj, deep, couplings


def test_parameters_start_as_the_reference_learner_makes_them(tiny_clip) -> None:
    method = _maple(tiny_clip, seed=5)
    ctx, proj, deep, couplings = _reference_learner(tiny_clip, 5, depth=2)
    assert torch.equal(method.ctx.detach(), ctx)
    assert torch.equal(method.proj.weight, proj.weight)
    assert torch.equal(method.proj.bias, proj.bias)
    assert torch.equal(method.text_deep[0].detach(), deep[0])
    assert torch.equal(method.couplings[0].weight, couplings[0].weight)
    assert not torch.equal(_maple(tiny_clip, seed=6).proj.weight, method.proj.weight)


def test_every_deep_coupling_starts_equal(vit_b16) -> None:
    method = MaPLe(vit_b16, CLASSES, MaPLeConfig())  # J = 9: 8 couplings of 512 → 768
    assert len(method.couplings) == 8
    assert len(method.text_deep) == 8
    assert method.couplings[0].weight.shape == (768, 512)
    first = method.couplings[0].weight
    assert all(torch.equal(c.weight, first) for c in method.couplings)
    assert not torch.equal(method.proj.weight, first)
    assert method.ctx.shape == (2, 512)


def test_logits_and_gradients_equal_the_reference(tiny_clip) -> None:
    method = _maple(tiny_clip).train()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([1, 0, 2])
    F.cross_entropy(method(images).logits, labels).backward()
    ours = {n: p.grad.clone() for n, p in method.named_parameters() if p.requires_grad}

    twin = copy.deepcopy(method)  # the same parameters, run through the reference towers
    twin.zero_grad()
    model = tiny_clip.model
    text = ref.text_features(
        model, tiny_clip._tokenizer, CLASSES, twin.ctx, list(twin.text_deep), "a photo of a"
    )
    vision = [twin.proj(twin.ctx), twin.couplings[0](twin.text_deep[0])]
    logits = ref.logits(model, ref.image_features(model, images, vision), text)
    F.cross_entropy(logits, labels).backward()
    with torch.no_grad():
        torch.testing.assert_close(method.eval()(images).logits, logits, atol=1e-4, rtol=1e-5)
    want = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    assert (
        set(ours)
        == set(want)
        == {
            "ctx",
            "proj.weight",
            "proj.bias",
            "text_deep.0",
            "couplings.0.weight",
            "couplings.0.bias",
        }
    )
    for name, grad in want.items():
        assert float(grad.abs().max()) > 0, name
        torch.testing.assert_close(ours[name], grad, atol=1e-5 * float(grad.abs().max()), rtol=1e-3)


def test_shallow_maple_prompts_only_the_inputs(tiny_clip) -> None:
    method = _maple(tiny_clip, depth=1)
    prompts = method.prompts()
    assert prompts.text_deep == []
    assert len(prompts.vision) == 1
    assert len(method.couplings) == 0


def test_settings_that_cannot_run_are_refused(tiny_clip) -> None:
    with pytest.raises(ConfigError, match="text prompt depth 9 is more than clip:tiny's 2"):
        MaPLe(tiny_clip, CLASSES)
    with pytest.raises(ConfigError, match="depth must be an integer from 1"):
        MaPLeConfig(depth=0)


def test_presets_are_the_reference_configs() -> None:
    b2n, _ = Experiment("maple", preset="maple/base-to-novel").config()
    assert (b2n.depth, b2n.n_ctx, b2n.ctx_init) == (9, 2, "a photo of a")
    assert (b2n.optim.lr, b2n.optim.epochs, b2n.optim.batch_size) == (0.0035, 5, 4)
    xd, _ = Experiment("maple", preset="maple/cross-dataset").config()
    assert (xd.depth, xd.optim.lr, xd.optim.epochs) == (3, 0.0026, 2)


def test_train_and_predict_through_the_cli(tiny_folder, run_cli, tmp_path) -> None:
    out = tmp_path / "maple"
    res = run_cli("train", "--method", "maple", "--model", "clip:tiny", "--weights", "none",
                  "--data", f"folder:{tiny_folder}", "--out", out, "--set", "depth=2",
                  "--set", "optim.epochs=1", "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["test_images"] == 6
    pack = load_pack(out / "prompt.safetensors")
    assert pack.method == "maple"
    assert pack.config["depth"] == 2
    assert pack.tensors["couplings.0.weight"].shape == (64, 64)
    image = next((tiny_folder / "test" / "blue_thing").glob("*.png"))
    pred = run_cli("predict", "--pack", out / "prompt.safetensors", image, "--json")
    assert pred.returncode == 0, pred.stderr
    assert len(json.loads(pred.stdout)["predictions"]) == 3


def test_cross_dataset_protocol_with_the_preset(run_cli, tmp_path) -> None:
    from vprompt.data.suite.synthetic import write_fake_dataset

    root = tmp_path / "suite"
    write_fake_dataset("imagenet", root, num_classes=3, images_per_class=(2, 1, 1))
    write_fake_dataset("dtd", root, num_classes=2, images_per_class=(2, 1, 2))
    res = run_cli("protocol", "cross-dataset", "--preset", "maple/cross-dataset", "--model",
                  "clip:tiny", "--weights", "none", "--data-root", root, "--datasets", "dtd",
                  "--shots", "2", "--seeds", "1", "--set", "depth=2", "--set", "optim.epochs=1",
                  "--out", tmp_path / "xd", "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    table = (tmp_path / "xd" / "table.md").read_text()
    assert "| Method | Source | DTD | Average |" in table  # laid out like the papers' table
    record = json.loads(
        (tmp_path / "xd" / "jobs" / "imagenet" / "shots_2" / "seed_1" / "result.json").read_text()
    )
    assert set(record["metrics"]["targets"]) == {"dtd"}
    pack = load_pack(
        tmp_path
        / "xd"
        / "jobs"
        / "imagenet"
        / "shots_2"
        / "seed_1"
        / "train"
        / "prompt.safetensors"
    )
    assert (pack.config["depth"], pack.config["optim"]["lr"]) == (2, 0.0026)  # preset + --set
