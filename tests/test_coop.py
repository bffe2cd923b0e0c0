"""CoOp against an independent from-the-paper implementation on the tiny CLIP.

The reference here builds the prompt embeddings the way CoOp's PromptLearner does (tokenize
"X X … X name.", keep SOS / name+suffix embeddings, splice the context in) and runs the full
77-token sequence through open_clip's own modules — none of vprompt's text code.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vprompt.engine.pack import build_from_pack, load_pack, save_pack
from vprompt.errors import ConfigError, PackError
from vprompt.methods.coop import CoOp, CoOpConfig

NAMES = ["cat", "golden retriever", "the space shuttle", "moth"]


def reference_text_features(backbone, ctx: torch.Tensor, names, position: str) -> torch.Tensor:
    model, tokenizer = backbone.model, backbone._tokenizer
    m = ctx.shape[-2]
    tokens = tokenizer([" ".join(["X"] * m) + f" {n}." for n in names])
    name_lens = [len(tokenizer.encode(n)) for n in names]
    emb = model.token_embedding(tokens)
    prefix, suffix = emb[:, :1], emb[:, 1 + m :]
    rows = []
    for i, n in enumerate(name_lens):
        c = ctx if ctx.dim() == 2 else ctx[i]
        if position == "end":
            row = torch.cat([prefix[i], c, suffix[i]])
        elif position == "middle":
            h = m // 2
            row = torch.cat([prefix[i], c[:h], suffix[i, :n], c[h:], suffix[i, n:]])
        else:
            row = torch.cat([prefix[i], suffix[i, :n], c, suffix[i, n:]])
        rows.append(row)
    x = torch.stack(rows) + model.positional_embedding
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    x = x[torch.arange(len(names)), tokens.argmax(dim=-1)] @ model.text_projection
    return F.normalize(x, dim=-1)


def reference_logits(backbone, images, ctx, names, position) -> torch.Tensor:
    model = backbone.model
    img = F.normalize(model.encode_image(images), dim=-1)
    return model.logit_scale.exp() * img @ reference_text_features(backbone, ctx, names, position).T


@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("csc", [False, True])
def test_logits_and_loss_equal_the_reference(tiny_clip, position: str, csc: bool) -> None:
    method = CoOp(
        tiny_clip,
        NAMES,
        CoOpConfig(n_ctx=4, class_specific=csc, class_token_position=position),  # type: ignore[arg-type]
    )
    with torch.no_grad():
        method.ctx.normal_(std=0.3, generator=torch.Generator().manual_seed(1))
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 3, 1])
    method.train()
    ours = method(images).logits
    ref = reference_logits(tiny_clip, images, method.ctx, NAMES, position)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    loss = F.cross_entropy(ours, labels)
    (grad,) = torch.autograd.grad(loss, method.ctx)
    ref_ctx = method.ctx.detach().clone().requires_grad_(True)
    ref_loss = F.cross_entropy(
        reference_logits(tiny_clip, images, ref_ctx, NAMES, position), labels
    )
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_ctx)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-4)


def test_phrase_initialisation_is_the_phrase_embedding(tiny_clip) -> None:
    method = CoOp(tiny_clip, NAMES, CoOpConfig(n_ctx=16, ctx_init="a photo of a"))
    assert method.config.n_ctx == 4
    assert method.ctx.shape == (4, tiny_clip.text_width)
    tokens = tiny_clip.tokenize(["a photo of a"])
    torch.testing.assert_close(method.ctx.detach(), tiny_clip.embed_tokens(tokens)[0, 1:5])
    # With the phrase as context, the prompt is exactly the hand-written one.
    hand = F.normalize(
        tiny_clip.encode_text(tiny_clip.tokenize([f"a photo of a {n}." for n in NAMES])), dim=-1
    )
    torch.testing.assert_close(method.text_features(), hand.float(), atol=1e-5, rtol=1e-5)


def test_random_init_is_seeded_and_small(tiny_clip) -> None:
    torch.manual_seed(3)  # the run's seed: the context draws from it
    a = CoOp(tiny_clip, NAMES, CoOpConfig(n_ctx=8))
    torch.manual_seed(3)
    b = CoOp(tiny_clip, NAMES, CoOpConfig(n_ctx=8))
    assert torch.equal(a.ctx, b.ctx)
    assert a.ctx.std().item() == pytest.approx(0.02, rel=0.2)


def test_chunked_text_encoding_matches(tiny_clip) -> None:
    torch.manual_seed(0)
    full = CoOp(tiny_clip, NAMES, CoOpConfig(n_ctx=4))
    torch.manual_seed(0)
    chunked = CoOp(tiny_clip, NAMES, CoOpConfig(n_ctx=4, class_chunk=3))
    feats = torch.randn(5, tiny_clip.embed_dim)
    full.train(), chunked.train()
    a, b = full.forward_features(feats).logits, chunked.forward_features(feats).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    (ga,) = torch.autograd.grad(a.logsumexp(1).sum(), full.ctx)
    (gb,) = torch.autograd.grad(b.logsumexp(1).sum(), chunked.ctx)
    torch.testing.assert_close(ga, gb, atol=1e-4, rtol=1e-3)  # summation order differs


def test_inference_encodes_class_prompts_once(tiny_clip, monkeypatch) -> None:
    method = CoOp(tiny_clip, NAMES, CoOpConfig(n_ctx=4)).eval()
    calls = []
    for name in ("encode_text_embeddings", "encode_text_shared_prefix"):  # whole or shared
        original = getattr(tiny_clip, name)

        def counting(*args, original=original, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        monkeypatch.setattr(tiny_clip, name, counting)
    feats = F.normalize(torch.randn(4, tiny_clip.embed_dim), dim=-1)
    with torch.no_grad():
        first = method.forward_features(feats).logits
        second = method.forward_features(feats).logits
    assert len(calls) == 1
    assert torch.equal(first, second)
    with torch.no_grad():
        method.ctx.add_(0.1)  # a new context invalidates the cached class features
        third = method.forward_features(feats).logits
    assert len(calls) == 2
    assert not torch.equal(first, third)


def test_pack_round_trip_and_retarget(tiny_clip, tmp_path) -> None:
    method = CoOp(tiny_clip, NAMES, CoOpConfig(n_ctx=4, ctx_init="a photo of a"))
    with torch.no_grad():
        method.ctx.add_(torch.randn(method.ctx.shape, generator=torch.Generator().manual_seed(3)))
    path = save_pack(method, tmp_path / "coop.safetensors")
    pack = load_pack(path)
    assert set(pack.tensors) == {"ctx"}
    restored = build_from_pack(pack, weights="none").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(restored(images).logits, method.eval()(images).logits)
    moved = method.retarget(["bee", "kite"])
    assert moved.classnames == ["bee", "kite"]
    assert torch.equal(moved.ctx, method.ctx)
    expected = reference_logits(tiny_clip, images, method.ctx.detach(), ["bee", "kite"], "end")
    with torch.no_grad():
        torch.testing.assert_close(moved(images).logits, expected, atol=1e-5, rtol=1e-5)


def test_bad_settings_are_clear_errors(tiny_clip) -> None:
    with pytest.raises(ConfigError, match="class_token_position"):
        CoOpConfig(class_token_position="left")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="n_ctx"):
        CoOpConfig(n_ctx=0)
    csc = CoOp(tiny_clip, NAMES, CoOpConfig(n_ctx=2, class_specific=True))
    with pytest.raises(ConfigError, match="unseen classes"):
        csc.retarget(["bee"])
    with pytest.raises(PackError, match="shape"):
        CoOp(tiny_clip, NAMES, CoOpConfig(n_ctx=3)).load_prompt_state({"ctx": csc.ctx.detach()})


def test_coop_needs_a_clip_backbone() -> None:
    from vprompt import load_backbone

    with pytest.raises(ConfigError, match="CLIP-like"):
        CoOp(load_backbone("torchvision:tiny", "none"), NAMES)  # type: ignore[arg-type]


def test_cached_class_features_follow_the_context_storage(tiny_clip) -> None:
    method = CoOp(tiny_clip, NAMES, CoOpConfig(n_ctx=4)).eval()
    with torch.no_grad():
        first = method.text_features()
        # Replacing the storage (as .to(device) or assigning .data does) must not serve stale
        # features even though the parameter's version counter does not move.
        method.ctx.data = method.ctx.data + 0.5
        second = method.text_features()
    assert not torch.allclose(first, second)
