"""Contract over the backbone registry: names, tags, construction, preprocessing."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transform import (
    PreprocessCfg,
    image_transform,
    image_transform_v2,
    merge_preprocess_dict,
)
from PIL import Image

from vprompt.backbones import (
    FAMILIES,
    RANDOM_INIT,
    Backbone,
    ClipBackbone,
    ImageTextBackbone,
    Preprocess,
    PromptableSegmenter,
    build_eval_transform,
    list_models,
    load_backbone,
    register_family,
    split_name,
)
from vprompt.backbones.clip import CLIP_FAMILY, TINY_ARCHS, list_archs
from vprompt.backbones.detection import DETECTORS, DetectorBackbone
from vprompt.errors import ConfigError, UnknownNameError, WeightsError
from vprompt.utils.registry import Registry, close_matches

TINY_NAMES = [f"{f}:{a}" for f in FAMILIES.names() for a in FAMILIES.get(f).tiny]
CLIP_ARCHS = list_archs()


def _open_clip_name(arch: str) -> str:
    return TINY_ARCHS.get(arch, arch)


def _model_cfg(arch: str) -> dict:
    return open_clip.get_model_config(_open_clip_name(arch))


# ------------------------------------------------------------------------ tiny names


def test_every_family_has_a_tiny_variant() -> None:
    assert "clip" in FAMILIES
    for fname in FAMILIES.names():
        assert FAMILIES.get(fname).tiny, f"family {fname} has no tiny variant for tests"
    assert "clip:tiny" in TINY_NAMES


@pytest.mark.parametrize("name", TINY_NAMES)
def test_tiny_builds_frozen_and_fits_the_protocol(name: str, photos_dir: Path) -> None:
    backbone = load_backbone(name, RANDOM_INIT)
    assert backbone.name == name
    assert backbone.weights == RANDOM_INIT
    assert all(not p.requires_grad for p in backbone.parameters())
    assert next(backbone.parameters(), None) is not None
    assert not backbone.training
    assert all(not m.training for m in backbone.modules())
    assert len(backbone.fingerprint()) >= 8
    if name.startswith("sam:"):
        assert isinstance(backbone, PromptableSegmenter)
        pixels = backbone.preprocess([Image.open(photos_dir / "chelsea.png")])
        side = backbone.frame.target
        assert pixels.shape == (1, 3, side, side)
        parts = backbone.embed(pixels)
        assert parts["embeddings"].shape[0] == 1
        return
    if name.startswith("seggpt:"):
        photo = Image.open(photos_dir / "chelsea.png")
        mask = np.zeros((photo.height, photo.width), dtype=bool)
        mask[50:150, 100:250] = True
        (pred,) = backbone.segment([photo], [mask], [photo])
        assert pred.mask.shape == (photo.height, photo.width)
        return
    if name.split(":")[0] in DETECTORS:
        # What a detector does is checked by tests/test_detector_contract.py.
        assert isinstance(backbone, DetectorBackbone)
        assert backbone.capabilities == DETECTORS.get(name.split(":")[0]).capabilities
        return
    assert isinstance(backbone, Backbone)
    assert isinstance(backbone.preprocess, Preprocess)
    pixels = backbone.transform(Image.open(photos_dir / "chelsea.png"))
    assert pixels.shape == (3, *backbone.preprocess.size)
    if not name.startswith("clip:"):
        return
    assert isinstance(backbone, ImageTextBackbone)
    with torch.no_grad():
        feats = backbone.encode_image(pixels[None])
        text = backbone.encode_text(backbone.tokenize(["a photo of a cat."]))
    assert feats.shape == text.shape == (1, backbone.embed_dim)


def test_tiny_default_weights_are_random_init() -> None:
    assert CLIP_FAMILY.default_weights("tiny") == RANDOM_INIT
    assert CLIP_FAMILY.list_tags("tiny") == []
    # The internal open_clip config name is not a public name.
    assert "vprompt-tiny" not in CLIP_ARCHS
    assert CLIP_ARCHS[0] == "tiny"


def test_load_backbone_default_weights_for_tiny() -> None:
    backbone = load_backbone("clip:tiny")
    assert backbone.weights == RANDOM_INIT


def test_protocol_rejects_incomplete_objects(tiny_clip) -> None:
    class HalfBackbone:
        name = "x"
        weights = "none"
        preprocess = Preprocess()

        def fingerprint(self) -> str:
            return ""

    assert not isinstance(HalfBackbone(), ImageTextBackbone)
    assert isinstance(tiny_clip, ImageTextBackbone)


# ----------------------------------------------------------------- every clip name


def test_clip_family_lists_every_open_clip_config() -> None:
    assert len(CLIP_ARCHS) == len(set(CLIP_ARCHS))
    assert set(CLIP_ARCHS) == {*TINY_ARCHS, *open_clip.list_models()} - set(TINY_ARCHS.values())
    assert len(CLIP_ARCHS) > 100


def test_list_models_rows() -> None:
    rows = list_models()
    names = [r["name"] for r in rows]
    assert len(names) == len(set(names))
    assert {f"clip:{a}" for a in CLIP_ARCHS} <= set(names)
    by_name = {r["name"]: r for r in rows}
    assert by_name["clip:tiny"]["tiny"] is True
    assert by_name["clip:tiny"]["default_weights"] == RANDOM_INIT
    b16 = by_name["clip:ViT-B-16"]
    assert b16 == {
        "name": "clip:ViT-B-16",
        "family": "clip",
        "arch": "ViT-B-16",
        "tags": open_clip.list_pretrained_tags_by_model("ViT-B-16"),
        "default_weights": "openai",
        "tiny": False,
    }
    json.dumps(rows)  # what `vprompt models --json` prints must serialize


def _arch_param(arch: str):
    cfg = _model_cfg(arch)
    marks = []
    if "hf_model_name" in cfg["text_cfg"]:
        marks.append(
            pytest.mark.skip(
                reason=f"text tower is the Hugging Face model {cfg['text_cfg']['hf_model_name']!r}"
                ", whose config needs a hub download"
            )
        )
    elif "timm_model_name" in cfg["vision_cfg"]:
        marks.append(pytest.mark.slow)  # timm towers take up to ~1.5 s each, even on meta
    return pytest.param(arch, marks=marks, id=arch)


@pytest.mark.parametrize("arch", [pytest.param(a, id=a) for a in CLIP_ARCHS])
def test_clip_name_resolves_with_open_clip_tags(arch: str) -> None:
    family, resolved = split_name(f"clip:{arch}")
    assert family is CLIP_FAMILY
    assert resolved == arch
    tags = CLIP_FAMILY.list_tags(arch)
    assert tags == open_clip.list_pretrained_tags_by_model(_open_clip_name(arch))
    default = CLIP_FAMILY.default_weights(arch)
    if tags:
        assert default == ("openai" if "openai" in tags else tags[0])
    else:
        assert default == RANDOM_INIT


@pytest.mark.parametrize("arch", [_arch_param(a) for a in CLIP_ARCHS])
def test_clip_arch_constructs(arch: str) -> None:
    """Every architecture builds (on the meta device: no memory, no init cost) and wraps."""
    cfg = _model_cfg(arch)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with torch.device("meta"):
            model = open_clip.create_model(
                _open_clip_name(arch), device="meta", pretrained_text=False, pretrained_image=False
            )
    finally:
        logging.disable(previous)
    assert next(model.parameters()).is_meta
    pre = dict(model.visual.preprocess_cfg)
    assert pre.pop("mode") == "RGB"
    preprocess = Preprocess.from_dict(pre)
    image_size = cfg["vision_cfg"].get("image_size", 224)
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    assert preprocess.size == tuple(image_size)

    backbone = ClipBackbone(
        model=model,
        tokenizer=SimpleTokenizer(context_length=cfg["text_cfg"].get("context_length", 77)),
        name=f"clip:{arch}",
        weights=RANDOM_INIT,
        preprocess=preprocess,
    )
    assert backbone.embed_dim == cfg["embed_dim"]
    if "multimodal_cfg" in cfg:  # CoCa: no prompt seam, zero-shot only
        assert backbone._seam_problem is not None
        assert not backbone.truncatable
    else:
        assert backbone._seam_problem is None
        assert backbone.text_width == cfg["text_cfg"].get("width", 512)
        # Truncation is only safe for a causal tower pooled at the EOT token.
        causal = not cfg["text_cfg"].get("no_causal_mask", False)
        pooled_at_eot = cfg["text_cfg"].get("pool_type", "argmax") in ("argmax", "eos")
        assert backbone.truncatable is (causal and pooled_at_eot)
    if backbone.is_vit:
        blocks = backbone.vision_blocks
        assert len(blocks) > 0
        if "timm_model_name" not in cfg["vision_cfg"]:
            assert len(blocks) == cfg["vision_cfg"]["layers"]
    else:  # CNN towers (ResNet, ConvNeXt, FastViT, Swin)
        assert not hasattr(getattr(model.visual, "transformer", None), "resblocks")
        with pytest.raises(WeightsError, match=re.escape(f"clip:{arch}")):
            _ = backbone.vision_blocks


# ------------------------------------------------------------------- unknown names


def test_wrong_case_suggests_the_registered_name() -> None:
    with pytest.raises(UnknownNameError, match=r"did you mean 'clip:ViT-B-16'"):
        load_backbone("clip:vit-b-16")


def test_abbreviation_suggests_the_full_name() -> None:
    with pytest.raises(UnknownNameError, match=r"'clip:ViT-B-16'"):
        split_name("clip:b16")


def test_unknown_family() -> None:
    with pytest.raises(UnknownNameError, match=r"unknown backbone family 'foo'.*clip"):
        load_backbone("foo:ViT-B-16")


def test_family_is_case_insensitive() -> None:
    assert split_name("CLIP:tiny") == (CLIP_FAMILY, "tiny")


def test_name_without_colon() -> None:
    with pytest.raises(UnknownNameError, match=r"FAMILY:ARCH.*did you mean 'clip:ViT-B-16'"):
        load_backbone("ViT-B-16")


def test_unknown_name_error_is_a_key_error_with_a_plain_message() -> None:
    with pytest.raises(KeyError) as info:
        split_name("clip:nope-nothing-like-it")
    assert str(info.value).startswith("unknown model 'clip:nope-nothing-like-it'")


def test_unknown_weight_tag_suggests_the_close_tag() -> None:
    with pytest.raises(WeightsError, match=r"unknown tag 'opena'; did you mean 'openai'") as info:
        load_backbone("clip:ViT-B-16", "opena")
    assert "laion2b_s34b_b88k" in str(info.value)  # lists the real tags


def test_tiny_has_no_tags() -> None:
    with pytest.raises(WeightsError, match=r"unknown tag 'openai'.*none registered"):
        load_backbone("clip:tiny", "openai")


def test_nonexistent_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "weights.safetensors"
    with pytest.raises(WeightsError, match=r"no such file or folder") as info:
        load_backbone("clip:tiny", str(missing))
    assert str(missing) in str(info.value)


# ------------------------------------------------------------------------ Registry


def test_registry_registers_and_gets() -> None:
    reg: Registry[int] = Registry("widget")
    assert reg.register("alpha", 1) == 1
    reg.register("beta-2_x.y", 2)
    assert reg.get("alpha") == 1
    assert "alpha" in reg
    assert "gamma" not in reg
    assert len(reg) == 2
    assert list(reg) == reg.names() == ["alpha", "beta-2_x.y"]


def test_registry_refuses_duplicates() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("alpha", 1)
    with pytest.raises(ValueError, match="widget 'alpha' is already registered"):
        reg.register("alpha", 2)
    assert reg.get("alpha") == 1


@pytest.mark.parametrize("bad", ["", "Alpha", "a b", "-alpha", "_alpha", "a:b", "a/b", "é"])
def test_registry_refuses_bad_names(bad: str) -> None:
    reg: Registry[int] = Registry("widget")
    with pytest.raises(ValueError, match="lower-case"):
        reg.register(bad, 1)
    assert len(reg) == 0


def test_registry_unknown_name_suggests() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("zeroshot", 1)
    reg.register("coop", 2)
    with pytest.raises(
        UnknownNameError, match=r"unknown widget 'zeroshto'; did you mean 'zeroshot'"
    ):
        reg.get("zeroshto")
    with pytest.raises(UnknownNameError, match=r"known: coop, zeroshot"):
        reg.get("qqqqqq")


def test_families_refuse_a_second_clip() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_family(CLIP_FAMILY)
    assert FAMILIES.get("clip") is CLIP_FAMILY


def test_close_matches() -> None:
    names = ["ViT-B-16", "ViT-B-32", "RN50", "ViT-L-14"]
    assert close_matches("vit-b-16", names)[0] == "ViT-B-16"
    assert close_matches("b-32", names)[0] == "ViT-B-32"
    assert close_matches("zzzz", names) == []
    assert len(close_matches("vit", names)) <= 3


# ------------------------------------------------------------------- preprocessing


def test_backbone_preprocess_is_what_open_clip_attaches(tiny_clip) -> None:
    cfg = dict(tiny_clip.model.visual.preprocess_cfg)
    cfg.pop("mode")
    assert tiny_clip.preprocess == Preprocess.from_dict(cfg)
    assert tiny_clip.preprocess == Preprocess(size=(32, 32))


def test_backbone_transform_equals_open_clip(tiny_clip, photos_dir: Path) -> None:
    reference = image_transform_v2(
        PreprocessCfg(**tiny_clip.model.visual.preprocess_cfg), is_train=False
    )
    for path in sorted(photos_dir.glob("*.png")):
        image = Image.open(path)
        assert torch.equal(tiny_clip.transform(image), reference(image)), path.name


@pytest.fixture(scope="module")
def photos(photos_dir: Path) -> dict[str, Image.Image]:
    """Square, landscape and portrait photos, plus a grayscale and an RGBA one."""
    out = {}
    for path in sorted(photos_dir.glob("*.png")):
        image = Image.open(path).convert("RGB")
        # Smaller copies keep the test fast; sizes stay odd-shaped and above 224 on one side.
        out[path.stem] = image.resize((image.width * 3 // 5, image.height * 3 // 5))
    out["rocket-portrait"] = out["rocket"].transpose(Image.Transpose.ROTATE_90)
    out["chelsea-portrait"] = out["chelsea"].transpose(Image.Transpose.TRANSPOSE)
    out["coffee-gray"] = out["coffee"].convert("L")
    out["astronaut-rgba"] = out["astronaut"].convert("RGBA")
    assert out["rocket-portrait"].height > out["rocket-portrait"].width
    assert out["coffee"].width > out["coffee"].height
    return out


def _open_clip_eval(pre: Preprocess):
    size = pre.size[0] if pre.size[0] == pre.size[1] else pre.size
    return image_transform(
        size,
        is_train=False,
        mean=pre.mean,
        std=pre.std,
        resize_mode=pre.resize_mode,
        interpolation=pre.interpolation,
        fill_color=pre.fill_color,
    )


PREPROCESS_CASES = {
    "shortest-square": Preprocess(size=(224, 224)),
    "shortest-small": Preprocess(size=(32, 32)),
    "squash": Preprocess(size=(224, 224), resize_mode="squash"),
    "squash-bilinear": Preprocess(
        size=(224, 224),
        resize_mode="squash",
        interpolation="bilinear",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    ),
    "longest": Preprocess(size=(224, 224), resize_mode="longest"),
    "longest-fill": Preprocess(size=(96, 96), resize_mode="longest", fill_color=128),
    # open_clip's shortest-edge resize for non-square targets is always bicubic.
    "shortest-non-square": Preprocess(size=(96, 160)),
    "longest-non-square": Preprocess(size=(160, 96), resize_mode="longest"),
    "squash-non-square": Preprocess(size=(64, 128), resize_mode="squash"),
}


@pytest.mark.parametrize("case", list(PREPROCESS_CASES))
def test_eval_transform_equals_open_clip(case: str, photos: dict[str, Image.Image]) -> None:
    pre = PREPROCESS_CASES[case]
    ours, theirs = build_eval_transform(pre), _open_clip_eval(pre)
    for name, image in photos.items():
        out = ours(image)
        assert out.shape == (3, *pre.size), name
        assert out.dtype == torch.float32
        assert torch.equal(out, theirs(image)), f"{case} on {name}"


def test_longest_pads_with_fill(photos: dict[str, Image.Image]) -> None:
    pre = Preprocess(size=(64, 64), resize_mode="longest", fill_color=255, mean=(0.0,) * 3)
    pre = Preprocess.from_dict({**pre.to_dict(), "std": [1.0, 1.0, 1.0]})
    out = build_eval_transform(pre)(photos["coffee"])  # landscape: pads top and bottom
    assert torch.equal(out[:, 0], torch.ones(3, 64))
    assert torch.equal(out[:, -1], torch.ones(3, 64))
    assert not torch.equal(out[:, 32], torch.ones(3, 64))


def test_resize_size_recipe(photos: dict[str, Image.Image]) -> None:
    """torchvision's resize-256-then-crop-224 recipe."""
    from torchvision import transforms as T

    pre = Preprocess(size=(224, 224), resize_size=256, interpolation="bilinear")
    reference = T.Compose(
        [
            T.Resize(256, interpolation=T.InterpolationMode.BILINEAR),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize(pre.mean, pre.std),
        ]
    )
    for image in (photos["coffee"], photos["rocket-portrait"]):
        assert torch.equal(build_eval_transform(pre)(image), reference(image))


