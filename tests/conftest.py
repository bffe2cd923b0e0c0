"""Shared fixtures: tiny random models, real sample photos, and a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
VPROMPT = [sys.executable, "-m", "vprompt"]


@pytest.fixture(scope="session")
def tiny_clip():
    """The registered ``clip:tiny`` with deterministic random weights (frozen, eval)."""
    from vprompt import load_backbone

    return load_backbone("clip:tiny", "none")


@pytest.fixture(scope="session")
def vit_b16():
    """A random-init ``clip:ViT-B-16`` (the papers' backbone, deterministic weights)."""
    from vprompt import load_backbone

    return load_backbone("clip:ViT-B-16", "none")


@pytest.fixture(scope="session")
def photos_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real photos shipped with scikit-image, written as PNG files."""
    import skimage.data

    out = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        Image.fromarray(getattr(skimage.data, name)()).save(out / f"{name}.png")
    return out


FOLDER_CLASSES = ("red_thing", "green_thing", "blue_thing")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``folder:`` dataset (train 4 / val 2 / test 2 images per class) of three colours."""
    root = tmp_path_factory.mktemp("tiny-folder")
    gen = np.random.default_rng(7)
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        for channel, name in enumerate(FOLDER_CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                img = gen.integers(0, 90, (36, 36, 3), dtype=np.uint8)
                img[..., channel] = gen.integers(160, 255, (36, 36), dtype=np.uint8)
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    def json_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="session")
def run_cli(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., CliResult]:
    """Run the real ``vprompt`` CLI in a subprocess (offline, CPU), with its caches (feature
    cache, few-shot split fallback) in a temporary folder instead of the user's home."""
    cache = tmp_path_factory.mktemp("vprompt-cache")

    def run(
        *args: str,
        cwd: Path | None = None,
        timeout: float = 300,
        env: dict[str, str] | None = None,
    ) -> CliResult:
        """``env``: variables set on top of the test environment (e.g. another cache)."""
        full = dict(os.environ)
        full.update(
            HF_HUB_OFFLINE="1",
            CUDA_VISIBLE_DEVICES="",
            PYTHONUNBUFFERED="1",
            VPROMPT_CACHE=str(cache),
        )
        full.update(env or {})
        proc = subprocess.run(
            [*VPROMPT, *map(str, args)],
            capture_output=True,
            text=True,
            cwd=cwd or REPO,
            env=full,
            timeout=timeout,
        )
        return CliResult(proc.returncode, proc.stdout, proc.stderr)

    return run
