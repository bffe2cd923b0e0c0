"""vprompt.detect.referring: marker prompts + frozen CLIP ranking, on ``clip:tiny`` (CPU).

The reference is written here from the papers (Shtedritski et al. 2023; FGVP): mark each
candidate, preprocess with the model's own transform, encode with open_clip's own
``encode_image`` / ``encode_text``, normalise, scale by ``exp(logit_scale)``, subtract each
marked image's mean score over the negative expressions, softmax, argmax.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vprompt.detect.markers import Region, get_marker, with_params
from vprompt.detect.referring import (
    NEGATIVE_EXPRESSIONS,
    TEMPLATE,
    rank_regions,
    regions_from_boxes,
    regions_from_detections,
)
from vprompt.detect.result import Detections
from vprompt.errors import PromptError, UnknownNameError


@pytest.fixture(scope="module")
def scene() -> tuple[Image.Image, list[Region]]:
    w, h = 96, 64
    rng = np.random.default_rng(11)
    arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), bool)
    mask[30:60, 60:90] = True
    regions = [
        Region(box=(4, 4, 40, 30)),
        Region(box=(50.5, 2.0, 95.0, 25.5)),
        Region.from_mask(mask),
        Region(box=(0, 0, 96, 64)),
    ]
    return Image.fromarray(arr), regions


def _reference(clip, image, expression, regions, marker, negatives):
    """The paper's recipe with open_clip's own forward passes (no vprompt scoring code)."""
    model = clip.model
    with torch.no_grad():
        marked = [get_marker(marker).render(image, r) for r in regions]
        pixels = torch.stack([clip.transform(m) for m in marked])
        img = F.normalize(model.encode_image(pixels), dim=-1).double()
        texts = [TEMPLATE.format(t) for t in [expression, *negatives]]
        txt = F.normalize(model.encode_text(clip.tokenize(texts)), dim=-1).double()
        sims = model.logit_scale.exp().double() * img @ txt.T  # N x (1 + Q)
    logits = sims[:, 0]
    bias = sims[:, 1:].mean(dim=1) if negatives else torch.zeros_like(logits)
    scores = logits - bias
    return logits.numpy(), bias.numpy(), scores.numpy(), torch.softmax(scores, 0).numpy()


@pytest.mark.parametrize("marker", ["red-circle", "blur+contour"])
def test_matches_the_paper_recipe(tiny_clip, scene, marker: str) -> None:
    image, regions = scene
    res = rank_regions(tiny_clip, image, "the  dog on the left ", regions, marker=marker)
    logits, bias, scores, probs = _reference(
        tiny_clip, image, "the dog on the left", regions, marker, NEGATIVE_EXPRESSIONS
    )
    assert res.expression == "the dog on the left"
    assert res.markers == (get_marker(marker).name,)
    np.testing.assert_allclose(res.logits, logits, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(res.bias, bias, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(res.scores, scores, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(res.probs, probs, rtol=1e-4, atol=1e-6)
    assert res.best == int(np.argmax(scores))
    assert res.probs.sum() == pytest.approx(1.0, abs=1e-5)
    # The subtraction is a per-candidate term, so it changes the ranking's inputs.
    assert np.ptp(res.bias) > 0


def test_without_subtraction_and_own_negatives(tiny_clip, scene) -> None:
    image, regions = scene
    plain = rank_regions(tiny_clip, image, "a red car", regions, subtract=False)
    logits, _, _, probs = _reference(tiny_clip, image, "a red car", regions, "red-circle", [])
    np.testing.assert_allclose(plain.scores, logits, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(plain.probs, probs, rtol=1e-4, atol=1e-6)
    assert (plain.bias == 0).all()
    assert np.array_equal(plain.scores, plain.logits)
    negs = ["a tree", "the sky above"]
    own = rank_regions(tiny_clip, image, "a red car", regions, negatives=negs)
    _, bias, scores, _ = _reference(tiny_clip, image, "a red car", regions, "red-circle", negs)
    np.testing.assert_allclose(own.bias, bias, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(own.scores, scores, rtol=1e-5, atol=1e-4)


def test_batching_does_not_change_scores(tiny_clip, scene) -> None:
    image, regions = scene
    runs = [rank_regions(tiny_clip, image, "the man", regions, batch_size=b) for b in (1, 3, 64)]
    for other in runs[1:]:
        np.testing.assert_allclose(other.scores, runs[0].scores, rtol=1e-5, atol=1e-5)
        assert other.best == runs[0].best


def test_deterministic(tiny_clip, scene) -> None:
    image, regions = scene
    a = rank_regions(tiny_clip, image, "the cat", regions, marker="blur", keep_marked=True)
    b = rank_regions(tiny_clip, image, "the cat", regions, marker="blur", keep_marked=True)
    assert np.array_equal(a.scores, b.scores)
    assert np.array_equal(a.probs, b.probs)
    assert a.marked is not None
    assert b.marked is not None
    for x, y in zip(a.marked[0], b.marked[0], strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_marker_and_model_ensembles_sum(tiny_clip, scene) -> None:
    image, regions = scene
    one = rank_regions(tiny_clip, image, "a bowl", regions, marker="red-circle")
    two = rank_regions(tiny_clip, image, "a bowl", regions, marker="blur")
    both = rank_regions(tiny_clip, image, "a bowl", regions, marker=["red-circle", "blur"])
    assert both.markers == ("red-circle", "blur")
    np.testing.assert_allclose(both.scores, one.scores + two.scores, rtol=1e-5, atol=1e-4)
    thick = with_params("red-circle", width=0.05)
    custom = rank_regions(tiny_clip, image, "a bowl", regions, marker=thick, keep_marked=True)
    assert custom.markers == ("red-circle",)
    assert custom.marked is not None
    assert np.array_equal(
        np.asarray(custom.marked[0][1]), np.asarray(thick.render(image, regions[1]))
    )
    twice = rank_regions([tiny_clip, tiny_clip], image, "a bowl", regions)
    np.testing.assert_allclose(twice.scores, 2 * one.scores, rtol=1e-5, atol=1e-4)
    assert twice.best == one.best


def test_marked_images_and_records(tiny_clip, scene) -> None:
    image, regions = scene
    res = rank_regions(tiny_clip, image, "a bowl", regions, marker="crop", keep_marked=True)
    assert res.marked is not None
    src = np.asarray(image)
    assert np.array_equal(np.asarray(res.marked[0][0]), src[4:30, 4:40])
    assert res.marked[0][2].size == (30, 30)
    records = res.to_records(regions)
    assert [r["index"] for r in records] == res.order().tolist()
    assert records[0]["index"] == res.best
    assert records[0]["box"] == list(regions[res.best].box)
    assert records[0]["score"] >= records[-1]["score"]
    assert rank_regions(tiny_clip, image, "a bowl", regions).marked is None


def test_bad_inputs(tiny_clip, scene) -> None:
    image, regions = scene
    with pytest.raises(PromptError, match="no candidate"):
        rank_regions(tiny_clip, image, "a cat", [])
    with pytest.raises(PromptError, match="empty"):
        rank_regions(tiny_clip, image, "  \n ", regions)
    # "a photo of" + start/end = 5 tokens; each "cat" is one BPE token.
    rank_regions(tiny_clip, image, " ".join(["cat"] * 72), regions[:1], subtract=False)
    with pytest.raises(PromptError, match=r"78 tokens.*at most 77"):
        rank_regions(tiny_clip, image, " ".join(["cat"] * 73), regions)
    with pytest.raises(PromptError, match="outside"):
        rank_regions(tiny_clip, image, "a cat", [Region(box=(90, 0, 97, 5))])
    with pytest.raises(PromptError, match="negative"):
        rank_regions(tiny_clip, image, "a cat", regions, negatives=[])
    with pytest.raises(PromptError, match="negative expression"):
        rank_regions(tiny_clip, image, "a cat", regions, negatives=["ok", ""])
    with pytest.raises(PromptError, match="batch size"):
        rank_regions(tiny_clip, image, "a cat", regions, batch_size=0)
    with pytest.raises(UnknownNameError, match="did you mean"):
        rank_regions(tiny_clip, image, "a cat", regions, marker="red-circl")


def test_regions_from_boxes_and_detections() -> None:
    boxes = np.array([[1, 2, 10, 12], [0, 0, 96, 64]], np.float32)
    regions = regions_from_boxes(boxes, image_size=(96, 64))
    assert [r.box for r in regions] == [(1.0, 2.0, 10.0, 12.0), (0.0, 0.0, 96.0, 64.0)]
    assert all(r.mask is None for r in regions)
    assert regions_from_boxes(np.zeros((0, 4))) == []
    with pytest.raises(PromptError, match="N x 4"):
        regions_from_boxes([[1, 2, 3]])
    with pytest.raises(PromptError, match="outside"):
        regions_from_boxes([[1, 2, 100, 12]], image_size=(96, 64))
    with pytest.raises(PromptError, match="masks"):
        regions_from_boxes(boxes, masks=np.ones((1, 64, 96), bool))

    masks = np.zeros((2, 64, 96), bool)
    masks[0, 2:12, 1:10] = True
    masks[1, 5:50, 5:90] = True
    dets = Detections(
        boxes=np.array([[1, 2, 10, 12], [-0.4, 5, 96.3, 50]], np.float32),
        scores=np.array([0.9, 0.5], np.float32),
        labels=np.array([0, 0], np.int64),
        queries=("thing",),
        image_size=(96, 64),
        masks=masks,
    )
    got = regions_from_detections(dets)
    assert got[1].box == (0.0, 5.0, 96.0, 50.0)  # clipped to the image
    assert got[0].mask is not None
    assert np.array_equal(got[0].mask, masks[0])
    plain = regions_from_detections(
        Detections(
            boxes=dets.boxes, scores=dets.scores, labels=dets.labels, queries=("thing",),
            image_size=(96, 64),
        )
    )  # fmt: skip
    assert plain[0].mask is None
