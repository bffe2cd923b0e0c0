"""KgCoOp, ProGrad and CoCoOp against independent from-the-paper implementations (tiny CLIP).

The references build every prompt the way the papers' PromptLearners do (tokenize
"X X … X name.", keep the SOS and name+suffix embeddings, splice the context in) and run the
full 77-token sequence through open_clip's own modules (``token_embedding``,
``positional_embedding``, ``transformer``, ``ln_final``, ``text_projection``); the hand-crafted
prompts go through open_clip's ``encode_text``. None of vprompt's text code is used.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vprompt.data.folder import load_folder
from vprompt.engine import fit
from vprompt.engine.pack import build_from_pack, load_pack, save_pack
from vprompt.errors import ConfigError, PackError
from vprompt.methods import METHODS
from vprompt.methods.cocoop import CoCoOp, CoCoOpConfig
from vprompt.methods.config import apply_overrides
from vprompt.methods.coop import coop_optim
from vprompt.methods.kgcoop import KgCoOp, KgCoOpConfig
from vprompt.methods.prograd import ProGrad, ProGradConfig, ProGradOutput

NAMES = ["cat", "golden retriever", "the space shuttle", "moth"]
TEMPLATE = "a centered satellite photo of {}."


# ---------------------------------------------------------------------------- reference
def ref_prompt_parts(backbone, names, m: int):
    """Token ids, SOS embeddings (C x 1 x W) and name+suffix embeddings (C x (77-1-M) x W)."""
    model = backbone.model
    tokens = backbone._tokenizer([" ".join(["X"] * m) + f" {n}." for n in names])
    with torch.no_grad():
        emb = model.token_embedding(tokens)
    return tokens, emb[:, :1], emb[:, 1 + m :]


def ref_encode(backbone, prompts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """T x 77 x W prompt embeddings → T x D unit-norm features through open_clip's modules."""
    model = backbone.model
    x = prompts + model.positional_embedding
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection
    return F.normalize(x, dim=-1)


def ref_text_features(backbone, ctx: torch.Tensor, names) -> torch.Tensor:
    """C x D features of the shared-context prompts, class name at the end."""
    tokens, prefix, suffix = ref_prompt_parts(backbone, names, ctx.shape[-2])
    c = len(names)
    prompts = torch.cat([prefix, ctx.unsqueeze(0).expand(c, -1, -1), suffix], dim=1)
    return ref_encode(backbone, prompts, tokens)


def ref_image_features(backbone, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(backbone.model.encode_image(images), dim=-1)


def ref_handcrafted(backbone, names, template: str) -> torch.Tensor:
    tokens = backbone._tokenizer([template.format(n) for n in names])
    with torch.no_grad():
        return F.normalize(backbone.model.encode_text(tokens), dim=-1)


def scale_of(backbone) -> torch.Tensor:
    return backbone.model.logit_scale.exp()


def ref_coop_logits(backbone, images, ctx, names) -> torch.Tensor:
    img = ref_image_features(backbone, images)
    return scale_of(backbone) * img @ ref_text_features(backbone, ctx, names).T


def images_and_labels(n: int = 3, seed: int = 2):
    images = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return images, torch.arange(n) % len(NAMES)


def perturb(param: torch.nn.Parameter, seed: int, std: float = 0.3) -> None:
    with torch.no_grad():
        param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(seed)) * std)


# ---------------------------------------------------------------------------- KgCoOp
def test_kgcoop_defaults_are_the_reference_base_to_novel_setting(tiny_clip) -> None:
    config = KgCoOpConfig()
    assert (config.n_ctx, config.ctx_init, config.kg_weight) == (4, "a photo of a", 8.0)
    assert config.optim == coop_optim(epochs=100, batch_size=128)
    method = KgCoOp(tiny_clip, NAMES)
    tokens = tiny_clip.tokenize(["a photo of a"])
    torch.testing.assert_close(method.ctx.detach(), tiny_clip.embed_tokens(tokens)[0, 1:5])


