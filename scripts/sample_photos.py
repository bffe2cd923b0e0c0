"""Write scikit-image's bundled photos as PNG files (used by the quickstart and demos)."""

from __future__ import annotations

import sys
from pathlib import Path

import skimage.data
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "coins", "camera")


def main(out: str) -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        Image.fromarray(getattr(skimage.data, name)()).save(folder / f"{name}.png")
    print(f"wrote {len(PHOTOS)} photos to {folder}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/photos")
