"""Contract tests over the in-context segmentation registry, and the automatic-mask defaults
living in one place (``AutomaticMaskConfig``). Adding a method adds no line here."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vprompt.errors import ConfigError
from vprompt.segment import SEGMENTATION_METHODS, SegmenterOptions, load_method
from vprompt.segment.automatic import AutomaticMaskConfig
from vprompt.segment.incontext import method_config, register_segmentation_method


def _scene(w: int, h: int, cx: int) -> tuple[Image.Image, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w]
    disc = (xx - cx) ** 2 + (yy - h // 2) ** 2 < (h // 4) ** 2
    photo = np.full((h, w, 3), 40, np.uint8)
    photo[disc] = (230, 200, 30)
    return Image.fromarray(photo), disc


@pytest.mark.parametrize("name", SEGMENTATION_METHODS.names())
def test_segmentation_method_contract(name: str) -> None:
    cls = SEGMENTATION_METHODS.get(name)
    assert cls.default_model.startswith(f"{cls.family}:")
    config = cls.config_class()
    assert dataclasses.is_dataclass(config)
    # PerSAM-F's 1000 steps are the paper's; the contract needs only a few.
    overrides = ("steps=5",) if "steps" in {f.name for f in dataclasses.fields(config)} else ()
    options = SegmenterOptions(model=cls.tiny_model, weights="none", device="cpu")
    model = load_method(name, options, overrides)
    ref, ref_mask = _scene(96, 72, 30)
    targets = [_scene(96, 72, 60)[0], _scene(64, 80, 32)[0]]
    assert model.fit([(ref, ref_mask)]) is model
    results = model.predict_many(targets)
    assert len(results) == 2
    for result, target in zip(results, targets, strict=True):
        assert result.mask.shape == (target.height, target.width)
        assert result.mask.dtype == bool
        assert isinstance(result.score, float)
    single = model.predict(targets[1])
    assert np.array_equal(single.mask, results[1].mask)


@pytest.mark.parametrize("name", SEGMENTATION_METHODS.names())
def test_wrong_model_family_is_refused(name: str) -> None:
    cls = SEGMENTATION_METHODS.get(name)
    other = "seggpt:tiny" if cls.family != "seggpt" else "sam:tiny"
    with pytest.raises(ConfigError, match=f"needs a {cls.family}:\\* model"):
        load_method(name, SegmenterOptions(model=other, weights="none", device="cpu"))


def test_method_settings_come_from_the_method_config() -> None:
    cls = SEGMENTATION_METHODS.get("persam-f")
    assert method_config(cls, ["steps=7", "lr=0.01"]).steps == 7
    with pytest.raises(ConfigError, match="unknown key"):
        method_config(cls, ["stepz=7"])
    with pytest.raises(ConfigError, match="embedding_type"):
        method_config(SEGMENTATION_METHODS.get("seggpt"), ["embedding_type=panoptic"])


def test_registration_names_what_is_missing() -> None:
    class Half:
        family = "sam"
        default_model = "seggpt:vit-large"

        def fit(self, references):
            return self

    with pytest.raises(TypeError) as info:
        register_segmentation_method("half-method")(Half)
    message = str(info.value)
    for piece in ("config_class", "tiny_model", "not a sam: model", "load()", "predict()"):
        assert piece in message, piece
    assert "half-method" not in SEGMENTATION_METHODS
    with pytest.raises(ValueError, match="already registered"):
        register_segmentation_method("persam")(Half)


def test_automatic_mask_defaults_live_in_one_place() -> None:
    from vprompt.cli.segment import segment_all_cmd
    from vprompt.serve.schemas import AutomaticRequest

    amg = AutomaticMaskConfig()
    request = AutomaticRequest()
    for field in (
        "points_per_side",
        "pred_iou_thresh",
        "stability_score_thresh",
        "box_nms_thresh",
        "crop_n_layers",
        "min_mask_region_area",
    ):
        assert getattr(request, field) == getattr(amg, field), field
    cli = {p.name: p.default for p in segment_all_cmd.params}
    assert cli["points_per_side"] == amg.points_per_side
    assert cli["points_per_batch"] == amg.points_per_batch
    assert cli["pred_iou_thresh"] == amg.pred_iou_thresh
    assert cli["stability_thresh"] == amg.stability_score_thresh
    assert cli["box_nms_thresh"] == amg.box_nms_thresh
    assert cli["crop_layers"] == amg.crop_n_layers
    assert cli["min_region_area"] == amg.min_mask_region_area


def test_personalize_cli_reads_method_settings(run_cli, tmp_path: Path) -> None:
    ref, mask = _scene(96, 72, 30)
    ref.save(tmp_path / "ref.png")
    Image.fromarray((mask * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    _scene(96, 72, 60)[0].save(tmp_path / "target.png")
    base = ["personalize", tmp_path / "target.png", "--ref", tmp_path / "ref.png",
            "--ref-mask", tmp_path / "mask.png", "--method", "persam-f", "--model", "sam:tiny",
            "--weights", "none", "--device", "cpu", "--out", tmp_path / "o"]  # fmt: skip
    res = run_cli(*base, "--set", "steps=3", "--json")
    assert res.returncode == 0, res.stderr
    res = run_cli(*base[:-1], tmp_path / "bad", "--set", "steps=0")
    assert res.returncode == 1
    assert "steps" in res.stderr
    assert "Traceback" not in res.stderr
    help_text = run_cli("personalize", "--help").stdout
    for name in SEGMENTATION_METHODS.names():
        assert name in help_text
