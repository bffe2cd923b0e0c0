"""TFUP / TFUP-T against a from-the-paper computation on open_clip's own modules.

The reference computations below follow wlb12345/TFUP (``utils.py``:
``refine_few_shots_without_label``, ``get_sim_based_kl``, ``marginal_loss``, ``TextAdapter``,
``Adapter``; ``main.py``: ``TFUP``, ``TFUP_T``, ``inference_TFUP_T`` and the shot counts), loop
for loop, and use none of vprompt's method code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from vprompt.engine.pack import load_pack
from vprompt.errors import ConfigError
from vprompt.methods.config import OptimConfig
from vprompt.methods.tfup import (
    TFUP,
    TFUPT,
    TFUPConfig,
    TFUPTConfig,
    select_representatives,
    shots_per_class,
)

CLASSES = ["cat", "golden_retriever", "moth"]
TEMPLATES = ["a photo of a {}.", "art of the {}."]


# ---------------------------------------------------------------------------- the reference
def reference_clip_weights(backbone, classnames, templates) -> torch.Tensor:
    """``get_clip_weights``: per class, the mean of its prompts' raw embeddings (C x D)."""
    rows = []
    for name in classnames:
        texts = [t.format(name.replace("_", " ")) for t in templates]
        rows.append(backbone.model.encode_text(backbone.tokenize(texts)).float().mean(dim=0))
    return torch.stack(rows)


def reference_sim(cache_keys, test_features, clip_weights_dc):
    """``get_sim_based_kl``: one row per test image, z-scored then min-max scaled."""
    cache_p = F.softmax(10.0 * cache_keys @ clip_weights_dc, dim=1)
    test_p = F.softmax(10.0 * test_features @ clip_weights_dc, dim=1)
    kl = torch.empty(len(test_p), len(cache_p))
    for i in range(len(test_p)):
        kl[i] = (test_p[i] * torch.log(test_p[i] / cache_p)).sum(dim=1)
    z = (kl - kl.mean(dim=1, keepdim=True)) / kl.std(dim=1, keepdim=True)
    zmax, zmin = z.max(dim=1).values.unsqueeze(1), z.min(dim=1).values.unsqueeze(1)
    return 2 * (1 - (z - zmin) / (zmax - zmin))


def reference_tfup_logits(test_features, cache_keys, cache_values, clip_weights_dc, alpha, beta):
    """``TFUP``: 100 f W + α exp(−β(1 − (f K) ⊙ sim)) V."""
    w = clip_weights_dc / clip_weights_dc.norm(dim=0, keepdim=True)
    f = test_features / test_features.norm(dim=-1, keepdim=True)
    k = cache_keys / cache_keys.norm(dim=-1, keepdim=True)
    r_fw = 100.0 * f @ w
    r_ff = (f @ k.t()) * reference_sim(k, f, w)
    return r_fw + ((-1) * (beta - beta * r_ff)).exp() @ cache_values * alpha


def reference_refine(text_features, features, shots, cache_keys=None, cache_values=None):
    """``refine_few_shots_without_label``: (indices, labels); the cache's labels are the class
    an image was chosen for, the refined set's TFUP's pseudo-labels (α = 0.3, β = 1)."""
    tokens = features / features.norm(dim=-1, keepdim=True)
    text = text_features / text_features.norm(dim=-1, keepdim=True)
    logits = F.softmax(10.0 * tokens @ text.t(), dim=1)
    indices_list, label_after = [], []
    for i in range(len(text)):
        _, index_i = logits[:, i : i + 1].squeeze().sort(descending=True)
        logits_i = logits[index_i[0 : shots * 2]]
        kl_i_to_i = torch.zeros(len(logits_i))
        for j in range(len(logits_i)):
            kl_i_to_i[j] = torch.sum(logits_i[j] * torch.log(logits_i[j] / logits_i))
        _, index = kl_i_to_i.sort()
        indices = index_i[index[0:shots]]
        indices_list.append(indices)
        label_after.append(torch.zeros(len(indices), dtype=torch.int64) + i)
    indices = torch.cat(indices_list)
    if cache_keys is None:
        return indices, torch.cat(label_after)
    pseudo = reference_tfup_logits(features, cache_keys, cache_values, text.t(), 0.3, 1.0)
    return indices, pseudo.max(dim=1).indices[indices]


