"""Feature masking: occlude the region the frozen model itself leans on most, then re-predict.

A patch that flips a prediction has to dominate the model's evidence, so it tends to sit where
the model's input gradient is largest. This defence uses the frozen model's own signal to find
that region, in the spirit of SentiNet (Chou, Tramèr and Pellegrino, IEEE S&P Workshops 2020),
which localises a candidate adversarial region with a saliency map; it is a simplified
variant (one gradient map, one occlusion), not a reproduction of SentiNet:

1. ``ŷ = argmax f(x)`` and the saliency ``S = Σ_c |∂ f(x)_ŷ / ∂x_c|`` (H x W).
2. ``S`` is summed over every ``p x p`` window (a box filter the size of the expected patch,
   ``p = ceil(sqrt(a H W))`` for a patch of area fraction ``a``); the window with the largest
   sum (the first in reading order on ties) is the suspected patch.
3. That window is filled (``mean``: each channel's mean over the image; ``grey``: 0.5) and
   the model predicts again on the result.

The gradient is taken with ``torch.autograd.grad`` with respect to the image only, so the
model's parameters and their ``.grad`` are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from vprompt.defend.base import (
    Model,
    SanitisingDefense,
    check_choice,
    check_int,
    check_number,
    chunks,
    patch_side,
    register_defense,
)

Fill = Literal["mean", "grey"]


@dataclass(frozen=True)
class FeatureMaskConfig:
    """Attributes:
    patch_size: The expected patch area as a fraction of the image area (Brown et al.'s
        10% by default).
    fill: What replaces the masked window: ``mean`` (per-image channel means) or ``grey``.
    batch_size: Images per gradient pass.
    """

    patch_size: float = 0.1
    fill: Fill = "mean"
    batch_size: int = 64

    def __post_init__(self) -> None:
        check_number("patch_size", self.patch_size, low=0, high=1, low_open=True)
        check_choice("fill", self.fill, ("mean", "grey"))
        check_int("batch_size", self.batch_size, low=1, high=10**6)


def saliency(model: Model, pixels: torch.Tensor) -> torch.Tensor:
    """B x H x W: ``Σ_c |∂ logit_ŷ / ∂x_c|`` of each image's top class ŷ."""
    x = pixels.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        top = logits.gather(1, logits.argmax(dim=1, keepdim=True)).sum()
        (grad,) = torch.autograd.grad(top, x)
    return grad.abs().sum(dim=1)


def strongest_window(sal: torch.Tensor, side: int) -> torch.Tensor:
    """B x 2 (top, left) of the ``side`` x ``side`` window with the largest saliency sum."""
    w = sal.shape[-1]
    sums = F.avg_pool2d(sal.unsqueeze(1).double(), side, stride=1).squeeze(1)
    cols = w - side + 1
    best = sums.flatten(1).argmax(dim=1)  # first maximum in reading order
    return torch.stack([best // cols, best % cols], dim=1)


def fill_windows(
    pixels: torch.Tensor, corners: torch.Tensor, side: int, fill: Fill
) -> torch.Tensor:
    """``pixels`` with each image's ``side`` x ``side`` window at ``corners`` (B x 2) filled."""
    h, w = pixels.shape[-2:]
    rows = torch.arange(h, device=pixels.device).view(1, -1)
    cols = torch.arange(w, device=pixels.device).view(1, -1)
    top, left = corners[:, :1].to(pixels.device), corners[:, 1:].to(pixels.device)
    in_rows = (rows >= top) & (rows < top + side)  # B x H
    in_cols = (cols >= left) & (cols < left + side)  # B x W
    mask = (in_rows.unsqueeze(2) & in_cols.unsqueeze(1)).unsqueeze(1)  # B x 1 x H x W
    if fill == "mean":
        value = pixels.mean(dim=(2, 3), keepdim=True).expand_as(pixels)
    else:
        value = torch.full_like(pixels, 0.5)
    return torch.where(mask, value, pixels)


@register_defense
class FeatureMask(SanitisingDefense):
    """Mask the highest-saliency window of the expected patch size and re-predict."""

    name: ClassVar[str] = "feature-mask"
    config_class: ClassVar[type] = FeatureMaskConfig
    config: FeatureMaskConfig

    def describe(self, height: int, width: int) -> dict[str, Any]:
        side = patch_side(self.config.patch_size, height, width)
        return {**super().describe(height, width), "window_px": side}

    def locate(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 2 (top, left) of the window each image would have masked."""
        h, w = pixels.shape[-2:]
        side = patch_side(self.config.patch_size, h, w)
        out = []
        for part in chunks(len(pixels), self.config.batch_size):
            out.append(strongest_window(saliency(self.model, pixels[part]), side))
        return torch.cat(out)

    def sanitise(self, pixels: torch.Tensor) -> torch.Tensor:
        """The images with their most salient patch-sized window filled."""
        h, w = pixels.shape[-2:]
        side = patch_side(self.config.patch_size, h, w)
        return fill_windows(pixels, self.locate(pixels), side, self.config.fill).detach()
