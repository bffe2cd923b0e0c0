"""The CLIP seam: vprompt's entry points against open_clip's own forward, and weight loading."""

from __future__ import annotations

import pickle
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import vprompt
from vprompt.backbones import ClipBackbone, ImageTextBackbone, Preprocess, load_backbone
from vprompt.errors import WeightsError

PROMPTS = [
    "a photo of a cat.",
    "x",
    "",
    "a blurry photo of a small red " + "very " * 12 + "old car parked on the street.",
    # Longer than the context: the tokenizer cuts it and puts EOT at the last position.
    "a photo of " + "many " * 100 + "dogs.",
]
CLASSES = ["astronaut", "cat", "coffee", "rocket", "coins"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}."]


def _check_seam(backbone: ClipBackbone, prompts: list[str]) -> None:
    tokens = backbone.tokenize(prompts)
    model = backbone.model
    with torch.no_grad():
        ref = model.encode_text(tokens)
        seam = backbone.encode_text_embeddings(
            backbone.embed_tokens(tokens), backbone.eot_index(tokens)
        )
        fast = backbone.encode_text(tokens)
    assert seam.shape == (len(prompts), backbone.embed_dim)
    assert torch.equal(seam, ref)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- parity


def test_tiny_seam_equals_open_clip_exactly(tiny_clip: ClipBackbone) -> None:
    _check_seam(tiny_clip, PROMPTS)


def test_tiny_seam_is_not_trivially_equal(tiny_clip: ClipBackbone) -> None:
    # Guards the parity test: different prompts give different features, and skipping the
    # positional embedding (a plausible seam bug) would change them.
    tokens = tiny_clip.tokenize(PROMPTS[:2])
    with torch.no_grad():
        feats = tiny_clip.encode_text(tokens)
        emb = tiny_clip.embed_tokens(tokens) - tiny_clip.model.positional_embedding
        wrong = tiny_clip.encode_text_embeddings(emb, tiny_clip.eot_index(tokens))
    assert not torch.allclose(feats[0], feats[1])
    assert not torch.allclose(wrong, feats)


def test_eot_index_is_the_end_of_text_token(tiny_clip: ClipBackbone) -> None:
    tokens = tiny_clip.tokenize(PROMPTS)
    eot = tiny_clip.eot_index(tokens)
    eot_id = open_clip.tokenizer.SimpleTokenizer().eot_token_id
    assert torch.equal(tokens[torch.arange(len(PROMPTS)), eot], torch.full((5,), eot_id))
    assert eot[1] == 2  # <start> x <end>
    assert eot[2] == 1  # <start> <end>
    assert eot[-1] == tiny_clip.context_length - 1
    assert tiny_clip.truncatable


def test_encode_text_accepts_pre_truncated_tokens(tiny_clip: ClipBackbone) -> None:
    tokens = tiny_clip.tokenize(PROMPTS[:3])
    short = tokens[:, : int(tiny_clip.eot_index(tokens).max()) + 1]
    with torch.no_grad():
        ref = tiny_clip.model.encode_text(tokens)
        out = tiny_clip.encode_text(short)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "prompts",
    [
        ["a"],
        ["a", "a photo of " + "many " * 100 + "dogs."],
        ["a photo of " + "many " * 100 + "dogs.", "b"],
        [f"a photo of {'a very ' * n}big dog." for n in range(0, 30, 3)],
    ],
    ids=["one-short", "short-then-full", "full-then-short", "ladder"],
)
def test_encode_text_lengths(tiny_clip: ClipBackbone, prompts: list[str]) -> None:
    _check_seam(tiny_clip, prompts)


def test_seam_batch_independent(tiny_clip: ClipBackbone) -> None:
    # Truncation depends on the longest prompt in the batch; each feature must not.
    with torch.no_grad():
        alone = tiny_clip.encode_text(tiny_clip.tokenize(["a"]))
        together = tiny_clip.encode_text(tiny_clip.tokenize(["a", PROMPTS[-1]]))
    torch.testing.assert_close(alone[0], together[0], atol=1e-5, rtol=0)


