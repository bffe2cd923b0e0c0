"""Detection / grounding evaluation: COCO and refs readers, COCO AP, find-all-similar."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from vprompt.backbones.detection import Exemplar
from vprompt.detect.coco_data import (
    CocoDataError,
    CocoDetectionSet,
    check_coco_detection,
    read_coco_detection,
)
from vprompt.detect.evaluate import evaluate_detection, run_cocoeval
from vprompt.detect.find_all import choose_exemplars, evaluate_find_all
from vprompt.detect.refcoco import evaluate_grounding, read_refs
from vprompt.detect.result import Detections
from vprompt.errors import DatasetError
from vprompt.segment.outputs import encode_rle_compressed

# Three images, both orientations; each filled with its own colour so a fake detector can
# tell which one it was given.
IMAGES: list[dict[str, Any]] = [
    {"id": 1, "file_name": "a.png", "width": 96, "height": 64},
    {"id": 2, "file_name": "b.png", "width": 64, "height": 96},
    {"id": 5, "file_name": "sub/c.png", "width": 80, "height": 80},
]
COLOURS = {1: (200, 0, 0), 2: (0, 200, 0), 5: (0, 0, 200)}
CATEGORIES: list[dict[str, Any]] = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}]
ANNOTATIONS: list[dict[str, Any]] = [
    {"id": 10, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 16]},
    {"id": 11, "image_id": 1, "category_id": 3, "bbox": [40, 10, 30, 40]},
    {"id": 12, "image_id": 2, "category_id": 1, "bbox": [10, 50, 40, 40]},
    {"id": 13, "image_id": 2, "category_id": 1, "bbox": [2, 2, 10, 10]},
    {"id": 14, "image_id": 5, "category_id": 3, "bbox": [20, 20, 30, 30]},
    {"id": 15, "image_id": 5, "category_id": 1, "bbox": [60, 60, 15, 12]},
]


def write_coco(
    root: Path,
    doc: Any = None,
    *,
    json_name: str = "instances.json",
    images_sub: str = "images",
) -> Path:
    """A COCO folder under ``root``: PNGs in ``root/images_sub`` and the JSON ``doc``."""
    if doc is None:
        doc = {"images": IMAGES, "categories": CATEGORIES, "annotations": ANNOTATIONS}
    for entry in IMAGES:
        path = root / images_sub / entry["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        size = (entry["width"], entry["height"])
        Image.new("RGB", size, COLOURS[entry["id"]]).save(path)
    json_path = root / json_name
    json_path.parent.mkdir(parents=True, exist_ok=True)
    text = doc if isinstance(doc, str) else json.dumps(doc)
    json_path.write_text(text)
    return root


def image_id_of(image: Image.Image) -> int:
    colour = image.getpixel((0, 0))
    return next(i for i, c in COLOURS.items() if c == colour)


def xyxy(bbox: list[float]) -> list[float]:
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


def fake_detector(
    dataset: CocoDetectionSet, boxes: dict[int, list[tuple[int, list[float], float]]]
) -> Any:
    """``(image, queries) -> Detections`` returning ``boxes[image_id]`` = (category id,
    x0 y0 x1 y1, score) for the categories asked for."""
    names = {c.id: c.name for c in dataset.categories}

    def detect(image: Image.Image, queries: list[str]) -> Detections:
        rows = [r for r in boxes.get(image_id_of(image), []) if names[r[0]] in queries]
        if not rows:
            return Detections.empty(queries=queries, image_size=image.size)
        return Detections(
            boxes=np.array([r[1] for r in rows], np.float32),
            scores=np.array([r[2] for r in rows], np.float32),
            labels=np.array([queries.index(names[r[0]]) for r in rows], np.int64),
            queries=tuple(queries),
            image_size=image.size,
        )

    return detect


def ground_truth_boxes(annotations: list[dict[str, Any]]) -> dict[int, list[Any]]:
    out: dict[int, list[Any]] = {}
    for a in annotations:
        out.setdefault(a["image_id"], []).append((a["category_id"], xyxy(a["bbox"]), 0.9))
    return out


# ------------------------------------------------------------------------------ COCO reader
def test_reads_a_coco_folder_lazily(tmp_path: Path) -> None:
    data = read_coco_detection(write_coco(tmp_path))
    assert [i.id for i in data.images] == [1, 2, 5]
    assert data.images[1].size == (64, 96)
    assert data.images[2].path == tmp_path / "images" / "sub" / "c.png"
    assert [(c.id, c.name) for c in data.categories] == [(1, "cat"), (3, "dog")]
    assert data.annotations[0].box == (4.0, 4.0, 24.0, 20.0)
    assert data.annotations[0].area == 320.0  # w * h when area is left out
    assert data.load(data.images[1]).size == (64, 96)
    assert check_coco_detection(tmp_path) == []


def test_coco_layout_with_split_folder_and_sizes_from_headers(tmp_path: Path) -> None:
    images = [{k: v for k, v in i.items() if k not in ("width", "height")} for i in IMAGES]
    doc = {"images": images, "categories": CATEGORIES, "annotations": ANNOTATIONS}
    write_coco(tmp_path, doc, json_name="annotations/instances_val.json", images_sub="val")
    data = read_coco_detection(tmp_path)
    assert data.images_dir == tmp_path / "val"
    assert [i.size for i in data.images] == [(96, 64), (64, 96), (80, 80)]


def _bad(doc: dict[str, Any], section: str, index: int, **change: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(doc))
    out[section][index].update(change)
    return out


GOOD = {"images": IMAGES, "categories": CATEGORIES, "annotations": ANNOTATIONS}
BAD_DOCS: dict[str, tuple[Any, str]] = {
    "not json": ("{images: [", "not valid JSON"),
    "not an object": ("[1, 2]", "holds a list; expected an object"),
    "missing list": ({"images": IMAGES, "categories": CATEGORIES}, "'annotations' is missing"),
    "missing key": (
        {**GOOD, "annotations": [{"id": 1, "image_id": 1, "category_id": 1}]},
        "annotations[0] lacks 'bbox'",
    ),
    "duplicate image id": (_bad(GOOD, "images", 1, id=1), "images[1]: id 1 is used twice"),
    "unknown image": (
        _bad(GOOD, "annotations", 2, image_id=99),
        "annotations[2]: image_id 99 is no image's id",
    ),
    "unknown category": (
        _bad(GOOD, "annotations", 0, category_id=2),
        "annotations[0]: category_id 2 is no category's id",
    ),
    "empty box": (_bad(GOOD, "annotations", 1, bbox=[1, 1, 0, 5]), "has width or height <= 0"),
    "box not numbers": (
        _bad(GOOD, "annotations", 1, bbox=[1, 1, "5", 5]),
        "is not 4 finite numbers [x, y, w, h]",
    ),
    "box outside": (
        _bad(GOOD, "annotations", 0, bbox=[80, 4, 20, 10]),
        "reaches outside image 1 of 96x64 by more than 2 px",
    ),
    "escaping path": (
        _bad(GOOD, "images", 0, file_name="../a.png"),
        "file_name '../a.png' climbs out of the folder",
    ),
    "absolute path": (
        _bad(GOOD, "images", 0, file_name="/etc/passwd"),
        "file_name '/etc/passwd' is an absolute path",
    ),
    "missing image file": (
        _bad(GOOD, "images", 2, file_name="nope.png"),
        "images[2]: " + "{root}/images/nope.png does not exist",
    ),
    "duplicate category name": (
        _bad(GOOD, "categories", 1, name="cat"),
        "categories[1]: name 'cat' is also category 1's",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_DOCS))
def test_coco_reader_names_each_problem(tmp_path: Path, case: str) -> None:
    doc, expected = BAD_DOCS[case]
    write_coco(tmp_path, doc)
    with pytest.raises(CocoDataError) as info:
        read_coco_detection(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert expected.format(root=tmp_path) in message
    assert all(p.fix for p in info.value.problems)


def test_coco_reader_refuses_huge_json_and_missing_or_ambiguous_files(tmp_path: Path) -> None:
    write_coco(tmp_path / "big")
    with pytest.raises(
        CocoDataError, match=r"instances.json is \d+ bytes, more than the limit of 100"
    ):
        read_coco_detection(tmp_path / "big", max_json_bytes=100)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CocoDataError, match="holds no instances JSON"):
        read_coco_detection(tmp_path / "empty")
    write_coco(tmp_path / "two", json_name="annotations/instances_a.json")
    write_coco(tmp_path / "two", json_name="annotations/instances_b.json")
    with pytest.raises(CocoDataError, match="holds 2 instances files"):
        read_coco_detection(tmp_path / "two")
    data = read_coco_detection(tmp_path / "two", annotations="annotations/instances_b.json")
    assert data.annotation_file.name == "instances_b.json"


def test_coco_check_reports_all_problems_at_once(tmp_path: Path) -> None:
    doc = _bad(GOOD, "annotations", 0, category_id=2)
    doc = _bad(doc, "annotations", 3, bbox=[1, 1, -1, 1])
    doc = _bad(doc, "images", 0, file_name="../x.png")
    doc["annotations"].append({"id": 10, "image_id": 2, "category_id": 1, "bbox": [0, 0, 1, 1]})
    write_coco(tmp_path, doc)
    problems = check_coco_detection(tmp_path)
    text = " | ".join(p.what for p in problems)
    for part in ("category_id 2", "width or height <= 0", "'../x.png'", "id 10 is used twice"):
        assert part in text
    assert all(p.severity == "error" for p in problems)
    with pytest.raises(CocoDataError, match="4 problem"):
        read_coco_detection(tmp_path)


# ------------------------------------------------------------------------------ COCO AP
def _pycocotools_stats(gt: dict[str, Any], results_file: Path) -> list[float]:
    """COCOeval run directly from files, as its own README does."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_file = results_file.parent / "gt.json"
    gt_file.write_text(json.dumps(gt))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_file))
        ev = COCOeval(coco, coco.loadRes(str(results_file)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats]


def test_perfect_detections_score_one_in_chunks_of_one_query(tmp_path: Path) -> None:
    data = read_coco_detection(write_coco(tmp_path / "data"))
    calls: list[list[str]] = []
    detect = fake_detector(data, ground_truth_boxes(ANNOTATIONS))

    def chunked(image: Image.Image, queries: list[str]) -> Detections:
        calls.append(queries)
        return detect(image, queries)

    report = evaluate_detection(
        chunked, data, max_queries=1, output=tmp_path / "out", progress=False
    )
    assert calls == [["cat"], ["dog"]] * 3
    assert report.bbox.ap == report.bbox.ap50 == report.bbox.ar100 == pytest.approx(1.0)
    assert report.bbox.per_category == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}
    assert report.segm is None
    assert report.detections == len(ANNOTATIONS)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["category_id"] for r in results} == {1, 3}  # labels mapped back to the ids
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)


