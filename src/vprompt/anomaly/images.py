"""Images and masks into an anomaly method's input frame, and score maps back out of it.

The frame (:class:`~vprompt.anomaly.base.InputFrame`) is a square resize then a centre crop,
as the anomaly references prepare MVTec / VisA images; masks follow with nearest-neighbour
resampling so a defect pixel stays a defect pixel. Maps go back to an image's own size for
overlays: the cropped border takes the nearest map value, then a bilinear resize.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from PIL import Image

from vprompt.anomaly.base import InputFrame

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


def to_frame(image: Image.Image, frame: InputFrame) -> torch.Tensor:
    """An RGB image → 3 x S x S normalised pixels."""
    side = frame.resize
    resized = image.convert("RGB").resize((side, side), _RESAMPLE[frame.interpolation])
    o = frame.crop_offset
    cropped = resized.crop((o, o, o + frame.size, o + frame.size))
    arr = np.asarray(cropped, dtype=np.float32) / 255.0  # S x S x 3
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    mean = torch.tensor(frame.mean).view(3, 1, 1)
    std = torch.tensor(frame.std).view(3, 1, 1)
    return (x - mean) / std


def batch_to_frame(images: Sequence[Image.Image], frame: InputFrame) -> torch.Tensor:
    """RGB images → B x 3 x S x S."""
    return torch.stack([to_frame(im, frame) for im in images])


def mask_to_frame(mask: NDArray[np.bool_], frame: InputFrame) -> NDArray[np.bool_]:
    """An H x W boolean mask → S x S, resampled exactly as :func:`to_frame` moves the pixels."""
    side = frame.resize
    img = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
    resized = np.asarray(img.resize((side, side), Image.Resampling.NEAREST)) > 127
    o = frame.crop_offset
    return resized[o : o + frame.size, o : o + frame.size]


def map_to_image(
    score_map: torch.Tensor | NDArray[np.floating], frame: InputFrame, size: tuple[int, int]
) -> NDArray[np.float32]:
    """An S x S map in the frame → the image's own H x W (``size`` = (width, height))."""
    m = torch.as_tensor(np.asarray(score_map, dtype=np.float32))
    pad = frame.crop_offset
    extra = frame.resize - frame.size - 2 * pad  # odd crops leave one more row/column
    if pad or extra:
        m = F.pad(m[None, None], (pad, pad + extra, pad, pad + extra), mode="replicate")[0, 0]
    w, h = size
    out = F.interpolate(m[None, None], size=(h, w), mode="bilinear", align_corners=False)
    return out[0, 0].numpy()
