"""Interactive-segmentation evaluation: simulated clicks, NoC, NoF and mIoU@k.

The protocol is the one RITM introduced and SimpleClick / FocalClick kept, as its reference
clicker (``isegm/inference/clicker.py``) runs it. Each click goes to the interior-most pixel
of the current largest error region: take the false negatives (``gt & ~pred``) and the false
positives (``~gt & pred``), both outside the "ignore" pixels, pad them with a one-pixel border
of "no error" (so the image edge counts as a region boundary), and compute each one's
Euclidean distance transform. The click lands on the pixel farthest from any boundary (the
first in row-major order on a tie). It is positive only when the false negatives' distance is
strictly larger: a tie goes to a negative click. An already clicked pixel is never clicked
again. The first click is placed the same way from an empty prediction, so it falls at the
centre of the object's interior.

Clicks are sent as the reference sends them, at integer pixel coordinates ``(x = col,
y = row)``: SAM's prompt encoder adds the half pixel itself. Ignored pixels (GrabCut's
"unknown" band, VOC's borders) count neither in the click choice nor in the IoU.

A predictor sees all clicks so far on one image plus its own previous low-res logits, and
returns the new binary mask. NoC@t is the number of clicks needed to reach IoU >= t
(``max_clicks`` when never reached). NoF@t counts the objects that never reach ``t`` within
``max_clicks``. mIoU@k is the mean IoU after k clicks. Unlike the reference, which keeps
clicking a perfect prediction at pixel (0, 0), a run whose prediction has no error left stops
and repeats its last IoU.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from vprompt.errors import ConfigError, DatasetError, PromptError
from vprompt.prompts.spatial import MaskLogits, Point
from vprompt.utils.io import atomic_path


class ClickPredictor(Protocol):
    """One image's interactive segmenter.

    Called with all clicks so far, in order and in original-image pixel coordinates, plus the
    low-res logits it returned at the previous step (None at the first click). It returns the
    ``H x W`` bool mask and the logits to feed back at the next step (or None).
    """

    def __call__(
        self, points: Sequence[Point], previous: MaskLogits | None
    ) -> tuple[NDArray[np.bool_], MaskLogits | None]: ...


def _as_mask(what: str, array: Any) -> NDArray[np.bool_]:
    """A 2-D bool copy of ``array``; integer or float arrays may only hold 0 and 1."""
    raw = np.asarray(array)
    if raw.ndim != 2 or 0 in raw.shape:
        raise PromptError(f"{what}: expected a 2-D H x W mask, got shape {raw.shape}")
    if raw.dtype == np.bool_:
        return raw.astype(bool, copy=True)
    if np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.floating):
        if not np.isin(raw, (0, 1)).all():
            raise PromptError(f"{what}: expected a bool mask or one holding only 0 and 1")
        return raw != 0
    raise PromptError(f"{what}: expected a bool mask, got dtype {raw.dtype}")


def _check_pair(pred: Any, gt: Any) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    gt_mask = _as_mask("ground-truth mask", gt)
    pred_mask = _as_mask("predicted mask", pred)
    if pred_mask.shape != gt_mask.shape:
        raise PromptError(
            f"predicted mask has shape {pred_mask.shape}, but the ground-truth mask has "
            f"shape {gt_mask.shape}; expected the same H x W"
        )
    return pred_mask, gt_mask


def _check_settings(max_clicks: int, thresholds: Iterable[float]) -> tuple[float, ...]:
    if isinstance(max_clicks, bool) or not isinstance(max_clicks, int) or max_clicks < 1:
        raise ConfigError(f"max_clicks: expected an integer >= 1, got {max_clicks!r}")
    out = tuple(float(t) for t in thresholds)
    for t in out:
        if not 0.0 < t <= 1.0:
            raise ConfigError(f"IoU threshold: expected a value in (0, 1], got {t}")
    return out


def iou(
    a: NDArray[np.bool_], b: NDArray[np.bool_], ignore: NDArray[np.bool_] | None = None
) -> float:
    """Intersection over union of two ``H x W`` bool masks outside the ``ignore`` pixels
    (RITM's ``get_iou``); 1.0 when both are empty there."""
    a_mask, b_mask = _check_pair(a, b)
    keep = _keep(ignore, a_mask.shape)
    union = int(np.count_nonzero((a_mask | b_mask) & keep))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(a_mask & b_mask & keep)) / union


