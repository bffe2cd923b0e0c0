"""CoPrompt against its reference (ShuvenduRoy/CoPrompt trainers/coprompt.py), written from the
paper in the test: adapters, logits, both consistency terms, gradients, the augmentation."""

from __future__ import annotations

import copy
import json

import numpy as np
import PIL.ImageOps
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import vl_reference as ref
from vprompt.engine.experiment import Experiment
from vprompt.engine.pack import load_pack
from vprompt.errors import ConfigError
from vprompt.methods import coprompt as cp
from vprompt.methods.coprompt import CoPrompt, CoPromptConfig, DasslRandAugment

CLASSES = ["cat", "golden_retriever", "moth"]
DESCRIPTIONS = {
    "cat": ["a small furry pet with whiskers.", "a cat sleeping on a sofa."],
    "golden retriever": ["a friendly dog with a golden coat.", "a large retriever dog."],
    "moth": ["a night insect with dusty wings.", "an insect drawn to lamps."],
}


@pytest.fixture
def descriptions_file(tmp_path):
    path = tmp_path / "cupl.json"
    path.write_text(json.dumps(DESCRIPTIONS))
    return path


def _method(backbone, seed: int = 0, **config) -> CoPrompt:
    torch.manual_seed(seed)
    return CoPrompt(backbone, CLASSES, CoPromptConfig(**{"depth": 2, **config}))