def test_kgcoop_logits_aux_loss_and_gradient_equal_the_reference(tiny_clip) -> None:
    method = KgCoOp(tiny_clip, NAMES, KgCoOpConfig(template=TEMPLATE, kg_weight=3.0))
    perturb(method.ctx, 1)
    images, labels = images_and_labels()
    method.train()
    out = method(images)
    loss = F.cross_entropy(out.logits, labels) + sum(out.aux_loss.values())
    (grad,) = torch.autograd.grad(loss, method.ctx)

    ctx = method.ctx.detach().clone().requires_grad_(True)
    text = ref_text_features(tiny_clip, ctx, NAMES)
    logits = scale_of(tiny_clip) * ref_image_features(tiny_clip, images) @ text.T
    hand = ref_handcrafted(tiny_clip, NAMES, TEMPLATE)
    kg = 3.0 * (1.0 - F.cosine_similarity(text, hand, dim=1, eps=1e-7).mean())
    ref_loss = F.cross_entropy(logits, labels) + kg
    (ref_grad,) = torch.autograd.grad(ref_loss, ctx)

    assert set(out.aux_loss) == {"kg"}
    assert float(kg.detach()) > 1e-3  # the term is not trivially zero here
    torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.aux_loss["kg"], kg, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-4)

    method.eval()
    with torch.no_grad():
        assert method(images).aux_loss == {}


def test_kgcoop_term_vanishes_when_the_prompt_is_the_template(tiny_clip) -> None:
    method = KgCoOp(tiny_clip, NAMES, KgCoOpConfig(template="a photo of a {}.")).train()
    out = method.forward_features(F.normalize(torch.randn(2, tiny_clip.embed_dim), dim=-1))
    assert abs(float(out.aux_loss["kg"].detach())) < 1e-5


def test_kgcoop_pack_round_trip_and_retarget(tiny_clip, tmp_path) -> None:
    method = KgCoOp(tiny_clip, NAMES, KgCoOpConfig(template=TEMPLATE))
    perturb(method.ctx, 3)
    images, _ = images_and_labels(2)
    pack = load_pack(save_pack(method, tmp_path / "kg.safetensors"))
    assert set(pack.tensors) == {"ctx"}  # the hand-crafted features are rebuilt, not stored
    restored = build_from_pack(pack, backbone=tiny_clip).eval()
    assert restored.config == method.config
    with torch.no_grad():
        assert torch.equal(restored(images).logits, method.eval()(images).logits)
    assert torch.equal(restored.handcrafted, method.handcrafted)

    moved = method.retarget(["bee", "kite"], templates=["a photo of a {}, a type of insect."])
    assert moved.config.template == "a photo of a {}, a type of insect."
    torch.testing.assert_close(
        moved.handcrafted,
        ref_handcrafted(tiny_clip, ["bee", "kite"], "a photo of a {}, a type of insect."),
        atol=1e-5,
        rtol=1e-5,
    )
    assert torch.equal(moved.ctx, method.ctx)
    expected = ref_coop_logits(tiny_clip, images, method.ctx.detach(), ["bee", "kite"])
    with torch.no_grad():
        torch.testing.assert_close(moved(images).logits, expected, atol=1e-5, rtol=1e-5)
    assert method.retarget(["bee"]).config.template == TEMPLATE  # no templates: keep it


def test_kgcoop_refuses_bad_settings(tiny_clip) -> None:
    with pytest.raises(ConfigError, match="template"):
        KgCoOpConfig(template="a photo")
    with pytest.raises(ConfigError, match="template"):
        KgCoOpConfig(template="{} and {}")
    with pytest.raises(ConfigError, match="kg_weight"):
        KgCoOpConfig(kg_weight=-1.0)
    method = KgCoOp(tiny_clip, NAMES)
    with pytest.raises(ConfigError, match="one hand-crafted template"):
        method.retarget(["bee"], templates=["a {}.", "the {}."])
    csc = KgCoOp(tiny_clip, NAMES, KgCoOpConfig(ctx_init="", n_ctx=2, class_specific=True))
    with pytest.raises(ConfigError, match="class-specific"):
        csc.retarget(["bee"])


