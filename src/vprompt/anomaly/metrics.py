"""Anomaly detection metrics: image AUROC / F1-max, and streaming pixel AUROC / F1-max / AUPRO.

Image-level metrics are exact (:func:`image_auroc` equals ``sklearn.metrics.roc_auc_score``,
:func:`f1_max` the maximum F1 over ``sklearn.metrics.precision_recall_curve`` as AnomalyCLIP
computes it).

Pixel-level metrics run over thousands of megapixel anomaly maps (full MVTec AD / VisA), so
:class:`PixelMetrics` never keeps the pixels: it keeps three fixed-size histograms over a
monotone integer key of the float32 score and derives every curve from their cumulative sums.

**Resolution.** The key is the float32 bit pattern with the sign flipped so that integer order
is float order; the top 20 of its 32 bits index 2^20 bins (sign, 8 exponent bits and the top 11
mantissa bits). Scores whose relative difference is below 2^-11 (about 0.05 %) may share a bin
and then count as tied (ties get half credit in AUROC, as sklearn gives them). Inputs are
rounded to float32 first. When every distinct score falls in its own bin the results equal the
exact computations. Memory: 24 MiB per accumulator, whatever the number of images.

**AUPRO** follows MVTec AD's evaluation code: connected components of each ground-truth mask
with 8-connectivity; at each threshold t (a pixel is predicted anomalous when its score >= t)
FPR is the fraction of all gt-negative pixels predicted anomalous and PRO the mean over all
regions of the fraction of the region predicted anomalous; the (FPR, PRO) curve, with (0, 0)
prepended, is integrated with the trapezoid rule up to FPR 0.3 (the curve interpolated there)
and divided by 0.3.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage
from scipy.stats import rankdata

from vprompt.errors import ConfigError

KEY_BITS = 20
NUM_BINS = 1 << KEY_BITS
_SHIFT = 32 - KEY_BITS
# 8-connectivity, as MVTec's reference labels regions.
_STRUCTURE = np.ones((3, 3), dtype=bool)
DEFAULT_FPR_LIMIT = 0.3


# ----------------------------------------------------------------------------------- image level
def _image_inputs(
    scores: ArrayLike, labels: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    s = np.asarray(scores)
    y = np.asarray(labels)
    if s.ndim != 1 or y.ndim != 1:
        raise ConfigError(
            f"image scores and labels must be 1-D (one per image); got shapes {s.shape} and "
            f"{y.shape}"
        )
    if len(s) != len(y):
        raise ConfigError(f"got {len(s)} image scores but {len(y)} labels; expected one each")
    if s.dtype.kind not in "biuf":
        raise ConfigError(f"image scores must be numbers; got dtype {s.dtype}")
    s64 = s.astype(np.float64)
    bad = int(np.count_nonzero(~np.isfinite(s64)))
    if bad:
        raise ConfigError(f"{bad} of {len(s)} image scores are NaN or infinite")
    if y.dtype.kind not in "biuf" or not np.isin(y, (0, 1)).all():
        odd = sorted({str(v) for v in y.tolist() if v not in (0, 1)})[:5]
        raise ConfigError(f"image labels must be 0 (normal) or 1 (anomalous); got {odd}")
    return s64, y.astype(bool)


def image_auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Exact area under the ROC curve of image scores (ties count one half).

    Args:
        scores: N anomaly scores, higher = more anomalous.
        labels: N labels, 0 normal and 1 anomalous.

    Raises:
        ConfigError: Only one class present, mismatched lengths, non-finite scores.
    """
    s, y = _image_inputs(scores, labels)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ConfigError(
            f"image AUROC needs both normal and anomalous images; got {n_neg} normal and "
            f"{n_pos} anomalous"
        )
    # Mann-Whitney U: average ranks give ties half credit, exactly as the ROC trapezoid does.
    ranks = rankdata(s, method="average")
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def f1_max(scores: ArrayLike, labels: ArrayLike) -> float:
    """The best F1 over all thresholds (a score >= threshold predicts anomalous).

    Equals ``max(2PR / (P + R))`` over ``sklearn.metrics.precision_recall_curve``, NaN ignored.

    Raises:
        ConfigError: No anomalous sample, mismatched lengths, non-finite scores.
    """
    s, y = _image_inputs(scores, labels)
    n_pos = int(y.sum())
    if n_pos == 0:
        raise ConfigError("F1-max needs at least one anomalous sample; got none")
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    tp = np.cumsum(y[order], dtype=np.float64)
    fp = np.arange(1, len(s) + 1, dtype=np.float64) - tp
    # Only the last index of each run of equal scores is a real threshold.
    last = np.append(np.diff(s_sorted) != 0, True)
    return float(_f1_curve(tp[last], fp[last], float(n_pos)).max())


