"""The robustness channel a watermark is trained through: differentiable JPEG, resizing, noise.

A mark that must survive re-encoding is trained through a differentiable stand-in for it, the
idea of HiDDeN (Zhu et al. 2018, "Hiding Data With Deep Networks") and StegaStamp (Tancik et
al. 2020). :func:`diff_jpeg` follows the baseline JPEG pipeline (ITU-T T.81) step by step:
RGB → YCbCr (JFIF), 4:2:0 chroma subsampling (2 x 2 mean), 8 x 8 block DCT, division by the
Annex K quantisation tables scaled for a quality as libjpeg's ``jpeg_quality_scaling`` does,
rounding, and the inverse of each step (chroma upsampled bilinearly, which is libjpeg's
"fancy" triangle upsampling at 2x). Rounding is the one non-differentiable step; it uses the
straight-through estimator (Bengio et al. 2013): the forward pass rounds exactly, so the
output is real JPEG up to libjpeg's integer DCT and chroma filters, and the backward pass
treats rounding as the identity (Shin & Song 2017 use a cubic surrogate instead; the
straight-through forward is exact, which is why it is used here).

:func:`robustness_channel` draws, per image, whether JPEG at a random quality, a resize down by
a random factor and back, and Gaussian noise apply; the images finally round to 8 bits (again
straight-through), as every saved image does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vprompt.errors import ConfigError

_LUMA = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
_CHROMA = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
    *((99,) * 8,) * 4,
)


@dataclass(frozen=True)
class ChannelConfig:
    """What the mark must survive during training (each drawn per image).

    Attributes:
        jpeg_prob: Probability of differentiable JPEG.
        jpeg_quality: (lowest, highest) JPEG quality, drawn uniformly as an integer.
        resize_prob: Probability of a bilinear resize down and back up.
        resize_scale: (smallest, largest) resize factor, drawn uniformly per batch.
        noise_std: Largest Gaussian noise std (pixel units in [0, 1]), drawn uniformly.
    """

    jpeg_prob: float = 0.5
    jpeg_quality: tuple[int, int] = (40, 95)
    resize_prob: float = 0.5
    resize_scale: tuple[float, float] = (0.5, 1.0)
    noise_std: float = 0.01

    def __post_init__(self) -> None:
        for name in ("jpeg_prob", "resize_prob"):
            value = getattr(self, name)
            if not _number(value) or not 0 <= value <= 1:
                raise ConfigError(f"{name} must be a probability in [0, 1], got {value!r}")
        low, high = _pair(self.jpeg_quality, "jpeg_quality")
        if not all(isinstance(v, int) for v in (low, high)) or not 1 <= low <= high <= 100:
            raise ConfigError(
                f"jpeg_quality must be integers 1 <= low <= high <= 100, got {self.jpeg_quality!r}"
            )
        small, large = _pair(self.resize_scale, "resize_scale")
        if not 0.1 <= small <= large <= 1:
            raise ConfigError(
                f"resize_scale must be 0.1 <= low <= high <= 1, got {self.resize_scale!r}"
            )
        if not _number(self.noise_std) or not 0 <= self.noise_std <= 0.5:
            raise ConfigError(f"noise_std must be in [0, 0.5], got {self.noise_std!r}")


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _pair(value: object, name: str) -> tuple[float, float]:
    if not isinstance(value, tuple | list) or len(value) != 2 or not all(map(_number, value)):
        raise ConfigError(f"{name} must be two numbers (low, high), got {value!r}")
    return value[0], value[1]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (straight-through)."""
    return x + (torch.round(x) - x).detach()


