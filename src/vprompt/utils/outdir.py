"""Output folders: checked before any work starts, and never written over by another run.

Every command with ``--out`` checks its folder before doing any work
(:func:`check_output_folder`: nothing is created then) and claims it when it first writes
there (:func:`claim_output_folder`: the folder is made, proved writable and marked with a small
``.vprompt-out.json`` naming the command and, where the command says so, a digest of its inputs
and settings). A folder that holds other files is refused unless they are this command's own
(the same command, and the same inputs and settings where that applies, so a re-run or a resume
goes on by itself) or the user passed ``--overwrite``. Temporary files of a killed write are
removed when the folder is checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from vprompt.errors import OutputError, describe_os_error
from vprompt.utils import jsonio
from vprompt.utils.io import (
    atomic_write_text,
    before_first_write,
    clean_stale_temp_files,
    create_temp_file,
)

MARKER = ".vprompt-out.json"
_FORMAT = "vprompt-out"
_LEGACY_RUN_FILES = ("checkpoint.safetensors", "protocol.json", "results.json")
"""Files that show a folder is a run folder of an older vprompt (before the marker)."""


def identity_digest(identity: Mapping[str, Any]) -> str:
    """A short stable digest of what determines a command's outputs."""
    text = jsonio.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_output_folder(
    path: str | os.PathLike[str],
    *,
    command: str,
    identity: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Refuse, before any work, an output folder the command could not or must not write.

    Nothing is created. An existing folder is proved writable (a temporary file is made and
    removed), loses the temporary files of killed writes, and must hold nothing but this
    command's own outputs (unless ``overwrite``).

    Args:
        command: The command that writes there (``train``, ``segment`` …).
        identity: What determines the outputs (inputs, model, settings). With it, only a run
            with the same identity may write into a folder this command already wrote; with
            None, any run of ``command`` may (its own checks decide: a training run resumes
            only its own checkpoint).
        overwrite: Write over whatever the folder holds.

    Raises:
        OutputError: A file where the folder should be, a folder that cannot be created or
            written, or one holding files of another run (without ``overwrite``).
    """
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output folder {folder} is a file; give a folder path")
    if not folder.exists():
        _check_creatable(folder)
        return folder
    _check_writable(folder)
    clean_stale_temp_files(folder)
    if not overwrite:
        _refuse_foreign(folder, _claim(command, identity))
    return folder


def claim_output_folder(
    path: str | os.PathLike[str], *, command: str, identity: Mapping[str, Any] | None = None
) -> Path:
    """Create the folder (with its parents) and mark it as ``command``'s.

    Raises:
        OutputError: The folder cannot be created or written.
    """
    folder = Path(path).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {folder}: {exc.strerror or exc}") from None
    _check_writable(folder)
    claim = _claim(command, identity)
    if _read_marker(folder) == claim:
        return folder  # already this run's
    try:
        atomic_write_text(folder / MARKER, jsonio.dumps(claim, indent=1) + "\n")
    except OSError as exc:
        raise OutputError(describe_os_error(exc, "cannot write")) from None
    return folder


def prepare_output_folder(
    path: str | os.PathLike[str],
    *,
    command: str,
    identity: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """:func:`check_output_folder`, then :func:`claim_output_folder` at once."""
    check_output_folder(path, command=command, identity=identity, overwrite=overwrite)
    return claim_output_folder(path, command=command, identity=identity)


@contextlib.contextmanager
def output_folder_for(
    path: str | os.PathLike[str],
    *,
    command: str,
    identity: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Iterator[Path]:
    """Check the folder now; claim it when the body first writes into it (so a command that
    stops on bad input leaves no folder behind)."""
    folder = check_output_folder(path, command=command, identity=identity, overwrite=overwrite)

    def claim() -> None:
        claim_output_folder(folder, command=command, identity=identity)

    with before_first_write(folder, claim):
        yield folder


def _claim(command: str, identity: Mapping[str, Any] | None) -> dict[str, Any]:
    return {
        "format": _FORMAT,
        "command": command,
        "identity": identity_digest(identity) if identity is not None else None,
    }


def _check_creatable(folder: Path) -> None:
    """The nearest existing ancestor must be a folder this process may write into."""
    parent = folder.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot create output folder {folder}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create output folder {folder}: {parent} is not writable")


def _check_writable(folder: Path) -> None:
    try:
        create_temp_file(folder / MARKER).unlink()
    except OSError as exc:
        raise OutputError(
            f"output folder {folder} is not writable: {exc.strerror or exc}"
        ) from None


def _refuse_foreign(folder: Path, claim: Mapping[str, Any]) -> None:
    # Hidden files (a desktop's .DS_Store, the marker itself) are not outputs.
    entries = sorted(e.name for e in folder.iterdir() if not e.name.startswith("."))
    if not entries:
        return
    owner = _read_marker(folder)
    hint = "choose an empty or new --out folder, or pass --overwrite to write over them"
    if owner is None:
        legacy = claim["identity"] is None and any(n in entries for n in _LEGACY_RUN_FILES)
        if legacy:
            return  # a run folder of an older vprompt: the command's own checks decide
        shown = ", ".join(entries[:3]) + (", …" if len(entries) > 3 else "")
        raise OutputError(
            f"output folder {folder} holds files vprompt did not write ({shown}); {hint}"
        )
    if owner.get("command") != claim["command"]:
        raise OutputError(
            f"output folder {folder} holds the outputs of `vprompt {owner.get('command')}`; {hint}"
        )
    if claim["identity"] is not None and owner.get("identity") != claim["identity"]:
        raise OutputError(
            f"output folder {folder} holds the outputs of another `vprompt {claim['command']}` "
            f"run (other inputs or settings); {hint}"
        )


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        data = jsonio.loads((folder / MARKER).read_bytes(), what=MARKER)
    except (OSError, jsonio.JSONInputError):
        return None
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        return None
    return data
