"""Zero-shot classification: class embeddings, predictions, config, registry."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vprompt.errors import ConfigError, PackError, PromptError
from vprompt.methods import (
    METHODS,
    MethodOutput,
    Prediction,
    PromptMethod,
    ZeroShotClassifier,
    ZeroShotConfig,
    config_from_dict,
    config_to_dict,
    register_method,
)
from vprompt.methods.base import topk_predictions
from vprompt.methods.zeroshot import encode_class_prompts

CLASSES = ["astronaut", "cat", "coffee", "rocket", "coins", "camera"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}.", "itap of a {}."]
DESCRIPTIONS = {
    "astronaut": ["A person in a white space suit.", "Someone who flies to space."],
    "cat": ["A small furry animal with whiskers."],
    "coffee": ["A cup of a hot brown drink.", "Espresso in a mug.", "Latte art."],
    "rocket": ["A tall vehicle launching into the sky."],
    "coins": ["Round metal money."],
    "camera": ["A device that takes photographs.", "A lens on a black body."],
}


def _reference_embeddings(backbone, prompts: list[list[str]]) -> torch.Tensor:
    """Per class: normalize each prompt's open_clip feature, average, renormalize."""
    rows = []
    with torch.no_grad():
        for own in prompts:
            feats = backbone.model.encode_text(backbone.tokenize(own))
            rows.append(F.normalize(F.normalize(feats, dim=-1).mean(dim=0), dim=-1))
    return torch.stack(rows)


@pytest.fixture(scope="module")
def photos(photos_dir: Path) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted(photos_dir.glob("*.png"))]


@pytest.fixture(scope="module")
def clf(tiny_clip) -> ZeroShotClassifier:
    return ZeroShotClassifier(tiny_clip, CLASSES, templates=TEMPLATES)


# ------------------------------------------------------------------ class embeddings


def test_embeddings_templates_only(tiny_clip, clf: ZeroShotClassifier) -> None:
    expected = _reference_embeddings(tiny_clip, [[t.format(c) for t in TEMPLATES] for c in CLASSES])
    assert clf.class_embeddings.shape == (len(CLASSES), tiny_clip.embed_dim)
    assert clf.class_embeddings.dtype == torch.float32
    torch.testing.assert_close(clf.class_embeddings, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        clf.class_embeddings.norm(dim=-1), torch.ones(len(CLASSES)), atol=1e-6, rtol=0
    )
    assert clf.config == ZeroShotConfig(templates=tuple(TEMPLATES), descriptions=False)


def test_embeddings_descriptions_only(tiny_clip) -> None:
    clf = ZeroShotClassifier(tiny_clip, CLASSES, descriptions=DESCRIPTIONS)
    expected = _reference_embeddings(tiny_clip, [DESCRIPTIONS[c] for c in CLASSES])
    torch.testing.assert_close(clf.class_embeddings, expected, atol=1e-5, rtol=0)
    assert clf.config == ZeroShotConfig(templates=(), descriptions=True)


def test_embeddings_templates_and_descriptions(tiny_clip, tmp_path: Path) -> None:
    path = tmp_path / "cupl.json"
    path.write_text(json.dumps(DESCRIPTIONS), encoding="utf-8")
    clf = ZeroShotClassifier(tiny_clip, CLASSES, templates=TEMPLATES, descriptions=str(path))
    prompts = [[t.format(c) for t in TEMPLATES] + DESCRIPTIONS[c] for c in CLASSES]
    expected = _reference_embeddings(tiny_clip, prompts)
    torch.testing.assert_close(clf.class_embeddings, expected, atol=1e-5, rtol=0)
    assert clf.config == ZeroShotConfig(templates=tuple(TEMPLATES), descriptions=True)
    # Averaging in the descriptions changes the embeddings.
    templates_only = _reference_embeddings(
        tiny_clip, [[t.format(c) for t in TEMPLATES] for c in CLASSES]
    )
    assert not torch.allclose(clf.class_embeddings, templates_only, atol=1e-3)


def test_default_template(tiny_clip) -> None:
    clf = ZeroShotClassifier(tiny_clip, "cat, dog")
    assert clf.classnames == ["cat", "dog"]
    assert clf.config.templates == ("a photo of a {}.",)
    expected = _reference_embeddings(tiny_clip, [["a photo of a cat."], ["a photo of a dog."]])
    torch.testing.assert_close(clf.class_embeddings, expected, atol=1e-5, rtol=0)


def test_template_set_name(tiny_clip) -> None:
    clf = ZeroShotClassifier(tiny_clip, ["cat", "dog"], templates="openai-imagenet")
    assert len(clf.config.templates) == 80


