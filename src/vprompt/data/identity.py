"""Image identities for feature caches: a digest of the file's bytes.

A cached feature row is keyed by the identity of the image it came from, so the identity must
change exactly when the pixels can: it is the BLAKE2b digest of the file's content (not its
path, size or modification time, which a rewrite can leave unchanged, and which a moved dataset
changes for nothing). Each file is hashed once per process: the digest is remembered under the
file's full ``stat`` (inode, size, modification and change times), and any write changes the
change time.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

_CHUNK = 1 << 20
_MEMO_LIMIT = 500_000
_memo: dict[tuple[str, int, int, int, int], str] = {}
_lock = threading.Lock()


def file_digest(path: str | os.PathLike[str]) -> str:
    """The hex BLAKE2b-128 digest of a file's bytes (memoised per process by its ``stat``).

    Raises:
        OSError: The file cannot be read.
    """
    p = Path(path)
    st = p.stat()
    key = (str(p.absolute()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _lock:
        known = _memo.get(key)
    if known is not None:
        return known
    digest = hashlib.blake2b(digest_size=16)
    with p.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    with _lock:
        if len(_memo) >= _MEMO_LIMIT:
            _memo.clear()
        _memo[key] = value
    return value


def content_identity(path: str | os.PathLike[str], *, reader: str = "") -> str:
    """``content:<digest>`` (plus ``:<reader>`` when a non-default reader decodes the file,
    as it changes the pixels): equal for files with equal bytes, wherever they are."""
    suffix = f":{reader}" if reader else ""
    return f"content:{file_digest(path)}{suffix}"
