"""Mask outputs: COCO RLE (both forms), polygons, boxes, PNGs and overlays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vprompt.errors import PromptError
from vprompt.segment.outputs import (
    coco_annotations,
    decode_rle,
    encode_rle,
    encode_rle_compressed,
    mask_bbox,
    mask_to_polygons,
    overlay,
    polygons_to_mask,
    save_label_png,
    save_mask_png,
)


def test_rle_hand_computed() -> None:
    # Column-major: column 0 = [1, 1], column 1 = [0, 1] → 0 zeros, 2 ones, 1 zero, 1 one.
    m = np.array([[1, 0], [1, 1]], dtype=bool)
    assert encode_rle(m) == {"size": [2, 2], "counts": [0, 2, 1, 1]}
    assert encode_rle(np.zeros((2, 3), bool))["counts"] == [6]
    assert encode_rle(np.ones((2, 3), bool))["counts"] == [0, 6]
    # pycocotools' string for counts [0, 2, 1, 1]: 5-bit chunks + 48; from the 4th count on,
    # the delta to the count two back (1 - 2 = -1 → 0b11111 with the sign bit → "O").
    assert encode_rle_compressed(m)["counts"] == "021O"
    # A count of 40 needs two chunks: 8 | 0x20 continuation, then 1.
    assert encode_rle_compressed(np.zeros((1, 40), bool))["counts"] == "X1"
    assert decode_rle({"size": [1, 40], "counts": "X1"}).sum() == 0


@pytest.mark.parametrize("shape", [(5, 7), (1, 9), (9, 1), (37, 53)])
def test_rle_round_trips(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    for density in (0.0, 0.05, 0.5, 1.0):
        m = rng.random(shape) < density
        assert np.array_equal(decode_rle(encode_rle(m)), m)
        compressed = encode_rle_compressed(m)
        assert isinstance(compressed["counts"], str)
        assert np.array_equal(decode_rle(compressed), m)
        assert np.array_equal(
            decode_rle({**compressed, "counts": compressed["counts"].encode()}), m
        )


def test_rle_against_pycocotools_if_present() -> None:
    mask_util = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(3)
    m = rng.random((31, 17)) < 0.3
    ref = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
    assert encode_rle_compressed(m)["counts"] == ref["counts"].decode()


def test_rle_bad_input() -> None:
    with pytest.raises(PromptError, match="sum to"):
        decode_rle({"size": [2, 2], "counts": [1, 2]})
    with pytest.raises(PromptError, match="non-negative"):
        decode_rle({"size": [2, 2], "counts": [5, -1]})
    with pytest.raises(PromptError, match="positive ints"):
        decode_rle({"size": [0, 2], "counts": []})
    with pytest.raises(PromptError, match="'size' and 'counts'"):
        decode_rle({"counts": [4]})
    with pytest.raises(PromptError, match="2-D"):
        encode_rle(np.zeros((2, 2, 2), bool))


def test_bbox_and_polygons() -> None:
    rect = np.zeros((20, 30), bool)
    rect[5:10, 3:15] = True
    assert mask_bbox(rect) == [3, 5, 12, 5]
    assert mask_bbox(np.zeros((4, 4), bool)) == [0, 0, 0, 0]
    polys = mask_to_polygons(rect)
    assert len(polys) == 1
    xs, ys = polys[0][0::2], polys[0][1::2]
    assert (min(xs), max(xs), min(ys), max(ys)) == (3.0, 15.0, 5.0, 10.0)  # pixel edges
    assert np.array_equal(polygons_to_mask(polys, (30, 20)), rect)
    yy, xx = np.mgrid[0:60, 0:80]
    disc = (xx - 40) ** 2 + (yy - 30) ** 2 < 15**2
    back = polygons_to_mask(mask_to_polygons(disc, tolerance=0.5), (80, 60))
    assert (back & disc).sum() / (back | disc).sum() > 0.95
    two = disc.copy()
    two[0:5, 0:5] = True
    assert len(mask_to_polygons(two)) == 2
    ring = disc & ~((xx - 40) ** 2 + (yy - 30) ** 2 < 6**2)
    assert len(mask_to_polygons(ring)) == 1  # the hole is not a polygon of its own


def test_pngs_overlay_and_coco(tmp_path: Path) -> None:
    a = np.zeros((10, 12), bool)
    a[2:5, 2:6] = True
    b = np.zeros((10, 12), bool)
    b[4:8, 5:10] = True
    save_mask_png(a, tmp_path / "a.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")) > 0, a)
    assert set(np.unique(np.asarray(Image.open(tmp_path / "a.png"))).tolist()) == {0, 255}
    save_label_png([a, b], tmp_path / "labels.png")
    labels = np.asarray(Image.open(tmp_path / "labels.png"))
    assert labels[2, 2] == 1
    assert labels[4, 5] == 2  # later objects drawn over earlier ones
    assert labels[0, 0] == 0
    image = Image.new("RGB", (12, 10), (0, 0, 0))
    shown = np.asarray(overlay(image, [a, b], alpha=0.5, outline=False))
    assert shown[3, 3].any()
    assert not shown[0, 0].any()
    assert not np.array_equal(shown[3, 3], shown[6, 8])  # two colours
    with pytest.raises(PromptError, match="does not match"):
        overlay(Image.new("RGB", (5, 5)), [a])
    coco = coco_annotations([a, b], scores=[0.9, 0.5], size=(12, 10), file_name="x.png")
    json.dumps(coco)
    ann = coco["annotations"]
    assert [x["area"] for x in ann] == [12, 20]
    assert ann[0]["bbox"] == [2, 2, 4, 3]
    assert np.array_equal(decode_rle(ann[1]["segmentation"]), b)
    assert coco["images"][0] == {"id": 0, "width": 12, "height": 10, "file_name": "x.png"}
    poly = coco_annotations([a], size=(12, 10), form="polygon")["annotations"][0]
    assert poly["iscrowd"] == 0
    assert np.array_equal(polygons_to_mask(poly["segmentation"], (12, 10)), a)
