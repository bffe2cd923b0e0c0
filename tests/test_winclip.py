"""WinCLIP / WinCLIP+: prompt ensemble, window embeddings, harmonic aggregation, fusion,
few-shot scores and config checks, each against a plain computation written here."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from vprompt.anomaly.base import ANOMALY_METHODS
from vprompt.anomaly.winclip import WinClip, WinClipConfig, harmonic_aggregation
from vprompt.errors import ConfigError

# The paper's compositional prompt ensemble (WinCLIP supplementary, as anomalib lists it).
STATES_NORMAL = [
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
]
STATES_ANOMALOUS = ["damaged {}", "{} with flaw", "{} with defect", "{} with damage"]
PAPER_TEMPLATES = [
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
]
GRID = 4  # clip:tiny: 32 px input, 8 px patches
TEMP = 0.07


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- independent computations
_TEXT: dict[tuple[str, bool], torch.Tensor] = {}


def ref_text(backbone, name: str, *, unit: bool = False) -> torch.Tensor:
    if (name, unit) not in _TEXT:
        _TEXT[name, unit] = _ref_text(backbone, name, unit=unit)
    return _TEXT[name, unit]


def _ref_text(backbone, name: str, *, unit: bool) -> torch.Tensor:
    out = []
    for states in (STATES_NORMAL, STATES_ANOMALOUS):
        prompts = []
        for state in states:
            for template in PAPER_TEMPLATES:
                prompts.append(template.replace("{}", state.replace("{}", name)))
        with torch.no_grad():
            feats = backbone.model.encode_text(backbone.tokenize(prompts))
        out.append((F.normalize(feats, dim=-1) if unit else feats).mean(dim=0))
    return torch.stack(out)


def stem(backbone, pixels: torch.Tensor) -> torch.Tensor:
    """open_clip's vision stem by hand: B x (1 + N) x D tokens with positions, before ln_pre."""
    v = backbone.model.visual
    x = v.conv1(pixels).flatten(2).transpose(1, 2)
    cls = v.class_embedding.expand(x.shape[0], 1, -1)
    return torch.cat([cls, x], dim=1) + v.positional_embedding


def run_vit(backbone, tokens: torch.Tensor) -> torch.Tensor:
    """Tokens before ln_pre → B x L x D after open_clip's own transformer."""
    v = backbone.model.visual
    return v.transformer(v.ln_pre(tokens))


def pooled(backbone, out: torch.Tensor) -> torch.Tensor:
    v = backbone.model.visual
    return v.ln_post(out[:, 0]) @ v.proj


def ref_window(backbone, pixels: torch.Tensor, top: int, left: int, k: int) -> torch.Tensor:
    """B x E: the class token plus the k x k patches at (top, left) only."""
    ids = [0] + [1 + (top + i) * GRID + (left + j) for i in range(k) for j in range(k)]
    with torch.no_grad():
        return pooled(backbone, run_vit(backbone, stem(backbone, pixels)[:, ids]))


def ref_patches(backbone, pixels: torch.Tensor) -> torch.Tensor:
    v = backbone.model.visual
    with torch.no_grad():
        return v.ln_post(run_vit(backbone, stem(backbone, pixels))[:, 1:]) @ v.proj


