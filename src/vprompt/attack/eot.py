"""Pasting a patch onto images under random transformations (expectation over transformation).

Brown et al. 2017, "Adversarial Patch" (arXiv:1712.09665), train one patch that fools a
classifier wherever it lands: each training step pastes it at a random location, scale,
rotation and brightness (Athalye et al. 2018's expectation over transformation, EOT). Here the
patch is a 3 x s x s tensor in [0, 1] *pixel* space, pasted on images that are also in [0, 1],
before any normalisation (see :mod:`vprompt.attack.victim`).

The paste is differentiable in the patch: a per-image affine map (``affine_grid``) samples
the patch (``grid_sample``, bilinear, zero padding) into image coordinates, together with its
mask (all ones, or a disc), and the image is composited as ``image * (1 - mask) + patch``
(the patch premultiplied by its mask, so edges blend exactly as the mask does).

Every placement keeps the whole patch, soft edges included, inside the image: the centre is
drawn only where the rotated patch's footprint fits, and a patch too large to fit at some
angle is shrunk until it does. Placements are drawn on the CPU from a ``torch.Generator``, so
a seed gives the same placements bit for bit on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from vprompt.errors import ConfigError

PatchShape = Literal["square", "circle"]

MAX_AREA = 0.5
"""Largest patch area a config may ask for, as a fraction of the image (a square of half the
image's area rotated by 45° just fits a square image)."""


@dataclass(frozen=True)
class PatchTransformConfig:
    """The distribution of placements a universal patch is trained and evaluated under.

    Attributes:
        size: Patch area as a fraction of the image area (Brown et al. report 0.05 … 0.25);
            a circle's own area, not its bounding square's, is this fraction.
        shape: ``square`` or ``circle`` (a disc mask on the same square tensor).
        scale_jitter: Relative jitter of the area: drawn uniformly from
            ``size * [1 - j, 1 + j]``.
        max_rotation: Rotations are drawn uniformly from ``[-r, r]`` degrees.
        brightness: The patch is multiplied by a factor drawn from ``[1 - b, 1 + b]``
            (then clipped to [0, 1]), as a change of lighting.
    """

    size: float = 0.1
    shape: PatchShape = "square"
    scale_jitter: float = 0.2
    max_rotation: float = 22.5
    brightness: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int | float):
            raise ConfigError(f"patch size must be a number, got {self.size!r}")
        if not 0 < self.size <= MAX_AREA:
            raise ConfigError(
                f"patch size is a fraction of the image area in (0, {MAX_AREA}], got {self.size}"
            )
        if self.shape not in ("square", "circle"):
            raise ConfigError(f"patch shape must be square or circle, got {self.shape!r}")
        if not 0 <= self.scale_jitter < 1:
            raise ConfigError(f"scale_jitter must be in [0, 1), got {self.scale_jitter}")
        if not 0 <= self.max_rotation <= 180:
            raise ConfigError(f"max_rotation must be in [0, 180] degrees, got {self.max_rotation}")
        if not 0 <= self.brightness < 1:
            raise ConfigError(f"brightness must be in [0, 1), got {self.brightness}")


@dataclass(frozen=True)
class Placement:
    """Where and how the patch lands on each of B images (all tensors on one device).

    Attributes:
        center: B x 2 patch centres (x, y) in pixels, (0, 0) being the top-left image corner.
        side: B patch sides in pixels (a circle's diameter).
        angle: B rotations in radians.
        brightness: B multiplicative brightness factors.
    """

    center: torch.Tensor
    side: torch.Tensor
    angle: torch.Tensor
    brightness: torch.Tensor

    def __len__(self) -> int:
        return len(self.side)

    def to(self, device: torch.device | str) -> Placement:
        return Placement(
            self.center.to(device),
            self.side.to(device),
            self.angle.to(device),
            self.brightness.to(device),
        )

    def repeat(self, index: int, count: int) -> Placement:
        """Placement ``index`` (e.g. one grid position), repeated for ``count`` images."""
        return Placement(
            self.center[index : index + 1].expand(count, 2),
            self.side[index : index + 1].expand(count),
            self.angle[index : index + 1].expand(count),
            self.brightness[index : index + 1].expand(count),
        )


