"""PerSAM / PerSAM-F: target features through the model frame, location prior, guidance reaching
the decoder, the cascaded refinement, and the 2-weight fine-tune."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vprompt.errors import ConfigError, PromptError, UnknownNameError
from vprompt.prompts.resize import ResizeLongestSide, ResizeSquare
from vprompt.prompts.spatial import Box, ObjectPrompt, Point, PromptSet
from vprompt.segment import persam as persam_mod
from vprompt.segment.incontext import SEGMENTATION_METHODS
from vprompt.segment.persam import (
    ConceptReference,
    PerSAM,
    PerSAMConfig,
    PerSAMF,
    PerSAMFConfig,
    mask_to_grid,
    personalize,
    target_concept,
)
from vprompt.segment.segmenter import Segmentation, Segmenter, upsample_logits


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) % 256], axis=-1)
    noise = rng.integers(0, 40, size=(h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _mask(w: int, h: int, rows: slice, cols: slice) -> np.ndarray:
    out = np.zeros((h, w), dtype=bool)
    out[rows, cols] = True
    return out


@pytest.fixture(scope="module")
def seg() -> Segmenter:
    return Segmenter.load("sam:tiny", "none", device="cpu")


@pytest.fixture(scope="module")
def seg2() -> Segmenter:
    return Segmenter.load("sam:tiny-sam2", "none", device="cpu")


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x / torch.linalg.vector_norm(x, dim=0, keepdim=True)


# --- the reference mask on the embedding grid ---


def test_mask_to_grid_follows_the_padded_frame():
    frame = ResizeLongestSide(target=256, low_res=64)  # 16 x 16 grid of 16-pixel cells
    # 512 x 256 image: scale 0.5, resized to 256 x 128 in the top half of the square.
    exact = _mask(512, 256, slice(64, 192), slice(96, 256))  # frame rows 32:96, cols 48:128
    expected = np.zeros((16, 16), dtype=np.float32)
    expected[2:6, 3:8] = 1
    np.testing.assert_allclose(mask_to_grid(exact, frame, (16, 16)), expected, atol=1e-6)
    # A full mask covers the image rows only; the padding rows stay background.
    full = mask_to_grid(np.ones((256, 512), bool), frame, (16, 16))
    np.testing.assert_allclose(full[:8], 1.0, atol=1e-6)
    np.testing.assert_allclose(full[8:], 0.0)
    # Partial cells get their covered fraction: 8 image rows = 4 frame rows = 1/4 cell.
    strip = mask_to_grid(_mask(512, 256, slice(0, 8), slice(0, 512)), frame, (16, 16))
    np.testing.assert_allclose(strip[0], 0.25, atol=1e-6)
    np.testing.assert_allclose(strip[1:], 0.0)


def test_mask_to_grid_follows_a_stretched_frame():
    frame = ResizeSquare(target=256, low_res=64)  # SAM 2: no padding
    grid = mask_to_grid(np.ones((512, 128), bool), frame, (16, 16))
    np.testing.assert_allclose(grid, 1.0, atol=1e-6)
    left = mask_to_grid(_mask(128, 512, slice(0, 512), slice(0, 64)), frame, (16, 16))
    np.testing.assert_allclose(left[:, :8], 1.0, atol=1e-6)
    np.testing.assert_allclose(left[:, 8:], 0.0, atol=1e-6)


def test_target_feature_is_the_masked_mean(seg):
    image = _photo(256, 256)  # the model's input size: one cell = 16 x 16 pixels
    mask = _mask(256, 256, slice(32, 96), slice(48, 128))  # cells rows 2:6, cols 3:8
    concept = target_concept(seg, [(image, mask)])
    emb = seg.embed_image(image).parts["embeddings"][0].double()
    mean = emb[:, 2:6, 3:8].mean(dim=(1, 2))
    np.testing.assert_allclose(concept.embedding.double(), mean, rtol=1e-5, atol=0)
    np.testing.assert_allclose(concept.feature.double(), _unit(mean), rtol=1e-5, atol=1e-7)
    assert float(concept.feature.norm()) == pytest.approx(1.0, abs=1e-6)
    assert concept.num_references == 1
    # Cells the mask covers in part count with the covered fraction (here half of column 8).
    wider = mask | _mask(256, 256, slice(32, 96), slice(128, 136))
    partial = target_concept(seg, [(image, wider)])
    weighted = (emb[:, 2:6, 3:8].sum(dim=(1, 2)) + 0.5 * emb[:, 2:6, 8].sum(dim=1)) / 22
    np.testing.assert_allclose(partial.embedding.double(), weighted, rtol=1e-5, atol=0)


def test_several_references_average(seg2):
    ref_a = (_photo(200, 150, 1), _mask(200, 150, slice(20, 90), slice(40, 150)))
    ref_b = (_photo(160, 240, 2), _mask(160, 240, slice(100, 200), slice(10, 80)))
    a = target_concept(seg2, [ref_a])
    b = target_concept(seg2, [ref_b])
    both = target_concept(seg2, [ConceptReference(*ref_a), ref_b])
    assert both.num_references == 2
    expected = _unit((a.feature.double() + b.feature.double()) / 2)
    np.testing.assert_allclose(both.feature.double(), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(both.embedding, (a.embedding + b.embedding) / 2, rtol=1e-5)
    assert not torch.allclose(both.feature, a.feature, atol=1e-4)


# --- location prior and guidance ---


def test_similarity_and_points_at_its_extremes(seg):
    ref = (_photo(256, 256), _mask(256, 256, slice(32, 96), slice(48, 128)))
    target = _photo(300, 200, seed=3)  # non-square: the frame pads below the image
    model = PerSAM(seg).fit([ref])
    result = model.predict(target)

    emb = seg.embed_image(target)
    feats = _unit(emb.parts["embeddings"][0])  # C x h x w
    cos = torch.einsum("c,chw->hw", _unit(model.concept.feature), feats).float()
    plan = seg.backbone.frame.postprocess_sizes((300, 200))
    low = F.interpolate(cos[None, None], size=plan.low_res, mode="bilinear", align_corners=False)
    expected = upsample_logits(low, plan)[0, 0].numpy()
    assert result.similarity.shape == (200, 300)
    assert result.similarity.dtype == np.float32
    np.testing.assert_allclose(result.similarity, expected, atol=1e-6)

    i, j = np.unravel_index(np.argmax(expected), expected.shape)
    k, m = np.unravel_index(np.argmin(expected), expected.shape)
    pos, neg = result.points
    assert (pos.x, pos.y, pos.positive) == (j, i, True)  # (col, row), as the reference sends
    assert (neg.x, neg.y, neg.positive) == (m, k, False)
    assert result.mask.shape == (200, 300)
    assert result.mask.dtype == np.bool_
    assert isinstance(result.score, float)


def _record_backbone(monkeypatch: pytest.MonkeyPatch, segmenter: Segmenter) -> list[dict]:
    calls: list[dict] = []
    original = segmenter.backbone.decode

    def spy(parts, arrays, **kwargs):  # type: ignore[no-untyped-def]
        logits, iou = original(parts, arrays, **kwargs)
        calls.append({"arrays": arrays, **kwargs, "logits": logits, "iou": iou})
        return logits, iou

    monkeypatch.setattr(segmenter.backbone, "decode", spy)
    return calls


def test_guidance_reaches_the_decoder_and_refinement_cascades(seg, monkeypatch):
    ref = (_photo(256, 256), _mask(256, 256, slice(32, 96), slice(48, 128)))
    target = _photo(300, 200, seed=3)
    model = PerSAM(seg).fit([ref])
    calls = _record_backbone(monkeypatch, seg)
    result = model.predict(target)
    assert len(calls) == 3
    first, refine1, refine2 = calls

    # Target-guided attention: standardised grid similarity through a sigmoid, 1 x 1 x 1 x hw.
    emb = seg.embed_image(target)
    grid = torch.einsum(
        "c,chw->hw", _unit(model.concept.feature), _unit(emb.parts["embeddings"][0])
    ).float()
    full = torch.from_numpy(result.similarity)
    attn = torch.sigmoid((grid - full.mean()) / full.std()).reshape(1, 1, 1, -1)
    assert first["attention_similarity"].shape == (1, 1, 1, 16 * 16)
    torch.testing.assert_close(first["attention_similarity"], attn, atol=1e-5, rtol=1e-5)
    # Target-semantic prompt: the mean target embedding, 1 x 1 x 1 x C.
    assert first["target_embedding"].shape == (1, 1, 1, 32)
    torch.testing.assert_close(first["target_embedding"][0, 0, 0], model.concept.embedding)
    assert first["multimask"] is False
    np.testing.assert_array_equal(first["arrays"]["labels"], [[1, 0]])
    assert first["arrays"]["boxes"] is None
    assert first["arrays"]["masks"] is None

    # Refinement 1: previous logits, no box. Refinement 2: best logits + the mask's box.
    for call in (refine1, refine2):
        assert call["multimask"] is True
        assert call.get("attention_similarity") is None
        assert call.get("target_embedding") is None
    np.testing.assert_array_equal(refine1["arrays"]["masks"][0, 0], first["logits"][0, 0].numpy())
    assert refine1["arrays"]["boxes"] is None
    best = int(refine1["iou"][0].argmax())
    np.testing.assert_array_equal(
        refine2["arrays"]["masks"][0, 0], refine1["logits"][0, best].numpy()
    )
    plan = seg.backbone.frame.postprocess_sizes((300, 200))
    mask1 = (upsample_logits(refine1["logits"][:, best : best + 1], plan)[0, 0] > 0).numpy()
    box = persam_mod._mask_box(mask1)
    if box is None:
        assert refine2["arrays"]["boxes"] is None
    else:
        expected = seg.backbone.frame.apply_boxes([[box.x0, box.y0, box.x1, box.y1]], (300, 200))
        np.testing.assert_allclose(refine2["arrays"]["boxes"], expected, rtol=1e-6)
    final = int(refine2["iou"][0].argmax())
    assert result.score == pytest.approx(float(refine2["iou"][0, final]))


def test_guidance_changes_the_decoder_output(seg2, monkeypatch):
    ref = (_photo(200, 150, 1), _mask(200, 150, slice(20, 90), slice(40, 150)))
    target = _photo(180, 220, seed=4)
    calls = _record_backbone(monkeypatch, seg2)
    PerSAM(seg2, config=PerSAMConfig(refinements=0)).fit([ref]).predict(target)
    PerSAM(seg2, config=PerSAMConfig(refinements=0, guidance=False)).fit([ref]).predict(target)
    with_guidance, without = calls
    assert without.get("attention_similarity") is None
    np.testing.assert_array_equal(with_guidance["arrays"]["points"], without["arrays"]["points"])
    assert not torch.allclose(with_guidance["logits"], without["logits"], rtol=0, atol=1e-7)


def test_mask_box_is_the_references_inclusive_pixel_box():
    """PerSAM-F's refinement box is (x_min, y_min, x_max, y_max) of the mask's pixels."""
    mask = _mask(10, 8, slice(3, 6), slice(2, 7))
    assert persam_mod._mask_box(mask) == Box(2, 3, 6, 5)
    assert persam_mod._mask_box(np.zeros((8, 10), bool)) is None
    assert persam_mod._mask_box(_mask(10, 8, slice(3, 4), slice(2, 7))) is None  # zero-area


# --- PerSAM-F ---

_LOW = 64  # sam:tiny's low-res side


def _region(rows: slice, cols: slice) -> np.ndarray:
    out = np.full((_LOW, _LOW), -8.0, dtype=np.float32)
    out[rows, cols] = 8.0
    return out


def _stub_decode(seg: Segmenter, candidates: np.ndarray, calls: list[dict[str, Any]]) -> Any:
    """A decode returning fixed candidate logits (3 x L x L), the first with the top IoU."""

    def decode(image, prompts, *, multimask=True, attention_similarity=None, target_embedding=None):  # type: ignore[no-untyped-def]
        calls.append({"prompts": prompts, "multimask": multimask})
        k = 3 if multimask else 1
        low = candidates[:k][None].copy()
        plan = seg.backbone.frame.postprocess_sizes(image.image_size)
        full = upsample_logits(torch.from_numpy(low), plan).numpy()
        iou = np.array([[0.9, 0.8, 0.7][:k]], dtype=np.float32)
        return Segmentation(masks=full > 0, logits=low, iou=iou, stability=np.ones_like(iou))

    return decode


# 128 x 128 reference: the whole frame, 2 image pixels per low-res cell.
_REF_MASK = _mask(128, 128, slice(32, 80), slice(16, 64))  # low-res rows 16:40, cols 8:32
_RIGHT = _region(slice(16, 40), slice(8, 32))
_TOO_BIG = _region(slice(4, 60), slice(0, 50))
_TOO_SMALL = _region(slice(20, 28), slice(12, 18))


@pytest.mark.parametrize("right", [0, 1, 2])
def test_persam_f_learns_the_candidate_that_matches(seg, monkeypatch, right):
    wrong = [_TOO_BIG, _TOO_SMALL]
    candidates = np.stack([_RIGHT if k == right else wrong.pop() for k in range(3)])
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(seg, "decode", _stub_decode(seg, candidates, calls))
    ref = (_photo(128, 128, 5), _REF_MASK)
    model = PerSAMF(seg).fit([ref])
    assert len(calls) == 1
    assert calls[0]["multimask"] is True
    assert len(calls[0]["prompts"].objects[0].points) == 1  # positive point only (paper code)
    weights = model.weights
    assert weights.sum() == pytest.approx(1.0, abs=1e-6)
    assert not np.allclose(weights, 1 / 3, atol=1e-2)
    assert int(np.argmax(weights)) == right
    assert len(model.losses) == 1000
    assert model.losses[-1] < model.losses[0] - 0.05
    again = PerSAMF(seg).fit([ref])  # seeded and deterministic
    np.testing.assert_array_equal(again.weights, weights)
    assert again.losses == model.losses


def test_persam_f_refines_with_boxes_and_skips_them_for_empty_masks(seg, monkeypatch):
    ref = (_photo(128, 128, 5), _REF_MASK)
    config = PerSAMFConfig(steps=5)
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(seg, "decode", _stub_decode(seg, np.stack([_RIGHT] * 3), calls))
    model = PerSAMF(seg, config=config).fit([ref])
    result = model.predict(_photo(128, 128, 6))
    first, refine1, refine2 = calls[1:]
    assert first["multimask"] is True
    for call in (refine1, refine2):
        obj = call["prompts"].objects[0]
        assert obj.box == Box(16, 32, 63, 79)  # inclusive pixel indices
        assert obj.logits is not None
    np.testing.assert_allclose(refine1["prompts"].objects[0].logits.array, _RIGHT, atol=1e-5)
    np.testing.assert_array_equal(result.mask, _REF_MASK)
    assert result.score == pytest.approx(0.9)

    calls.clear()
    empty = np.full((3, _LOW, _LOW), -8.0, dtype=np.float32)
    monkeypatch.setattr(seg, "decode", _stub_decode(seg, empty, calls))
    result = model.predict(_photo(128, 128, 6))
    assert [c["prompts"].objects[0].box for c in calls[1:]] == [None, None]
    assert not result.mask.any()


def test_persam_f_end_to_end_leaves_the_backbone_alone(seg2):
    before = {k: v.clone() for k, v in seg2.backbone.state_dict().items()}
    refs = [(_photo(200, 150, 1), _mask(200, 150, slice(20, 90), slice(40, 150)))]
    targets = [_photo(180, 220, seed=4), seg2.embed_image(_photo(150, 150, seed=7))]
    results = personalize(seg2, refs, targets, method="persam-f", config=PerSAMFConfig(steps=20))
    assert [r.mask.shape for r in results] == [(220, 180), (150, 150)]
    assert all(len(r.points) == 1 for r in results)
    after = seg2.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad and p.grad is not None for p in seg2.backbone.parameters())


def test_personalize_one_result_per_target(seg):
    refs = [(_photo(256, 256), _mask(256, 256, slice(32, 96), slice(48, 128)))]
    results = personalize(seg, refs, [_photo(300, 200, 3), _photo(120, 160, 4)])
    assert [r.similarity.shape for r in results] == [(200, 300), (160, 120)]
    assert [len(r.points) for r in results] == [2, 2]
    single = personalize(seg, refs, _photo(120, 160, 4))
    np.testing.assert_array_equal(single[0].mask, results[1].mask)
    on_sam = [
        n for n in SEGMENTATION_METHODS.names() if SEGMENTATION_METHODS.get(n).family == "sam"
    ]
    assert on_sam == ["persam", "persam-f"]


# --- errors ---


def test_bad_references_are_refused(seg):
    image = _photo(64, 48)
    with pytest.raises(PromptError, match="at least one"):
        personalize(seg, [], [image])
    with pytest.raises(PromptError, match="empty"):
        personalize(seg, [(image, np.zeros((48, 64), bool))], [image])
    with pytest.raises(PromptError, match=r"reference 0: mask has shape \(64, 48\)"):
        personalize(seg, [(image, np.ones((64, 48), bool))], [image])
    with pytest.raises(PromptError, match="reference 1"):
        target_concept(seg, [(image, np.ones((48, 64), bool)), (image,)])  # type: ignore[list-item]
    with pytest.raises(PromptError, match="reference 0: mask"):
        target_concept(seg, [(image, np.full((48, 64), 7, dtype=np.uint8))])


def test_bad_methods_and_configs_are_refused(seg):
    refs = [(_photo(64, 48), np.ones((48, 64), bool))]
    with pytest.raises(UnknownNameError, match="persam"):
        personalize(seg, refs, [], method="persam-x")
    with pytest.raises(ConfigError, match="PerSAMFConfig"):
        personalize(seg, refs, [], method="persam-f", config=PerSAMConfig())
    with pytest.raises(ConfigError, match="steps"):
        PerSAMFConfig(steps=0)
    with pytest.raises(ConfigError, match="lr"):
        PerSAMFConfig(lr=-1.0)
    with pytest.raises(ConfigError, match="refinements"):
        PerSAMConfig(refinements=3)
    with pytest.raises(PromptError, match="fit"):
        PerSAM(seg).predict(_photo(64, 48))
    with pytest.raises(PromptError, match="fit"):
        _ = PerSAMF(seg).weights


# --- the guidance as the reference computes it ---


def _reference_attention(attn, q, k, v, sim=None):
    """Personalize-SAM's Attention.forward on transformers' weights: softmax(qkᵀ/√d), then
    with a similarity map softmax(weights + sim)."""
    heads = attn.num_attention_heads

    def split(x):
        b, p, n, c = x.shape
        return x.reshape(b * p, n, heads, c // heads).transpose(1, 2)

    qh, kh, vh = split(attn.q_proj(q)), split(attn.k_proj(k)), split(attn.v_proj(v))
    weights = torch.softmax(qh @ kh.transpose(2, 3) / math.sqrt(qh.shape[-1]), dim=-1)
    if sim is not None:
        weights = torch.softmax(weights + sim, dim=-1)
    out = (weights @ vh).transpose(1, 2)
    b, p = q.shape[:2]
    out = out.reshape(b, p, out.shape[1], -1)
    return attn.out_proj(out)


def _reference_transformer(tr, point_embedding, image_embedding, image_pe, sim, target):
    """Personalize-SAM's TwoWayTransformer.forward (its in-place `queries += target` included:
    it shifts the shared point embedding too)."""
    keys = image_embedding.flatten(2).transpose(1, 2).unsqueeze(1)
    key_pe = image_pe.flatten(2).transpose(1, 2).unsqueeze(1)
    point_embedding = point_embedding.clone()
    queries = point_embedding
    for layer in tr.layers:
        queries += target  # in place: point_embedding moves with it on the first layer
        if layer.skip_first_layer_pe:
            queries = _reference_attention(layer.self_attn, queries, queries, queries)
        else:
            q = queries + point_embedding
            queries = queries + _reference_attention(layer.self_attn, q, q, queries)
        queries = layer.layer_norm1(queries)
        q, k = queries + point_embedding, keys + key_pe
        queries = layer.layer_norm2(
            queries + _reference_attention(layer.cross_attn_token_to_image, q, k, keys, sim)
        )
        queries = layer.layer_norm3(queries + layer.mlp(queries))
        q, k = queries + point_embedding, keys + key_pe
        keys = layer.layer_norm4(
            keys + _reference_attention(layer.cross_attn_image_to_token, k, q, queries)
        )
    q = queries + point_embedding + target
    k = keys + key_pe
    queries = queries + _reference_attention(tr.final_attn_token_to_image, q, k, keys)
    return tr.layer_norm_final_attn(queries), keys


def test_guided_decoder_equals_the_reference_transformer() -> None:
    """transformers adds the similarity before the softmax and no target embedding to the
    final attention; under persam_guidance the decoder computes what the reference does."""
    from vprompt import load_backbone
    from vprompt.backbones.sam_guidance import persam_guidance

    model = load_backbone("sam:tiny", "none").model
    tr = model.mask_decoder.transformer
    c = model.config.mask_decoder_config.hidden_size
    gen = torch.Generator().manual_seed(0)
    side = model.config.prompt_encoder_config.image_size // 16
    points = torch.randn(1, 1, 7, c, generator=gen)
    image = torch.randn(1, c, side, side, generator=gen)
    pe = torch.randn(1, c, side, side, generator=gen)
    sim = 4 * torch.rand(1, 1, 1, side * side, generator=gen)  # a sigmoid map is in (0, 1)
    target = 3 * torch.randn(1, 1, 1, c, generator=gen)
    with torch.no_grad():
        expected = _reference_transformer(tr, points, image, pe, sim, target)
        plain = tr(points.clone(), image, pe, attention_similarity=sim, target_embedding=target)
        with persam_guidance(model, target):
            got = tr(points.clone(), image, pe, attention_similarity=sim, target_embedding=target)
        after = tr(points.clone(), image, pe, attention_similarity=sim, target_embedding=target)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=1e-5)
    gap = float((plain[0] - expected[0]).abs().max())
    assert gap > 1e-4, gap  # the port alone computes something else (10x the tolerance)
    torch.testing.assert_close(after[0], plain[0])  # the hook is gone afterwards


def test_location_prior_is_sent_as_the_reference_sends_it() -> None:
    """point_selection gives the integer (col, row) of the flat index; SAM adds its +0.5."""
    assert persam_mod._pixel_point(2 * 10 + 7, 10, positive=True) == Point(7, 2, positive=True)


def test_backbone_decode_applies_the_reference_guidance() -> None:
    """Inside SamBackbone.decode with PerSAM's guidance, the two-way transformer's output
    tokens are the reference's (tiny random logits are too small to compare directly)."""
    from vprompt.segment import Segmenter

    own = Segmenter.load("sam:tiny", "none", device="cpu")  # a private copy: sharpened below
    backbone = own.backbone
    tr = backbone.model.mask_decoder.transformer
    with torch.no_grad():  # random-init attention is near uniform: both formulas would agree
        for layer in tr.layers:
            layer.cross_attn_token_to_image.q_proj.weight.mul_(40)
            layer.cross_attn_token_to_image.k_proj.weight.mul_(40)
    emb = own.embed_image(_photo(64, 48, 2))
    # random-init SAM gives the same embedding at every position: vary them so the
    # similarity map and the attention have something to act on
    parts = dict(emb.parts)
    parts["embeddings"] = torch.randn(
        parts["embeddings"].shape, generator=torch.Generator().manual_seed(4)
    )
    prompts = PromptSet([ObjectPrompt(points=[Point(20, 10)])], image_size=emb.image_size)
    arrays = prompts.to_arrays(backbone.frame)
    c = backbone.model.config.mask_decoder_config.hidden_size
    hw = parts["embeddings"].shape[-1] * parts["embeddings"].shape[-2]
    gen = torch.Generator().manual_seed(3)
    sim = 4 * torch.rand(1, 1, 1, hw, generator=gen)
    target = 3 * torch.randn(1, 1, 1, c, generator=gen)
    seen: dict[str, Any] = {}

    def before(_module, args, kwargs):
        seen["inputs"] = {k: v.clone() for k, v in kwargs.items() if torch.is_tensor(v)}

    def after(_module, args, kwargs, output):
        seen["tokens"] = output[0].clone()

    hooks = [
        tr.register_forward_pre_hook(before, with_kwargs=True),
        tr.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        backbone.decode(
            parts, arrays, multimask=True, attention_similarity=sim, target_embedding=target
        )
    finally:
        for h in hooks:
            h.remove()
    inputs = seen["inputs"]
    with torch.no_grad():
        expected, _ = _reference_transformer(
            tr,
            inputs["point_embeddings"],
            inputs["image_embeddings"],
            inputs["image_positional_embeddings"],
            sim,
            target,
        )
        plain, _ = tr(
            inputs["point_embeddings"].clone(),
            inputs["image_embeddings"],
            inputs["image_positional_embeddings"],
            attention_similarity=sim,
            target_embedding=target,
        )
    assert float((plain - expected).abs().max()) > 1e-3  # the port alone differs here
    torch.testing.assert_close(seen["tokens"], expected, atol=1e-5, rtol=1e-5)


def test_persam_f_training_shows_a_step_bar_on_a_terminal(seg, monkeypatch) -> None:
    """1,000 steps are not a silent wait: a bar counts them (tqdm turns it off when stderr is
    not a terminal, so piped runs and logs stay clean)."""
    from vprompt.segment import persam

    bars: list[dict[str, Any]] = []
    real = persam.tqdm

    def recording(iterable: Any, **kwargs: Any) -> Any:
        bars.append({"total": len(iterable), **kwargs})
        return real(iterable, **kwargs)

    monkeypatch.setattr(persam, "tqdm", recording)
    candidates = np.stack([_RIGHT, _TOO_BIG, _TOO_SMALL])
    monkeypatch.setattr(seg, "decode", _stub_decode(seg, candidates, []))
    PerSAMF(seg, config=PerSAMFConfig(steps=7)).fit([(_photo(128, 128, 5), _REF_MASK)])
    (bar,) = bars
    assert bar["total"] == 7
    assert bar["unit"] == "step"
    assert bar["disable"] is None  # on only for a terminal
    assert "learning the mask weights" in bar["desc"]
