"""Anomaly dataset readers on tiny MVTec-, VisA- and folder-shaped trees."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vprompt.anomaly.datasets import (
    AnomalySample,
    check_anomaly_data,
    load_mask,
    read_anomaly_data,
)
from vprompt.errors import DatasetError, ImageLoadError


def png(path: Path, *, size: tuple[int, int] = (8, 8), value: int = 128) -> Path:
    """An H x W grey image (a mask when value is 0 or 255)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, dtype=np.uint8), mode="L").save(path)
    return path


def mvtec_tree(root: Path) -> Path:
    for cat in ("bottle", "cable"):
        png(root / cat / "train/good/000.png")
        png(root / cat / "train/good/001.png")
        png(root / cat / "test/good/000.png")
        for defect in ("broken", "crack"):
            png(root / cat / "test" / defect / "000.png")
            png(root / cat / "ground_truth" / defect / "000_mask.png", value=255)
    (root / "readme.txt").write_text("not a category")
    (root / "extras").mkdir()  # a folder without train/ or test/: not a category
    return root


VISA_HEADER = "object,split,label,image,mask\n"


def visa_tree(root: Path, rows: list[str] | None = None, header: str = VISA_HEADER) -> Path:
    if rows is None:
        rows = []
        for obj in ("candle", "pcb1"):
            base = f"{obj}/Data"
            for i in range(2):
                png(root / base / f"Images/Normal/{i:04d}.png")
                rows.append(f"{obj},train,normal,{base}/Images/Normal/{i:04d}.png,")
            png(root / base / "Images/Normal/0100.png")
            rows.append(f"{obj},test,normal,{base}/Images/Normal/0100.png,")
            png(root / base / "Images/Anomaly/000.png")
            png(root / base / "Masks/Anomaly/000.png", value=255)
            rows.append(
                f"{obj},test,anomaly,{base}/Images/Anomaly/000.png,{base}/Masks/Anomaly/000.png"
            )
    csv_path = root / "split_csv/1cls.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    csv_path.write_text(header + "\n".join(rows) + "\n")
    return root


def folder_tree(root: Path) -> Path:
    png(root / "good/a.png")
    png(root / "good/b.PNG")
    png(root / "defect/scratch/c.png")
    png(root / "ground_truth/scratch/c_mask.png", value=255)
    png(root / "defect/d.jpg")  # directly in defect/: defect type "defect", mask d.png
    png(root / "ground_truth/d.png", value=255)
    png(root / "defect/scratch/e.png")  # no mask: image-level only
    png(root / "train/t1.png")
    png(root / "train/more/t2.bmp")
    (root / "good/notes.txt").write_text("ignored")
    return root


# ---------------------------------------------------------------------------------------- MVTec
def test_mvtec_reader(tmp_path):
    root = mvtec_tree(tmp_path / "mvtec")
    cats = read_anomaly_data(f"mvtec:{root}")
    assert [c.name for c in cats] == ["bottle", "cable"]
    bottle = cats[0]
    assert bottle.train == (
        root / "bottle/train/good/000.png",
        root / "bottle/train/good/001.png",
    )
    assert bottle.test == (
        AnomalySample(
            root / "bottle/test/broken/000.png",
            1,
            root / "bottle/ground_truth/broken/000_mask.png",
            "broken",
        ),
        AnomalySample(
            root / "bottle/test/crack/000.png",
            1,
            root / "bottle/ground_truth/crack/000_mask.png",
            "crack",
        ),
        AnomalySample(root / "bottle/test/good/000.png", 0, None, "good"),
    )
    assert check_anomaly_data(f"mvtec:{root}", decode=True) == []


def test_mvtec_category_selection(tmp_path):
    root = mvtec_tree(tmp_path / "mvtec")
    assert [c.name for c in read_anomaly_data(f"mvtec:{root}", categories=["cable"])] == ["cable"]
    assert [c.name for c in read_anomaly_data(f"mvtec:{root}", categories="bottle")] == ["bottle"]
    with pytest.raises(DatasetError, match="unknown categories carpet; available: bottle, cable"):
        read_anomaly_data(f"mvtec:{root}", categories=["carpet"])


