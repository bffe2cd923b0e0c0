"""Reading user images robustly: files, folders, globs; EXIF; odd modes; size limits."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vprompt.errors import ImageLoadError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
# Pillow's own decompression-bomb threshold (~89.5 MP); raise it per call with ``max_pixels``.
DEFAULT_MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)
_GLOB_CHARS = set("*?[")
ImageReader = Literal["exif", "reference"]


def expand_image_inputs(inputs: Sequence[str | os.PathLike[str]]) -> tuple[list[Path], list[str]]:
    """Files, folders (searched recursively for image extensions) and glob patterns → files.

    Returns:
        The image paths in a stable order (inputs in order, folder contents sorted), without
        duplicates, and one error line per input that matched nothing.
    """
    found: list[Path] = []
    errors: list[str] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            found.append(p)

    for raw in inputs:
        text = os.fspath(raw)
        path = Path(text).expanduser()
        if path.is_dir():
            files = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
            if not files:
                errors.append(
                    f"{text}: folder holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            for p in files:
                add(p)
        elif path.is_file():
            add(path)
        elif _GLOB_CHARS & set(text):
            matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file()]
            if not files:
                errors.append(f"{text}: pattern matched no files")
            for p in files:
                add(p)
        else:
            errors.append(f"{text}: no such file or folder")
    return found, errors


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as RGB (16-bit and float scaled to 8 bits, transparency on white)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode == "F" and arr.size and float(np.nanmax(arr)) <= 1.0:
            arr = arr * 255.0
        elif mode.startswith("I;16") or (mode == "I" and arr.size and float(arr.max()) > 255):
            # 16-bit full range → 8-bit; I;16 always, so a dark image does not turn white.
            arr = arr / 257.0
        arr = np.nan_to_num(arr, nan=0.0).clip(0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels become white, as viewers show them, instead of their hidden colour.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(
    path: str | os.PathLike[str],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reader: ImageReader = "exif",
) -> Image.Image:
    """Open an image as RGB.

    With ``reader="exif"`` (user images) the image is upright (EXIF orientation applied) and
    grayscale, palette, RGBA (composited on white), CMYK and 16-bit images are converted as a
    viewer shows them. With ``reader="reference"`` (the benchmark suite) it is decoded exactly
    as the papers' code reads it, ``Image.open(path).convert("RGB")``: no EXIF rotation, alpha
    dropped.

    Raises:
        ImageLoadError: Missing, unreadable, corrupt or truncated files, and images with more
            than ``max_pixels`` pixels (checked from the header, before decoding).
    """
    p = Path(path)
    if not p.is_file():
        raise ImageLoadError(p, "no such file")
    if max_pixels > (Image.MAX_IMAGE_PIXELS or 0):
        # Pillow's global bomb limit would warn/refuse below the caller's explicit limit. Our own
        # check below enforces max_pixels, so no (thread-unsafe) warning filters are needed.
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with Image.open(p) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageLoadError(
                    p,
                    f"image too large: {w}x{h} = {w * h} pixels, more than the limit of "
                    f"{max_pixels} pixels",
                )
            img.load()
            if reader == "reference":
                return img.convert("RGB")
            upright: Image.Image = ImageOps.exif_transpose(img) or img
            return to_rgb(upright)
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(p, "not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(
            p, f"image too large: more than the limit of {max_pixels} pixels ({exc})"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(p, f"cannot decode image ({exc})") from None


def open_rgb(
    image: Image.Image | str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """An RGB image from a PIL image (converted) or a file (:func:`load_image`)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return load_image(image, max_pixels=max_pixels)