def reference_marginal_loss(logits):
    msoftmax = torch.softmax(logits, dim=1).mean(dim=0)
    return -torch.sum(-msoftmax * torch.log(msoftmax + 1e-6))


def reference_adapted(method, raw, clip_weights_raw, ratio_alpha=0.2, ratio_beta=0.5):
    """``Adapter`` + ``TextAdapter`` with the method's current weights: (f', W' as D x C)."""
    lin1, lin2 = method.image_adapter[0].weight, method.image_adapter[2].weight
    x = torch.relu(torch.relu(raw @ lin1.t()) @ lin2.t())
    f = ratio_alpha * x + (1 - ratio_alpha) * raw
    f = f / f.norm(dim=-1, keepdim=True)
    w = (1 - ratio_beta) * clip_weights_raw.t() + ratio_beta * method.text_residual.t()
    return f, w / w.norm(dim=0, keepdim=True)


# ---------------------------------------------------------------------------- helpers
@dataclass
class Batches:
    """A stand-in for the engine's data: fixed (feature, label) batches."""

    features: torch.Tensor
    labels: torch.Tensor

    views = 0
    has_val = False

    def train(self, view=None):
        yield self.features[:7], self.labels[:7]
        yield self.features[7:], self.labels[7:]


def _features(tiny_clip, n: int, seed: int = 0) -> torch.Tensor:
    """Raw features of ``n`` images: random mixtures of the class text directions plus noise,
    so that the zero-shot pseudo-labels vary and are not all confident."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        text = F.normalize(reference_clip_weights(tiny_clip, CLASSES, TEMPLATES), dim=-1)
    mix = F.softmax(3.0 * torch.randn(n, len(CLASSES), generator=gen), dim=1)
    return 4.0 * mix @ text + 0.4 * torch.randn(n, text.shape[1], generator=gen)


def _tfup(tiny_clip, **config) -> TFUP:
    return TFUP(tiny_clip, CLASSES, TFUPConfig(templates=tuple(TEMPLATES), **config))


def _tfup_t(tiny_clip, **config) -> TFUPT:
    torch.manual_seed(0)
    return TFUPT(tiny_clip, CLASSES, TFUPTConfig(templates=tuple(TEMPLATES), **config))


# ---------------------------------------------------------------------------- TFUP
def test_selection_of_a_hand_made_case() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.1, 0.9]])
    # Confidence alone takes each class's most confident image ...
    index, classes = select_representatives(probs, shots=1, factor=1)
    assert index.tolist() == [0, 4]
    assert classes.tolist() == [0, 1]
    # ... the prototype score (Σ KL to the other candidates) the middle of the top three:
    # class 0: image 1 (0.136 against 0.263 and 0.416), class 1: image 3 (0.338, 0.667, 0.94).
    index, classes = select_representatives(probs, shots=1, factor=3)
    assert index.tolist() == [1, 3]
    assert classes.tolist() == [0, 1]
    # Kept in order of the score; an image may serve two classes (image 2 here).
    index, classes = select_representatives(probs, shots=3, factor=1)
    assert index.tolist() == [1, 0, 2, 3, 4, 2]
    assert classes.tolist() == [0, 0, 0, 1, 1, 1]


def test_shot_counts_are_the_references() -> None:
    assert shots_per_class(1000, 10, 0.3, 9, 16) == 16
    assert shots_per_class(100, 10, 0.3, 9, 16) == 9
    assert shots_per_class(400, 10, 0.3, 9, 16) == 12
    assert shots_per_class(1000, 10, 0.75, 9, None) == 75
    assert shots_per_class(20, 10, 0.75, 9, None) == 9


def test_cache_and_logits_equal_the_reference(tiny_clip) -> None:
    feats = _features(tiny_clip, 24)  # 24 images, 3 classes: 9 shots of 18 candidates
    method = _tfup(tiny_clip, alpha=0.7, beta=2.0)
    method.setup(Batches(feats, torch.full((24,), -1)))
    weights = reference_clip_weights(tiny_clip, CLASSES, TEMPLATES)
    index, labels = reference_refine(weights, feats, shots=9)
    keys = feats[index] / feats[index].norm(dim=-1, keepdim=True)
    torch.testing.assert_close(method.cache_keys, keys, rtol=1e-6, atol=1e-6)
    assert torch.equal(method.cache_values, F.one_hot(labels, 3).float())
    assert method.cache_keys.shape == (27, tiny_clip.embed_dim)

    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        raw = tiny_clip.model.encode_image(images).float()
        expected = reference_tfup_logits(
            raw, feats[index], F.one_hot(labels, 3).float(), weights.t(), 0.7, 2.0
        )
        got = method.eval()(images).logits
        zero_shot = 100.0 * F.normalize(raw, dim=-1) @ F.normalize(weights, dim=-1).t()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, zero_shot, atol=1e-2)  # the cache term is there


def test_similarity_of_one_cached_image_is_finite(tiny_clip) -> None:
    method = _tfup(tiny_clip, min_cache_shots=1, max_cache_shots=1, candidate_factor=1)
    method.setup(Batches(_features(tiny_clip, 9)[:1], torch.zeros(1)))
    assert method.cache_keys.shape[0] == 3  # the one image, once per class
    out = method.eval().forward_features(_features(tiny_clip, 4, seed=2)).logits
    assert bool(torch.isfinite(out).all())


def test_true_labels_change_nothing(tiny_clip) -> None:
    feats = _features(tiny_clip, 24, seed=4)
    both = torch.cat([feats, feats], dim=1)
    runs = []
    for labels in (torch.zeros(24), torch.arange(24) % 3, torch.full((24,), -1)):
        data = Batches(feats, labels.long())
        method = _tfup(tiny_clip)
        method.setup(data)
        t = _tfup_t(tiny_clip, stage_one_epochs=1)
        t.setup(Batches(both, labels.long()))
        t.before_epoch(0, Batches(both, labels.long()))
        loss = t.train().forward_features(both).aux_loss["pseudo_ce"].detach()
        runs.append({**method.prompt_state(), **{f"t.{k}": v for k, v in t.prompt_state().items()},
                     "loss": loss})  # fmt: skip
    for other in runs[1:]:
        assert other.keys() == runs[0].keys()
        assert all(torch.equal(other[k], runs[0][k]) for k in other)


# ---------------------------------------------------------------------------- TFUP-T
def _trained_tfup_t(tiny_clip, feats, **config) -> TFUPT:
    method = _tfup_t(tiny_clip, **config)
    both = torch.cat([feats, feats], dim=1)
    method.setup(Batches(both, torch.full((len(feats),), -1)))
    with torch.no_grad():  # a residual away from its zero start, so it matters
        gen = torch.Generator().manual_seed(9)
        method.text_residual.copy_(0.3 * torch.randn(method.text_residual.shape, generator=gen))
    return method


def test_stage_one_loss_and_gradients_equal_the_reference(tiny_clip) -> None:
    feats = _features(tiny_clip, 24, seed=5)
    strong = feats + 0.3 * torch.randn(feats.shape, generator=torch.Generator().manual_seed(6))
    method = _trained_tfup_t(tiny_clip, feats, stage_one_epochs=2, min_training_shots=7)
    method.before_epoch(1, Batches(torch.cat([feats, feats], 1), torch.zeros(24).long()))
    method.train()
    out = method.forward_features(torch.cat([feats, strong], dim=1))
    assert set(out.aux_loss) == {"pseudo_ce"}
    out.aux_loss["pseudo_ce"].backward()

    weights = reference_clip_weights(tiny_clip, CLASSES, TEMPLATES)
    keys = method.cache_keys.detach()
    index, labels = reference_refine(
        weights, feats, shots=7, cache_keys=keys, cache_values=method.cache_values
    )  # training shots: max(7, int(24 · 0.75 / 3)) = 7, duplicates included
    params = [method.text_residual, method.image_adapter[0].weight, method.image_adapter[2].weight]
    f, w = reference_adapted(method, strong[index], weights)
    loss = F.cross_entropy(100.0 * f @ w, labels)
    grads = torch.autograd.grad(loss, params)
    torch.testing.assert_close(out.aux_loss["pseudo_ce"], loss, rtol=1e-5, atol=1e-5)
    for p, g in zip(params, grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("confidence", [0.9, 0.99, 1.0])
def test_stage_two_losses_and_gradients_equal_the_reference(tiny_clip, confidence) -> None:
    feats = _features(tiny_clip, 24, seed=7)
    strong = feats + 0.3 * torch.randn(feats.shape, generator=torch.Generator().manual_seed(8))
    method = _trained_tfup_t(tiny_clip, feats, stage_one_epochs=1, confidence=confidence)
    method.before_epoch(1, Batches(torch.cat([feats, feats], 1), torch.zeros(24).long()))
    method.train()
    out = method.forward_features(torch.cat([feats, strong], dim=1))
    assert set(out.aux_loss) == {"pseudo_ce", "marginal_entropy"}
    total = out.aux_loss["pseudo_ce"] + out.aux_loss["marginal_entropy"]
    total.backward()

    weights = reference_clip_weights(tiny_clip, CLASSES, TEMPLATES)
    params = [method.text_residual, method.image_adapter[0].weight, method.image_adapter[2].weight]
    f_weak, w = reference_adapted(method, feats, weights)
    f_strong, _ = reference_adapted(method, strong, weights)
    k = method.cache_keys.detach()
    r_ff = (f_weak @ k.t()) * reference_sim(k, f_weak, w)
    weak_logits = 100.0 * f_weak @ w + ((-1) * (1.0 - 1.0 * r_ff)).exp() @ method.cache_values * 0.3
    strong_logits = 100.0 * f_strong @ w
    confident = F.softmax(weak_logits, dim=1).max(dim=1).values > confidence
    pseudo = weak_logits.max(dim=1).indices[confident]
    ce = F.cross_entropy(strong_logits[confident], pseudo) if len(pseudo) else torch.tensor(0.0)
    mg = reference_marginal_loss(strong_logits)
    grads = torch.autograd.grad(ce + 0.3 * mg, params)
    if confidence < 1:  # some images kept, some not
        assert 0 < len(pseudo) < len(feats)
    if confidence == 1.0:
        assert len(pseudo) == 0
    torch.testing.assert_close(out.aux_loss["pseudo_ce"], ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.aux_loss["marginal_entropy"], 0.3 * mg, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits, strong_logits, rtol=1e-5, atol=1e-4)
    for p, g in zip(params, grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_tfup_t_predicts_with_the_adapted_zero_shot_logits(tiny_clip) -> None:
    feats = _features(tiny_clip, 24, seed=10)
    method = _trained_tfup_t(tiny_clip, feats).eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        raw = tiny_clip.model.encode_image(images).float()
        f, w = reference_adapted(method, raw, reference_clip_weights(tiny_clip, CLASSES, TEMPLATES))
        torch.testing.assert_close(method(images).logits, 100.0 * f @ w, rtol=1e-5, atol=1e-4)
        pair = torch.stack([images, images.flip(-1)], dim=1)
        assert method.encode_images(pair).shape == (4, 2 * tiny_clip.embed_dim)


def test_defaults_are_the_references() -> None:
    cfg = TFUPTConfig()
    assert (cfg.alpha, cfg.beta, cfg.cache_proportion, cfg.training_proportion) == (
        0.3, 1.0, 0.3, 0.75,
    )  # fmt: skip
    assert (cfg.ratio_alpha, cfg.ratio_beta, cfg.adapter_reduction) == (0.2, 0.5, 4)
    assert (cfg.stage_one_epochs, cfg.confidence, cfg.marginal_weight) == (5, 0.9, 0.3)
    assert (cfg.optim.lr, cfg.optim.eps, cfg.optim.weight_decay) == (0.012, 0.003, 0.1)
    assert (cfg.optim.epochs, cfg.optim.batch_size, cfg.optim.optimizer) == (30, 256, "adamw")
    assert TFUPT.capabilities.uses_labels is False
    assert TFUP.capabilities.uses_labels is False
    assert TFUP.capabilities.trains is False


def test_per_dataset_settings_are_presets_not_benchmark_overrides() -> None:
    """The reference's configs differ per dataset only on Office-31 and VisDA-2017 (none a
    benchmark dataset here): its presets carry them; a benchmark dataset changes nothing but the
    template the protocols fill."""
    from vprompt.engine.experiment import Experiment

    assert TFUP.reference_settings == {}
    assert TFUPT.reference_settings == {}
    for dataset in ("oxford_pets", "imagenet", "eurosat"):
        config, notes = Experiment("tfup-t").config(dataset=dataset)
        assert (config, notes) == (TFUPTConfig(), [])
    presets = {
        "tfup-t/unsupervised": (0.012, 0.75),  # configs/office_home.yaml, domainnet.yaml
        "tfup-t/unsupervised-office31": (0.05, 0.5),  # configs/office31.yaml
        "tfup-t/unsupervised-visda17": (0.012, 0.5),  # configs/visda17.yaml
    }
    for preset, expected in presets.items():
        config, _ = Experiment(preset=preset).config(dataset="oxford_pets")
        assert (config.optim.lr, config.training_proportion) == expected
        assert (config.alpha, config.beta, config.cache_proportion) == (0.3, 1.0, 0.3)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"alpha": -1.0}, "alpha"),
        ({"beta": "1"}, "beta"),
        ({"min_cache_shots": 0}, "min_cache_shots"),
        ({"max_cache_shots": 10**9}, "max_cache_shots"),
        ({"min_cache_shots": 12, "max_cache_shots": 10}, "must be <="),
        ({"candidate_factor": -1}, "candidate_factor"),
        ({"prob_scale": 0.0}, "prob_scale"),
        ({"logit_scale": True}, "logit_scale"),
        ({"templates": ("no slot",)}, "exactly one"),
        ({"templates": ()}, "non-empty"),
        ({"ratio_alpha": 1.5}, "ratio_alpha"),
        ({"ratio_beta": 1.0}, "ratio_beta"),
        ({"adapter_reduction": 0}, "adapter_reduction"),
        ({"training_proportion": -0.1}, "training_proportion"),
        ({"min_training_shots": 10**9}, "min_training_shots"),
        ({"stage_one_epochs": -1}, "stage_one_epochs"),
        ({"confidence": 1.1}, "confidence"),
        ({"marginal_weight": -0.3}, "marginal_weight"),
        ({"feature_views": 0}, "feature_views"),
        ({"optim": {"lr": 1}}, "optim"),
    ],
)
def test_config_validation(config, message) -> None:
    with pytest.raises(ConfigError, match=message):
        TFUPTConfig(**config)


def test_adapter_wider_than_the_features_is_refused(tiny_clip) -> None:
    with pytest.raises(ConfigError, match="no hidden unit"):
        TFUPT(tiny_clip, CLASSES, TFUPTConfig(adapter_reduction=tiny_clip.embed_dim + 1))
    assert TFUPTConfig(optim=OptimConfig()).optim.lr == 0.01


# ---------------------------------------------------------------------------- the CLI
def test_tfup_trains_and_predicts_through_the_cli(tiny_folder, run_cli, tmp_path) -> None:
    out = tmp_path / "tfup"
    res = run_cli("train", "--method", "tfup", "--model", "clip:tiny", "--weights", "none",
                  "--data", f"folder:{tiny_folder}", "--unlabeled", tiny_folder / "train",
                  "--out", out,
                  "--set", "min_cache_shots=2", "--set", "max_cache_shots=2", "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["test_images"] == 6
    pack = load_pack(out / "prompt.safetensors")
    assert pack.tensors["cache_keys"].shape[0] == 6  # 2 per class
    image = next((tiny_folder / "test" / "red_thing").glob("*.png"))
    pred = run_cli("predict", "--pack", out / "prompt.safetensors", image, "--json")
    assert pred.returncode == 0, pred.stderr


def test_tfup_t_trains_on_unlabelled_images_and_predicts(tiny_folder, run_cli, tmp_path) -> None:
    out = tmp_path / "tfup-t"
    sets = ["min_cache_shots=2", "max_cache_shots=2", "min_training_shots=2", "feature_views=2",
            "stage_one_epochs=1", "optim.epochs=2", "optim.batch_size=4"]  # fmt: skip
    res = run_cli("train", "--method", "tfup-t", "--model", "clip:tiny", "--weights", "none",
                  "--data", f"folder:{tiny_folder}", "--unlabeled", tiny_folder / "val",
                  "--out", out, *[a for s in sets for a in ("--set", s)], "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["unlabeled"] == str(tiny_folder / "val")
    pack = load_pack(out / "prompt.safetensors")
    assert pack.tensors["text_residual"].shape == (3, 32)
    assert pack.tensors["text_residual"].abs().sum() > 0  # trained
    image = next((tiny_folder / "test" / "red_thing").glob("*.png"))
    pred = run_cli("predict", "--pack", out / "prompt.safetensors", image, "--json")
    assert pred.returncode == 0, pred.stderr
