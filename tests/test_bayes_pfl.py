"""Bayes-PFL (vprompt.anomaly.bayes_pfl) and its planar flows, on clip:tiny.

The reference computations here are written from the paper's / reference code's equations
with explicit loops, torch.distributions and open_clip's own modules, not with the method's
helpers.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.nn import functional as F

from vprompt.anomaly.base import ANOMALY_METHODS
from vprompt.anomaly.bayes_pfl import BayesPFL, BayesPFLConfig, TrainingDraw
from vprompt.anomaly.flows import flow_kl, gaussian_log_density, planar_step, run_flows
from vprompt.backbones import load_backbone
from vprompt.errors import ConfigError


@pytest.fixture(scope="module")
def backbone():
    bb = load_backbone("clip:tiny", weights="none")
    for p in bb.parameters():
        p.requires_grad_(False)
    return bb.eval()


def tiny_config(**changes) -> BayesPFLConfig:
    return BayesPFLConfig(**{**BayesPFL.examples()[0].overrides, **changes})


def make(backbone, seed: int = 0, **changes) -> BayesPFL:
    torch.manual_seed(seed)
    return BayesPFL(backbone, tiny_config(**changes), object_name="bottle")


# ---------------------------------------------------------------------------------- flows
def test_planar_step_matches_formula_and_jacobian():
    torch.manual_seed(1)
    d = 3
    z, u, w = (torch.randn(d, dtype=torch.float64) for _ in range(3))
    b = torch.tensor(0.3, dtype=torch.float64)
    out, logdet = planar_step(z, u, w, b)
    a = sum(float(w[i] * z[i]) for i in range(d)) + 0.3
    want = [float(z[i] + u[i] * math.tanh(a)) for i in range(d)]
    assert out.tolist() == pytest.approx(want, abs=1e-12)
    psi_u = (1 - math.tanh(a) ** 2) * sum(float(w[i] * u[i]) for i in range(d))
    assert float(logdet) == pytest.approx(math.log(abs(1 + psi_u) + 1e-5), abs=1e-12)
    jac = torch.autograd.functional.jacobian(lambda x: planar_step(x, u, w, b)[0], z)
    assert float(logdet) == pytest.approx(math.log(abs(float(torch.det(jac))) + 1e-5), abs=1e-10)


def test_flow_chain_log_det_is_the_sum_over_steps():
    torch.manual_seed(2)
    k, d = 3, 4
    u, w = 0.5 * torch.randn(k, d, dtype=torch.float64), torch.randn(k, d, dtype=torch.float64)
    b = torch.randn(k, dtype=torch.float64)
    z0 = torch.randn(d, dtype=torch.float64)
    zk, logdet = run_flows(z0, u, w, b)
    jac = torch.autograd.functional.jacobian(lambda x: run_flows(x, u, w, b)[0], z0)
    # The 1e-5 inside each step's log is negligible next to well-conditioned steps.
    assert float(logdet) == pytest.approx(math.log(abs(float(torch.det(jac)))), abs=1e-4)
    z = z0.clone()
    for i in range(k):
        z = z + u[i] * torch.tanh(w[i] @ z + b[i])
    torch.testing.assert_close(zk, z)


def test_gaussian_log_density_and_kl_against_torch_distributions():
    torch.manual_seed(3)
    n, d = 4, 5
    mean, var = torch.randn(n, d), torch.rand(n, d) + 0.2
    z0 = mean + var.sqrt() * torch.randn(n, d)
    zk, logdet = z0 * 1.3 + 0.1, torch.randn(n)
    const = 0.5 * d * math.log(2 * math.pi)  # dropped in both densities, as the reference does
    q = torch.distributions.Normal(mean, var.sqrt()).log_prob(z0).sum(-1) + const
    torch.testing.assert_close(gaussian_log_density(z0, mean, var), q)
    p = torch.distributions.Normal(0.0, 1.0).log_prob(zk).sum(-1) + const
    want = ((q - p).sum() - logdet.sum()) / 7
    torch.testing.assert_close(flow_kl(z0, zk, mean, var, logdet, 7), want)


# ---------------------------------------------------------------------------------- sampling
def test_scoring_draws_are_seeded(backbone):
    m = make(backbone)
    a, b = m.scoring_draws(), m.scoring_draws()
    assert all(x.shape == (2, backbone.text_width) for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    c = BayesPFL(backbone, tiny_config(seed=7)).scoring_draws()
    assert not torch.equal(a[0], c[0])


def test_identity_flows_keep_the_base_distribution(backbone):
    m = make(backbone)
    with torch.no_grad():
        for lin in (m.context_flow.amor_u,):
            lin.weight.zero_()
            lin.bias.zero_()
        m.normal_flow.u.zero_()
    g = torch.randn(2, backbone.embed_dim)
    eps = torch.randn(20000, 2, backbone.text_width)
    with torch.no_grad():
        z0, zk, logdet, mean, var = m.context_flow(g, eps)
        assert zk.shape == (20000, 2, backbone.text_width)
        assert logdet.shape == (20000, 2)
        torch.testing.assert_close(zk, z0)
        torch.testing.assert_close(zk.mean(0), mean, atol=0.05 * float(var.max().sqrt()), rtol=0)
        torch.testing.assert_close(zk.var(0), var, atol=0, rtol=0.06)
        steps = m.config.flow_steps  # each identity step adds log(1 + 1e-5)
        torch.testing.assert_close(
            logdet, torch.full_like(logdet, steps * math.log(1 + 1e-5)), atol=1e-6, rtol=0
        )
        _s0, sk, _, s_mean, s_var = m.normal_flow(m.state_encoder, eps[:, 0])
        torch.testing.assert_close(
            sk.mean(0), s_mean[0], atol=0.05 * float(s_var.max().sqrt()), rtol=0
        )
        torch.testing.assert_close(sk.var(0), s_var[0], atol=0, rtol=0.06)


def test_scores_are_deterministic_and_survive_state_round_trip(backbone):
    m = make(backbone).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    out = m.score(x)
    assert out.image_scores.shape == (2,)
    assert out.maps.shape == (2, 32, 32)
    assert bool(((out.image_scores > 0) & (out.image_scores < 1)).all())
    again = make(backbone, seed=99)
    again.load_state(m.state())
    out2 = again.score(x)
    assert torch.equal(out.image_scores, out2.image_scores)
    assert torch.equal(out.maps, out2.maps)
    other = BayesPFL(backbone, tiny_config(seed=4), object_name="bottle")
    other.load_state(m.state())
    assert not torch.equal(other.score(x).image_scores, out.image_scores)


# ---------------------------------------------------------------------------------- full loss
def _reference_text(bb, prompt_vectors: torch.Tensor) -> torch.Tensor:
    """T x (P+Q) x W learned vectors in "X bottle" → T x E, the reference's TextEncoder: the
    full 77-token sequence through open_clip's own text modules."""
    model = bb.model
    tokens = bb.tokenize(["X bottle"])[0]
    emb = model.token_embedding(tokens)  # 77 x W
    k = prompt_vectors.shape[1]
    eot = int(tokens.argmax())
    outs = []
    for vecs in prompt_vectors:
        seq = torch.cat([emb[:1], vecs, emb[2 : 77 - k + 1]])[None] + model.positional_embedding
        x = model.ln_final(model.transformer(seq, attn_mask=model.attn_mask))
        outs.append(x[0, eot + k - 1] @ model.text_projection)
    return torch.stack(outs)


