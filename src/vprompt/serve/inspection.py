"""Inspect mode for ``/api/find-similar``: mark a defect on one uploaded image, find regions like
it in the others (:class:`~vprompt.anomaly.find_similar.DefectSearch`).

The backbone is named at start-up (a bad name fails then) but loaded on the first inspect
request and kept, so a server whose clients never inspect never loads it. Requests become one
H x W region mask (boxes, scribbles and an RLE mask, each checked against the example's size
and named in the error); results become the same mask encodings as the segment endpoints,
plus one small grayscale PNG heat map per target.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from vprompt.anomaly.find_similar import DefectSearch, FindSimilarConfig, SearchResult, region_mask
from vprompt.backbones.registry import load_backbone, split_name
from vprompt.errors import PromptError
from vprompt.prompts.spatial import Scribble
from vprompt.segment.outputs import decode_rle, mask_area
from vprompt.serve.schemas import FindSimilarRequest, MaskFormat
from vprompt.serve.segment_ops import encode_mask, finite

HEATMAP_SIDE = 64
"""Longest side of a returned heat map grid (keeps a response to a few KB per target)."""


class Inspector:
    """The defect-search backbone of a server, loaded once on first use.

    Args:
        model: Backbone name, ``family:arch`` (validated here, without loading it).
        weights: Its weight source (None: the architecture's default).
        device: Where it runs.
        image_size: Frame side the search embeds images at (None: the backbone's own).
    """

    def __init__(
        self, *, model: str, weights: str | None, device: str, image_size: int | None
    ) -> None:
        split_name(model)  # an unknown name fails at start-up, not on the first request
        self.model = model
        self.weights = weights
        self.device = device
        self.image_size = image_size
        self._backbone: Any | None = None

    def info(self) -> dict[str, Any]:
        """The ``inspector`` part of ``/api/models``."""
        return {
            "name": self.model,
            "weights": "default" if self.weights is None else str(self.weights),
            "loaded": self._backbone is not None,
        }

    @property
    def backbone(self) -> Any:
        """The frozen backbone, loaded on first use. Model call."""
        if self._backbone is None:
            self._backbone = load_backbone(self.model, self.weights, device=self.device)
        return self._backbone

    def search(
        self,
        example: Image.Image,
        region: NDArray[np.bool_],
        targets: Sequence[Image.Image],
        *,
        top_k: int,
        threshold: float,
    ) -> SearchResult:
        """Regions of ``targets`` like the ``region`` (H x W) of ``example``. Model call."""
        config = FindSimilarConfig(top_k=top_k, threshold=threshold, image_size=self.image_size)
        search = DefectSearch(self.backbone, config)
        search.add_examples([(example, region)])
        return search.search(targets)


def marked_region(
    body: FindSimilarRequest, size: tuple[int, int], *, max_parts: int
) -> NDArray[np.bool_]:
    """The request's boxes, scribbles and mask as one H x W mask of an image of ``size``.

    Raises:
        PromptError: A box outside the image, a bad scribble, a mask of another size, too
            many parts, or an empty union; the message names the field.
    """
    w, h = size
    for name, parts in (("boxes", body.boxes), ("scribbles", body.scribbles)):
        if len(parts) > max_parts:
            raise PromptError(f"{name}: {len(parts)} given; at most {max_parts} are allowed")
    out = np.zeros((h, w), dtype=bool)
    for i, box in enumerate(body.boxes):
        try:
            out |= region_mask(size, boxes=[box])
        except PromptError as exc:
            raise PromptError(f"boxes[{i}]: {exc}") from None
    for i, s in enumerate(body.scribbles):
        try:
            out |= Scribble(s.points, positive=True, width=s.width).to_mask(size)
        except PromptError as exc:
            raise PromptError(f"scribbles[{i}]: {exc}") from None
    if body.mask is not None:
        if list(body.mask.size) != [h, w]:
            # Checked before decoding so a forged size never allocates anything.
            raise PromptError(
                f"mask: RLE has size {list(body.mask.size)}, expected the example's "
                f"[H, W] = {[h, w]}"
            )
        try:
            out |= decode_rle({"size": [h, w], "counts": body.mask.counts})
        except PromptError as exc:
            raise PromptError(f"mask: {exc}") from None
    if not out.any():
        raise PromptError(
            "the marked region is empty: give boxes, scribbles or a mask covering some pixels"
        )
    return out


def found_regions(
    result: SearchResult, target_ids: Sequence[str], form: MaskFormat
) -> list[dict[str, Any]]:
    """Response rows for the ranked regions, best first."""
    return [
        {
            "image_id": target_ids[r.image],
            "box": [round(float(v), 2) for v in r.box],
            "score": finite(r.score),
            "area": mask_area(r.mask),
            "mask": encode_mask(r.mask, form),
        }
        for r in result.regions
    ]


def heatmap_rows(
    heatmaps: Sequence[NDArray[np.float32]], target_ids: Sequence[str]
) -> list[dict[str, Any]]:
    """Each target's margin map, scaled down to at most :data:`HEATMAP_SIDE` a side, as a
    grayscale PNG data URL on one scale shared by all targets (so they compare)."""
    grids = [_shrink(h) for h in heatmaps]
    if not grids:
        return []
    lo = float(min(float(g.min()) for g in grids))
    hi = float(max(float(g.max()) for g in grids))
    span = hi - lo if hi > lo else 1.0
    rows = []
    for image_id, grid in zip(target_ids, grids, strict=True):
        gray = np.clip((grid - lo) / span * 255.0 + 0.5, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(gray, mode="L").save(buf, format="PNG")
        rows.append(
            {
                "image_id": image_id,
                "width": int(grid.shape[1]),
                "height": int(grid.shape[0]),
                "png": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"),
                "min": finite(lo),
                "max": finite(hi),
            }
        )
    return rows


def _shrink(heat: NDArray[np.float32]) -> NDArray[np.float32]:
    h, w = heat.shape
    scale = min(1.0, HEATMAP_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    clean = np.nan_to_num(heat.astype(np.float32), nan=0.0, posinf=2.0, neginf=-2.0)
    if size == (w, h):
        return clean
    shrunk = Image.fromarray(clean, mode="F").resize(size, Image.Resampling.BOX)
    return np.asarray(shrunk, dtype=np.float32)