def test_batch_size_does_not_change_embeddings(tiny_clip) -> None:
    prompts = [[t.format(c) for t in TEMPLATES] + DESCRIPTIONS[c] for c in CLASSES]
    one = encode_class_prompts(tiny_clip, prompts, batch_size=1, progress=False)
    odd = encode_class_prompts(tiny_clip, prompts, batch_size=7, progress=False)
    big = encode_class_prompts(tiny_clip, prompts, batch_size=256, progress=False)
    torch.testing.assert_close(one, big, atol=1e-5, rtol=0)
    torch.testing.assert_close(odd, big, atol=1e-5, rtol=0)
    clf = ZeroShotClassifier(tiny_clip, CLASSES, templates=TEMPLATES, batch_size=1)
    expected = _reference_embeddings(tiny_clip, [[t.format(c) for t in TEMPLATES] for c in CLASSES])
    torch.testing.assert_close(clf.class_embeddings, expected, atol=1e-5, rtol=0)


def test_classes_with_unequal_prompt_counts(tiny_clip) -> None:
    # Batches that cut through a class's prompts must still credit each class its own.
    prompts = [["a"], ["b", "c", "d", "e", "f"], ["g", "h"]]
    got = encode_class_prompts(tiny_clip, prompts, batch_size=2, progress=False)
    torch.testing.assert_close(got, _reference_embeddings(tiny_clip, prompts), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ predictions


def test_predict_proba_is_a_softmax_over_classes(
    clf: ZeroShotClassifier, tiny_clip, photos: list[Image.Image]
) -> None:
    probs = clf.predict_proba(photos)
    assert probs.shape == (len(photos), len(CLASSES))
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(len(photos)), atol=1e-6, rtol=0)
    assert (probs >= 0).all()
    pixels = torch.stack([tiny_clip.transform(im) for im in photos])
    with torch.no_grad():
        img = F.normalize(tiny_clip.model.encode_image(pixels), dim=-1)
        logits = tiny_clip.model.logit_scale.exp() * img @ clf.class_embeddings.T
    torch.testing.assert_close(probs, logits.softmax(dim=-1), atol=1e-6, rtol=0)


def test_predict_proba_inputs_agree(
    clf: ZeroShotClassifier, tiny_clip, photos: list[Image.Image], photos_dir: Path
) -> None:
    from_pil = clf.predict_proba(photos)
    paths = sorted(photos_dir.glob("*.png"))
    from_paths = clf.predict_proba(paths)
    from_strings = clf.predict_proba([str(p) for p in paths])
    from_tensor = clf.predict_proba(torch.stack([tiny_clip.transform(im) for im in photos]))
    assert torch.equal(from_pil, from_paths)
    assert torch.equal(from_pil, from_strings)
    assert torch.equal(from_pil, from_tensor)


def test_forward_returns_logits(clf: ZeroShotClassifier, tiny_clip, photos) -> None:
    pixels = torch.stack([tiny_clip.transform(im) for im in photos[:2]])
    with torch.no_grad():
        out = clf(pixels)
    assert isinstance(out, MethodOutput)
    assert out.logits.shape == (2, len(CLASSES))
    assert dict(out.aux_loss) == {}


def test_predict_top_k_sorted(clf: ZeroShotClassifier, photos: list[Image.Image]) -> None:
    probs = clf.predict_proba(photos)
    preds = clf.predict(photos, top_k=3)
    assert len(preds) == len(photos)
    for row, p in zip(preds, probs, strict=True):
        assert len(row) == 3
        assert all(isinstance(x, Prediction) for x in row)
        scores = [x.score for x in row]
        assert scores == sorted(scores, reverse=True)
        assert row[0].index == int(p.argmax())
        for x in row:
            assert x.label == CLASSES[x.index]
            assert x.score == pytest.approx(float(p[x.index]), abs=1e-7)
        # The top-k are the k largest probabilities.
        assert sorted(x.index for x in row) == sorted(p.topk(3).indices.tolist())


def test_top_k_larger_than_classes_is_clipped(clf: ZeroShotClassifier, photos) -> None:
    preds = clf.predict(photos[:2], top_k=100)
    assert [len(row) for row in preds] == [len(CLASSES)] * 2
    for row in preds:
        assert sorted(x.label for x in row) == sorted(CLASSES)
        assert sum(x.score for x in row) == pytest.approx(1.0, abs=1e-5)


def test_top_k_default_and_minimum(clf: ZeroShotClassifier, photos) -> None:
    assert len(clf.predict(photos[:1])[0]) == 5
    assert len(clf.predict(photos[:1], top_k=0)[0]) == 1


def test_topk_predictions_directly() -> None:
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    preds = topk_predictions(probs, ["a", "b", "c"], 2)
    assert preds == [
        [Prediction("b", pytest.approx(0.6), 1), Prediction("c", pytest.approx(0.3), 2)],
        [Prediction("a", pytest.approx(0.5), 0), Prediction("c", pytest.approx(0.3), 2)],
    ]


def test_predictions_differ_between_images(clf: ZeroShotClassifier, photos) -> None:
    probs = clf.predict_proba(photos)
    assert not torch.allclose(probs[0], probs[1], atol=1e-4)


# ------------------------------------------------------------------ state and packs


