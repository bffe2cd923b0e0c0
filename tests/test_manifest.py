"""CSV and JSON manifests as --data sources."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from vprompt.data.sources import load_data
from vprompt.errors import DatasetError, UnknownNameError


def _images(root: Path, names: list[str]) -> None:
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i * 20 % 255, 0, 0)).save(path)


def test_single_csv_with_split_column(tmp_path: Path) -> None:
    _images(tmp_path, ["a/1.png", "a/2.png", "b/1.png", "b/2.png", "c/1.png"])
    (tmp_path / "data.csv").write_text(
        "path,label,split\n"
        "a/1.png,zebra,train\nb/1.png,ant,train\nc/1.png,moth,train\n"
        "a/2.png,zebra,test\nb/2.png,ant,val\n"
    )
    splits = load_data(f"csv:{tmp_path / 'data.csv'}")
    assert splits.classnames == ["ant", "moth", "zebra"]  # sorted class names → labels
    assert [label for _, label in (splits.train[i] for i in range(3))] == [2, 0, 1]
    assert len(splits.test) == 1
    assert splits.test[0][1] == 2
    assert splits.val is not None
    assert splits.val[0][1] == 0


def test_csv_folder_with_integer_labels_and_names(tmp_path: Path) -> None:
    _images(tmp_path, ["x.png", "y.png", "z.png"])
    (tmp_path / "train.csv").write_text("path,label,classname\nx.png,1,dog\ny.png,0,cat\n")
    (tmp_path / "test.csv").write_text("path,label,classname\nz.png,1,dog\n")
    splits = load_data(f"csv:{tmp_path}")
    assert splits.classnames == ["cat", "dog"]
    assert splits.val is None
    assert [splits.train[i][1] for i in range(2)] == [1, 0]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("file,label\nx.png,a\n", "'path' and 'label'"),
        ("path,label\nx.png,a\n", "'split' column"),
        ("path,label,split\nx.png,a,holdout\n", "not train, val or test"),
        ("path,label,split\nx.png,1,train\ny.png,1,test\n", None),
        ("path,label,classname,split\nx.png,1,a,train\ny.png,1,b,test\n", "named 'b' here"),
    ],
)
def test_bad_csv_is_a_clear_error(tmp_path: Path, content: str, message: str | None) -> None:
    (tmp_path / "m.csv").write_text(content)
    if message is None:  # integer labels without names are fine: named by their number
        assert load_data(f"csv:{tmp_path / 'm.csv'}").classnames == ["1"]
        return
    with pytest.raises(DatasetError, match=message):
        load_data(f"csv:{tmp_path / 'm.csv'}")


def test_json_manifest_in_split_format(tmp_path: Path) -> None:
    _images(tmp_path, ["imgs/p.png", "imgs/q.png"])
    manifest = {
        "train": [["imgs/p.png", 0, "red_fox"], ["imgs/q.png", 1, "owl"]],
        "val": [],
        "test": [["imgs/q.png", 1, "owl"]],
    }
    (tmp_path / "split.json").write_text(json.dumps(manifest))
    splits = load_data(f"json:{tmp_path / 'split.json'}")
    assert splits.classnames == ["red_fox", "owl"]
    image, label = splits.test[0]
    assert label == 1
    assert image.size == (8, 8)


def test_unknown_source_names_sources_and_datasets(tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="oxford_pets"):
        load_data("oxford_pet", data_root=tmp_path)


def test_benchmark_dataset_needs_a_data_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VPROMPT_DATA_ROOT", raising=False)
    with pytest.raises(DatasetError, match="--data-root"):
        load_data("oxford_pets")


def test_shots_refused_for_non_benchmark_sources(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="benchmark datasets"):
        load_data(f"folder:{tmp_path}", shots=4)


# --------------------------------------------------------------------------- hostile manifests


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("path,label,split\na.png,cat,train,EXTRA\nb.png,dog,test\n", r"m.csv:2: 4 values"),
        ("path,label,split\na.png\nb.png,dog,test\n", r"m.csv:2: 1 value, the header has 3"),
        ("path,label,split\na.png,,train\nb.png,dog,test\n", r"m.csv:2: empty label"),
        ("path,label,split,notes\na.png,cat,train,x\nb.png,dog,test,y\n", "unknown column 'notes'"),
        ("path,label,label,split\na.png,cat,dog,train\n", "column 'label' appears twice"),
        ("path,label,split\na.png,-5,train\nb.png,0,test\n", r"m.csv:2: label '-5'"),
        ("path,label,split\na.png,3,train\nb.png,cat,test\n", "mix integers"),
        ('path,label,split\na.png,"ca\nt",train\nb.png,dog,test\n', "control character"),
        ("path,label,split\na.png,\u0661,train\nb.png,0,test\n", "mix integers"),
    ],
    ids=[
        "extra-cells",
        "short-row",
        "empty-label",
        "unknown-column",
        "duplicate-column",
        "negative",
        "mixed",
        "newline",
        "non-ascii-digit",
    ],
)
def test_hostile_csv_is_refused_naming_the_line(tmp_path: Path, content: str, message: str):
    (tmp_path / "m.csv").write_text(content, encoding="utf-8")
    with pytest.raises(DatasetError, match=message):
        load_data(f"csv:{tmp_path / 'm.csv'}")


def test_large_integer_labels_are_indices_into_sorted_labels(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("path,label,split\na.png,10000000000,train\nb.png,0,test\n")
    assert load_data(f"csv:{tmp_path / 'm.csv'}").classnames == ["0", "10000000000"]


def test_non_utf8_csv_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_bytes(b"path,label,split\na.png,caf\xe9,train\nb.png,x,test\n")
    with pytest.raises(DatasetError, match="not UTF-8"):
        load_data(f"csv:{tmp_path / 'm.csv'}")


def _split_json(train_entry: str) -> str:
    return f'{{"train": [{train_entry}], "val": [], "test": [["b.png", 0, "dog"]]}}'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_split_json('["a.png", Infinity, "cat"]'), "Infinity is not a JSON value"),
        (_split_json('["a.png", NaN, "cat"]'), "NaN is not a JSON value"),
        (_split_json('["a.png", 1.7, "cat"]'), r"\[train\]\[0\]: label 1.7 is not an integer"),
        (_split_json('["a.png", true, "cat"]'), "label True is not an integer"),
        (_split_json('["a.png", "1", "cat"]'), "label '1' is not an integer"),
        (_split_json('["a.png", 10000000000, "cat"]'), r"\[train\]: labels must be 0..0; got 1"),
        (_split_json('["a.png", 1, ""]'), "empty class name"),
        (_split_json('["", 1, "cat"]'), "empty path"),
        (_split_json('["a.png", 1, "ca\\u0000t"]'), "control character"),
        ('{"train": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested deeper than 64"),
    ],
    ids=[
        "infinity",
        "nan",
        "float",
        "bool",
        "string",
        "1e10",
        "empty-name",
        "empty-path",
        "nul",
        "deep",
    ],
)
def test_hostile_json_manifest_is_refused(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "split.json").write_text(text, encoding="utf-8")
    with pytest.raises(DatasetError, match=message):
        load_data(f"json:{tmp_path / 'split.json'}")


def test_non_utf8_json_manifest_is_refused(tmp_path: Path) -> None:
    (tmp_path / "split.json").write_bytes(_split_json('["a.png", 0, "caf\xe9"]').encode("latin-1"))
    with pytest.raises(DatasetError, match="not UTF-8"):
        load_data(f"json:{tmp_path / 'split.json'}")


def test_folder_class_names_must_be_printable_utf8(tmp_path: Path) -> None:
    for split in ("train", "test"):
        _images(tmp_path / split, ["ok/1.png"])
    bad = os.fsdecode(b"caf\xe9")  # a folder name that is not UTF-8
    _images(tmp_path / "train", [f"{bad}/1.png"])
    with pytest.raises(DatasetError, match="not UTF-8"):
        load_data(f"folder:{tmp_path}")