def test_tag_preprocess_configs_convert() -> None:
    """Every preprocessing that an open_clip weight tag carries converts to a Preprocess."""
    seen = set()
    for arch, tag in open_clip.list_pretrained():
        cfg = merge_preprocess_dict(
            asdict(PreprocessCfg()), open_clip.get_pretrained_cfg(arch, tag)
        )
        cfg.pop("mode")
        pre = Preprocess.from_dict(cfg)
        assert pre.interpolation == cfg["interpolation"]
        assert pre.resize_mode == cfg["resize_mode"]
        assert pre.mean == tuple(cfg["mean"])
        seen.add(pre)
    assert len(seen) >= 5


def test_preprocess_round_trip() -> None:
    pre = Preprocess(
        size=(96, 160),
        mean=(0.1, 0.2, 0.3),
        std=(0.4, 0.5, 0.6),
        interpolation="bilinear",
        resize_mode="longest",
        resize_size=None,
        fill_color=7,
    )
    data = pre.to_dict()
    assert data["size"] == [96, 160]
    assert Preprocess.from_dict(data) == pre
    assert Preprocess.from_dict(json.loads(json.dumps(data))) == pre
    with_resize = Preprocess(size=(224, 224), resize_size=256)
    assert Preprocess.from_dict(json.loads(json.dumps(with_resize.to_dict()))) == with_resize


