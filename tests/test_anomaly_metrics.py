"""Anomaly metrics against scikit-learn, a hand-worked AUPRO and a plain exact AUPRO."""

from __future__ import annotations

import math
from bisect import bisect

import numpy as np
import pytest
from skimage.measure import label as sk_label
from sklearn.metrics import precision_recall_curve, roc_auc_score

from vprompt.anomaly.metrics import (
    METRIC_NAMES,
    PixelMetrics,
    evaluate,
    f1_max,
    image_auroc,
    score_bins,
)
from vprompt.errors import ConfigError


# ------------------------------------------------------------------------ plain reference metrics
def sklearn_f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    """AnomalyCLIP's F1-max: max of 2PR/(P+R) over the PR curve, NaN dropped."""
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.max(f1[np.isfinite(f1)]))


def reference_trapezoid(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """MVTec's trapezoid: cut at x_max, the last segment interpolated there."""
    correction = 0.0
    if x_max not in x:
        ins = bisect(list(x), x_max)
        y_at = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_at + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def exact_aupro(maps: list[np.ndarray], masks: list[np.ndarray], limit: float = 0.3) -> float:
    """MVTec AD's exact AUPRO: every pixel sorted, one curve point per distinct score."""
    scores, fp_step, pro_step = [], [], []
    regions = 0
    for amap, mask in zip(maps, masks, strict=True):
        labeled = sk_label(mask, connectivity=2)  # 8-connectivity, independent of scipy
        n = int(labeled.max())
        step = np.zeros(mask.shape)
        for k in range(1, n + 1):
            region = labeled == k
            step[region] = 1.0 / region.sum()
        scores.append(amap.ravel().astype(np.float64))
        fp_step.append((~mask).ravel().astype(np.float64))
        pro_step.append(step.ravel())
        regions += n
    s, fp, pr = np.concatenate(scores), np.concatenate(fp_step), np.concatenate(pro_step)
    order = np.argsort(-s, kind="stable")
    s, fp, pr = s[order], fp[order], pr[order]
    fpr = np.cumsum(fp) / fp.sum()
    pro = np.cumsum(pr) / regions
    last = np.append(np.diff(s) != 0, True)  # points where the threshold really changes
    fpr = np.concatenate([[0.0], fpr[last]])
    pro = np.concatenate([[0.0], pro[last]])
    return reference_trapezoid(fpr, pro, limit) / limit


def random_maps(seed: int, *, far_apart: bool, n: int = 4, size: int = 12):
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for i in range(n):
        if far_apart:
            # Multiples of 0.01 in [0.5, 1): 2.4e-4 wide bins there, so every value has its own.
            amap = (50 + rng.integers(0, 50, (size, size))) / 100.0
        else:
            amap = rng.random((size, size)).astype(np.float32)
        mask = np.zeros((size, size), dtype=bool)
        if i % 3 != 2:  # some maps have no anomaly at all
            for _ in range(rng.integers(1, 4)):
                r, c = rng.integers(0, size - 3, 2)
                h, w = rng.integers(1, 4, 2)
                mask[r : r + h, c : c + w] = True
        amap = amap + 0.15 * mask * (not far_apart)  # anomalies score a bit higher
        maps.append(amap)
        masks.append(mask)
    return maps, masks


def accumulate(maps, masks) -> PixelMetrics:
    pm = PixelMetrics()
    for i, (amap, mask) in enumerate(zip(maps, masks, strict=True)):
        pm.update(amap, mask, name=f"img{i}.png")
    return pm


# ----------------------------------------------------------------------------------- image level
def test_image_metrics_equal_sklearn():
    rng = np.random.default_rng(0)
    for trial in range(5):
        labels = rng.integers(0, 2, 40)
        labels[:2] = (0, 1)
        # Rounded scores: many ties, which must count one half.
        scores = np.round(rng.random(40), 1 if trial % 2 else 3)
        assert image_auroc(scores, labels) == pytest.approx(
            roc_auc_score(labels, scores), abs=1e-12
        )
        assert f1_max(scores, labels) == pytest.approx(sklearn_f1_max(scores, labels), abs=1e-12)


def test_image_auroc_one_class_is_a_clear_error():
    with pytest.raises(ConfigError, match="needs both normal and anomalous images"):
        image_auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ConfigError, match="2 image scores but 3 labels"):
        image_auroc([0.1, 0.2], [0, 1, 1])
    with pytest.raises(ConfigError, match="0 \\(normal\\) or 1"):
        f1_max([0.1, 0.2], [0, 2])
    with pytest.raises(ConfigError, match="NaN or infinite"):
        f1_max([0.1, float("nan")], [0, 1])