def nominal_side(
    area: float | torch.Tensor, height: int, width: int, shape: PatchShape
) -> torch.Tensor:
    """The side (square) or diameter (circle) in pixels of a patch covering ``area`` of an
    ``height`` x ``width`` image."""
    a = torch.as_tensor(area, dtype=torch.float64)
    cover = a * height * width
    return torch.sqrt(cover if shape == "square" else 4 * cover / math.pi)


def half_extent(
    side: torch.Tensor, angle: torch.Tensor, patch_pixels: int, shape: PatchShape
) -> torch.Tensor:
    """Half the side of the axis-aligned box that holds the pasted patch's every non-zero
    pixel (bilinear sampling reaches one texel past the outermost texel centre)."""
    half = side / 2
    if shape == "circle":
        # Texel centres lie within the unit disc; each reaches one texel (2/s) per axis.
        return half * (1 + 2 * math.sqrt(2) / patch_pixels)
    return half * (1 + 1 / patch_pixels) * (angle.cos().abs() + angle.sin().abs())


def sample_placements(
    n: int,
    height: int,
    width: int,
    config: PatchTransformConfig,
    *,
    patch_pixels: int,
    generator: torch.Generator,
) -> Placement:
    """Draw ``n`` random placements (on the CPU, from ``generator``), each fully inside the
    image; a patch too large for its drawn angle is shrunk until it fits."""
    u = torch.rand(n, 5, generator=generator, dtype=torch.float64)
    area = config.size * (1 + config.scale_jitter * (2 * u[:, 0] - 1))
    side = nominal_side(area, height, width, config.shape)
    angle = math.radians(config.max_rotation) * (2 * u[:, 1] - 1)
    brightness = 1 + config.brightness * (2 * u[:, 2] - 1)
    side = _fit(side, angle, height, width, patch_pixels, config.shape)
    half = half_extent(side, angle, patch_pixels, config.shape)
    cx = half + u[:, 3] * (width - 2 * half)
    cy = half + u[:, 4] * (height - 2 * half)
    return Placement(
        torch.stack([cx, cy], dim=1).float(), side.float(), angle.float(), brightness.float()
    )


def grid_placements(
    height: int,
    width: int,
    config: PatchTransformConfig,
    *,
    patch_pixels: int,
    grid: int,
) -> Placement:
    """``grid`` x ``grid`` placements of the nominal size, unrotated, at unchanged brightness,
    with centres evenly spread over every position where the patch fits (row by row)."""
    side = nominal_side(config.size, height, width, config.shape).reshape(1)
    angle = torch.zeros(1, dtype=torch.float64)
    side = _fit(side, angle, height, width, patch_pixels, config.shape)
    half = half_extent(side, angle, patch_pixels, config.shape)
    steps = torch.linspace(0, 1, grid, dtype=torch.float64) if grid > 1 else torch.tensor([0.5])
    xs = half + steps * (width - 2 * half)
    ys = half + steps * (height - 2 * half)
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    n = grid * grid
    return Placement(
        torch.stack([cx.reshape(-1), cy.reshape(-1)], dim=1).float(),
        side.expand(n).float(),
        torch.zeros(n),
        torch.ones(n),
    )


def _fit(
    side: torch.Tensor,
    angle: torch.Tensor,
    height: int,
    width: int,
    patch_pixels: int,
    shape: PatchShape,
) -> torch.Tensor:
    """``side`` shrunk where the footprint would exceed the image (with a small margin so the
    centre's range never collapses below zero through rounding)."""
    limit = min(height, width) / 2
    half = half_extent(side, angle, patch_pixels, shape)
    return torch.where(half > limit, side * (0.999 * limit / half), side)