def _keep(ignore: Any, shape: tuple[int, ...]) -> NDArray[np.bool_]:
    """The pixels that count: everything but ``ignore`` (an H x W bool mask, or None)."""
    if ignore is None:
        return np.ones(shape, dtype=bool)
    mask = _as_mask("ignore mask", ignore)
    if mask.shape != shape:
        raise PromptError(f"ignore mask has shape {mask.shape}, expected {shape}")
    return ~mask


def _distance(region: NDArray[np.bool_], pad: bool) -> NDArray[np.float32]:
    """Distance of each pixel of ``region`` to the nearest pixel outside it (0 outside)."""
    try:
        from scipy.ndimage import distance_transform_edt
    except ImportError as exc:  # pragma: no cover - scipy ships with scikit-image
        raise ImportError(
            "click simulation needs scipy (pip install scipy) for its distance transform"
        ) from exc
    if not region.any():
        return np.zeros(region.shape, dtype=np.float32)
    # float32, as OpenCV's distanceTransform returns it in the reference: equal distances
    # (and so ties) come out as they do there.
    # Without padding, a region that fills the image has no boundary at all.
    if pad or region.all():
        padded = np.pad(region, 1, mode="constant", constant_values=False)
        return np.asarray(distance_transform_edt(padded), dtype=np.float32)[1:-1, 1:-1]
    return np.asarray(distance_transform_edt(region), dtype=np.float32)


def next_click(
    pred: NDArray[np.bool_],
    gt: NDArray[np.bool_],
    *,
    pad: bool = True,
    clicked: Sequence[Point] = (),
    ignore: NDArray[np.bool_] | None = None,
) -> Point | None:
    """The next simulated click for a prediction (RITM's reference clicker).

    Args:
        pred: ``H x W`` current predicted mask (all False before the first click).
        gt: ``H x W`` ground-truth mask.
        pad: Treat the image border as a region boundary (the standard protocol). Without it,
            error regions touching the border get their clicks pushed towards the edge.
        clicked: Earlier clicks. Their pixels are never chosen again.
        ignore: ``H x W`` pixels that are neither object nor background (GrabCut's unknown
            band): never errors, never clicked.

    Returns:
        A click at the chosen pixel's integer coordinates ``(col, row)``. It is positive when
        the false negatives' largest distance is strictly larger than the false positives'
        (a tie is negative, as in the reference). Within one map, a tie goes to the first
        pixel in row-major order. Returns None when the prediction matches the ground truth
        outside ``ignore``, or when every error pixel has already been clicked.

    Raises:
        PromptError: if the masks are not 2-D or differ in shape.
        DatasetError: if the ground-truth mask is empty.
    """
    pred_mask, gt_mask = _check_pair(pred, gt)
    if not gt_mask.any():
        raise DatasetError("ground-truth mask is empty; there is no object to click on")
    keep = _keep(ignore, gt_mask.shape)
    fn_dist = _distance(gt_mask & ~pred_mask & keep, pad)  # H x W
    fp_dist = _distance(~gt_mask & pred_mask & keep, pad)  # H x W
    h, w = gt_mask.shape
    for p in clicked:
        row = min(max(math.floor(p.y), 0), h - 1)
        col = min(max(math.floor(p.x), 0), w - 1)
        fn_dist[row, col] = 0.0
        fp_dist[row, col] = 0.0
    fn_best = int(np.argmax(fn_dist))  # argmax returns the first maximum in row-major order
    fp_best = int(np.argmax(fp_dist))
    fn_max = float(fn_dist.flat[fn_best])
    fp_max = float(fp_dist.flat[fp_best])
    if fn_max == 0.0 and fp_max == 0.0:
        return None
    positive = fn_max > fp_max
    row, col = divmod(fn_best if positive else fp_best, w)
    return Point(float(col), float(row), positive=positive)


