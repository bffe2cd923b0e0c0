"""``vprompt detect`` and ``vprompt detectors`` through the CLI (in-process, on the fake
detector; the subprocess run on a real tiny detector is in test_cli_ground.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from detect_helpers import register_fake_detectors
from vprompt.cli import main


@pytest.fixture(autouse=True, scope="module")
def _fake_detectors() -> None:
    # Registered when the tests run, not on import: collection must not see test-only
    # families (other files parametrize over the registries).
    register_fake_detectors()


FAKE = ("--model", "fake-detector:exact", "--device", "cpu")


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for name, size in (("a.png", (100, 60)), ("b.png", (60, 100))):
        path = tmp_path / name
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8)).save(path)
        paths.append(path)
    return paths


def test_detect_one_image_writes_segment_style_outputs(images, tmp_path) -> None:
    out = tmp_path / "one"
    res = _cli(
        "detect", images[0], *FAKE, "--query", "cat", "--query", "dog", "--out", out, "--json"
    )
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert [o["query"] for o in result["objects"]] == ["dog", "cat", "dog"]
    assert result["filter"]["score_threshold"] == 0.3  # the detector's registered default
    assert {p.name for p in out.iterdir()} >= {"overlay.png", "annotations.json", "result.json"}
    coco = json.loads((out / "annotations.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["cat", "dog"]
    assert Image.open(out / "overlay.png").size == (100, 60)
    # options reach the filter
    res = _cli(
        "detect", images[0], *FAKE, "--query", "cat", "--score-threshold", "0.9", "--out",
        tmp_path / "none", "--json",
    )  # fmt: skip
    assert json.loads(res.stdout)["objects"] == []


def test_detect_many_images_with_an_exemplar_and_masks(images, tmp_path) -> None:
    out = tmp_path / "many"
    res = _cli(
        "detect", *images, *FAKE, "--exemplar", f"{images[0]}:10,10,40,40", "--exemplar",
        "1,1,20,20", "--masks", "sam:tiny", "--mask-weights", "none", "--top-k", "2",
        "--out", out, "--json",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert [r["folder"] for r in summary["images"]] == ["a", "b"]
    assert summary["images"][0]["queries"] == ["exemplar 1", "exemplar 2"]
    assert summary["exemplars"][1]["image"] is None  # on the first image
    for folder in ("a", "b"):
        objects = json.loads((out / folder / "result.json").read_text())["objects"]
        assert len(objects) == 2
        assert (out / folder / objects[0]["mask"]).is_file()
    assert json.loads((out / "result.json").read_text())["images"][1]["image"] == "b.png"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--query", " "), "is empty"),
        ((), "nothing to find"),
        (("--exemplar", "0,0,500,10"), "reaches outside the 100x60 image"),
        (("--exemplar", "nope.png:0,0,5,5"), "nope.png"),
        (("--exemplar", "1,2,3"), "expected four numbers"),
        (("--negative-exemplar", "1,1,9,9"), "no negative exemplars"),
        (("--query", "x", "--score-threshold", "2"), "score-threshold: expected a number in"),
        (("--query", "x", "--masks", "clip:tiny"), "expected a sam:ARCH"),
    ],
)
def test_detect_bad_input_is_one_line(images, tmp_path, args, message) -> None:
    res = _cli("detect", images[0], *FAKE, *args, "--out", tmp_path / "bad")
    assert res.exit_code == 1
    assert res.output.count("\n") == 1
    assert "vprompt: error:" in res.output
    assert message in res.output


def test_detect_refuses_models_that_are_not_detectors(images, tmp_path) -> None:
    res = _cli("detect", images[0], "--model", "sam:tiny", "--query", "x", "--out", tmp_path / "o")
    assert res.exit_code == 1
    assert "is not a detector; detectors are" in res.output
    listed = _cli("detectors")
    assert "fake-detector:" in listed.output
    assert "negative exemplars" not in listed.output.split("fake-detector:")[1].splitlines()[0]


def _coco_folder(root, sizes):
    """Images whose ground truth is exactly the fake detector's boxes 2 and 3 (category
    "cat"); the fake ranks them first for one query, so AP is 1 by hand."""
    from detect_helpers import FRACTIONS

    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for k, (w, h) in enumerate(sizes, start=1):
        Image.new("RGB", (w, h), (10 * k, 0, 0)).save(root / "images" / f"{k}.png")
        images.append({"id": k, "file_name": f"{k}.png", "width": w, "height": h})
        for n in (2, 3):
            x0, y0, x1, y1 = (FRACTIONS[n].numpy() * np.array([w, h, w, h])).tolist()
            annotations.append(
                {"id": len(annotations) + 1, "image_id": k, "category_id": 7, "iscrowd": 0,
                 "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)}
            )  # fmt: skip
    doc = {"images": images, "annotations": annotations, "categories": [{"id": 7, "name": "cat"}]}
    (root / "instances.json").write_text(json.dumps(doc))
    return root


def test_eval_detect_both_protocols(tmp_path) -> None:
    data = _coco_folder(tmp_path / "coco", [(100, 60), (60, 100), (80, 80)])
    res = _cli("eval-detect", data, *FAKE, "--out", tmp_path / "text", "--json")
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)
    assert metrics["bbox"]["per_category"] == {"cat": pytest.approx(1.0)}
    assert (tmp_path / "text" / "metrics.json").is_file()
    results = json.loads((tmp_path / "text" / "results.json").read_text())
    assert {r["category_id"] for r in results} == {7}
    res = _cli(
        "eval-detect", data, *FAKE, "--protocol", "find-all-similar", "--out", tmp_path / "find",
        "--json",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    found = json.loads(res.stdout)
    assert found["mAP"] == pytest.approx(1.0)
    assert found["per_category"]["cat"]["exemplar"]["image_id"] in (1, 2, 3)
    bad = _cli("eval-detect", tmp_path, *FAKE, "--out", tmp_path / "bad")
    assert bad.exit_code == 1
    assert "vprompt: error:" in bad.output
