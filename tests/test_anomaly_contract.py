"""The anomaly-method contract, for every registered method (driven by each one's examples())."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch

from vprompt.anomaly import (
    ANOMALY_METHODS,
    AnomalyCapabilities,
    AnomalyMethod,
    build_anomaly_method,
    method_from_pack,
    pack_anomaly_method,
    read_anomaly_pack,
    register_anomaly_method,
    save_anomaly_pack,
)
from vprompt.errors import ConfigError, PackError

CASES = [
    pytest.param(name, i, id=f"{name}-{i}")
    for name in ANOMALY_METHODS
    for i in range(len(ANOMALY_METHODS.get(name).examples()))
]


def _build(name, index, seed=0, backbone=None):
    example = ANOMALY_METHODS.get(name).examples()[index]
    overrides = [f"{k}={v}" for k, v in example.overrides.items()]
    return build_anomaly_method(
        name, model=example.model, weights="none", overrides=overrides, seed=seed, backbone=backbone
    )


def _ready(method, gen):
    """A method able to score: fitted on two normal images when it is few-shot only."""
    side = method.frame.size
    if method.capabilities.few_shot and not method.capabilities.zero_shot:
        method.fit_normal([torch.randn(2, 3, side, side, generator=gen)])
    return method


def test_every_listed_method_is_registered():
    assert {"patch-memory", "winclip", "anomalyclip", "bayes-pfl"} <= set(ANOMALY_METHODS)


@pytest.mark.parametrize(("name", "index"), CASES)
def test_scores_have_the_declared_shapes_and_are_batch_independent(name, index):
    gen = torch.Generator().manual_seed(0)
    method = _ready(_build(name, index), gen)
    side = method.frame.size
    x = torch.randn(3, 3, side, side, generator=gen)
    with torch.no_grad():
        out = method.score(x)
        alone = method.score(x[1:2])
    assert out.image_scores.shape == (3,)
    assert out.maps.shape == (3, side, side)
    assert torch.isfinite(out.maps).all()
    assert torch.isfinite(out.image_scores).all()
    torch.testing.assert_close(alone.maps[0], out.maps[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(alone.image_scores[0], out.image_scores[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("name", "index"), CASES)
def test_pack_round_trip_gives_identical_scores(name, index, tmp_path):
    gen = torch.Generator().manual_seed(1)
    method = _ready(_build(name, index), gen)
    if method.capabilities.few_shot:  # the zero-shot-capable few-shot methods fit here too
        side = method.frame.size
        method.fit_normal([torch.randn(2, 3, side, side, generator=gen)])
    path = save_anomaly_pack(pack_anomaly_method(method), tmp_path / "m.safetensors")
    loaded = method_from_pack(read_anomaly_pack(path), backbone=method.backbone)
    x = torch.randn(2, 3, method.frame.size, method.frame.size, generator=gen)
    with torch.no_grad():
        a, b = method.score(x), loaded.score(x)
    assert torch.equal(a.maps, b.maps)
    assert torch.equal(a.image_scores, b.image_scores)
    # The pack holds the method's own tensors only, never the backbone's.
    assert not any(k.startswith("backbone.") for k in read_anomaly_pack(path).tensors)


@pytest.mark.parametrize(("name", "index"), CASES)
def test_same_seed_same_method_and_the_backbone_never_changes(name, index):
    cls = ANOMALY_METHODS.get(name)
    a, b = _build(name, index, seed=5), _build(name, index, seed=5)
    for (ka, va), (kb, vb) in zip(a.state().items(), b.state().items(), strict=True):
        assert ka == kb
        assert torch.equal(va, vb)
    before = {k: v.clone() for k, v in a.backbone.state_dict().items()}
    if cls.capabilities.trains:
        side = a.frame.size
        gen = torch.Generator().manual_seed(2)
        x = torch.randn(2, 3, side, side, generator=gen)
        masks = torch.zeros(2, side, side)
        masks[1, : side // 2, : side // 3] = 1
        terms = a.training_loss(x, torch.tensor([0, 1]), masks)
        loss = sum(terms.values())
        loss.backward()
        grads = [p.grad for p in a.trainable_parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
        assert all(p.grad is None for p in a.backbone.parameters())
        if any(v.numel() for v in a.state().values()):
            c = _build(name, index, seed=6)
            assert any(not torch.equal(a.state()[k], c.state()[k]) for k in a.state())
    for k, v in a.backbone.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(not p.requires_grad for p in a.backbone.parameters())


@pytest.mark.parametrize("name", list(ANOMALY_METHODS))
def test_huge_and_negative_integers_are_refused(name):
    """Packs and --set can put any number in a config: sizes are bounded before allocating."""
    cls = ANOMALY_METHODS.get(name)
    for f in dataclasses.fields(cls.Config):
        default = getattr(cls.Config(), f.name)
        if not isinstance(default, int) or isinstance(default, bool):
            continue
        for bad in (10**9, -1):
            if f.name == "seed" and bad > 0:
                continue  # any non-negative seed is fine
            with pytest.raises(ConfigError):
                cls.Config(**{f.name: bad})


def test_pack_tensors_are_checked_before_loading(tmp_path):
    method = _ready(_build("patch-memory", 0), torch.Generator().manual_seed(0))
    pack = pack_anomaly_method(method)
    bad = dataclasses.replace(pack, tensors={"bank": pack.tensors["bank"][:, :3]})
    path = save_anomaly_pack(bad, tmp_path / "bad.safetensors")
    with pytest.raises(PackError, match="tensor bank has shape"):
        method_from_pack(read_anomaly_pack(path), backbone=method.backbone)
    nan = dataclasses.replace(pack, tensors={"bank": pack.tensors["bank"] * float("nan")})
    path = save_anomaly_pack(nan, tmp_path / "nan.safetensors")
    with pytest.raises(PackError, match="NaN"):
        method_from_pack(read_anomaly_pack(path), backbone=method.backbone)
    torch.save({"bank": pack.tensors["bank"]}, tmp_path / "pickle.safetensors")
    with pytest.raises(PackError, match="never unpickles"):
        read_anomaly_pack(tmp_path / "pickle.safetensors")


def test_a_pack_refuses_another_backbone(tmp_path):
    from vprompt.backbones import load_backbone

    method = _ready(_build("patch-memory", 0), torch.Generator().manual_seed(0))
    path = save_anomaly_pack(pack_anomaly_method(method), tmp_path / "m.safetensors")
    other = load_backbone("torchvision:tiny", "none")
    for p in other.parameters():
        p.data.add_(1.0)
    with pytest.raises(PackError, match="do not match"):
        method_from_pack(read_anomaly_pack(path), backbone=other)


def test_registration_names_every_missing_part():
    @dataclass(frozen=True)
    class Cfg:
        k: int = 1

    class Incomplete(AnomalyMethod):
        Config = Cfg
        capabilities = AnomalyCapabilities(few_shot=True, trains=True)

    with pytest.raises(TypeError) as err:
        register_anomaly_method("incomplete-test")(Incomplete)
    text = str(err.value)
    for part in (
        "default_model",
        "tiny_model",
        "score()",
        "fit_normal()",
        "training_loss()",
        "optim",
    ):
        assert part in text
    assert "incomplete-test" not in ANOMALY_METHODS


def test_clip_methods_refuse_a_model_without_text():
    with pytest.raises(ConfigError, match="image-text"):
        build_anomaly_method("winclip", model="torchvision:tiny", weights="none")


def test_few_shot_only_methods_refuse_to_score_unfitted():
    method = _build("patch-memory", 0)
    with pytest.raises(ConfigError, match="normal reference images"):
        method.score(torch.zeros(1, 3, method.frame.size, method.frame.size))
