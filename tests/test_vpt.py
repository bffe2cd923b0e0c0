"""VPT (visual prompt tuning): parity with the frozen model, an independent reference, training."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vprompt
from vprompt import ConfigError
from vprompt.engine import evaluate, fit
from vprompt.errors import PackError
from vprompt.methods import VPT, VPTConfig
from vprompt.methods.baselines import LinearProbe
from vprompt.methods.config import OptimConfig, apply_overrides, config_from_dict, config_to_dict
from vprompt.methods.vpt import _patch_size, prompt_parameter_count

CLASSES = ["zero", "one", "two"]
BACKBONES = ("timm:tiny-vit", "clip:tiny")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny tensors: extra threads only add contention on shared CI cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_vit():
    return vprompt.load_backbone("timm:tiny-vit", "none")


@pytest.fixture(scope="module")
def backbones(tiny_vit, tiny_clip):
    return {"timm:tiny-vit": tiny_vit, "clip:tiny": tiny_clip}


def _pixels(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _make(backbone, classes=CLASSES, **kw) -> VPT:
    method = VPT(backbone, classes, VPTConfig(**kw))
    method.eval()
    return method


def _randomize(method: VPT, scale: float = 0.5, seed: int = 1) -> None:
    """Prompts far from their small init, so that they visibly change the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        assert method.prompts is not None
        method.prompts.copy_(torch.randn(method.prompts.shape, generator=gen) * scale)


# ---------------------------------------------------------------------------- no prompt = backbone
def test_no_tokens_timm_equals_the_backbone(tiny_vit):
    x = _pixels()
    # A head copied from the backbone's own classifier gives back the model's own logits.
    method = _make(tiny_vit, classes=tiny_vit.source_classes, num_tokens=0)
    assert method.config.head == "linear"
    assert method.trainable_parameters() == list(method.head.parameters())
    method.head.load_state_dict(tiny_vit.head.state_dict())
    with torch.no_grad():
        assert torch.equal(method.features(x), tiny_vit.features(x))
        assert torch.equal(method(x).logits, tiny_vit(x))


