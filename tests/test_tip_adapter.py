"""Tip-Adapter / Tip-Adapter-F against a from-the-paper computation on open_clip's own modules.

The reference computations below follow gaopengcuhk/Tip-Adapter (``utils.py``:
``clip_classifier``, ``build_cache_model``, ``search_hp``; ``main.py``: the tip logits and
``run_tip_adapter_F``'s adapter) and use none of vprompt's method code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vprompt import load_backbone
from vprompt.data.feature_cache import FeatureCache
from vprompt.engine import fit
from vprompt.engine.experiment import Experiment
from vprompt.engine.pack import build_from_pack, load_pack, save_pack
from vprompt.errors import ConfigError, PackError
from vprompt.methods.tip_adapter import (
    TipAdapter,
    TipAdapterConfig,
    TipAdapterF,
    TipAdapterFConfig,
    search_grid,
)

CLASSES = ["cat", "golden_retriever", "moth"]
TEMPLATES = ["a photo of a {}.", "art of the {}."]


# ---------------------------------------------------------------------------- the reference
def reference_clip_weights(backbone, classnames, templates) -> torch.Tensor:
    """``clip_classifier``: D x C."""
    model = backbone.model
    weights = []
    for name in classnames:
        texts = [t.format(name.replace("_", " ")) for t in templates]
        emb = model.encode_text(backbone.tokenize(texts))
        emb = emb / emb.norm(dim=-1, keepdim=True)
        mean = emb.mean(dim=0)
        weights.append(mean / mean.norm())
    return torch.stack(weights, dim=1)


def reference_cache(view_features: list[torch.Tensor], labels: torch.Tensor):
    """``build_cache_model`` from each augment epoch's raw features: (D x N keys, N x C)."""
    keys = torch.cat([f.unsqueeze(0) for f in view_features], dim=0).mean(dim=0)
    keys /= keys.norm(dim=-1, keepdim=True)
    return keys.permute(1, 0), F.one_hot(labels).float()


def reference_tip_logits(test_features, keys, values, clip_weights, alpha, beta):
    """``run_tip_adapter``: 100 · f W + α · exp(−β(1 − f K)) V on normalised features."""
    f = test_features / test_features.norm(dim=-1, keepdim=True)
    clip_logits = 100.0 * f @ clip_weights
    affinity = f @ keys
    cache_logits = ((-1) * (beta - beta * affinity)).exp() @ values
    return clip_logits + cache_logits * alpha


def reference_search(cfg, keys, values, features, labels, clip_weights, adapter=None):
    """``search_hp``, line for line (accuracy in percent, first strictly better wins)."""
    beta_list = [
        i * (cfg["search_scale"][0] - 0.1) / cfg["search_step"][0] + 0.1
        for i in range(cfg["search_step"][0])
    ]
    alpha_list = [
        i * (cfg["search_scale"][1] - 0.1) / cfg["search_step"][1] + 0.1
        for i in range(cfg["search_step"][1])
    ]
    best_acc, best_beta, best_alpha = 0, 0, 0
    for beta in beta_list:
        for alpha in alpha_list:
            affinity = adapter(features) if adapter else features @ keys
            cache_logits = ((-1) * (beta - beta * affinity)).exp() @ values
            clip_logits = 100.0 * features @ clip_weights
            tip_logits = clip_logits + cache_logits * alpha
            pred = tip_logits.topk(1, 1, True, True)[1].t()
            acc = 100 * float(pred.eq(labels.view(1, -1)).sum()) / labels.shape[0]
            if acc > best_acc:
                best_acc, best_beta, best_alpha = acc, beta, alpha
    return best_beta, best_alpha


# ---------------------------------------------------------------------------- helpers
@dataclass
class Batches:
    """A stand-in for the engine's data: fixed feature batches per view."""

    per_view: list[torch.Tensor]
    labels: torch.Tensor
    val_features: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None

    @property
    def views(self) -> int:
        return len(self.per_view)

    @property
    def has_val(self) -> bool:
        return self.val_features is not None

    def train(self, view=None):
        feats = self.per_view[0 if view is None else view]
        yield feats[:4], self.labels[:4]
        yield feats[4:], self.labels[4:]

    def val(self):
        assert self.val_features is not None
        assert self.val_labels is not None
        yield self.val_features, self.val_labels


def _method(backbone, cls=TipAdapter, **config) -> TipAdapter:
    config_cls = TipAdapterFConfig if cls is TipAdapterF else TipAdapterConfig
    return cls(backbone, CLASSES, config_cls(templates=tuple(TEMPLATES), **config))


