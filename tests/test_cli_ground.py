"""``vprompt ground`` / ``eval-ground`` through the CLI, candidate sources, and one real
subprocess run of ``detect`` and ``ground`` on tiny random detectors (owlv2:tiny, sam:tiny)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from detect_helpers import FRACTIONS, register_fake_detectors
from vprompt.cli import main
from vprompt.detect import CandidateSource, Finder
from vprompt.errors import PromptError
from vprompt.segment.automatic import AutomaticMaskConfig


@pytest.fixture(autouse=True, scope="module")
def _fake_detectors() -> None:
    # Registered when the tests run, not on import: collection must not see test-only
    # families (other files parametrize over the registries).
    register_fake_detectors()


CLIP = ("--clip", "clip:tiny", "--clip-weights", "none", "--device", "cpu")
BOXES = "4,4,40,30;50,10,90,50;10,35,60,58"


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def photo(tmp_path):
    rng = np.random.default_rng(3)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 255, (60, 100, 3), np.uint8)).save(path)
    return path


def test_ground_ranks_given_boxes_with_a_frozen_clip(photo, tmp_path) -> None:
    from vprompt.backbones.registry import load_backbone
    from vprompt.detect import rank_regions, regions_from_boxes

    out = tmp_path / "g"
    res = _cli(
        "ground", photo, "--expression", "the red mug", "--candidates", BOXES, *CLIP,
        "--marker", "red-circle", "--marker", "blur", "--out", out, "--json",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    # the CLI's choice is rank_regions' on the same model, markers and boxes
    clip = load_backbone("clip:tiny", "none", device="cpu")
    regions = regions_from_boxes([[4, 4, 40, 30], [50, 10, 90, 50], [10, 35, 60, 58]])
    ranked = rank_regions(
        clip,
        Image.open(photo).convert("RGB"),
        "the red mug",
        regions,
        marker=["red-circle", "blur"],
    )
    assert result["chosen"]["index"] == ranked.best
    assert result["chosen"]["box"] == list(regions[ranked.best].box)
    assert [c["index"] for c in result["candidates"]] == ranked.order().tolist()
    assert result["objects"][0]["query"] == "the red mug"
    assert [m["mark"] for m in result["set_of_mark"]["legend"]] == [1, 2, 3]
    assert Image.open(out / "candidates.png").size == (100, 60)
    assert json.loads((out / "annotations.json").read_text())["annotations"][0]["bbox"][:2] == [
        regions[ranked.best].box[0],
        regions[ranked.best].box[1],
    ]


def test_ground_with_a_phrase_detector_and_masks(photo, tmp_path) -> None:
    out = tmp_path / "d"
    res = _cli(
        "ground", photo, "--expression", "the dog", "--method", "detector", "--model",
        "fake-detector:exact", "--masks", "sam:tiny", "--mask-weights", "none", "--device",
        "cpu", "--out", out, "--json",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    # one query: the fake scores box n with (n % 4) / 4 + 0.1, so box 3 wins
    np.testing.assert_allclose(
        result["chosen"]["box"], (FRACTIONS[3].numpy() * [100, 60, 100, 60]).round(2), atol=0.01
    )
    assert result["clip"] is None
    assert (out / result["objects"][0]["mask"]).is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--expression", " ", "--candidates", BOXES, *CLIP), "is empty"),
        (("--expression", "x", "--candidates", "1,2,3", *CLIP), "expected four numbers"),
        (("--expression", "x", "--candidates", "0,0,500,10", *CLIP), "outside the 100x60 image"),
        (("--expression", "x", *CLIP), "detector candidates need a detector"),
        (("--expression", "x", "--method", "magic", *CLIP), "unknown grounding method"),
        (("--expression", "x", "--candidates", BOXES, "--marker", "glow", *CLIP), "glow"),
        (("--expression", "x", "--method", "detector"), "needs a text detector"),
    ],
)
def test_ground_bad_input_is_one_line(photo, tmp_path, args, message) -> None:
    res = _cli("ground", photo, *args, "--out", tmp_path / "bad")
    assert res.exit_code == 1, res.output
    assert res.output.startswith("vprompt: error:")
    assert res.output.count("\n") == 1
    assert message in res.output


def test_negatives_file_is_read_and_checked(photo, tmp_path) -> None:
    empty = tmp_path / "neg.txt"
    empty.write_text("# nothing\n\n")
    res = _cli(
        "ground", photo, "--expression", "x", "--candidates", BOXES, *CLIP, "--negatives",
        empty, "--out", tmp_path / "o",
    )  # fmt: skip
    assert res.exit_code == 1
    assert "found none" in res.output
    empty.write_text("the cat\nthe man on the left\n")
    res = _cli(
        "ground", photo, "--expression", "x", "--candidates", BOXES, *CLIP, "--negatives",
        empty, "--out", tmp_path / "o", "--json",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert all(c["bias"] != 0 for c in json.loads(res.stdout)["candidates"])


def test_automatic_candidates_are_sam_masks() -> None:
    finder = Finder.load("fake-detector:exact", masks="sam:tiny", mask_weights="none", device="cpu")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8))
    relaxed = AutomaticMaskConfig(
        points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0
    )
    source = CandidateSource(kind="automatic", limit=3, automatic=relaxed)
    found = source.regions(image, "x", finder=finder)
    assert 1 <= len(found) <= 3
    assert found.masks is not None
    for box, mask in zip(found.boxes, found.masks, strict=True):
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert box.tolist() == [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]
    strict = CandidateSource(
        kind="automatic", automatic=AutomaticMaskConfig(points_per_side=2, pred_iou_thresh=1.0)
    )
    with pytest.raises(PromptError, match="found no regions"):
        strict.regions(image, "x", finder=finder)


def test_eval_ground_accuracy_by_hand(tmp_path) -> None:
    Image.new("RGB", (100, 60)).save(tmp_path / "a.png")
    best = (FRACTIONS[3].numpy() * [100, 60, 100, 60]).tolist()  # the fake's top box
    refs = {
        "images_dir": ".",
        "refs": [
            {"image": "a.png", "expression": "the dog", "box": best},
            {"image": "a.png", "expression": "the cat", "box": [60, 0, 100, 20]},
        ],
    }
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    res = _cli(
        "eval-ground", tmp_path / "refs.json", "--method", "detector", "--model",
        "fake-detector:exact", "--device", "cpu", "--out", tmp_path / "ev", "--json",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["accuracy"] == 0.5
    assert summary["refs"] == 2
    records = json.loads((tmp_path / "ev" / "grounding.json").read_text())["records"]
    assert [r["correct"] for r in records] == [True, False]


@pytest.mark.slow
def test_detect_and_ground_through_the_real_cli(run_cli, photo, tmp_path) -> None:
    tiny = ("--model", "owlv2:tiny", "--weights", "none", "--device", "cpu")
    masks = ("--masks", "sam:tiny", "--mask-weights", "none")
    out = tmp_path / "det"
    det = run_cli(
        "detect", photo, *tiny, *masks, "--query", "a mug", "--exemplar", "10,10,50,40",
        "--score-threshold", "0", "--top-k", "3", "--out", out, "--json",
    )  # fmt: skip
    assert det.returncode == 0, det.stderr
    result = json.loads(det.stdout)
    assert result["queries"] == ["a mug", "exemplar 1"]
    assert len(result["objects"]) == 3
    assert all((out / o["mask"]).is_file() for o in result["objects"])
    grounded = run_cli(
        "ground", photo, "--expression", "the mug on the left", *tiny, "--clip", "clip:tiny",
        "--clip-weights", "none", "--max-candidates", "4", "--out", tmp_path / "gr", "--json",
    )  # fmt: skip
    assert grounded.returncode == 0, grounded.stderr
    assert len(json.loads(grounded.stdout)["candidates"]) == 4


def test_a_real_detector_refuses_an_overlong_query_in_one_line(photo, tmp_path) -> None:
    res = _cli(
        "detect", photo, "--model", "owlv2:tiny", "--weights", "none", "--device", "cpu",
        "--query", "x " * 40, "--out", tmp_path / "bad",
    )  # fmt: skip
    assert res.exit_code == 1
    assert res.output.startswith("vprompt: error: query")
    assert "16" in res.output
    assert res.output.count("\n") == 1
