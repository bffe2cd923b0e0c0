"""Segment everything: SAM's automatic mask generator, checked with a stub and with sam:tiny."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from vprompt.errors import ConfigError
from vprompt.prompts.spatial import ObjectPrompt, Point, PromptSet
from vprompt.segment.automatic import (
    AutomaticMaskConfig,
    AutomaticMaskGenerator,
    MaskRecord,
    crop_boxes,
    point_grid,
    remove_small_regions,
)
from vprompt.segment.segmenter import (
    ImageEmbedding,
    Segmentation,
    Segmenter,
    stability_score,
    upsample_logits,
)

SIZE = (300, 200)  # (W, H)
Candidate = tuple[np.ndarray, float, float]  # full-image mask, predicted IoU, stability


def _rect(x0: int, y0: int, x1: int, y1: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    mask = np.zeros((size[1], size[0]), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


EMPTY = _rect(0, 0, 0, 0)


def _coded_image(size: tuple[int, int] = SIZE) -> Image.Image:
    """Pixels encode their own position, so a crop tells the stub where it came from."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([xx % 256, yy, xx // 256], axis=-1).astype(np.uint8))


class StubSegmenter:
    """Returns ``candidates(x, y)`` (full-image point → three full-image candidates), cut to
    whichever crop was embedded."""

    def __init__(self, candidates: Callable[[float, float], list[Candidate]]) -> None:
        self.candidates = candidates
        self.batches: list[int] = []

    def embed_image(self, image: Image.Image) -> ImageEmbedding:
        corner = np.asarray(image)[0, 0].astype(int)
        x0, y0 = int(corner[0] + 256 * corner[2]), int(corner[1])
        w, h = image.size
        return ImageEmbedding(key=f"{x0},{y0}", image_size=(w, h), parts={})

    def decode(
        self, image: ImageEmbedding, prompts: PromptSet, *, multimask: bool = True
    ) -> Segmentation:
        assert multimask
        x0, y0 = (int(v) for v in image.key.split(","))
        w, h = image.image_size
        n = len(prompts)
        masks = np.zeros((n, 3, h, w), dtype=bool)
        iou = np.zeros((n, 3), dtype=np.float32)
        stab = np.zeros((n, 3), dtype=np.float32)
        for i, obj in enumerate(prompts.objects):
            (p,) = obj.points
            assert p.positive
            for k, (mask, score, stable) in enumerate(self.candidates(p.x + x0, p.y + y0)):
                masks[i, k] = mask[y0 : y0 + h, x0 : x0 + w]
                iou[i, k], stab[i, k] = score, stable
        self.batches.append(n)
        logits = np.zeros((n, 3, 4, 4), dtype=np.float32)
        return Segmentation(masks=masks, logits=logits, iou=iou, stability=stab)


def _generate(candidates: Callable[[float, float], list[Candidate]], **options: object):
    stub = StubSegmenter(candidates)
    config = AutomaticMaskConfig(**options)  # type: ignore[arg-type]
    return AutomaticMaskGenerator(stub, config=config).generate(_coded_image()), stub


def test_defaults_are_sams():
    cfg = AutomaticMaskConfig()
    assert (cfg.points_per_side, cfg.points_per_batch) == (32, 64)
    assert (cfg.pred_iou_thresh, cfg.stability_score_thresh) == (0.88, 0.95)
    assert (cfg.stability_score_offset, cfg.box_nms_thresh, cfg.crop_nms_thresh) == (1.0, 0.7, 0.7)
    assert (cfg.crop_n_layers, cfg.crop_n_points_downscale_factor) == (0, 1)
    assert cfg.crop_overlap_ratio == 512 / 1500
    assert cfg.min_mask_region_area == 0


def test_point_grid_is_pixel_centred_row_by_row():
    np.testing.assert_allclose(point_grid(1), [[0.5, 0.5]])
    np.testing.assert_allclose(
        point_grid(2), [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]
    )
    grid = point_grid(4)
    np.testing.assert_allclose(grid[:4, 0], [1 / 8, 3 / 8, 5 / 8, 7 / 8])
    np.testing.assert_allclose(grid[::4, 1], [1 / 8, 3 / 8, 5 / 8, 7 / 8])
    cfg = AutomaticMaskConfig(points_per_side=32, crop_n_layers=2, crop_n_points_downscale_factor=2)
    assert cfg.points_per_layer() == [32, 16, 8]


