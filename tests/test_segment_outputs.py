"""vprompt.segment.outputs: RLE codecs, polygons, boxes, PNGs, overlays and COCO dicts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from vprompt.errors import PromptError, VPromptError
from vprompt.segment.outputs import (
    PALETTE,
    coco_annotations,
    decode_rle,
    encode_rle,
    encode_rle_compressed,
    mask_area,
    mask_bbox,
    mask_to_polygons,
    overlay,
    polygons_to_mask,
    save_label_png,
    save_mask_png,
    save_overlay,
    write_json_atomic,
)


def _disc(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 < r**2


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


# ------------------------------------------------------------------------------------- RLE


def test_rle_hand_computed() -> None:
    # Column-major: col 0 = [0, 0, 1], col 1 = [1, 1, 0] → 2 zeros, 3 ones, 1 zero.
    m = np.array([[0, 1], [0, 1], [1, 0]], dtype=bool)
    assert encode_rle(m) == {"size": [3, 2], "counts": [2, 3, 1]}
    # Foreground first → a leading 0 run.
    assert encode_rle(np.array([[1, 0], [1, 1]], bool))["counts"] == [0, 2, 1, 1]
    assert encode_rle(np.zeros((2, 3), bool)) == {"size": [2, 3], "counts": [6]}
    assert encode_rle(np.ones((2, 3), bool)) == {"size": [2, 3], "counts": [0, 6]}
    assert encode_rle(np.array([[0, 1, 1, 0, 1]], bool))["counts"] == [1, 2, 1, 1]
    assert encode_rle(np.array([[1], [0], [0], [1]], bool))["counts"] == [0, 1, 2, 1]
    assert all(type(c) is int for c in encode_rle(m)["counts"])
    assert np.array_equal(decode_rle({"size": [3, 2], "counts": [2, 3, 1]}), m)


@pytest.mark.parametrize(
    ("shape", "runs", "text"),
    [
        ((2, 2), [0, 2, 1, 1], "021O"),  # 4th run: 1 - 2 = -1 → 0b11111 → "O"
        ((1, 40), [40], "X1"),  # 40 = 8 | 1 << 5: chunk 8 + continuation, then 1
        ((1, 16), [16], "`0"),  # 16 sets the sign bit, so a 0 chunk must follow
        ((1, 112), [5, 100, 5, 2], "5T35nL"),  # 2 - 100 = -98 → chunks 30 (+0x20), 28
    ],
)
def test_rle_compressed_hand_computed(shape: tuple[int, int], runs: list[int], text: str) -> None:
    m = decode_rle({"size": list(shape), "counts": runs})
    assert encode_rle_compressed(m) == {"size": list(shape), "counts": text}
    assert np.array_equal(decode_rle({"size": list(shape), "counts": text}), m)
    assert np.array_equal(decode_rle({"size": list(shape), "counts": text.encode()}), m)


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (1, 97), (97, 1), (64, 48)])
@pytest.mark.parametrize("density", [0.0, 0.03, 0.5, 0.97, 1.0])
def test_rle_round_trips(shape: tuple[int, int], density: float) -> None:
    rng = np.random.default_rng([*shape, int(density * 100)])
    m = rng.random(shape) < density
    rle = encode_rle(m)
    assert sum(rle["counts"]) == m.size
    if m[0, 0]:
        assert rle["counts"][0] == 0
    else:
        assert rle["counts"][0] > 0
    back = decode_rle(rle)
    assert back.dtype == np.bool_
    assert np.array_equal(back, m)
    compressed = encode_rle_compressed(m)
    assert isinstance(compressed["counts"], str)
    assert np.array_equal(decode_rle(compressed), m)
    # JSON round trip keeps both forms decodable.
    assert np.array_equal(decode_rle(json.loads(json.dumps(compressed))), m)


def test_rle_accepts_numpy_counts_and_01_masks() -> None:
    m = np.array([[0, 1], [1, 1]], dtype=np.uint8)
    assert encode_rle(m)["counts"] == [1, 3]
    assert np.array_equal(decode_rle({"size": (2, 2), "counts": np.array([1, 3])}), m > 0)


def test_rle_against_pycocotools() -> None:
    mask_util = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(3)
    masks = [rng.random(s) < d for s, d in [((31, 17), 0.3), ((1, 50), 0.5), ((50, 1), 0.9)]]
    masks += [_disc(120, 90, 60, 45, 40), np.ones((3, 4), bool), np.zeros((4, 3), bool)]
    for m in masks:
        shape = m.shape
        ref = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
        assert encode_rle_compressed(m)["counts"] == ref["counts"].decode()
        assert np.array_equal(decode_rle(ref), m)
        assert mask_area(m) == int(mask_util.area(ref))
        assert mask_bbox(m) == [int(v) for v in mask_util.toBbox(ref)]
        # pycocotools turns an uncompressed RLE into the same compressed string.
        frm = mask_util.frPyObjects(encode_rle(m), *shape)
        assert frm["counts"].decode() == encode_rle_compressed(m)["counts"]


def test_rle_of_a_noisy_full_hd_mask_equals_pycocotools() -> None:
    """A million runs, long runs (large deltas, several 5-bit chunks) and blocks of the
    vectorised encoder's size: byte for byte pycocotools' string, and back."""
    mask_util = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(7)
    noisy = rng.random((1080, 1920)) < 0.5
    noisy[:, :600] = False  # runs of 648,000 pixels between the noise
    noisy[:, 1500:1700] = True
    ref = mask_util.encode(np.asfortranarray(noisy.astype(np.uint8)))
    ours = encode_rle_compressed(noisy)
    assert ours["counts"] == ref["counts"].decode()
    assert np.array_equal(decode_rle(ours), noisy)


@pytest.mark.parametrize(
    ("rle", "match"),
    [
        ({"size": [2, 2], "counts": [1, 2]}, "sum to 3, but the size 2x2 has 4"),
        ({"size": [2, 2], "counts": [1, 2, 3]}, "sum to 6"),
        ({"size": [2, 2], "counts": [5, -1]}, "non-negative"),
        ({"size": [2, 2], "counts": []}, "sum to 0"),
        ({"size": [0, 2], "counts": []}, "positive ints"),
        ({"size": [-2, -2], "counts": [4]}, "positive ints"),
        ({"size": [2.0, 2], "counts": [4]}, "positive ints"),
        ({"size": [True, 4], "counts": [4]}, "positive ints"),
        ({"size": [2, 2, 1], "counts": [4]}, "positive ints"),
        ({"size": "2x2", "counts": [4]}, "positive ints"),
        ({"size": [2, 2], "counts": [2.0, 2.0]}, "list of ints or a compressed string"),
        ({"size": [2, 2], "counts": None}, "list of ints or a compressed string"),
        ({"size": [2, 2], "counts": "0 4"}, "invalid character ' '"),
        ({"size": [2, 2], "counts": b"\xff"}, "invalid character"),
        ({"size": [1, 40], "counts": "X"}, "middle of a number"),
        ({"counts": [4]}, "'size' and 'counts'"),
        ([4], "'size' and 'counts'"),
    ],
)
def test_decode_rle_rejects_bad_input(rle: Any, match: str) -> None:
    with pytest.raises(PromptError, match=match):
        decode_rle(rle)


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        (np.zeros((2, 2, 2), bool), "2-D"),
        (np.zeros(4, bool), "2-D"),
        (np.zeros((0, 3), bool), "non-empty"),
        (np.full((2, 2), 0.5), "0/1"),
        (np.full((2, 2), 2, dtype=np.int64), "0/1"),
        (np.array([["a", "b"]]), "0/1"),
    ],
)
def test_bad_masks_are_refused_everywhere(mask: np.ndarray, match: str) -> None:
    for fn in (encode_rle, encode_rle_compressed, mask_area, mask_bbox, mask_to_polygons):
        with pytest.raises(PromptError, match=match):
            fn(mask)


# --------------------------------------------------------------------- geometry, polygons


def test_area_and_bbox() -> None:
    m = np.zeros((6, 8), bool)
    assert (mask_area(m), mask_bbox(m)) == (0, [0, 0, 0, 0])
    m[4, 2] = True
    assert (mask_area(m), mask_bbox(m)) == (1, [2, 4, 1, 1])
    m[1, 6] = True
    assert (mask_area(m), mask_bbox(m)) == (2, [2, 1, 5, 4])
    assert mask_bbox(np.ones((3, 5), bool)) == [0, 0, 5, 3]


def test_single_pixel_polygon_follows_the_pixel_convention() -> None:
    m = np.zeros((4, 5), bool)
    m[1, 2] = True  # covers x in [2, 3], y in [1, 2]; the 0.5 iso-line cuts its corners
    (poly,) = mask_to_polygons(m)
    vertices = {(poly[k], poly[k + 1]) for k in range(0, len(poly), 2)}
    assert vertices == {(2.5, 1.0), (3.0, 1.5), (2.5, 2.0), (2.0, 1.5)}
    assert np.array_equal(polygons_to_mask([poly], (5, 4)), m)


def test_rectangle_polygon_is_exact() -> None:
    rect = np.zeros((20, 30), bool)
    rect[5:10, 3:15] = True
    polys = mask_to_polygons(rect)
    assert len(polys) == 1
    xs, ys = polys[0][0::2], polys[0][1::2]
    assert (min(xs), max(xs), min(ys), max(ys)) == (3.0, 15.0, 5.0, 10.0)  # pixel edges
    back = polygons_to_mask(polys, (30, 20))
    assert back.sum() == 60
    assert np.array_equal(back, rect)
    simple = mask_to_polygons(rect, tolerance=0.75)
    assert len(simple[0]) // 2 < len(polys[0]) // 2
    assert polygons_to_mask(simple, (30, 20)).sum() == 60


def test_border_touching_object_stays_inside_the_image() -> None:
    m = np.zeros((10, 10), bool)
    m[:4, 6:] = True
    (poly,) = mask_to_polygons(m)
    assert min(poly[1::2]) == 0.0
    assert max(poly[0::2]) == 10.0
    assert np.array_equal(polygons_to_mask([poly], (10, 10)), m)


@pytest.mark.parametrize("tolerance", [0.0, 1.0])
def test_disc_polygon_round_trip(tolerance: float) -> None:
    disc = _disc(60, 80, 30, 40, 15)
    polys = mask_to_polygons(disc, tolerance=tolerance)
    assert len(polys) == 1
    assert all(isinstance(v, float) for v in polys[0])
    assert _iou(polygons_to_mask(polys, (80, 60)), disc) > 0.9
    if tolerance == 0.0:
        assert np.array_equal(polygons_to_mask(polys, (80, 60)), disc)


def test_components_and_holes() -> None:
    disc = _disc(60, 80, 30, 40, 15)
    assert mask_to_polygons(np.zeros((5, 5), bool)) == []
    two = disc.copy()
    two[0:5, 0:5] = True
    assert len(mask_to_polygons(two)) == 2
    ring = disc & ~_disc(60, 80, 30, 40, 6)
    polys = mask_to_polygons(ring)
    assert len(polys) == 1  # the hole is no polygon of its own...
    assert _iou(polygons_to_mask(polys, (80, 60)), disc) > 0.99  # ...and gets filled in
    island = ring | _disc(60, 80, 30, 40, 3)  # an object inside the hole is its own polygon
    assert len(mask_to_polygons(island)) == 2


@pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")  # numpy 2 copy= notice
def test_polygons_against_pycocotools() -> None:
    mask_util = pytest.importorskip("pycocotools.mask")
    shapes = _disc(60, 80, 30, 40, 15) | _disc(60, 80, 8, 8, 5)
    polys = mask_to_polygons(shapes)
    ref = mask_util.decode(mask_util.merge(mask_util.frPyObjects(polys, 60, 80))).astype(bool)
    assert _iou(ref, shapes) > 0.98


def test_polygon_bad_input() -> None:
    with pytest.raises(PromptError, match="tolerance"):
        mask_to_polygons(np.ones((3, 3), bool), tolerance=-1.0)
    with pytest.raises(PromptError, match="polygon 0"):
        polygons_to_mask([[0.0, 0.0, 1.0]], (4, 4))
    with pytest.raises(PromptError, match="polygon 1"):
        polygons_to_mask([[0, 0, 2, 0, 2, 2], [0, 0, 1, 1]], (4, 4))
    with pytest.raises(PromptError, match=r"\(W, H\)"):
        polygons_to_mask([], (0, 4))


# ------------------------------------------------------------------------------ image files


def _two_masks() -> tuple[np.ndarray, np.ndarray]:
    a = np.zeros((10, 12), bool)
    a[2:5, 2:6] = True
    b = np.zeros((10, 12), bool)
    b[4:8, 5:10] = True
    return a, b


def test_save_mask_png_is_atomic_and_binary(tmp_path: Path) -> None:
    a, _ = _two_masks()
    path = tmp_path / "sub" / "a.png"
    path.parent.mkdir()
    path.write_bytes(b"old")  # replaced in one step
    save_mask_png(a, path)
    img = Image.open(path)
    assert (img.mode, img.size) == ("L", (12, 10))
    pixels = np.asarray(img)
    assert np.array_equal(pixels == 255, a)
    assert set(np.unique(pixels).tolist()) == {0, 255}
    assert [p.name for p in path.parent.iterdir()] == ["a.png"]  # no temp file left
    with pytest.raises(PromptError, match="2-D"):
        save_mask_png(np.zeros((2, 2, 3), bool), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_save_label_png(tmp_path: Path) -> None:
    a, b = _two_masks()
    save_label_png([a, b], tmp_path / "labels.png")
    img = Image.open(tmp_path / "labels.png")
    assert img.mode == "P"
    labels = np.asarray(img)
    expected = np.where(b, 2, np.where(a, 1, 0))  # b drawn over a where they overlap
    assert np.array_equal(labels, expected)
    assert labels[4, 5] == 2
    palette = img.getpalette()
    assert palette is not None
    assert tuple(palette[3:6]) == PALETTE[0]
    assert tuple(palette[6:9]) == PALETTE[1]
    with pytest.raises(PromptError, match="got 0"):
        save_label_png([], tmp_path / "x.png")
    with pytest.raises(PromptError, match="different sizes"):
        save_label_png([a, np.zeros((3, 3), bool)], tmp_path / "x.png")
    with pytest.raises(PromptError, match="got 256"):
        save_label_png([a] * 256, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_overlay_colours_alpha_and_outline(tmp_path: Path) -> None:
    a, b = _two_masks()
    image = Image.new("L", (12, 10), 100)  # not RGB on purpose
    plain = np.asarray(overlay(image, [a, b], alpha=0.5, outline=False)).astype(int)
    assert plain.shape == (10, 12, 3)
    assert plain[0, 0].tolist() == [100, 100, 100]
    assert plain[3, 3].tolist() == [round(100 * 0.5 + c * 0.5) for c in PALETTE[0]]
    assert plain[6, 8].tolist() == [round(100 * 0.5 + c * 0.5) for c in PALETTE[1]]
    outlined = np.asarray(overlay(image, [a], alpha=0.25, colors=[(0, 0, 255)]))
    assert outlined[2, 2].tolist() == [0, 0, 255]  # boundary: solid colour
    big = np.zeros((10, 12), bool)
    big[1:8, 1:8] = True
    inner = np.asarray(overlay(image, [big], alpha=0.25, colors=[(0, 0, 255)]))
    assert inner[4, 4].tolist() == [75, 75, 139]  # interior: 0.75 * 100 + 0.25 * colour
    assert inner[1, 4].tolist() == [0, 0, 255]
    save_overlay(image, [a, b], tmp_path / "o.png", alpha=0.5, outline=False)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o.png")), plain)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"masks": [np.zeros((5, 5), bool)]}, "does not match"),
        ({"masks": [np.zeros((12, 10), bool)]}, "does not match"),  # transposed
        ({"alpha": 1.5}, "alpha"),
        ({"colors": [(0, 0)]}, "colors"),
        ({"colors": [(0, 0, 300)]}, "colors"),
        ({"colors": []}, "colors"),
    ],
)
def test_overlay_bad_input(kwargs: dict[str, Any], match: str) -> None:
    a, _ = _two_masks()
    args: dict[str, Any] = {"masks": [a], **kwargs}
    with pytest.raises(PromptError, match=match):
        overlay(Image.new("RGB", (12, 10)), **args)


# ------------------------------------------------------------------------------------ COCO


def test_coco_rle(tmp_path: Path) -> None:
    a, b = _two_masks()
    coco = coco_annotations(
        [a, b], scores=[0.9, np.float32(0.5)], image_id=7, category_id=3, file_name="x.png"
    )
    assert coco["images"] == [{"id": 7, "width": 12, "height": 10, "file_name": "x.png"}]
    assert coco["categories"] == [{"id": 3, "name": "object"}]
    anns = coco["annotations"]
    assert [x["id"] for x in anns] == [1, 2]
    assert all(x["image_id"] == 7 and x["category_id"] == 3 for x in anns)
    assert all(x["iscrowd"] == 1 for x in anns)
    assert [x["area"] for x in anns] == [12, 20]
    assert [x["bbox"] for x in anns] == [[2, 2, 4, 3], [5, 4, 5, 4]]
    assert [x["score"] for x in anns] == [0.9, 0.5]
    assert isinstance(anns[0]["segmentation"]["counts"], str)
    for x, m in zip(anns, (a, b), strict=True):
        assert np.array_equal(decode_rle(x["segmentation"]), m)
    write_json_atomic(coco, tmp_path / "coco.json")
    assert json.loads((tmp_path / "coco.json").read_text()) == coco


def test_coco_polygon_and_defaults() -> None:
    a, _ = _two_masks()
    coco = coco_annotations([a], size=(12, 10), form="polygon")
    (ann,) = coco["annotations"]
    assert ann["iscrowd"] == 0
    assert "score" not in ann
    assert "file_name" not in coco["images"][0]
    assert np.array_equal(polygons_to_mask(ann["segmentation"], (12, 10)), a)
    empty = coco_annotations([], size=(4, 3))
    assert empty["annotations"] == []
    assert empty["images"][0] == {"id": 0, "width": 4, "height": 3}


@pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")  # numpy 2 copy= notice
def test_coco_loads_in_pycocotools(tmp_path: Path) -> None:
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO

    a, b = _two_masks()
    for form in ("rle", "polygon"):
        coco = coco_annotations([a, b], size=(12, 10), form=form)
        write_json_atomic(coco, tmp_path / f"{form}.json")
        api = COCO(str(tmp_path / f"{form}.json"))
        assert np.array_equal(api.annToMask(api.loadAnns([1])[0]).astype(bool), a)
        assert np.array_equal(api.annToMask(api.loadAnns([2])[0]).astype(bool), b)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"masks": [np.zeros((10, 12), bool)], "size": (10, 12)}, "does not match"),
        ({"masks": [np.zeros((10, 12), bool)], "scores": [0.1, 0.2]}, "1 masks but 2 scores"),
        ({"masks": [np.zeros((10, 12), bool)], "form": "bitmap"}, "form"),
        ({"masks": []}, "size must be given"),
        ({"masks": [], "size": (0, 3)}, "positive ints"),
        ({"masks": [np.zeros((2, 2, 2), bool)]}, "mask 0"),
    ],
)
def test_coco_bad_input(args: dict[str, Any], match: str) -> None:
    masks = args.pop("masks")
    with pytest.raises(PromptError, match=match):
        coco_annotations(masks, **args)


def test_write_json_atomic(tmp_path: Path) -> None:
    path = tmp_path / "out" / "x.json"
    write_json_atomic({"a": np.int64(3), "b": np.arange(3), "c": "é"}, path, indent=1)
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": 3, "b": [0, 1, 2], "c": "é"}
    with pytest.raises(TypeError):
        write_json_atomic({"a": object()}, path)
    assert json.loads(path.read_text(encoding="utf-8"))["a"] == 3  # old file untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.json"]


def test_errors_are_vprompt_errors() -> None:
    with pytest.raises(VPromptError):
        decode_rle({"size": [1, 1], "counts": [2]})
