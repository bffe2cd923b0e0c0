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
import io
import re
from pathlib import Path

from vprompt.data.dataset import DataSplits
from vprompt.data.items import Datum, ItemDataset, check_text, label_names
from vprompt.data.suite.base import read_split_file
from vprompt.errors import DatasetError

_SPLITS = ("train", "val", "test")


_COLUMNS = ("path", "label", "classname", "split")
_INTEGER = re.compile(r"[0-9]+")
_SIGNED = re.compile(r"[+-][0-9]+")


def _read_rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    """``(line, row)`` of a manifest CSV, each row holding exactly the header's columns."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"{path}: not UTF-8 text (byte {exc.start}); save the CSV as UTF-8"
        ) from None
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        header = [f.strip().lower() for f in next(reader, [])]
        _check_header(path, header)
        rows = []
        for values in reader:
            if not values:
                continue  # a blank line
            line = reader.line_num
            if len(values) != len(header):
                count = f"{len(values)} value{'s' if len(values) != 1 else ''}"
                raise DatasetError(
                    f"{path}:{line}: {count}, the header has {len(header)} columns "
                    f"({','.join(header)})"
                )
            rows.append((line, {k: v.strip() for k, v in zip(header, values, strict=True)}))
        return rows
    except csv.Error as exc:
        raise DatasetError(f"{path}: cannot read CSV ({exc})") from None


def _check_header(path: Path, header: list[str]) -> None:
    if "path" not in header or "label" not in header:
        raise DatasetError(
            f"{path}: needs a header with 'path' and 'label' columns, found {header}"
        )
    for name in header:
        if name not in _COLUMNS:
            raise DatasetError(
                f"{path}: unknown column {name!r} (expected path, label and optionally "
                "classname and split)"
            )
        if header.count(name) > 1:
            raise DatasetError(f"{path}: column {name!r} appears twice in the header")


def _to_items(rows: list[tuple[Path, int, dict[str, str]]]) -> dict[str, list[Datum]]:
    """Rows (file, line, row) → items per split, with one shared class order.

    Labels are either all integers (indices; named by a ``classname`` column or by their
    number) or all class names.
    """
    for file, line, r in rows:
        where = f"{file}:{line}"
        check_text(r["path"], what="path", where=where)
        check_text(r["label"], what="label", where=where)
        if _SIGNED.fullmatch(r["label"]):
            raise DatasetError(
                f"{where}: label {r['label']!r} is signed; integer labels are 0, 1, 2, …"
            )
        if r.get("classname"):
            check_text(r["classname"], what="class name", where=where)
    numeric = [(f, ln, r["label"]) for f, ln, r in rows if _INTEGER.fullmatch(r["label"])]
    integer = len(numeric) == len(rows)
    if numeric and not integer:
        named = next((f, ln, r["label"]) for f, ln, r in rows if not _INTEGER.fullmatch(r["label"]))
        raise DatasetError(
            f"labels mix integers ({numeric[0][0]}:{numeric[0][1]}: {numeric[0][2]!r}) and class "
            f"names ({named[0]}:{named[1]}: {named[2]!r}); give every label the same way (class "
            "names that are numbers: integer labels with a classname column)"
        )
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
            for line, row in _read_rows(file):
                if row.get("split", split) not in ("", split):
                    raise DatasetError(
                        f"{file}:{line}: split {row['split']!r} in the {split} split's file"
                    )
                row["split"] = split
                rows.append((file, line, row))
    else:
        root = path.parent
        for line, row in _read_rows(path):
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