def test_crop_boxes_one_layer_by_hand():
    # short side 200: overlap int(512/1500 * 200) = 68; crops ceil((68 + 300) / 2) = 184 wide,
    # ceil((68 + 200) / 2) = 134 high, starting at 0 and 184 - 68 = 116 (x), 0 and 66 (y).
    crops = crop_boxes(SIZE, 1, 512 / 1500)
    assert [c.box for c in crops] == [
        (0, 0, 300, 200),
        (0, 0, 184, 134),
        (0, 66, 184, 200),
        (116, 0, 300, 134),
        (116, 66, 300, 200),
    ]
    assert [c.layer for c in crops] == [0, 1, 1, 1, 1]
    assert crops[3].xywh == (116, 0, 184, 134)
    assert [c.box for c in crop_boxes(SIZE, 0, 0.5)] == [(0, 0, 300, 200)]
    assert len(crop_boxes(SIZE, 2, 512 / 1500)) == 1 + 4 + 16


def test_points_are_decoded_in_batches_and_records_are_well_formed():
    def around(x: float, y: float) -> list[Candidate]:
        sq = _rect(int(x) - 5, int(y) - 5, int(x) + 5, int(y) + 5)
        return [(sq, 1.0, 1.0), (EMPTY, 1.0, 1.0), (EMPTY, 1.0, 1.0)]

    records, stub = _generate(around, points_per_side=2, points_per_batch=3)
    assert stub.batches == [3, 1]
    assert len(records) == 4  # empty candidates never come back
    assert {r.point_coords for r in records} == {(75, 50), (225, 50), (75, 150), (225, 150)}
    for r in records:
        assert isinstance(r, MaskRecord)
        x, y = (int(v) for v in r.point_coords)
        assert r.bbox == (x - 5, y - 5, 10, 10)
        assert r.area == 100 == r.segmentation.sum()
        assert r.segmentation.shape == (200, 300)
        assert r.crop_box == (0, 0, 300, 200)


def test_box_nms_keeps_the_best_of_duplicates():
    a, a_shifted, b = _rect(50, 50, 150, 150), _rect(51, 50, 151, 150), _rect(200, 20, 260, 90)

    records, _ = _generate(
        lambda x, y: [(a, 0.9, 1.0), (a_shifted, 0.95, 1.0), (b, 0.89, 1.0)], points_per_side=1
    )
    assert [round(r.predicted_iou, 3) for r in records] == [0.95, 0.89]
    np.testing.assert_array_equal(records[0].segmentation, a_shifted)
    np.testing.assert_array_equal(records[1].segmentation, b)


def test_iou_and_stability_filters():
    # (predicted IoU, stability): IoU must be > 0.88, stability >= 0.95.
    table = {
        (75, 50): [(0.90, 0.96), (0.88, 0.99), (0.95, 0.949)],
        (225, 50): [(0.89, 0.95), (0.50, 1.00), (1.00, 0.00)],
        (75, 150): [(0.99, 0.99), (0.87, 0.99), (0.881, 0.951)],
        (225, 150): [(0.2, 0.2), (0.3, 0.3), (0.4, 0.4)],
    }

    def scored(x: float, y: float) -> list[Candidate]:
        i = list(table).index((x, y))
        return [
            (_rect(20 * (3 * i + k), 0, 20 * (3 * i + k) + 10, 10), *s)
            for k, s in enumerate(table[(x, y)])
        ]

    records, _ = _generate(scored, points_per_side=2)
    kept = {(round(r.predicted_iou, 3), round(r.stability_score, 3)) for r in records}
    assert kept == {(0.90, 0.96), (0.89, 0.95), (0.99, 0.99), (0.881, 0.951)}
    records, _ = _generate(
        scored, points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0
    )
    assert len(records) == 12


