"""Output folders: checked before any work, never written over by another run without
--overwrite, and file-system failures as one line (utils/outdir, cli/common)."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from vprompt.errors import OutputError
from vprompt.utils import outdir
from vprompt.utils.outdir import MARKER, prepare_output_folder


def test_a_file_in_the_way_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("data")
    with pytest.raises(OutputError, match="is a file"):
        prepare_output_folder(tmp_path / "x", command="segment")
    with pytest.raises(
        OutputError, match=r"cannot create output folder .*x/sub: .*x is not a folder"
    ):
        prepare_output_folder(tmp_path / "x" / "sub", command="segment")
    assert (tmp_path / "x").read_text() == "data"  # untouched


def test_a_folder_that_cannot_be_created_or_written_is_refused(tmp_path, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(OutputError, match=r"cannot create output folder .*: Read-only file system"):
        prepare_output_folder(tmp_path / "new", command="train")
    monkeypatch.undo()
    monkeypatch.setattr(outdir, "create_temp_file", refuse)
    with pytest.raises(OutputError, match="is not writable: Read-only file system"):
        prepare_output_folder(tmp_path / "ro", command="train")


def test_only_the_same_run_writes_into_a_claimed_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = {"args": {"point": [[10, 10]], "image": "a.png"}}
    prepare_output_folder(out, command="segment", identity=first)
    (out / "mask_000.png").write_bytes(b"png")
    prepare_output_folder(out, command="segment", identity=first)  # a re-run goes on
    other = {"args": {"point": [[20, 20]], "image": "a.png"}}
    with pytest.raises(OutputError, match=r"another `vprompt segment` run.*--overwrite"):
        prepare_output_folder(out, command="segment", identity=other)
    with pytest.raises(OutputError, match="outputs of `vprompt segment`"):
        prepare_output_folder(out, command="personalize", identity=first)
    prepare_output_folder(out, command="segment", identity=other, overwrite=True)
    marker = json.loads((out / MARKER).read_text())
    assert marker["identity"] == outdir.identity_digest(other)
    assert (out / "mask_000.png").read_bytes() == b"png"  # never deleted, only written over


def test_files_vprompt_did_not_write_are_refused_hidden_ones_ignored(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / ".DS_Store").write_bytes(b"")
    prepare_output_folder(out, command="eval-clicks", identity={"args": {}})
    other = tmp_path / "theirs"
    other.mkdir()
    (other / "thesis.tex").write_text("months of work")
    with pytest.raises(OutputError, match=r"files vprompt did not write \(thesis.tex\)"):
        prepare_output_folder(other, command="segment", identity={"args": {}})
    assert not (other / MARKER).exists()


def test_commands_that_check_their_own_runs_share_the_folder(tmp_path: Path) -> None:
    """train/protocol claim by command only: their checkpoints and results decide (a resume,
    a protocol extended with more seeds)."""
    out = tmp_path / "run"
    prepare_output_folder(out, command="train")
    (out / "checkpoint.safetensors").write_bytes(b"x")
    prepare_output_folder(out, command="train")
    with pytest.raises(OutputError, match="outputs of `vprompt train`"):
        prepare_output_folder(out, command="protocol")
    legacy = tmp_path / "legacy"  # a run folder written before the marker existed
    legacy.mkdir()
    (legacy / "checkpoint.safetensors").write_bytes(b"x")
    prepare_output_folder(legacy, command="train")


def test_stale_temp_files_are_cleaned_when_a_folder_is_prepared(tmp_path: Path) -> None:
    import subprocess
    import sys

    from vprompt.utils import io as vio

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".prompt.safetensors.vprompt-{vio._HOST}-{proc.pid}-00aa11bb.tmp"
    stale.write_bytes(b"half a pack")
    prepare_output_folder(out, command="train")
    assert not stale.exists()


# ---------------------------------------------------------------------- through the CLI's guard


@pytest.fixture
def command(tmp_path: Path):
    """A tiny command with vprompt's --out guard and error handling, writing atomically."""
    from vprompt.cli.common import friendly_errors, output_folder
    from vprompt.utils.io import atomic_write_text

    @click.command()
    @click.option("--out", required=True)
    @click.option("--value", default="1")
    @friendly_errors
    @output_folder("demo")
    def demo(out: str, value: str) -> None:
        atomic_write_text(Path(out) / "result.txt", value)

    return demo


def _run(command, *args: str):
    return CliRunner().invoke(command, list(args))


def test_guard_refuses_another_run_and_overwrite_replaces(command, tmp_path: Path) -> None:
    out = str(tmp_path / "o")
    assert _run(command, "--out", out).exit_code == 0
    assert _run(command, "--out", out).exit_code == 0  # same run again
    refused = _run(command, "--out", out, "--value", "2")
    assert refused.exit_code == 1
    assert refused.output.count("\n") == 1
    assert "another `vprompt demo` run" in refused.output
    assert (tmp_path / "o" / "result.txt").read_text() == "1"
    assert _run(command, "--out", out, "--value", "2", "--overwrite").exit_code == 0
    assert (tmp_path / "o" / "result.txt").read_text() == "2"


def test_a_full_disk_is_one_line_naming_the_file_and_loses_nothing(
    command, tmp_path: Path, monkeypatch
) -> None:
    from vprompt.utils import io as vio

    out = tmp_path / "o"
    assert _run(command, "--out", str(out)).exit_code == 0

    def full(target: Path) -> Path:
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(vio, "create_temp_file", full)
    result = _run(command, "--out", str(out))
    assert result.exit_code == 1
    assert result.output == f"vprompt: error: {out / 'result.txt'}: No space left on device\n"
    assert (out / "result.txt").read_text() == "1"
