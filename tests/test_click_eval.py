"""Interactive-segmentation evaluation: next-click placement, NoC/NoF/mIoU@k, stub predictors."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image

from vprompt.errors import ConfigError, DatasetError, PromptError
from vprompt.prompts.spatial import MaskLogits, Point
from vprompt.segment.clicks import (
    ClickPredictor,
    ClickReport,
    ClickTrace,
    evaluate_clicks,
    iou,
    next_click,
    plot_miou_curve,
    simulate_clicks,
)


def _rect(shape: tuple[int, int], r0: int, r1: int, c0: int, c1: int) -> NDArray[np.bool_]:
    """Rows r0..r1 and columns c0..c1, both inclusive."""
    m = np.zeros(shape, dtype=bool)
    m[r0 : r1 + 1, c0 : c1 + 1] = True
    return m


def _logits(value: float) -> MaskLogits:
    return MaskLogits(np.full((256, 256), value, dtype=np.float32))


# ---------------------------------------------------------------- next_click


def test_first_click_is_the_centre_of_an_odd_square() -> None:
    gt = _rect((12, 12), 2, 6, 3, 7)  # 5 x 5, centre pixel (row 4, col 5)
    click = next_click(np.zeros_like(gt), gt)
    assert click == Point(5, 4, positive=True)


def test_even_square_ties_go_to_the_first_pixel_in_row_major_order() -> None:
    gt = _rect((10, 10), 2, 5, 2, 5)  # 4 x 4: the central 2 x 2 pixels all have distance 2
    assert next_click(np.zeros_like(gt), gt) == Point(3, 3, positive=True)


def test_equal_objects_tie_to_the_upper_left_one() -> None:
    gt = _rect((12, 12), 6, 8, 1, 3) | _rect((12, 12), 1, 3, 7, 9)
    assert next_click(np.zeros_like(gt), gt) == Point(8, 2)


def test_larger_false_positive_blob_gets_a_negative_click() -> None:
    shape = (30, 30)
    gt = _rect(shape, 2, 10, 2, 10) | _rect(shape, 20, 22, 20, 22)  # 3 x 3 part missed
    pred = _rect(shape, 2, 10, 2, 10) | _rect(shape, 15, 21, 2, 8)  # 7 x 7 false positive
    click = next_click(pred, gt)
    assert click == Point(5, 18, positive=False)


def test_larger_false_negative_blob_gets_a_positive_click() -> None:
    shape = (30, 30)
    gt = _rect(shape, 20, 26, 20, 26)  # missed entirely: 7 x 7
    pred = _rect(shape, 1, 3, 1, 3)  # 3 x 3 false positive
    assert next_click(pred, gt) == Point(23, 23, positive=True)


def test_equal_fn_and_fp_maxima_give_a_negative_click() -> None:
    shape = (20, 20)
    pred = _rect(shape, 1, 3, 1, 3)  # false positive first in row-major order
    gt = _rect(shape, 10, 12, 10, 12)  # false negative of the same size
    assert next_click(pred, gt) == Point(2, 2, positive=False)  # the reference's tie rule


def test_padding_treats_the_image_border_as_a_boundary() -> None:
    gt = _rect((10, 10), 0, 9, 0, 2)  # a strip along the left edge, full height
    empty = np.zeros_like(gt)
    assert next_click(empty, gt) == Point(1, 1)
    # Without padding only the right side is a boundary: the farthest pixel is in column 0.
    assert next_click(empty, gt, pad=False) == Point(0, 0)


def test_no_padding_on_a_full_image_still_finds_a_click() -> None:
    gt = np.ones((5, 5), dtype=bool)
    assert next_click(np.zeros_like(gt), gt, pad=False) == Point(2, 2)


def test_single_pixel_error_and_perfect_prediction() -> None:
    gt = _rect((8, 8), 2, 4, 2, 4)
    pred = gt.copy()
    assert next_click(pred, gt) is None
    pred[3, 3] = False
    assert next_click(pred, gt) == Point(3, 3, positive=True)


def test_clicked_pixels_are_not_clicked_again() -> None:
    gt = _rect((12, 12), 2, 6, 3, 7)
    empty = np.zeros_like(gt)
    first = next_click(empty, gt)
    assert first is not None
    second = next_click(empty, gt, clicked=[first])
    assert second is not None
    assert (second.x, second.y) != (first.x, first.y)
    # Distance 2 ring, first in row-major order: (row 3, col 4).
    assert second == Point(4, 3)
    only = _rect((5, 5), 2, 2, 2, 2)
    assert next_click(np.zeros_like(only), only, clicked=[Point(2, 2)]) is None


def test_next_click_rejects_bad_masks() -> None:
    gt = _rect((8, 8), 2, 4, 2, 4)
    with pytest.raises(DatasetError, match="ground-truth mask is empty"):
        next_click(np.zeros((8, 8), bool), np.zeros((8, 8), bool))
    with pytest.raises(PromptError, match=r"shape \(8, 9\).*\(8, 8\)"):
        next_click(np.zeros((8, 9), bool), gt)
    with pytest.raises(PromptError, match="2-D"):
        next_click(np.zeros((1, 8, 8), bool), gt[None])
    with pytest.raises(PromptError, match="0 and 1"):
        next_click(np.full((8, 8), 0.5), gt)
    # 0/1 integer masks are fine.
    assert next_click(np.zeros((8, 8), np.uint8), gt.astype(np.uint8)) == Point(3, 3)


def test_iou() -> None:
    a = _rect((10, 10), 0, 1, 0, 4)  # 10 px
    b = _rect((10, 10), 1, 2, 0, 4)  # 10 px, overlap 5
    assert iou(a, b) == pytest.approx(5 / 15)
    assert iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 1.0
    assert iou(a, np.zeros_like(a)) == 0.0
    with pytest.raises(PromptError, match="shape"):
        iou(a, a[:5])


# ---------------------------------------------------------------- stub predictors


class Segments:
    """An oracle over a label map: a positive click on segment s selects ``links[s]``.

    A negative click removes the segment under it. Clicks apply in order. It records the
    ``previous`` logits it received and returns logits filled with the step number.
    """

    def __init__(self, labels: NDArray[np.int64], links: dict[int, set[int]] | None = None):
        self.labels = labels
        self.links = links or {}
        self.received: list[MaskLogits | None] = []
        self.returned: list[MaskLogits] = []
        self.calls: list[tuple[Point, ...]] = []

    def __call__(
        self, points: Sequence[Point], previous: MaskLogits | None
    ) -> tuple[NDArray[np.bool_], MaskLogits | None]:
        self.calls.append(tuple(points))
        self.received.append(previous)
        selected: set[int] = set()
        for p in points:
            seg = int(self.labels[math.floor(p.y), math.floor(p.x)])
            if p.positive:
                selected |= self.links.get(seg, {seg}) - {0}
            else:
                selected.discard(seg)
        out = _logits(float(len(points)))
        self.returned.append(out)
        return np.isin(self.labels, list(selected)), out


class Fixed:
    """Always returns the same mask."""

    def __init__(self, mask: NDArray[np.bool_]):
        self.mask = mask
        self.calls = 0

    def __call__(
        self, points: Sequence[Point], previous: MaskLogits | None
    ) -> tuple[NDArray[np.bool_], MaskLogits | None]:
        self.calls += 1
        return self.mask.copy(), None


def _three_parts() -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
    shape = (40, 40)
    labels = np.zeros(shape, dtype=np.int64)
    labels[_rect(shape, 2, 12, 2, 12)] = 1  # 11 x 11 = 121
    labels[_rect(shape, 20, 26, 2, 8)] = 2  # 7 x 7 = 49
    labels[_rect(shape, 2, 6, 25, 29)] = 3  # 5 x 5 = 25
    return labels, labels > 0


def test_perfect_after_one_click() -> None:
    gt = _rect((16, 16), 3, 9, 4, 12)
    pred = Fixed(gt)
    trace = simulate_clicks(pred, gt, max_clicks=5)
    assert trace.ious == [1.0] * 5
    assert trace.clicks == [Point(7, 6)]  # dt 4 at (6, 7..9): the first wins
    assert pred.calls == 1  # nothing left to correct: the loop stops asking
    assert trace.noc(0.85) == trace.noc(0.9) == 1
    assert trace.nocs == {0.85: 1, 0.9: 1}
    assert [trace.iou_at(k) for k in (1, 5)] == [1.0, 1.0]


def test_never_improving_predictor_uses_the_whole_budget() -> None:
    gt = _rect((16, 16), 3, 9, 4, 12)
    pred = Fixed(np.zeros_like(gt))
    trace = simulate_clicks(pred, gt, max_clicks=6)
    assert trace.ious == [0.0] * 6
    assert pred.calls == 6
    assert len({(p.x, p.y) for p in trace.clicks}) == 6  # never the same pixel twice
    assert all(p.positive for p in trace.clicks)
    assert trace.noc(0.85) == 6
    assert not trace.reached(0.85)


def test_components_need_two_and_three_clicks() -> None:
    labels, gt = _three_parts()
    pred = Segments(labels)
    trace = simulate_clicks(pred, gt, max_clicks=8)
    assert trace.clicks == [Point(7, 7), Point(5, 23), Point(27, 4)]
    assert trace.ious[:3] == pytest.approx([121 / 195, 170 / 195, 1.0])
    assert trace.ious[3:] == [1.0] * 5
    assert trace.noc(0.85) == 2  # 170 / 195 = 0.872
    assert trace.noc(0.9) == 3


def test_negative_click_removes_a_leaked_segment() -> None:
    labels, _ = _three_parts()
    gt = (labels == 1) | (labels == 3)  # segment 2 is background in this ground truth
    pred = Segments(labels, links={1: {1, 2}})  # clicking segment 1 leaks into segment 2
    trace = simulate_clicks(pred, gt, max_clicks=5)
    assert trace.clicks == [
        Point(7, 7),
        Point(5, 23, positive=False),  # 7 x 7 leak beats the 5 x 5 miss
        Point(27, 4),
    ]
    assert trace.ious[:3] == pytest.approx([121 / 195, 121 / 146, 1.0])
    assert trace.noc(0.85) == trace.noc(0.9) == 3


def test_previous_logits_are_fed_back() -> None:
    labels, gt = _three_parts()
    pred = Segments(labels)
    simulate_clicks(pred, gt, max_clicks=3)
    assert pred.received[0] is None
    assert pred.received[1] is pred.returned[0]
    assert pred.received[2] is pred.returned[1]
    assert [len(c) for c in pred.calls] == [1, 2, 3]


def test_stop_at_ends_early_and_iou_at_carries_forward() -> None:
    labels, gt = _three_parts()
    trace = simulate_clicks(Segments(labels), gt, max_clicks=10, stop_at=0.85)
    assert len(trace.ious) == 2
    assert trace.iou_at(10) == pytest.approx(170 / 195)
    assert trace.noc(0.9) == 10  # never reached before stopping
    with pytest.raises(PromptError, match="1 <= k <= 10"):
        trace.iou_at(11)


def test_simulate_rejects_bad_inputs() -> None:
    gt = _rect((16, 16), 3, 9, 4, 12)
    with pytest.raises(DatasetError, match="ground-truth mask is empty"):
        simulate_clicks(Fixed(gt), np.zeros_like(gt))
    with pytest.raises(PromptError, match=r"shape \(16, 15\).*\(16, 16\)"):
        simulate_clicks(Fixed(gt[:, :15]), gt)
    with pytest.raises(ConfigError, match="max_clicks"):
        simulate_clicks(Fixed(gt), gt, max_clicks=0)
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        simulate_clicks(Fixed(gt), gt, iou_thresholds=(85,))

    def bad_logits(
        points: Sequence[Point], previous: MaskLogits | None
    ) -> tuple[NDArray[np.bool_], Any]:
        return gt, np.zeros((256, 256))

    with pytest.raises(PromptError, match="MaskLogits"):
        simulate_clicks(bad_logits, gt)


# ---------------------------------------------------------------- evaluate_clicks


def _report() -> tuple[ClickReport, list[int]]:
    labels, gt = _three_parts()
    square = _rect((16, 16), 3, 9, 4, 12)
    pairs = [(0, gt), (1, square), (2, square)]
    predictors: dict[int, Callable[[], ClickPredictor]] = {
        0: lambda: Segments(labels),
        1: lambda: Fixed(square),
        2: lambda: Fixed(~square),
    }
    made: list[int] = []

    def make(index: int) -> ClickPredictor:
        made.append(index)
        return predictors[index]()

    report = evaluate_clicks(pairs, make, max_clicks=4, progress=False)
    return report, made


def test_evaluate_aggregates_noc_nof_and_miou() -> None:
    report, made = _report()
    assert made == [0, 1, 2]
    assert report.image_indices == [0, 1, 2]
    assert report.noc == pytest.approx({0.85: (2 + 1 + 4) / 3, 0.9: (3 + 1 + 4) / 3})
    assert report.nof == {0.85: 1, 0.9: 1}
    assert report.miou_at == pytest.approx([(121 / 195 + 1) / 3, (170 / 195 + 1) / 3, 2 / 3, 2 / 3])
    data = json.loads(json.dumps(report.to_dict()))
    assert data["noc"]["0.85"] == pytest.approx(7 / 3)
    assert data["nof"] == {"0.85": 1, "0.9": 1}
    assert data["objects"][0]["clicks"][1] == [5.0, 23.0, True]
    assert data["objects"][2]["noc"] == {"0.85": 4, "0.9": 4}


def test_nof_counts_only_failures_not_a_success_at_the_last_click() -> None:
    trace = ClickTrace(ious=[0.1, 0.2, 0.9], clicks=[], max_clicks=3)
    assert trace.noc(0.85) == 3
    assert trace.reached(0.85)
    labels, gt = _three_parts()
    report = evaluate_clicks([(0, gt)], lambda i: Segments(labels), max_clicks=3, progress=False)
    assert report.noc[0.9] == 3
    assert report.nof == {0.85: 0, 0.9: 0}


def test_evaluate_rejects_empty_inputs() -> None:
    with pytest.raises(DatasetError, match="no"):
        evaluate_clicks([], lambda i: Fixed(np.ones((2, 2), bool)), progress=False)
    gt = _rect((8, 8), 2, 4, 2, 4)
    with pytest.raises(DatasetError, match=r"object 1 \(image 7\): ground-truth mask is empty"):
        evaluate_clicks(
            [(3, gt), (7, np.zeros_like(gt))], lambda i: Fixed(gt), max_clicks=2, progress=False
        )


def test_plot_is_written_atomically(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    report, _ = _report()
    out = plot_miou_curve(report, tmp_path / "plots" / "miou.png")
    assert out == tmp_path / "plots" / "miou.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["miou.png"]  # no temp file left behind


# ---------------------------------------------------------------------------- the reference
def _reference_click(pred, gt_labels, not_clicked):
    """RITM's Clicker._get_next_click on a label map (1 object, 0 background, -1 ignored),
    with scipy's exact distance transform standing in for OpenCV's (float32 results)."""
    from scipy.ndimage import distance_transform_edt

    gt = gt_labels == 1
    not_ignore = gt_labels != -1
    fn = np.pad(gt & ~pred & not_ignore, 1)
    fp = np.pad(~gt & pred & not_ignore, 1)
    fn_dt = distance_transform_edt(fn).astype(np.float32)[1:-1, 1:-1] * not_clicked
    fp_dt = distance_transform_edt(fp).astype(np.float32)[1:-1, 1:-1] * not_clicked
    is_positive = fn_dt.max() > fp_dt.max()
    ys, xs = np.where(fn_dt == fn_dt.max()) if is_positive else np.where(fp_dt == fp_dt.max())
    return bool(is_positive), int(ys[0]), int(xs[0])


def _reference_iou(gt_labels, pred):
    """RITM's utils.get_iou."""
    keep = gt_labels != -1
    obj = gt_labels == 1
    return (pred & obj & keep).sum() / ((pred | obj) & keep).sum()