def _f1_curve(
    tp: NDArray[np.float64], fp: NDArray[np.float64], n_pos: float
) -> NDArray[np.float64]:
    # 2PR/(P+R) rewritten as 2TP/(TP+FP+P): never 0/0 since P > 0 and it matches the original
    # wherever that is defined (where TP = 0 it is 0, and sklearn's NaN there is dropped anyway).
    return 2.0 * tp / (tp + fp + n_pos)


# ----------------------------------------------------------------------------------- pixel level
def score_bins(scores: NDArray[np.float32]) -> NDArray[np.uint32]:
    """The histogram bin of each float32 score: monotone (higher score, same or higher bin)."""
    # -0.0 + 0.0 is +0.0, so both zeros share a bin.
    f = np.ascontiguousarray(scores, dtype=np.float32) + np.float32(0.0)
    bits = f.view(np.uint32)
    negative = (bits >> np.uint32(31)).astype(bool)
    # Negative floats: flip all bits (bigger magnitude → smaller key); positive: set the sign bit.
    key = np.where(negative, ~bits, bits | np.uint32(0x80000000))
    return (key >> np.uint32(_SHIFT)).astype(np.uint32)


@dataclass(frozen=True)
class PixelResult:
    """Pixel-level metrics over every map seen.

    Attributes:
        pixel_auroc: Area under the pixel ROC curve (NaN when undefined, see ``note``).
        pixel_f1_max: Best pixel F1 over thresholds (NaN without anomalous pixels).
        aupro: Area under the PRO curve up to ``fpr_limit``, divided by it (NaN when undefined).
        num_pixels: Pixels seen.
        num_anomalous_pixels: Ground-truth anomalous pixels seen.
        num_regions: Connected ground-truth regions (8-connectivity) seen.
        num_images: Maps seen.
        note: Why some value is NaN; empty when all are defined.
    """

    pixel_auroc: float
    pixel_f1_max: float
    aupro: float
    num_pixels: int
    num_anomalous_pixels: int
    num_regions: int
    num_images: int
    note: str = ""