# ---------------------------------------------------------------------------- ProGrad
def test_prograd_context_starts_from_the_template_words(tiny_clip) -> None:
    config = ProGradConfig(template=TEMPLATE)
    assert (config.n_ctx, config.grad_lambda, config.temperature) == (16, 1.0, 1.0)
    assert config.optim == coop_optim(epochs=200, batch_size=32)
    method = ProGrad(tiny_clip, NAMES, config)
    words = tiny_clip.tokenize(["a centered satellite photo of"])
    phrase = tiny_clip.embed_tokens(words)[0, 1:6]  # five tokens
    assert torch.equal(method.ctx[:11].detach(), torch.zeros(11, tiny_clip.text_width))
    torch.testing.assert_close(method.ctx[11:].detach(), phrase)

    # As in the reference, a template-initialised context is shared even with CSC.
    csc = ProGrad(tiny_clip, NAMES, ProGradConfig(template=TEMPLATE, class_specific=True))
    assert csc.ctx.shape == (16, tiny_clip.text_width)
    assert csc.config.class_specific is False
    torch.testing.assert_close(csc.ctx[11:].detach(), phrase)
    random = ProGrad(tiny_clip, NAMES, ProGradConfig(init_from_template=False))
    assert random.ctx.std().item() == pytest.approx(0.02, rel=0.2)
    with pytest.raises(ConfigError, match="5 words"):  # the reference asserts n_ctx >= words
        ProGrad(tiny_clip, NAMES, ProGradConfig(template=TEMPLATE, n_ctx=3))
    blank = ProGrad(tiny_clip, NAMES, ProGradConfig(template="{} in a photo.", n_ctx=4))
    assert blank.ctx.std().item() == pytest.approx(0.02, rel=0.3)  # no words: random init


def ref_prograd_grads(backbone, ctx0, images, labels, template, t: float):
    """CE and KD (soft-target cross-entropy · T², the reference's form) gradients of ctx."""
    ctx = ctx0.detach().clone().requires_grad_(True)
    img = ref_image_features(backbone, images)
    logits = scale_of(backbone) * img @ ref_text_features(backbone, ctx, NAMES).T
    teacher = scale_of(backbone) * img @ ref_handcrafted(backbone, NAMES, template).T
    ce = F.cross_entropy(logits, labels)
    kd = (-F.softmax(teacher / t, -1) * F.log_softmax(logits / t, -1) * t * t).sum(1).mean()
    (g_ce,) = torch.autograd.grad(ce, ctx, retain_graph=True)
    (g_kd,) = torch.autograd.grad(kd, ctx)
    return logits.detach(), teacher, g_ce, g_kd


def test_prograd_projects_only_conflicting_gradients(tiny_clip) -> None:
    lam, t = 0.8, 2.0
    config = ProGradConfig(n_ctx=5, template=TEMPLATE, grad_lambda=lam, temperature=t)
    method = ProGrad(tiny_clip, NAMES, config)
    perturb(method.ctx, 5)
    images, _ = images_and_labels(3)
    found = {}
    for combo in itertools.product(range(len(NAMES)), repeat=3):
        labels = torch.tensor(combo)
        logits, teacher, g_ce, g_kd = ref_prograd_grads(
            tiny_clip, method.ctx, images, labels, TEMPLATE, t
        )
        cos = F.cosine_similarity(g_ce.flatten(), g_kd.flatten(), dim=0)
        kind = "conflict" if cos < -1e-3 else "aligned" if cos > 1e-3 else None
        if kind and kind not in found:
            unit = g_kd / g_kd.norm()
            expected = g_ce - lam * (g_ce * unit).sum() * unit if kind == "conflict" else g_ce
            found[kind] = (labels, logits, teacher, g_ce, expected)
        if len(found) == 2:
            break
    assert set(found) == {"conflict", "aligned"}, "no label set gave both cases"

    for kind, (labels, logits, teacher, g_ce, expected) in found.items():
        method.train()
        method.ctx.grad = None
        out = method(images)
        assert isinstance(out, ProGradOutput)
        torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=1e-5)
        assert out.zeroshot_logits is not None
        torch.testing.assert_close(out.zeroshot_logits, teacher, atol=1e-5, rtol=1e-5)
        method.backward(F.cross_entropy(out.logits, labels), out, labels)
        assert method.ctx.grad is not None
        torch.testing.assert_close(method.ctx.grad, expected, atol=1e-6, rtol=1e-4)
        if kind == "conflict":
            assert (expected - g_ce).norm() > 1e-3 * g_ce.norm()  # the projection did act
        else:
            torch.testing.assert_close(method.ctx.grad, g_ce, atol=1e-6, rtol=1e-4)


