"""Safe extraction of downloaded dataset archives (tar, tar.gz/bz2/xz, zip).

Every member is validated before anything is written: absolute paths, ``..`` components,
links that point outside the destination, and device or other special files are refused with
an error naming the archive and the member. Tar archives are additionally extracted with
Python's ``filter="data"`` where the running Python has it.
"""

from __future__ import annotations

import gzip
import lzma
import posixpath
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from vprompt.errors import DatasetError

ArchiveKind = Literal["zip", "tar"]
_DRIVE = re.compile(r"^[A-Za-z]:")
_SKIPPED_ZIP_PREFIXES = ("__MACOSX/",)
_TAR_SUFFIXES = (".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_HAS_DATA_FILTER = hasattr(tarfile, "data_filter")
_DAMAGED = (
    tarfile.TarError,
    zipfile.BadZipFile,
    EOFError,
    zlib.error,
    gzip.BadGzipFile,
    lzma.LZMAError,
)


def archive_kind(path: Path) -> ArchiveKind:
    """``zip`` or ``tar``: by the file name where it says, else by content.

    Raises:
        DatasetError: ``path`` is missing, or is not the kind of archive it should be.
    """
    if not path.is_file():
        raise DatasetError(f"{path}: archive not found")
    name = path.name.lower()
    # A tar whose last member is a zip passes is_zipfile(), so a clear name wins over sniffing.
    named: ArchiveKind | None = (
        "zip" if name.endswith(".zip") else "tar" if name.endswith(_TAR_SUFFIXES) else None
    )
    try:
        if named != "tar" and zipfile.is_zipfile(path):
            return "zip"
        if named != "zip" and tarfile.is_tarfile(path):
            return "tar"
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from None
    expected = f"a {named} archive" if named else "a zip or tar archive"
    raise DatasetError(f"{path}: not {expected} (or it is truncated); download it again")


def _unsafe(archive: Path, member: str, why: str) -> DatasetError:
    return DatasetError(
        f"{archive}: refusing to extract member {member!r}: {why}; the archive is not the "
        f"original one or is damaged — download it again"
    )


def safe_parts(name: str, archive: Path) -> tuple[str, ...]:
    """A member name as path components, refusing anything that could leave the destination."""
    text = name.replace("\\", "/")
    if text.startswith("/") or _DRIVE.match(text):
        raise _unsafe(archive, name, "absolute path")
    parts = tuple(p for p in text.split("/") if p not in ("", "."))
    if ".." in parts:
        raise _unsafe(archive, name, "path contains '..'")
    return parts


def _link_stays_inside(
    member_parts: Sequence[str], target: str, *, symlink: bool, within: Sequence[str] = ()
) -> bool:
    """Whether a link member resolves inside the folder ``within`` of the archive (the folder
    being extracted, which ``data prepare`` then moves elsewhere: a link that only stays
    inside the archive could point out of it once moved)."""
    text = target.replace("\\", "/")
    if text.startswith("/") or _DRIVE.match(text):
        return False
    # A symlink resolves from its own folder; a hard link names a member from the archive root.
    base = posixpath.join(*member_parts[:-1]) if symlink and len(member_parts) > 1 else ""
    joined = posixpath.normpath(posixpath.join(base, text)) if (base or text) else "."
    if joined == ".." or joined.startswith("../"):
        return False
    parts = tuple(p for p in joined.split("/") if p not in ("", "."))
    return parts[: len(within)] == tuple(within)


def _selected(parts: Sequence[str], prefixes: Sequence[tuple[str, ...]]) -> bool:
    return any(tuple(parts[: len(p)]) == p for p in prefixes)


def _taken_folder(parts: Sequence[str], prefixes: Sequence[tuple[str, ...]]) -> tuple[str, ...]:
    """The longest of ``prefixes`` that ``parts`` lies under (what gets moved as one)."""
    return max((p for p in prefixes if tuple(parts[: len(p)]) == p), key=len)


def _progress(items: Iterable[Any], desc: str) -> Iterator[Any]:
    from tqdm.auto import tqdm

    yield from tqdm(items, desc=desc, unit="file", disable=None, leave=False)


def _extract_tar(archive: Path, dest: Path, prefixes: Sequence[tuple[str, ...]]) -> int:
    count = 0
    with tarfile.open(archive, "r:*") as tf:
        # Streaming (no getmembers()): one pass over even a many-GB .tar.gz.
        for member in _progress(tf, f"extract {archive.name}"):
            parts = safe_parts(member.name, archive)
            if not parts or not _selected(parts, prefixes):
                continue
            if member.issym() or member.islnk():
                within = _taken_folder(parts, prefixes)
                if not _link_stays_inside(
                    parts, member.linkname, symlink=member.issym(), within=within
                ):
                    where = f"the folder {'/'.join(within)}/" if within else "the archive"
                    raise _unsafe(
                        archive,
                        member.name,
                        f"link to {member.linkname!r} points outside {where}",
                    )
            elif not (member.isfile() or member.isdir()):
                raise _unsafe(archive, member.name, "device, FIFO or other special file")
            member.name = "/".join(parts)
            if _HAS_DATA_FILTER:
                try:
                    tf.extract(member, dest, filter="data")
                except tarfile.FilterError as exc:
                    raise _unsafe(archive, member.name, str(exc)) from None
            else:  # pragma: no cover - Pythons before 3.10.12 / 3.11.4
                tf.extract(member, dest, set_attrs=False)
            count += member.isfile()
    return count


def _zip_member_is_link(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _extract_zip(archive: Path, dest: Path, prefixes: Sequence[tuple[str, ...]]) -> int:
    count = 0
    with zipfile.ZipFile(archive) as zf:
        for info in _progress(zf.infolist(), f"extract {archive.name}"):
            if info.filename.startswith(_SKIPPED_ZIP_PREFIXES):
                continue  # macOS resource forks, never data
            parts = safe_parts(info.filename, archive)
            if not parts or not _selected(parts, prefixes):
                continue
            if _zip_member_is_link(info):
                raise _unsafe(archive, info.filename, "symbolic links are not extracted")
            target = dest.joinpath(*parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "xb") as out:
                shutil.copyfileobj(src, out, length=1 << 20)
            count += 1
    return count


def extract(archive: Path, dest: Path, *, take: Sequence[str] = ("",)) -> int:
    """Extract the members of ``archive`` under any of the folders ``take`` into ``dest``.

    Args:
        archive: A zip or tar file (compression detected from its content).
        dest: An existing, empty folder the members are written into (under their own paths).
        take: Folders inside the archive to extract (``""``: everything).

    Returns:
        The number of files written.

    Raises:
        DatasetError: The archive is unreadable or holds an unsafe member; ``dest`` may then
            hold part of the archive and should be removed by the caller.
    """
    prefixes = [tuple(p for p in t.split("/") if p) for t in take]
    try:
        if archive_kind(archive) == "zip":
            return _extract_zip(archive, dest, prefixes)
        return _extract_tar(archive, dest, prefixes)
    except _DAMAGED as exc:
        raise DatasetError(f"{archive}: damaged archive ({exc}); download it again") from None
    except OSError as exc:
        raise DatasetError(f"{archive}: cannot extract ({exc})") from None


def extract_nested(container: Path, names: Sequence[str], dest: Path) -> Path | None:
    """Extract the first member of ``container`` whose file name is one of ``names``.

    Returns:
        The extracted file inside ``dest``, or None when the container holds no such member.
    """
    wanted = set(names)
    try:
        if archive_kind(container) == "zip":
            with zipfile.ZipFile(container) as zf:
                for info in zf.infolist():
                    if info.filename.startswith(_SKIPPED_ZIP_PREFIXES) or info.is_dir():
                        continue
                    parts = safe_parts(info.filename, container)
                    if parts and parts[-1] in wanted:
                        out = dest / parts[-1]
                        with zf.open(info) as src, open(out, "xb") as fh:
                            shutil.copyfileobj(src, fh, length=1 << 20)
                        return out
            return None
        with tarfile.open(container, "r:*") as tf:
            for member in tf:
                parts = safe_parts(member.name, container)
                if member.isfile() and parts and parts[-1] in wanted:
                    data = tf.extractfile(member)
                    if data is None:
                        continue
                    out = dest / parts[-1]
                    with data, open(out, "xb") as fh:
                        shutil.copyfileobj(data, fh, length=1 << 20)
                    return out
        return None
    except _DAMAGED as exc:
        raise DatasetError(f"{container}: damaged archive ({exc}); download it again") from None
    except OSError as exc:
        raise DatasetError(f"{container}: cannot extract ({exc})") from None


def member_root(dest: Path, take: Sequence[str]) -> Path | None:
    """The first of the ``take`` folders that extraction into ``dest`` produced."""
    for t in take:
        candidate = dest.joinpath(*[p for p in t.split("/") if p])
        if candidate.exists():
            return candidate
    return None


__all__ = [
    "archive_kind",
    "extract",
    "extract_nested",
    "member_root",
    "safe_parts",
]