def _reference_loss(m: BayesPFL, pixels, labels, masks, draw: TrainingDraw) -> torch.Tensor:
    bb, cfg = m.backbone, m.config
    visual = bb.model.visual
    caught = {}
    hooks = [
        visual.transformer.resblocks[i].register_forward_hook(
            lambda _m, _i, out, i=i: caught.__setitem__(i, out)
        )
        for i in cfg.feature_layers
    ]
    with torch.no_grad():
        g = bb.model.encode_image(pixels)
    for h in hooks:
        h.remove()
    patches = [caught[i][:, 1:] for i in cfg.feature_layers]
    n_img, n = pixels.shape[0], cfg.n_prompts

    def flows(z, u, w, b):
        logdet = torch.zeros(z.shape[0])
        for k in range(u.shape[1]):
            a = (w[:, k] * z).sum(-1) + b[:, k]
            logdet = logdet + torch.log(
                (1 + (1 - torch.tanh(a) ** 2) * (w[:, k] * u[:, k]).sum(-1)).abs() + 1e-5
            )
            z = z + u[:, k] * torch.tanh(a)[:, None]
        return z, logdet

    def kl(z0, zk, mu, var, logdet, count):
        q = torch.distributions.Normal(mu, var.sqrt()).log_prob(z0).sum(-1)
        p = torch.distributions.Normal(0.0, 1.0).log_prob(zk).sum(-1)
        return ((q - p).sum() - logdet.sum()) / count

    cf, k, w_t = m.context_flow, cfg.flow_steps, bb.text_width
    mu, var = cf.encoder.mean(g), torch.exp(0.5 * cf.encoder.log_var(g))
    z0 = mu + var.sqrt() * draw.eps_context
    zk, ld = flows(
        z0, cf.amor_u(g).view(n_img, k, w_t), cf.amor_w(g).view(n_img, k, w_t), cf.amor_b(g)
    )
    reg = kl(z0, zk, mu, var, ld, n_img)
    states = []
    for flow, eps in ((m.normal_flow, draw.eps_normal), (m.abnormal_flow, draw.eps_abnormal)):
        smu, svar = (
            m.state_encoder.mean(flow.state),
            torch.exp(0.5 * m.state_encoder.log_var(flow.state)),
        )
        s0 = smu + svar.sqrt() * eps
        sk, sld = flows(s0, flow.u[None], flow.w[None], flow.b[None])
        reg = reg + kl(s0, sk, smu, svar, sld, n_img)
        states.append(sk[0])
    text = torch.zeros(n_img, 2 * n, bb.embed_dim)
    for i in range(n_img):
        vecs = [torch.cat([m.ctx[j] + zk[i], m.state_normal[j] + states[0]]) for j in range(n)]
        vecs += [torch.cat([m.ctx[j] + zk[i], m.state_abnormal[j] + states[1]]) for j in range(n)]
        text[i] = F.normalize(_reference_text(bb, torch.stack(vecs)), dim=-1)
    pair = [draw.prompt, draw.prompt + n]
    img = F.normalize(g, dim=-1)
    logits = torch.stack(
        [
            m.temperature_image.exp() * F.normalize(m.class_mapping(text[i]), dim=-1) @ img[i]
            for i in range(n_img)
        ]
    )
    ce = F.cross_entropy(logits[:, pair], labels)
    gt = (masks > 0.5).long()
    seg = torch.zeros(())
    e, heads = bb.embed_dim, cfg.rca_heads
    hd = e // heads
    for layer, tok in enumerate(patches):
        fs = F.normalize(tok @ m.rca.patch_proj[layer].weight.T, dim=-1)  # B x N x E
        q = m.rca.query(text)
        att = []
        for h in range(heads):  # per head, scaled by the full width as the reference does
            sl = slice(h * hd, (h + 1) * hd)
            a = torch.softmax(q[..., sl] @ fs[..., sl].transpose(1, 2) / math.sqrt(e), dim=-1)
            att.append(a @ fs[..., sl])
        refined = F.normalize(torch.cat(att, -1) + text, dim=-1)
        amap = m.temperature_pixel.exp() * fs @ refined.transpose(1, 2)  # B x N x 2n
        side = math.isqrt(amap.shape[1])
        amap = amap.transpose(1, 2).reshape(n_img, 2 * n, side, side)
        amap = F.interpolate(amap, size=cfg.image_size, mode="bilinear", align_corners=True)
        prob = torch.softmax(amap[:, pair], dim=1)
        pt = (prob * F.one_hot(gt, 2).permute(0, 3, 1, 2)).sum(1)
        fl = -((1 - pt) ** 2) * torch.log(pt + 1e-8)
        fg = gt > 0
        seg = seg + (fl * fg).sum() / (fg.sum() + 1e-8) + (fl * ~fg).sum() / ((~fg).sum() + 1e-8)
        seg = seg + 1 - (2 * (prob[:, 1] * gt).sum() + 1e-5) / (prob[:, 1].sum() + gt.sum() + 1e-5)
    ortho = torch.zeros(())
    for part in (text[:, :n], text[:, n:]):
        c = F.normalize(part, dim=-1) @ F.normalize(part, dim=-1).transpose(1, 2)
        ortho = ortho + (c**2 * (1 - torch.eye(n))).mean()
    return ce + seg + cfg.kl_weight * reg + ortho