def test_prograd_distill_loss_is_kl_times_t_squared(tiny_clip) -> None:
    method = ProGrad(tiny_clip, NAMES, ProGradConfig(temperature=2.0))
    a = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    b = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    p, q = F.softmax(b / 2, -1), F.softmax(a / 2, -1)
    expected = 4.0 * (p * (p.log() - q.log())).sum(1).mean()
    torch.testing.assert_close(method.distill_loss(a, b), expected)
    assert float(method.distill_loss(b, b)) == pytest.approx(0.0, abs=1e-6)


def test_prograd_eval_output_has_no_teacher_and_backward_needs_it(tiny_clip) -> None:
    method = ProGrad(tiny_clip, NAMES).eval()
    feats = F.normalize(torch.randn(2, tiny_clip.embed_dim), dim=-1)
    out = method.forward_features(feats)
    assert out.zeroshot_logits is None
    with pytest.raises(ValueError, match="zero-shot"):
        method.backward(out.logits.sum(), out, torch.tensor([0, 1]))


def test_prograd_pack_round_trip_and_retarget(tiny_clip, tmp_path) -> None:
    method = ProGrad(tiny_clip, NAMES, ProGradConfig(n_ctx=8, template=TEMPLATE))
    perturb(method.ctx, 6)
    images, _ = images_and_labels(2)
    pack = load_pack(save_pack(method, tmp_path / "pg.safetensors"))
    assert set(pack.tensors) == {"ctx"}
    restored = build_from_pack(pack, backbone=tiny_clip).eval()
    with torch.no_grad():
        assert torch.equal(restored(images).logits, method.eval()(images).logits)
    # The template-derived initialisation never overrides a loaded context.
    assert torch.equal(restored.ctx, method.ctx)

    moved = method.retarget(["bee", "kite"], templates=["a photo of a {}."])
    assert torch.equal(moved.ctx, method.ctx)
    assert moved.config.template == "a photo of a {}."
    torch.testing.assert_close(
        moved.handcrafted,
        ref_handcrafted(tiny_clip, ["bee", "kite"], "a photo of a {}."),
        atol=1e-5,
        rtol=1e-5,
    )
    expected = ref_coop_logits(tiny_clip, images, method.ctx.detach(), ["bee", "kite"])
    with torch.no_grad():
        torch.testing.assert_close(moved(images).logits, expected, atol=1e-5, rtol=1e-5)


def test_prograd_refuses_bad_settings(tiny_clip) -> None:
    for bad in (["grad_lambda=-0.5"], ["temperature=0"], ["template=no slot"]):
        with pytest.raises(ConfigError):
            apply_overrides(ProGradConfig(), bad)
    csc = ProGrad(
        tiny_clip, NAMES, ProGradConfig(class_specific=True, n_ctx=4, init_from_template=False)
    )
    with pytest.raises(ConfigError, match="class-specific"):
        csc.retarget(["bee"])


@pytest.fixture(scope="module")
def four_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("four")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in ("cat", "moth"):
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return load_folder(root)


def test_engine_uses_the_methods_backward_hook(tiny_clip, four_images, tmp_path) -> None:
    """fit() calls ``method.backward(loss, output, labels)`` instead of ``loss.backward()``
    and steps with the gradient it leaves (SGD without momentum history or decay: one step
    moves the context by exactly -lr · grad)."""
    config = apply_overrides(
        ProGradConfig(n_ctx=4, augment=False),
        [
            "optim.epochs=1",
            "optim.batch_size=4",
            "optim.warmup_epochs=0",
            "optim.weight_decay=0",
            "optim.lr=0.5",
        ],
    )
    method = ProGrad(tiny_clip, four_images.classnames, config)
    perturb(method.ctx, 7)
    start = method.ctx.detach().clone()
    calls = []
    original = method.backward

    def spy(loss, output, labels):
        original(loss, output, labels)
        calls.append((float(loss.detach()), type(output), labels.clone(), method.ctx.grad.clone()))

    method.backward = spy  # type: ignore[method-assign]
    result = fit(method, four_images.train, out_dir=tmp_path / "run", seed=0, progress=False)
    assert len(calls) == 1
    loss, kind, labels, grad = calls[0]
    assert kind is ProGradOutput
    assert sorted(labels.tolist()) == [0, 0, 1, 1]
    assert math.isclose(loss, result.history[0]["train_loss"], rel_tol=1e-6)
    lr = result.history[0]["lr"]
    torch.testing.assert_close(method.ctx.detach(), start - lr * grad, atol=1e-7, rtol=1e-6)


