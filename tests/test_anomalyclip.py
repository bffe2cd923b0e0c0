"""AnomalyCLIP against from-the-paper computations written here, on ``clip:tiny`` (CPU).

The references below re-derive every step from zqhang/AnomalyCLIP (prompt_ensemble.py,
AnomalyCLIP_lib/AnomalyCLIP.py, train.py, test.py, loss.py) with the open_clip weights only.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from vprompt.anomaly.anomalyclip import AnomalyCLIP, AnomalyCLIPConfig
from vprompt.anomaly.base import ANOMALY_METHODS
from vprompt.anomaly.losses import dice_loss, focal_loss
from vprompt.backbones import clip_anomaly, list_models
from vprompt.errors import ConfigError

TINY = {"depth": 2, "dpam_start": 1, "feature_layers": (1,), "image_size": None}
# Large prompts: the random tiny tower barely reacts to N(0, 0.02²) ones.
CASES = [
    {**TINY, "init_std": 1.0},
    # resized positional embedding, DPAM from block 0, two feature blocks
    {
        **TINY,
        "n_ctx": 3,
        "t_n_ctx": 2,
        "dpam_start": 0,
        "feature_layers": (0, 1),
        "image_size": 48,
        "sigma": 1.0,
        "init_std": 1.0,
    },
    # a feature block before DPAM starts gives the tower's own tokens
    {**TINY, "feature_layers": (0, 1), "sigma": 0.0, "init_std": 1.0},
]


def build(backbone, **overrides) -> AnomalyCLIP:
    torch.manual_seed(0)
    return AnomalyCLIP(backbone, AnomalyCLIPConfig(**{**TINY, **overrides}))


def pixels_for(method: AnomalyCLIP, batch: int = 2, seed: int = 1) -> torch.Tensor:
    s = method.frame.size
    return torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- reference computations
def ref_text(method: AnomalyCLIP) -> torch.Tensor:
    """prompt_ensemble.AnomalyCLIP_PromptLearner + encode_text_learn, full 77-token context."""
    model = method.backbone.model
    cfg = method.config
    words = " ".join(["X"] * cfg.n_ctx)
    tokens = method.backbone.tokenize([f"{words} object.", f"{words} damaged object."])
    emb = model.token_embedding(tokens)
    ctx = torch.stack([method.ctx_normal, method.ctx_abnormal])
    x = torch.cat([emb[:, :1], ctx, emb[:, 1 + cfg.n_ctx :]], dim=1) + model.positional_embedding
    for i, block in enumerate(model.transformer.resblocks):
        if 1 <= i <= cfg.depth - 1:  # compound prompts replace positions 1 … t_n_ctx
            deep = method.deep[i - 1].expand(2, -1, -1)
            x = torch.cat([x[:, :1], deep, x[:, 1 + cfg.t_n_ctx :]], dim=1)
        x = block(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    x = x[torch.arange(2), tokens.argmax(dim=-1)] @ model.text_projection
    return x / x.norm(dim=-1, keepdim=True)


def ref_block(block, x, x_vv):
    """AnomalyCLIP_lib ``Attention`` (v-v) + ``ResidualAttentionBlock.forward`` dual path."""
    attn = block.attn
    b, n, d = x.shape
    h = attn.num_heads
    y = block.ln_1(x)
    qkv = y @ attn.in_proj_weight.T + attn.in_proj_bias
    q, k, v = (t.reshape(b, n, h, d // h).permute(0, 2, 1, 3) for t in qkv.split(d, dim=-1))
    scale = (d // h) ** -0.5
    a_ori = (q @ k.transpose(-2, -1) * scale).softmax(-1)
    a_vv = (v @ v.transpose(-2, -1) * scale).softmax(-1)

    def out(a):
        z = (a @ v).permute(0, 2, 1, 3).reshape(b, n, d)
        return z @ attn.out_proj.weight.T + attn.out_proj.bias

    x_ori = x + out(a_ori)
    x_ori = x_ori + block.mlp(block.ln_2(x_ori))
    start = x if x_vv is None else x_vv
    return x_ori, start + out(a_vv)


def ref_vision(method: AnomalyCLIP, pixels: torch.Tensor):
    """AnomalyCLIP_lib ``VisionTransformer.forward`` with ``DPAM_layer`` from ``dpam_start``."""
    v = method.backbone.model.visual
    cfg = method.config
    x = v.conv1(pixels)
    g = x.shape[-1]
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([v.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
    pos = v.positional_embedding
    side = int((pos.shape[0] - 1) ** 0.5)
    if side != g:
        new = pos[1:].reshape(-1, side, side, x.shape[-1]).permute(0, 3, 1, 2)
        new = F.interpolate(new, (g, g), mode="bilinear")
        new = new.reshape(-1, x.shape[-1], g * g).transpose(1, 2)
        pos = torch.cat([pos[:1], new[0]], 0)
    x = v.ln_pre(x + pos)
    x_vv, kept = None, []
    for i, block in enumerate(v.transformer.resblocks):
        if i >= cfg.dpam_start:
            x, x_vv = ref_block(block, x, x_vv)
        else:
            x = block(x)
        if i in cfg.feature_layers:
            kept.append(x if x_vv is None else x_vv)
    image = x[:, 0] @ v.proj  # the reference projects the raw class token
    patches = [v.ln_post(t) @ v.proj for t in kept]
    return image, patches


def ref_maps(method: AnomalyCLIP, pixels: torch.Tensor):
    """compute_similarity + get_similarity_map of every feature block: B x 2 x S x S each."""
    text = ref_text(method)
    image, patches = ref_vision(method, pixels)
    size = pixels.shape[-1]
    maps = []
    for p in patches:
        p = p / p.norm(dim=-1, keepdim=True)
        sim = ((p[:, :, None, :] * text[None, None]).sum(-1) / 0.07).softmax(-1)[:, 1:, :]
        g = int(sim.shape[1] ** 0.5)
        sm = sim.reshape(sim.shape[0], g, g, -1).permute(0, 3, 1, 2)
        maps.append(F.interpolate(sm, size, mode="bilinear"))
    image = image / image.norm(dim=-1, keepdim=True)
    return image, text, maps


# ---------------------------------------------------------------------- (1) text features
@pytest.mark.parametrize("case", CASES[:2])
def test_text_features_match_the_paper(tiny_clip, case):
    method = build(tiny_clip, **case)
    with torch.no_grad():
        torch.testing.assert_close(method.text_features(), ref_text(method), atol=1e-5, rtol=1e-5)
    # the deep prompts matter (they enter block 1)
    with torch.no_grad():
        before = method.text_features()
        method.deep[0].mul_(-1.0)
        assert (method.text_features() - before).abs().max() > 1e-2


# ---------------------------------------------------------------------- (2) one DPAM block
def test_dual_path_block_matches_independent_computation(tiny_clip):
    blocks = tiny_clip.model.visual.transformer.resblocks
    x = torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got_x, got_vv = clip_anomaly.dual_path_block(blocks[0], x, None)
        want_x, want_vv = ref_block(blocks[0], x, None)
        torch.testing.assert_close(got_x, want_x, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_vv, want_vv, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_x, blocks[0](x), atol=1e-5, rtol=1e-5)
        # the next block: attention from the original path, added to the V-V running sum
        got = clip_anomaly.dual_path_block(blocks[1], got_x, got_vv)
        want = ref_block(blocks[1], want_x, want_vv)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_resized_positions_keep_the_class_row(tiny_clip):
    pos = tiny_clip.model.visual.positional_embedding
    assert clip_anomaly.resized_positions(pos, 4) is pos
    new = clip_anomaly.resized_positions(pos, 6)
    assert new.shape == (37, 64)
    torch.testing.assert_close(new[0], pos[0])


# ---------------------------------------------------------------------- (3) maps and scores
@pytest.mark.parametrize("case", CASES)
def test_maps_and_image_scores_match_the_paper(tiny_clip, case):
    method = build(tiny_clip, **case)
    pixels = pixels_for(method)
    with torch.no_grad():
        out = method.score(pixels)
        image, text, maps = ref_maps(method, pixels)
    # test.py: softmax(global · text / 0.07)[abnormal]; map = Σ_blocks (P_abn + 1 - P_norm) / 2
    scores = (image @ text.T / 0.07).softmax(-1)[:, 1]
    summed = sum((m[:, 1] + 1 - m[:, 0]) / 2.0 for m in maps).numpy()
    sigma = method.config.sigma
    if sigma > 0:
        summed = np.stack([ndimage.gaussian_filter(m, sigma=sigma) for m in summed])
    s = pixels.shape[-1]
    assert out.maps.shape == (2, s, s)
    assert out.image_scores.shape == (2,)
    torch.testing.assert_close(out.image_scores, scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.maps, torch.from_numpy(summed), atol=1e-5, rtol=1e-5)


def test_training_loss_is_the_reference_sum(tiny_clip):
    method = build(tiny_clip, **CASES[1])
    pixels = pixels_for(method)
    s = pixels.shape[-1]
    masks = torch.zeros(2, s, s)
    masks[1, 10:30, 5:25] = 0.7  # binarised at 0.5
    labels = torch.tensor([0, 1])
    terms = method.training_loss(pixels, labels, masks)
    assert set(terms) == {"image_ce", "focal", "dice"}
    image, text, maps = ref_maps(method, pixels)
    gt = (masks > 0.5).float()
    ce = F.cross_entropy(image @ text.T / 0.07, labels)
    local = sum(
        focal_loss(m, gt) + dice_loss(m[:, 1], gt) + dice_loss(m[:, 0], 1 - gt) for m in maps
    )
    torch.testing.assert_close(sum(terms.values()), ce + 4 * local, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- (4) losses by hand
def test_focal_loss_by_hand():
    p_abn = [0.8, 0.3, 0.05, 0.6]
    target = [1, 0, 1, 0]
    probs = torch.tensor([[p_abn[:2], p_abn[2:]]])  # 1 x S x S abnormal
    probs = torch.stack([1 - probs, probs], dim=1)  # 1 x 2 x 2 x 2
    tgt = torch.tensor([[target[:2], target[2:]]], dtype=torch.float32)
    eps = 1e-5

    def one(p1: float, t: int, weight: float = 1.0) -> float:
        y1 = 1 - eps if t == 1 else eps  # clamped one-hot (eps / (C - 1) with C = 2)
        pt = (1 - y1) * (1 - p1) + y1 * p1 + eps
        return -weight * (1 - pt) ** 2 * math.log(pt)

    want = sum(one(p, t) for p, t in zip(p_abn, target, strict=True)) / 4
    assert focal_loss(probs, tgt).item() == pytest.approx(want, rel=1e-5)
    # list alpha is normalised: (1, 3) → 0.25 for normal, 0.75 for abnormal pixels
    weights = (0.25, 0.75)
    want_a = sum(one(p, t, weights[t]) for p, t in zip(p_abn, target, strict=True)) / 4
    assert focal_loss(probs, tgt, alpha=(1.0, 3.0)).item() == pytest.approx(want_a, rel=1e-5)
    # gamma 0 is the smoothed cross-entropy
    ce = (
        sum(
            -math.log((1 - eps) * (p if t else 1 - p) + eps * (1 - p if t else p) + eps)
            for p, t in zip(p_abn, target, strict=True)
        )
        / 4
    )
    assert focal_loss(probs, tgt, gamma=0.0).item() == pytest.approx(ce, rel=1e-5)


def test_dice_loss_by_hand():
    p = torch.tensor([[[0.8, 0.3], [0.1, 0.0]], [[0.5, 0.5], [0.5, 0.5]]])
    y = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    d0 = (2 * 0.8 + 1) / (1.2 + 1 + 1)
    d1 = (0 + 1) / (2.0 + 0 + 1)
    assert dice_loss(p, y).item() == pytest.approx(1 - (d0 + d1) / 2, rel=1e-6)


# ---------------------------------------------------------------------- (5) gradients
def test_gradients_reach_prompts_only(tiny_clip):
    method = build(tiny_clip)
    pixels = pixels_for(method)
    masks = torch.zeros(2, 32, 32)
    masks[1, :16, :16] = 1
    sum(method.training_loss(pixels, torch.tensor([0, 1]), masks).values()).backward()
    names = [n for n, _ in method.named_parameters() if not n.startswith("backbone.")]
    assert names == ["ctx_normal", "ctx_abnormal", "deep.0"]
    for p in method.trainable_parameters():
        assert p.grad is not None
        assert p.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in method.backbone.parameters())
    assert set(method.state()) == set(names)


# ---------------------------------------------------------------------- (6) training and config
def test_one_adam_step_changes_the_prompts(tiny_clip):
    method = build(tiny_clip)
    frozen = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    before = {k: v.clone() for k, v in method.state().items()}
    optim = method.config.optim
    opt = torch.optim.Adam(method.trainable_parameters(), lr=optim.lr, betas=optim.betas)
    pixels = pixels_for(method)
    masks = torch.zeros(2, 32, 32)
    masks[0, 8:20, 8:20] = 1
    loss = sum(method.training_loss(pixels, torch.tensor([1, 0]), masks).values())
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    after = method.state()
    assert all(not torch.equal(before[k], after[k]) for k in before)
    for k, v in method.backbone.state_dict().items():
        assert torch.equal(v, frozen[k])
    with torch.no_grad():
        out = method.score(pixels)
    assert torch.isfinite(out.maps).all()
    assert torch.isfinite(out.image_scores).all()


def test_state_round_trip_and_object_agnostic(tiny_clip):
    method = build(tiny_clip)
    pixels = pixels_for(method)
    with torch.no_grad():
        want = method.score(pixels)
        other = build(tiny_clip)
        with torch.no_grad():
            for p in other.trainable_parameters():
                p.add_(0.5)
        other.load_state(method.state())
        other.set_object_name("bottle")  # the prompts never name the object
        got = other.score(pixels)
    torch.testing.assert_close(got.maps, want.maps)
    torch.testing.assert_close(got.image_scores, want.image_scores)


def test_reference_defaults_and_registration():
    cfg = AnomalyCLIPConfig()
    assert (cfg.n_ctx, cfg.depth, cfg.t_n_ctx, cfg.image_size) == (12, 9, 4, 518)
    assert (cfg.dpam_start, cfg.feature_layers, cfg.temperature) == (5, (23,), 0.07)
    assert (cfg.local_weight, cfg.sigma, cfg.global_norm) == (4.0, 4.0, False)
    o = cfg.optim
    assert (o.optimizer, o.lr, o.betas, o.epochs, o.batch_size) == (
        "adam",
        0.001,
        (0.5, 0.999),
        15,
        8,
    )
    assert ANOMALY_METHODS.get("anomalyclip") is AnomalyCLIP
    assert AnomalyCLIP.default_model in {m["name"] for m in list_models()}
    assert dataclasses.replace(cfg, feature_layers=[5, 11]).feature_layers == (5, 11)


@pytest.mark.parametrize(
    "bad",
    [
        {"n_ctx": 0},
        {"depth": 0},
        {"t_n_ctx": 13},
        {"init_std": -1.0},
        {"dpam_start": -1},
        {"feature_layers": ()},
        {"feature_layers": (1, 1)},
        {"feature_layers": (-1,)},
        {"image_size": 4},
        {"temperature": 0.0},
        {"sigma": -0.5},
        {"local_weight": float("nan")},
        {"global_norm": "yes"},
    ],
)
def test_bad_config_values_are_rejected(bad):
    with pytest.raises(ConfigError) as err:
        AnomalyCLIPConfig(**bad)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "bad",
    [{"depth": 3}, {"feature_layers": (2,)}, {"dpam_start": 3}, {"image_size": 36}],
)
def test_config_that_does_not_fit_the_backbone_is_rejected(tiny_clip, bad):
    with pytest.raises(ConfigError):
        build(tiny_clip, **bad)
