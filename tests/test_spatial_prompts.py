"""Spatial prompts: validation, scribbles, SAM's coordinate frame and batching."""

from __future__ import annotations

import numpy as np
import pytest

from vprompt.errors import PromptError
from vprompt.prompts import (
    POINT_PAD_LABEL,
    Box,
    Mask,
    MaskLogits,
    ObjectPrompt,
    Point,
    PromptSet,
    ResizeLongestSide,
    Scribble,
)

RLS = ResizeLongestSide()


@pytest.fixture(scope="module")
def sam_processor():
    from transformers import SamImageProcessor, SamProcessor

    return SamProcessor(SamImageProcessor())  # default config, no hub access


# --------------------------------------------------------------------------- transforms


@pytest.mark.parametrize(
    ("size", "scale", "resized"),
    [
        ((640, 480), 1.6, (1024, 768)),
        ((480, 640), 1.6, (768, 1024)),
        ((1000, 10), 1.024, (1024, 10)),  # 10 * 1.024 = 10.24 -> 10
        ((10, 1000), 1.024, (10, 1024)),
        ((1024, 1024), 1.0, (1024, 1024)),
        ((3000, 2001), 1024 / 3000, (1024, 683)),  # 683.0 exactly
        ((2048, 1), 0.5, (1024, 1)),  # 0.5 rounds half up to 1, never to 0
    ],
)
def test_scale_and_resized_size_hand_computed(size, scale, resized):
    assert RLS.scale(size) == pytest.approx(scale)
    assert RLS.resized_size(*size) == resized


def test_points_and_boxes_hand_computed_both_orientations():
    # 640 x 480 (landscape): both axes scale by exactly 1.6.
    np.testing.assert_allclose(
        RLS.apply_points([[10, 20], [640, 480]], (640, 480)), [[16, 32], [1024, 768]]
    )
    np.testing.assert_allclose(
        RLS.apply_boxes([[1, 2, 600, 400]], (640, 480)), [[1.6, 3.2, 960, 640]]
    )
    # 480 x 640 (portrait): the same numbers with x and y swapped.
    np.testing.assert_allclose(
        RLS.apply_points([[20, 10], [480, 640]], (480, 640)), [[32, 16], [768, 1024]]
    )
    # 1000 x 10: y is scaled by the *rounded* ratio 10/10 = 1, not by 1.024.
    np.testing.assert_allclose(
        RLS.apply_points([[500, 5], [1000, 10]], (1000, 10)), [[512, 5], [1024, 10]]
    )


@pytest.mark.parametrize(
    "size", [(640, 480), (480, 640), (1000, 10), (10, 1000), (333, 777), (1, 1)]
)
def test_transforms_match_transformers(sam_processor, size):
    w, h = size
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 1, (5, 2)) * [w, h]
    boxes = np.sort(rng.uniform(0, 1, (3, 2, 2)) * [w, h], axis=1).reshape(3, 4)
    ref_pts = sam_processor._normalize_coordinates(1024, pts, (h, w))
    ref_boxes = sam_processor._normalize_coordinates(1024, boxes, (h, w), is_bounding_box=True)
    np.testing.assert_array_equal(RLS.apply_points(pts, size), ref_pts)
    np.testing.assert_array_equal(RLS.apply_boxes(boxes, size), ref_boxes)
    new_h, new_w = sam_processor.image_processor._get_preprocess_shape((h, w), longest_edge=1024)
    assert RLS.resized_size(w, h) == (new_w, new_h)


def test_full_processor_call_agrees(sam_processor):
    img = np.zeros((480, 640, 3), dtype=np.uint8)
    pts = [[10.0, 20.0], [639.0, 479.0]]
    box = [1.0, 2.0, 600.0, 400.0]
    ref = sam_processor(
        images=img,
        input_points=[[pts]],
        input_labels=[[[1, 0]]],
        input_boxes=[[box]],
        return_tensors="pt",
    )
    prompts = PromptSet(
        [ObjectPrompt(points=[Point(*pts[0]), Point(*pts[1], positive=False)], boxes=[Box(*box)])],
        image_size=(640, 480),
    )
    arrays = prompts.to_arrays(RLS)
    np.testing.assert_allclose(arrays["points"], ref["input_points"][0].numpy(), rtol=1e-6)
    np.testing.assert_array_equal(arrays["labels"], ref["input_labels"][0].numpy())
    np.testing.assert_allclose(arrays["boxes"], ref["input_boxes"][0].numpy(), rtol=1e-6)
    assert arrays["resized_size"] == tuple(ref["reshaped_input_sizes"][0].tolist())
    assert arrays["original_size"] == tuple(ref["original_sizes"][0].tolist())


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (1000, 10), (333, 777)])
def test_round_trip_original_resized_original(size):
    rng = np.random.default_rng(1)
    pts = rng.uniform(0, 1, (7, 2)) * size
    back = RLS.unapply_points(RLS.apply_points(pts, size), size)
    np.testing.assert_allclose(back, pts, rtol=1e-12, atol=1e-9)
    boxes = np.array([[0, 0, size[0], size[1]], [1.5, 2.5, 3.5, 4.5]])
    np.testing.assert_allclose(RLS.unapply_boxes(RLS.apply_boxes(boxes, size), size), boxes)
    # The image corner lands exactly on the resized corner.
    assert tuple(RLS.apply_points([size], size)[0]) == RLS.resized_size(*size)


