"""Batch prediction over files: input order, per-file errors, top-k, limits."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vprompt import ZeroShotClassifier
from vprompt.engine.predict import FileResult, predict_files
from vprompt.methods.base import Prediction, PromptMethod

CLASSES = ["cat", "person", "rocket", "coffee"]


def same_ranking(got: list[Prediction], want: list[Prediction]) -> None:
    """Same labels in the same order; scores equal up to batch-size float noise."""
    assert [(p.label, p.index) for p in got] == [(p.label, p.index) for p in want]
    assert [p.score for p in got] == pytest.approx([p.score for p in want], abs=1e-5)


@pytest.fixture(scope="module")
def classifier(tiny_clip) -> ZeroShotClassifier:
    return ZeroShotClassifier(tiny_clip, CLASSES)


@pytest.fixture
def mixed(photos_dir: Path, tmp_path: Path) -> list[Path]:
    """Five good photos and two bad files, interleaved."""
    good = sorted(photos_dir.glob("*.png"))
    extra = tmp_path / "copy.png"
    shutil.copy(good[0], extra)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"definitely not a png")
    missing = tmp_path / "missing.jpg"
    return [good[0], broken, good[1], good[2], missing, good[3], extra]


def test_results_in_input_order_with_errors_inline(classifier, mixed):
    results = list(predict_files(classifier, mixed, top_k=2, batch_size=3, workers=2))
    assert [r.path for r in results] == mixed
    assert all(isinstance(r, FileResult) for r in results)
    errors = {r.path.name: r.error for r in results if r.error is not None}
    assert set(errors) == {"broken.png", "missing.jpg"}
    assert "not a recognised image format" in errors["broken.png"]
    assert "no such file" in errors["missing.jpg"]
    good = [r for r in results if r.error is None]
    assert len(good) == 5
    expected = classifier.predict([r.path for r in good], top_k=2)
    for r, exp in zip(good, expected, strict=True):
        same_ranking(r.predictions, exp)


def test_batching_and_workers_do_not_change_predictions(classifier, photos_dir):
    paths = sorted(photos_dir.glob("*.png")) * 2
    one = list(predict_files(classifier, paths, top_k=4, batch_size=1, workers=1))
    many = list(predict_files(classifier, paths, top_k=4, batch_size=5, workers=3))
    assert [r.path for r in one] == [r.path for r in many] == paths
    for a, b in zip(one, many, strict=True):
        same_ranking(a.predictions, b.predictions)


def test_top_k_is_sorted_and_clamped(classifier, photos_dir):
    paths = sorted(photos_dir.glob("*.png"))
    for k, expected_len in [(1, 1), (3, 3), (50, len(CLASSES))]:
        for r in predict_files(classifier, paths, top_k=k):
            assert r.error is None
            assert len(r.predictions) == expected_len
            scores = [p.score for p in r.predictions]
            assert scores == sorted(scores, reverse=True)
            assert all(0.0 <= s <= 1.0 for s in scores)
            assert len({p.label for p in r.predictions}) == expected_len
    full = next(iter(predict_files(classifier, paths[:1], top_k=50)))
    assert sum(p.score for p in full.predictions) == pytest.approx(1.0, abs=1e-5)


def test_max_pixels_reports_oversized_files(classifier, photos_dir):
    paths = sorted(photos_dir.glob("*.png"))
    results = list(predict_files(classifier, paths, max_pixels=100))
    assert all(r.predictions is None for r in results)
    assert all("more than the limit of 100" in r.error for r in results)


def test_empty_input(classifier):
    assert list(predict_files(classifier, [])) == []


def test_unexpected_transform_failure_is_reported_per_file(photos_dir):
    paths = sorted(photos_dir.glob("*.png"))
    bad = paths[1]

    def transform(img):
        if img.size == transform.bad_size:
            raise ValueError("boom")
        return torch.zeros(3, 2, 2)

    from vprompt.data import load_image

    transform.bad_size = load_image(bad).size

    @dataclass(frozen=True)
    class Settings:
        pass

    class Fixed(PromptMethod):
        """Scores every image [0.25, 0.75] after the transform above."""

        Config = Settings

        def input_transform(self, train: bool):
            return transform

        def predict_proba(self, images):
            return torch.tensor([[0.25, 0.75]]).repeat(len(images), 1)

    fake = Fixed(SimpleNamespace(), ["a", "b"])
    results = list(predict_files(fake, paths, top_k=1, batch_size=2))
    assert [r.path for r in results] == paths
    by_path = {r.path: r for r in results}
    assert by_path[bad].error == "cannot process image (ValueError: boom)"
    for p in paths:
        if p != bad:
            assert by_path[p].predictions == [Prediction("b", 0.75, 1)]


def test_non_finite_scores_are_a_per_image_error_never_nan_in_json(photos_dir):
    """A model that overflows for one image reports that image as failed; the others stand,
    and the JSON printed holds no NaN."""
    from vprompt.cli.classify import _emit_results

    paths = sorted(photos_dir.glob("*.png"))[:3]

    @dataclass(frozen=True)
    class Settings:
        pass

    class Overflowing(PromptMethod):
        Config = Settings

        def input_transform(self, train: bool):
            return lambda img: torch.zeros(3, 2, 2)

        def predict_proba(self, images):
            probs = torch.tensor([[0.25, 0.75]]).repeat(len(images), 1)
            probs[1] = float("nan")  # the second image of every batch
            return probs

    results = list(predict_files(Overflowing(SimpleNamespace(), ["a", "b"]), paths, top_k=2))
    assert [r.error is None for r in results] == [True, False, True]
    assert "non-finite scores" in (results[1].error or "")
    assert results[0].predictions == [Prediction("b", 0.75, 1), Prediction("a", 0.25, 0)]
    nan = FileResult(Path("z.png"), predictions=[Prediction("a", float("nan"), 0)])
    import click.testing

    @click.command()
    def emit() -> None:
        _emit_results([nan], True)

    out = click.testing.CliRunner().invoke(emit).output
    assert "NaN" not in out
    assert '"score": null' in out


def test_file_result_to_json():
    ok = FileResult(Path("x.png"), predictions=[Prediction("cat", 0.5, 0)])
    assert ok.to_json() == {"image": "x.png", "predictions": [{"label": "cat", "score": 0.5}]}
    bad = FileResult(Path("y.png"), error="no such file")
    assert bad.to_json() == {"image": "y.png", "error": "no such file"}


@pytest.mark.parametrize(
    ("method", "model", "overrides"),
    [
        ("coop", "clip:tiny", {"n_ctx": 4}),
        ("visual-prompt", "torchvision:tiny", {"canvas_size": 64, "inner_size": 48}),
        ("linear-probe", "clip:tiny", {}),
    ],
)
def test_predict_applies_packs_of_every_kind(
    method, model, overrides, photos_dir, tmp_path, run_cli
):
    """`vprompt predict --pack` works for learned packs, not only zero-shot ones, and gives
    the method's own softmax through its own preprocessing."""
    from vprompt import load_backbone, save_pack
    from vprompt.data.images import load_image
    from vprompt.methods.config import config_from_dict
    from vprompt.methods.registry import METHODS

    cls = METHODS.get(method)
    backbone = load_backbone(model, "none")
    instance = cls(backbone, CLASSES, config_from_dict(cls.Config, overrides)).eval()
    pack = save_pack(instance, tmp_path / "p.safetensors")
    photo = sorted(photos_dir.glob("*.png"))[0]
    res = run_cli("predict", "--pack", pack, photo, "--json", "--top-k", "4", "--weights", "none")
    assert res.returncode == 0, res.stderr
    (line,) = res.json_lines()
    pixels = instance.input_transform(False)(load_image(photo))[None]
    with torch.no_grad():
        probs = instance(pixels).logits.softmax(-1)[0]
    got = {p["label"]: p["score"] for p in line["predictions"]}
    assert got == pytest.approx({c: float(probs[i]) for i, c in enumerate(CLASSES)}, abs=1e-5)
