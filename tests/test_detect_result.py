"""The detection result type, its post-processing and outputs, and the Finder on a fake
detector (every model-specific adapter has its own parity test file)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision.ops import box_iou as tv_box_iou

from detect_helpers import FRACTIONS, register_fake_detectors
from vprompt.backbones.detection import Exemplar, check_box, check_queries
from vprompt.detect import DetectionFilter, Detections, Finder, box_iou, coco_detections
from vprompt.detect.export import draw_detections, label_color, write_detections
from vprompt.errors import PromptError, UnknownNameError
from vprompt.segment.outputs import decode_rle


@pytest.fixture(autouse=True, scope="module")
def _fake_detectors() -> None:
    # Registered when the tests run, not on import: collection must not see test-only
    # families (other files parametrize over the registries).
    register_fake_detectors()


def _dets(boxes, scores, labels, queries=("a", "b"), size=(100, 80), masks=None) -> Detections:
    return Detections(
        boxes=np.asarray(boxes, np.float32),
        scores=np.asarray(scores, np.float32),
        labels=np.asarray(labels, np.int64),
        queries=tuple(queries),
        image_size=size,
        masks=masks,
    )


def _greedy_nms(boxes, scores, labels, iou, agnostic):
    """Textbook greedy NMS over a score-sorted list (independent of torchvision)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept: list[int] = []
    for i in order:
        ok = True
        for j in kept:
            if not agnostic and labels[i] != labels[j]:
                continue
            if box_iou(np.array([boxes[i]]), np.array([boxes[j]]))[0, 0] > iou:
                ok = False
                break
        if ok:
            kept.append(i)
    return kept


def test_filtered_equals_threshold_then_greedy_nms_then_top_k() -> None:
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 60, size=(40, 2))
    wh = rng.uniform(5, 30, size=(40, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    scores = rng.uniform(0, 1, 40).round(2)  # rounding makes ties
    labels = rng.integers(0, 2, 40)
    dets = _dets(boxes, scores, labels)
    assert len(dets.filtered(DetectionFilter(score_threshold=1.0))) == 0
    for agnostic in (False, True):
        for iou in (0.3, 0.5):
            opts = DetectionFilter(
                score_threshold=0.2, nms_iou=iou, class_agnostic=agnostic, top_k=7
            )
            got = dets.filtered(opts)
            above = [i for i in range(40) if scores[i] >= 0.2]
            kept = _greedy_nms(boxes[above], scores[above], labels[above], iou, agnostic)
            expected = [above[k] for k in kept][:7]
            np.testing.assert_array_equal(got.boxes, boxes[expected].astype(np.float32))
            np.testing.assert_array_equal(got.labels, labels[expected])
    # nms_iou 1 turns NMS off; top_k 0 keeps all
    all_kept = dets.filtered(DetectionFilter(score_threshold=0.0, nms_iou=1.0, top_k=0))
    assert len(all_kept) == 40
    assert np.all(np.diff(all_kept.scores) <= 0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"score_threshold": -0.1},
        {"score_threshold": float("nan")},
        {"nms_iou": 1.5},
        {"top_k": -1},
        {"top_k": True},
    ],
)
def test_filter_refuses_bad_values(kwargs) -> None:
    with pytest.raises(PromptError, match="expected"):
        DetectionFilter(**kwargs)


def test_detections_validate_shapes_and_labels() -> None:
    with pytest.raises(PromptError, match="N x 4"):
        _dets(np.zeros((2, 3)), [0.1, 0.2], [0, 1])
    with pytest.raises(PromptError, match="index the 2 queries"):
        _dets(np.zeros((1, 4)), [0.1], [2])
    with pytest.raises(PromptError, match="N x H x W"):
        _dets(np.zeros((1, 4)), [0.1], [0], masks=np.zeros((1, 10, 10), bool))


def test_box_iou_equals_torchvision() -> None:
    rng = np.random.default_rng(1)
    a = np.concatenate([(xy := rng.uniform(0, 50, (6, 2))), xy + rng.uniform(1, 20, (6, 2))], 1)
    b = np.concatenate([(xy := rng.uniform(0, 50, (5, 2))), xy + rng.uniform(1, 20, (5, 2))], 1)
    np.testing.assert_allclose(
        box_iou(a, b), tv_box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy(), atol=1e-12
    )


def test_check_box_and_queries_errors() -> None:
    assert check_box([0, 0, 10, 8], (10, 8)) == (0.0, 0.0, 10.0, 8.0)
    for bad, match in [
        ([0, 0, 11, 8], "outside the 10x8 image"),
        ([5, 0, 5, 8], "X0 < X1"),
        ([0, 0, float("inf"), 8], "finite"),
        ([0, 0, 1], "four numbers"),
    ]:
        with pytest.raises(PromptError, match=match):
            check_box(bad, (10, 8))
    from detect_helpers import TEXT

    assert check_queries(["  a   red mug "], TEXT, name="m") == ["a red mug"]
    with pytest.raises(PromptError, match="empty"):
        check_queries([" "], TEXT, name="m")
    with pytest.raises(PromptError, match="at most 256"):
        check_queries(["x" * 300], TEXT, name="m")
    with pytest.raises(PromptError, match="at most 8 text queries"):
        check_queries([f"q{i}" for i in range(9)], TEXT, name="m")


