"""Datasets described by manifest files: CSV (``path,label[,split]``) or split-style JSON.

* ``csv:FILE.csv`` — one file with a ``split`` column (``train``/``val``/``test``);
  ``csv:DIR`` — ``DIR/train.csv``, ``DIR/test.csv`` and optional ``DIR/val.csv``.
  Columns: ``path`` (relative to the CSV's folder, or absolute) and ``label`` (a class name, or an
  integer index when a ``classname`` column names it). Class order: sorted names, unless labels
  are integers.
* ``json:FILE.json`` — the CoOp ``split_zhou`` format, ``{"train"|"val"|"test": [[path, label,
  classname], …]}``, paths relative to the file's folder.
"""

from __future__ import annotations

import csv
from pathlib import Path

from vprompt.data.dataset import DataSplits
from vprompt.data.items import Datum, ItemDataset, label_names
from vprompt.data.suite.base import read_split_file
from vprompt.errors import DatasetError

_SPLITS = ("train", "val", "test")


def _read_rows(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip().lower() for f in (reader.fieldnames or [])]
            if "path" not in fields or "label" not in fields:
                raise DatasetError(
                    f"{path}: needs a header with 'path' and 'label' columns, found {fields}"
                )
            return [
                {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
                for row in reader
            ]
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: cannot read CSV ({exc})") from None


def _to_items(rows: list[tuple[Path, int, dict[str, str]]]) -> dict[str, list[Datum]]:
    """Rows (file, line, row) → items per split, with one shared class order."""
    integer = all(r["label"].lstrip("-").isdigit() for _, _, r in rows)
    if integer:
        names: dict[int, str] = {}
        for file, line, r in rows:
            label = int(r["label"])
            name = r.get("classname") or str(label)
            if names.setdefault(label, name) != name:
                raise DatasetError(
                    f"{file}:{line}: label {label} is named {name!r} here, {names[label]!r} before"
                )
        classes = [names[i] for i in sorted(names)]
        index = {i: pos for pos, i in enumerate(sorted(names))}
    else:
        classes = sorted({r["label"] for _, _, r in rows})
        index = {}
    index_of = {name: pos for pos, name in enumerate(classes)}
    out: dict[str, list[Datum]] = {s: [] for s in _SPLITS}
    for file, line, r in rows:
        if not r["path"]:
            raise DatasetError(f"{file}:{line}: empty path")
        split = r.get("split", "train") or "train"
        if split not in out:
            raise DatasetError(f"{file}:{line}: split {split!r} is not train, val or test")
        label = index[int(r["label"])] if integer else index_of[r["label"]]
        out[split].append(Datum(Path(r["path"]).as_posix(), label, classes[label]))
    return out


def load_csv(spec: str | Path) -> DataSplits:
    """``csv:FILE.csv`` (with a split column) or ``csv:DIR`` (train.csv, test.csv, val.csv)."""
    path = Path(spec).expanduser()
    rows: list[tuple[Path, int, dict[str, str]]] = []
    if path.is_dir():
        root = path
        for split in _SPLITS:
            file = path / f"{split}.csv"
            if not file.is_file():
                if split != "val":
                    raise DatasetError(f"{path}: expected {file.name} (and optional val.csv)")
                continue
            for line, row in enumerate(_read_rows(file), start=2):
                row["split"] = split
                rows.append((file, line, row))
    else:
        root = path.parent
        for line, row in enumerate(_read_rows(path), start=2):
            if "split" not in row:
                raise DatasetError(
                    f"{path}: a single CSV needs a 'split' column (train/val/test); or pass a "
                    "folder with train.csv and test.csv"
                )
            rows.append((path, line, row))
    if not rows:
        raise DatasetError(f"{path}: the manifest lists no images")
    items = _to_items(rows)
    return _splits(path.stem if path.is_file() else path.name, root, items)


def load_json_manifest(spec: str | Path) -> DataSplits:
    """``json:FILE.json`` in the ``split_zhou`` format, paths relative to its folder."""
    path = Path(spec).expanduser()
    full = read_split_file(path, "")
    items = {"train": full.train, "val": full.val, "test": full.test}
    return _splits(path.stem, path.parent, items)


def _splits(name: str, root: Path, items: dict[str, list[Datum]]) -> DataSplits:
    if not items["train"] or not items["test"]:
        raise DatasetError(f"{name}: the manifest needs train and test images")
    names = label_names(items["train"] + items["val"] + items["test"])
    train = ItemDataset(root, items["train"], names)
    test = ItemDataset(root, items["test"], names)
    val = ItemDataset(root, items["val"], names) if items["val"] else None
    return DataSplits(name, train, test, val)