def test_evaluate_gives_every_metric_and_nan_when_undefined():
    out = evaluate([0.1, 0.9, 0.4], [0, 1, 0])
    assert tuple(out) == METRIC_NAMES
    assert out["image_auroc"] == 1.0
    assert out["image_f1_max"] == 1.0
    assert all(math.isnan(out[k]) for k in ("pixel_auroc", "pixel_f1_max", "aupro"))
    only_normal = evaluate([0.1, 0.2], [0, 0], PixelMetrics())
    assert all(math.isnan(v) for v in only_normal.values())
    maps, masks = random_maps(3, far_apart=False)
    pm = accumulate(maps, masks)
    full = evaluate([0.3, 0.8], [0, 1], pm)
    assert full["aupro"] == pm.result().aupro
    assert all(0.0 <= v <= 1.0 for v in full.values())


# ----------------------------------------------------------------------------------- pixel level
def test_score_bins_are_monotone_and_zero_has_one_bin():
    values = np.array(
        [-3e38, -1e5, -1.0, -1e-30, -0.0, 0.0, 1e-45, 1e-30, 0.5, 0.5001, 1.0, 3e38],
        dtype=np.float32,
    )
    bins = score_bins(values)
    assert (np.diff(bins.astype(np.int64)) >= 0).all()
    assert bins[4] == bins[5]
    assert bins.max() < 2**20
    # Values 0.01 apart in [0.5, 1) never share a bin.
    grid = score_bins(np.arange(50, 100, dtype=np.float32) / 100)
    assert len(np.unique(grid)) == 50


def test_hand_computed_two_regions():
    # Region A = {(0,0), (0,1)} (2 px), region B = {(2,3)} (1 px); 13 normal pixels.
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 0] = mask[0, 1] = mask[2, 3] = True
    amap = np.full((4, 4), 0.1)
    amap[0, 0], amap[0, 1], amap[2, 3] = 0.9, 0.5, 0.7  # A: 0.9 / 0.5, B: 0.7
    amap[3, 0], amap[1, 2] = 0.8, 0.6  # two normal pixels above the rest (0.1)
    # Thresholds high → low, (FPR, PRO) with PRO = mean over A and B of the covered fraction:
    #   0.9: (0, (1/2 + 0)/2 = 1/4)    0.8: (1/13, 1/4)   0.7: (1/13, (1/2 + 1)/2 = 3/4)
    #   0.6: (2/13, 3/4)               0.5: (2/13, 1)     0.1: (1, 1)
    # From (0, 0): area up to 0.3 = 1/4 * 1/13 + 3/4 * 1/13 + 1 * (0.3 - 2/13) = 0.3 - 1/13,
    # so AUPRO = 1 - 1/(13 * 0.3) = 29/39.
    # AUROC: 0.9 beats all 13 normals, 0.7 beats 12, 0.5 beats 11 → 36 / 39.
    # F1 = 2TP/(TP+FP+3): best at 0.5 (TP 3, FP 2) = 6/8.
    pm = PixelMetrics()
    pm.update(amap, mask)
    r = pm.result()
    assert r.aupro == pytest.approx(29 / 39, abs=1e-12)
    assert r.pixel_auroc == pytest.approx(36 / 39, abs=1e-12)
    assert r.pixel_f1_max == pytest.approx(0.75, abs=1e-12)
    assert (r.num_pixels, r.num_anomalous_pixels, r.num_regions, r.num_images) == (16, 3, 2, 1)
    assert r.note == ""
    assert exact_aupro([amap], [mask]) == pytest.approx(29 / 39, abs=1e-12)
    fpr, pro = pm.pro_curve()
    assert fpr.tolist() == pytest.approx([0, 0, 1 / 13, 1 / 13, 2 / 13, 2 / 13, 1])
    assert pro.tolist() == pytest.approx([0, 0.25, 0.25, 0.75, 0.75, 1, 1])


