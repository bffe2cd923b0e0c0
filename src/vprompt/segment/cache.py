"""A bounded cache of image embeddings, so an image goes through the encoder once.

Keys are content hashes: the backbone's weight fingerprint, the precision, the image size and
the RGB pixel bytes. The same photo opened twice (or uploaded under another name) hits; an
edited photo misses. Memory is an LRU bounded in bytes; an optional disk layer keeps entries as
safetensors files (never pickle) and survives restarts. Thread-safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vprompt.errors import ConfigError, describe_os_error
from vprompt.utils.io import atomic_write_with

log = logging.getLogger(__name__)

Parts = dict[str, torch.Tensor]


def image_key(image: Image.Image, *, model_id: str) -> str:
    """Content hash of an RGB image for one model (``model_id`` = fingerprint + precision)."""
    rgb = image.convert("RGB")
    h = hashlib.sha256()
    h.update(f"{model_id}|{rgb.size[0]}x{rgb.size[1]}|".encode())
    h.update(np.asarray(rgb).tobytes())
    return h.hexdigest()[:32]


def _nbytes(parts: Parts) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())


@dataclass
class CacheStats:
    """Counters since the cache was made (a miss means the encoder had to run)."""

    hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    evictions: int = 0


class EmbeddingCache:
    """LRU of embeddings bounded by ``max_bytes``, with an optional disk layer.

    Args:
        max_bytes: Memory bound over all entries (a ViT-B embedding is 4 MiB in fp32).
        disk_dir: Folder for safetensors copies; None keeps everything in memory.
    """

    def __init__(self, *, max_bytes: int = 512 * 2**20, disk_dir: str | Path | None = None):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ConfigError(f"embedding cache max_bytes: expected an int >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        self.stats = CacheStats()
        self._entries: OrderedDict[str, Parts] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    @property
    def nbytes(self) -> int:
        """Bytes held in memory now."""
        return self._bytes

    def get(self, key: str, device: torch.device) -> Parts | None:
        """The entry for ``key`` on ``device``, or None; a disk hit is promoted to memory."""
        with self._lock:
            parts = self._entries.get(key)
            if parts is not None:
                self._entries.move_to_end(key)
                self.stats.hits += 1
                return {k: v.to(device) for k, v in parts.items()}
        parts = self._read_disk(key)
        if parts is None:
            with self._lock:
                self.stats.misses += 1
            return None
        with self._lock:
            self.stats.disk_hits += 1
        self._remember(key, parts)
        return {k: v.to(device) for k, v in parts.items()}

    def put(self, key: str, parts: Parts) -> None:
        """Store ``parts`` (batch of one) in memory and, if configured, on disk."""
        stored = {k: v.detach() for k, v in parts.items()}
        self._remember(key, stored)
        if self.disk_dir is not None:
            cpu = {k: v.to("cpu").contiguous() for k, v in stored.items()}
            try:
                atomic_write_with(self._disk_path(key), lambda tmp: save_file(cpu, str(tmp)))
            except OSError as exc:  # read-only, full, not a folder: memory only from now on
                log.warning(
                    "embedding cache %s: %s; going on without the disk copy",
                    self.disk_dir,
                    describe_os_error(exc, "cannot write"),
                )
                self.disk_dir = None

    def clear(self) -> None:
        """Drop every in-memory entry (disk copies stay)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _remember(self, key: str, parts: Parts) -> None:
        size = _nbytes(parts)
        with self._lock:
            if key in self._entries:
                self._bytes -= _nbytes(self._entries.pop(key))
            if size > self.max_bytes:
                return  # larger than the whole budget: never kept in memory
            self._entries[key] = parts
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self._bytes -= _nbytes(old)
                self.stats.evictions += 1

    def _disk_path(self, key: str) -> Path:
        assert self.disk_dir is not None
        return self.disk_dir / f"{key}.safetensors"

    def _read_disk(self, key: str) -> Parts | None:
        if self.disk_dir is None:
            return None
        path = self._disk_path(key)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            log.warning("embedding cache: %s is unreadable (%s); recomputing it", path, exc)
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            return None
