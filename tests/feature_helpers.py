"""Fixtures and helpers shared by the feature-cache and feature-path tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from vprompt.data.feature_cache import FeatureCache, FeatureKey
from vprompt.data.folder import ImageFolder
from vprompt.methods.baselines import LinearProbe, LinearProbeConfig

CLASSES = ["blue", "red"]
EPOCHS = 3


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write_folder(root: Path, n: int, seed: int) -> Path:
    """``root/<class>/<i>.png``: noisy bluish / reddish images of a few sizes."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n // 2):
            base = np.array([60, 60, 170] if c == 0 else [170, 60, 60], dtype=float)
            h, w = 28 + 4 * (i % 3), 36 - 4 * (i % 2)
            pixels = np.clip(base + rng.normal(0, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("colors")
    return _write_folder(base / "train", 32, seed=1), _write_folder(base / "val", 16, seed=2)


@pytest.fixture
def train_copy(folders, tmp_path) -> ImageFolder:
    """A private copy of the training folder (tests that edit images)."""
    import shutil

    shutil.copytree(folders[0], tmp_path / "train")
    return ImageFolder(tmp_path / "train")


def _probe(backbone: Any, **config: Any) -> LinearProbe:
    torch.manual_seed(0)  # the head's initialization
    optim = replace(
        LinearProbeConfig().optim, lr=0.05, epochs=EPOCHS, batch_size=8, weight_decay=0.0
    )
    return LinearProbe(backbone, CLASSES, LinearProbeConfig(optim=optim, **config))


class Counting:
    """Wraps an encoder (a method's bound ``encode_images``), counting the images it encodes."""

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.encode = encode
        self.images = 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.images += len(pixels)
        return self.encode(pixels)


def _features(
    cache: FeatureCache,
    data: Any,
    method: LinearProbe,
    encode: Callable[[torch.Tensor], torch.Tensor],
    *,
    view: int | None = None,
    transform: Any = None,
    backbone: Any = None,
) -> torch.Tensor:
    tf = transform or method.input_transform(view is not None)
    key = FeatureKey.create(
        kind=method.feature_kind,
        backbone=backbone or method.backbone,
        transform=tf,
        view=view,
        view_seed=cache.view_seed if view is not None else 0,
    )
    return cache.features(data, encode, transform=tf, key=key, batch_size=4, progress=False)


def _direct(method: LinearProbe, data: Any, transform: Any = None) -> torch.Tensor:
    tf = transform or method.input_transform(False)
    return method.encode_images(torch.stack([tf(data[i][0]) for i in range(len(data))]))