def test_encode_image_equals_open_clip(tiny_clip: ClipBackbone, photos_dir: Path) -> None:
    images = torch.stack(
        [tiny_clip.transform(Image.open(p)) for p in sorted(photos_dir.glob("*.png"))]
    )
    assert images.shape == (4, 3, 32, 32)
    with torch.no_grad():
        out = tiny_clip.encode_image(images)
        ref = tiny_clip.model.encode_image(images)
    assert out.shape == (4, tiny_clip.embed_dim)
    assert torch.equal(out, ref)


def test_logit_scale(tiny_clip: ClipBackbone) -> None:
    scale = tiny_clip.logit_scale
    assert scale.shape == ()
    assert torch.equal(scale, tiny_clip.model.logit_scale.exp())
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert tiny_clip.logit_bias is None


def test_vision_blocks_are_the_vit_blocks(tiny_clip: ClipBackbone) -> None:
    blocks = tiny_clip.vision_blocks
    assert blocks is tiny_clip.model.visual.transformer.resblocks
    assert len(blocks) == 2  # vprompt-tiny.json: vision_cfg.layers


def test_protocol_and_sizes(tiny_clip: ClipBackbone) -> None:
    assert isinstance(tiny_clip, ImageTextBackbone)
    assert tiny_clip.name == "clip:tiny"
    assert tiny_clip.weights == "none"
    assert (tiny_clip.embed_dim, tiny_clip.text_width, tiny_clip.context_length) == (32, 64, 77)
    tokens = tiny_clip.tokenize(["a", "b"])
    assert tokens.shape == (2, 77)
    assert tiny_clip.embed_tokens(tokens).shape == (2, 77, 64)


# ----------------------------------------------------------- other text-tower layouts


def _tiny_variant(tiny_clip: ClipBackbone, *, custom: bool, pad_mask: bool = False, **text):
    """A random open_clip model shaped like clip:tiny but with another text-tower layout."""
    text_cfg = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(
            "vprompt-tiny", force_custom_text=custom, text_cfg={**text_cfg, **text}
        ).eval()
    if pad_mask:
        model.text.use_pad_mask = True
    return ClipBackbone(
        model=model,
        tokenizer=open_clip.get_tokenizer("vprompt-tiny"),
        name="clip:variant",
        weights="none",
        preprocess=tiny_clip.preprocess,
    )


