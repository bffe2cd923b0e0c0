"""Atomic file writes: a crash mid-write never leaves a half-written file behind.

A write goes to a hidden temporary file next to its target, named
``.<target>.vprompt-<host>-<pid>-<random>.tmp``, then is renamed over the target. A process
killed mid-write leaves that file behind; :func:`clean_stale_temp_files` removes it on the next
run (when its writer is no longer alive on this host, or after a day for other hosts).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "host"
_TEMP = re.compile(r"^\..+\.vprompt-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>[0-9]+)-[0-9a-f]{8}\.tmp$")
_LEGACY_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # before writers were named
_FOREIGN_AGE_S = 24 * 3600


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FIRST_WRITE: list[tuple[Path, Callable[[], None]]] = []
_FIRST_WRITE_LOCK = threading.Lock()


@contextlib.contextmanager
def before_first_write(folder: str | os.PathLike[str], hook: Callable[[], None]) -> Iterator[None]:
    """Within: the first atomic write into ``folder`` (or below it) calls ``hook`` first,
    once (how a command claims its output folder only when it writes, not before its inputs
    are checked)."""
    entry = (Path(folder).absolute(), hook)
    _FIRST_WRITE.append(entry)
    try:
        yield
    finally:
        with _FIRST_WRITE_LOCK, contextlib.suppress(ValueError):
            _FIRST_WRITE.remove(entry)


def _first_write_hooks(target: Path) -> None:
    where = target.absolute()
    due = []
    with _FIRST_WRITE_LOCK:  # each hook runs once, in the thread that takes it
        for entry in list(_FIRST_WRITE):
            if where.is_relative_to(entry[0]):
                _FIRST_WRITE.remove(entry)
                due.append(entry[1])
    for hook in due:
        hook()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it over ``path`` on success."""
    target = Path(path)
    if _FIRST_WRITE:
        _first_write_hooks(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = create_temp_file(target)
    try:
        yield tmp_path
        # The temporary file is made 0600; give the result the mode a plain open() would.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, target)
    except OSError as exc:
        if exc.filename is None or str(exc.filename) == str(tmp_path):  # name the target
            raise OSError(exc.errno, exc.strerror or str(exc), str(target)) from exc
        raise
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink(missing_ok=True)


def create_temp_file(target: Path) -> Path:
    """A new, empty, private (0600) temporary file named after its writer, next to ``target``."""
    for _ in range(100):
        name = f".{target.name}.vprompt-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.tmp"
        candidate = target.parent / name
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        os.close(fd)
        return candidate
    raise FileExistsError(f"{target.parent}: cannot create a temporary file for {target.name}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or cannot tell: keep its file
    return True


def clean_stale_temp_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files of writes that were killed before their rename.

    A file is stale when its writer's process is gone (written on this host), or when it is
    more than a day old (another host, or a temporary file from an older vprompt that did not
    name its writer). Files of live writers are left alone. Returns the removed paths; a folder
    that cannot be listed or a file that cannot be removed is skipped.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = _TEMP.match(entry.name)
        if match is None and not _LEGACY_TEMP.match(entry.name):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            old = now - entry.stat(follow_symlinks=False).st_mtime > _FOREIGN_AGE_S
            if match is not None and match["host"] == _HOST:
                stale = not _alive(int(match["pid"]))
            else:
                stale = old
            if stale:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(path: str | os.PathLike[str], writer: Callable[[Path], None]) -> None:
    """Run ``writer(tmp_path)`` and move the result into place."""
    with atomic_path(path) as tmp:
        writer(tmp)
