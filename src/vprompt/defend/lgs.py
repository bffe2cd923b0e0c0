"""Local Gradient Smoothing (Naseer, Khan and Porikli, "Local Gradients Smoothing: Defense
against localized adversarial attacks", WACV 2019, arXiv:1807.01216).

A localised adversarial patch is a small region of unusually dense high-frequency noise. LGS
finds such regions in the image's first-order gradient magnitude and damps them, before the
model sees the image:

1. ``g = ||∇x||``, the first-order gradient magnitude, normalised per image to [0, 1]
   (``(g - min g) / (max g - min g)``; a flat image has ``g = 0``).
2. ``g`` is cut into overlapping windows (the paper: 15 x 15 px windows overlapping by
   5 px on 224 x 224 images, so a stride of 10 px). A window whose gradient activity
   exceeds the threshold ``τ`` (0.1) is kept; ``ĝ = g ⊙ M`` where M is the union of the kept
   windows (0 elsewhere).
3. ``T(x) = x ⊙ (1 - λ ĝ)``, the smoothing factor ``λ`` = 2.3 and ``1 - λ ĝ`` clipped to
   [0, 1], so strongly varying pixels in busy windows go to black and flat regions, and every
   window below the threshold, are left untouched.

Written from the paper's description without its code (no network here). Choices the paper
leaves open, stated so they can be checked:

* the gradient is ``torch.gradient`` (central differences inside, one-sided at the border,
  like ``numpy.gradient``) of every colour channel, and ``||∇x|| = sqrt(Σ_c (∂_x x_c)² +
  (∂_y x_c)²)``, one magnitude shared by the three channels;
* a window's "gradient activity" is the mean of ``g`` over it;
* windows start every ``window - overlap`` pixels from the top-left corner, plus one window
  flush with the bottom / right edge when the stride does not land there, so every pixel
  lies in some window;
* on inputs other than 224 px the window and the overlap scale with the shorter image side
  ``n``: ``window = max(2, round(15 n / 224))``, ``overlap = min(window - 1, round(5 n /
  224))`` (32 px: 2 and 1; 64 px: 4 and 1); τ and λ act on the normalised gradient and stay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vprompt.defend.base import SanitisingDefense, check_int, check_number, register_defense
from vprompt.errors import ConfigError

PAPER_SIZE = 224
PAPER_WINDOW = 15
PAPER_OVERLAP = 5


@dataclass(frozen=True)
class LGSConfig:
    """Local Gradient Smoothing settings (defaults: the paper's).

    Attributes:
        window: Window side in pixels; None: 15 px scaled to the input (see the module).
        overlap: Overlap of neighbouring windows in pixels; None: 5 px scaled.
        threshold: τ, the mean normalised gradient above which a window is smoothed.
        smoothing: λ, the smoothing factor.
        reference_size: The image side the paper's window and overlap are given for.
    """

    window: int | None = None
    overlap: int | None = None
    threshold: float = 0.1
    smoothing: float = 2.3
    reference_size: int = PAPER_SIZE

    def __post_init__(self) -> None:
        check_int("window", self.window, low=2, high=4096, optional=True)
        check_int("overlap", self.overlap, low=0, high=4095, optional=True)
        check_number("threshold", self.threshold, low=0, high=1)
        check_number("smoothing", self.smoothing, low=0, high=100, low_open=True)
        check_int("reference_size", self.reference_size, low=16, high=4096)
        if self.window is not None and self.overlap is not None and self.overlap >= self.window:
            raise ConfigError(
                f"overlap must be below window, got overlap={self.overlap}, window={self.window}"
            )

    def windowing(self, height: int, width: int) -> tuple[int, int]:
        """(window, overlap) in pixels for an H x W input."""
        n = min(height, width)
        window = self.window
        if window is None:
            window = max(2, round(PAPER_WINDOW * n / self.reference_size))
        overlap = self.overlap
        if overlap is None:
            overlap = min(window - 1, round(PAPER_OVERLAP * n / self.reference_size))
        if overlap >= window:
            raise ConfigError(
                f"overlap {overlap} must be below the window {window} on {height} x {width} images"
            )
        return window, overlap


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Top (or left) edges of windows of ``window`` px every ``stride`` px along ``size`` px,
    plus one flush with the far edge when needed; a window longer than the image is the
    whole image."""
    if window >= size:
        return [0]
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] + window < size:
        starts.append(size - window)
    return starts