def test_no_tokens_clip_equals_encode_image(tiny_clip):
    x = _pixels()
    method = _make(tiny_clip, num_tokens=0)
    assert method.config.head == "text"
    assert method.trainable_parameters() == []
    with torch.no_grad():
        feats = tiny_clip.encode_image(x)
        assert torch.equal(method.features(x), feats)
        expected = tiny_clip.logit_scale * F.normalize(feats, dim=-1) @ method.class_embeddings.T
        assert torch.allclose(method(x).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", BACKBONES)
def test_no_tokens_linear_head_equals_linear_probe(name, backbones):
    backbone, x = backbones[name], _pixels()
    method = _make(backbone, num_tokens=0, head="linear")
    probe = LinearProbe(backbone, CLASSES).eval()
    probe.head.load_state_dict(method.head.state_dict())
    with torch.no_grad():
        assert torch.allclose(method(x).logits, probe(x).logits, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- reference (paper)
def _reference_tokens(backbone, pixels: torch.Tensor) -> tuple[torch.Tensor, list, str]:
    """Embed patches with the libraries' own modules: (B x (1 + N) x D, blocks, family)."""
    if backbone.name.startswith("timm:"):
        m = backbone.model
        x = m.norm_pre(m._pos_embed(m.patch_embed(pixels)))
        return x, list(m.blocks), "timm"
    v = backbone.model.visual
    x = v.conv1(pixels).flatten(2).transpose(1, 2)  # B x N x D
    cls = v.class_embedding.expand(x.shape[0], 1, -1)
    x = v.ln_pre(torch.cat([cls, x], dim=1) + v.positional_embedding)
    return x, list(v.transformer.resblocks), "clip"


def reference_vpt(
    backbone, prompts: torch.Tensor, deep: bool, pixels: torch.Tensor
) -> torch.Tensor:
    """VPT as written in the paper (Eqs. 1-2 shallow, 3 deep), one explicit step per block.

    Shallow: [x_1, Z_1, E_1] = L_1([x_0, P, E_0]), then [x_i, Z_i, E_i] = L_i([x_{i-1}, Z_{i-1},
    E_{i-1}]). Deep: [x_i, _, E_i] = L_i([x_{i-1}, P_{i-1}, E_{i-1}]). The head reads x_L (or the
    mean of E_L); returns B x F pooled features.
    """
    seq, blocks, family = _reference_tokens(backbone, pixels)
    batch, n = pixels.shape[0], prompts.shape[1]
    cls, patches = seq[:, :1], seq[:, 1:]
    z = prompts[0].expand(batch, -1, -1)
    for i, block in enumerate(blocks):
        if deep and i > 0:
            z = prompts[i].expand(batch, -1, -1)  # the previous prompt outputs are discarded
        out = block(torch.cat([cls, z, patches], dim=1))
        cls, z, patches = out[:, :1], out[:, 1 : 1 + n], out[:, 1 + n :]
    tokens = torch.cat([cls, patches], dim=1)  # prompts never reach the pooling
    if family == "clip":
        v = backbone.model.visual
        return v.ln_post(tokens[:, 0]) @ v.proj
    m = backbone.model
    tokens = m.norm(tokens)
    pooled = tokens[:, 1:].mean(dim=1) if m.global_pool == "avg" else tokens[:, 0]
    return m.fc_norm(pooled)


@pytest.fixture(scope="module")
def avg_pool_vit(tiny_vit):
    backbone = copy.deepcopy(tiny_vit)
    backbone.model.global_pool = "avg"
    return backbone


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
@pytest.mark.parametrize("name", [*BACKBONES, "timm:tiny-vit/avg-pool"])
def test_matches_the_papers_formulation(name, deep, backbones, avg_pool_vit):
    backbone = avg_pool_vit if name.endswith("avg-pool") else backbones[name]
    method = _make(backbone, num_tokens=5, deep=deep, dropout=0.3)
    _randomize(method)
    assert method.prompts is not None
    x = _pixels()
    with torch.no_grad():
        feats = reference_vpt(backbone, method.prompts, deep, x)
        if method.head is None:
            scale = backbone.logit_scale
            expected = scale * F.normalize(feats, dim=-1) @ method.class_embeddings.T
        else:
            expected = method.head(feats)
        assert torch.equal(method.features(x), feats)
        assert torch.equal(method(x).logits, expected)
        # ... and the prompts matter: the frozen model alone gives something else.
        plain = _make(backbone, num_tokens=0, head=method.config.head)
        assert not torch.allclose(plain.features(x), feats, atol=1e-3)


# ---------------------------------------------------------------------------- token sets per layer
@pytest.mark.parametrize("name", BACKBONES)
def test_deep_has_a_distinct_token_set_per_layer(name, backbones):
    backbone, x = backbones[name], _pixels()
    depth = len(backbone.vision_blocks)
    deep = _make(backbone, num_tokens=3, deep=True)
    _randomize(deep)
    assert deep.prompts.shape == (depth, 3, backbone.vision_width)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        base = deep.features(x)
        for layer in range(depth):
            saved = deep.prompts[layer].clone()
            # Random, not constant: LayerNorm inside each block cancels a uniform shift.
            deep.prompts[layer] += torch.randn(saved.shape, generator=gen)
            assert not torch.allclose(deep.features(x), base, atol=1e-4), layer
            deep.prompts[layer] = saved
        assert torch.equal(deep.features(x), base)

    shallow = _make(backbone, num_tokens=3)
    assert shallow.prompts.shape == (1, 3, backbone.vision_width)
    assert shallow.layer_prompts(0, 2, x.dtype).shape == (2, 3, backbone.vision_width)
    assert all(shallow.layer_prompts(i, 2, x.dtype) is None for i in range(1, depth))


def test_prompt_parameter_counts(backbones):
    # ViT-B/16: D = 768, 12 blocks, 86,567,656 parameters (timm vit_base_patch16_224).
    vit_b = 86_567_656
    shallow = prompt_parameter_count(num_tokens=10, width=768, depth=12, deep=False)
    deep = prompt_parameter_count(num_tokens=10, width=768, depth=12, deep=True)
    assert (shallow, deep) == (7_680, 92_160)
    assert deep / vit_b < 0.01
    for backbone in backbones.values():
        for is_deep in (False, True):
            method = _make(backbone, num_tokens=4, deep=is_deep)
            expected = prompt_parameter_count(
                num_tokens=4,
                width=backbone.vision_width,
                depth=len(backbone.vision_blocks),
                deep=is_deep,
            )
            assert method.num_prompt_parameters == expected
            assert method.prompt_state()["prompts"].numel() == expected


# ---------------------------------------------------------------------------- dropout and init
@pytest.mark.parametrize("name", BACKBONES)
def test_prompt_dropout_only_in_training(name, backbones):
    backbone, x = backbones[name], _pixels()
    method = _make(backbone, num_tokens=6, deep=True, dropout=0.5)
    _randomize(method)
    reference = _make(backbone, num_tokens=6, deep=True, dropout=0.0)
    reference.load_prompt_state(method.prompt_state())
    with torch.no_grad():
        method.eval()
        assert torch.equal(method(x).logits, method(x).logits)
        assert torch.equal(method(x).logits, reference(x).logits)
        method.train()
        assert not backbone.training
        torch.manual_seed(0)
        a = method(x).logits
        b = method(x).logits
        assert not torch.allclose(a, b)
        assert not torch.allclose(a, reference(x).logits)
        reference.train()  # without dropout, train mode changes nothing
        assert torch.equal(reference(x).logits, reference.eval()(x).logits)


@pytest.mark.parametrize("name", BACKBONES)
def test_init_bounds_and_seed(name, backbones):
    backbone = backbones[name]
    width = backbone.vision_width
    assert _patch_size(backbone) == 8
    bound = math.sqrt(6 / (3 * 8**2 + width))
    xavier = _make(backbone, num_tokens=20, deep=True).prompts.detach()
    assert xavier.abs().max() <= bound
    assert xavier.abs().max() > 0.95 * bound  # uniform over the whole range
    assert abs(xavier.mean()) < 0.1 * bound
    again = _make(backbone, num_tokens=20, deep=True).prompts.detach()
    assert torch.equal(xavier, again)
    other = _make(backbone, num_tokens=20, deep=True, seed=1).prompts.detach()
    assert not torch.equal(xavier, other)
    normal = _make(backbone, num_tokens=20, deep=True, init="normal").prompts.detach()
    assert 0.015 < normal.std() < 0.025
    assert not _make(backbone, num_tokens=5, init="zeros").prompts.detach().any()


# ---------------------------------------------------------------------------- config and state
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_tokens": -1}, "num_tokens"),
        ({"num_tokens": 2.5}, "num_tokens"),
        ({"num_tokens": True}, "num_tokens"),
        ({"deep": "yes"}, "deep"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"init": "kaiming"}, "init"),
        ({"head": "mlp"}, "head"),
        ({"templates": ()}, "templates"),
        ({"templates": ("no placeholder",)}, "placeholder|exactly one"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        VPTConfig(**kwargs)


def test_config_overrides_and_resolution(tiny_vit, tiny_clip):
    config = apply_overrides(VPTConfig(), ["num_tokens=7", "deep=true", "optim.lr=0.1"])
    assert (config.num_tokens, config.deep, config.optim.lr) == (7, True, 0.1)
    with pytest.raises(ConfigError, match="dropout"):
        apply_overrides(VPTConfig(), ["dropout=2"])
    default = VPTConfig().optim
    assert (default.optimizer, default.momentum, default.warmup_epochs) == ("sgd", 0.9, 10)
    # "auto" is stored as the concrete head, so a pack rebuilds the same method.
    for backbone, head in ((tiny_vit, "linear"), (tiny_clip, "text")):
        resolved = VPT(backbone, CLASSES).config
        assert resolved.head == head
        assert config_from_dict(VPTConfig, config_to_dict(resolved)) == resolved
    with pytest.raises(ConfigError, match="CLIP"):
        VPT(tiny_vit, CLASSES, VPTConfig(head="text"))
    clip_linear = VPT(tiny_clip, CLASSES, VPTConfig(head="linear"))
    assert clip_linear.head.in_features == tiny_clip.embed_dim


def test_refuses_a_cnn():
    cnn = vprompt.load_backbone("torchvision:tiny", "none")
    with pytest.raises(ConfigError, match="vision transformer"):
        VPT(cnn, CLASSES)


def test_state_round_trip_and_mismatch(tiny_vit):
    method = _make(tiny_vit, num_tokens=4, deep=True)
    _randomize(method)
    state = method.prompt_state()
    assert set(state) == {"prompts", "head.weight", "head.bias"}
    other = _make(tiny_vit, num_tokens=4, deep=True, seed=3)
    other.load_prompt_state(state)
    x = _pixels()
    with torch.no_grad():
        assert torch.equal(other(x).logits, method(x).logits)
    with pytest.raises(PackError, match="missing"):
        other.load_prompt_state({"prompts": state["prompts"]})
    shallow = _make(tiny_vit, num_tokens=4)
    with pytest.raises(PackError, match="shape"):
        shallow.load_prompt_state(state)
    shown = method.visualizations(x)["prompt_tokens"]
    vis = shown.image
    assert vis.shape == (3, 2 * 4, tiny_vit.vision_width)
    assert vis.min() == 0
    assert vis.max() == 1
    raw = method.prompts.detach().flatten(0, 1)
    assert (shown.low, shown.high) == (float(raw.min()), float(raw.max()))
    torch.testing.assert_close(vis[0] * (shown.high - shown.low) + shown.low, raw)


def test_input_transform_flips_only_when_training(tiny_vit):
    image = Image.fromarray(np.tile(np.arange(32, dtype=np.uint8)[None, :, None] * 8, (32, 1, 3)))
    method = _make(tiny_vit, num_tokens=2)
    plain = method.input_transform(False)(image)
    assert torch.equal(plain, tiny_vit.transform(image))
    torch.manual_seed(0)
    seen = {bool(torch.equal(method.input_transform(True)(image), plain)) for _ in range(20)}
    assert seen == {True, False}
    no_aug = _make(tiny_vit, num_tokens=2, augment=False)
    assert no_aug.input_transform(True) is tiny_vit.transform


# ---------------------------------------------------------------------------- training
class _ColorData:
    """Noisy reddish vs bluish 32 x 32 images."""

    def __init__(self, n: int, seed: int) -> None:
        self.classnames = ["red", "blue"]
        rng = np.random.default_rng(seed)
        self.items = []
        for i in range(n):
            base = np.array([170, 60, 60] if i % 2 == 0 else [60, 60, 170], dtype=float)
            pixels = np.clip(base + rng.normal(0, 40, size=(32, 32, 3)), 0, 255).astype(np.uint8)
            self.items.append((Image.fromarray(pixels), i % 2))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


@pytest.mark.parametrize(
    ("name", "deep", "lr", "epochs"),
    # Random CLIP class embeddings start with a strong bias to one class, and only the
    # prompts learn there (text head), so it needs more (cheap: 3 steps each) epochs.
    [("timm:tiny-vit", False, 0.5, 3), ("clip:tiny", True, 0.1, 10)],
    ids=["timm-shallow-linear", "clip-deep-text"],
)
def test_fit_learns_a_two_class_task(name, deep, lr, epochs, backbones, tmp_path):
    backbone = backbones[name]
    train, val = _ColorData(48, seed=1), _ColorData(32, seed=2)
    optim = OptimConfig(optimizer="sgd", lr=lr, epochs=epochs, warmup_epochs=1, batch_size=16)
    method = VPT(backbone, train.classnames, VPTConfig(num_tokens=4, deep=deep, optim=optim))
    untrained = evaluate(method, val, progress=False).accuracy
    start = method.prompts.detach().clone()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    result = fit(method, train, val=val, out_dir=tmp_path, progress=False)
    accuracy = evaluate(method, val, progress=False).accuracy
    assert untrained <= 0.6
    assert result.best_val_acc is not None
    assert result.best_val_acc >= 0.85
    assert accuracy == result.best_val_acc
    assert not torch.equal(method.prompts.detach(), start)
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (tmp_path / "prompt_tokens.png").is_file()
