"""``sam3:`` — SAM 3 concept prompts (noun phrase and/or exemplar boxes) through transformers.

Parity is against the library's own pipeline on the same tiny weights: ``Sam3Processor`` on
the image, the text and the boxes, one full ``Sam3Model`` forward from pixels, and
``post_process_instance_segmentation`` at the original size.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vprompt.backbones.sam3 as sam3
from vprompt.backbones import load_backbone
from vprompt.backbones.detection import DETECTORS, DetectorBackbone, DetectorOutput, Exemplar
from vprompt.detect.result import DetectionFilter, Detections
from vprompt.errors import PromptError, WeightsError

SIZES = [(96, 64), (64, 96)]  # W x H: landscape and portrait


@pytest.fixture(scope="module")
def tiny() -> sam3.Sam3Backbone:
    backbone = load_backbone("sam3:tiny", "none")
    assert isinstance(backbone, sam3.Sam3Backbone)
    return backbone


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth colour blobs plus noise (pixels the ViT features vary over)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack(
        [np.sin(xx / 7 + c) * np.cos(yy / 5 - c) * 100 + 128 for c in range(3)], axis=-1
    )
    pixels = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _reference(
    backbone: sam3.Sam3Backbone,
    image: Image.Image,
    text: str | None,
    boxes: list[list[float]] | None = None,
    labels: list[int] | None = None,
) -> dict[str, torch.Tensor]:
    """The library's pipeline, every query kept (threshold 0), boxes clipped like ours."""
    proc = backbone.processor
    kwargs = {}
    if boxes is not None:
        kwargs = {"input_boxes": [boxes], "input_boxes_labels": [labels]}
    inputs = proc(images=image, text=text, return_tensors="pt", **kwargs)
    sizes = inputs.pop("original_sizes").tolist()
    with torch.inference_mode():
        out = backbone.model(**inputs)
    result = proc.post_process_instance_segmentation(out, threshold=0.0, target_sizes=sizes)[0]
    w, h = image.size
    result["boxes"][:, 0::2] = result["boxes"][:, 0::2].clamp(0, w)
    result["boxes"][:, 1::2] = result["boxes"][:, 1::2].clamp(0, h)
    keep = result["scores"] >= backbone.score_floor
    return {k: v[keep] for k, v in result.items()}


def _assert_matches(ours: DetectorOutput, ref: dict[str, torch.Tensor], label: int) -> None:
    sel = ours.labels == label
    assert int(sel.sum()) == len(ref["scores"]) > 0
    torch.testing.assert_close(ours.scores[sel], ref["scores"], atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.boxes[sel], ref["boxes"], atol=1e-4, rtol=0)
    assert ours.masks is not None
    masks, ref_masks = ours.masks[sel], ref["masks"].bool()
    assert masks.shape == ref_masks.shape
    assert 0 < ref_masks.float().mean() < 1  # a real comparison, not two empty sets
    assert (masks != ref_masks).float().mean() < 1e-3  # float rounding at the threshold only


@pytest.mark.parametrize("size", SIZES)
def test_text_queries_match_the_library_pipeline(tiny, size):
    image = _image(*size)
    out = tiny.detect(image, queries=["a cat", "  red   car ", "dog"])
    w, h = size
    assert out.masks is not None
    assert out.masks.shape[1:] == (h, w)
    assert out.boxes.dtype == torch.float32
    assert out.masks.dtype == torch.bool
    assert (out.boxes[:, 0::2] <= w).all()
    assert (out.boxes[:, 1::2] <= h).all()
    assert (out.boxes >= 0).all()
    assert out.labels.tolist() == sorted(out.labels.tolist())
    for label, text in enumerate(["a cat", "red car", "dog"]):
        _assert_matches(out, _reference(tiny, image, text), label)
    # Each query is its own concept: the scores differ between queries.
    assert not torch.equal(out.scores[out.labels == 0], out.scores[out.labels == 2])


@pytest.mark.parametrize("size", SIZES)
def test_text_with_positive_and_negative_boxes_matches(tiny, size):
    w, h = size
    image = _image(*size, seed=1)
    boxes = [[4.0, 6.0, w / 2, h / 2], [w / 2, h / 3, w - 1.5, h - 2.0]]
    exemplars = [Exemplar(image, tuple(boxes[0])), Exemplar(image, tuple(boxes[1]), False)]
    out = tiny.detect(image, queries=["a cat"], exemplars=exemplars)
    assert set(out.labels.tolist()) == {0}
    _assert_matches(out, _reference(tiny, image, "a cat", boxes, [1, 0]), 0)
    # The boxes change the answer (they reach the model), and their polarity does too.
    assert not torch.equal(out.scores, tiny.detect(image, queries=["a cat"]).scores)
    flipped = [Exemplar(image, e.box, not e.positive) for e in exemplars]
    assert not torch.equal(
        out.scores, tiny.detect(image, queries=["a cat"], exemplars=flipped).scores
    )