def test_clicks_and_iou_equal_the_reference_clicker_with_an_unknown_band() -> None:
    rng = np.random.default_rng(5)
    labels = np.zeros((40, 50), np.int64)
    labels[8:30, 10:38] = 1
    labels[6:8, 8:40] = -1  # GrabCut's unknown band above the object
    labels[30:33, 8:40] = -1
    gt, ignore = labels == 1, labels == -1
    not_clicked = np.ones(labels.shape, dtype=bool)
    pred = np.zeros(labels.shape, dtype=bool)
    clicked: list[Point] = []
    for _ in range(6):
        positive, row, col = _reference_click(pred, labels, not_clicked)
        ours = next_click(pred, gt, clicked=clicked, ignore=ignore)
        assert ours == Point(col, row, positive=positive)  # (x = col, y = row): no half pixel
        clicked.append(ours)
        not_clicked[row, col] = False
        # A sloppy predictor: the truth, with noise and a leak into the ignored band.
        pred = (gt ^ (rng.random(gt.shape) < 0.08)) | ignore
        assert iou(pred, gt, ignore) == pytest.approx(_reference_iou(labels, pred))
        assert iou(pred, gt, ignore) != pytest.approx(iou(pred, gt))  # the band matters


def test_grabcut_trimap_is_one_object_with_an_ignored_band(tmp_path) -> None:
    from vprompt.segment.click_data import load_click_folder

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "images" / "cup.jpg")
    trimap = np.zeros((20, 30), np.uint8)
    trimap[4:16, 6:24] = 128
    trimap[6:14, 8:22] = 255
    Image.fromarray(trimap).save(tmp_path / "masks" / "cup.png")
    (sample,) = load_click_folder(tmp_path)  # no flag needed: the trimap's convention
    assert sample.object_id == 255
    assert np.array_equal(sample.mask, trimap == 255)
    assert sample.ignore is not None
    assert np.array_equal(sample.ignore, trimap == 128)