# ---------------------------------------------------------------------------- CoCoOp
def ref_cocoop_logits(backbone, ctx, weights, images, names) -> torch.Tensor:
    """CoCoOp's CustomCLIP.forward: per image, its own shifted context for every class."""
    w1, b1, w2, b2 = weights
    img = ref_image_features(backbone, images)
    shift = torch.relu(img @ w1.T + b1) @ w2.T + b2  # B x W
    tokens, prefix, suffix = ref_prompt_parts(backbone, names, ctx.shape[0])
    c = len(names)
    rows = []
    for f, s in zip(img, shift, strict=True):
        ctx_i = (ctx + s).unsqueeze(0).expand(c, -1, -1)
        text = ref_encode(backbone, torch.cat([prefix, ctx_i, suffix], dim=1), tokens)
        rows.append(scale_of(backbone) * f @ text.T)
    return torch.stack(rows)


def meta_weights(method: CoCoOp) -> list[torch.Tensor]:
    net = method.meta_net
    return [net.linear1.weight, net.linear1.bias, net.linear2.weight, net.linear2.bias]


def randomized_cocoop(tiny_clip, names=NAMES, **kw) -> CoCoOp:
    torch.manual_seed(0)  # the run's seed: the Meta-Net's init draws from it
    method = CoCoOp(tiny_clip, names, CoCoOpConfig(**kw))
    perturb(method.ctx, 8, std=0.2)
    for i, p in enumerate(meta_weights(method)):
        perturb(p, 10 + i, std=0.5)  # a shift large enough to matter
    return method