def test_mvtec_missing_mask_is_named(tmp_path):
    root = mvtec_tree(tmp_path / "mvtec")
    mask = root / "cable/ground_truth/crack/000_mask.png"
    mask.unlink()
    with pytest.raises(DatasetError) as err:
        read_anomaly_data(f"mvtec:{root}")
    assert str(err.value) == (
        f"mask {mask} is missing (expected the ground truth of {root}/cable/test/crack/000.png)"
    )
    # Selecting the intact category still works.
    assert len(read_anomaly_data(f"mvtec:{root}", categories=["bottle"])) == 1


def test_mvtec_missing_train_good_is_named(tmp_path):
    root = mvtec_tree(tmp_path / "mvtec")
    for p in (root / "bottle/train/good").iterdir():
        p.unlink()
    (root / "bottle/train/good").rmdir()
    with pytest.raises(DatasetError, match=r"bottle/train/good is missing \(expected the normal"):
        read_anomaly_data(f"mvtec:{root}")


def test_missing_root_and_wrong_layout(tmp_path):
    with pytest.raises(DatasetError, match=r"MVTec AD root .*nowhere does not exist"):
        read_anomaly_data(f"mvtec:{tmp_path / 'nowhere'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="is not an MVTec AD folder"):
        read_anomaly_data(f"mvtec:{tmp_path / 'empty'}")
    with pytest.raises(DatasetError, match="is not an anomaly folder"):
        read_anomaly_data(f"folder:{tmp_path / 'empty'}")
    with pytest.raises(DatasetError, match=r"split_csv/1cls\.csv is missing"):
        read_anomaly_data(f"visa:{tmp_path / 'empty'}")
    with pytest.raises(DatasetError, match="expected LAYOUT:ROOT with LAYOUT one of mvtec"):
        read_anomaly_data(str(tmp_path))
    with pytest.raises(DatasetError, match="expected LAYOUT:ROOT"):
        read_anomaly_data(f"btad:{tmp_path}")


def test_check_finds_every_problem(tmp_path):
    root = mvtec_tree(tmp_path / "mvtec")
    (root / "bottle/ground_truth/broken/000_mask.png").unlink()
    (root / "bottle/ground_truth/crack/000_mask.png").unlink()
    for p in (root / "cable/train/good").iterdir():
        p.unlink()
    png(root / "cable/ground_truth/crack/000_mask.png", size=(4, 8), value=255)  # wrong size
    for p in (root / "cable/test/good").iterdir():
        p.unlink()
    problems = check_anomaly_data(f"mvtec:{root}", decode=True)
    text = "\n".join(f"{p.severity}: {p.what}" for p in problems)
    assert "error: 2 defect images without a mask" in text
    assert "broken/000_mask.png is missing" in text
    assert "crack/000_mask.png is missing" in text
    assert "cable/train/good holds no images" in text
    assert "is 8x4 but its image" in text
    assert "warning:" in text
    assert "only anomalous images" in text
    assert [p.severity for p in problems] == sorted(
        (p.severity for p in problems), key=lambda s: s != "error"
    )
    assert all(p.fix for p in problems)
    # Without decode, sizes are not looked at.
    assert "8x4" not in "\n".join(p.what for p in check_anomaly_data(f"mvtec:{root}"))


# ----------------------------------------------------------------------------------------- VisA
def test_visa_reader(tmp_path):
    root = visa_tree(tmp_path / "visa")
    cats = read_anomaly_data(f"visa:{root}")
    assert [c.name for c in cats] == ["candle", "pcb1"]
    candle = cats[0]
    assert candle.train == tuple(root / f"candle/Data/Images/Normal/{i:04d}.png" for i in range(2))
    assert candle.test == (
        AnomalySample(
            root / "candle/Data/Images/Anomaly/000.png",
            1,
            root / "candle/Data/Masks/Anomaly/000.png",
            "anomaly",
        ),
        AnomalySample(root / "candle/Data/Images/Normal/0100.png", 0, None, "good"),
    )
    assert [c.name for c in read_anomaly_data(f"visa:{root}", categories=["pcb1"])] == ["pcb1"]
    assert check_anomaly_data(f"visa:{root}", decode=True) == []


def test_visa_bad_header(tmp_path):
    root = visa_tree(tmp_path / "visa", header="object,split,label,image\n")
    with pytest.raises(DatasetError, match=r"header is object,split,label,image; expected object"):
        read_anomaly_data(f"visa:{root}")


def test_visa_row_with_missing_file_names_the_row(tmp_path):
    root = visa_tree(tmp_path / "visa")
    (root / "pcb1/Data/Masks/Anomaly/000.png").unlink()
    with pytest.raises(DatasetError) as err:
        read_anomaly_data(f"visa:{root}")
    assert "1cls.csv row 9: pcb1/Data/Masks/Anomaly/000.png does not exist under" in str(err.value)
    assert "\n" not in str(err.value)
    assert len(read_anomaly_data(f"visa:{root}", categories=["candle"])) == 1


def test_visa_malformed_rows(tmp_path):
    png(tmp_path / "v/a.png")
    cases = {
        "x,train,normal,a.png,\nx,val,normal,a.png,": "row 3: split 'val'",
        "x,train,normal,a.png,\nx,test,bad,a.png,": "row 3: label 'bad'",
        "x,train,normal,a.png,\nx,test,anomaly,a.png,": "row 3: an anomaly without a mask",
        "x,train,anomaly,a.png,a.png": "row 2: a train image labelled anomaly",
        "x,train,normal": "row 2: 3 columns; expected 5",
        "x,train,normal,a.png,": "object x has no test rows",
    }
    for rows, message in cases.items():
        visa_tree(tmp_path / "v", rows.split("\n"))
        with pytest.raises(DatasetError, match=message):
            read_anomaly_data(f"visa:{tmp_path / 'v'}")


# --------------------------------------------------------------------------------------- folder
def test_folder_reader(tmp_path):
    root = folder_tree(tmp_path / "widgets")
    [cat] = read_anomaly_data(f"folder:{root}")
    assert cat.name == "widgets"
    assert cat.train == (root / "train/more/t2.bmp", root / "train/t1.png")
    assert cat.test == (
        AnomalySample(root / "defect/d.jpg", 1, root / "ground_truth/d.png", "defect"),
        AnomalySample(root / "good/a.png", 0, None, "good"),
        AnomalySample(root / "good/b.PNG", 0, None, "good"),
        AnomalySample(
            root / "defect/scratch/c.png", 1, root / "ground_truth/scratch/c_mask.png", "scratch"
        ),
        AnomalySample(root / "defect/scratch/e.png", 1, None, "scratch"),
    )
    problems = check_anomaly_data(f"folder:{root}")
    assert [p.severity for p in problems] == ["warning"]
    assert "defect/scratch/e.png has no mask" in problems[0].what
    with pytest.raises(DatasetError, match="available: widgets"):
        read_anomaly_data(f"folder:{root}", categories=["gadgets"])


def test_folder_one_class_warns(tmp_path):
    png(tmp_path / "f/good/a.png")
    [cat] = read_anomaly_data(f"folder:{tmp_path / 'f'}")
    assert cat.train == ()
    assert len(cat.test) == 1
    [problem] = check_anomaly_data(f"folder:{tmp_path / 'f'}")
    assert "only normal images" in problem.what


# ------------------------------------------------------------------------------------------ masks
def test_load_mask(tmp_path):
    arr = np.zeros((4, 6), dtype=np.uint8)
    arr[1, 2] = 1  # any nonzero value is anomalous
    Image.fromarray(arr, mode="L").save(tmp_path / "m.png")
    mask = load_mask(tmp_path / "m.png")
    assert mask.dtype == bool
    assert mask.shape == (4, 6)
    assert mask.sum() == 1
    big = load_mask(tmp_path / "m.png", (8, 12))  # (H, W), nearest
    assert big.shape == (8, 12)
    assert big.sum() == 4
    assert big[2:4, 4:6].all()
    rgb = np.zeros((3, 3, 3), dtype=np.uint8)
    rgb[0, 0, 2] = 200
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "c.png")
    assert load_mask(tmp_path / "c.png").sum() == 1
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ImageLoadError, match=r"bad\.png: not a recognised image format"):
        load_mask(tmp_path / "bad.png")
    with pytest.raises(ImageLoadError, match=r"gone\.png: mask file does not exist"):
        load_mask(tmp_path / "gone.png")