def test_preprocess_from_dict_shorthands() -> None:
    pre = Preprocess.from_dict({"size": 64, "mean": 0.5, "std": [1, 1, 1]})
    assert pre.size == (64, 64)
    assert pre.mean == (0.5, 0.5, 0.5)
    assert pre.std == (1.0, 1.0, 1.0)
    assert Preprocess.from_dict({}) == Preprocess()


@pytest.mark.parametrize(
    "data",
    [
        {"size": [224]},
        {"size": [0, 224]},
        {"size": [224, -1]},
        {"size": "224"},
        {"size": 224.5},
        {"size": [224, None]},
        {"size": True},
        {"mean": [0.5, 0.5]},
        {"mean": None},
        {"mean": "abc"},
        {"std": [0.5, 0.0, 0.5]},
        {"std": [0.5, -1.0, 0.5]},
        {"interpolation": "lanczos"},
        {"resize_mode": "crop"},
        {"resize_size": 0},
        {"resize_size": -256},
        {"resize_size": "256"},
        {"fill_color": "red"},
        {"colour": "rgb"},
    ],
    ids=repr,
)
def test_preprocess_invalid_values(data: dict) -> None:
    with pytest.raises(ConfigError):
        Preprocess.from_dict(data)


def test_preprocess_constructor_validates() -> None:
    with pytest.raises(ConfigError, match="size"):
        Preprocess(size=224)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown preprocess keys"):
        Preprocess.from_dict({"size": 224, "crop_pct": 0.9})


