"""PromptSRC against its reference trainer (muzairkhattak/PromptSRC trainers/promptsrc.py),
written from the paper in the test: each agreement term, the frozen features, GPA."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vl_reference as ref
from vprompt.engine import fit
from vprompt.engine.experiment import Experiment
from vprompt.engine.pack import load_pack
from vprompt.errors import ConfigError
from vprompt.methods.promptsrc import (
    IMAGENET_TEMPLATES_60,
    PromptSRC,
    PromptSRCConfig,
    frozen_text_features,
    gpa_weights,
)

CLASSES = ["cat", "golden_retriever", "moth"]
TEMPLATES = ("a photo of a {}.", "a drawing of the {}.", "itap of a {}.")
TINY = {"n_ctx_text": 2, "n_ctx_vision": 2, "text_depth": 2, "vision_depth": 2}


def _method(backbone, seed: int = 0, classes=CLASSES, **config) -> PromptSRC:
    if "optim" in config:
        config["optim"] = dataclasses.replace(PromptSRCConfig().optim, **config["optim"])
    torch.manual_seed(seed)
    return PromptSRC(
        backbone, classes, PromptSRCConfig(**{**TINY, "templates": TEMPLATES, **config})
    )


def test_frozen_text_features_average_unnormalised_template_features(tiny_clip) -> None:
    model = tiny_clip.model
    per_template = []
    with torch.no_grad():
        for template in TEMPLATES:  # the reference's loop over IMAGENET_TEMPLATES
            texts = [template.replace("{}", c.replace("_", " ")) for c in CLASSES]
            per_template.append(model.encode_text(tiny_clip.tokenize(texts)).unsqueeze(1))
    fixed = torch.cat(per_template, dim=1).mean(dim=1)
    want = fixed / fixed.norm(dim=-1, keepdim=True)
    got = frozen_text_features(tiny_clip, CLASSES, TEMPLATES, chunk=4)  # chunks cut templates
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert len(IMAGENET_TEMPLATES_60) == 60
    assert len(set(IMAGENET_TEMPLATES_60)) == 60


def test_each_agreement_term_and_the_gradient_equal_the_reference(tiny_clip) -> None:
    method = _method(tiny_clip).train()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 2, 1])
    out = method(images)
    loss = F.cross_entropy(out.logits, labels) + sum(out.aux_loss.values())
    loss.backward()
    ours = {n: p.grad.clone() for n, p in method.named_parameters() if p.requires_grad}

    # The reference CustomCLIP.forward and PromptSRC.forward_backward, on the same prompts.
    model = tiny_clip.model
    leaves = {
        n: p.detach().clone().requires_grad_(True)
        for n, p in method.named_parameters()
        if p.requires_grad
    }
    deep, vision = [leaves["text_deep.0"]], [leaves["vision.0"], leaves["vision.1"]]
    text = ref.text_features(
        model, tiny_clip._tokenizer, CLASSES, leaves["ctx"], deep, "a photo of a"
    )
    image = ref.image_features(model, images, vision)
    logits = ref.logits(model, image, text)
    with torch.no_grad():
        fixed = frozen_text_features(tiny_clip, CLASSES, TEMPLATES)
        zs_image = model.encode_image(images)
        zs_image = zs_image / zs_image.norm(dim=-1, keepdim=True)
        zs_logits = model.logit_scale.exp() * zs_image @ fixed.t()
    terms = {
        "scl_text": F.l1_loss(text, fixed, reduction="mean") * 25,
        "scl_image": F.l1_loss(image, zs_image, reduction="mean") * 10,
        "scl_logits": F.kl_div(
            F.log_softmax(logits / 1, dim=1),
            F.log_softmax(zs_logits / 1, dim=1),
            reduction="sum",
            log_target=True,
        )
        * (1 * 1)
        / logits.numel(),
    }
    assert set(out.aux_loss) == set(terms)
    for name, value in terms.items():
        assert float(value.detach()) > 0
        torch.testing.assert_close(out.aux_loss[name], value, atol=1e-6, rtol=1e-4)
    (F.cross_entropy(logits, labels) + sum(terms.values())).backward()
    for name, leaf in leaves.items():
        want = leaf.grad
        assert want is not None, name
        assert float(want.abs().max()) > 0, name
        torch.testing.assert_close(ours[name], want, atol=1e-5 * float(want.abs().max()), rtol=1e-3)


def test_evaluation_returns_logits_only(tiny_clip) -> None:
    method = _method(tiny_clip).eval()
    with torch.no_grad():
        out = method(torch.randn(2, 3, 32, 32))
    assert out.aux_loss == {}
    assert out.logits.shape == (2, 3)
    assert method._frozen_text is None  # inference never builds the frozen text features


def _reference_gauss(epochs: int, mean: float, std: float) -> np.ndarray:
    """``PromptSRC.build_model``: the density at 1 … N, normalised."""
    gauss = [
        (1 / (std * np.sqrt(2 * np.pi))) * np.exp(-0.5 * ((a - mean) / std) ** 2)
        for a in range(1, epochs + 1)
    ]
    return np.array(gauss) / sum(gauss)


@pytest.mark.parametrize(
    ("epochs", "mean", "std"), [(20, 15, 1), (20, 6, 10), (50, 45, 5), (3, 2, 1)]
)
def test_gpa_weights_are_the_reference_gaussian(epochs, mean, std) -> None:
    np.testing.assert_allclose(gpa_weights(epochs, mean, std), _reference_gauss(epochs, mean, std),
                               rtol=1e-12, atol=0)  # fmt: skip
    # Far from the mean the reference's densities underflow to 0/0; ours stay a distribution.
    far = gpa_weights(2, 1000.0, 1.0)
    assert far == [0.0, 1.0]


def test_after_each_epoch_the_prompts_aggregate_as_the_reference_does(tiny_clip) -> None:
    epochs = 3
    method = _method(tiny_clip, gpa_mean=2.0, gpa_std=1.0, optim={"epochs": epochs})
    weights = gpa_weights(epochs, 2.0, 1.0)
    previous = None  # the reference's previous_model_gpa over the prompt state
    for epoch in range(epochs):
        with torch.no_grad():
            for p in method.trainable_parameters():
                p.add_(torch.randn_like(p))  # a "training epoch"
        state = {n: p.detach().clone() for n, p in method.named_parameters()}
        weighted = {k: v * weights[epoch] for k, v in state.items()}
        previous = weighted if previous is None else {k: previous[k] + weighted[k] for k in state}
        method.after_epoch(epoch, data=None)  # type: ignore[arg-type]
    assert previous is not None
    for name, param in method.named_parameters():
        if param.requires_grad:
            assert torch.equal(param.detach(), previous[name]), name


def test_a_run_ends_on_the_aggregate_and_resumes_bit_for_bit(
    tiny_clip, tiny_folder, tmp_path
) -> None:
    from vprompt.data.folder import ImageFolder

    train = ImageFolder(tiny_folder / "train")
    config = {"gpa_mean": 2.0, "optim": {"epochs": 3, "batch_size": 4}, "classes": train.classnames}
    straight = _method(tiny_clip, seed=1, **config)
    fit(straight, train, out_dir=tmp_path / "a", progress=False, seed=1)

    def stop(event) -> None:
        if event.kind == "epoch" and event.epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(_method(tiny_clip, seed=1, **config), train, out_dir=tmp_path / "b", progress=False,
            seed=1, callbacks=[stop])  # fmt: skip
    resumed = _method(tiny_clip, seed=1, **config)
    fit(resumed, train, out_dir=tmp_path / "b", progress=False, seed=1)
    again = resumed.prompt_state()
    for name, value in straight.prompt_state().items():
        assert torch.equal(value, again[name]), name
    flat = torch.cat([p.detach().reshape(-1) for p in straight._gpa_parameters()])
    assert torch.equal(flat, straight.gpa_sum)  # the prompts are the aggregate
    pack = load_pack(tmp_path / "a" / "prompt.safetensors")
    assert torch.equal(pack.tensors["ctx"], straight.ctx.detach())


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="gpa_std must be > 0"):
        PromptSRCConfig(gpa_std=0.0)
    with pytest.raises(ConfigError, match="text_loss_weight"):
        PromptSRCConfig(text_loss_weight=-1.0)
    with pytest.raises(ConfigError, match="exactly one"):
        PromptSRCConfig(templates=("no slot",))


def test_presets_are_the_reference_configs() -> None:
    b2n, _ = Experiment("promptsrc", preset="promptsrc/base-to-novel").config()
    assert (b2n.text_depth, b2n.vision_depth, b2n.n_ctx_text, b2n.n_ctx_vision) == (9, 9, 4, 4)
    assert (b2n.text_loss_weight, b2n.image_loss_weight, b2n.gpa_mean, b2n.gpa_std) == (
        25.0,
        10.0,
        15.0,
        1.0,
    )
    assert (b2n.optim.lr, b2n.optim.epochs, b2n.optim.batch_size) == (0.0025, 20, 4)
    assert b2n.templates == IMAGENET_TEMPLATES_60
    xd, _ = Experiment("promptsrc", preset="promptsrc/cross-dataset").config()
    assert (xd.text_depth, xd.gpa_mean, xd.gpa_std) == (3, 6.0, 10.0)
    few = Experiment("promptsrc", preset="promptsrc/few-shot")
    assert (few.config(dataset="caltech101")[0].gpa_mean, few.config()[0].optim.epochs) == (30, 50)
    assert (few.config(dataset="eurosat")[0].gpa_mean, few.config(dataset="dtd")[0].gpa_std) == (
        45.0,
        5.0,
    )


def test_train_and_predict_through_the_cli(tiny_folder, run_cli, tmp_path) -> None:
    out = tmp_path / "src"
    sets = [f"{k}={v}" for k, v in TINY.items()] + ["optim.epochs=2", "gpa_mean=2"]
    res = run_cli("train", "--method", "promptsrc", "--model", "clip:tiny", "--weights", "none",
                  "--data", f"folder:{tiny_folder}", "--out", out,
                  *[a for s in sets for a in ("--set", s)], "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["test_images"] == 6
    pack = load_pack(out / "prompt.safetensors")
    assert pack.method == "promptsrc"
    assert "gpa_sum" in pack.tensors
    image = next((tiny_folder / "test" / "green_thing").glob("*.png"))
    pred = run_cli("predict", "--pack", out / "prompt.safetensors", image, "--json")
    assert pred.returncode == 0, pred.stderr
    assert len(json.loads(pred.stdout)["predictions"]) == 3