def _reference_adapter(width: int) -> nn.Sequential:
    """``Adapter(c_in, reduction=4)``."""
    return nn.Sequential(
        nn.Linear(width, width // 4, bias=False),
        nn.ReLU(inplace=True),
        nn.Linear(width // 4, width, bias=False),
        nn.ReLU(inplace=True),
    )


def test_adapters_start_after_the_prompt_learner_as_the_reference_builds_them(tiny_clip) -> None:
    method = _method(tiny_clip, seed=4)
    torch.manual_seed(4)
    from vprompt.methods.maple import MaPLe, MaPLeConfig

    MaPLe(tiny_clip, CLASSES, MaPLeConfig(depth=2))  # the prompt learner's draws
    image, text = _reference_adapter(32), _reference_adapter(32)
    assert torch.equal(method.image_adapter.down.weight, image[0].weight)
    assert torch.equal(method.image_adapter.up.weight, image[2].weight)
    assert torch.equal(method.text_adapter.down.weight, text[0].weight)
    assert torch.equal(method.text_adapter.up.weight, text[2].weight)


def test_logits_consistency_terms_and_gradients_equal_the_reference(
    tiny_clip, descriptions_file
) -> None:
    method = _method(tiny_clip, descriptions=str(descriptions_file)).train()
    gen = torch.Generator().manual_seed(5)
    view1, view2 = (
        torch.randn(3, 3, 32, 32, generator=gen),
        torch.randn(3, 3, 32, 32, generator=gen),
    )
    labels = torch.tensor([2, 0, 1])
    torch.manual_seed(11)
    out = method(torch.stack([view1, view2], dim=1))
    (F.cross_entropy(out.logits, labels) + sum(out.aux_loss.values())).backward()
    ours = {n: p.grad.clone() for n, p in method.named_parameters() if p.requires_grad}

    twin = copy.deepcopy(method)
    twin.zero_grad()
    model = tiny_clip.model
    adapter_i, adapter_t = _reference_adapter(32), _reference_adapter(32)
    with torch.no_grad():
        for mine, theirs in ((twin.image_adapter, adapter_i), (twin.text_adapter, adapter_t)):
            theirs[0].weight.copy_(mine.down.weight)
            theirs[2].weight.copy_(mine.up.weight)
    text = ref.text_features(model, tiny_clip._tokenizer, CLASSES, twin.ctx,
                             list(twin.text_deep), "a photo of a", normalize=False)  # fmt: skip
    vision = [twin.proj(twin.ctx), twin.couplings[0](twin.text_deep[0])]
    image = ref.image_features(model, view1, vision, normalize=False)
    image = 0.1 * adapter_i(image) + 0.9 * image
    text = 0.2 * adapter_t(text) + 0.8 * text
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    logits = model.logit_scale.exp() * image @ text.t()
    torch.manual_seed(11)
    index = int(torch.randint(2, ()))  # the description drawn for this step
    with torch.no_grad():
        pre_text = []
        for name in ["cat", "golden retriever", "moth"]:
            emb = model.encode_text(tiny_clip.tokenize(DESCRIPTIONS[name]))
            pre_text.append(emb / emb.norm(dim=-1, keepdim=True))
        pre_text = torch.stack(pre_text, dim=1)[index]
        pre_image = model.encode_image(view2)
        pre_image = pre_image / pre_image.norm(dim=-1, keepdim=True)
    cos = torch.nn.CosineSimilarity(dim=1, eps=1e-07)
    terms = {
        "consistency_text": 1.0 - torch.mean(cos(text, pre_text)),
        "consistency_image": 1.0 - torch.mean(cos(image, pre_image)),
    }
    torch.testing.assert_close(out.logits, logits, atol=1e-4, rtol=1e-5)
    assert set(out.aux_loss) == set(terms)
    for name, value in terms.items():
        assert float(value.detach()) > 0
        torch.testing.assert_close(out.aux_loss[name], value, atol=1e-6, rtol=1e-5)
    (F.cross_entropy(logits, labels) + sum(terms.values())).backward()
    for name, param in twin.named_parameters():
        if not param.requires_grad:
            continue
        want = param.grad if "adapter" not in name else None
        if want is None:  # the adapters ran as the reference's modules: read their grads
            module = adapter_i if name.startswith("image") else adapter_t
            want = module[0 if ".down." in name else 2].weight.grad
        assert want is not None, name
        scale = float(want.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(ours[name], want, atol=1e-5 * scale, rtol=1e-3)


def test_descriptions_files_are_read_strictly(tiny_clip, tmp_path, monkeypatch) -> None:
    def write(data) -> str:
        path = tmp_path / "d.json"
        path.write_text(data if isinstance(data, str) else json.dumps(data))
        return str(path)

    uneven = write({"cat": ["a", "b", "c"], "golden retriever": ["d"], "moth": ["e", "f"]})
    table = cp.description_features(tiny_clip, cp.read_descriptions(uneven, CLASSES))
    assert table.shape == (3, 3, 32)
    assert torch.equal(table[0, 1], table[2, 1])  # one description: every row
    assert torch.equal(table[0, 2], table[2, 2])  # two: rows 0, 1, 0
    for bad, message in (
        ({"cat": ["a"]}, "no descriptions for class 'golden_retriever'"),
        ([1, 2], "expected a JSON object"),
        ({"cat": [], "golden retriever": ["x"], "moth": ["y"]}, "1 to 1000 non-empty strings"),
        ('{"cat": [NaN]}', "not valid JSON"),
        ("{", "not valid JSON"),
    ):
        with pytest.raises(ConfigError, match=message):
            cp.read_descriptions(write(bad), CLASSES)
    with pytest.raises(ConfigError, match="cannot read"):
        cp.read_descriptions(tmp_path / "missing.json", CLASSES)
    monkeypatch.setattr(cp, "MAX_DESCRIPTIONS_BYTES", 10)
    with pytest.raises(ConfigError, match="more than the 10"):
        cp.read_descriptions(write({"cat": ["a long enough description"]}), CLASSES)


def test_without_a_file_the_template_is_each_classes_description(tiny_clip) -> None:
    method = _method(tiny_clip, template="art of the {}.")
    table = method.description_table()
    with torch.no_grad():
        want = F.normalize(tiny_clip.encode_text(tiny_clip.tokenize(["art of the moth."])), dim=-1)
    assert table.shape == (1, 3, 32)
    torch.testing.assert_close(table[0, 2], want[0])


# Dassl's randaugment_list: (operation, min, max), in order.
DASSL_RANGES = [
    ("auto_contrast", 0, 1), ("equalize", 0, 1), ("invert", 0, 1), ("rotate", 0, 30),
    ("posterize", 4, 8), ("solarize", 0, 256), ("solarize_add", 0, 110), ("color", 0.1, 1.9),
    ("contrast", 0.1, 1.9), ("brightness", 0.1, 1.9), ("sharpness", 0.1, 1.9),
    ("shear_x", 0.0, 0.3), ("shear_y", 0.0, 0.3), ("cutout", 0, 40), ("translate_x", 0.0, 100),
    ("translate_y", 0.0, 100),
]  # fmt: skip


def test_randaugment_draws_dassls_operations_at_magnitude_ten() -> None:
    assert [(n, lo, hi) for n, _, lo, hi, _ in cp._OPS] == DASSL_RANGES
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 20, 3), dtype=np.uint8))
    torch.manual_seed(3)
    got = DasslRandAugment(2, 10)(image)
    torch.manual_seed(3)
    picks = torch.randint(16, (2,)).tolist()
    expected = image
    for index in picks:
        _name, op, lo, hi, signed = cp._OPS[index]
        value = (10 / 30) * (hi - lo) + lo
        if signed and float(torch.rand(())) > 0.5:
            value = -value
        expected = op(expected, value)
    assert np.array_equal(np.asarray(got), np.asarray(expected))
    # Spot checks of single operations against PIL with the reference's values.
    _, posterize, *_ = cp._OPS[4]
    assert np.array_equal(
        np.asarray(posterize(image, 5.33)), np.asarray(PIL.ImageOps.posterize(image, 5))
    )
    _, solarize_add, *_ = cp._OPS[6]
    shifted = np.clip(np.asarray(image).astype(int) + 36.67, 0, 255).astype(np.uint8)
    want = PIL.ImageOps.solarize(Image.fromarray(shifted), 128)
    assert np.array_equal(np.asarray(solarize_add(image, 36.67)), np.asarray(want))