@pytest.mark.parametrize(
    "name", ["clip:tiny", "torchvision:tiny", "timm:tiny-vit", "sam:tiny", "seggpt:tiny"]
)
def test_every_family_returns_a_frozen_model(name: str) -> None:
    """load_backbone's typed result: every family's model carries its provenance and is frozen."""
    from vprompt.backbones.protocols import Backbone, FrozenModel, PromptableSegmenter

    model = load_backbone(name, "none")
    assert isinstance(model, FrozenModel)
    assert model.name == name
    assert model.weights == "none"
    assert all(not p.requires_grad for p in model.parameters())
    assert isinstance(model, Backbone) != name.startswith(("sam:", "seggpt:"))
    if name.startswith("sam:"):
        assert isinstance(model, PromptableSegmenter)


def _openai_release(state: dict, *, markers: bool) -> dict:
    """A state dict laid out as OpenAI's CLIP releases are: linear / conv / attention weights
    and the projections in float16, LayerNorms and embeddings in float32, and (JIT archives'
    state dicts) the input_resolution / context_length / vocab_size entries."""
    out = {}
    for key, value in state.items():
        half = value.ndim >= 2 and (key.endswith(("weight", "in_proj_weight")) or "proj" in key)
        half = half and "ln_" not in key and "embedding" not in key
        out[key] = value.half() if half else value.clone()
    if markers:
        out.update(
            input_resolution=torch.tensor(32),
            context_length=torch.tensor(77),
            vocab_size=torch.tensor(49408),
        )
    return out