def test_postprocess_sizes_match_transformers(sam_processor):
    import torch
    import torch.nn.functional as F

    plan = RLS.postprocess_sizes((640, 480))
    assert plan.padded == (1024, 1024)
    assert plan.crop == (768, 1024)
    assert plan.original == (480, 640)
    assert plan.low_res == (256, 256)
    assert plan.low_res_crop == (192.0, 256.0)
    low = torch.randn(2, 1, 256, 256)  # objects x 1 x 256 x 256, one image
    ref = sam_processor.image_processor.post_process_masks(
        [low], [plan.original], [plan.crop], binarize=False
    )[0]
    x = F.interpolate(low, plan.padded, mode="bilinear", align_corners=False)
    x = x[..., : plan.crop[0], : plan.crop[1]]
    x = F.interpolate(x, plan.original, mode="bilinear", align_corners=False)
    torch.testing.assert_close(x, ref)


def test_mask_to_low_res_covers_resized_region_only():
    mask = np.ones((480, 640), dtype=bool)
    low = RLS.mask_to_low_res(mask, (640, 480))
    assert low.shape == (256, 256)
    assert (low[:192] > 0).all()  # 768 / 4 rows hold the image
    assert (low[192:] < 0).all()  # the padding is background
    half = np.zeros((480, 640), dtype=bool)
    half[:, :320] = True
    low = RLS.mask_to_low_res(half, (640, 480))
    assert (low[:192, :128] > 0).all()
    assert (low[:192, 128:] < 0).all()
    with pytest.raises(PromptError, match=r"expected shape \(H, W\) = \(480, 640\)"):
        RLS.mask_to_low_res(np.ones((640, 480), dtype=bool), (640, 480))


def test_transform_input_errors():
    with pytest.raises(PromptError, match="N x 2"):
        RLS.apply_points(np.zeros((3, 3)), (10, 10))
    with pytest.raises(PromptError, match="finite"):
        RLS.apply_points([[np.nan, 1.0]], (10, 10))
    with pytest.raises(PromptError, match=r"image_size.*positive"):
        RLS.scale((0, 10))
    with pytest.raises(PromptError, match="target"):
        ResizeLongestSide(target=0)


# --------------------------------------------------------------------------- validation


def _set(*objects, size=(640, 480)):
    return PromptSet(list(objects), image_size=size)


@pytest.mark.parametrize(
    ("point", "index"),
    [(Point(-0.1, 5), 1), (Point(5, -1), 1), (Point(640.5, 5), 1), (Point(5, 480.01), 1)],
)
def test_out_of_image_point_names_object_and_point(point, index):
    good = ObjectPrompt(points=[Point(1, 1)])
    with pytest.raises(PromptError, match=rf"object {index}: point \({point.x}, {point.y}\)"):
        _set(good, ObjectPrompt(points=[point]))


def test_image_edges_are_inside():
    _set(ObjectPrompt(points=[Point(0, 0), Point(640, 480)], boxes=[Box(0, 0, 640, 480)]))


def test_box_outside_image():
    with pytest.raises(PromptError, match=r"object 0: box .* outside the image \[0, 640\]"):
        _set(ObjectPrompt(boxes=[Box(10, 10, 700, 20)]))


@pytest.mark.parametrize("coords", [(5, 5, 5, 10), (5, 5, 10, 5), (10, 5, 5, 10), (5, 10, 10, 5)])
def test_inverted_or_empty_box(coords):
    with pytest.raises(PromptError, match="inverted or empty box"):
        Box(*coords)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_anywhere(bad):
    with pytest.raises(PromptError, match="finite"):
        Point(bad, 1)
    with pytest.raises(PromptError, match="finite"):
        Box(0, 0, 1, bad)
    with pytest.raises(PromptError, match="finite"):
        Scribble([(0, 0), (bad, 1)])
    with pytest.raises(PromptError, match="finite"):
        Mask(np.full((2, 2), bad))
    logits = np.zeros((256, 256), dtype=np.float32)
    logits[3, 4] = bad
    with pytest.raises(PromptError, match="finite"):
        MaskLogits(logits)


