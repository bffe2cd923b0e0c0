"""The synthetic inspection set: MVTec AD layout, exact masks, determinism, folder safety."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from PIL import Image

from vprompt.anomaly.synthetic import (
    DEFECT_KINDS,
    MARKER,
    TEXTURES,
    inspection_sample,
    make_defect,
    normal_crop,
    write_inspection_set,
)
from vprompt.errors import ConfigError, OutputError, UnknownNameError

SMALL: dict[str, Any] = {"train_per_category": 2, "good_test": 1, "defects_per_type": 1, "size": 64}
CATEGORIES = tuple(TEXTURES)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("inspection") / "set"
    return root, write_inspection_set(root, seed=3, **SMALL)


def test_layout_and_counts(small_set: tuple[Path, dict]) -> None:
    root, summary = small_set
    assert (root / MARKER).is_file()
    assert summary["reused"] is False
    assert summary["images"] == len(CATEGORIES) * (2 + 1 + len(DEFECT_KINDS))
    assert summary["masks"] == len(CATEGORIES) * len(DEFECT_KINDS)
    for cat in CATEGORIES:
        assert summary["categories"][cat]["train/good"] == 2
        assert sorted(p.name for p in (root / cat / "train" / "good").iterdir()) == [
            "000.png",
            "001.png",
        ]
        assert sorted(p.name for p in (root / cat / "test").iterdir()) == sorted(
            ["good", *DEFECT_KINDS]
        )
        assert [p.name for p in (root / cat / "test" / "good").iterdir()] == ["000.png"]
        assert not (root / cat / "ground_truth" / "good").exists()
        for kind in DEFECT_KINDS:
            assert [p.name for p in (root / cat / "test" / kind).iterdir()] == ["000.png"]
            assert [p.name for p in (root / cat / "ground_truth" / kind).iterdir()] == [
                "000_mask.png"
            ]
    # Only the marker and PNGs: no temporary file survives the renames.
    assert {p.suffix for p in root.rglob("*") if p.is_file()} == {".png", ".json"}


def test_masks_are_binary_nonempty_and_match_the_images(small_set: tuple[Path, dict]) -> None:
    root, _ = small_set
    for cat in CATEGORIES:
        good = _load(root / cat / "train" / "good" / "000.png")
        assert good.shape == (64, 64, 3)
        assert good.dtype == np.uint8
        for kind in DEFECT_KINDS:
            image = _load(root / cat / "test" / kind / "000.png")
            mask = _load(root / cat / "ground_truth" / kind / "000_mask.png")
            assert mask.shape == image.shape[:2] == (64, 64)
            assert mask.dtype == np.uint8
            assert set(np.unique(mask)) <= {0, 255}
            assert (mask == 255).any(), f"{cat}/{kind}: empty mask"
            # The files are exactly what inspection_sample gives, so its clean crop is the
            # reference for "pixels outside the mask are untouched".
            sample = inspection_sample(cat, kind, 0, size=64, seed=3)
            np.testing.assert_array_equal(image, sample.image)
            np.testing.assert_array_equal(mask == 255, sample.mask)
            outside = ~sample.mask
            np.testing.assert_array_equal(image[outside], sample.clean[outside])
            assert (image[sample.mask] != sample.clean[sample.mask]).any()


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_make_defect_changes_only_masked_pixels_visibly(kind: str) -> None:
    texture = inspection_sample("brick", "train", 0, size=64, seed=0).image  # a real surface
    for seed in range(6):
        image, mask = make_defect(texture, kind, np.random.default_rng(seed))  # type: ignore[arg-type]
        assert image.shape == texture.shape
        assert mask.dtype == bool
        assert mask.any()
        np.testing.assert_array_equal(image[~mask], texture[~mask])
        # Visible: the defect's pixels move clearly on average, not by a rounding step.
        diff = np.abs(image.astype(int) - texture.astype(int))[mask].mean()
        assert diff > 8, f"{kind} seed {seed}: mean change {diff:.1f}"
        assert mask.mean() < 0.5, f"{kind} seed {seed}: covers {mask.mean():.0%} of the image"
    again = make_defect(texture, kind, np.random.default_rng(0))  # type: ignore[arg-type]
    first = make_defect(texture, kind, np.random.default_rng(0))  # type: ignore[arg-type]
    np.testing.assert_array_equal(again.image, first.image)


def test_make_defect_refuses_bad_input() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match="image"):
        make_defect(np.zeros((64, 64), np.uint8), "hole", rng)
    with pytest.raises(ConfigError, match="image"):
        make_defect(np.zeros((64, 64, 3), np.float32), "hole", rng)
    with pytest.raises(UnknownNameError, match="dent"):
        make_defect(np.zeros((64, 64, 3), np.uint8), "dent", rng)  # type: ignore[arg-type]


def test_train_and_test_crops_come_from_separate_bands() -> None:
    # Rows of the top 60% are black and the rest white: a train crop that reached into the
    # test band (or the other way round) would hold both.
    texture = np.zeros((512, 512, 3), np.uint8)
    texture[int(512 * 0.6) :] = 255
    for seed in range(20):
        rng = np.random.default_rng(seed)
        assert normal_crop(texture, split="train", size=32, rng=rng).max() == 0
        assert normal_crop(texture, split="test", size=32, rng=rng).min() >= 235


def test_same_seed_is_byte_identical_and_another_seed_differs(
    small_set: tuple[Path, dict], tmp_path: Path
) -> None:
    root, _ = small_set
    write_inspection_set(tmp_path / "again", seed=3, **SMALL)
    assert _files(tmp_path / "again") == _files(root)
    write_inspection_set(tmp_path / "other", categories=("grass",), seed=4, **SMALL)
    other = _files(tmp_path / "other")
    same = {k: v for k, v in _files(root).items() if k.startswith("grass/")}
    assert other.keys() == same.keys()
    assert all(other[k] != same[k] for k in other if not k.endswith("_mask.png"))


def test_rerun_with_same_parameters_is_a_no_op(small_set: tuple[Path, dict]) -> None:
    root, _ = small_set
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    summary = write_inspection_set(root, seed=3, **SMALL)
    assert summary["reused"] is True
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps


def test_an_interrupted_set_is_finished(tmp_path: Path) -> None:
    root = tmp_path / "set"
    write_inspection_set(root, categories=("gravel",), seed=1, **SMALL)
    full = _files(root)
    (root / "gravel" / "test" / "hole" / "000.png").unlink()
    summary = write_inspection_set(root, categories=("gravel",), seed=1, **SMALL)
    assert summary["reused"] is False
    assert _files(root) == full


def test_refuses_foreign_and_other_parameter_folders(
    small_set: tuple[Path, dict], tmp_path: Path
) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="foreign") as info:
        write_inspection_set(foreign, **SMALL)
    assert "\n" not in str(info.value)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    root, _ = small_set
    with pytest.raises(OutputError, match=r"other parameters.*seed"):
        write_inspection_set(root, seed=4, **SMALL)
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        write_inspection_set(file, **SMALL)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"categories": ("marble",)}, UnknownNameError, "marble"),
        ({"defect_kinds": ("dent",)}, UnknownNameError, "dent"),
        ({"size": 8}, ConfigError, "size"),
        ({"train_per_category": 0}, ConfigError, "train_per_category"),
        ({"categories": ("brick", "brick")}, ConfigError, "distinct"),
    ],
)
def test_refuses_bad_parameters(tmp_path: Path, kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        write_inspection_set(tmp_path / "set", **{**SMALL, **kwargs})
    assert not (tmp_path / "set").exists()


def _script() -> ModuleType:
    path = Path(__file__).parents[1] / "scripts" / "make_inspection_set.py"
    spec = importlib.util.spec_from_file_location("make_inspection_set", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_summary_line_and_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = _script()
    args = ["--size", "64", "--train", "1", "--good-test", "1", "--defects-per-type", "1"]
    root = str(tmp_path / "set")
    assert cli.main([root, "--categories", "brick", "--defects", "hole,spot", *args]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert "wrote 1 categories, 4 images, 2 masks" in out
    assert (tmp_path / "set" / "brick" / "ground_truth" / "spot" / "000_mask.png").is_file()
    assert cli.main([root, "--seed", "9", "--categories", "brick", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert err.count("\n") == 1
    with pytest.raises(SystemExit) as info:
        cli.main([root, "--size", "big"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert err.count("\n") == 1
