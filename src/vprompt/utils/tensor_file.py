"""The JSON header of a vprompt safetensors artifact (patches, watermark keys), read strictly.

Safetensors frames a file as an 8-byte little-endian header length, the JSON header, then the
raw tensor bytes. :func:`read_artifact_header` checks that framing (a pickle or a
``torch.save`` zip is named as such and never unpickled), then the ``__metadata__`` entry
that holds vprompt's own JSON object, its ``format`` tag and ``format_version``.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from vprompt.utils import jsonio

META_KEY = "vprompt"
"""The ``__metadata__`` key of vprompt's JSON object."""
MAX_HEADER = 1 << 20
"""Longest header accepted (the artifacts hold a few small tensors)."""


def read_artifact_header(
    path: Path,
    size: int,
    *,
    kind: str,
    fmt: str,
    max_version: int,
    error: type[Exception],
) -> dict[str, Any]:
    """vprompt's metadata object of the safetensors file ``path`` (``size`` bytes).

    Args:
        kind: What the file should be, for messages (``patch file``, ``watermark key``).
        fmt: The ``format`` tag it must carry.
        max_version: The newest ``format_version`` understood (versions start at 1).
        error: The exception type raised, with one line naming the file.
    """
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise error(f"{path}: not a {kind} (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > MAX_HEADER or n > size - 8:
            pickled = head[:1] == b"\x80" or head[:2] == b"PK"
            what = "a pickle/torch.save file" if pickled else "not a safetensors file"
            raise error(f"{path}: {what}, expected a safetensors {kind} (vprompt never unpickles)")
        raw = fh.read(n)
    try:
        header = jsonio.loads(raw, what=f"{path} header")
    except jsonio.JSONInputError:
        raise error(f"{path}: not a safetensors {kind} (header is not JSON)") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get(META_KEY), str):
        raise error(
            f"{path}: a safetensors file, but not a vprompt {kind} (no '{META_KEY}' metadata)"
        )
    try:
        info = jsonio.loads(meta[META_KEY], what=f"{path} {kind} metadata")
    except jsonio.JSONInputError as exc:
        raise error(str(exc)) from None
    if not isinstance(info, dict) or info.get("format") != fmt:
        found = info.get("format") if isinstance(info, dict) else None
        raise error(f"{path}: unknown format {found!r}, expected {fmt!r}")
    version = info.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= max_version:
        raise error(
            f"{path}: {kind} format version {version!r} is not supported (1..{max_version})"
        )
    return info