@pytest.mark.parametrize("size", SIZES)
def test_boxes_alone_match_the_processor_default(tiny, size):
    w, h = size
    image = _image(*size, seed=2)
    boxes = [[10.0, 12.0, 40.0, 50.0], [0.0, 0.0, float(w), float(h) / 4]]
    exemplars = [Exemplar(image, tuple(boxes[0])), Exemplar(image.copy(), tuple(boxes[1]), False)]
    out = tiny.detect(image, exemplars=exemplars)  # a copy has the same pixels: accepted
    assert set(out.labels.tolist()) == {0}
    # With boxes and no text the processor prompts with its placeholder text.
    _assert_matches(out, _reference(tiny, image, None, boxes, [1, 0]), 0)


@pytest.mark.parametrize("size", SIZES)
def test_exemplar_boxes_reach_the_model_as_the_processor_puts_them(tiny, size):
    w, h = size
    pixels = torch.tensor([[3.0, 5.0, 40.0, 33.0], [0.0, 0.0, float(w), float(h)]])
    model = sam3.boxes_to_model(pixels, size)
    inputs = tiny.processor(
        images=_image(*size), input_boxes=[pixels.tolist()], input_boxes_labels=[[1, 0]]
    )
    assert torch.equal(model, torch.as_tensor(inputs["input_boxes"])[0])
    # By hand: centre and size as fractions of W and H.
    expected = torch.tensor([[21.5 / w, 19.0 / h, 37.0 / w, 28.0 / h], [0.5, 0.5, 1.0, 1.0]])
    torch.testing.assert_close(model, expected)
    torch.testing.assert_close(sam3.boxes_from_model(model, size), pixels, atol=1e-4, rtol=0)


def test_the_image_is_encoded_once_per_distinct_image(tiny, monkeypatch):
    calls = []
    encode = tiny.model.get_vision_features

    def counting(**kwargs):
        calls.append(kwargs["pixel_values"].shape)
        return encode(**kwargs)

    monkeypatch.setattr(tiny.model, "get_vision_features", counting)
    tiny.clear_cache()
    image = _image(80, 48, seed=3)
    tiny.max_batch = 2  # five queries: three decoder passes over one encoding
    try:
        many = tiny.detect(image, queries=["a", "b", "c", "d", "e"])
    finally:
        tiny.max_batch = 4
    assert len(calls) == 1
    assert calls[0][0] == 1
    assert sorted(set(many.labels.tolist())) == [0, 1, 2, 3, 4]
    tiny.detect(image.copy(), queries=["b"], exemplars=[Exemplar(image, (1, 1, 20, 20))])
    assert len(calls) == 1  # same pixels, another object: still the kept features
    alone = tiny.detect(image, queries=["c"])
    torch.testing.assert_close(alone.scores, many.scores[many.labels == 2], atol=1e-6, rtol=0)
    tiny.detect(_image(80, 48, seed=4), queries=["b"])
    assert len(calls) == 2


def test_score_floor_drops_candidates_and_their_masks(tiny):
    image = _image(96, 64, seed=5)
    full = tiny.detect(image, queries=["a cat"])
    floor = float(full.scores.median())
    tiny.score_floor = floor
    try:
        kept = tiny.detect(image, queries=["a cat"])
    finally:
        tiny.score_floor = 0.01
    sel = full.scores >= floor
    assert 0 < len(kept.scores) == int(sel.sum()) < len(full.scores)
    assert torch.equal(kept.scores, full.scores[sel])
    assert kept.masks is not None
    assert full.masks is not None
    assert torch.equal(kept.masks, full.masks[sel])


def test_prompt_errors_are_one_clear_line(tiny):
    image = _image(96, 64)
    with pytest.raises(PromptError, match="empty"):
        tiny.detect(image, queries=["  "])
    with pytest.raises(PromptError, match="characters"):
        tiny.detect(image, queries=["x" * 300])
    with pytest.raises(PromptError, match="at most 30"):
        tiny.detect(image, queries=[" ".join(["red"] * 40)])
    with pytest.raises(PromptError, match="nothing to look for"):
        tiny.detect(image)
    with pytest.raises(PromptError, match="outside the 96x64 image"):
        Exemplar(image, (50, 10, 100, 30))
    box = Exemplar(image, (5, 5, 30, 30))
    with pytest.raises(PromptError, match="2 text queries"):
        tiny.detect(image, queries=["cat", "dog"], exemplars=[box])
    with pytest.raises(PromptError, match="only negative"):
        tiny.detect(image, exemplars=[Exemplar(image, (5, 5, 30, 30), positive=False)])
    other = _image(96, 64, seed=9)  # same size, other pixels
    with pytest.raises(PromptError, match=r"exemplar 1: .*another image \(96x64\)"):
        tiny.detect(image, exemplars=[box, Exemplar(other, (5, 5, 30, 30))])
    big = _image(200, 150)
    with pytest.raises(PromptError, match="another image"):
        tiny.detect(image, exemplars=[Exemplar(big, (100, 80, 190, 140))])
    # Negative exemplars next to a text query are a valid concept.
    assert len(
        tiny.detect(image, queries=["cat"], exemplars=[Exemplar(image, (1, 1, 9, 9), False)]).scores
    )


