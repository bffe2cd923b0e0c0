"""Reading user images robustly: files, folders, globs; EXIF; odd modes; size limits."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
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
        return Image.fromarray(_to_uint8(np.asarray(img), mode), mode="L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels become white, as viewers show them, instead of their hidden colour.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


_ROWS = 256  # rows converted at a time: intermediates stay small for 36-megapixel scans


def _to_uint8(arr: NDArray[Any], mode: str) -> NDArray[np.uint8]:
    """One-channel 16-bit, 32-bit integer or float pixels → 8 bits, a band of rows at a time
    (never a float64 copy of the whole image): 16-bit full range ``round(v / 257)`` (always for
    ``I;16``, so a dark image does not turn white; for ``I`` when it exceeds 255), floats in
    ``[0, 1]`` times 255, everything clipped to ``[0, 255]`` with NaN as 0."""
    out = np.empty(arr.shape, dtype=np.uint8)
    if not arr.size:
        return out
    if mode == "F":
        scale = 255.0 if float(np.nanmax(arr)) <= 1.0 else 1.0
    elif mode.startswith("I;16") or float(arr.max()) > 255:
        scale = 1.0 / 257.0
    else:
        scale = 1.0
    for start in range(0, arr.shape[0], _ROWS):
        band = arr[start : start + _ROWS].astype(np.float64) * scale
        np.nan_to_num(band, copy=False, nan=0.0)
        out[start : start + _ROWS] = np.clip(np.rint(band), 0, 255)
    return out


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


def open_rgb(image: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An RGB image from a PIL image, a file (:func:`load_image`), a NumPy array or a torch
    tensor (:func:`array_to_pil`)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, str | os.PathLike):
        return load_image(image, max_pixels=max_pixels)
    pil = array_to_pil(image)
    if pil.width * pil.height > max_pixels:
        raise ImageLoadError(
            "array image", f"{pil.width} x {pil.height} pixels, more than {max_pixels}"
        )
    return pil


def array_to_pil(image: Any) -> Image.Image:
    """An RGB image from an array as people hold images.

    NumPy arrays are H x W (grey) or H x W x 3 / 4 (RGB / RGBA, composited on white), uint8
    0-255, bool, or float 0-1 (as ``skimage`` and matplotlib hold them); torch tensors are
    C x H x W (C = 1 or 3, float 0-1 or uint8, as ``torchvision.transforms.ToTensor`` makes them)
    or H x W. Sizes are (H, W), rows first, as in NumPy.

    Raises:
        ImageLoadError: Anything else, naming the shape and dtype it got.
    """
    what = type(image).__name__
    try:
        import torch

        if isinstance(image, torch.Tensor):
            t = image.detach().cpu()
            if t.dim() == 3 and t.shape[0] in (1, 3):
                t = t.permute(1, 2, 0)
            image = t.numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if not isinstance(image, np.ndarray):
        raise ImageLoadError(
            what, "expected an image (a file, a PIL image, a NumPy array or a torch tensor)"
        )
    arr = image
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    shape_ok = arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))
    if not shape_ok or 0 in arr.shape:
        raise ImageLoadError(
            f"{what} image of shape {tuple(image.shape)}",
            "expected H x W, H x W x 3 or 4 (NumPy) or 1 / 3 x H x W (torch)",
        )
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ImageLoadError(f"{what} image", "holds NaN or infinite values")
        if arr.min() < 0 or arr.max() > 1:
            raise ImageLoadError(
                f"{what} float image",
                f"values in [{arr.min():g}, {arr.max():g}]; expected 0-1 (scale it, or pass "
                "uint8 0-255)",
            )
        arr = np.rint(arr * 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise ImageLoadError(
            f"{what} image of dtype {arr.dtype}", "expected uint8, bool or float 0-1"
        )
    arr = np.ascontiguousarray(arr)
    if arr.ndim == 2:
        return Image.fromarray(arr, mode="L").convert("RGB")
    if arr.shape[2] == 4:
        rgba = Image.fromarray(arr, mode="RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return Image.fromarray(arr, mode="RGB")
