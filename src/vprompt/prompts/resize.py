"""SAM's coordinate frame: resize-longest-side, pad to a square, and the way back.

This is the ONE place where spatial prompts move between the original image and the model's
input frame. Coordinates are original-image pixels, x the column and y the row, continuous in
``[0, W] x [0, H]``, scaled here with no shift of their own; SAM's prompt encoder then adds
half a pixel to every input-frame coordinate, so integer ``(j, i)`` addresses pixel
``(row i, col j)``'s centre, as in Meta's ``SamPredictor`` and the interactive benchmarks.

The arithmetic matches transformers' ``SamImageProcessor._get_preprocess_shape`` and
``SamProcessor._normalize_coordinates`` exactly:

- ``scale = target * 1.0 / max(H, W)``; ``h' = int(H * scale + 0.5)``, ``w' = int(W * scale + 0.5)``
- points are scaled per axis by the *rounded* ratios ``w' / W`` and ``h' / H`` (not by ``scale``),
  so the image corner ``(W, H)`` lands exactly on ``(w', h')``.
- the resized image sits in the top-left of a ``target x target`` padded square; the mask
  decoder's low-resolution logits (``low_res x low_res``, 256 for released models) cover that
  whole padded square.

SAM 2 and EdgeTAM instead stretch the image to the full square (:class:`ResizeSquare`): no
padding, per-axis ratios ``target / W`` and ``target / H``, and masks are resized from the
low-res logits straight to the original size, as ``Sam2Processor`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from vprompt.errors import PromptError

LOW_RES_SIZE = 256  # SAM's mask decoder output / mask prompt side (a quarter of 1024)


def _check_size(image_size: tuple[int, int], what: str = "image_size") -> tuple[int, int]:
    try:
        w, h = image_size
    except (TypeError, ValueError) as exc:
        raise PromptError(f"{what}: expected (W, H), got {image_size!r}") from exc
    if (
        isinstance(w, bool)
        or isinstance(h, bool)
        or not isinstance(w, int | np.integer)
        or not isinstance(h, int | np.integer)
        or w <= 0
        or h <= 0
    ):
        raise PromptError(f"{what}: expected (W, H) as positive integers, got {image_size!r}")
    return int(w), int(h)


def _as_coords(array: ArrayLike, width: int, what: str) -> NDArray[np.float64]:
    out = np.asarray(array, dtype=np.float64)
    if out.ndim == 1 and out.shape[0] == width:
        out = out[None, :]
    if out.ndim != 2 or out.shape[1] != width:
        raise PromptError(f"{what}: expected an N x {width} array, got shape {out.shape}")
    if not np.isfinite(out).all():
        raise PromptError(f"{what}: coordinates must be finite (got NaN or inf)")
    return out


@dataclass(frozen=True, kw_only=True)
class MaskPostprocess:
    """Size bookkeeping for turning SAM's low-res logits back into an original-size mask.

    The decoder's ``low_res x low_res`` logits cover the ``padded`` square. Upsample them to
    ``padded`` (H, W), keep the top-left ``crop`` (h', w') — the resized image without its
    padding — then resize that to ``original`` (H, W). All sizes are (height, width), as
    torch's ``F.interpolate`` expects them.
    """

    low_res: tuple[int, int]
    padded: tuple[int, int]
    crop: tuple[int, int]
    original: tuple[int, int]
    direct: bool = False
    """Resize the low-res logits straight to ``original`` (SAM 2: no padding, no crop)."""

    @property
    def low_res_crop(self) -> tuple[float, float]:
        """The part of the low-res logits covering the image (h, w), fractional in general."""
        return (
            self.crop[0] * self.low_res[0] / self.padded[0],
            self.crop[1] * self.low_res[1] / self.padded[1],
        )


@dataclass(frozen=True, kw_only=True)
class ResizeLongestSide:
    """Resize so the longest side is ``target``, as SAM's processor does.

    Image sizes in this API are ``(W, H)`` (like PIL); array shapes are ``H x W``.

    Args:
        target: Longest side after resizing, which is also the padded square's side (1024 for
            every released SAM).
        low_res: Side of the decoder's low-res logits and of the mask prompt (``target / 4``
            for every released SAM).
    """

    target: int = 1024
    low_res: int = LOW_RES_SIZE

    def __post_init__(self) -> None:
        for name in ("target", "low_res"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise PromptError(
                    f"{type(self).__name__} {name}: expected a positive int, got {value!r}"
                )

    def scale(self, image_size: tuple[int, int]) -> float:
        """``target / max(W, H)`` for an original ``image_size`` (W, H)."""
        w, h = _check_size(image_size)
        return self.target * 1.0 / max(h, w)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """The resized image's ``(w', h')``, rounded half up as transformers does.

        Raises:
            PromptError: The short side would round to 0 pixels (an image more than
                ``2 * target`` times longer than wide, e.g. 1 x 5000 for SAM): SAM's processor
                cannot resize it.
        """
        w, h = _check_size((width, height))
        scale = self.target * 1.0 / max(h, w)
        new_w, new_h = int(w * scale + 0.5), int(h * scale + 0.5)
        if min(new_w, new_h) == 0:
            raise PromptError(
                f"image of {w} x {h} pixels is too elongated for this model: its short side "
                f"would be 0 pixels once the long side is {self.target} (sides may differ up "
                f"to {2 * self.target}:1); crop or pad it"
            )
        return new_w, new_h

    def _ratios(self, image_size: tuple[int, int]) -> tuple[float, float, int, int]:
        w, h = _check_size(image_size)
        new_w, new_h = self.resized_size(w, h)
        return new_w / w, new_h / h, new_w, new_h

    def apply_points(self, xy: ArrayLike, image_size: tuple[int, int]) -> NDArray[np.float64]:
        """Original-image points to the model frame.

        Args:
            xy: N x 2 points ``(x, y)`` in original-image coordinates.
            image_size: Original ``(W, H)``.

        Returns:
            N x 2 points in the resized (and padded) frame.
        """
        rx, ry, _, _ = self._ratios(image_size)
        out = _as_coords(xy, 2, "points").copy()
        out[:, 0] = out[:, 0] * rx
        out[:, 1] = out[:, 1] * ry
        return out

    def apply_boxes(self, boxes: ArrayLike, image_size: tuple[int, int]) -> NDArray[np.float64]:
        """Original-image boxes ``(x0, y0, x1, y1)`` (N x 4) to the model frame (N x 4)."""
        pts = _as_coords(boxes, 4, "boxes").reshape(-1, 2)
        return self.apply_points(pts, image_size).reshape(-1, 4)

    def unapply_points(self, xy: ArrayLike, image_size: tuple[int, int]) -> NDArray[np.float64]:
        """Model-frame points (N x 2) back to the original image of size ``(W, H)``."""
        rx, ry, _, _ = self._ratios(image_size)
        out = _as_coords(xy, 2, "points").copy()
        out[:, 0] = out[:, 0] / rx
        out[:, 1] = out[:, 1] / ry
        return out

    def unapply_boxes(self, boxes: ArrayLike, image_size: tuple[int, int]) -> NDArray[np.float64]:
        """Model-frame boxes (N x 4) back to the original image of size ``(W, H)``."""
        pts = _as_coords(boxes, 4, "boxes").reshape(-1, 2)
        return self.unapply_points(pts, image_size).reshape(-1, 4)

    def postprocess_sizes(self, image_size: tuple[int, int]) -> MaskPostprocess:
        """Sizes for padded square → crop to the resized image → resize to the original."""
        w, h = _check_size(image_size)
        new_w, new_h = self.resized_size(w, h)
        return MaskPostprocess(
            low_res=(self.low_res, self.low_res),
            padded=(self.target, self.target),
            crop=(new_h, new_w),
            original=(h, w),
            direct=self.direct,
        )

    @property
    def direct(self) -> bool:
        """Whether masks go from low-res logits straight to the original size."""
        return False

    def mask_to_low_res(
        self, mask: NDArray[np.bool_], image_size: tuple[int, int], *, logit: float = 10.0
    ) -> NDArray[np.float32]:
        """An original-size binary mask as a SAM mask prompt (low-res logits of the padded frame).

        Each low-res cell takes the original pixel under its centre (nearest neighbour); cells
        over the padding are background. Foreground becomes ``+logit``, background ``-logit``,
        which is how a binary mask stands in for the previous-logits input SAM was trained on.

        Args:
            mask: H x W bool mask of the original image.
            image_size: Original ``(W, H)``; must match ``mask``'s shape.
            logit: Magnitude of the logits written.

        Returns:
            low_res x low_res float32 logits.
        """
        w, h = _check_size(image_size)
        if mask.shape != (h, w):
            raise PromptError(f"mask: expected shape (H, W) = {(h, w)}, got {mask.shape}")
        rx, ry, _, _ = self._ratios((w, h))
        cell = self.target / self.low_res
        centres = (np.arange(self.low_res) + 0.5) * cell  # model-frame pixels
        cols = np.floor(centres / rx).astype(np.int64)
        rows = np.floor(centres / ry).astype(np.int64)
        col_ok = cols < w
        row_ok = rows < h
        out = np.full((self.low_res, self.low_res), -logit, dtype=np.float32)
        sub = mask[np.ix_(rows[row_ok], cols[col_ok])]
        out[np.ix_(row_ok, col_ok)] = np.where(sub, logit, -logit)
        return out


@dataclass(frozen=True, kw_only=True)
class ResizeSquare(ResizeLongestSide):
    """Stretch to a ``target x target`` square, as SAM 2's and EdgeTAM's processors do.

    Points scale per axis by ``target / W`` and ``target / H``; nothing is padded, and masks
    are resized from the low-res logits straight to the original size.
    """

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """Always ``(target, target)``."""
        _check_size((width, height))
        return self.target, self.target

    @property
    def direct(self) -> bool:
        return True