def test_registration_and_detections(tiny):
    spec = DETECTORS.get("sam3")
    assert spec.default_model == "sam3:large"
    assert spec.tiny_model == "sam3:tiny"
    assert spec.score_threshold == 0.3
    assert spec.nms_iou == 1.0
    assert spec.capabilities is tiny.capabilities
    caps = tiny.capabilities
    assert (caps.text, caps.exemplars, caps.negative_exemplars, caps.masks, caps.phrases) == (
        True,
        True,
        True,
        True,
        False,
    )
    assert isinstance(tiny, DetectorBackbone)
    assert not any(p.requires_grad for p in tiny.parameters())
    image = _image(64, 96)
    out = tiny.detect(image, queries=["a cat", "dog"])
    dets = Detections.from_output(out, queries=["a cat", "dog"], image_size=image.size)
    kept = dets.filtered(DetectionFilter(score_threshold=0.05, nms_iou=spec.nms_iou, top_k=5))
    assert kept.masks is not None
    assert kept.masks.shape == (len(kept), 96, 64)
    assert (kept.scores >= 0.05).all()
    assert 0 < len(kept) <= 5


def test_random_init_is_deterministic_and_test_arch_refuses_weights(tiny):
    again = load_backbone("sam3:tiny", "none")
    assert again.fingerprint() == tiny.fingerprint()
    image = _image(64, 96, seed=6)
    a, b = tiny.detect(image, queries=["cat"]), again.detect(image, queries=["cat"])
    assert torch.equal(a.scores, b.scores)
    assert torch.equal(a.boxes, b.boxes)
    assert a.masks is not None
    assert b.masks is not None
    assert torch.equal(a.masks, b.masks)
    with pytest.raises(WeightsError, match="test architecture"):
        load_backbone("sam3:tiny", "facebook/sam3")


def test_save_pretrained_folders_load(tiny, tmp_path):
    import transformers as tf
    from safetensors.torch import save_file

    image = _image(96, 64, seed=7)
    expected = tiny.detect(image, queries=["a cat"])
    # A bare model folder (no processor files): the processor is rebuilt offline.
    tiny.model.save_pretrained(tmp_path / "bare")
    bare = load_backbone("sam3:large", str(tmp_path / "bare"))
    assert bare.fingerprint() == tiny.fingerprint()
    assert bare.processor.image_processor.size["height"] == 64  # follows the checkpoint
    # With the processor saved next to it, the folder's own processor is read.
    tiny.model.save_pretrained(tmp_path / "full")
    tiny.processor.save_pretrained(tmp_path / "full")
    full = load_backbone("sam3:large", str(tmp_path / "full"))
    for loaded in (bare, full):
        # The same weights (fingerprint) give the same candidates up to one float32 ulp.
        got = loaded.detect(image, queries=["a cat"])
        torch.testing.assert_close(got.scores, expected.scores, atol=1e-6, rtol=0)
        torch.testing.assert_close(got.boxes, expected.boxes, atol=1e-4, rtol=0)
        assert got.masks is not None
        assert expected.masks is not None
        assert (got.masks != expected.masks).float().mean() < 1e-3
    # The released checkpoint's layout: an image + video config, detector weights prefixed.
    video = tmp_path / "video"
    tf.Sam3VideoConfig(detector_config=tiny.model.config.to_dict()).save_pretrained(video)
    state = {f"detector_model.{k}": v.contiguous() for k, v in tiny.model.state_dict().items()}
    state["tracker_model.extra.weight"] = torch.zeros(2)  # the tracker half is skipped
    save_file(state, video / "model.safetensors", metadata={"format": "pt"})
    assert load_backbone("sam3:large", str(video)).fingerprint() == tiny.fingerprint()
    load_backbone("sam:tiny", "none").model.save_pretrained(tmp_path / "sam")
    with pytest.raises(WeightsError, match=r"holds a 'sam' model.*'sam3'"):
        load_backbone("sam3:large", str(tmp_path / "sam"))
