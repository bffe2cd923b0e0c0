"""Decoding uploaded image bytes safely.

The format is sniffed from the content (never the file name) and only that decoder is
allowed; the pixel count is checked from the header before any pixel is decoded, so a small
file that claims a huge image costs nothing. The result is upright (EXIF) RGB, converted as
:func:`vprompt.data.images.load_image` converts files.
"""

from __future__ import annotations

import io

from PIL import Image, ImageOps, UnidentifiedImageError

from vprompt.data.images import to_rgb
from vprompt.serve.errors import ApiError

SUPPORTED = "PNG, JPEG, WebP, BMP, GIF or TIFF"


def sniff_format(data: bytes) -> str | None:
    """Pillow's format name from the leading magic bytes, or None when unsupported."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith(b"BM"):
        return "BMP"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    return None


def decode_upload(data: bytes, *, max_pixels: int, name: str = "upload") -> Image.Image:
    """Uploaded bytes → an upright RGB image.

    Raises:
        ApiError: 415 ``unsupported_media`` for bytes of no supported format, 413 ``too_large``
            for images over ``max_pixels`` (from the header), 400 ``bad_image`` for truncated
            or corrupt images.
    """
    fmt = sniff_format(data)
    if fmt is None:
        raise ApiError(
            415, "unsupported_media", f"{name}: not a {SUPPORTED} image (checked from its bytes)"
        )
    if max_pixels > (Image.MAX_IMAGE_PIXELS or 0):
        # As in load_image: our own check below enforces max_pixels.
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ApiError(
                    413,
                    "too_large",
                    f"{name}: image of {w}x{h} = {w * h} pixels is over the limit of "
                    f"{max_pixels} pixels",
                )
            if w < 1 or h < 1:
                raise ApiError(400, "bad_image", f"{name}: image has no pixels ({w}x{h})")
            img.load()
            upright: Image.Image = ImageOps.exif_transpose(img) or img
            return to_rgb(upright)
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(
            413, "too_large", f"{name}: image is over the limit of {max_pixels} pixels"
        ) from None
    except UnidentifiedImageError:
        raise ApiError(
            400, "bad_image", f"{name}: looks like {fmt} but cannot be decoded"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ApiError(400, "bad_image", f"{name}: cannot decode {fmt} image ({exc})") from None