def _views(n_views: int, n: int, dim: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=gen) for _ in range(n_views)]


# ---------------------------------------------------------------------------- tests
def test_cache_and_logits_equal_the_reference(tiny_clip) -> None:
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    views = _views(3, len(labels), tiny_clip.embed_dim)
    method = _method(tiny_clip, alpha=1.7, beta=2.5)
    method.setup(Batches(views, labels))
    keys, values = reference_cache(views, labels)
    torch.testing.assert_close(method.cache_keys.detach(), keys.T, rtol=1e-6, atol=1e-6)
    assert torch.equal(method.cache_values, values)

    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        raw = tiny_clip.model.encode_image(images)
        weights = reference_clip_weights(tiny_clip, CLASSES, TEMPLATES)
        expected = reference_tip_logits(raw, keys, values, weights, 1.7, 2.5)
        got = method.eval()(images).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    # Zero-shot alone is the same formula without the cache (alpha = 0).
    with torch.no_grad():
        method.alpha.fill_(0.0)
        zs = reference_tip_logits(raw, keys, values, weights, 0.0, 2.5)
        torch.testing.assert_close(method(images).logits, zs, rtol=1e-5, atol=1e-4)


def test_search_equals_the_reference_search_hp(tiny_clip) -> None:
    labels = torch.tensor([0, 1, 2] * 4)
    views = _views(2, len(labels), tiny_clip.embed_dim, seed=1)
    method = _method(tiny_clip, search_scale=(9.0, 4.0), search_steps=(30, 7))
    method.setup(Batches(views, labels))
    gen = torch.Generator().manual_seed(5)
    # Validation features near the training ones, so the cache matters.
    val = views[0] + 0.8 * torch.randn(views[0].shape, generator=gen)
    beta, alpha = method.search(val, labels)
    keys, values = reference_cache(views, labels)
    unit = val / val.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        weights = reference_clip_weights(tiny_clip, CLASSES, TEMPLATES)
    cfg = {"search_scale": [9.0, 4.0], "search_step": [30, 7]}
    assert (beta, alpha) == pytest.approx(
        reference_search(cfg, keys, values, unit, labels, weights)
    )
    assert beta in search_grid(9.0, 30)
    # finish() applies the search to the state a pack stores.
    method.finish(Batches(views, labels, val, labels))
    assert (float(method.beta), float(method.alpha)) == pytest.approx((beta, alpha))
    assert set(method.prompt_state()) == {"cache_keys", "cache_values", "alpha", "beta"}


def test_no_search_without_validation_or_when_off(tiny_clip) -> None:
    labels = torch.tensor([0, 1, 2])
    views = _views(1, 3, tiny_clip.embed_dim)
    method = _method(tiny_clip, alpha=3.0, beta=1.0)
    method.setup(Batches(views, labels))
    method.finish(Batches(views, labels))
    assert (float(method.alpha), float(method.beta)) == (3.0, 1.0)
    off = _method(tiny_clip, alpha=3.0, search=False)
    off.setup(Batches(views, labels))
    off.finish(Batches(views, labels, views[0], labels))
    assert float(off.alpha) == 3.0


def test_tip_adapter_f_gradient_equals_the_reference_adapter(tiny_clip) -> None:
    labels = torch.tensor([0, 1, 2, 1, 0, 2])
    views = _views(2, len(labels), tiny_clip.embed_dim, seed=2)
    method = _method(tiny_clip, cls=TipAdapterF, alpha=1.5, beta=3.0)
    method.setup(Batches(views, labels))
    assert [p for p in method.trainable_parameters()] == [method.cache_keys]
    keys, values = reference_cache(views, labels)
    with torch.no_grad():
        weights = reference_clip_weights(tiny_clip, CLASSES, TEMPLATES)
    adapter = torch.nn.Linear(keys.shape[0], keys.shape[1], bias=False)
    adapter.weight = torch.nn.Parameter(keys.t().clone())
    feats = torch.randn(4, tiny_clip.embed_dim, generator=torch.Generator().manual_seed(9))
    target = torch.tensor([2, 0, 1, 1])
    f = feats / feats.norm(dim=-1, keepdim=True)
    tip = 100.0 * f @ weights + ((-1) * (3.0 - 3.0 * adapter(f))).exp() @ values * 1.5
    F.cross_entropy(tip, target).backward()
    method.train()
    out = method.forward_features(feats)
    torch.testing.assert_close(out.logits, tip.detach(), rtol=1e-5, atol=1e-4)
    F.cross_entropy(out.logits, target).backward()
    assert method.cache_keys.grad is not None
    torch.testing.assert_close(method.cache_keys.grad, adapter.weight.grad, rtol=1e-4, atol=1e-6)