def prob(emb: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    cos = F.cosine_similarity(emb[:, None], text[None], dim=-1)
    return torch.softmax(cos / TEMP, dim=-1)[:, 1]


def distance(emb: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    cos = F.cosine_similarity(emb[:, None], refs[None], dim=-1)
    return (1 - cos.max(dim=1).values) / 2


def spread(window_scores: dict[tuple[int, int], torch.Tensor], k: int) -> torch.Tensor:
    """B x g x g: each patch's harmonic mean over the windows covering it, by loops."""
    b = next(iter(window_scores.values())).shape[0]
    out = torch.zeros(b, GRID, GRID)
    for r in range(GRID):
        for c in range(GRID):
            cover = [
                s
                for (t, left), s in window_scores.items()
                if t <= r < t + k and left <= c < left + k
            ]
            out[:, r, c] = len(cover) / sum(1 / s for s in cover)
    return out


def per_window(backbone, pixels: torch.Tensor, k: int, fn) -> dict[tuple[int, int], torch.Tensor]:
    n = GRID - k + 1
    return {(t, c): fn(ref_window(backbone, pixels, t, c, k)) for t in range(n) for c in range(n)}


# ---------------------------------------------------------------- tests
def test_registered_and_declared(tiny_clip):
    assert ANOMALY_METHODS.get("winclip") is WinClip
    caps = WinClip.capabilities
    assert caps.family == "clip"
    assert caps.zero_shot
    assert caps.few_shot
    assert caps.uses_object_name
    assert WinClipConfig().scales == (2, 3)
    assert WinClipConfig().temperature == 0.07
    method = WinClip(tiny_clip)
    assert method.grid == GRID
    assert method.shots == 0
    assert method.fitted


def test_text_ensemble_of_unit_embeddings(tiny_clip):
    method = WinClip(tiny_clip, WinClipConfig(normalize_prompts=True), object_name="screw")
    text = method.text_embeddings()
    assert text.shape == (2, tiny_clip.embed_dim)
    torch.testing.assert_close(text, ref_text(tiny_clip, "screw", unit=True), rtol=1e-5, atol=1e-6)


def test_raw_prompt_average_as_anomalib_by_default(tiny_clip):
    method = WinClip(tiny_clip, object_name="screw")
    want = ref_text(tiny_clip, "screw")
    torch.testing.assert_close(method.text_embeddings(), want, rtol=1e-5, atol=1e-6)


def test_object_name_changes_prompts(tiny_clip, images):
    method = WinClip(tiny_clip, object_name="bottle")
    before = method.text_embeddings().clone()
    out_before = method.score(images[:2])
    method.set_object_name("metal nut")
    after = method.text_embeddings()
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, ref_text(tiny_clip, "metal nut"), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out_before.image_scores, method.score(images[:2]).image_scores)
    method.set_object_name("bottle")
    torch.testing.assert_close(method.text_embeddings(), before)


def test_window_embedding_is_vit_on_token_subset(tiny_clip, images):
    method = WinClip(tiny_clip)
    with torch.no_grad():
        feats = method.encode(images[:2])
    # Scale 2 on a 4 x 4 grid: 3 x 3 windows, row-major; (1, 2) is window 5.
    torch.testing.assert_close(
        feats.windows[0][:, 5], ref_window(tiny_clip, images[:2], 1, 2, 2), rtol=1e-4, atol=1e-5
    )
    # Scale 3: 2 x 2 windows; (1, 0) is window 2.
    torch.testing.assert_close(
        feats.windows[1][:, 2], ref_window(tiny_clip, images[:2], 1, 0, 3), rtol=1e-4, atol=1e-5
    )
    with torch.no_grad():
        torch.testing.assert_close(
            feats.image, tiny_clip.encode_image(images[:2]), rtol=1e-4, atol=1e-5
        )
    torch.testing.assert_close(
        feats.patches, ref_patches(tiny_clip, images[:2]), rtol=1e-4, atol=1e-5
    )


def test_harmonic_aggregation_small_case():
    # A 3 x 3 grid with four 2 x 2 windows (anomalib's worked example).
    windows = torch.tensor([[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]])
    got = harmonic_aggregation(torch.tensor([[1.0, 0.75, 0.5, 0.25]]), windows, 9)
    want = torch.tensor([[1.0, 0.8571, 0.75, 0.6667, 0.48, 0.375, 0.5, 0.3333, 0.25]])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    zero = harmonic_aggregation(torch.tensor([[0.0, 0.5, 0.5, 0.5]]), windows, 9)
    assert zero[0, 0] == 0
    assert zero[0, 4] == 0
    assert zero[0, 8] == 0.5


def test_zero_shot_map_matches_plain_loop(tiny_clip, images):
    method = WinClip(tiny_clip, object_name="cable")
    pixels = images[:2]
    text = ref_text(tiny_clip, "cable")
    with torch.no_grad():
        image = prob(tiny_clip.encode_image(pixels), text)
    maps = [image[:, None, None].expand(-1, GRID, GRID)]
    for k in (2, 3):
        maps.append(spread(per_window(tiny_clip, pixels, k, lambda e: prob(e, text)), k))
    fused = 3 / sum(1 / m for m in maps)
    out = method.score(pixels)
    torch.testing.assert_close(out.image_scores, image, rtol=1e-4, atol=1e-5)
    want = F.interpolate(fused[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    assert out.maps.shape == (2, 32, 32)
    torch.testing.assert_close(out.maps, want, rtol=1e-4, atol=1e-5)


def test_few_shot_matches_independent_computation(tiny_clip, images):
    method = WinClip(tiny_clip, object_name="tile")
    refs, test = images[:3], images[3:5]
    method.fit_normal([refs[:2], refs[2:]])
    assert method.shots == 3
    assert method.fitted
    assert method.ref_patches.shape == (3 * GRID * GRID, tiny_clip.embed_dim)
    assert method.ref_windows.shape == (3 * (9 + 4), tiny_clip.embed_dim)

    text = ref_text(tiny_clip, "tile")
    ref_p = ref_patches(tiny_clip, refs).reshape(-1, tiny_clip.embed_dim)
    few = [
        torch.stack([distance(p, ref_p) for p in ref_patches(tiny_clip, test)]).reshape(
            -1, GRID, GRID
        )
    ]
    zs = []
    for k in (2, 3):
        bank = torch.cat(list(per_window(tiny_clip, refs, k, lambda e: e).values()))
        few.append(spread(per_window(tiny_clip, test, k, lambda e, b=bank: distance(e, b)), k))
        zs.append(spread(per_window(tiny_clip, test, k, lambda e: prob(e, text)), k))
    few_map = sum(few) / 3
    with torch.no_grad():
        image = prob(tiny_clip.encode_image(test), text)
    zs_map = 3 / (1 / image[:, None, None] + sum(1 / m for m in zs))
    want_image = (image + few_map.flatten(1).max(dim=1).values) / 2
    want_map = (zs_map + few_map) / 2

    out = method.score(test)
    torch.testing.assert_close(out.image_scores, want_image, rtol=1e-4, atol=1e-5)
    want = F.interpolate(want_map[:, None], size=(32, 32), mode="bilinear", align_corners=False)[
        :, 0
    ]
    torch.testing.assert_close(out.maps, want, rtol=1e-4, atol=1e-5)

    # A reference scores (near) zero distance against itself.
    with torch.no_grad():
        assert float(method.few_shot_map(method.encode(refs[:1])).max()) < 1e-5


def test_state_round_trip_and_zero_shot_without_references(tiny_clip, images):
    fitted = WinClip(tiny_clip)
    fitted.fit_normal([images[:2]])
    fresh = WinClip(tiny_clip)
    zero = fresh.score(images[2:4])
    fresh.load_state(fitted.state())
    assert fresh.shots == 2
    torch.testing.assert_close(fresh.score(images[2:4]).maps, fitted.score(images[2:4]).maps)
    assert not torch.allclose(fresh.score(images[2:4]).maps, zero.maps)
    with pytest.raises(ConfigError, match="reference"):
        fresh.fit_normal([])


def test_batch_independence_and_no_grad(tiny_clip, images):
    method = WinClip(tiny_clip, WinClipConfig(window_batch=5))
    method.fit_normal([images[:1]])
    together = method.score(images[1:3])
    for i in range(2):
        alone = method.score(images[1 + i : 2 + i])
        torch.testing.assert_close(
            together.image_scores[i : i + 1], alone.image_scores, rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(together.maps[i : i + 1], alone.maps, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        out = method.score(images[1:3])
    assert out.image_scores.shape == (2,)
    assert torch.isfinite(out.maps).all()


def test_learned_logit_scale_and_scale_one(tiny_clip, images):
    method = WinClip(tiny_clip, WinClipConfig(scales=(1, 3), temperature=None))
    assert method.temperature == pytest.approx(1 / float(tiny_clip.logit_scale))
    out = method.score(images[:1])
    assert out.maps.shape == (1, 32, 32)
    assert torch.isfinite(out.maps).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scales": ()},
        {"scales": (2, 2)},
        {"scales": (0,)},
        {"scales": 2},
        {"scales": "(2, 3)"},
        {"temperature": 0.0},
        {"temperature": True},
        {"image_size": 4},
        {"window_batch": 0},
        {"normalize_prompts": "yes"},
    ],
)
def test_bad_configs_rejected(kwargs):
    with pytest.raises(ConfigError):
        WinClipConfig(**kwargs)


def test_bad_backbones_and_sizes_rejected(tiny_clip):
    with pytest.raises(ConfigError, match="exceed"):
        WinClip(tiny_clip, WinClipConfig(scales=(2, 5)))
    with pytest.raises(ConfigError, match="64"):
        WinClip(tiny_clip, WinClipConfig(image_size=64))
    resnet = types.SimpleNamespace(
        name="clip:RN50",
        tokenize=None,
        encode_text=None,
        logit_scale=None,
        is_vit=False,
        preprocess=tiny_clip.preprocess,
    )
    with pytest.raises(ConfigError, match="not a ViT"):
        WinClip(resnet)
    with pytest.raises(ConfigError, match="CLIP-like"):
        WinClip(types.SimpleNamespace(name="torchvision:tiny", is_vit=True))
