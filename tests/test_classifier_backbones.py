"""Classifier backbones (torchvision, timm): registry, loading, preprocessing, ViT tokens."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from vprompt.backbones import (
    FAMILIES,
    RANDOM_INIT,
    Backbone,
    ClassifierBackbone,
    ClipBackbone,
    ImageTextBackbone,
    NotAViTError,
    Preprocess,
    TokenBackbone,
    build_eval_transform,
    list_models,
    load_backbone,
)
from vprompt.backbones.fingerprint import weights_fingerprint
from vprompt.backbones.timm_family import preprocess_from_cfg
from vprompt.backbones.torchvision_family import preprocess_from_weights
from vprompt.errors import UnknownNameError, WeightsError

TINY = ["torchvision:tiny", "timm:tiny-vit"]
MOBILENET_FILE = Path(torch.hub.get_dir()) / "checkpoints" / "mobilenet_v2-b0353104.pth"
CAT_CLASSES = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat", "lynx"}


@pytest.fixture(scope="module")
def tiny_tv() -> ClassifierBackbone:
    return load_backbone("torchvision:tiny", RANDOM_INIT)


@pytest.fixture(scope="module")
def tiny_vit() -> ClassifierBackbone:
    return load_backbone("timm:tiny-vit", RANDOM_INIT)


@pytest.fixture(scope="module")
def tiny(request: pytest.FixtureRequest) -> dict[str, ClassifierBackbone]:
    return {
        "torchvision:tiny": request.getfixturevalue("tiny_tv"),
        "timm:tiny-vit": request.getfixturevalue("tiny_vit"),
    }


@pytest.fixture(scope="module")
def chelsea() -> Image.Image:
    import skimage.data

    return Image.fromarray(skimage.data.chelsea())


def _pixels(backbone: ClassifierBackbone, n: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, *backbone.preprocess.size, generator=gen)


def _run_blocks(blocks: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        tokens = block(tokens)
    return tokens


# ------------------------------------------------------------------ registry contract


@pytest.mark.parametrize("name", TINY)
def test_tiny_builds_frozen_in_eval_mode(name: str, tiny: dict, chelsea: Image.Image) -> None:
    backbone = tiny[name]
    assert isinstance(backbone, Backbone)
    assert not isinstance(backbone, ImageTextBackbone)
    assert (backbone.name, backbone.weights) == (name, RANDOM_INIT)
    assert all(not p.requires_grad for p in backbone.parameters())
    assert not any(m.training for m in backbone.modules())
    assert backbone.transform(chelsea).shape == (3, *backbone.preprocess.size)
    assert backbone.num_classes == len(backbone.source_classes) == 1000
    # Random weights have no class meaning.
    assert backbone.source_classes[:2] == ["class_0", "class_1"]
    assert backbone.mean.shape == backbone.std.shape == (3,)
    assert torch.equal(backbone.mean, torch.tensor(backbone.preprocess.mean))


@pytest.mark.parametrize("name", TINY)
def test_random_init_is_deterministic(name: str, tiny: dict) -> None:
    again = load_backbone(name, RANDOM_INIT)
    assert again.fingerprint() == tiny[name].fingerprint()
    assert len(again.fingerprint()) == 16
    for a, b in zip(again.parameters(), tiny[name].parameters(), strict=True):
        assert torch.equal(a, b)
    assert again.fingerprint() == weights_fingerprint(again.model)
    with torch.no_grad():
        next(again.parameters()).add_(1.0)
    assert again.fingerprint() != tiny[name].fingerprint()


def test_both_families_are_listed_with_their_tags() -> None:
    rows = {r["name"]: r for r in list_models()}
    assert rows["torchvision:tiny"]["tiny"]
    assert rows["timm:tiny-vit"]["tiny"]
    assert rows["torchvision:tiny"]["default_weights"] == RANDOM_INIT
    assert rows["timm:tiny-vit"]["default_weights"] == RANDOM_INIT
    mobilenet = rows["torchvision:mobilenet_v2"]
    assert mobilenet["tags"] == ["IMAGENET1K_V1", "IMAGENET1K_V2", "DEFAULT"]
    assert mobilenet["default_weights"] == "IMAGENET1K_V2"  # DEFAULT, resolved
    assert "torchvision:vit_b_16" in rows
    assert "torchvision:resnet50" in rows
    assert "a1_in1k" in rows["timm:resnet50"]["tags"]
    assert rows["timm:resnet50"]["default_weights"] == "a1_in1k"
    assert rows["timm:vit_base_patch16_224"]["default_weights"] == "augreg2_in21k_ft_in1k"
    assert sum(r["family"] == "timm" for r in rows.values()) > 1000


def test_cli_lists_one_family() -> None:
    from vprompt.cli import main

    result = CliRunner().invoke(main, ["models", "--family", "torchvision", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert {r["family"] for r in rows} == {"torchvision"}
    assert rows[0]["name"] == "torchvision:tiny"


# ------------------------------------------------------------------ unknown names and tags


def test_unknown_arch_suggests_close_names() -> None:
    with pytest.raises(UnknownNameError, match=r"did you mean .*'torchvision:mobilenet_v2'"):
        load_backbone("torchvision:mobilenet-v2")
    with pytest.raises(UnknownNameError, match=r"'timm:vit_base_patch16_224'"):
        load_backbone("timm:vit_base_patch16_22")


def test_unknown_tag_suggests_close_tags() -> None:
    with pytest.raises(WeightsError, match=r"unknown tag 'IMAGENET1K_V3'; did you mean "):
        load_backbone("torchvision:mobilenet_v2", "IMAGENET1K_V3")
    with pytest.raises(WeightsError, match=r"unknown tag 'a1_in1'; did you mean 'a1_in1k'"):
        load_backbone("timm:resnet50", "a1_in1")
    with pytest.raises(WeightsError, match=r"no such file or folder 'gone/model\.safetensors'"):
        load_backbone("torchvision:tiny", "gone/model.safetensors")
    with pytest.raises(WeightsError, match=r"none registered"):
        load_backbone("timm:tiny-vit", "r160_in1k")


# ------------------------------------------------------------------ logits and features


@pytest.mark.parametrize("name", TINY)
def test_features_feed_the_head_to_give_the_logits(name: str, tiny: dict) -> None:
    backbone = tiny[name]
    x = _pixels(backbone)
    with torch.no_grad():
        logits = backbone(x)
        feats = backbone.features(x)
    assert logits.shape == (2, backbone.num_classes)
    assert feats.shape == (2, backbone.feature_dim)
    assert isinstance(backbone.head, nn.Linear)
    assert backbone.head.in_features == backbone.feature_dim
    torch.testing.assert_close(backbone.head(feats), logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", TINY)
def test_channels_last_inputs_change_no_value(name: str, tiny: dict) -> None:
    """CNNs see channels-last inputs (faster kernels); the logits and features are those of
    the plain model on standard-layout inputs, and the weights keep their standard layout."""
    backbone = tiny[name]
    assert backbone.channels_last is (not backbone.is_vit)
    x = _pixels(backbone)
    seen: list[torch.Tensor] = []
    first = next(m for m in backbone.model.modules() if isinstance(m, nn.Conv2d))
    handle = first.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0]))
    try:
        with torch.no_grad():
            logits, feats = backbone(x), backbone.features(x)
            plain = backbone.model(x.contiguous())
    finally:
        handle.remove()
    wanted = torch.channels_last if backbone.channels_last else torch.contiguous_format
    assert seen[0].is_contiguous(memory_format=wanted)
    torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(backbone.head(feats), plain, rtol=1e-5, atol=1e-5)
    assert all(t.is_contiguous() for t in backbone.model.state_dict().values())


def test_classifier_without_a_linear_head_says_so() -> None:
    squeeze = load_backbone("torchvision:squeezenet1_1", RANDOM_INIT)
    assert squeeze.num_classes == 1000
    with pytest.raises(WeightsError, match="not a final Linear"):
        squeeze.features(torch.zeros(1, 3, 64, 64))


# ------------------------------------------------------------------ preprocessing


@pytest.mark.parametrize(
    "enum_name", ["MobileNet_V2_Weights", "ResNet50_Weights", "EfficientNet_B3_Weights"]
)
def test_preprocess_matches_torchvision_transforms(enum_name: str, chelsea: Image.Image) -> None:
    import torchvision.models as tvm

    for member in getattr(tvm, enum_name):
        ours = build_eval_transform(preprocess_from_weights(member))(chelsea)
        theirs = member.transforms()(chelsea)
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["vit_base_patch16_224", "resnet50", "convnext_tiny"])
def test_preprocess_matches_timm_transforms(arch: str, chelsea: Image.Image) -> None:
    from timm.data import create_transform, resolve_data_config
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch).to_dict()
    ours = build_eval_transform(preprocess_from_cfg(cfg))(chelsea)
    theirs = create_transform(**resolve_data_config({}, pretrained_cfg=cfg))(chelsea)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_tiny_vit_preprocess_is_small_and_matches_timm(tiny_vit, chelsea: Image.Image) -> None:
    from timm.data import create_transform, resolve_data_config

    assert tiny_vit.preprocess.size == (32, 32)
    assert tiny_vit.preprocess.resize_size == 36  # floor(32 / 0.875)
    theirs = create_transform(**resolve_data_config({}, model=tiny_vit.model))(chelsea)
    torch.testing.assert_close(tiny_vit.transform(chelsea), theirs, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ local and hub files


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_file_round_trip(name: str, suffix: str, tiny: dict, tmp_path: Path) -> None:
    source = tiny[name]
    state = {k: v.clone() for k, v in source.model.state_dict().items()}
    for v in state.values():
        if v.is_floating_point():
            v.mul_(0.5)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    loaded = load_backbone(name, str(path))
    assert loaded.weights == str(path)
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert loaded.fingerprint() != source.fingerprint()
    assert all(not p.requires_grad for p in loaded.parameters())
    # A trained 1000-way head follows ImageNet's class order.
    assert loaded.source_classes[0] == "tench"


def test_local_folder_and_fine_tuned_head(tmp_path: Path) -> None:
    ten = ClassifierBackbone(
        model=_tiny_mobilenet(num_classes=10),
        name="torchvision:tiny",
        weights="none",
        preprocess=Preprocess(size=(64, 64)),
        kind="torchvision",
        source_classes=[f"class_{i}" for i in range(10)],
    )
    save_file(ten.model.state_dict(), str(tmp_path / "model.safetensors"))
    loaded = load_backbone("torchvision:tiny", str(tmp_path))
    assert loaded.num_classes == 10
    assert loaded.source_classes == [f"class_{i}" for i in range(10)]
    assert loaded.fingerprint() == ten.fingerprint()


def test_mismatched_keys_are_named(tiny_tv, tmp_path: Path) -> None:
    state = dict(tiny_tv.model.state_dict())
    state["extra.weight"] = torch.zeros(2)
    del state["features.0.0.weight"]
    state["classifier.1.bias"] = torch.zeros(7)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError) as info:
        load_backbone("torchvision:tiny", str(path))
    message = str(info.value)
    assert "missing keys: features.0.0.weight" in message
    assert "unexpected keys: extra.weight" in message
    assert "classifier.1.bias (file (7,), model (1000,))" in message
    assert str(path) in message


def test_other_architecture_is_refused(tiny_vit, tmp_path: Path) -> None:
    path = tmp_path / "vit.safetensors"
    save_file(tiny_vit.model.state_dict(), str(path))
    with pytest.raises(WeightsError, match=r"does not fit.*missing keys: features\.0\.0\.weight"):
        load_backbone("torchvision:tiny", str(path))


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_malicious_pickle_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with path.open("wb") as fh:
        pickle.dump({"features.0.0.weight": _Exploit(marker)}, fh, protocol=2)
    torch.save({"weight": _Exploit(marker)}, tmp_path / "evil2.pt")
    for file in (path, tmp_path / "evil2.pt"):
        with pytest.raises(WeightsError, match=r"refusing to load|cannot read weights"):
            load_backbone("torchvision:tiny", str(file))
        with pytest.raises(WeightsError):
            load_backbone("timm:tiny-vit", str(file))
    assert not marker.exists()


def test_hf_hub_goes_through_the_local_file_path(
    tiny_tv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    bin_file = tmp_path / "pytorch_model.bin"
    torch.save(dict(tiny_tv.model.state_dict()), bin_file)
    asked: list[tuple[str, str]] = []

    def fake_download(repo: str, filename: str, **_: object) -> str:
        asked.append((repo, filename))
        if filename == "model.safetensors":
            raise EntryNotFoundError("no model.safetensors")
        return str(bin_file)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    loaded = load_backbone("torchvision:tiny", "hf-hub:org/tiny")
    assert asked == [("org/tiny", "model.safetensors"), ("org/tiny", "pytorch_model.bin")]
    assert loaded.weights == "hf-hub:org/tiny"
    assert loaded.fingerprint() == tiny_tv.fingerprint()


def test_timm_hf_hub_must_hold_the_named_arch(tiny_vit, monkeypatch) -> None:
    from vprompt.backbones import timm_family

    monkeypatch.setattr(timm_family, "_create", lambda *a, **k: tiny_vit.model)
    with pytest.raises(WeightsError, match="holds a test_vit, not a resnet50"):
        load_backbone("timm:resnet50", "hf-hub:org/repo")


# ------------------------------------------------------------------ ViT tokens (VPT seam)


def test_timm_vit_token_parity(tiny_vit) -> None:
    assert tiny_vit.is_vit
    assert isinstance(tiny_vit, TokenBackbone)
    x = _pixels(tiny_vit)
    with torch.no_grad():
        tokens = tiny_vit.vision_tokens(x)
        pooled = tiny_vit.pool_vision_tokens(_run_blocks(tiny_vit.vision_blocks, tokens))
        m = tiny_vit.model
        expected = m.forward_head(m.forward_features(x), pre_logits=True)
    n_patches = (32 // 8) ** 2
    assert tokens.shape == (2, tiny_vit.num_prefix_tokens + n_patches, tiny_vit.vision_width)
    assert (tiny_vit.num_prefix_tokens, tiny_vit.vision_width) == (1, 64)
    assert len(tiny_vit.vision_blocks) == 2
    assert torch.equal(pooled, expected)
    assert torch.equal(pooled, tiny_vit.features(x))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"reg_tokens": 2, "global_pool": "avg", "fc_norm": True},
        {"no_embed_class": True, "class_token": True, "dynamic_img_size": False},
        {"class_token": False, "global_pool": "map"},
    ],
)
def test_timm_vit_variants_token_parity(kwargs: dict) -> None:
    import timm

    from vprompt.backbones.timm_family import _wrap

    torch.manual_seed(0)
    model = timm.create_model(
        "test_vit", img_size=32, patch_size=8, depth=2, num_classes=5, **kwargs
    ).eval()
    backbone = _wrap(model, arch="test_vit", weights=RANDOM_INIT)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = backbone.vision_tokens(x)
        pooled = backbone.pool_vision_tokens(_run_blocks(backbone.vision_blocks, tokens))
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
    assert tokens.shape[1] == backbone.num_prefix_tokens + 16
    assert torch.equal(pooled, expected)


@pytest.mark.parametrize("representation_size", [None, 8])
def test_torchvision_vit_token_parity(representation_size: int | None) -> None:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
        num_classes=5,
        representation_size=representation_size,
    ).eval()
    backbone = ClassifierBackbone(
        model=model,
        name="torchvision:vit-test",
        weights=RANDOM_INIT,
        preprocess=Preprocess(size=(32, 32)),
        kind="torchvision",
        source_classes=list("abcde"),
        token_layout="torchvision-vit",
    )
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = backbone.vision_tokens(x)
        pooled = backbone.pool_vision_tokens(_run_blocks(backbone.vision_blocks, tokens))
        feats = backbone.features(x)
        logits = backbone(x)
    assert tokens.shape == (2, 17, 16)
    assert backbone.vision_width == 16
    assert torch.equal(pooled, feats)
    torch.testing.assert_close(backbone.head(pooled), logits, rtol=0, atol=1e-6)


def test_clip_token_parity(tiny_clip: ClipBackbone) -> None:
    assert tiny_clip.is_vit
    assert isinstance(tiny_clip, TokenBackbone)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = tiny_clip.vision_tokens(x)
        pooled = tiny_clip.pool_vision_tokens(_run_blocks(tiny_clip.vision_blocks, tokens))
        expected = tiny_clip.model.encode_image(x)
    assert tokens.shape == (2, 1 + 16, tiny_clip.vision_width)
    assert tiny_clip.num_prefix_tokens == 1
    assert torch.equal(pooled, expected)


_TINY_VISION = {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8}


@pytest.mark.parametrize(
    "vision_cfg",
    [
        {**_TINY_VISION, "pool_type": "avg", "no_ln_pre": True},
        {**_TINY_VISION, "final_ln_after_pool": True},
        {
            **_TINY_VISION,
            "attentional_pool": True,
            "attn_pooler_queries": 4,
            "attn_pooler_heads": 2,
        },
        {
            "timm_model_name": "test_vit",
            "timm_model_pretrained": False,
            "timm_pool": "token",
            "timm_proj": "linear",
            "image_size": 32,
        },
    ],
    ids=["avg-no-ln-pre", "ln-after-pool", "attn-pool", "timm-trunk"],
)
def test_clip_variant_token_parity(vision_cfg: dict) -> None:
    backbone = _tiny_clip_variant(vision_cfg)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = backbone.vision_tokens(x)
        pooled = backbone.pool_vision_tokens(_run_blocks(backbone.vision_blocks, tokens))
        expected = backbone.encode_image(x)
    assert torch.equal(pooled, expected)


def test_cnn_towers_refuse_token_access(tiny_tv) -> None:
    assert not tiny_tv.is_vit
    assert not isinstance(tiny_tv, TokenBackbone)  # and asking does not raise
    with pytest.raises(NotAViTError, match=r"torchvision:tiny is not a vision transformer"):
        tiny_tv.vision_tokens(_pixels(tiny_tv))
    for attr in ("vision_width", "num_prefix_tokens", "vision_blocks"):
        with pytest.raises(WeightsError, match="MobileNetV2"):
            getattr(tiny_tv, attr)
    resnet_clip = _tiny_clip_variant(
        {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8}
    )
    assert not resnet_clip.is_vit
    assert isinstance(resnet_clip, ImageTextBackbone) is False
    with pytest.raises(NotAViTError, match="ModifiedResNet"):
        _ = resnet_clip.vision_blocks


def test_prompt_tokens_get_gradients_through_the_frozen_vit(tiny_vit) -> None:
    x = _pixels(tiny_vit)
    prompts = nn.Parameter(torch.zeros(1, 3, tiny_vit.vision_width))
    tokens = tiny_vit.vision_tokens(x)
    p = tiny_vit.num_prefix_tokens
    tokens = torch.cat([tokens[:, :p], prompts.expand(2, -1, -1), tokens[:, p:]], dim=1)
    out = tiny_vit.pool_vision_tokens(_run_blocks(tiny_vit.vision_blocks, tokens))
    tiny_vit.head(out).sum().backward()
    assert prompts.grad is not None
    assert prompts.grad.abs().sum() > 0
    assert all(q.grad is None for q in tiny_vit.parameters())


# ------------------------------------------------------------------ real pretrained weights


@pytest.mark.real
@pytest.mark.skipif(not MOBILENET_FILE.is_file(), reason=f"{MOBILENET_FILE} is not cached")
def test_real_mobilenet_v2_recognises_a_cat(chelsea: Image.Image) -> None:
    import torchvision.models as tvm

    backbone = load_backbone("torchvision:mobilenet_v2", "IMAGENET1K_V1")
    member = tvm.MobileNet_V2_Weights.IMAGENET1K_V1
    assert backbone.weights == "IMAGENET1K_V1"
    assert backbone.source_classes == list(member.meta["categories"])
    assert backbone.preprocess == preprocess_from_weights(member)
    x = backbone.transform(chelsea)[None]
    torch.testing.assert_close(x[0], member.transforms()(chelsea), rtol=0, atol=1e-6)
    with torch.no_grad():
        logits = backbone(x)
        feats = backbone.features(x)
    top5 = {backbone.source_classes[i] for i in logits[0].topk(5).indices.tolist()}
    assert top5 & CAT_CLASSES, top5
    assert feats.shape == (1, 1280)
    torch.testing.assert_close(backbone.head(feats), logits, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ helpers


def _tiny_mobilenet(num_classes: int) -> nn.Module:
    import torchvision.models as tvm

    torch.manual_seed(0)
    return tvm.mobilenet_v2(weights=None, width_mult=0.25, num_classes=num_classes).eval()


def _tiny_clip_variant(vision_cfg: dict) -> ClipBackbone:
    from vprompt.backbones.clip import _open_clip

    oc = _open_clip()
    torch.manual_seed(0)
    model = oc.create_model("vprompt-tiny", pretrained=None, vision_cfg=vision_cfg).eval()
    return ClipBackbone(
        model=model,
        tokenizer=oc.get_tokenizer("vprompt-tiny"),
        name="clip:variant",
        weights=RANDOM_INIT,
        preprocess=Preprocess(size=(32, 32)),
    )


def test_every_family_is_registered_once() -> None:
    assert {"clip", "timm", "torchvision"} <= set(FAMILIES.names())