def test_classifier_backbone_uses_the_cache_alone() -> None:
    backbone = load_backbone("torchvision:tiny", "none")
    method = TipAdapter(backbone, CLASSES, TipAdapterConfig(alpha=2.0, beta=4.0))
    assert method.feature_kind == "classifier-penultimate"
    labels = torch.tensor([0, 1, 2, 2])
    views = _views(2, 4, backbone.feature_dim, seed=4)
    method.setup(Batches(views, labels))
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    keys, values = reference_cache(views, labels)
    with torch.no_grad():
        raw = backbone.features(images)
        f = raw / raw.norm(dim=-1, keepdim=True)
        expected = 2.0 * ((-1) * (4.0 - 4.0 * (f @ keys))).exp() @ values
        torch.testing.assert_close(method.eval()(images).logits, expected, rtol=1e-5, atol=1e-5)


def test_pack_keeps_the_data_sized_cache_and_the_searched_values(tiny_clip, tmp_path) -> None:
    labels = torch.tensor([0, 1, 2] * 5)
    views = _views(2, len(labels), tiny_clip.embed_dim)
    method = _method(tiny_clip)
    method.setup(Batches(views, labels))
    method.alpha.fill_(2.25)
    method.beta.fill_(5.5)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = method.eval()(images).logits
    pack = load_pack(save_pack(method, tmp_path / "tip.safetensors"))
    assert pack.tensors["cache_keys"].shape == (15, tiny_clip.embed_dim)
    rebuilt = build_from_pack(pack, backbone=tiny_clip).eval()
    assert float(rebuilt.alpha) == 2.25
    with torch.no_grad():
        assert torch.equal(rebuilt(images).logits, expected)
    wrong = dict(pack.tensors, cache_values=torch.zeros(15, 4))
    with pytest.raises(PackError, match="cache_values"):
        TipAdapter.from_state(tiny_clip, CLASSES, method.config, wrong)
    uneven = dict(pack.tensors, cache_values=torch.zeros(14, len(CLASSES)))  # keys have 15
    with pytest.raises(PackError, match="same number of rows"):
        TipAdapter.from_state(tiny_clip, CLASSES, method.config, uneven)


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="search_scale"):
        TipAdapterConfig(search_scale=(0.05, 3.0))
    with pytest.raises(ConfigError, match="search_steps"):
        TipAdapterConfig(search_steps=(0, 20))
    with pytest.raises(ConfigError, match="alpha"):
        TipAdapterConfig(alpha=-1.0)
    with pytest.raises(ConfigError, match="exactly one"):
        TipAdapterConfig(templates=("no placeholder",))


def test_reference_settings_per_dataset() -> None:
    """Protocol runs get the reference's per-dataset α, search range, templates and epochs;
    --set still wins."""
    config, notes = Experiment("tip-adapter").config(dataset="dtd", template="{} texture.")
    assert (config.alpha, config.search_scale, config.templates) == (
        2.0,
        (13.0, 13.0),
        ("{} texture.",),
    )
    assert notes
    imagenet, _ = Experiment("tip-adapter").config(dataset="imagenet", template="a photo of a {}.")
    assert len(imagenet.templates) == 7
    assert TipAdapter.templates_for("imagenet", "x {}") == imagenet.templates
    eurosat, _ = Experiment("tip-adapter-f").config(dataset="eurosat", template="{}")
    assert eurosat.optim.epochs == 100
    mine, _ = Experiment("tip-adapter-f", overrides=("alpha=0.5",)).config(dataset="dtd")
    assert mine.alpha == 0.5


# ---------------------------------------------------------------------------- through fit
class Colours:
    """Reddish / greenish / bluish noise images (easily told apart), with identities."""

    def __init__(self, per_class: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.classnames = list(CLASSES)
        self.items = []
        for c in range(3):
            for _ in range(per_class):
                pixels = rng.integers(0, 60, (36, 36, 3), dtype=np.uint8)
                pixels[..., c] = rng.integers(190, 255, (36, 36), dtype=np.uint8)
                self.items.append((Image.fromarray(pixels), c))
        self.seed = seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]

    def identity(self, index: int) -> str:
        return f"tip-colours-{self.seed}-{index}"