PHOTO_ID = open_clip.tokenizer.SimpleTokenizer().encoder["photo</w>"]
VARIANTS = {
    # name: (CustomTextCLIP?, use_pad_mask, text_cfg overrides, truncatable)
    "clip-eos": (False, False, {"pool_type": "eos", "eos_id": 49407}, True),
    "clip-eos-mid-sentence": (False, False, {"pool_type": "eos", "eos_id": PHOTO_ID}, True),
    "custom-argmax": (True, False, {}, True),
    "custom-eos": (True, False, {"pool_type": "eos", "eos_id": 49407}, True),
    "custom-last-bidirectional": (
        True,
        False,
        {"pool_type": "last", "no_causal_mask": True},
        False,
    ),
    "custom-first-bidirectional": (
        True,
        False,
        {"pool_type": "first", "no_causal_mask": True},
        False,
    ),
    "custom-last-pad-mask": (True, True, {"pool_type": "last", "no_causal_mask": True}, False),
    "custom-argmax-bidirectional": (True, False, {"no_causal_mask": True}, False),
    "custom-no-projection": (True, False, {"proj_type": "none"}, True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_seam_parity_other_text_towers(tiny_clip: ClipBackbone, variant: str) -> None:
    custom, pad_mask, text, truncatable = VARIANTS[variant]
    backbone = _tiny_variant(tiny_clip, custom=custom, pad_mask=pad_mask, **text)
    assert type(backbone.model).__name__ == ("CustomTextCLIP" if custom else "CLIP")
    assert backbone.truncatable is truncatable
    _check_seam(backbone, PROMPTS)


def test_coca_text_tower_refuses_the_seam(tiny_clip: ClipBackbone) -> None:
    backbone = _tiny_variant(tiny_clip, custom=True, embed_cls=True)
    assert not backbone.truncatable
    tokens = backbone.tokenize(["a photo"])
    with pytest.raises(WeightsError, match="CLS embedding"):
        backbone.embed_tokens(tokens)
    with torch.no_grad():  # zero-shot still works through open_clip's own forward
        assert torch.equal(backbone.encode_text(tokens), backbone.model.encode_text(tokens))


# ------------------------------------------------------------------- ViT-B-16 parity


@pytest.mark.slow
def test_vit_b16_seam_equals_open_clip_exactly(vit_b16: ClipBackbone) -> None:
    assert (vit_b16.embed_dim, vit_b16.text_width, vit_b16.context_length) == (512, 512, 77)
    _check_seam(vit_b16, PROMPTS)


@pytest.mark.slow
def test_vit_b16_image_side(vit_b16: ClipBackbone, photos_dir: Path) -> None:
    assert len(vit_b16.vision_blocks) == 12
    assert vit_b16.vision_blocks is vit_b16.model.visual.transformer.resblocks
    assert torch.equal(vit_b16.logit_scale, vit_b16.model.logit_scale.exp())
    assert vit_b16.preprocess == Preprocess(size=(224, 224))
    image = vit_b16.transform(Image.open(photos_dir / "chelsea.png"))[None]
    with torch.no_grad():
        assert torch.equal(vit_b16.encode_image(image), vit_b16.model.encode_image(image))


# ----------------------------------------------------------------- deterministic `none`


def _same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_none_weights_are_deterministic(tiny_clip: ClipBackbone) -> None:
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    again = load_backbone("clip:tiny", "none")
    assert torch.equal(torch.random.get_rng_state(), state), "building changed the global RNG"
    torch.manual_seed(456)  # a different global seed must not matter
    third = load_backbone("clip:tiny", "none")
    assert again.fingerprint() == tiny_clip.fingerprint() == third.fingerprint()
    assert _same_parameters(again, tiny_clip)
    assert _same_parameters(third, tiny_clip)


def test_none_is_not_constant_init(tiny_clip: ClipBackbone) -> None:
    # A seeded random init, not zeros/ones everywhere.
    weight = tiny_clip.model.token_embedding.weight
    assert weight.std() > 0
    assert not torch.equal(weight[0], weight[1])


def test_fingerprint_changes_with_parameters() -> None:
    backbone = load_backbone("clip:tiny", "none")
    before = backbone.fingerprint()
    assert len(before) == 16
    int(before, 16)
    with torch.no_grad():
        backbone.model.logit_scale.add_(1.0)
    after_scale = backbone.fingerprint()
    assert after_scale != before
    with torch.no_grad():
        backbone.model.visual.conv1.weight.mul_(1.5)
    after_conv = backbone.fingerprint()
    assert after_conv not in (before, after_scale)
    with torch.no_grad():  # one weight that an evenly spaced sample would miss
        backbone.model.token_embedding.weight[12345, 7] += 0.5
    assert backbone.fingerprint() not in (before, after_scale, after_conv)


def test_none_with_hugging_face_text_tower_stays_random() -> None:
    # open_clip fills HF text towers with pretrained weights unless told not to.
    from vprompt.backbones.clip import _resolve_source

    args = _resolve_source("roberta-ViT-B-32", "none")
    assert args["pretrained"] is None
    assert args["pretrained_text"] is False


# ----------------------------------------------------------------- local checkpoints


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    """clip:tiny weights that differ from the `none` init (so loading is observable)."""
    import vprompt.backbones.clip as clip_mod

    clip_mod._open_clip()  # registers vprompt-tiny with open_clip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = open_clip.create_model("vprompt-tiny")
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_safetensors(tmp_path_factory, tiny_state) -> Path:
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file(tiny_state, str(path))
    return path


def _assert_loaded(backbone: ClipBackbone, state: dict[str, torch.Tensor]) -> None:
    loaded = backbone.model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert all(not p.requires_grad for p in backbone.parameters())
    assert not backbone.training


def test_load_safetensors_file(tiny_safetensors: Path, tiny_state, tiny_clip) -> None:
    backbone = load_backbone("clip:tiny", weights=str(tiny_safetensors))
    _assert_loaded(backbone, tiny_state)
    assert backbone.weights == str(tiny_safetensors)
    assert backbone.logit_scale.item() == pytest.approx(torch.tensor(3.0).exp().item())
    assert backbone.fingerprint() != tiny_clip.fingerprint()
    assert backbone.preprocess == tiny_clip.preprocess
    _check_seam(backbone, PROMPTS)


@pytest.mark.parametrize("wrap", [False, True], ids=["state-dict", "wrapped-state-dict"])
def test_load_torch_file(tmp_path: Path, tiny_state, wrap: bool) -> None:
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": tiny_state} if wrap else tiny_state, path)
    _assert_loaded(load_backbone("clip:tiny", weights=str(path)), tiny_state)


def test_load_directory_with_checkpoint(tmp_path: Path, tiny_state) -> None:
    save_file(tiny_state, str(tmp_path / "open_clip_model.safetensors"))
    _assert_loaded(load_backbone("clip:tiny", weights=str(tmp_path)), tiny_state)


def test_load_open_clip_local_dir(tmp_path: Path, tiny_state) -> None:
    import json

    from vprompt.backbones.clip import _CONFIG_DIR

    cfg = json.loads((_CONFIG_DIR / "vprompt-tiny.json").read_text())
    pre = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize_mode": "squash"}
    config = {"model_cfg": cfg, "preprocess_cfg": pre}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    save_file(tiny_state, str(tmp_path / "open_clip_model.safetensors"))
    backbone = load_backbone("clip:tiny", weights=str(tmp_path))
    _assert_loaded(backbone, tiny_state)
    # Preprocessing travels with the weights.
    assert backbone.preprocess == Preprocess(
        size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode="squash"
    )


def test_empty_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"open_clip_config\.json.*open_clip_model\.safetensors"):
        load_backbone("clip:tiny", weights=str(tmp_path))


def test_mismatched_keys_are_named(tmp_path: Path, tiny_state) -> None:
    state = dict(tiny_state)
    state.pop("logit_scale")
    state["surprise.weight"] = torch.zeros(3)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError) as info:
        load_backbone("clip:tiny", weights=str(path))
    message = str(info.value)
    assert "bad.safetensors" in message
    assert "logit_scale" in message
    assert "surprise.weight" in message
    assert "\n" not in message


