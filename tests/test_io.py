"""Atomic writes: all or nothing, no temp files left behind, ordinary file permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vprompt.utils.io import atomic_path, atomic_write_bytes, atomic_write_text, atomic_write_with


def test_write_text_and_bytes(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"
    atomic_write_text(target, "héllo\n")
    assert target.read_bytes() == "héllo\n".encode()
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_failed_writer_keeps_old_file_and_cleans_up(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def writer(tmp: Path) -> None:
        assert tmp != target
        assert tmp.parent == target.parent
        tmp.write_bytes(b"half")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError, match="crash mid-write"):
        atomic_write_with(target, writer)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_failure_before_anything_is_written_leaves_no_target(tmp_path):
    target = tmp_path / "new.txt"
    with pytest.raises(KeyError), atomic_path(target):
        raise KeyError("x")
    assert list(tmp_path.iterdir()) == []


def test_temp_file_is_hidden_in_target_folder(tmp_path):
    target = tmp_path / "pack.safetensors"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(".pack.safetensors.")
        assert tmp.name.endswith(".tmp")
        assert not target.exists()
        tmp.write_text("done")
    assert target.read_text() == "done"
    assert not tmp.exists()


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_result_has_ordinary_permissions(tmp_path, umask):
    # mkstemp makes 0600 files; a saved pack must be as readable as any file the user writes.
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "x.txt", "x")
        with open(tmp_path / "plain.txt", "w") as fh:
            fh.write("x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "x.txt").stat().st_mode)
    assert mode == 0o666 & ~umask
    assert mode == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)


# --------------------------------------------------------------------------- JSON


def test_json_out_is_standard_json_with_non_finite_numbers_as_null():
    import json

    import numpy as np

    from vprompt.utils import jsonio

    value = {"a": float("nan"), "b": [1.5, float("-inf"), (np.float32("inf"), 2)], "c": "NaN"}
    text = jsonio.dumps(value)
    assert json.loads(text) == {"a": None, "b": [1.5, None, [None, 2]], "c": "NaN"}
    assert jsonio.dumps(np.array([1.0, np.nan])) == "[1.0, null]"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"a": NaN}', "NaN is not a JSON value"),
        ("[Infinity]", "Infinity is not a JSON value"),
        ("[-Infinity]", "-Infinity is not a JSON value"),
        ("[" * 100_000 + "]" * 100_000, "nested deeper than 64 levels"),
        ("[" * 65 + "]" * 65, "nested deeper than 64 levels"),
        (b"\xff\xfe{}", r"not UTF-8 text \(byte 0\)"),
        ("{'single': 1}", "not valid JSON"),
    ],
    ids=["nan", "infinity", "minus-infinity", "very-deep", "65-deep", "not-utf8", "python"],
)
def test_json_in_refuses_what_is_not_standard_json(text, reason):
    from vprompt.utils import jsonio

    with pytest.raises(jsonio.JSONInputError, match=reason) as info:
        jsonio.loads(text, what="my.json")
    assert str(info.value).startswith("my.json: ")
    assert jsonio.loads("[" * 64 + "]" * 64, what="ok") is not None