def test_fit_builds_searches_and_packs_without_training(tiny_clip, tmp_path) -> None:
    train, val = Colours(4, seed=1), Colours(2, seed=2)
    config = TipAdapterConfig(feature_views=3, search_steps=(10, 5))
    results = {}
    for cache in (None, FeatureCache(tmp_path / "cache")):
        method = TipAdapter(tiny_clip, CLASSES, config)
        out = tmp_path / f"run-{cache is None}"
        result = fit(method, train, val=val, out_dir=out, progress=False, feature_cache=cache)
        assert result.epochs_run == 0
        assert method.cache_keys.shape == (12, tiny_clip.embed_dim)
        results[cache is None] = method.prompt_state()
        pack = load_pack(result.pack_path)
        assert "val_acc" in pack.metrics
    # The augmented views are drawn per image and view, with or without the feature cache.
    for key in ("cache_keys", "cache_values", "alpha", "beta"):
        torch.testing.assert_close(results[True][key], results[False][key])
    # A finished run returns its state at once (the searched values included).
    again = TipAdapter(tiny_clip, CLASSES, config)
    fit(again, train, val=val, out_dir=tmp_path / "run-True", progress=False)
    assert torch.equal(again.alpha, results[True]["alpha"])


def test_tip_adapter_f_trains_the_keys_through_fit(tiny_clip, tmp_path) -> None:
    from vprompt.methods.config import OptimConfig

    train = Colours(4, seed=3)
    optim = OptimConfig(
        optimizer="adamw", lr=0.05, eps=1e-4, weight_decay=0.01, epochs=3, batch_size=6
    )
    config = TipAdapterFConfig(feature_views=2, search=False, optim=optim)
    method = TipAdapterF(tiny_clip, CLASSES, config)
    result = fit(
        method,
        train,
        out_dir=tmp_path / "f",
        progress=False,
        feature_cache=FeatureCache(tmp_path / "c"),
    )
    assert result.epochs_run == 3
    built = TipAdapter(tiny_clip, CLASSES, TipAdapterConfig(feature_views=2))
    fit(
        built,
        train,
        out_dir=tmp_path / "plain",
        progress=False,
        feature_cache=FeatureCache(tmp_path / "c"),
    )
    assert not torch.equal(method.cache_keys.detach(), built.cache_keys.detach())
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


# ---------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tip-colours")
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        data = Colours(n, seed={"train": 1, "val": 2, "test": 3}[split])
        for i, (image, label) in enumerate(data.items):
            folder = root / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i}.png")
    return root


@pytest.mark.parametrize("method", ["tip-adapter", "tip-adapter-f"])
def test_train_predict_eval_through_the_cli(method, colour_folder, run_cli, tmp_path) -> None:
    out = tmp_path / method
    extra = (
        ["--set", "optim.epochs=2", "--set", "optim.batch_size=6"] if method.endswith("f") else []
    )
    res = run_cli("train", "--method", method, "--model", "clip:tiny", "--weights", "none",
                  "--data", f"folder:{colour_folder}", "--out", out, "--set", "feature_views=2",
                  "--set", "search_steps=[8, 4]", *extra, "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["test_images"] == 9
    pack = load_pack(out / "prompt.safetensors")
    assert pack.method == method
    assert pack.tensors["cache_keys"].shape[0] == 12
    ev = run_cli(
        "eval", "--pack", out / "prompt.safetensors", "--data", f"folder:{colour_folder}", "--json"
    )
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["accuracy"] == pytest.approx(report["test_accuracy"])
    image = next((colour_folder / "test" / "moth").glob("*.png"))
    pred = run_cli("predict", "--pack", out / "prompt.safetensors", image, "--json")
    assert pred.returncode == 0, pred.stderr
    assert json.loads(pred.stdout)["predictions"][0]["label"] in CLASSES


def test_protocol_few_shot_through_the_cli(run_cli, tmp_path) -> None:
    from vprompt.data.suite.synthetic import write_fake_dataset

    root = tmp_path / "suite"
    write_fake_dataset("dtd", root, num_classes=3, images_per_class=(4, 2, 2))
    out = tmp_path / "fs"
    res = run_cli("protocol", "few-shot", "--method", "tip-adapter", "--model", "clip:tiny",
                  "--weights", "none", "--data-root", root, "--datasets", "dtd", "--shots", "2",
                  "--seeds", "1", "--set", "feature_views=2", "--out", out, "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "2 shots" in json.loads(res.stdout)["dtd"]
    assert "| DTD |" in (out / "table.md").read_text()
    pack = load_pack(out / "jobs" / "dtd" / "shots_2" / "seed_1" / "train" / "prompt.safetensors")
    assert pack.config["search_scale"] == [13.0, 13.0]  # the reference's DTD setting
    assert pack.config["templates"] == ["{} texture."]
    assert pack.tensors["cache_keys"].shape[0] == 6  # 2 shots x 3 classes
