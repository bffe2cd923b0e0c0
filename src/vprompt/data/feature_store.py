"""One feature-cache space on disk: validated reads, crash-safe appends, memory-mapped rows.

Layout of a space folder::

    meta.json      format, dtype, dim and the full key in plain JSON
    index.json     image identities in row order (identity → row)
    features.bin   count x dim raw row-major values, read with np.memmap

Appends write and fsync the rows first, then atomically replace ``index.json``; bytes beyond
the indexed rows (an append cut short) are ignored and overwritten by the next append. A space
whose meta or index is unreadable or inconsistent with its data is emptied with a warning and
filled again. An advisory lock serializes appends of concurrent processes. Nothing here unpickles.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from vprompt.utils import jsonio
from vprompt.utils.io import atomic_write_text

FORMAT_VERSION = 1
META_FILE = "meta.json"
INDEX_FILE = "index.json"
DATA_FILE = "features.bin"
_LOCK_FILE = ".lock"

CacheDtype = Literal["float32", "float16"]


@dataclass
class SpaceState:
    """What a space's index says: feature size (None before the first row) and the identity of
    each row, in row order."""

    dim: int | None
    identities: list[str]

    @property
    def count(self) -> int:
        return len(self.identities)


class FeatureSpace:
    """One key's folder: validated reads, crash-safe appends, memory-mapped gathers."""

    def __init__(self, path: Path, key: Mapping[str, Any], dtype: CacheDtype) -> None:
        self.path, self.key, self.dtype = path, dict(key), np.dtype(dtype)

    # ------------------------------------------------------------------ reading
    def read(self) -> SpaceState:
        """The valid indexed state; an invalid space is emptied (with a warning)."""
        state, problem = self._load()
        if problem is not None:
            warnings.warn(
                f"feature cache {self.path}: {problem}; rebuilding it", RuntimeWarning, stacklevel=4
            )
            with self._locked():
                state, problem = self._load()
                if problem is not None:
                    self._reset()
                    state = SpaceState(None, [])
        return state

    def _load(self) -> tuple[SpaceState, str | None]:
        meta_path = self.path / META_FILE
        if not meta_path.is_file():
            return SpaceState(None, []), None
        try:
            meta = jsonio.loads(meta_path.read_bytes(), what=META_FILE)
        except (OSError, jsonio.JSONInputError) as exc:
            return SpaceState(None, []), f"unreadable {META_FILE} ({exc})"
        expected = self._meta(None)
        if not isinstance(meta, dict) or any(
            meta.get(k) != expected[k] for k in ("format", "dtype", "key")
        ):
            return SpaceState(None, []), f"{META_FILE} does not describe this cache space"
        dim = meta.get("dim")
        if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
            return SpaceState(None, []), f"{META_FILE} has an invalid dim {dim!r}"
        index_path = self.path / INDEX_FILE
        if not index_path.is_file():
            return SpaceState(dim, []), None  # created, nothing appended yet
        try:
            index = jsonio.loads(index_path.read_bytes(), what=INDEX_FILE)
        except (OSError, jsonio.JSONInputError) as exc:
            return SpaceState(None, []), f"unreadable {INDEX_FILE} ({exc})"
        ids = index.get("identities") if isinstance(index, dict) else None
        if (
            not isinstance(ids, list)
            or index.get("format") != FORMAT_VERSION
            or not all(isinstance(i, str) for i in ids)
        ):
            return SpaceState(None, []), f"{INDEX_FILE} is not a list of image identities"
        if len(set(ids)) != len(ids):
            return SpaceState(None, []), f"{INDEX_FILE} lists an image twice"
        size = self._data_size()
        needed = len(ids) * dim * self.dtype.itemsize
        if size < needed:
            return SpaceState(None, []), f"{DATA_FILE} holds {size} bytes, its index needs {needed}"
        return SpaceState(dim, ids), None

    def _data_size(self) -> int:
        try:
            return (self.path / DATA_FILE).stat().st_size
        except FileNotFoundError:
            return 0

    def gather(self, identities: Sequence[str]) -> torch.Tensor:
        """N x D float32 rows of ``identities`` (all must be cached)."""
        state = self.read()
        if state.dim is None or not identities:
            if identities:
                raise RuntimeError(f"feature cache {self.path}: rows vanished while reading")
            return torch.empty(0, state.dim or 0)
        row_of = {ident: row for row, ident in enumerate(state.identities)}
        try:
            rows = np.fromiter(
                (row_of[i] for i in identities), dtype=np.int64, count=len(identities)
            )
        except KeyError as exc:
            raise RuntimeError(f"feature cache {self.path}: {exc} vanished while reading") from None
        # Only the indexed rows are mapped: trailing bytes of an interrupted append are ignored.
        table = np.memmap(
            self.path / DATA_FILE, dtype=self.dtype, mode="r", shape=(state.count, state.dim)
        )
        try:
            out = np.asarray(table[rows], dtype=np.float32)
        finally:
            del table
        return torch.from_numpy(out)

    # ------------------------------------------------------------------ writing
    def append(self, identities: Sequence[str], rows: np.ndarray) -> None:
        """Add rows (new identities only); data is durable before the index names it."""
        dim = int(rows.shape[1])
        with self._locked():
            state, problem = self._load()
            if problem is not None or (state.dim is not None and state.dim != dim):
                if problem is None:
                    problem = f"stored dim {state.dim} but the encoder gives {dim}"
                warnings.warn(
                    f"feature cache {self.path}: {problem}; rebuilding it",
                    RuntimeWarning,
                    stacklevel=4,
                )
                self._reset()
                state = SpaceState(None, [])
            if state.dim is None:
                self.path.mkdir(parents=True, exist_ok=True)
                atomic_write_text(
                    self.path / META_FILE, jsonio.dumps(self._meta(dim), indent=2) + "\n"
                )
            known = set(state.identities)
            keep = [j for j, ident in enumerate(identities) if ident not in known]
            if not keep:
                return
            new = np.ascontiguousarray(rows[keep], dtype=self.dtype)
            offset = state.count * dim * self.dtype.itemsize
            data_path = self.path / DATA_FILE
            with open(data_path, "r+b" if data_path.exists() else "w+b") as fh:
                fh.truncate(offset)  # drop the tail of an interrupted append
                fh.seek(offset)
                fh.write(new.tobytes())
                fh.flush()
                os.fsync(fh.fileno())
            ids = state.identities + [identities[j] for j in keep]
            atomic_write_text(
                self.path / INDEX_FILE,
                jsonio.dumps({"format": FORMAT_VERSION, "identities": ids}) + "\n",
            )

    def _meta(self, dim: int | None) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "dtype": self.dtype.name,
            "key": self.key,
            "dim": dim,
        }

    def clear(self) -> None:
        """Empty the space (its rows are re-encoded when next asked for)."""
        with self._locked():
            self._reset()

    def _reset(self) -> None:
        for name in (INDEX_FILE, META_FILE, DATA_FILE):
            with contextlib.suppress(FileNotFoundError):
                (self.path / name).unlink()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock on the space (other processes may append to it too)."""
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # not POSIX: appends are still crash-safe, just not concurrent
            yield
            return
        with open(self.path / _LOCK_FILE, "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class MemorySpace:
    """A space held in memory for one run: what a cache that cannot be written falls back to
    (same reads and appends as :class:`FeatureSpace`, rows stored in the space's dtype)."""

    def __init__(self, path: Path, key: Mapping[str, Any], dtype: CacheDtype) -> None:
        self.path, self.key, self.dtype = path, dict(key), np.dtype(dtype)
        self._rows: dict[str, np.ndarray] = {}
        self._dim: int | None = None

    def read(self) -> SpaceState:
        return SpaceState(self._dim, list(self._rows))

    def gather(self, identities: Sequence[str]) -> torch.Tensor:
        if not identities:
            return torch.empty(0, self._dim or 0)
        rows = [self._rows[i] for i in identities]
        return torch.from_numpy(np.stack(rows).astype(np.float32))

    def append(self, identities: Sequence[str], rows: np.ndarray) -> None:
        dim = int(rows.shape[1])
        if self._dim is not None and self._dim != dim:
            self._rows.clear()
        self._dim = dim
        for ident, row in zip(identities, rows, strict=True):
            self._rows.setdefault(ident, np.asarray(row, dtype=self.dtype).copy())