def test_missed_and_shifted_boxes_match_hand_computed_ap(tmp_path: Path) -> None:
    # One category "cat" with 3 objects once the dog annotations are dropped, all small.
    cats = [a for a in ANNOTATIONS if a["category_id"] == 1][:3]
    doc = {"images": IMAGES, "categories": CATEGORIES[:1], "annotations": cats}
    data = read_coco_detection(write_coco(tmp_path / "d", doc))
    boxes = ground_truth_boxes(cats)
    # Missing one of 3: precision 1 up to recall 2/3 → 67 of COCO's 101 recall points.
    missed = {k: list(v) for k, v in boxes.items()}
    missed[2] = missed[2][:1]
    report = evaluate_detection(fake_detector(data, missed), data, progress=False)
    assert report.bbox.ap == pytest.approx(67 / 101)
    assert report.bbox.ap50 == pytest.approx(67 / 101)
    # A false positive ranked second: precision 1, 1/2, 2/3, 3/4 at recall 1/3, 1/3, 2/3, 1;
    # interpolated 1 up to recall 1/3 (34 points), 3/4 beyond (67 points).
    ranked = {
        1: [(1, xyxy(cats[0]["bbox"]), 0.9), (1, [60.0, 40.0, 90.0, 60.0], 0.8)],
        2: [(1, xyxy(cats[1]["bbox"]), 0.7), (1, xyxy(cats[2]["bbox"]), 0.6)],
    }
    report = evaluate_detection(fake_detector(data, ranked), data, progress=False)
    assert report.bbox.ap == pytest.approx((34 + 67 * 0.75) / 101)
    # The 40x40 box shifted by 8 px (IoU 32*40 / (48*40) = 2/3): a hit at IoU 0.50..0.65
    # (4 of 10 thresholds), a miss from 0.70; ranked last, the others give 2/3 recall at
    # precision 1 → 67/101 at the strict thresholds.
    shifted = {k: list(v) for k, v in boxes.items()}
    shifted[2] = [(1, [18.0, 50.0, 58.0, 90.0], 0.5), boxes[2][1]]
    out = tmp_path / "out"
    report = evaluate_detection(fake_detector(data, shifted), data, output=out, progress=False)
    assert report.bbox.ap50 == pytest.approx(1.0)
    assert report.bbox.ap75 == pytest.approx(67 / 101)
    assert report.bbox.ap == pytest.approx((4 * 1.0 + 6 * 67 / 101) / 10)
    assert report.bbox.ap_large is None  # no object over 96² px
    stats = _pycocotools_stats(data.ground_truth(), out / "results.json")
    assert stats[0] == pytest.approx(report.bbox.ap)
    assert stats[8] == pytest.approx(report.bbox.ar100)