@pytest.mark.parametrize("markers", [True, False])
def test_openai_format_state_dict_builds_quickgelu(tmp_path: Path, markers: bool) -> None:
    """OpenAI's models were trained with QuickGELU; open_clip's plain configs use GELU, so a
    file in OpenAI's format must select QuickGELU (features differ by ~1% otherwise)."""
    import open_clip

    gelu = load_backbone("clip:tiny", "none")
    path = tmp_path / "openai.pt"
    torch.save(_openai_release(gelu.model.state_dict(), markers=markers), path)
    loaded = load_backbone("clip:tiny", str(path))
    acts = [m for m in loaded.model.modules() if isinstance(m, open_clip.transformer.QuickGELU)]
    assert acts, "an OpenAI-format file must build QuickGELU activations"
    reference = open_clip.create_model("vprompt-tiny", force_quick_gelu=True)
    reference.load_state_dict(
        {k: v.float() for k, v in gelu.model.state_dict().items()}, strict=True
    )
    reference.eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.encode_image(images), reference.encode_image(images), atol=1e-3, rtol=1e-3
        )
    # An open_clip-format file (float32 throughout, no markers) keeps the arch's GELU.
    plain = tmp_path / "plain.pt"
    torch.save(gelu.model.state_dict(), plain)
    kept = load_backbone("clip:tiny", str(plain))
    assert not any(isinstance(m, open_clip.transformer.QuickGELU) for m in kept.model.modules())


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_archive_is_refused_with_what_to_do(tmp_path: Path) -> None:
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    path = tmp_path / "ViT-B-16.pt"
    scripted.save(str(path))
    with pytest.raises(WeightsError, match=r"TorchScript.*--weights openai"):
        load_backbone("clip:tiny", str(path))