def test_regions_are_8_connected():
    mask = np.zeros((5, 5), dtype=bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours: one region
    mask[3, 3] = True
    pm = PixelMetrics()
    pm.update(np.zeros((5, 5)), mask)
    assert pm.result().num_regions == 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_far_apart_scores_are_exact(seed):
    maps, masks = random_maps(seed, far_apart=True)
    r = accumulate(maps, masks).result()
    gt = np.concatenate([m.ravel() for m in masks])
    flat = np.concatenate([m.ravel() for m in maps])
    assert r.pixel_auroc == pytest.approx(roc_auc_score(gt, flat), abs=1e-9)
    assert r.pixel_f1_max == pytest.approx(sklearn_f1_max(flat, gt), abs=1e-9)
    assert r.aupro == pytest.approx(exact_aupro(maps, masks), abs=1e-9)


@pytest.mark.parametrize("seed", [5, 6])
def test_random_float_scores_are_close(seed):
    maps, masks = random_maps(seed, far_apart=False, n=6, size=24)
    r = accumulate(maps, masks).result()
    gt = np.concatenate([m.ravel() for m in masks])
    flat = np.concatenate([m.ravel() for m in maps])
    assert r.pixel_auroc == pytest.approx(roc_auc_score(gt, flat), abs=1e-3)
    assert r.pixel_f1_max == pytest.approx(sklearn_f1_max(flat, gt), abs=1e-3)
    assert r.aupro == pytest.approx(exact_aupro(maps, masks), abs=1e-3)


def test_negative_and_integer_scores():
    maps, masks = random_maps(7, far_apart=True)
    shifted = [np.rint(m * 100).astype(np.int64) - 75 for m in maps]  # -25 .. 24, ints
    r = accumulate(shifted, masks).result()
    assert r.aupro == pytest.approx(exact_aupro(shifted, masks), abs=1e-9)
    gt = np.concatenate([m.ravel() for m in masks])
    flat = np.concatenate([m.ravel() for m in shifted])
    assert r.pixel_auroc == pytest.approx(roc_auc_score(gt, flat), abs=1e-9)


def test_order_independent_and_merge_equals_one_accumulator():
    maps, masks = random_maps(11, far_apart=False, n=6)
    whole = accumulate(maps, masks).result()
    reverse = accumulate(maps[::-1], masks[::-1]).result()
    first, second = accumulate(maps[:3], masks[:3]), accumulate(maps[3:], masks[3:])
    merged = first.merge(second).result()
    for other in (reverse, merged):
        assert other.num_regions == whole.num_regions
        assert other.num_pixels == whole.num_pixels
        assert other.num_images == whole.num_images == 6
        for key in ("pixel_auroc", "pixel_f1_max", "aupro"):
            assert getattr(other, key) == pytest.approx(getattr(whole, key), abs=1e-12)


def test_roc_curve_for_plots():
    maps, masks = random_maps(2, far_apart=False)
    pm = accumulate(maps, masks)
    fpr, tpr = pm.roc_curve(max_points=None)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert (np.diff(fpr) >= 0).all()
    assert (np.diff(tpr) >= 0).all()
    area = float(np.sum((tpr[1:] + tpr[:-1]) / 2 * np.diff(fpr)))
    assert area == pytest.approx(pm.result().pixel_auroc, abs=1e-12)
    thin_fpr, thin_tpr = pm.roc_curve(max_points=20)
    assert len(thin_fpr) <= 20
    assert thin_fpr[0] == 0.0
    assert thin_tpr[-1] == 1.0
    fpr_p, pro = pm.pro_curve()
    assert pro[-1] == pytest.approx(1.0)
    assert fpr_p[-1] == pytest.approx(1.0)


def test_no_anomalous_pixels_gives_nan_with_a_reason():
    pm = PixelMetrics()
    pm.update(np.random.default_rng(0).random((6, 6)), np.zeros((6, 6), dtype=bool))
    r = pm.result()
    assert math.isnan(r.pixel_auroc)
    assert math.isnan(r.aupro)
    assert math.isnan(r.pixel_f1_max)
    assert "no anomalous pixels" in r.note
    assert pm.roc_curve()[0].size == 0


def test_bad_maps_are_named():
    pm = PixelMetrics()
    bad = np.zeros((4, 4))
    bad[1, 1] = np.nan
    with pytest.raises(ConfigError, match=r"anomaly map of cat/001\.png: 1 of 16 scores are NaN"):
        pm.update(bad, np.zeros((4, 4), dtype=bool), name="cat/001.png")
    with pytest.raises(ConfigError, match=r"shape \(4, 4\) differs from its mask's \(4, 5\)"):
        pm.update(np.zeros((4, 4)), np.zeros((4, 5), dtype=bool), name="x.png")
    with pytest.raises(ConfigError, match="float32 range"):
        pm.update(np.full((2, 2), 1e300), np.zeros((2, 2), dtype=bool))
    with pytest.raises(ConfigError, match="expected H x W"):
        pm.update(np.zeros(4), np.zeros(4, dtype=bool))
    with pytest.raises(ConfigError, match="fpr_limit"):
        PixelMetrics(fpr_limit=0.0)
    assert pm.result().num_images == 0  # failed updates add nothing
    # 1 x H x W maps (a model's output) and 0/1 integer masks are accepted.
    pm.update(np.zeros((1, 4, 4)), np.eye(4, dtype=np.uint8))
    assert pm.result().num_regions == 1