def gradient_magnitude(pixels: torch.Tensor) -> torch.Tensor:
    """B x C x H x W → B x H x W: ``sqrt(Σ_c (∂_y x_c)² + (∂_x x_c)²)``, each partial
    derivative by central differences (one-sided at the border)."""
    gy, gx = torch.gradient(pixels.double(), dim=(2, 3))
    return (gy.square() + gx.square()).sum(dim=1).sqrt()


def normalise(g: torch.Tensor) -> torch.Tensor:
    """Each B x H x W map rescaled to [0, 1] (all zeros where the map is constant)."""
    flat = g.flatten(1)
    low = flat.min(dim=1).values.view(-1, 1, 1)
    span = (flat.max(dim=1).values.view(-1, 1, 1) - low).clamp_min(0)
    safe = torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, (g - low) / safe, torch.zeros_like(g))


def smoothing_mask(g: torch.Tensor, window: int, overlap: int, threshold: float) -> torch.Tensor:
    """B x H x W: 1 on every pixel of a window whose mean of ``g`` exceeds ``threshold``."""
    b, h, w = g.shape
    wy, wx = min(window, h), min(window, w)
    stride = window - overlap
    ys = torch.tensor(window_starts(h, window, stride), device=g.device)
    xs = torch.tensor(window_starts(w, window, stride), device=g.device)
    # Integral image (float64) so window sums are exact enough to compare with τ.
    s = torch.zeros(b, h + 1, w + 1, dtype=torch.float64, device=g.device)
    s[:, 1:, 1:] = g.double().cumsum(1).cumsum(2)
    y0, y1 = ys.view(-1, 1), (ys + wy).view(-1, 1)
    x0, x1 = xs.view(1, -1), (xs + wx).view(1, -1)
    sums = s[:, y1, x1] - s[:, y0, x1] - s[:, y1, x0] + s[:, y0, x0]  # B x nY x nX
    kept = (sums / (wy * wx) > threshold).double()
    rows = torch.arange(h, device=g.device)
    cols = torch.arange(w, device=g.device)
    in_row = ((rows.view(1, -1) >= y0) & (rows.view(1, -1) < y1)).double()  # nY x H
    in_col = ((cols.view(1, -1) >= x0.view(-1, 1)) & (cols.view(1, -1) < x1.view(-1, 1))).double()
    covered = in_row.T @ kept @ in_col  # B x H x W: how many kept windows hold each pixel
    return (covered > 0).to(g.dtype)


@register_defense
class LocalGradientSmoothing(SanitisingDefense):
    """LGS (Naseer et al. 2019): damp busy, high-gradient windows before the model reads the
    image (see the module docstring for the exact formula)."""

    name: ClassVar[str] = "lgs"
    config_class: ClassVar[type] = LGSConfig
    config: LGSConfig

    def describe(self, height: int, width: int) -> dict[str, Any]:
        window, overlap = self.config.windowing(height, width)
        return {**super().describe(height, width), "window_px": window, "overlap_px": overlap}

    def sanitise(self, pixels: torch.Tensor) -> torch.Tensor:
        """``x ⊙ clip(1 - λ · g ⊙ M, 0, 1)`` for B x 3 x H x W pixels in [0, 1]."""
        h, w = pixels.shape[-2:]
        window, overlap = self.config.windowing(h, w)
        g = normalise(gradient_magnitude(pixels))
        mask = smoothing_mask(g, window, overlap, self.config.threshold)
        factor = (1 - self.config.smoothing * g * mask).clamp(0, 1)  # B x H x W
        return pixels * factor.unsqueeze(1).to(pixels.dtype)