class PixelMetrics:
    """Streaming pixel AUROC, pixel F1-max and AUPRO with memory independent of the data size.

    Feed one anomaly map and its ground-truth mask at a time with :meth:`update`, combine
    shards with :meth:`merge`, read the metrics with :meth:`result`. The module docstring
    describes the histogram resolution.

    Args:
        fpr_limit: Upper FPR of the PRO integration (0.3 in MVTec AD and every paper since).
    """

    def __init__(self, *, fpr_limit: float = DEFAULT_FPR_LIMIT) -> None:
        if not 0.0 < fpr_limit <= 1.0:
            raise ConfigError(f"fpr_limit must be in (0, 1]; got {fpr_limit}")
        self.fpr_limit = float(fpr_limit)
        self.negatives = np.zeros(NUM_BINS, dtype=np.int64)  # gt-normal pixels per bin
        self.positives = np.zeros(NUM_BINS, dtype=np.int64)  # gt-anomalous pixels per bin
        # Sum over regions of (region pixels in the bin) / (region size).
        self.overlap = np.zeros(NUM_BINS, dtype=np.float64)
        self.num_regions = 0
        self.num_images = 0

    def update(self, scores: ArrayLike, mask: ArrayLike, *, name: str | None = None) -> None:
        """Add one map.

        Args:
            scores: H x W anomaly scores (1 x H x W accepted), higher = more anomalous.
            mask: H x W ground truth; nonzero / True = anomalous pixel.
            name: The image's name or path, used in error messages.

        Raises:
            ConfigError: Shape mismatch, non-numeric or non-finite scores.
        """
        what = f"anomaly map of {name}" if name else "anomaly map"
        s = _as_map(scores, what)
        m = _as_map(mask, f"ground-truth mask of {name}" if name else "ground-truth mask")
        if s.shape != m.shape:
            raise ConfigError(
                f"{what}: shape {s.shape} differs from its mask's {m.shape}; resize the map to "
                "the mask (or load the mask at the map's size) first"
            )
        if s.dtype.kind not in "biuf":
            raise ConfigError(f"{what}: scores must be numbers; got dtype {s.dtype}")
        if s.dtype.kind == "f":
            bad = int(np.count_nonzero(~np.isfinite(s)))
            if bad:
                raise ConfigError(f"{what}: {bad} of {s.size} scores are NaN or infinite")
        if (
            s.dtype.kind == "f"
            and s.dtype.itemsize > 4
            and s.size
            and np.abs(s).max() > np.finfo(np.float32).max
        ):
            raise ConfigError(f"{what}: scores exceed the float32 range (about ±3.4e38)")
        s32 = s.astype(np.float32, copy=False)
        gt = m if m.dtype == np.bool_ else m != 0

        bins = score_bins(s32).ravel()  # H*W
        # Every pixel first, anomalous ones subtracted below: avoids copying the (large) normal
        # part out of the map.
        counts = np.bincount(bins, minlength=NUM_BINS)
        if gt.any():
            labeled, n = ndimage.label(gt, structure=_STRUCTURE)
            region = labeled.ravel()[gt.ravel()]  # P, 1..n
            size = np.bincount(region, minlength=n + 1)
            pos_bins = bins[gt.ravel()]
            uniq, inverse = np.unique(pos_bins, return_inverse=True)
            pos_counts = np.bincount(inverse, minlength=len(uniq))
            self.positives[uniq] += pos_counts
            counts[uniq] -= pos_counts
            self.overlap[uniq] += np.bincount(
                inverse, weights=1.0 / size[region], minlength=len(uniq)
            )
            self.num_regions += int(n)
        self.negatives += counts
        self.num_images += 1

    def merge(self, other: PixelMetrics) -> PixelMetrics:
        """Add another accumulator's maps (a shard) to this one; returns ``self``."""
        if not isinstance(other, PixelMetrics):
            raise ConfigError(f"can only merge PixelMetrics; got {type(other).__name__}")
        if other.fpr_limit != self.fpr_limit:
            raise ConfigError(
                f"cannot merge PixelMetrics with fpr_limit {other.fpr_limit} into one with "
                f"{self.fpr_limit}"
            )
        self.negatives += other.negatives
        self.positives += other.positives
        self.overlap += other.overlap
        self.num_regions += other.num_regions
        self.num_images += other.num_images
        return self

    # Cumulative sums from the highest bin down, over occupied bins only: element i is the
    # count with score >= the i-th highest occupied bin.
    def _cumulative(
        self,
    ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
        occupied = np.flatnonzero(self.negatives + self.positives)[::-1]
        neg = self.negatives[occupied].astype(np.float64)
        pos = self.positives[occupied].astype(np.float64)
        return neg, pos, np.cumsum(neg), np.cumsum(pos)

    def result(self) -> PixelResult:
        """The metrics over every map added so far."""
        n_neg = int(self.negatives.sum())
        n_pos = int(self.positives.sum())
        notes = []
        if n_pos == 0:
            notes.append("no anomalous pixels: pixel AUROC, F1-max and AUPRO are undefined")
        if n_neg == 0:
            notes.append("no normal pixels: pixel AUROC and AUPRO are undefined")
        auroc = f1 = aupro = math.nan
        if n_pos:
            neg, pos, fp, tp = self._cumulative()
            f1 = float(_f1_curve(tp, fp, float(n_pos)).max())
            if n_neg:
                # Each anomalous pixel beats the normal ones below its bin, half of those in it;
                # summed per normal-pixel bin: the anomalous pixels above it plus half in it.
                auroc = float(np.dot(neg, tp - pos / 2.0)) / (float(n_pos) * float(n_neg))
                fpr, pro = self.pro_curve()
                aupro = _area_up_to(fpr, pro, self.fpr_limit) / self.fpr_limit
        return PixelResult(
            pixel_auroc=auroc,
            pixel_f1_max=f1,
            aupro=aupro,
            num_pixels=n_neg + n_pos,
            num_anomalous_pixels=n_pos,
            num_regions=self.num_regions,
            num_images=self.num_images,
            note="; ".join(notes),
        )

    def roc_curve(
        self, *, max_points: int | None = 1000
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """The pixel ROC curve from (0, 0) to (1, 1), for plotting.

        Args:
            max_points: Keep at most this many points, evenly spaced along the curve's points
                (both ends kept); None keeps one per occupied bin.

        Returns:
            ``(fpr, tpr)``, each of K points; empty when either class has no pixel.
        """
        n_neg = float(self.negatives.sum())
        n_pos = float(self.positives.sum())
        if not n_neg or not n_pos:
            return np.zeros(0), np.zeros(0)
        _neg, _pos, fp, tp = self._cumulative()
        fpr = np.concatenate([[0.0], fp / n_neg])
        tpr = np.concatenate([[0.0], tp / n_pos])
        return _thin(fpr, tpr, max_points)

    def pro_curve(
        self, *, max_points: int | None = None
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """The PRO curve from (0, 0) to (1, 1) over all FPRs (not cut at ``fpr_limit``).

        Args:
            max_points: As in :meth:`roc_curve`; None (the default) keeps every point.

        Returns:
            ``(fpr, pro)``, each of K points; empty when either class has no pixel.
        """
        n_neg = float(self.negatives.sum())
        if not n_neg or not self.num_regions:
            return np.zeros(0), np.zeros(0)
        occupied = np.flatnonzero(self.negatives + self.positives)[::-1]
        fp = np.cumsum(self.negatives[occupied].astype(np.float64))
        overlap = np.cumsum(self.overlap[occupied])
        fpr = np.concatenate([[0.0], fp / n_neg])
        pro = np.concatenate([[0.0], overlap / self.num_regions])
        return _thin(fpr, pro, max_points)


def _as_map(x: ArrayLike, what: str) -> NDArray[Any]:
    if hasattr(x, "detach"):  # a torch tensor, possibly on the GPU
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ConfigError(f"{what}: expected H x W (or 1 x H x W); got shape {arr.shape}")
    return arr


def _thin(
    x: NDArray[np.float64], y: NDArray[np.float64], max_points: int | None
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    if max_points is None or len(x) <= max_points:
        return x, y
    if max_points < 2:
        raise ConfigError(f"max_points must be at least 2; got {max_points}")
    keep = np.unique(np.linspace(0, len(x) - 1, max_points).round().astype(np.int64))
    return x[keep], y[keep]


def _area_up_to(x: NDArray[np.float64], y: NDArray[np.float64], limit: float) -> float:
    """Trapezoid area under the path ``(x, y)`` (x non-decreasing) for ``x <= limit``; the
    segment that crosses ``limit`` is cut there by linear interpolation, as MVTec's code does."""
    x0, x1, y0, y1 = x[:-1], x[1:], y[:-1], y[1:]
    full = x1 <= limit
    area = float(np.sum(((y0 + y1) / 2.0 * (x1 - x0))[full]))
    crossing = np.flatnonzero((x0 < limit) & (x1 > limit))
    if len(crossing):
        i = crossing[0]
        y_cut = y0[i] + (y1[i] - y0[i]) * (limit - x0[i]) / (x1[i] - x0[i])
        area += float((y0[i] + y_cut) / 2.0 * (limit - x0[i]))
    return area


# --------------------------------------------------------------------------------------- summary
METRIC_NAMES = ("image_auroc", "image_f1_max", "pixel_auroc", "pixel_f1_max", "aupro")


def evaluate(
    image_scores: Sequence[float] | ArrayLike,
    image_labels: Sequence[int] | ArrayLike,
    pixel: PixelMetrics | None = None,
) -> dict[str, float]:
    """Every anomaly metric of one category, in [0, 1]; NaN where undefined.

    Args:
        image_scores: N image-level anomaly scores.
        image_labels: N labels, 0 normal and 1 anomalous.
        pixel: The category's pixel accumulator; None gives NaN pixel metrics.

    Returns:
        ``image_auroc``, ``image_f1_max``, ``pixel_auroc``, ``pixel_f1_max``, ``aupro``
        (the keys of :data:`METRIC_NAMES`, in that order).

    Raises:
        ConfigError: Mismatched lengths, labels other than 0/1, non-finite scores.
    """
    s, y = _image_inputs(image_scores, image_labels)
    both = bool(y.any()) and not bool(y.all())
    out = {
        "image_auroc": image_auroc(s, y) if both else math.nan,
        "image_f1_max": f1_max(s, y) if y.any() else math.nan,
        "pixel_auroc": math.nan,
        "pixel_f1_max": math.nan,
        "aupro": math.nan,
    }
    if pixel is not None:
        r = pixel.result()
        out.update(pixel_auroc=r.pixel_auroc, pixel_f1_max=r.pixel_f1_max, aupro=r.aupro)
    return out