def test_full_loss_matches_an_independent_computation(backbone):
    m = make(backbone).train()
    gen = torch.Generator().manual_seed(11)
    pixels = torch.randn(2, 3, 32, 32, generator=gen)
    labels = torch.tensor([0, 1])
    masks = torch.zeros(2, 32, 32)
    masks[1, 8:20, 10:24] = 1.0
    w = backbone.text_width
    draw = TrainingDraw(
        eps_context=torch.randn(2, w, generator=gen),
        eps_normal=torch.randn(1, w, generator=gen),
        eps_abnormal=torch.randn(1, w, generator=gen),
        prompt=1,
    )
    terms = m.loss_terms(pixels, labels, masks, draw)
    assert set(terms) == {
        "class",
        "focal",
        "dice",
        "kl_context",
        "kl_normal",
        "kl_abnormal",
        "orthogonal",
    }
    got = sum(terms.values())
    want = _reference_loss(m, pixels, labels, masks, draw)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------------- training
def test_gradients_reach_only_the_learned_tensors(backbone):
    m = make(backbone).train()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    opt = torch.optim.Adam(m.trainable_parameters(), lr=1e-2)
    pixels = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 32, 32)
    masks[0, :10, :10] = 1
    terms = m.training_loss(pixels, torch.tensor([1, 0]), masks)
    sum(terms.values()).backward()
    for name, p in m.named_parameters():
        if name.startswith("backbone."):
            assert p.grad is None, name
        else:
            assert p.grad is not None, name
            assert bool(p.grad.abs().sum() > 0), name
    opt.step()
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not k.startswith("backbone.") for k in m.state())
    grouped = [p for g in m.parameter_groups() for p in g["params"]]
    assert len(grouped) == len(m.trainable_parameters())
    assert {id(p) for p in grouped} == {id(p) for p in m.trainable_parameters()}