def test_empty_object_and_empty_set():
    with pytest.raises(PromptError, match="empty"):
        ObjectPrompt()
    with pytest.raises(PromptError, match="at least one object"):
        PromptSet([], image_size=(10, 10))


def test_more_than_one_box():
    with pytest.raises(PromptError, match="at most one box per object, got 2"):
        ObjectPrompt(boxes=[Box(0, 0, 1, 1), Box(1, 1, 2, 2)])


def test_mask_of_wrong_size_names_expected_and_got():
    mask = Mask(np.ones((640, 480), dtype=bool))
    with pytest.raises(
        PromptError,
        match=r"object 0: mask has shape \(640, 480\), expected \(H, W\) = \(480, 640\)",
    ):
        _set(ObjectPrompt(mask=mask))


def test_mask_dtypes():
    assert Mask(np.array([[0, 255]], dtype=np.uint8)).array.tolist() == [[False, True]]
    assert Mask(np.array([[0.2, 0.7]])).array.tolist() == [[False, True]]
    with pytest.raises(PromptError, match=r"\[0, 1\]"):
        Mask(np.array([[0.0, 1.5]]))
    with pytest.raises(PromptError, match="0/1 or 0/255"):
        Mask(np.array([[0, 7]], dtype=np.uint8))
    with pytest.raises(PromptError, match="2-D"):
        Mask(np.ones((2, 2, 2), dtype=bool))
    with pytest.raises(PromptError, match="square low-res"):
        MaskLogits(np.zeros((64, 32)))
    assert MaskLogits(np.zeros((64, 64))).array.shape == (64, 64)  # a small model's decoder
    assert MaskLogits(np.zeros((1, 256, 256))).array.shape == (256, 256)


def test_mask_and_logits_together_and_wrong_types():
    with pytest.raises(PromptError, match="not both"):
        ObjectPrompt(mask=Mask(np.ones((2, 2), bool)), logits=MaskLogits(np.zeros((256, 256))))
    with pytest.raises(PromptError, match="must be Point"):
        ObjectPrompt(points=[(1, 2)])


# --------------------------------------------------------------------------- scribbles


def test_scribble_points_even_along_polyline():
    s = Scribble([(0, 0), (10, 0), (10, 10)], positive=False)
    pts = s.to_points(max_points=5)  # length 20 -> every 5 px
    assert [(p.x, p.y) for p in pts] == [(0, 0), (5, 0), (10, 0), (10, 5), (10, 10)]
    assert all(not p.positive for p in pts)
    assert len(s.to_points()) == 8
    assert (s.to_points()[0].x, s.to_points()[-1].y) == (0, 10)


def test_scribble_points_deduplicated():
    assert len(Scribble([(3, 4), (3, 4), (3, 4)]).to_points(8)) == 1
    assert len(Scribble([(3, 4)]).to_points(8)) == 1
    assert len(Scribble([(0, 0), (1, 0)]).to_points(1)) == 1


def test_scribble_rasterization():
    mask = Scribble([(2, 5), (8, 5)], width=2).to_mask((10, 10))
    assert mask.shape == (10, 10)
    # pixel centres within 1 px of the segment y=5, x in [2, 8]: rows 4 and 5 (centres 4.5, 5.5)
    expected = np.zeros((10, 10), bool)
    expected[4:6, 2:8] = True
    expected[4:6, 1] = (1.5 - 2) ** 2 + 0.5**2 <= 1  # round caps
    expected[4:6, 8] = (8.5 - 8) ** 2 + 0.5**2 <= 1
    np.testing.assert_array_equal(mask, expected)
    assert not Scribble([(50, 50)], width=3).to_mask((10, 10)).any()  # off-image dot


def test_from_scribbles_default_points_and_optional_mask():
    pos = Scribble([(2, 5), (8, 5)], width=2)
    neg = Scribble([(5, 0), (5, 10)], positive=False, width=2)
    obj = ObjectPrompt.from_scribbles([pos, neg], max_points=3)
    assert obj.mask is None
    assert [p.positive for p in obj.points] == [True] * 3 + [False] * 3
    with_mask = ObjectPrompt.from_scribbles([pos, neg], use="points+mask", image_size=(10, 10))
    assert with_mask.mask is not None
    assert with_mask.mask.array[4, 2]
    assert not with_mask.mask.array[4, 5]
    with pytest.raises(PromptError, match="needs image_size"):
        ObjectPrompt.from_scribbles([pos], use="points+mask")
    with pytest.raises(PromptError, match="at least one scribble"):
        ObjectPrompt.from_scribbles([])
    with pytest.raises(PromptError, match="width"):
        Scribble([(0, 0)], width=0)


