"""The one config rule and the one train-then-test run (``vprompt.run``, ``Experiment``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vprompt
from vprompt.data.suite.synthetic import write_fake_dataset
from vprompt.engine.experiment import Experiment
from vprompt.engine.pack import load_pack
from vprompt.errors import ConfigError, UnknownNameError

TINY = {"model": "clip:tiny", "weights": "none", "device": "cpu", "progress": False}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("two-colours")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        for name, channel in (("blue", 2), ("red", 0)):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 80, (36, 36, 3), dtype=np.uint8)
                img[..., channel] = 220
                Image.fromarray(img).save(root / split / name / f"{i}.png")
    return root


def test_config_rule_order() -> None:
    """defaults -> preset -> epochs by shots -> dataset template -> --set."""
    plain, notes = Experiment(preset="coop/few-shot-16ctx").config(shots=4)
    assert plain.optim.epochs == 100  # CoOp's epochs for 4 shots
    assert notes == ["preset coop/few-shot-16ctx: 4 shots -> 100 epochs"]
    mine, notes = Experiment(preset="coop/few-shot-16ctx", overrides=("optim.epochs=3",)).config(
        shots=4
    )
    assert mine.optim.epochs == 3
    assert notes == []
    filled, _ = Experiment("kgcoop").config(template="{} texture.")
    assert filled.template == "{} texture."
    kept, _ = Experiment("kgcoop", overrides=("template=a {}.",)).config(template="{} texture.")
    assert kept.template == "a {}."  # a template the user set explicitly wins
    untouched, _ = Experiment("linear-probe").config(template="{} texture.")
    assert not hasattr(untouched, "template")  # no declared template field: nothing filled


def test_experiment_refuses_bad_names_before_any_model_loads() -> None:
    with pytest.raises(UnknownNameError, match="coop"):
        Experiment("copo")
    with pytest.raises(ConfigError, match="unknown key"):
        Experiment("coop", overrides=("n_ctxx=3",))
    with pytest.raises(ConfigError, match="is a coop setting"):
        Experiment("vpt", preset="coop/few-shot-16ctx")


def test_run_trains_tests_and_reports(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    report = vprompt.run(
        "linear-probe", data=f"folder:{folder}", out_dir=out, overrides=["optim.epochs=2"], **TINY
    )
    assert report.fit is not None
    assert report.fit.epochs_run == 2
    assert report.test.n == 6
    saved = json.loads((out / "test_metrics.json").read_text())
    assert saved == report.summary
    assert saved["test_accuracy"] == report.test.accuracy
    assert load_pack(out / "prompt.safetensors").method == "linear-probe"
    # Same seed, same pack (everything random is seeded before the method is built).
    again = vprompt.run(
        "linear-probe", data=f"folder:{folder}", out_dir=tmp_path / "again",
        overrides=["optim.epochs=2"], **TINY,
    )  # fmt: skip
    for key, value in report.method.prompt_state().items():
        assert np.array_equal(value.numpy(), again.method.prompt_state()[key].numpy()), key


def test_run_refuses_methods_without_training_data(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="learns nothing from training data"):
        vprompt.run("zeroshot", data=f"folder:{folder}", out_dir=tmp_path, **TINY)


def test_run_on_a_benchmark_dataset_fills_its_template(tmp_path: Path) -> None:
    root = tmp_path / "suite"
    write_fake_dataset("eurosat", root, num_classes=3, images_per_class=(3, 1, 1))
    out = tmp_path / "kg"
    vprompt.run(
        "kgcoop", data="eurosat", data_root=root, shots=1, seed=1, out_dir=out,
        overrides=["optim.epochs=1", "optim.warmup_epochs=0", "optim.batch_size=2"], **TINY,
    )  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["template"] == "a centered satellite photo of {}."


def test_protocol_records_a_user_template_over_the_dataset_one(tmp_path: Path) -> None:
    from vprompt.engine.protocol import ProtocolRun, plan_jobs, run_protocol

    root = tmp_path / "suite"
    write_fake_dataset("dtd", root, num_classes=3, images_per_class=(3, 1, 1))
    common = ("optim.epochs=1", "optim.warmup_epochs=0", "optim.batch_size=2", "augment=false")
    packs = {}
    for label, extra in (("dataset", ()), ("mine", ("template=an image of {}.",))):
        run = ProtocolRun(
            protocol="few-shot",
            method="kgcoop",
            model="clip:tiny",
            weights="none",
            data_root=root,
            out_dir=tmp_path / label,
            overrides=common + extra,
            progress=False,
        )
        run_protocol(run, plan_jobs("few-shot", method="kgcoop", datasets=["dtd"], shots=[1]))
        job = tmp_path / label / "jobs" / "dtd" / "shots_1" / "seed_1" / "train"
        packs[label] = load_pack(job / "prompt.safetensors").config["template"]
    # KgCoOp's own template for DTD (its reference_settings) unless the user sets one.
    assert packs == {"dataset": "a photo of a {}, a type of texture.", "mine": "an image of {}."}


def test_fewer_epochs_than_the_default_warmup_scale_it_with_a_note() -> None:
    """VPT warms up for 10 of its 100 epochs: --set optim.epochs=2 keeps that share (0.2)
    and says so, instead of refusing a setting the user never made."""
    config, notes = Experiment("vpt", overrides=("optim.epochs=2",)).config()
    assert (config.optim.epochs, config.optim.warmup_epochs) == (2, 0.2)
    assert any("scaled to 0.2" in note for note in notes)
    kept, notes = Experiment("vpt", overrides=("optim.epochs=50",)).config()
    assert kept.optim.warmup_epochs == 10
    assert not notes
    with pytest.raises(ConfigError, match="warmup_epochs must be in"):  # chosen, so refused
        Experiment("vpt", overrides=("optim.epochs=2", "optim.warmup_epochs=5")).config()


def test_the_cli_prints_the_scaled_warmup(tiny_folder, run_cli, tmp_path) -> None:
    res = run_cli("train", "--method", "vpt", "--model", "timm:tiny-vit", "--weights", "none",
                  "--data", f"folder:{tiny_folder}", "--out", tmp_path / "vpt",
                  "--set", "optim.epochs=1", "--set", "num_tokens=2")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "optim.warmup_epochs 10 does not fit optim.epochs=1: scaled to 0.1" in res.stderr
