"""Click-evaluation folders, the SAM click predictor, and ``vprompt eval-clicks`` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vprompt.errors import DatasetError
from vprompt.prompts.spatial import Point
from vprompt.segment import Segmenter
from vprompt.segment.click_data import (
    SamClickPredictor,
    load_click_folder,
    sam_predictor_factory,
)


def _write_folder(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[0:120, 0:160]
    disc = (xx - 50) ** 2 + (yy - 60) ** 2 < 30**2
    square = (xx > 100) & (xx < 150) & (yy > 20) & (yy < 70)
    photo = np.full((120, 160, 3), 30, np.uint8)
    photo[disc] = (220, 40, 40)
    photo[square] = (40, 200, 60)
    Image.fromarray(photo).save(root / "images" / "a.png")
    labels = np.zeros((120, 160), np.uint8)
    labels[disc] = 1
    labels[square] = 2
    labels[0, :] = 255  # an ignore border
    Image.fromarray(labels).save(root / "masks" / "a.png")
    Image.fromarray(photo[:, ::-1].copy()).save(root / "images" / "b.jpg")
    Image.fromarray((disc[:, ::-1] * 255).astype(np.uint8)).save(root / "masks" / "b.png")
    return root


def test_load_click_folder_objects_and_errors(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "clicks")
    samples = load_click_folder(root, ignore_value=255)
    assert [(s.image.name, s.object_id) for s in samples] == [
        ("a.png", 1),
        ("a.png", 2),
        ("b.jpg", 255),
    ]
    assert samples[0].mask.sum() == samples[2].mask.sum()  # the same disc, mirrored
    assert len(load_click_folder(root)) == 4  # without ignore, 255 is an object too
    (root / "images" / "c.png").write_bytes((root / "images" / "a.png").read_bytes())
    with pytest.raises(DatasetError, match="no ground-truth mask"):
        load_click_folder(root)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "masks" / "c.png")
    with pytest.raises(DatasetError, match="differs from its image"):
        load_click_folder(root)
    with pytest.raises(DatasetError, match="images/ and masks/"):
        load_click_folder(tmp_path / "nowhere")


def test_sam_click_predictor_feeds_back_logits(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "clicks")
    samples = load_click_folder(root, ignore_value=255)
    seg = Segmenter.load("sam:tiny", "none", device="cpu")
    pairs, make = sam_predictor_factory(seg, samples)
    assert len(pairs) == 3
    first = make(0)
    second = make(1)  # same image: embedded once
    assert seg.encodes == 1
    assert isinstance(first, SamClickPredictor)
    mask, logits = first([Point(50, 60)], None)
    assert mask.shape == (120, 160)
    assert logits is not None
    refined, _ = first([Point(50, 60), Point(120, 40, positive=False)], logits)
    fresh, _ = second([Point(50, 60), Point(120, 40, positive=False)], None)
    assert refined.shape == fresh.shape


def test_eval_clicks_cli(run_cli, tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "clicks")
    out = tmp_path / "report"
    res = run_cli(
        "eval-clicks",
        "--data",
        root,
        "--model",
        "sam:tiny",
        "--weights",
        "none",
        "--device",
        "cpu",
        "--max-clicks",
        "3",
        "--ignore-value",
        "255",
        "--out",
        out,
    )
    assert res.returncode == 0, res.stderr
    assert "NoC@85" in res.stdout
    assert "NoC@90" in res.stdout
    report = json.loads((out / "report.json").read_text())
    assert len(report["samples"]) == 3
    assert len(report["miou_at"]) == 3
    assert set(report["noc"]) == {"0.85", "0.9"}
    assert all(1 <= v <= 3 for v in report["noc"].values())
    assert (out / "miou_curve.png").is_file()
    bad = run_cli("eval-clicks", "--data", tmp_path, "--weights", "none", "--out", tmp_path / "b")
    assert bad.returncode == 1
    assert "images/ and masks/" in bad.stderr