def test_prompt_state_round_trip(clf: ZeroShotClassifier, tiny_clip, photos) -> None:
    state = clf.prompt_state()
    assert set(state) == {"class_embeddings"}
    assert state["class_embeddings"].device.type == "cpu"
    assert state["class_embeddings"].is_contiguous()
    again = ZeroShotClassifier.from_state(tiny_clip, CLASSES, clf.config, state)
    assert again.config == clf.config
    assert torch.equal(again.predict_proba(photos), clf.predict_proba(photos))
    # Buffers are not persistent: the backbone is not part of what a pack stores.
    assert "class_embeddings" not in clf.state_dict()
    assert isinstance(clf, PromptMethod)


def test_from_state_rejects_wrong_tensors(clf: ZeroShotClassifier, tiny_clip) -> None:
    state = clf.prompt_state()
    with pytest.raises(PackError, match="exactly 'class_embeddings'"):
        ZeroShotClassifier.from_state(
            tiny_clip, CLASSES, clf.config, {**state, "x": state["class_embeddings"]}
        )
    with pytest.raises(PackError, match=r"shape \(6, 32\), expected \(5, 32\)"):
        ZeroShotClassifier.from_state(tiny_clip, CLASSES[:5], clf.config, state)
    with pytest.raises(PackError, match="expected"):
        ZeroShotClassifier.from_state(
            tiny_clip, CLASSES, clf.config, {"class_embeddings": torch.zeros(6, 16)}
        )


def test_backbone_stays_frozen(clf: ZeroShotClassifier) -> None:
    assert all(not p.requires_grad for p in clf.parameters())
    assert clf.extra_repr() == "backbone=clip:tiny, classes=6"


# ------------------------------------------------------------------ bad input


def test_bad_class_lists(tiny_clip) -> None:
    with pytest.raises(PromptError, match="duplicate"):
        ZeroShotClassifier(tiny_clip, ["cat", "cat"])
    with pytest.raises(PromptError, match="non-empty"):
        ZeroShotClassifier(tiny_clip, "cat,,dog")


def test_bad_templates(tiny_clip) -> None:
    with pytest.raises(PromptError, match="exactly one"):
        ZeroShotClassifier(tiny_clip, ["cat"], templates=["no placeholder here"])
    with pytest.raises(PromptError, match="empty"):
        ZeroShotClassifier(tiny_clip, ["cat"], templates=[])


def test_descriptions_must_cover_the_classes(tiny_clip) -> None:
    with pytest.raises(PromptError, match=r"no descriptions for classes \['dog'\]"):
        ZeroShotClassifier(tiny_clip, ["cat", "dog"], descriptions={"cat": ["A cat."]})


def test_empty_descriptions_are_an_error_not_ignored(tiny_clip) -> None:
    with pytest.raises(PromptError, match="no descriptions for classes"):
        ZeroShotClassifier(tiny_clip, ["cat", "dog"], descriptions={})


# ------------------------------------------------------------------ config + registry


def test_methods_registry_holds_zeroshot() -> None:
    assert "zeroshot" in METHODS
    assert METHODS.get("zeroshot") is ZeroShotClassifier
    assert ZeroShotClassifier.name == "zeroshot"
    assert ZeroShotClassifier.Config is ZeroShotConfig


def test_config_defaults_and_validation() -> None:
    assert ZeroShotConfig() == ZeroShotConfig(templates=("a photo of a {}.",), descriptions=False)
    assert ZeroShotConfig(templates=(), descriptions=True).descriptions
    with pytest.raises(ConfigError, match="templates, descriptions, or both"):
        ZeroShotConfig(templates=(), descriptions=False)
    with pytest.raises(ConfigError, match="exactly one"):
        ZeroShotConfig(templates=("a photo",))
    with pytest.raises(ConfigError, match="exactly one"):
        ZeroShotConfig(templates=("a {} {}",))
    with pytest.raises(dataclasses.FrozenInstanceError):
        ZeroShotConfig().descriptions = True  # type: ignore[misc]


def test_config_dict_round_trip() -> None:
    config = ZeroShotConfig(templates=("a {}.", "the {}."), descriptions=True)
    data = config_to_dict(config)
    assert data == {"templates": ["a {}.", "the {}."], "descriptions": True}
    assert config_from_dict(ZeroShotConfig, json.loads(json.dumps(data))) == config


def test_config_from_dict_errors() -> None:
    with pytest.raises(ConfigError, match=r"unknown keys \['template'\]"):
        config_from_dict(ZeroShotConfig, {"template": ["a {}."]})
    with pytest.raises(ConfigError, match="exactly one"):
        config_from_dict(ZeroShotConfig, {"templates": ["nothing"]})


def test_register_method_validates() -> None:
    before = METHODS.names()

    class NoConfig:
        @classmethod
        def from_state(cls, *args):
            return None

    with pytest.raises(TypeError, match="dataclass `Config`"):
        register_method("no-config-method")(NoConfig)

    class NoFromState:
        Config = ZeroShotConfig

    with pytest.raises(TypeError, match="from_state"):
        register_method("no-from-state-method")(NoFromState)

    class Duplicate:
        Config = ZeroShotConfig

        @classmethod
        def from_state(cls, *args):
            return None

    with pytest.raises(ValueError, match="already registered"):
        register_method("zeroshot")(Duplicate)
    assert METHODS.get("zeroshot") is ZeroShotClassifier
    assert METHODS.names() == before