def test_scored_detections_equal_pycocotools_run_directly(tmp_path: Path) -> None:
    data = read_coco_detection(write_coco(tmp_path / "d"))
    rng = np.random.default_rng(0)
    noisy: dict[int, list[Any]] = {}
    for a in ANNOTATIONS:
        box = np.array(xyxy(a["bbox"]), float) + rng.uniform(-3, 3, 4)
        noisy.setdefault(a["image_id"], []).append((a["category_id"], box.tolist(), rng.random()))
        wrong = 1 if a["category_id"] == 3 else 3  # the other category
        noisy[a["image_id"]].append((wrong, box.tolist(), rng.random() * 0.5))
    out = tmp_path / "out"
    report = evaluate_detection(fake_detector(data, noisy), data, output=out, progress=False)
    stats = _pycocotools_stats(data.ground_truth(), out / "results.json")
    ours = [report.bbox.ap, report.bbox.ap50, report.bbox.ap75, report.bbox.ap_small]
    assert ours == pytest.approx(stats[:4])
    assert 0 < stats[0] < 1


def test_masks_give_mask_ap(tmp_path: Path) -> None:
    sizes = {i["id"]: (i["height"], i["width"]) for i in IMAGES}
    anns = []
    for a in ANNOTATIONS:
        x, y, w, h = a["bbox"]
        mask = np.zeros(sizes[a["image_id"]], bool)
        mask[y : y + h, x : x + w] = True
        anns.append({**a, "segmentation": encode_rle_compressed(mask)})
    doc = {"images": IMAGES, "categories": CATEGORIES, "annotations": anns}
    data = read_coco_detection(write_coco(tmp_path / "d", doc))
    detect = fake_detector(data, ground_truth_boxes(anns))

    def with_masks(image: Image.Image, queries: list[str]) -> Detections:
        found = detect(image, queries)
        masks = np.zeros((len(found), image.height, image.width), bool)
        for m, (x0, y0, x1, y1) in zip(masks, found.boxes.astype(int), strict=True):
            m[y0:y1, x0:x1] = True
        return found.with_masks(masks) if len(found) else found

    report = evaluate_detection(with_masks, data, progress=False)
    assert report.segm is not None
    assert report.segm.ap50 == pytest.approx(1.0)
    assert report.segm.ap == pytest.approx(1.0)


