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


# --------------------------------------------------------------------------- killed writes


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temp_files_of_killed_writes_are_cleaned_and_live_ones_kept(tmp_path):
    import time

    from vprompt.utils import io as vio

    host = vio._HOST
    dead = tmp_path / f".pack.safetensors.vprompt-{host}-{_dead_pid()}-0a1b2c3d.tmp"
    live = tmp_path / f".pack.safetensors.vprompt-{host}-{os.getpid()}-0a1b2c3e.tmp"
    other_young = tmp_path / ".x.json.vprompt-elsewhere-12-0a1b2c3f.tmp"
    other_old = tmp_path / ".y.json.vprompt-elsewhere-12-0a1b2c40.tmp"
    legacy_old = tmp_path / ".z.json.ab_cd123.tmp"
    legacy_young = tmp_path / ".w.json.ab_cd124.tmp"
    unrelated = tmp_path / "notes.tmp"
    for path in (dead, live, other_young, other_old, legacy_old, legacy_young, unrelated):
        path.write_bytes(b"half")
    two_days_ago = time.time() - 2 * 24 * 3600
    for path in (other_old, legacy_old):
        os.utime(path, (two_days_ago, two_days_ago))
    removed = vio.clean_stale_temp_files(tmp_path)
    assert sorted(removed) == sorted([dead, other_old, legacy_old])
    assert {p.name for p in tmp_path.iterdir()} == {
        p.name for p in (live, other_young, legacy_young, unrelated)
    }
    assert vio.clean_stale_temp_files(tmp_path / "missing") == []


def test_a_write_names_its_writer(tmp_path):
    from vprompt.utils import io as vio

    with atomic_path(tmp_path / "result.json") as tmp:
        assert vio._TEMP.match(tmp.name)
        assert f"-{os.getpid()}-" in tmp.name
        assert vio.clean_stale_temp_files(tmp_path) == []  # a live writer's file stays


def test_a_full_disk_error_names_the_target_not_the_temp_file(tmp_path):
    import errno

    target = tmp_path / "result.json"
    target.write_text("old")

    def writer(tmp: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    with pytest.raises(OSError, match="No space left") as info:
        atomic_write_with(target, writer)
    assert info.value.filename == str(target)
    assert target.read_text() == "old"  # nothing lost
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


# --------------------------------------------------------------------------- .npy from users


def _npy_with_header(path: Path, shape: tuple[int, ...], payload: bytes = b"") -> Path:
    """A .npy file whose header claims ``shape`` (float32) over ``payload``."""
    import io

    import numpy as np

    buf = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    path.write_bytes(buf.getvalue() + payload)
    return path


def test_read_npy_reads_what_np_save_writes(tmp_path):
    import numpy as np

    from vprompt.utils.npy import read_npy

    for array in (
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)),
        np.zeros((0, 5)),
    ):
        np.save(tmp_path / "a.npy", array)
        got = read_npy(tmp_path / "a.npy")
        assert got.dtype == array.dtype
        np.testing.assert_array_equal(got, array)


def test_read_npy_refuses_what_it_cannot_trust_before_allocating(tmp_path):
    import numpy as np

    from vprompt.utils.npy import ArrayFileError, read_npy

    np.savez(tmp_path / "a.npz", x=np.zeros(3))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "str.npy", np.array(["a", "b"]))
    huge = _npy_with_header(tmp_path / "huge.npy", (10**6, 10**6), b"\x00" * 64)
    short = _npy_with_header(tmp_path / "short.npy", (4, 4), b"\x00" * 60)
    (tmp_path / "text.npy").write_text("1 2 3")
    np.save(tmp_path / "big.npy", np.zeros((64, 64), np.float32))
    cases = {
        tmp_path / "a.npz": "a .npz archive",
        tmp_path / "obj.npy": "holds object values",
        tmp_path / "str.npy": "expected numbers",
        huge: r"claims shape \(1000000, 1000000\) \(4000000000000 bytes\) but the file holds 64",
        short: "holds 60 bytes",
        tmp_path / "text.npy": "not a .npy file",
        tmp_path / "missing.npy": "no such file",
    }
    for path, message in cases.items():
        with pytest.raises(ArrayFileError, match=message) as info:
            read_npy(path)
        assert str(info.value).startswith(str(path))
    with pytest.raises(ArrayFileError, match="over the limit of 1000"):
        read_npy(tmp_path / "big.npy", max_bytes=1000)