def test_shape_mismatch_is_named(tmp_path: Path, tiny_state) -> None:
    state = dict(tiny_state)
    state["token_embedding.weight"] = torch.zeros(10, 64)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"size mismatch.*token_embedding\.weight"):
        load_backbone("clip:tiny", weights=str(path))


def test_corrupt_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match=r"junk\.safetensors"):
        load_backbone("clip:tiny", weights=str(path))


# ------------------------------------------------------------------ no pickle, ever

MARKER_NAME = "pwned.txt"


def _leave_marker(path: str) -> None:
    Path(path).write_text("code ran while loading weights")


class _Payload:
    """Unpickling this calls ``_leave_marker``: arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_leave_marker, (self.marker,))


def _malicious_files(folder: Path, tiny_state) -> dict[str, Path]:
    marker = folder / MARKER_NAME
    files = {}
    files["torch-zip"] = folder / "evil.pt"
    torch.save({**tiny_state, "extra": _Payload(marker)}, files["torch-zip"])
    files["legacy-pickle"] = folder / "evil.bin"
    files["legacy-pickle"].write_bytes(pickle.dumps({"state_dict": _Payload(marker)}, protocol=2))
    files["pickle-protocol-5"] = folder / "evil.pth"
    files["pickle-protocol-5"].write_bytes(pickle.dumps(_Payload(marker), protocol=5))
    sub = folder / "evil_dir"
    sub.mkdir()
    torch.save({"state_dict": _Payload(marker)}, sub / "pytorch_model.bin")
    files["directory"] = sub
    return files


def test_payloads_would_run_code(tmp_path: Path, tiny_state) -> None:
    # Guards the test below: a plain unpickler does run the payloads.
    files = _malicious_files(tmp_path, tiny_state)
    marker = tmp_path / MARKER_NAME
    pickle.loads(files["legacy-pickle"].read_bytes())
    assert marker.exists()
    marker.unlink()
    torch.load(files["torch-zip"], weights_only=False)
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["torch-zip", "legacy-pickle", "pickle-protocol-5", "directory"])
def test_pickled_objects_are_refused_without_running_code(
    tmp_path: Path, tiny_state, kind: str
) -> None:
    path = _malicious_files(tmp_path, tiny_state)[kind]
    with pytest.raises(WeightsError) as info:
        load_backbone("clip:tiny", weights=str(path))
    assert not (tmp_path / MARKER_NAME).exists(), "loading weights executed pickled code"
    message = str(info.value)
    assert "refusing to load" in message
    if kind != "pickle-protocol-5":  # torch stops at protocol 5's first opcode instead
        assert "_leave_marker" in message  # names the global it refused
    assert "weights_only` set to `False`" not in message  # no advice to load unsafely


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_non_tensor_container_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "set.pt"
    path.write_bytes(pickle.dumps({1, 2, 3}))
    with pytest.raises(WeightsError, match=r"set\.pt"):
        load_backbone("clip:tiny", weights=str(path))


# ------------------------------------------------------------ "done when": by hand


def test_zero_shot_matches_open_clip_by_hand(
    tiny_safetensors: Path, photos_dir: Path, tiny_state
) -> None:
    paths = sorted(photos_dir.glob("*.png"))
    pils = [Image.open(p).convert("RGB") for p in paths]
    portrait = pils[1].transpose(Image.Transpose.ROTATE_90)  # both orientations
    pils.append(portrait)

    model, _, preprocess = open_clip.create_model_and_transforms(
        "vprompt-tiny", pretrained=str(tiny_safetensors)
    )
    model.eval()
    tokenizer = open_clip.get_tokenizer("vprompt-tiny")
    with torch.no_grad():
        weights = []
        for name in CLASSES:
            feats = model.encode_text(tokenizer([t.format(name) for t in TEMPLATES]))
            mean = F.normalize(feats, dim=-1).mean(dim=0)
            weights.append(F.normalize(mean, dim=-1))
        text = torch.stack(weights)
        image = F.normalize(
            model.encode_image(torch.stack([preprocess(im) for im in pils])), dim=-1
        )
        expected = (model.logit_scale.exp() * image @ text.T).softmax(dim=-1)

    clf = vprompt.ZeroShotClassifier(
        load_backbone("clip:tiny", weights=str(tiny_safetensors)), CLASSES, templates=TEMPLATES
    )
    probs = clf.predict_proba(pils)
    assert probs.shape == (len(pils), len(CLASSES))
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=0)
    # Guards against a vacuous match (uniform probabilities everywhere).
    assert (expected.max(dim=1).values - expected.min(dim=1).values).min() > 1e-3
    assert not torch.allclose(expected[0], expected[1], atol=1e-4)


# ---------------------------------------------------------------------------- shared prefix
def _prefix_check(backbone: ClipBackbone, prefix_len: int) -> None:
    """Prompts sharing their first tokens: encoding the prefix once equals whole prompts,
    features and gradients (the prefix embeddings stand in for a learned context)."""
    prompts = ["a photo of a cat.", "a photo of a golden retriever.", "a photo of a x y z w v."]
    tokens = backbone.tokenize(prompts)
    eot = backbone.eot_index(tokens)
    emb = backbone.embed_tokens(tokens[:, : int(eot.max()) + 1]).detach()
    assert torch.equal(emb[0, :prefix_len], emb[2, :prefix_len])  # they really share it
    grads = []
    for shared in (True, False):
        prefix = emb[0, :prefix_len].clone().requires_grad_(True)
        suffix = emb[:, prefix_len:]
        if shared:
            out = backbone.encode_text_shared_prefix(prefix, suffix, eot)
        else:
            whole = torch.cat([prefix.expand(len(prompts), -1, -1), suffix], dim=1)
            out = backbone.encode_text_embeddings(whole, eot)
        (out.square().sum() + out[:, 1].sum()).backward()
        grads.append((out.detach(), prefix.grad))
    (fast, g_fast), (slow, g_slow) = grads
    assert fast.shape == (len(prompts), backbone.embed_dim)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    # Float32 sums in another order: compare against the gradient's own scale.
    scale = float(g_slow.abs().max())
    torch.testing.assert_close(g_fast, g_slow, atol=1e-5 * scale, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(fast, backbone.model.encode_text(tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prefix_len", [2, 5])
def test_shared_prefix_equals_whole_prompts(tiny_clip: ClipBackbone, prefix_len: int) -> None:
    assert tiny_clip.shares_text_prefix
    _prefix_check(tiny_clip, prefix_len)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_shared_prefix_on_other_text_towers(tiny_clip: ClipBackbone, variant: str) -> None:
    """Every causal tower shares prefixes exactly; the others refuse with the reason."""
    custom, pad_mask, text, truncatable = VARIANTS[variant]
    backbone = _tiny_variant(tiny_clip, custom=custom, pad_mask=pad_mask, **text)
    assert backbone.shares_text_prefix is truncatable
    if truncatable:
        # The mid-sentence variant pools "photo" (position 2), so its prefix must end before.
        _prefix_check(backbone, 2 if variant == "clip-eos-mid-sentence" else 5)
    else:
        with pytest.raises(WeightsError, match="cannot share a prefix"):
            backbone.encode_text_shared_prefix(
                torch.zeros(2, backbone.text_width),
                torch.zeros(1, 3, backbone.text_width),
                torch.tensor([4]),
            )


def test_shared_prefix_refuses_a_pooled_token_inside_the_prefix(tiny_clip: ClipBackbone) -> None:
    width = tiny_clip.text_width
    with pytest.raises(ValueError, match="after the shared prefix"):
        tiny_clip.encode_text_shared_prefix(
            torch.zeros(4, width), torch.zeros(2, 3, width), torch.tensor([5, 2])
        )


# ---------------------------------------------------------------------------- deep prompts
def _deep_case(backbone: ClipBackbone, depth: int, n_text: int, n_vision: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ctx = torch.randn(n_text, backbone.text_width, generator=gen) * 0.3
    text_deep = [
        torch.randn(n_text, backbone.text_width, generator=gen) * 0.3 for _ in range(depth - 1)
    ]
    vision = [
        torch.randn(n_vision, backbone.vision_width, generator=gen) * 0.3 for _ in range(depth)
    ]
    return ctx, text_deep, vision


def _check_deep_seam(backbone: ClipBackbone, depth: int, images: torch.Tensor) -> None:
    """Deep prompts through vprompt's seam (shared prefix and whole prompts) equal the
    reference towers written from the papers, features and gradients."""
    import vl_reference as ref
    from vprompt.methods.text_context import PromptAssembler, encode_prompts

    classes = ["cat", "golden retriever", "x y z", "rocket"]
    ctx, text_deep, vision = _deep_case(backbone, depth, n_text=2, n_vision=3)
    assembler = PromptAssembler(backbone, classes, n_ctx=2, prompt_prefix="a photo of a")
    outs = {}
    for path in ("shared", "whole", "reference"):
        leaves = [t.clone().requires_grad_(True) for t in (ctx, *text_deep, *vision)]
        c, deep, vis = leaves[0], leaves[1:depth], leaves[depth:]
        if path == "reference":
            text = ref.text_features(
                backbone.model, backbone._tokenizer, classes, c, deep, "a photo of a"
            )
            image = ref.image_features(backbone.model, images, vis)
        else:
            text = encode_prompts(backbone, assembler, c, share_prefix=path == "shared", deep=deep)
            image = F.normalize(backbone.encode_image_prompted(images, vis), dim=-1)
        logits = backbone.logit_scale * image @ text.T
        logits.log_softmax(-1)[:, 0].sum().backward()
        outs[path] = (text.detach(), image.detach(), [t.grad for t in leaves])
    want_text, want_image, want_grads = outs["reference"]
    assert not torch.allclose(want_text[0], want_text[1], atol=1e-3)
    for path in ("shared", "whole"):
        text, image, grads = outs[path]
        torch.testing.assert_close(text, want_text, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(image, want_image, atol=2e-5, rtol=1e-5)
        for got, want in zip(grads, want_grads, strict=True):
            assert want is not None
            assert float(want.abs().max()) > 0
            scale = float(want.abs().max())
            torch.testing.assert_close(got, want, atol=1e-4 * scale, rtol=1e-3)


def test_deep_prompts_equal_the_reference_towers(tiny_clip: ClipBackbone) -> None:
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for depth in (1, 2):
        _check_deep_seam(tiny_clip, depth, images)


@pytest.mark.slow
def test_deep_prompts_equal_the_reference_towers_vit_b16(
    vit_b16: ClipBackbone, photos_dir: Path
) -> None:
    images = torch.stack(
        [vit_b16.transform(Image.open(photos_dir / f"{n}.png")) for n in ("chelsea", "coffee")]
    )
    _check_deep_seam(vit_b16, 9, images)


def test_no_vision_prompts_is_open_clips_forward_bit_for_bit(tiny_clip: ClipBackbone) -> None:
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = tiny_clip.model.encode_image(images)
        assert torch.equal(tiny_clip.encode_image_prompted(images, []), want)
        # And the prompted path is not that forward in disguise.
        prompt = [torch.randn(2, tiny_clip.vision_width)]
        assert not torch.allclose(tiny_clip.encode_image_prompted(images, prompt), want)


def test_deep_prompts_that_do_not_fit_are_refused(tiny_clip: ClipBackbone) -> None:
    width, vwidth = tiny_clip.text_width, tiny_clip.vision_width
    tokens = tiny_clip.tokenize(["a photo of a cat."])
    emb, eot = tiny_clip.embed_tokens(tokens), tiny_clip.eot_index(tokens)
    with pytest.raises(ValueError, match="2 deep prompt layers for a tower of 2 blocks"):
        tiny_clip.encode_text_embeddings(emb, eot, deep=[torch.zeros(2, width)] * 2)
    with pytest.raises(ValueError, match="inside the shared prefix"):
        tiny_clip.encode_text_shared_prefix(
            emb[0, :2], emb[:, 2:8], eot, deep=[torch.zeros(2, width)]
        )
    images = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match="3 vision prompt layers for a tower of 2 blocks"):
        tiny_clip.encode_image_prompted(images, [torch.zeros(2, vwidth)] * 3)
    with pytest.raises(ValueError, match="same n"):
        tiny_clip.encode_image_prompted(images, [torch.zeros(2, vwidth), torch.zeros(3, vwidth)])


def test_fingerprint_does_not_depend_on_the_thread_count() -> None:
    """A pack trained on a 16-core machine must meet the same fingerprint on a 2-core one (and
    in a 1-thread Ray worker): the hash may not depend on a reduction's summation order."""
    from vprompt.backbones.fingerprint import weights_fingerprint

    backbone = load_backbone("clip:tiny", "none")
    threads = torch.get_num_threads()
    try:
        prints = set()
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            prints.add(weights_fingerprint(backbone.model))
    finally:
        torch.set_num_threads(threads)
    assert len(prints) == 1


def test_a_pack_with_the_earlier_fingerprint_still_loads(tmp_path) -> None:
    """Packs written before the order-independent fingerprint keep loading on their weights."""
    from vprompt.backbones.fingerprint import legacy_weights_fingerprint
    from vprompt.engine.pack import BackboneRef, matching_backbone

    backbone = load_backbone("clip:tiny", "none")
    old = BackboneRef(backbone.name, "none", legacy_weights_fingerprint(backbone.model))
    assert old.fingerprint != backbone.fingerprint()
    got = matching_backbone(
        old, "old.safetensors", backbone=backbone, weights=None, device=None, allow_download=False
    )
    assert got is backbone
