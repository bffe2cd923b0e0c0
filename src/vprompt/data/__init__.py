"""Data: image inputs (and, later, datasets, splits and feature caches)."""

from vprompt.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    expand_image_inputs,
    load_image,
)

__all__ = ["DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS", "expand_image_inputs", "load_image"]
