"""Learned pixel prompts (Bahng et al. 2022 "Exploring Visual Prompts…", ILM-VP, AutoVP).

The target image is resized to ``inner_size`` and centred on a ``canvas_size`` canvas; the
prompt lives in [0, 1] pixel space, before the backbone's normalization:

- ``padding``: a learned frame of width ``pad_width`` at the canvas border. With
  ``inner_size < canvas_size`` and the default width, the frame exactly surrounds the image
  (ILM-VP's expansive prompt); with ``inner_size == canvas_size`` it overwrites the image
  border (Bahng's pad prompter).
- ``fixed-patch``: a learned ``patch_size`` square at the top-left corner.
- ``random-patch``: the same square at a random position per training batch (top-left in eval).
- ``full``: an unconstrained additive perturbation over the whole canvas.
- ``none``: no prompt (the mapping-only baseline).

Frame and patch pixels are ``sigmoid(θ)`` with ``pixel_range="sigmoid"`` (ILM-VP: valid
colours, mid-grey at the start) or ``θ`` itself with ``pixel_range="free"`` (unconstrained, black
at the start, so training begins from exactly the mapping-only input); ``full`` always adds ``θ``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

PixelRange = Literal["sigmoid", "free"]
PromptKind = Literal["padding", "fixed-patch", "random-patch", "full", "none"]


class PixelPrompt(nn.Module):
    """Places images on a canvas and applies the learned pixels.

    Args:
        kind: Prompt shape (see module docstring).
        canvas_size: Side of the square canvas the backbone sees.
        inner_size: Side the target image is resized to (≤ ``canvas_size``).
        pad_width: Frame width for ``padding``.
        patch_size: Square side for the patch prompts.
        pixel_range: ``sigmoid`` or ``free`` (see the module docstring).
    """

    mask: torch.Tensor  # 1 x canvas x canvas frame mask (buffer, padding only)

    def __init__(
        self,
        *,
        kind: PromptKind,
        canvas_size: int,
        inner_size: int,
        pad_width: int,
        patch_size: int,
        pixel_range: PixelRange = "sigmoid",
    ) -> None:
        super().__init__()
        self.kind = kind
        self.canvas_size = canvas_size
        self.inner_size = inner_size
        self.pad_width = pad_width
        self.patch_size = patch_size
        self.pixel_range = pixel_range
        c = canvas_size
        if kind == "none":
            self.prompt = None
        elif kind == "full":
            self.prompt = nn.Parameter(torch.zeros(3, c, c))
        elif kind == "padding":
            self.prompt = nn.Parameter(torch.zeros(3, c, c))
            mask = torch.ones(1, c, c)
            p = pad_width
            mask[:, p : c - p, p : c - p] = 0
            self.register_buffer("mask", mask, persistent=False)
        else:
            self.prompt = nn.Parameter(torch.zeros(3, patch_size, patch_size))

    def place(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x inner x inner images in [0, 1] → B x 3 x canvas x canvas (zeros around)."""
        b, _, h, w = images.shape
        if h == w == self.canvas_size:
            return images
        canvas = images.new_zeros(b, 3, self.canvas_size, self.canvas_size)
        top, left = (self.canvas_size - h) // 2, (self.canvas_size - w) // 2
        canvas[:, :, top : top + h, left : left + w] = images
        return canvas

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x inner x inner in [0, 1] → prompted B x 3 x canvas x canvas."""
        canvas = self.place(images)
        if self.prompt is None:
            return canvas
        if self.kind == "full":
            return canvas + self.prompt
        if self.kind == "padding":
            return canvas * (1 - self.mask) + self.mask * self._pixels()
        s, c = self.patch_size, self.canvas_size
        if self.kind == "random-patch" and self.training:
            y, x = (int(v) for v in torch.randint(0, c - s + 1, (2,)))
        else:
            y = x = 0
        # Pad the patch to the canvas and blend with a 0/1 window rather than writing into a
        # slice: the same values, and an exported graph keeps its batch size free.
        patch = nn.functional.pad(self._pixels(), (x, c - s - x, y, c - s - y))  # 1 x 3 x c x c
        window = torch.zeros(1, 1, c, c, dtype=canvas.dtype, device=canvas.device)
        window[..., y : y + s, x : x + s] = 1
        return canvas * (1 - window) + patch * window

    def _pixels(self) -> torch.Tensor:
        assert self.prompt is not None
        return torch.sigmoid(self.prompt) if self.pixel_range == "sigmoid" else self.prompt

    def render(self) -> torch.Tensor:
        """The prompt alone on a mid-grey canvas, 3 x canvas x canvas in [0, 1] (for plots)."""
        grey = torch.full((1, 3, self.inner_size, self.inner_size), 0.5)
        with torch.no_grad():
            was = self.training
            self.eval()
            out = self.forward(grey.to(self._device()))[0].clamp(0, 1).cpu()
            self.train(was)
        return out

    def _device(self) -> torch.device:
        return self.prompt.device if self.prompt is not None else torch.device("cpu")