# M1 lies inside crop A = (0, 0, 184, 134); crop B = (0, 66, 184, 200) cuts it at its top edge.
# M2 touches the image's top and right edges; crop A cuts it at its right edge, and it lies
# inside crop C = (116, 0, 300, 134) where its edges are image edges.
M1, M2 = _rect(30, 30, 90, 90), _rect(150, 0, 300, 50)


def _m1_m2(x: float, y: float) -> list[Candidate]:
    return [(M1, 1.0, 1.0), (M2, 1.0, 1.0), (EMPTY, 1.0, 1.0)]


def test_crop_edge_masks_dropped_and_smaller_crops_preferred():
    records, _ = _generate(_m1_m2, points_per_side=1, crop_n_layers=1)
    assert [r.crop_box for r in records] == [(0, 0, 184, 134), (116, 0, 184, 134)]
    # Uncropped to the full image: exact masks, boxes and prompt points.
    np.testing.assert_array_equal(records[0].segmentation, M1)
    np.testing.assert_array_equal(records[1].segmentation, M2)
    assert records[0].bbox == (30, 30, 60, 60)
    assert records[1].bbox == (150, 0, 150, 50)
    assert records[0].point_coords == (92.0, 67.0)
    assert records[1].point_coords == (116 + 92.0, 67.0)


def test_whole_image_keeps_masks_at_its_edges():
    records, _ = _generate(_m1_m2, points_per_side=1)
    assert len(records) == 2
    np.testing.assert_array_equal(records[1].segmentation, M2)


def test_remove_small_regions_fills_holes_and_drops_islands():
    mask = _rect(2, 2, 12, 12, size=(20, 20))
    mask[6:8, 6:8] = False  # a 4-pixel hole
    mask[17, 17] = True  # a 1-pixel island
    mask[12, 12] = True  # diagonal neighbour: part of the square (8-connected)
    filled, changed = remove_small_regions(mask, 10, "holes")
    assert changed
    assert filled[6:8, 6:8].all()
    assert filled[17, 17]
    cleaned, changed = remove_small_regions(filled, 10, "islands")
    assert changed
    expected = _rect(2, 2, 12, 12, size=(20, 20))
    expected[12, 12] = True
    np.testing.assert_array_equal(cleaned, expected)
    same, changed = remove_small_regions(expected, 1, "islands")
    assert not changed
    assert same is expected

    two = np.zeros((10, 10), dtype=bool)
    two[0, :3] = True
    two[5, :5] = True
    largest, changed = remove_small_regions(two, 10, "islands")  # all small: keep the largest
    assert changed
    np.testing.assert_array_equal(
        largest, np.isin(np.arange(10), [5])[:, None] & (np.arange(10) < 5)
    )


def test_cleanup_prefers_masks_that_needed_none():
    clean = _rect(50, 50, 150, 150)
    islanded = clean.copy()
    islanded[180, 200] = True  # box IoU with `clean` ~0.5: both survive box NMS
    holed = _rect(200, 20, 260, 80)
    holed[40:42, 230:232] = False

    def three(x: float, y: float) -> list[Candidate]:
        return [(clean, 0.9, 1.0), (islanded, 0.99, 1.0), (holed, 0.95, 1.0)]

    raw, _ = _generate(three, points_per_side=1)
    assert len(raw) == 3
    records, _ = _generate(three, points_per_side=1, min_mask_region_area=10)
    assert len(records) == 2
    by_iou = {round(r.predicted_iou, 2): r for r in records}
    assert set(by_iou) == {0.9, 0.95}  # the repaired duplicate (0.99) lost to the clean mask
    np.testing.assert_array_equal(by_iou[0.9].segmentation, clean)
    np.testing.assert_array_equal(by_iou[0.95].segmentation, _rect(200, 20, 260, 80))
    assert by_iou[0.95].area == 60 * 60
    assert by_iou[0.95].bbox == (200, 20, 60, 60)