def test_no_detections_score_zero(tmp_path: Path) -> None:
    data = read_coco_detection(write_coco(tmp_path / "d"))
    metrics = run_cocoeval(data.ground_truth(), [])
    assert metrics.ap == 0.0
    assert metrics.per_category == {"cat": 0.0, "dog": 0.0}


# ------------------------------------------------------------------------------ grounding
def test_grounding_accuracy_counts_iou_of_exactly_one_half(tmp_path: Path) -> None:
    write_coco(tmp_path)  # the images
    refs = [
        {"image": "a.png", "expression": "left  cat", "box": [0, 0, 20, 20]},
        {"image": "b.png", "expression": "dog", "bbox": [10, 10, 20, 20], "box_format": "xywh"},
        {"image": "a.png", "expression": "right cat", "box": [40, 20, 80, 60]},
        {"image": "sub/c.png", "expression": "nothing", "box": [0, 0, 10, 10]},
    ]
    (tmp_path / "refs.json").write_text(json.dumps({"images_dir": "images", "refs": refs}))
    loaded = read_refs(tmp_path / "refs.json")
    assert loaded[0].expression == "left cat"
    assert loaded[1].box == (10, 10, 30, 30)
    answers = {
        "left cat": (0, 0, 20, 10),  # IoU 200 / 400 = 0.5 exactly → correct
        "dog": (10, 10, 30, 30.4),  # IoU 400 / 408 → correct
        "right cat": (40, 20, 80, 39.4),  # IoU 19.4 / 40 = 0.485 → wrong
        "nothing": None,  # no answer → wrong
    }
    sizes: list[tuple[int, int]] = []

    def ground(image: Image.Image, expression: str) -> Any:
        sizes.append(image.size)
        return answers[expression]

    report = evaluate_grounding(ground, loaded, output=tmp_path / "out", progress=False)
    assert [r["correct"] for r in report.records] == [True, True, False, False]
    assert report.accuracy == 0.5
    assert report.records[0]["iou"] == 0.5
    assert sizes == [(96, 64), (96, 64), (64, 96), (80, 80)]  # each image decoded once, grouped
    saved = json.loads((tmp_path / "out" / "grounding.json").read_text())
    assert saved["accuracy"] == 0.5
    assert saved["records"][3]["predicted"] is None
    # A bare list: images next to the JSON.
    (tmp_path / "images" / "list.json").write_text(json.dumps(refs[:1]))
    assert read_refs(tmp_path / "images" / "list.json")[0].image == tmp_path / "images" / "a.png"


