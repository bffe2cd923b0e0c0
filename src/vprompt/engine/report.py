"""Run reports as images: learning curves (matplotlib, optional) and method visualizations."""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from vprompt.methods.base import ValueImage
from vprompt.utils.io import atomic_path

_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


def plot_learning_curves(history: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """Loss and accuracy per epoch (train and, where present, val) as a PNG.

    Returns:
        The written path, or None when there is nothing to plot or matplotlib is missing.
    """
    if not history:
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        warnings.warn(
            "matplotlib is not installed; skipping learning-curve plots "
            "(pip install 'vprompt[plots]')",
            stacklevel=2,
        )
        return None
    # The object API with an Agg canvas never touches pyplot's global backend.
    fig = Figure(figsize=(9, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    epochs = [int(h["epoch"]) + 1 for h in history]
    curve = [point for h in history for point in h.get("curve") or []]
    for column, (ax, metric, title) in enumerate(
        (
            (fig.add_subplot(1, 2, 1), "loss", "loss"),
            (fig.add_subplot(1, 2, 2), "acc", "accuracy"),
        ),
        start=1,
    ):
        if curve:  # within-epoch training curve (x: epochs elapsed)
            ax.plot(
                [p[0] for p in curve],
                [p[column] for p in curve],
                "-",
                alpha=0.6,
                label="train (running)",
            )
        for split, style in (("train", "o-"), ("val", "s--")):
            values = [h.get(f"{split}_{metric}") for h in history]
            pairs = [(e, v) for e, v in zip(epochs, values, strict=True) if v is not None]
            if pairs:
                xs, ys = zip(*pairs, strict=True)
                ax.plot(xs, ys, style, label=split, markersize=3)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    # Fixed margins: tight/constrained layout would cost an extra full draw.
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.9, wspace=0.22)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


MIN_SIDE = 256
"""Visualizations smaller than this (a 10 x 64 token map, a 32 px canvas) are enlarged with
nearest-neighbour sampling so every value stays a visible block."""


def save_image(
    image: torch.Tensor,
    path: Path,
    captions: Sequence[str] | None = None,
    *,
    value_range: tuple[float, float] | None = None,
) -> Path:
    """Write a 3 x H x W image, or a B x 3 x H x W batch as a grid, with values in [0, 1];
    small ones are enlarged (nearest neighbour, at least :data:`MIN_SIDE` px), a batch
    with ``captions`` (one per image) gets each caption under its image, and
    ``value_range`` (the raw values shown as 0 and 1) adds a colour bar on the right."""
    img = image.detach().float().cpu()
    tiles = None
    if img.dim() == 4:
        tiles = img
    if img.dim() == 2:
        img = img.unsqueeze(0)
    if tiles is None and (img.dim() != 3 or img.shape[0] not in (1, 3)):
        raise ValueError(
            f"visualization must be 3 x H x W or B x 3 x H x W, got {tuple(image.shape)}"
        )
    if tiles is not None:
        if tiles.shape[1] not in (1, 3):
            raise ValueError(
                f"visualization must be 3 x H x W or B x 3 x H x W, got {tuple(image.shape)}"
            )
        pil = _grid([_to_pil(t) for t in tiles], captions)
    else:
        pil = _to_pil(img)
    if value_range is not None:
        pil = _with_colour_bar(pil, *value_range)
    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG")
    return path


def _with_colour_bar(pil: Any, low: float, high: float) -> Any:
    """``pil`` with a grey bar on its right (white: ``high``, black: ``low``) and both values
    written beside it, so a contrast-stretched image can be read back in raw units."""
    from PIL import Image, ImageDraw

    bar_w, text_w, pad = 16, 72, 6
    sheet = Image.new("RGB", (pil.width + pad + bar_w + text_w, max(pil.height, 64)), "white")
    sheet.paste(pil, (0, 0))
    ramp = torch.linspace(1, 0, pil.height).mul(255).round().to(torch.uint8)
    bar = ramp[:, None, None].expand(-1, bar_w, 3).contiguous().numpy()
    x = pil.width + pad
    sheet.paste(Image.fromarray(bar), (x, 0))
    draw = ImageDraw.Draw(sheet)
    draw.text((x + bar_w + 4, 0), f"{high:.3g}", fill="black")
    draw.text((x + bar_w + 4, max(0, pil.height - 12)), f"{low:.3g}", fill="black")
    return sheet


def _to_pil(img: torch.Tensor) -> Any:
    """3 x H x W (or 1 x H x W) in [0, 1] → an RGB image, enlarged when small."""
    from PIL import Image

    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    array = (img.nan_to_num(0.0).clamp(0, 1) * 255).round().to(torch.uint8)
    pil = Image.fromarray(array.permute(1, 2, 0).contiguous().numpy())
    scale = -(-MIN_SIDE // max(1, min(pil.size)))  # ceil
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)
    return pil


def _grid(tiles: Sequence[Any], captions: Sequence[str] | None) -> Any:
    """Tiles in rows of up to 8 on white, each caption (when given) under its tile."""
    from PIL import Image, ImageDraw

    columns = min(8, len(tiles))
    rows = -(-len(tiles) // columns)
    w = max(t.width for t in tiles)
    h = max(t.height for t in tiles)
    text_h = 16 if captions else 0
    pad = 4
    sheet = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for k, tile in enumerate(tiles):
        x = pad + (k % columns) * (w + pad)
        y = pad + (k // columns) * (h + text_h + pad)
        sheet.paste(tile, (x, y))
        if captions and k < len(captions):
            # PIL's built-in font covers ASCII only: other characters show as "?".
            text = captions[k][: max(4, w // 7)].encode("ascii", "replace").decode()
            draw.text((x + 2, y + h + 2), text, fill="black")
    return sheet


def save_visualizations(
    images: Mapping[str, torch.Tensor | ValueImage],
    out_dir: Path,
    captions: Sequence[str] | None = None,
) -> list[Path]:
    """Save each named image as ``out_dir/<name>.png`` (names made file-system safe);
    ``captions`` label the images of each batch of as many images (true → predicted class);
    a :class:`~vprompt.methods.base.ValueImage` gets a colour bar with its raw range."""
    written = []
    for name, shown in images.items():
        stem = _SAFE_NAME.sub("_", str(name)).strip("._") or "visualization"
        value_range = (shown.low, shown.high) if isinstance(shown, ValueImage) else None
        image = shown.image if isinstance(shown, ValueImage) else shown
        labels = captions if captions and image.dim() == 4 and len(image) == len(captions) else None
        written.append(save_image(image, out_dir / f"{stem}.png", labels, value_range=value_range))
    return written
