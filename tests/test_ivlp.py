"""IVLP against the multimodal-prompt-learning reference, written from the paper in the test."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import vl_reference as ref
from conftest import FOLDER_CLASSES
from vprompt.engine.pack import load_pack
from vprompt.errors import ConfigError
from vprompt.methods.ivlp import IVLP, IVLPConfig

CLASSES = ["cat", "golden_retriever", "moth"]


def _ivlp(backbone, seed: int = 0, **config) -> IVLP:
    torch.manual_seed(seed)
    cfg = {"text_depth": 2, "vision_depth": 2, **config}
    return IVLP(backbone, CLASSES, IVLPConfig(**cfg))


def test_logits_and_gradients_equal_the_reference(tiny_clip) -> None:
    method = _ivlp(tiny_clip).train()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 2, 1])
    F.cross_entropy(method(images).logits, labels).backward()
    ours = {n: p.grad.clone() for n, p in method.named_parameters() if p.requires_grad}

    ctx = method.ctx.detach().clone().requires_grad_(True)
    deep = [p.detach().clone().requires_grad_(True) for p in method.text_deep]
    vision = [p.detach().clone().requires_grad_(True) for p in method.vision]
    model = tiny_clip.model
    text = ref.text_features(model, tiny_clip._tokenizer, CLASSES, ctx, deep, "a photo of a")
    logits = ref.logits(model, ref.image_features(model, images, vision), text)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    with torch.no_grad():
        torch.testing.assert_close(method.eval()(images).logits, logits, atol=1e-4, rtol=1e-5)
    want = {"ctx": ctx.grad, "text_deep.0": deep[0].grad}
    want |= {f"vision.{k}": v.grad for k, v in enumerate(vision)}
    assert set(ours) == set(want)
    for name, grad in want.items():
        assert float(grad.abs().max()) > 0, name
        torch.testing.assert_close(ours[name], grad, atol=1e-5 * float(grad.abs().max()), rtol=1e-3)


def test_initialisation_as_the_reference_prompt_learner(tiny_clip) -> None:
    method = _ivlp(tiny_clip, seed=3)
    tokens = tiny_clip.tokenize(["a photo of a"])
    phrase = tiny_clip.embed_tokens(tokens)[0, 1:3]
    assert torch.equal(method.ctx.detach(), phrase)  # the first 2 tokens of the phrase
    # The class prompts keep the rest of the phrase: "[SOS] a photo | of a cat . [EOT]".
    names = tiny_clip.tokenize(["a photo of a cat."])
    assert torch.equal(method.assembler.token_suffix[0, :4], tiny_clip.embed_tokens(names)[0, 3:7])
    torch.manual_seed(3)  # every other prompt: N(0, 0.02²), drawn in order
    draws = [torch.empty(2, 64).normal_(std=0.02) for _ in range(3)]
    got = [method.text_deep[0], method.vision[0], method.vision[1]]
    assert all(torch.equal(g.detach(), d) for g, d in zip(got, draws, strict=True))
    again, other = _ivlp(tiny_clip, seed=3), _ivlp(tiny_clip, seed=4)
    assert torch.equal(again.vision[1], method.vision[1])
    assert not torch.equal(other.vision[1], method.vision[1])


def test_random_context_beyond_four_tokens_and_without_a_phrase(tiny_clip) -> None:
    for config in ({"n_ctx_text": 5}, {"ctx_init": ""}):
        torch.manual_seed(0)
        method = IVLP(tiny_clip, CLASSES, IVLPConfig(text_depth=1, vision_depth=0, **config))
        torch.manual_seed(0)
        m = method.ctx.shape[0]
        assert torch.equal(method.ctx.detach(), torch.empty(m, 64).normal_(std=0.02))
        assert len(method.text_deep) == 0
        assert len(method.vision) == 0


def test_settings_that_cannot_run_are_refused(tiny_clip) -> None:
    with pytest.raises(ConfigError, match="text prompt depth 3 is more than clip:tiny's 2"):
        IVLP(tiny_clip, CLASSES, IVLPConfig(text_depth=3, vision_depth=1))
    with pytest.raises(ConfigError, match="vision prompt depth 12"):
        IVLP(tiny_clip, CLASSES, IVLPConfig(text_depth=1))
    with pytest.raises(ConfigError, match="has 2 tokens, fewer than the 3"):
        IVLP(
            tiny_clip,
            CLASSES,
            IVLPConfig(ctx_init="a cat", n_ctx_text=3, text_depth=1, vision_depth=1),
        )
    with pytest.raises(ConfigError, match="text_depth must be an integer from 1"):
        IVLPConfig(text_depth=0)
    with pytest.raises(ConfigError, match="init_std"):
        IVLPConfig(init_std=float("nan"))


def test_classifier_backbones_are_refused() -> None:
    from vprompt import load_backbone

    with pytest.raises(ConfigError, match="prompts both towers of a CLIP vision transformer"):
        IVLP(load_backbone("torchvision:tiny", "none"), CLASSES)


def test_eval_text_features_are_computed_once_per_prompt_value(tiny_clip) -> None:
    method = _ivlp(tiny_clip).eval()
    with torch.no_grad():
        first = method.text_features()
        assert method.text_features() is first
        method.text_deep[0].add_(0.5)
        assert not torch.allclose(method.text_features(), first)


def test_train_predict_eval_through_the_cli(tiny_folder, run_cli, tmp_path) -> None:
    out = tmp_path / "ivlp"
    res = run_cli("train", "--method", "ivlp", "--model", "clip:tiny", "--weights", "none",
                  "--data", f"folder:{tiny_folder}", "--out", out, "--set", "text_depth=2",
                  "--set", "vision_depth=2", "--set", "optim.epochs=2", "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["test_images"] == 6
    pack = load_pack(out / "prompt.safetensors")
    assert pack.method == "ivlp"
    assert set(pack.tensors) == {"ctx", "text_deep.0", "vision.0", "vision.1"}
    ev = run_cli("eval", "--pack", out / "prompt.safetensors", "--data", f"folder:{tiny_folder}",
                 "--json")  # fmt: skip
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["accuracy"] == pytest.approx(report["test_accuracy"])
    image = next((tiny_folder / "test" / "red_thing").glob("*.png"))
    pred = run_cli("predict", "--pack", out / "prompt.safetensors", image, "--json")
    assert pred.returncode == 0, pred.stderr
    labels = [p["label"] for p in json.loads(pred.stdout)["predictions"]]
    assert sorted(labels) == sorted(FOLDER_CLASSES)  # folder names are the class names
