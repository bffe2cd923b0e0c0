"""Fashion-MNIST from its IDX files (Debian's ``dataset-fashion-mnist`` or any folder)."""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vprompt.data.dataset import DataSplits
from vprompt.errors import DatasetError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSNAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}
_IDX_DTYPES: dict[int, Any] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into an array, validating its header and size."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                data = fh.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"{path}: cannot read IDX file ({exc})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DatasetError(f"{path}: not an IDX file (bad magic number)")
    dtype, ndim = data[2], data[3]
    if dtype not in _IDX_DTYPES or ndim == 0:
        raise DatasetError(f"{path}: unsupported IDX type 0x{dtype:02x} / {ndim} dims")
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dt = np.dtype(_IDX_DTYPES[dtype])
    expected = int(np.prod(shape)) * dt.itemsize
    if len(data) - header != expected:
        raise DatasetError(
            f"{path}: IDX body has {len(data) - header} bytes, header {shape} needs {expected}"
        )
    return np.frombuffer(data, dtype=dt, offset=header).reshape(shape)


def _find(root: Path, stem: str) -> Path | None:
    for candidate in (
        root / f"{stem}.gz",
        root / stem,
        root / "raw" / f"{stem}.gz",
        root / "raw" / stem,
        root / "FashionMNIST" / "raw" / stem,
        root / "FashionMNIST" / "raw" / f"{stem}.gz",
    ):
        if candidate.is_file():
            return candidate
    return None


class FashionMNIST:
    """One split as (28 x 28 grayscale PIL image, label) pairs.

    Args:
        root: Folder holding the four IDX files (gzipped or not; ``raw/`` sub-folders of the
            torchvision layout are found too).
        split: ``train`` (60,000) or ``test`` (10,000).
    """

    classnames = CLASSNAMES

    def __init__(self, root: str | os.PathLike[str], *, split: str = "train") -> None:
        if split not in _FILES:
            raise DatasetError(f"Fashion-MNIST split must be train or test, got {split!r}")
        root = Path(root)
        img_stem, lbl_stem, count = _FILES[split]
        img_path, lbl_path = _find(root, img_stem), _find(root, lbl_stem)
        if img_path is None or lbl_path is None:
            raise DatasetError(
                f"{root}: Fashion-MNIST {split} files ({img_stem}[.gz], {lbl_stem}[.gz]) not "
                "found; install Debian's dataset-fashion-mnist or pass --data fashion-mnist:DIR"
            )
        self.images = read_idx(img_path)
        self.labels = read_idx(lbl_path).astype(np.int64)
        if self.images.ndim != 3 or self.images.shape[1:] != (28, 28):
            raise DatasetError(f"{img_path}: expected N x 28 x 28 images, got {self.images.shape}")
        if len(self.images) != len(self.labels) or len(self.labels) == 0:
            raise DatasetError(
                f"{root}: {split} split has {len(self.images)} images and {len(self.labels)} "
                f"labels (the published split has {count} of each)"
            )
        if self.labels.min() < 0 or self.labels.max() >= len(CLASSNAMES):
            raise DatasetError(f"{lbl_path}: labels outside 0..{len(CLASSNAMES) - 1}")
        self.classnames = list(CLASSNAMES)
        self.split = split
        self._digest: str | None = None

    def all_labels(self) -> list[int]:
        """Every label in order (no image is decoded)."""
        return self.labels.tolist()

    def pixel_array(self) -> np.ndarray:
        """All images as one N x 28 x 28 uint8 array (batches are cut from it directly)."""
        return self.images

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index], mode="L"), int(self.labels[index])

    def identity(self, index: int) -> str:
        """Split, index and a digest of all the split's pixels (hashed once, for feature caches)."""
        if self._digest is None:
            pixels = np.ascontiguousarray(self.images)
            self._digest = hashlib.sha256(pixels.data).hexdigest()[:16]
        return f"fashion-mnist:{self.split}:{self._digest}:{index}"


def default_root() -> Path:
    return Path(os.environ.get("VPROMPT_FASHION_MNIST", DEBIAN_DIR))


def load_fashion_mnist(
    root: str | os.PathLike[str] | None = None, *, download: bool = True
) -> DataSplits:
    """Train/test splits; without files on disk, fall back to torchvision's download."""
    path = Path(root) if root else default_root()
    try:
        return DataSplits(
            "fashion-mnist", FashionMNIST(path, split="train"), FashionMNIST(path, split="test")
        )
    except DatasetError:
        if root is not None or not download:
            raise
    cache = Path(os.environ.get("VPROMPT_DATA", Path.home() / ".cache" / "vprompt" / "data"))
    try:
        from torchvision.datasets import FashionMNIST as TVFashionMNIST

        TVFashionMNIST(str(cache), train=True, download=True)
        TVFashionMNIST(str(cache), train=False, download=True)
    except Exception as exc:
        raise DatasetError(
            f"Fashion-MNIST not found in {path} and the download failed ({exc}); install "
            "Debian's dataset-fashion-mnist or pass --data fashion-mnist:DIR"
        ) from None
    return DataSplits(
        "fashion-mnist", FashionMNIST(cache, split="train"), FashionMNIST(cache, split="test")
    )