@dataclass(frozen=True)
class ClickTrace:
    """One object's clicks and the IoU reached after each.

    Attributes:
        ious: IoU after click k at index ``k - 1``. A run that matched the ground truth
            exactly repeats its last IoU up to ``max_clicks`` (so it holds ``max_clicks``
            values). A run stopped early by ``stop_at`` holds fewer.
        clicks: The clicks actually made, in order.
        max_clicks: The click budget, which is also the NoC of a threshold never reached.
        thresholds: The IoU thresholds that :attr:`nocs` reports.
    """

    ious: list[float]
    clicks: list[Point]
    max_clicks: int
    thresholds: tuple[float, ...] = (0.85, 0.9)

    def noc(self, threshold: float) -> int:
        """Clicks needed to reach IoU >= ``threshold``; ``max_clicks`` if never reached."""
        for k, value in enumerate(self.ious, start=1):
            if value >= threshold:
                return k
        return self.max_clicks

    def reached(self, threshold: float) -> bool:
        """Whether IoU >= ``threshold`` was reached within ``max_clicks``."""
        return any(value >= threshold for value in self.ious)

    @property
    def nocs(self) -> dict[float, int]:
        """NoC at each of :attr:`thresholds`."""
        return {t: self.noc(t) for t in self.thresholds}

    def iou_at(self, k: int) -> float:
        """IoU after ``k`` clicks (1-based). Past a stopped run's end, its last IoU."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.max_clicks:
            raise PromptError(f"iou_at: expected 1 <= k <= {self.max_clicks}, got {k!r}")
        return self.ious[min(k, len(self.ious)) - 1]


def simulate_clicks(
    predictor: ClickPredictor,
    gt: NDArray[np.bool_],
    *,
    max_clicks: int = 20,
    iou_thresholds: Sequence[float] = (0.85, 0.9),
    stop_at: float | None = None,
    pad: bool = True,
    ignore: NDArray[np.bool_] | None = None,
) -> ClickTrace:
    """Click on one object until ``max_clicks``, feeding the predictor's logits back.

    Args:
        predictor: The image's :class:`ClickPredictor`.
        gt: ``H x W`` ground-truth mask of the object.
        max_clicks: Click budget.
        iou_thresholds: Thresholds the trace's :attr:`ClickTrace.nocs` reports.
        stop_at: Stop once IoU >= this value. By default all clicks run, so the mIoU@k curve
            is complete. Once the prediction equals the ground truth, its last IoU repeats for
            the remaining clicks.
        pad: See :func:`next_click`.
        ignore: ``H x W`` pixels left out of the clicks and the IoU (see :func:`next_click`).

    Raises:
        DatasetError: if ``gt`` is empty.
        PromptError: if ``gt`` is not a 2-D mask, or the predictor returns a mask of another
            shape or logits that are not :class:`MaskLogits`.
        ConfigError: if ``max_clicks`` or a threshold is out of range.
    """
    thresholds = _check_settings(max_clicks, iou_thresholds)
    if stop_at is not None:
        _check_settings(max_clicks, (stop_at,))
    gt_mask = _as_mask("ground-truth mask", gt)
    if not gt_mask.any():
        raise DatasetError("ground-truth mask is empty; there is no object to click on")
    pred = np.zeros_like(gt_mask)
    logits: MaskLogits | None = None
    clicks: list[Point] = []
    ious: list[float] = []
    while len(ious) < max_clicks:
        click = next_click(pred, gt_mask, pad=pad, clicked=clicks, ignore=ignore)
        if click is None:  # nothing left to correct: the IoU can no longer change
            ious.extend([ious[-1]] * (max_clicks - len(ious)))
            break
        clicks.append(click)
        out_mask, logits = predictor(tuple(clicks), logits)
        if logits is not None and not isinstance(logits, MaskLogits):
            raise PromptError(
                f"click predictor: expected MaskLogits or None as logits, got "
                f"{type(logits).__name__}"
            )
        pred = _as_mask("click predictor output", out_mask)
        if pred.shape != gt_mask.shape:
            raise PromptError(
                f"click predictor returned a mask of shape {pred.shape}, but the ground-truth "
                f"mask has shape {gt_mask.shape}"
            )
        ious.append(iou(pred, gt_mask, ignore))
        if stop_at is not None and ious[-1] >= stop_at:
            break
    return ClickTrace(ious=ious, clicks=clicks, max_clicks=max_clicks, thresholds=thresholds)


@dataclass(frozen=True)
class ClickReport:
    """Interactive-segmentation results over many objects.

    Attributes:
        noc: Mean NoC per threshold.
        nof: Per threshold, the number of objects that never reach it within ``max_clicks``.
        miou_at: Mean IoU after k clicks, at index ``k - 1`` (k = 1..max_clicks).
        traces: One :class:`ClickTrace` per object, in input order.
        image_indices: The image index of each trace.
        max_clicks: Click budget.
        thresholds: The IoU thresholds of ``noc`` and ``nof``.
    """

    noc: dict[float, float]
    nof: dict[float, int]
    miou_at: list[float]
    traces: list[ClickTrace]
    image_indices: list[int]
    max_clicks: int
    thresholds: tuple[float, ...] = (0.85, 0.9)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary; thresholds become keys such as ``"0.85"``."""
        return {
            "max_clicks": self.max_clicks,
            "num_objects": len(self.traces),
            "thresholds": list(self.thresholds),
            "noc": {f"{t:g}": v for t, v in self.noc.items()},
            "nof": {f"{t:g}": v for t, v in self.nof.items()},
            "miou_at": list(self.miou_at),
            "objects": [
                {
                    "image_index": index,
                    "ious": list(trace.ious),
                    "clicks": [[p.x, p.y, p.positive] for p in trace.clicks],
                    "noc": {f"{t:g}": trace.noc(t) for t in self.thresholds},
                }
                for index, trace in zip(self.image_indices, self.traces, strict=True)
            ],
        }