def test_coco_outputs_load_in_pycocotools(tmp_path) -> None:
    masks = np.zeros((2, 80, 100), bool)
    masks[0, 10:30, 20:50] = True
    masks[1, 40:70, 5:25] = True
    dets = _dets([[20, 10, 50, 30], [5, 40, 25, 70]], [0.9, 0.4], [1, 0], masks=masks)
    gt = coco_detections(dets, file_name="x.png")
    api = COCO()
    api.dataset = gt
    api.createIndex()
    assert api.getCatIds() == [1, 2]
    np.testing.assert_array_equal(api.annToMask(api.loadAnns(1)[0]), masks[0])
    assert api.loadAnns(1)[0]["bbox"] == [20.0, 10.0, 30.0, 20.0]
    results = dets.to_coco_results(image_id=1)
    assert [r["category_id"] for r in results] == [2, 1]
    res = api.loadRes(results)
    assert len(res.getAnnIds()) == 2
    np.testing.assert_array_equal(decode_rle(results[1]["segmentation"]), masks[1])
    with pytest.raises(PromptError, match="category ids"):
        dets.to_coco_results(image_id=1, category_ids=[1])


def test_overlay_draws_boxes_in_query_colours_and_leaves_the_rest(tmp_path) -> None:
    image = Image.new("RGB", (120, 90), (40, 40, 40))
    dets = _dets([[30, 40, 90, 80]], [0.5], [1], size=(120, 90))
    shown = np.asarray(draw_detections(image, dets))
    assert tuple(shown[79, 60]) == label_color(1)  # bottom edge of the box
    assert tuple(shown[60, 30]) == label_color(1)  # left edge
    assert tuple(shown[5, 5]) == (40, 40, 40)  # far from box and label
    assert tuple(shown[60, 60]) == (40, 40, 40)  # inside the box, no mask
    result = write_detections(tmp_path / "o", image, dets, file_name="im.png")
    assert result["objects"][0]["query"] == "b"
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "annotations.json",
        "overlay.png",
        "result.json",
    ]
    assert json.loads((tmp_path / "o" / "result.json").read_text())["queries"] == ["a", "b"]


def test_finder_labels_filters_and_refuses() -> None:
    finder = Finder.load("fake-detector:exact", device="cpu")
    image = Image.new("RGB", (100, 60))
    found = finder.find(image, queries=["cat", "dog"])
    # By hand from query_scores(2): box n's best is label 1 with (n+1)%4/4+0.1 for n = 0, 1, 2
    # (0.35, 0.6, 0.85) and label 0 with 0.85 for n = 3. Sorted (ties keep order): 2, 3, 1, 0;
    # box 0 overlaps box 1 (same label) with IoU 0.78 > 0.5, so NMS drops it.
    boxes = FRACTIONS * torch.tensor([100, 60, 100, 60])
    assert box_iou(boxes[:1].numpy(), boxes[1:2].numpy())[0, 0] > 0.5
    keep = [2, 3, 1]
    assert found.label_names() == ["dog", "cat", "dog"]
    np.testing.assert_allclose(found.scores, [0.85, 0.85, 0.6], atol=1e-6)
    np.testing.assert_allclose(found.boxes, boxes[keep].numpy(), atol=1e-5)
    assert finder.find(
        image, queries=["cat"], exemplars=[Exemplar(image, (1, 1, 9, 9))]
    ).queries == (
        "cat",
        "exemplar 1",
    )
    with pytest.raises(PromptError, match="nothing to find"):
        finder.find(image)
    with pytest.raises(PromptError, match="no negative exemplars"):
        finder.find(image, exemplars=[Exemplar(image, (1, 1, 9, 9), positive=False)])
    concept = Finder.load("fake-detector:concept", device="cpu")
    assert concept.find(image, exemplars=[Exemplar(image, (1, 1, 9, 9))]).queries == ("exemplars",)
    with pytest.raises(PromptError, match="refine one concept"):
        concept.find(image, queries=["a", "b"], exemplars=[Exemplar(image, (1, 1, 9, 9))])
    with pytest.raises(UnknownNameError, match="not a detector"):
        Finder.load("sam:tiny", "none", device="cpu")


def test_grounded_masks_are_one_batched_decode_equal_to_each_box_alone() -> None:
    from vprompt.prompts.spatial import Box, ObjectPrompt, PromptSet

    finder = Finder.load("fake-detector:exact", masks="sam:tiny", mask_weights="none", device="cpu")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8))
    found = finder.find(image, queries=["cat"], filter=DetectionFilter(0.0, 1.0, top_k=0))
    assert found.masks is not None
    assert found.masks.shape == (4, 48, 64)
    assert finder.segmenter is not None
    assert finder.segmenter.encodes == 1
    for i, (x0, y0, x1, y1) in enumerate(found.boxes.tolist()):
        alone = finder.segmenter.segment(
            image,
            PromptSet([ObjectPrompt(boxes=[Box(x0, y0, x1, y1)])], image_size=(64, 48)),
            multimask=False,
        )
        np.testing.assert_array_equal(found.masks[i], alone.masks[0, 0])
    assert finder.segmenter.encodes == 1  # the embedding was cached


def test_exemplar_only_calls_take_the_image_guided_defaults() -> None:
    import vprompt.backbones  # noqa: F401  (registers owlv2)
    from vprompt.backbones.detection import DETECTORS

    spec = DETECTORS.get("owlv2")
    finder = Finder(detector=Finder.load("fake-detector:exact", device="cpu").detector, spec=spec)
    assert finder.default_filter().nms_iou == 1.0  # OWL's text path has no NMS
    assert finder.default_filter(exemplars_only=True).nms_iou == 0.3  # its image-guided one
    assert finder.default_filter(exemplars_only=True, nms_iou=0.9).nms_iou == 0.9
    image = Image.new("RGB", (100, 60))
    # boxes 0 and 1 overlap at IoU 0.78 with one exemplar label: 0.3 keeps one of them
    found = finder.find(image, exemplars=[Exemplar(image, (1, 1, 9, 9))])
    assert len(found) == len(finder.find(image, queries=["x"])) - 1