def test_registered_with_reference_defaults():
    assert ANOMALY_METHODS.get("bayes-pfl") is BayesPFL
    cfg = BayesPFLConfig()
    assert (cfg.n_ctx, cfg.n_state, cfg.n_prompts, cfg.flow_steps, cfg.test_samples) == (
        5,
        5,
        3,
        10,
        10,
    )
    assert cfg.feature_layers == (5, 11, 17, 23)
    assert cfg.image_size == 518
    assert cfg.optim.optimizer == "adam"
    assert cfg.optim.betas == (0.5, 0.999)
    assert BayesPFL.capabilities.zero_shot
    assert BayesPFL.capabilities.trains


@pytest.mark.parametrize(
    "changes",
    [
        {"n_ctx": 0},
        {"flow_steps": -1},
        {"test_samples": 0},
        {"feature_layers": ()},
        {"feature_layers": (1, 1)},
        {"kl_weight": -0.1},
        {"sigma": float("nan")},
        {"seed": -1},
        {"image_size": 4},
        {"prompt_lr_scale": 0.0},
    ],
)
def test_bad_configs_are_rejected(changes):
    with pytest.raises(ConfigError):
        dataclasses.replace(BayesPFLConfig(), **changes)


def test_layers_beyond_the_tower_are_rejected(backbone):
    with pytest.raises(ConfigError, match="vision blocks"):
        BayesPFL(backbone, tiny_config(feature_layers=(0, 2)))


def test_other_input_sides_resize_the_position_embeddings(backbone):
    from vprompt.anomaly.bayes_pfl import _vision_tokens

    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(
        _vision_tokens(backbone, x), backbone.vision_tokens(x), rtol=0, atol=0
    )
    assert _vision_tokens(backbone, torch.randn(1, 3, 48, 48)).shape == (
        1,
        37,
        backbone.vision_width,
    )
    out = BayesPFL(backbone, tiny_config(image_size=48)).score(torch.randn(2, 3, 48, 48))
    assert out.maps.shape == (2, 48, 48)