BAD_REFS: dict[str, tuple[dict[str, Any], str]] = {
    "both boxes": ({"box": [0, 0, 5, 5], "bbox": [0, 0, 5, 5]}, "has both 'box' and 'bbox'"),
    "no box": ({}, "has neither 'box' nor 'bbox'"),
    "format contradiction": (
        {"box": [0, 0, 5, 5], "box_format": "xywh"},
        "box_format 'xywh' contradicts 'box'",
    ),
    "empty box": ({"box": [5, 5, 5, 9]}, "is empty"),
    "outside": ({"box": [0, 0, 99, 10]}, "reaches outside the 96x64 image"),
    "escaping": ({"image": "../x.png", "box": [0, 0, 5, 5]}, "climbs out of the folder"),
    "missing image": ({"image": "zz.png", "box": [0, 0, 5, 5]}, "zz.png does not exist"),
    "empty expression": ({"expression": "  ", "box": [0, 0, 5, 5]}, "is not a non-empty string"),
}


@pytest.mark.parametrize("case", sorted(BAD_REFS))
def test_refs_reader_names_each_problem(tmp_path: Path, case: str) -> None:
    write_coco(tmp_path)
    change, expected = BAD_REFS[case]
    ref = {"image": "a.png", "expression": "a cat", **change}
    (tmp_path / "refs.json").write_text(json.dumps({"images_dir": "images", "refs": [ref]}))
    with pytest.raises(CocoDataError, match=r"refs\.json") as info:
        read_refs(tmp_path / "refs.json")
    assert expected in str(info.value)


