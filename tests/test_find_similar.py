"""Defect search from a marked example ("circle a defect, find all similar")."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vprompt.anomaly.find_similar import DefectSearch, FindSimilarConfig, region_mask
from vprompt.backbones import load_backbone
from vprompt.errors import ConfigError, PromptError
from vprompt.prompts.spatial import Scribble

SIZE = 128
CONFIG = FindSimilarConfig(pretrain_dim=48, target_dim=32, image_size=SIZE)


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("torchvision:tiny", "none")


def _scene(seed: int, blobs: list[tuple[int, int]]) -> Image.Image:
    """Grey noise with red discs (radius 14) planted at ``blobs`` (centres)."""
    rng = np.random.default_rng(seed)
    img = rng.normal(128, 12, (SIZE, SIZE, 3)).clip(0, 255)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for cx, cy in blobs:
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= 14**2
        img[disc] = (220, 30, 30)
    return Image.fromarray(img.astype(np.uint8))


def test_the_planted_twin_ranks_first_and_empty_scenes_stay_quiet(backbone):
    example = _scene(0, [(40, 40)])
    search = DefectSearch(backbone, CONFIG)
    search.add_examples([(example, region_mask(example.size, boxes=[(24, 24, 57, 57)]))])
    targets = [_scene(1, []), _scene(2, [(90, 70)]), _scene(3, [])]
    result = search.search(targets)
    assert result.regions, "the planted disc was not found"
    top = result.regions[0]
    assert top.image == 1
    x0, y0, x1, y1 = top.box
    assert x0 <= 90 <= x1
    assert y0 <= 70 <= y1
    assert top.mask[70, 90]
    # Heat maps are in each image's own pixels; the disc is the hottest place of its image.
    heat = result.heatmaps[1]
    assert heat.shape == (SIZE, SIZE)
    assert heat[60:80, 80:100].mean() > heat.mean() + 0.05
    # Nothing in the noise-only images beats the planted twin.
    assert all(r.score < top.score for r in result.regions if r.image != 1)


def test_margins_are_nearest_positive_minus_nearest_clean_cell(backbone):
    example = _scene(0, [(40, 40)])
    mask = region_mask(example.size, boxes=[(20, 20, 60, 60)])
    search = DefectSearch(backbone, CONFIG)
    search.add_examples([(example, mask)])
    target = _scene(5, [(60, 60)])
    feats = search._embed([target])[0].reshape(-1, 32)
    ex = search._embed([example])[0]  # h x w x D, normalised
    cover = F.adaptive_avg_pool2d(
        torch.from_numpy(mask.astype(np.float32))[None, None], ex.shape[:2]
    )[0, 0]
    pos = ex[cover >= 0.5 * cover.max()]  # relative coverage
    h, w = cover.shape
    marked = [(y, x) for y in range(h) for x in range(w) if cover[y, x] > 0]
    clean = torch.tensor(
        [
            [all(max(abs(y - my), abs(x - mx)) > 2 for my, mx in marked) for x in range(w)]
            for y in range(h)
        ]
    )  # two cells of guard around the mark
    neg = ex[clean]
    assert 0 < len(neg) < h * w - len(marked)
    want = (feats @ pos.T).max(1).values - (feats @ neg.T).max(1).values
    torch.testing.assert_close(search.margins([target]).reshape(-1), want)


def test_a_thin_mark_still_has_positive_cells(backbone):
    """A 3 px stroke covers no 8 px cell by half: the cells it covers best are the positives."""
    example = _scene(0, [])
    thin = region_mask(example.size, scribbles=[Scribble([(20, 60), (100, 60)], width=3)])
    search = DefectSearch(backbone, CONFIG)
    search.add_examples([(example, thin)])
    assert search.positives is not None
    assert 8 <= search.positives.shape[0] <= 24  # about one cell per 8 px along the stroke


def test_scribbles_and_masks_mark_regions():
    size = (40, 30)
    stroke = Scribble([(5, 5), (20, 5)], width=4)
    marked = region_mask(size, scribbles=[stroke], masks=[np.eye(30, 40, dtype=bool)])
    assert marked[5, 10]
    assert marked[7, 7]
    assert not marked[20, 5]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"boxes": [(0, 0, 50, 10)]}, "not inside the 40x30 image"),
        ({"boxes": [(10, 10, 5, 20)]}, "not inside"),
        ({"masks": [np.ones((3, 3), bool)]}, "mask is 3x3"),
        ({}, "empty"),
    ],
)
def test_bad_marks_are_refused_in_one_line(kwargs, message):
    with pytest.raises(PromptError, match=message):
        region_mask((40, 30), **kwargs)


def test_bad_settings_and_missing_examples(backbone):
    with pytest.raises(ConfigError):
        FindSimilarConfig(threshold=5)
    with pytest.raises(ConfigError, match="guard"):
        FindSimilarConfig(guard=-1)
    search = DefectSearch(backbone, CONFIG)
    with pytest.raises(PromptError, match="add_examples"):
        search.margins([_scene(0, [])])
    with pytest.raises(PromptError, match="at least one"):
        search.add_examples([])


def test_regions_refine_into_segmenter_masks(backbone):
    from vprompt.segment.segmenter import Segmenter

    example = _scene(0, [(40, 40)])
    search = DefectSearch(backbone, CONFIG)
    search.add_examples([(example, region_mask(example.size, boxes=[(24, 24, 57, 57)]))])
    seg = Segmenter.load("sam:tiny", "none", device="cpu")
    result = search.search([_scene(2, [(90, 70)])], segmenter=seg)
    assert result.regions
    assert all(r.refined for r in result.regions)
    assert result.regions[0].mask.shape == (SIZE, SIZE)
