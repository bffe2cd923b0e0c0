"""The ``SamPredictor`` façade: Meta's API on vprompt's SAM family, adding nothing numerically."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import vprompt
from vprompt.backbones import load_backbone
from vprompt.errors import PromptError
from vprompt.prompts.spatial import Box, MaskLogits, ObjectPrompt, Point, PromptSet
from vprompt.segment.predictor import SamPredictor, resolve_name
from vprompt.segment.segmenter import Segmenter

W, H = 240, 180


def _photo(w: int = W, h: int = H, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx * 3 + yy) % 256], axis=-1)
    noise = rng.integers(0, 40, size=(h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def backbones():  # type: ignore[no-untyped-def]
    return {}


def _get(backbones, name):  # type: ignore[no-untyped-def]
    if name not in backbones:
        backbones[name] = load_backbone(name, "none", device="cpu")
    return backbones[name]


def _seg(backbones, name):  # type: ignore[no-untyped-def]
    key = f"segmenter|{name}"
    if key not in backbones:  # one embedding cache per model for the whole module
        backbones[key] = Segmenter(_get(backbones, name))
    return backbones[key]


@pytest.fixture(scope="module")
def tiny(backbones):  # type: ignore[no-untyped-def]
    predictor = SamPredictor(_get(backbones, "sam:tiny"))
    predictor.set_image(_photo())
    return predictor


def test_exported_from_the_package():
    assert vprompt.SamPredictor is SamPredictor


def test_outputs_have_the_documented_shapes_and_dtypes(tiny):
    low = tiny.model.frame.low_res
    assert tiny.is_image_set
    assert tiny.original_size == (H, W)
    assert tiny.input_size == (192, 256)  # long side 256 for the tiny model
    emb = tiny.get_image_embedding()
    assert emb.ndim == 4
    assert emb.shape[0] == 1
    assert tiny.features is emb

    masks, iou, low_res = tiny.predict(np.array([[60, 70]]), np.array([1]))
    assert masks.shape == (3, H, W)
    assert masks.dtype == np.bool_
    assert iou.shape == (3,)
    assert iou.dtype == np.float32
    assert low_res.shape == (3, low, low)
    assert low_res.dtype == np.float32

    one, iou1, low1 = tiny.predict(np.array([[60, 70]]), np.array([1]), multimask_output=False)
    assert one.shape == (1, H, W)
    assert iou1.shape == (1,)
    assert low1.shape == (1, low, low)

    logits, iou_l, _ = tiny.predict(np.array([[60, 70]]), np.array([1]), return_logits=True)
    assert logits.shape == (3, H, W)
    assert logits.dtype == np.float32
    np.testing.assert_array_equal(logits > 0, masks)
    np.testing.assert_array_equal(iou_l, iou)


@pytest.mark.parametrize(
    ("coords", "labels", "box"),
    [
        ([[60, 70]], [1], None),
        ([[30, 40], [200, 150]], [1, 0], None),
        (None, None, [20, 30, 180, 160]),
        ([[100, 90]], [1], [20, 30, 180, 160]),
    ],
    ids=["click", "two-clicks", "box", "click+box"],
)
def test_predict_equals_vprompt_decode(backbones, tiny, coords, labels, box):
    seg = _seg(backbones, "sam:tiny")
    image = _photo()
    obj = ObjectPrompt(
        points=[
            Point(x, y, positive=bool(lab))
            for (x, y), lab in zip(coords or [], labels or [], strict=True)
        ],
        boxes=[Box(*box)] if box else [],
    )
    expected = seg.decode(Image.fromarray(image), PromptSet([obj], image_size=(W, H)))
    masks, iou, low = tiny.predict(
        None if coords is None else np.array(coords, dtype=float),
        None if labels is None else np.array(labels),
        None if box is None else np.array(box, dtype=float),
    )
    np.testing.assert_array_equal(low, expected.logits[0])
    np.testing.assert_array_equal(iou, expected.iou[0])
    np.testing.assert_array_equal(masks, expected.masks[0])


@pytest.mark.parametrize("name", ["sam:tiny-hq", "sam:tiny-sam2"])
def test_other_families_match_their_decode_path(backbones, name):
    backbone = _get(backbones, name)
    predictor = SamPredictor(backbone)
    image = _photo(200, 260, seed=3)
    predictor.set_image(image)
    masks, iou, low = predictor.predict(
        np.array([[50.0, 120.0]]), np.array([1]), box=np.array([10, 20, 150, 240])
    )
    side = backbone.frame.low_res
    assert masks.shape == (3, 260, 200)
    assert masks.dtype == np.bool_
    assert iou.shape == (3,)
    assert low.shape == (3, side, side)
    obj = ObjectPrompt(points=[Point(50.0, 120.0)], boxes=[Box(10, 20, 150, 240)])
    expected = _seg(backbones, name).decode(
        Image.fromarray(image), PromptSet([obj], image_size=(200, 260))
    )
    np.testing.assert_array_equal(low, expected.logits[0])
    np.testing.assert_array_equal(masks, expected.masks[0])


def test_bgr_equals_rgb_of_the_flipped_image(backbones):
    predictor = SamPredictor(_get(backbones, "sam:tiny"))
    image = _photo(seed=1)
    predictor.set_image(image)
    rgb = predictor.predict(np.array([[80, 60]]), np.array([1]))
    predictor.set_image(np.ascontiguousarray(image[..., ::-1]), image_format="BGR")
    bgr = predictor.predict(np.array([[80, 60]]), np.array([1]))
    for a, b in zip(rgb, bgr, strict=True):
        np.testing.assert_array_equal(a, b)
    predictor.set_image(Image.fromarray(image))  # PIL images are accepted too
    for a, b in zip(rgb, predictor.predict(np.array([[80, 60]]), np.array([1])), strict=True):
        np.testing.assert_array_equal(a, b)


def test_mask_input_round_trip_matches_refinement(backbones, tiny):
    seg = _seg(backbones, "sam:tiny")
    _masks, iou, low = tiny.predict(np.array([[60, 70]]), np.array([1]))
    best = int(np.argmax(iou))
    clicks = np.array([[60, 70], [150, 120]])
    labels = np.array([1, 0])
    refined = tiny.predict(clicks, labels, mask_input=low[best][None], multimask_output=False)
    plain = tiny.predict(clicks, labels, multimask_output=False)
    assert not np.allclose(refined[2], plain[2])

    emb = seg.embed_image(Image.fromarray(_photo()))
    first = seg.decode(emb, PromptSet([ObjectPrompt(points=[Point(60, 70)])], image_size=(W, H)))
    points = [Point(60, 70), Point(150, 120, positive=False)]
    obj = ObjectPrompt(points=points, logits=first.prompt_logits(0))
    expected = seg.decode(emb, PromptSet([obj], image_size=(W, H)), multimask=False)
    np.testing.assert_array_equal(refined[2], expected.logits[0])
    np.testing.assert_array_equal(refined[0], expected.masks[0])
    # A mask input alone is a prompt, as in Meta's predictor.
    alone = tiny.predict(mask_input=low[best][None], multimask_output=False)
    only = ObjectPrompt(logits=MaskLogits(low[best]))
    expected = seg.decode(emb, PromptSet([only], image_size=(W, H)), multimask=False)
    np.testing.assert_array_equal(alone[2], expected.logits[0])


def test_predict_torch_batches_boxes_mapped_with_transform(backbones, tiny):
    boxes = torch.tensor([[20.0, 30.0, 180.0, 160.0], [5.0, 5.0, 90.0, 100.0]])
    mapped = tiny.transform.apply_boxes_torch(boxes, (H, W))
    masks, iou, low = tiny.predict_torch(None, None, boxes=mapped, multimask_output=False)
    side = tiny.model.frame.low_res
    assert masks.shape == (2, 1, H, W)
    assert masks.dtype == torch.bool
    assert iou.shape == (2, 1)
    assert low.shape == (2, 1, side, side)
    for i in range(2):
        single = tiny.predict(box=boxes[i].numpy(), multimask_output=False)
        np.testing.assert_allclose(low[i].numpy(), single[2], rtol=1e-5, atol=1e-5)
    coords = tiny.transform.apply_coords(np.array([[60, 70]]), (H, W))
    np.testing.assert_allclose(coords, [[64.0, 74.666667]], rtol=1e-6)


def test_set_torch_image_takes_the_transformed_image(backbones):
    predictor = SamPredictor(_get(backbones, "sam:tiny"))
    image = _photo(seed=2)
    resized = predictor.transform.apply_image(image)
    assert resized.shape == (192, 256, 3)
    assert resized.dtype == np.uint8
    tensor = torch.as_tensor(resized).permute(2, 0, 1).contiguous()[None]
    predictor.set_torch_image(tensor, image.shape[:2])
    assert predictor.original_size == (H, W)
    assert predictor.input_size == (192, 256)
    from_torch = predictor.predict(np.array([[60, 70]]), np.array([1]))
    predictor.set_image(image)
    from_numpy = predictor.predict(np.array([[60, 70]]), np.array([1]))
    # The processor keeps an image already at the frame's size: same pixels, same result.
    for a, b in zip(from_torch, from_numpy, strict=True):
        np.testing.assert_array_equal(a, b)
    _raises("long side is 256", predictor.set_torch_image, tensor[..., :100], image.shape[:2])
    _raises("maps to", predictor.set_torch_image, tensor[:, :, :100], image.shape[:2])


def _raises(match: str, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    with pytest.raises(PromptError, match=match) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, AssertionError)  # what Meta's predictor raises
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__ or info.value.__context__ is None


def test_errors_are_clear(backbones):
    predictor = SamPredictor(_get(backbones, "sam:tiny"))
    for call in (
        lambda: predictor.predict(np.array([[1, 1]]), np.array([1])),
        predictor.get_image_embedding,
        lambda: predictor.predict_torch(None, None, boxes=torch.zeros(1, 4)),
    ):
        with pytest.raises(RuntimeError, match=r"call set_image\(\.\.\.\)"):
            call()
    image = _photo()
    _raises("image_format", predictor.set_image, image, image_format="HSV")
    _raises("uint8", predictor.set_image, image.astype(np.float32))
    _raises("H x W x 3", predictor.set_image, image[..., 0])
    predictor.set_image(image)
    pts = np.array([[10, 20], [30, 40]])
    _raises("point_labels must be given", predictor.predict, pts)
    _raises(r"expected shape \(2,\)", predictor.predict, pts, np.array([1]))
    _raises("N x 2", predictor.predict, np.array([1, 2, 3]), np.array([1]))
    _raises("-1 .ignored.", predictor.predict, pts, np.array([1, 5]))
    _raises("finite", predictor.predict, np.array([[np.nan, 1]]), np.array([1]))
    _raises("length-4", predictor.predict, box=np.array([1, 2, 3]))
    _raises(
        r"1 x 64 x 64", predictor.predict, pts, np.array([1, 1]), mask_input=np.zeros((256, 256))
    )
    _raises("at least one", predictor.predict)
    predictor.reset_image()
    assert not predictor.is_image_set
    assert predictor.original_size is None
    with pytest.raises(RuntimeError, match="no image is set"):
        predictor.predict(pts, np.array([1, 1]))


def test_a_segment_anything_script_runs_unchanged(backbones, tmp_path):
    script = textwrap.dedent(
        """
        import numpy as np
        import torch

        predictor = SamPredictor(sam)
        image = np.zeros((120, 160, 3), dtype=np.uint8)
        image[30:90, 40:120] = (200, 60, 30)
        predictor.set_image(image)
        input_point = np.array([[80, 60]])
        input_label = np.array([1])
        masks, scores, logits = predictor.predict(
            point_coords=input_point,
            point_labels=input_label,
            multimask_output=True,
        )
        assert masks.shape[0] == scores.shape[0] == logits.shape[0] == 3
        mask_input = logits[np.argmax(scores), :, :]
        masks, _, _ = predictor.predict(
            point_coords=np.array([[80, 60], [20, 20]]),
            point_labels=np.array([1, 0]),
            mask_input=mask_input[None, :, :],
            multimask_output=False,
        )
        box_masks, _, _ = predictor.predict(
            point_coords=None, point_labels=None, box=np.array([40, 30, 120, 90])[None, :],
            multimask_output=False,
        )
        input_boxes = torch.tensor([[40, 30, 120, 90], [0, 0, 60, 50]], device=predictor.device)
        transformed_boxes = predictor.transform.apply_boxes_torch(input_boxes, image.shape[:2])
        batch, _, _ = predictor.predict_torch(
            point_coords=None, point_labels=None, boxes=transformed_boxes, multimask_output=False
        )
        embedding = predictor.get_image_embedding()
        result = (masks.shape, box_masks.shape, tuple(batch.shape), embedding.shape[0])
        """
    )
    namespace = {"SamPredictor": SamPredictor, "sam": _get(backbones, "sam:tiny")}
    exec(compile(script, "segment_anything_script.py", "exec"), namespace)
    assert namespace["result"] == ((1, 120, 160), (1, 120, 160), (2, 1, 120, 160), 1)


def test_from_name_and_meta_model_types(backbones):
    predictor = SamPredictor.from_name("sam:tiny", "none", device="cpu")
    assert predictor.model.fingerprint() == _get(backbones, "sam:tiny").fingerprint()
    assert resolve_name("sam:vit_b") == "sam:vit-base"
    assert resolve_name("vit_h") == "sam:vit-huge"
    assert resolve_name("sam:tiny-hq") == "sam:tiny-hq"
    # A Segmenter is accepted as well, and its precision/cache are used.
    seg = Segmenter(_get(backbones, "sam:tiny"))
    assert SamPredictor(seg).segmenter is seg