def test_training_sees_two_independent_views(tiny_clip) -> None:
    method = _method(tiny_clip)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    torch.manual_seed(0)
    views = method.input_transform(True)(image)
    assert views.shape == (2, 3, 32, 32)
    assert not torch.equal(views[0], views[1])
    assert method.input_transform(False)(image).shape == (3, 32, 32)


def test_protocols_read_one_description_file_per_dataset() -> None:
    experiment = Experiment("coprompt", overrides=("descriptions=/cupl/{dataset}.json",))
    assert experiment.config(dataset="dtd")[0].descriptions == "/cupl/dtd.json"
    with pytest.raises(ConfigError, match="adapter_ratio"):
        CoPromptConfig(image_adapter_ratio=1.5)


def test_train_and_predict_through_the_cli(tiny_folder, run_cli, tmp_path) -> None:
    from conftest import FOLDER_CLASSES

    cupl = tmp_path / "cupl.json"
    cupl.write_text(json.dumps({n: [f"a photo of something {n}."] for n in FOLDER_CLASSES}))
    out = tmp_path / "co"
    res = run_cli("train", "--method", "coprompt", "--model", "clip:tiny", "--weights", "none",
                  "--data", f"folder:{tiny_folder}", "--out", out, "--descriptions", cupl,
                  "--set", "depth=2", "--set", "optim.epochs=1", "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["test_images"] == 6
    pack = load_pack(out / "prompt.safetensors")
    assert pack.config["descriptions"] == str(cupl)
    assert "text_adapter.up.weight" in pack.tensors
    image = next((tiny_folder / "test" / "red_thing").glob("*.png"))
    pred = run_cli("predict", "--pack", out / "prompt.safetensors", image, "--json")
    assert pred.returncode == 0, pred.stderr
    bad = run_cli("train", "--method", "coprompt", "--model", "clip:tiny", "--weights", "none",
                  "--data", f"folder:{tiny_folder}", "--out", tmp_path / "bad", "--descriptions",
                  tmp_path / "none.json", "--set", "depth=2")  # fmt: skip
    assert bad.returncode != 0
    assert "none.json: cannot read the class descriptions" in bad.stderr
    assert "Traceback" not in bad.stderr
