"""The SAM-family seam: parity with transformers' own pipeline, batching, caching, weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vprompt.backbones import load_backbone
from vprompt.errors import ConfigError, PromptError, UnknownNameError, WeightsError
from vprompt.prompts.spatial import Box, Mask, MaskLogits, ObjectPrompt, Point, PromptSet
from vprompt.segment.cache import EmbeddingCache
from vprompt.segment.segmenter import Segmenter, stability_score

TINY = ("sam:tiny", "sam:tiny-hq", "sam:tiny-sam2")


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) % 256], axis=-1)
    noise = rng.integers(0, 40, size=(h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def segmenters() -> dict[str, Segmenter]:
    return {name: Segmenter.load(name, "none", device="cpu") for name in TINY}


def _processor(seg: Segmenter):  # type: ignore[no-untyped-def]
    import transformers as tf

    cls = {"sam": tf.SamProcessor, "sam-hq": tf.SamHQProcessor}.get(
        seg.backbone.kind, tf.Sam2Processor
    )
    return cls(image_processor=seg.backbone.image_processor)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("size", [(300, 200), (200, 300)], ids=["landscape", "portrait"])
def test_decode_equals_transformers_pipeline(segmenters, name, size):
    """Processor + model forward on pixels + post_process_masks, vs. our embed/decode."""
    seg = segmenters[name]
    image = _photo(*size)
    w, h = size
    point, box = [w * 0.3, h * 0.6], [w * 0.1, h * 0.2, w * 0.7, h * 0.9]
    proc = _processor(seg)
    inputs = proc(
        images=image,
        input_points=[[[point]]],
        input_labels=[[[1]]],
        input_boxes=[[box]],
        return_tensors="pt",
    )
    with torch.no_grad():
        out = seg.backbone.model(
            pixel_values=inputs["pixel_values"],
            input_points=inputs["input_points"],
            input_labels=inputs["input_labels"],
            input_boxes=inputs["input_boxes"],
            multimask_output=True,
        )
    post_args = [out.pred_masks, inputs["original_sizes"]]
    if "reshaped_input_sizes" in inputs:
        post_args.append(inputs["reshaped_input_sizes"])
    expected = proc.post_process_masks(*post_args)[0][0].numpy()  # K x H x W

    prompts = PromptSet([ObjectPrompt(points=[Point(*point)], boxes=[Box(*box)])], image_size=size)
    result = seg.segment(image, prompts)
    assert result.masks.shape == (1, 3, h, w)
    np.testing.assert_allclose(result.iou[0], out.iou_scores[0, 0].numpy(), rtol=1e-5, atol=1e-6)
    mismatch = (result.masks[0] != expected).mean()
    assert mismatch < 1e-4, f"{mismatch:.2%} of pixels differ"
    assert result.masks[0].any()
    assert (~result.masks[0]).any()


@pytest.mark.parametrize("name", TINY)
def test_batched_objects_equal_one_by_one(segmenters, name):
    seg = segmenters[name]
    image = _photo(320, 240, seed=1)
    mask = np.zeros((240, 320), dtype=bool)
    mask[50:150, 60:200] = True
    objects = [
        ObjectPrompt(points=[Point(100, 100)]),
        ObjectPrompt(points=[Point(30, 40), Point(200, 90, positive=False)]),
        ObjectPrompt(boxes=[Box(10, 20, 150, 200)]),
        ObjectPrompt(points=[Point(250, 200)]),
        ObjectPrompt(points=[Point(120, 80)], boxes=[Box(50, 40, 300, 220)], mask=Mask(mask)),
    ]
    before = seg.encodes
    emb = seg.embed_image(image)
    together = seg.decode(emb, PromptSet(objects, image_size=(320, 240)))
    for i, obj in enumerate(objects):
        alone = seg.decode(emb, PromptSet([obj], image_size=(320, 240)))
        np.testing.assert_allclose(together.logits[i], alone.logits[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(together.iou[i], alone.iou[0], rtol=1e-4, atol=1e-6)
        assert (together.masks[i] != alone.masks[0]).mean() < 1e-4
    assert seg.encodes == before + 1


def test_best_only_equals_best_of_all(segmenters):
    seg = segmenters["sam:tiny-sam2"]
    emb = seg.embed_image(_photo(300, 200))
    prompts = PromptSet(
        [ObjectPrompt(points=[Point(40, 50)]), ObjectPrompt(boxes=[Box(5, 5, 200, 150)])],
        image_size=(300, 200),
    )
    full = seg.decode(emb, prompts).best()
    fast = seg.decode(emb, prompts, best_only=True)
    assert fast.masks.shape == (2, 1, 200, 300)
    np.testing.assert_array_equal(fast.masks, full.masks)
    np.testing.assert_allclose(fast.stability, full.stability)
    np.testing.assert_allclose(fast.iou, full.iou)


def test_multimask_auto_is_per_object(segmenters):
    seg = segmenters["sam:tiny"]
    emb = seg.embed_image(_photo(300, 200))
    click = ObjectPrompt(points=[Point(40, 50)])
    box = ObjectPrompt(boxes=[Box(5, 5, 200, 150)])
    both = seg.decode(emb, PromptSet([click, box], image_size=(300, 200)), multimask="auto")
    lone = seg.decode(emb, PromptSet([click], image_size=(300, 200)), best_only=True)
    boxed = seg.decode(emb, PromptSet([box], image_size=(300, 200)), multimask=False)
    assert both.masks.shape == (2, 1, 200, 300)
    np.testing.assert_allclose(both.logits[0], lone.logits[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(both.logits[1], boxed.logits[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="multimask"):
        seg.decode(emb, PromptSet([click], image_size=(300, 200)), multimask="yes")  # type: ignore[arg-type]


def test_cache_hits_skip_the_encoder(tmp_path):
    seg = Segmenter.load("sam:tiny", "none", device="cpu", cache=EmbeddingCache(disk_dir=tmp_path))
    image = _photo(200, 150)
    first = seg.embed_image(image)
    again = seg.embed_image(image.copy())  # same content, another object
    assert seg.encodes == 1
    assert again.key == first.key
    assert torch.equal(first.parts["embeddings"], again.parts["embeddings"])
    other = _photo(200, 150, seed=5)
    assert seg.embed_image(other).key != first.key
    assert seg.encodes == 2
    # A fresh process (new cache object over the same folder) reads the disk copy.
    seg2 = Segmenter(seg.backbone, cache=EmbeddingCache(disk_dir=tmp_path))
    from_disk = seg2.embed_image(image)
    assert seg2.encodes == 0
    assert seg2.cache.stats.disk_hits == 1
    assert torch.equal(from_disk.parts["embeddings"], first.parts["embeddings"])
    # A corrupt disk entry is recomputed, not trusted.
    (tmp_path / f"{first.key}.safetensors").write_bytes(b"garbage")
    seg3 = Segmenter(seg.backbone, cache=EmbeddingCache(disk_dir=tmp_path))
    seg3.embed_image(image)
    assert seg3.encodes == 1


def test_an_unwritable_disk_cache_keeps_going_in_memory(tmp_path, caplog):
    in_the_way = tmp_path / "cache"
    in_the_way.write_text("VPROMPT_CACHE points at a file")
    cache = EmbeddingCache(disk_dir=in_the_way / "sam-embeddings")
    one = {"embeddings": torch.ones(1, 4, 16, 16)}
    with caplog.at_level("WARNING", logger="vprompt"):
        cache.put("a", one)
        cache.put("b", one)  # said once: the disk layer is off from then on
    assert [r.getMessage() for r in caplog.records if "embedding cache" in r.getMessage()] == [
        f"embedding cache {in_the_way / 'sam-embeddings'}: cannot write "
        f"{in_the_way / 'sam-embeddings'}: Not a directory; going on without the disk copy"
    ]
    assert cache.disk_dir is None
    got = cache.get("a", torch.device("cpu"))
    assert got is not None
    assert torch.equal(got["embeddings"], one["embeddings"])
    assert in_the_way.read_text() == "VPROMPT_CACHE points at a file"


def test_cache_memory_bound_evicts_least_recent():
    one = {"embeddings": torch.zeros(1, 4, 16, 16)}  # 4 KiB
    cache = EmbeddingCache(max_bytes=3 * 4096)
    for key in "abc":
        cache.put(key, one)
    cache.get("a", torch.device("cpu"))  # a becomes most recent
    cache.put("d", one)
    assert "b" not in cache
    assert {"a", "c", "d"} <= {k for k in "abcd" if k in cache}
    assert cache.nbytes <= cache.max_bytes
    assert cache.stats.evictions == 1
    cache.put("huge", {"embeddings": torch.zeros(1, 64, 64, 64)})
    assert "huge" not in cache  # bigger than the whole budget


def test_refinement_feeds_back_previous_logits(segmenters):
    seg = segmenters["sam:tiny"]
    image = _photo(240, 180)
    emb = seg.embed_image(image)
    first = seg.decode(
        emb, PromptSet([ObjectPrompt(points=[Point(60, 60)])], image_size=(240, 180))
    )
    clicks = [Point(60, 60), Point(150, 120, positive=False)]
    with_prev = seg.decode(
        emb,
        PromptSet(
            [ObjectPrompt(points=clicks, logits=first.prompt_logits(0))], image_size=(240, 180)
        ),
        multimask=False,
    )
    without = seg.decode(
        emb, PromptSet([ObjectPrompt(points=clicks)], image_size=(240, 180)), multimask=False
    )
    assert with_prev.logits.shape == (1, 1, 64, 64)
    assert not np.allclose(with_prev.logits, without.logits)
    # Logits from another model's resolution are refused with the reason.
    wrong = ObjectPrompt(points=clicks, logits=MaskLogits(np.zeros((256, 256))))
    with pytest.raises(PromptError, match="decoder works at"):
        seg.decode(emb, PromptSet([wrong], image_size=(240, 180)))


def test_prompts_for_another_image_size_are_refused(segmenters):
    seg = segmenters["sam:tiny"]
    emb = seg.embed_image(_photo(200, 100))
    with pytest.raises(PromptError, match="size"):
        seg.decode(emb, PromptSet([ObjectPrompt(points=[Point(5, 5)])], image_size=(100, 200)))


def test_stability_score_matches_definition():
    logits = torch.tensor([[[[2.0, 0.5], [-0.5, -2.0]]]])
    # > +1: one pixel; > -1: three pixels.
    assert stability_score(logits).item() == pytest.approx(1 / 3)
    assert stability_score(torch.full((1, 1, 2, 2), -5.0)).item() == 0.0


def test_local_weights_folder_round_trip_and_kind_check(tmp_path):
    backbone = load_backbone("sam:tiny", "none")
    backbone.model.save_pretrained(tmp_path / "tiny")
    loaded = load_backbone("sam:vit-base", str(tmp_path / "tiny"))
    assert loaded.fingerprint() == backbone.fingerprint()
    assert loaded.frame.target == 256  # the frame follows the checkpoint's config
    load_backbone("sam:tiny-sam2", "none").model.save_pretrained(tmp_path / "s2")
    with pytest.raises(WeightsError, match="sam2"):
        load_backbone("sam:vit-base", str(tmp_path / "s2"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match=r"config\.json"):
        load_backbone("sam:vit-base", str(tmp_path / "empty"))
    with pytest.raises(WeightsError, match="test architecture"):
        load_backbone("sam:tiny", "facebook/sam-vit-base")
    with pytest.raises(WeightsError, match="no such file"):
        load_backbone("sam:vit-base", "./missing/weights.bin")
    with pytest.raises(UnknownNameError, match="sam:vit-base"):
        load_backbone("sam:vit-bse", "none")


def test_random_init_is_deterministic_and_frozen():
    a, b = load_backbone("sam:tiny", "none"), load_backbone("sam:tiny", "none")
    assert a.fingerprint() == b.fingerprint()
    assert not any(p.requires_grad for p in a.parameters())


def _upsample_reference(logits: torch.Tensor, plan) -> torch.Tensor:
    """SAM's post-processing as written: padded square, crop, resize to the original."""
    import torch.nn.functional as F

    up = F.interpolate(logits, plan.padded, mode="bilinear", align_corners=False)
    up = up[..., : plan.crop[0], : plan.crop[1]]
    return F.interpolate(up, plan.original, mode="bilinear", align_corners=False)


@pytest.mark.parametrize("size", [(1024, 768), (768, 1024), (640, 480), (1500, 300), (37, 1024)])
def test_upsample_logits_and_fast_stability_equal_the_plain_computation(size):
    from vprompt.prompts.resize import ResizeLongestSide
    from vprompt.segment.segmenter import _masks_and_stability, upsample_logits

    plan = ResizeLongestSide().postprocess_sizes(size)
    logits = torch.randn(2, 3, *plan.low_res, generator=torch.Generator().manual_seed(0)) * 4
    ref = _upsample_reference(logits, plan)
    got = upsample_logits(logits, plan)
    assert torch.equal(got, ref)  # bit-identical, not just close
    masks = np.empty(tuple(ref.shape), dtype=bool)
    stab = _masks_and_stability(got.contiguous().numpy(), masks)
    np.testing.assert_array_equal(masks, (ref > 0).numpy())
    np.testing.assert_array_equal(stab, stability_score(ref).numpy())