def patch_mask(
    patch_pixels: int, shape: PatchShape, device: torch.device | None = None
) -> torch.Tensor:
    """1 x s x s mask of the patch tensor: ones, or the disc of texel centres within radius 1."""
    if shape == "square":
        return torch.ones(1, patch_pixels, patch_pixels, device=device)
    c = (
        torch.arange(patch_pixels, device=device, dtype=torch.float32) + 0.5
    ) / patch_pixels * 2 - 1
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return (xx.square() + yy.square() <= 1).float().unsqueeze(0)


def apply_patch(
    images: torch.Tensor,
    patch: torch.Tensor,
    placement: Placement,
    shape: PatchShape = "square",
) -> torch.Tensor:
    """Paste ``patch`` on each image at its placement.

    Args:
        images: B x 3 x H x W in [0, 1].
        patch: 3 x s x s in [0, 1] (gradients flow back to it).
        placement: B placements in pixel units, on the images' device.
        shape: The mask applied to the patch tensor.

    Returns:
        B x 3 x H x W patched images in [0, 1].
    """
    b, _, h, w = images.shape
    s = patch.shape[-1]
    if len(placement) != b:
        raise ValueError(f"{len(placement)} placements for {b} images")
    mask = patch_mask(s, shape, patch.device).to(patch.dtype)
    lit = (patch.unsqueeze(0) * placement.brightness.view(-1, 1, 1, 1).to(patch.dtype)).clamp(0, 1)
    texture = torch.cat([lit * mask, mask.expand(b, 1, s, s)], dim=1)  # B x 4 x s x s
    theta = _image_to_patch(placement, h, w).to(images.dtype)
    grid = F.affine_grid(theta, [b, 4, h, w], align_corners=False)
    pasted = F.grid_sample(
        texture.to(images.dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    rgb, alpha = pasted[:, :3], pasted[:, 3:]
    return images * (1 - alpha) + rgb


def _image_to_patch(placement: Placement, height: int, width: int) -> torch.Tensor:
    """B x 2 x 3 affine maps from normalised image coordinates to normalised patch coordinates.

    An image point q (in [-1, 1]², x then y) lies at ``d = ((q - c) * (W/2, H/2))`` pixels from
    the centre; rotating d by ``-angle`` and dividing by half the side gives its patch
    coordinates u, so ``u = A q - A c`` with ``A = (2 / side) R(-angle) diag(W/2, H/2)``.
    """
    cos, sin = placement.angle.cos(), placement.angle.sin()
    k = 2 / placement.side
    a = torch.stack(
        [
            torch.stack([k * cos * width / 2, k * sin * height / 2], dim=-1),
            torch.stack([-k * sin * width / 2, k * cos * height / 2], dim=-1),
        ],
        dim=1,
    )  # B x 2 x 2
    c = torch.stack(
        [2 * placement.center[:, 0] / width - 1, 2 * placement.center[:, 1] / height - 1], dim=-1
    )
    b = -(a @ c.unsqueeze(-1))  # B x 2 x 1
    return torch.cat([a, b], dim=2)


def region_mask(
    height: int,
    width: int,
    *,
    top: int,
    left: int,
    side: int,
    shape: PatchShape = "square",
    device: torch.device | None = None,
) -> torch.Tensor:
    """1 x 1 x H x W binary mask of an axis-aligned patch region (pixels whose centres lie in
    the ``side`` x ``side`` square at (top, left), or in its inscribed disc)."""
    if side < 1 or top < 0 or left < 0 or top + side > height or left + side > width:
        raise ConfigError(
            f"patch region {side} px at (top={top}, left={left}) does not fit a "
            f"{height} x {width} image"
        )
    mask = torch.zeros(1, 1, height, width, device=device)
    mask[..., top : top + side, left : left + side] = patch_mask(side, shape, device)
    return mask