def test_refs_reader_refuses_non_refs_json(tmp_path: Path) -> None:
    (tmp_path / "r.json").write_text('"refs"')
    with pytest.raises(CocoDataError, match="holds a str; expected an object or a list"):
        read_refs(tmp_path / "r.json")


# ------------------------------------------------------------------------------ find all
def test_find_all_uses_the_documented_exemplar_and_skips_its_image(tmp_path: Path) -> None:
    data = read_coco_detection(write_coco(tmp_path / "d"))
    chosen, skipped = choose_exemplars(data, seed=3)
    assert skipped == {}
    # The rule, computed here: a seeded draw among the sorted images holding the category,
    # then the largest instance in the drawn image.
    for cid, candidates in ((1, [1, 2, 5]), (3, [1, 5])):
        pick = candidates[int(np.random.default_rng([3, cid]).integers(len(candidates)))]
        in_image = [a for a in ANNOTATIONS if a["category_id"] == cid and a["image_id"] == pick]
        largest = max(in_image, key=lambda a: a["bbox"][2] * a["bbox"][3])
        assert chosen[cid].image_id == pick
        assert chosen[cid].annotation_id == largest["id"]
        assert list(chosen[cid].box) == xyxy(largest["bbox"])
    assert choose_exemplars(data, seed=3)[0] == chosen  # same seed, same choice
    picks = {
        tuple(c.image_id for c in choose_exemplars(data, seed=s)[0].values()) for s in range(8)
    }
    assert len(picks) > 1  # other seeds choose otherwise

    category_of = {tuple(xyxy(a["bbox"])): a["category_id"] for a in ANNOTATIONS}
    truth = ground_truth_boxes(ANNOTATIONS)
    searched: list[tuple[int, int]] = []

    def find(image: Image.Image, exemplars: list[Exemplar]) -> Detections:
        assert len(exemplars) == 1
        assert exemplars[0].positive
        cid = category_of[tuple(float(v) for v in exemplars[0].box)]
        image_id = image_id_of(image)
        searched.append((cid, image_id))
        rows = [r for r in truth.get(image_id, []) if r[0] == cid]
        return Detections(
            boxes=np.array([r[1] for r in rows], np.float32).reshape(-1, 4),
            scores=np.full(len(rows), 0.9, np.float32),
            labels=np.zeros(len(rows), np.int64),
            queries=("exemplar 0",),
            image_size=image.size,
        )

    report = evaluate_find_all(find, data, seed=3, output=tmp_path / "out", progress=False)
    for cid, choice in chosen.items():
        others = sorted(i.id for i in data.images if i.id != choice.image_id)
        assert sorted(i for c, i in searched if c == cid) == others
    assert report.map == pytest.approx(1.0)
    assert report.map50 == pytest.approx(1.0)
    assert report.exemplars["dog"] == chosen[3]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["per_category"]["cat"]["exemplar"]["annotation_id"] == chosen[1].annotation_id


def test_find_all_skips_categories_in_one_image(tmp_path: Path) -> None:
    anns = [a for a in ANNOTATIONS if a["category_id"] == 1] + [ANNOTATIONS[1]]
    doc = {"images": IMAGES, "categories": CATEGORIES, "annotations": anns}
    data = read_coco_detection(write_coco(tmp_path / "d", doc))
    chosen, skipped = choose_exemplars(data)
    assert list(chosen) == [1]
    assert "one image only" in skipped["dog"]
    only_dog = {**doc, "annotations": [ANNOTATIONS[1]]}
    data = read_coco_detection(write_coco(tmp_path / "e", only_dog))

    def never(image: Image.Image, exemplars: list[Exemplar]) -> Detections:
        raise AssertionError("nothing should be searched")

    with pytest.raises(DatasetError, match="no category can be evaluated"):
        evaluate_find_all(never, data, progress=False)