# --------------------------------------------------------------------------- batching


def test_padding_many_objects_with_different_point_counts():
    objs = [
        ObjectPrompt(points=[Point(10, 10)]),
        ObjectPrompt(points=[Point(20, 20), Point(30, 30, positive=False), Point(40, 40)]),
        ObjectPrompt(points=[Point(0, 0), Point(640, 480)]),
    ]
    arrays = _set(*objs).to_arrays(RLS)
    assert arrays["points"].shape == (3, 3, 2)
    assert arrays["labels"].tolist() == [[1, -10, -10], [1, 0, 1], [1, 1, -10]]
    assert (arrays["points"][0, 1:] == POINT_PAD_LABEL).all()
    np.testing.assert_allclose(arrays["points"][2, :2], [[0, 0], [1024, 768]])
    np.testing.assert_allclose(arrays["points"][1, 2], [64, 64])
    assert arrays["boxes"] is None
    assert arrays["masks"] is None


def test_boxes_and_masks_batched():
    logits = np.full((256, 256), 3.0, dtype=np.float32)
    objs = [
        ObjectPrompt(boxes=[Box(0, 0, 320, 240)], logits=MaskLogits(logits)),
        ObjectPrompt(boxes=[Box(10, 20, 30, 40)], mask=Mask(np.ones((480, 640), bool))),
    ]
    arrays = _set(*objs).to_arrays()
    assert arrays["points"] is None
    assert arrays["labels"] is None
    np.testing.assert_allclose(arrays["boxes"], [[0, 0, 512, 384], [16, 32, 48, 64]])
    assert arrays["masks"].shape == (2, 1, 256, 256)
    assert (arrays["masks"][0, 0] == 3.0).all()
    assert (arrays["masks"][1, 0, :192] > 0).all()
    assert (arrays["masks"][1, 0, 192:] < 0).all()


def test_mixed_kinds_refused_and_split_into_groups():
    objs = [
        ObjectPrompt(points=[Point(1, 1)]),
        ObjectPrompt(points=[Point(2, 2)], boxes=[Box(0, 0, 5, 5)]),
        ObjectPrompt(points=[Point(3, 3), Point(4, 4)]),
        ObjectPrompt(boxes=[Box(0, 0, 5, 5)]),
        ObjectPrompt(points=[Point(5, 5)]),
    ]
    prompts = _set(*objs)
    with pytest.raises(PromptError, match="groups"):
        prompts.to_arrays()
    groups = prompts.groups()
    # Same kind AND same number of points, so no group needs padding points.
    assert [g.indices for g in groups] == [(0, 4), (1,), (2,), (3,)]
    assert sum(len(g.prompts) for g in groups) == 5
    assert groups[0].prompts.to_arrays()["labels"].tolist() == [[1], [1]]
    assert groups[1].prompts.to_arrays()["boxes"].shape == (1, 4)
    # to_arrays itself still pads a same-kind set with different point counts.
    padded = _set(objs[0], objs[2]).to_arrays()
    assert padded["labels"].tolist() == [[1, -10], [1, 1]]


def test_square_frame_sam2_hand_computed_both_orientations():
    from vprompt.prompts.resize import ResizeSquare

    frame = ResizeSquare(target=1024, low_res=256)
    for size in ((640, 480), (480, 640)):
        w, h = size
        assert frame.resized_size(w, h) == (1024, 1024)  # stretched, not padded
        pts = frame.apply_points([[w, h], [w / 2, h / 4]], size)
        np.testing.assert_allclose(pts, [[1024, 1024], [512, 256]])
        boxes = frame.apply_boxes([[0, 0, w / 4, h]], size)
        np.testing.assert_allclose(boxes, [[0, 0, 256, 1024]])
        np.testing.assert_allclose(frame.unapply_points(pts, size), [[w, h], [w / 2, h / 4]])
        plan = frame.postprocess_sizes(size)
        assert plan.direct
        assert plan.original == (h, w)
        assert plan.crop == (1024, 1024)  # nothing to crop
    # A mask covering the left half of the image covers the left half of the low-res grid.
    mask = np.zeros((480, 640), dtype=bool)
    mask[:, :320] = True
    low = frame.mask_to_low_res(mask, (640, 480))
    assert (low[:, :128] > 0).all()
    assert (low[:, 128:] < 0).all()
    assert not RLS.postprocess_sizes((640, 480)).direct