def evaluate_clicks(
    pairs: Iterable[tuple[int, NDArray[np.bool_]] | tuple[int, NDArray[np.bool_], Any]],
    make_predictor: Callable[[int], ClickPredictor],
    *,
    max_clicks: int = 20,
    thresholds: Sequence[float] = (0.85, 0.9),
    progress: bool = True,
    pad: bool = True,
) -> ClickReport:
    """Simulate clicks on every ``(image_index, gt mask)`` pair and summarize NoC, NoF, mIoU@k.

    Args:
        pairs: Objects to segment as ``(image_index, gt)`` or ``(image_index, gt, ignore)``
            (``ignore``: the object's pixels left out, or None). An image with several
            objects appears once per object.
        make_predictor: Builds a fresh :class:`ClickPredictor` for an image index. It is
            called once per pair, so a cached image embedding can be shared across objects.
        max_clicks: Click budget per object.
        thresholds: IoU thresholds for NoC and NoF.
        progress: Show a tqdm progress bar.
        pad: See :func:`next_click`.

    Raises:
        DatasetError: if there are no pairs or a ground-truth mask is empty.
    """
    from tqdm.auto import tqdm

    levels = _check_settings(max_clicks, thresholds)
    if not levels:
        raise ConfigError("thresholds: expected at least one IoU threshold")
    items = list(pairs)
    if not items:
        raise DatasetError("evaluate_clicks: no (image_index, mask) pairs to evaluate")
    traces: list[ClickTrace] = []
    indices: list[int] = []
    for n, item in enumerate(tqdm(items, desc="clicks", unit="obj", disable=not progress)):
        index, gt = item[0], item[1]
        ignore = item[2] if len(item) > 2 else None
        try:
            trace = simulate_clicks(
                make_predictor(index),
                gt,
                max_clicks=max_clicks,
                iou_thresholds=levels,
                pad=pad,
                ignore=ignore,
            )
        except DatasetError as exc:
            raise DatasetError(f"object {n} (image {index}): {exc}") from exc
        traces.append(trace)
        indices.append(index)
    curves = np.array(
        [[t.iou_at(k) for k in range(1, max_clicks + 1)] for t in traces], dtype=np.float64
    )  # N x max_clicks
    return ClickReport(
        noc={t: float(np.mean([tr.noc(t) for tr in traces])) for t in levels},
        nof={t: sum(not tr.reached(t) for tr in traces) for t in levels},
        miou_at=[float(v) for v in curves.mean(axis=0)],
        traces=traces,
        image_indices=indices,
        max_clicks=max_clicks,
        thresholds=levels,
    )


def plot_miou_curve(report: ClickReport, path: str | Path) -> Path | None:
    """mIoU against the number of clicks, with the NoC thresholds as dashed lines, as a PNG.

    The file is written atomically. Returns the written path, or None when matplotlib is
    missing.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        warnings.warn(
            "matplotlib is not installed; skipping the mIoU curve (pip install 'vprompt[plots]')",
            stacklevel=2,
        )
        return None
    # The object API with an Agg canvas never touches pyplot's global backend.
    fig = Figure(figsize=(5, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ks = list(range(1, len(report.miou_at) + 1))
    ax.plot(ks, report.miou_at, "o-", markersize=3, label="mIoU")
    for t in report.thresholds:
        ax.axhline(t, ls="--", c="gray", lw=1)
        ax.text(ks[-1], t, f" {t:g}", va="bottom", ha="right", fontsize=8, color="gray")
    ax.set_xlabel("number of clicks")
    ax.set_ylabel("mIoU")
    ax.set_ylim(0.0, 1.02)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    noc = ", ".join(f"NoC@{t * 100:g}={v:.2f}" for t, v in report.noc.items())
    ax.set_title(f"{len(report.traces)} objects; {noc}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.13, right=0.96, bottom=0.14, top=0.9)
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png")
    return target


__all__ = [
    "ClickPredictor",
    "ClickReport",
    "ClickTrace",
    "evaluate_clicks",
    "iou",
    "next_click",
    "plot_miou_curve",
    "simulate_clicks",
]