def test_cocoop_defaults_and_meta_net_shape(tiny_clip) -> None:
    config = CoCoOpConfig()
    assert (config.n_ctx, config.ctx_init, config.meta_reduction) == (4, "a photo of a", 16)
    assert config.optim == coop_optim(epochs=10, batch_size=1)
    method = CoCoOp(tiny_clip, NAMES)
    d, w = tiny_clip.embed_dim, tiny_clip.text_width
    assert method.meta_net.linear1.weight.shape == (d // 16, d)
    assert method.meta_net.linear2.weight.shape == (w, d // 16)
    torch.manual_seed(0)
    first = meta_weights(CoCoOp(tiny_clip, NAMES))
    torch.manual_seed(0)
    again = meta_weights(CoCoOp(tiny_clip, NAMES))  # seeded by the run: the same seed, one init
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_cocoop_logits_loss_and_gradients_equal_the_reference(tiny_clip) -> None:
    method = randomized_cocoop(tiny_clip)
    images, labels = images_and_labels(3)
    method.train()
    out = method(images)
    params = [method.ctx, *meta_weights(method)]
    loss = F.cross_entropy(out.logits, labels)
    grads = torch.autograd.grad(loss, params)

    ref_params = [p.detach().clone().requires_grad_(True) for p in params]
    logits = ref_cocoop_logits(tiny_clip, ref_params[0], ref_params[1:], images, NAMES)
    ref_loss = F.cross_entropy(logits, labels)
    ref_grads = torch.autograd.grad(ref_loss, ref_params)

    # The images really get different class features.
    shared = ref_coop_logits(tiny_clip, images, method.ctx.detach(), NAMES)
    assert not torch.allclose(logits, shared, atol=1e-3)
    torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
    for ours, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    assert all(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("prompt_batch", [1, 3, 4, 7])
def test_cocoop_micro_batched_inference_equals_one_pass(tiny_clip, monkeypatch, prompt_batch):
    whole = randomized_cocoop(tiny_clip, prompt_batch=10_000).eval()
    part = randomized_cocoop(tiny_clip, prompt_batch=prompt_batch).eval()
    feats = F.normalize(torch.randn(5, tiny_clip.embed_dim), dim=-1)
    with torch.no_grad():
        expected = whole.forward_features(feats).logits
    sizes = []
    original = tiny_clip.encode_text_shared_prefix

    def counting(prefix, suffix, eot, group):
        sizes.append(suffix.shape[0])
        return original(prefix, suffix, eot, group)

    monkeypatch.setattr(tiny_clip, "encode_text_shared_prefix", counting)
    with torch.no_grad():
        got = part.forward_features(feats).logits
    total = 5 * len(NAMES)
    assert sum(sizes) == total
    assert max(sizes) <= prompt_batch
    assert len(sizes) == math.ceil(total / prompt_batch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # Each image alone gives its own row: no mixing across the micro-batches.
    with torch.no_grad():
        single = torch.cat([part.forward_features(f[None]).logits for f in feats])
    torch.testing.assert_close(single, expected, atol=1e-5, rtol=1e-5)


def test_cocoop_shared_prefixes_equal_whole_prompts(tiny_clip, monkeypatch) -> None:
    """Each image's [SOS] + context runs once for all its classes (micro-batches that split an
    image's classes included): the same logits and gradients as whole prompts."""
    method = randomized_cocoop(tiny_clip, prompt_batch=5)  # 4 classes: chunks split images
    feats = F.normalize(torch.randn(3, tiny_clip.embed_dim), dim=-1)
    labels = torch.tensor([1, 0, len(NAMES) - 1])
    params = [method.ctx, *meta_weights(method)]
    method.train()
    results = []
    for shared in (True, False):
        if not shared:
            monkeypatch.setattr(type(tiny_clip), "shares_text_prefix", property(lambda s: False))
        loss = F.cross_entropy(method.forward_features(feats).logits, labels)
        results.append((loss.detach(), torch.autograd.grad(loss, params)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=1e-6)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=1e-4)


def test_cocoop_pack_round_trip_and_retarget(tiny_clip, tmp_path) -> None:
    method = randomized_cocoop(tiny_clip)
    images, _ = images_and_labels(2)
    pack = load_pack(save_pack(method, tmp_path / "cocoop.safetensors"))
    assert set(pack.tensors) == {
        "ctx",
        "meta_net.linear1.weight",
        "meta_net.linear1.bias",
        "meta_net.linear2.weight",
        "meta_net.linear2.bias",
    }
    restored = build_from_pack(pack, backbone=tiny_clip).eval()
    with torch.no_grad():
        assert torch.equal(restored(images).logits, method.eval()(images).logits)

    moved = method.retarget(["bee", "kite", "golden_retriever"], templates=["a {}."])
    params = [p.detach() for p in (method.ctx, *meta_weights(method))]
    expected = ref_cocoop_logits(
        tiny_clip, params[0], params[1:], images, ["bee", "kite", "golden retriever"]
    )
    with torch.no_grad():
        torch.testing.assert_close(moved(images).logits, expected, atol=1e-5, rtol=1e-5)

    bad = dict(pack.tensors)
    bad["meta_net.linear1.weight"] = torch.zeros(3, 3)
    with pytest.raises(PackError, match=r"linear1\.weight"):
        method.load_prompt_state(bad)
    with pytest.raises(PackError, match="missing"):
        method.load_prompt_state({"ctx": pack.tensors["ctx"]})


def test_cocoop_refuses_unsupported_settings(tiny_clip) -> None:
    for bad in (
        ["class_token_position=middle"],
        ["class_specific=true"],
        ["prompt_batch=0"],
        ["meta_reduction=0"],
    ):
        with pytest.raises(ConfigError):
            apply_overrides(CoCoOpConfig(), bad)
    with pytest.raises(ConfigError, match="hidden units"):
        CoCoOp(tiny_clip, NAMES, CoCoOpConfig(meta_reduction=tiny_clip.embed_dim + 1))


def test_the_three_methods_are_registered() -> None:
    assert [METHODS.get(n) for n in ("kgcoop", "prograd", "cocoop")] == [KgCoOp, ProGrad, CoCoOp]