def quant_tables(quality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B qualities (1-100) → (B x 8 x 8 luma, B x 8 x 8 chroma) tables, libjpeg's scaling."""
    q = quality.float().clamp(1, 100).view(-1, 1, 1)
    scale = torch.where(q < 50, 5000 / q, 200 - 2 * q)
    tables = []
    for base in (_LUMA, _CHROMA):
        t = torch.tensor(base, dtype=torch.float32, device=quality.device)
        tables.append(torch.floor((t * scale + 50) / 100).clamp(1, 255))
    return tables[0], tables[1]


def _dct_matrix(device: torch.device) -> torch.Tensor:
    """The orthonormal 8 x 8 DCT-II matrix D (coefficients = D X Dᵀ)."""
    k = torch.arange(8, dtype=torch.float64).view(-1, 1)
    n = torch.arange(8, dtype=torch.float64).view(1, -1)
    d = torch.cos((2 * n + 1) * k * math.pi / 16) * math.sqrt(2 / 8)
    d[0] /= math.sqrt(2)
    return d.float().to(device)


def _quantise_blocks(plane: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """B x H x W level-shifted plane (H, W multiples of 8) → the same after DCT, rounding to
    multiples of the B x 8 x 8 ``table`` and the inverse DCT."""
    b, h, w = plane.shape
    d = _dct_matrix(plane.device)
    blocks = plane.reshape(b, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)  # B x h x w x 8 x 8
    coef = d @ blocks @ d.T
    t = table.view(b, 1, 1, 8, 8)
    coef = round_ste(coef / t) * t
    back = d.T @ coef @ d
    return back.permute(0, 1, 3, 2, 4).reshape(b, h, w)


def diff_jpeg(images: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """Differentiable JPEG with 4:2:0 chroma subsampling.

    Args:
        images: B x 3 x H x W in [0, 1].
        quality: B qualities in 1-100.

    Returns:
        B x 3 x H x W in [0, 1], the decoded images (not rounded to 8 bits).
    """
    _, _, h, w = images.shape
    pad_h, pad_w = -h % 16, -w % 16
    x = images * 255
    if pad_h or pad_w:  # libjpeg repeats the edge pixels to fill whole blocks
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b
    luma, chroma = quant_tables(quality)
    y = _quantise_blocks(y - 128, luma) + 128
    small = F.avg_pool2d(torch.stack([cb, cr], dim=1), 2)  # B x 2 x H/2 x W/2
    cb_q = _quantise_blocks(small[:, 0], chroma)
    cr_q = _quantise_blocks(small[:, 1], chroma)
    up = F.interpolate(
        torch.stack([cb_q, cr_q], dim=1), scale_factor=2, mode="bilinear", align_corners=False
    )
    cb, cr = up[:, 0], up[:, 1]
    rgb = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], dim=1)
    return (rgb[..., :h, :w] / 255).clamp(0, 1)


def resize_down_up(images: torch.Tensor, scale: float) -> torch.Tensor:
    """B x 3 x H x W → bilinear (antialiased) to ``scale`` of the size and back."""
    h, w = images.shape[-2:]
    small = (max(1, round(h * scale)), max(1, round(w * scale)))
    down = F.interpolate(images, size=small, mode="bilinear", align_corners=False, antialias=True)
    return F.interpolate(down, size=(h, w), mode="bilinear", align_corners=False)


def robustness_channel(
    images: torch.Tensor, config: ChannelConfig, generator: torch.Generator
) -> torch.Tensor:
    """B x 3 x H x W in [0, 1] → the same after a random draw of the channel, rounded to 8
    bits (straight-through). Every random number comes from ``generator`` (CPU)."""
    n = len(images)
    dev = images.device
    out = images
    if config.resize_prob > 0:
        low, high = config.resize_scale
        scale = low + (high - low) * float(torch.rand((), generator=generator))
        apply = (torch.rand(n, generator=generator) < config.resize_prob).to(dev)
        out = torch.where(apply.view(-1, 1, 1, 1), resize_down_up(out, scale), out)
    if config.jpeg_prob > 0:
        low_q, high_q = config.jpeg_quality
        quality = torch.randint(int(low_q), int(high_q) + 1, (n,), generator=generator).to(dev)
        apply = (torch.rand(n, generator=generator) < config.jpeg_prob).to(dev)
        out = torch.where(apply.view(-1, 1, 1, 1), diff_jpeg(out, quality), out)
    if config.noise_std > 0:
        std = torch.rand(n, 1, 1, 1, generator=generator) * config.noise_std
        noise = torch.randn(out.shape, generator=generator) * std
        out = out + noise.to(dev)
    return round_ste(out.clamp(0, 1) * 255) / 255