@pytest.mark.parametrize(
    "options",
    [
        {"points_per_side": 0},
        {"points_per_side": 2.0},
        {"points_per_batch": 0},
        {"points_per_batch": True},
        {"pred_iou_thresh": 1.5},
        {"pred_iou_thresh": -0.1},
        {"stability_score_thresh": float("nan")},
        {"stability_score_offset": 0.0},
        {"stability_score_offset": float("inf")},
        {"box_nms_thresh": 2},
        {"crop_n_layers": -1},
        {"crop_nms_thresh": "0.7"},
        {"crop_overlap_ratio": 1.0},
        {"crop_overlap_ratio": -0.1},
        {"crop_n_points_downscale_factor": 0},
        {"min_mask_region_area": -5},
        {"points_per_side": 4, "crop_n_layers": 3, "crop_n_points_downscale_factor": 2},
    ],
)
def test_bad_options_raise_config_error(options):
    with pytest.raises(ConfigError, match=next(iter(options))):
        AutomaticMaskConfig(**options)


def test_custom_offset_needs_a_real_segmenter():
    with pytest.raises(ConfigError, match="stability_score_offset"):
        AutomaticMaskGenerator(
            StubSegmenter(_m1_m2), config=AutomaticMaskConfig(stability_score_offset=0.5)
        )
    with pytest.raises(ConfigError, match="AutomaticMaskConfig"):
        AutomaticMaskGenerator(StubSegmenter(_m1_m2), config={"points_per_side": 2})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny() -> Segmenter:
    return Segmenter.load("sam:tiny", "none", device="cpu")


def _photo(w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) % 256], axis=-1)
    return Image.fromarray(np.clip(base + rng.integers(0, 40, (h, w, 3)), 0, 255).astype(np.uint8))


def test_end_to_end_on_tiny_sam(tiny):
    config = AutomaticMaskConfig(
        points_per_side=4,
        points_per_batch=8,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        crop_n_layers=1,
        crop_n_points_downscale_factor=2,
        min_mask_region_area=20,
    )
    image = _photo(*SIZE)
    records = AutomaticMaskGenerator(tiny, config=config).generate(image, progress=True)
    assert records
    crops = {c.xywh for c in crop_boxes(SIZE, 1, config.crop_overlap_ratio)}
    for r in records:
        seg = r.segmentation
        assert seg.dtype == bool
        assert seg.shape == (200, 300)
        assert r.area == int(seg.sum()) > 0
        x, y, w, h = r.bbox
        assert all(isinstance(v, int) for v in r.bbox)
        ys, xs = np.nonzero(seg)
        assert (x, y, x + w - 1, y + h - 1) == (xs.min(), ys.min(), xs.max(), ys.max())
        assert r.crop_box in crops
        cx, cy, cw, ch = r.crop_box
        assert cx <= r.point_coords[0] <= cx + cw
        assert cy <= r.point_coords[1] <= cy + ch
        assert isinstance(r.predicted_iou, float)
        assert 0.0 <= r.stability_score <= 1.0


def test_custom_stability_offset_rescores_from_logits(tiny):
    offset = 5e-6  # the random tiny model's logits are ~1e-5
    config = AutomaticMaskConfig(
        points_per_side=2,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        stability_score_offset=offset,
    )
    image = _photo(*SIZE)
    records = AutomaticMaskGenerator(tiny, config=config).generate(image)
    assert records
    emb = tiny.embed_image(image)
    plan = tiny.backbone.frame.postprocess_sizes(SIZE)
    rescored = 0
    for r in records:
        alone = tiny.decode(
            emb, PromptSet([ObjectPrompt(points=[Point(*r.point_coords)])], image_size=SIZE)
        )
        k = int(np.argmin([(m != r.segmentation).sum() for m in alone.masks[0]]))
        full = upsample_logits(torch.from_numpy(alone.logits[:, k : k + 1]), plan)
        expected = float(stability_score(full, offset=offset)[0, 0])
        assert r.stability_score == pytest.approx(expected, abs=2e-3)
        rescored += abs(expected - float(alone.stability[0, k])) > 1e-3
    assert rescored  # the offset really changed some score
