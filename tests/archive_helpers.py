"""Builders of small archives with real member layouts, shared by the data-preparation tests."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path

from PIL import Image


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), ((37 * seed) % 256, (91 * seed) % 256, 128)).save(buf, "JPEG")
    return buf.getvalue()


def write_tar(path: Path, members: dict[str, bytes], *, mode: str = "w:gz") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def tree(folder: Path) -> set[str]:
    """Every file under ``folder`` (following links), relative, POSIX."""
    out = set()
    for dirpath, _, files in os.walk(folder, followlinks=True):
        for f in files:
            out.add((Path(dirpath) / f).relative_to(folder).as_posix())
    return out
