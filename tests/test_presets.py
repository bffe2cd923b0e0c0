"""YAML presets of the published settings: a contract over every preset, the loader, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vprompt.engine.experiment import Experiment
from vprompt.errors import ConfigError, UnknownNameError
from vprompt.methods.config import config_to_dict
from vprompt.methods.presets import (
    PRESETS,
    _parse,
    apply_config_mapping,
    get_preset,
    load_preset,
    resolve_method,
)
from vprompt.methods.registry import METHODS

REPO = Path(__file__).resolve().parents[1]


def _leaves(data, prefix=""):
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _get(data, path):
    for part in path.split("."):
        data = data[part]
    return data


def test_presets_ship_inside_the_package() -> None:
    assert len(PRESETS) >= 5
    files = sorted((REPO / "src/vprompt/configs").glob("*/*.yaml"))
    assert sorted(PRESETS) == sorted(f"{f.parent.name}/{f.stem}" for f in files)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"configs/*/*.yaml"' in pyproject  # installed wheels carry them too


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_contract(name: str) -> None:
    preset = get_preset(name)
    assert preset.name == name
    assert preset.method == name.split("/")[0]
    assert preset.method in METHODS, f"{name}: method {preset.method!r} is not registered"
    assert preset.source.strip()
    assert preset.note.strip()
    assert "/" in preset.source  # cites a repository path
    cls = METHODS.get(preset.method)
    config = preset.build_config()
    assert isinstance(config, cls.Config)
    built, default = config_to_dict(config), config_to_dict(cls.Config())
    for key, value in _leaves(dict(preset.config)):
        got = _get(built, key)
        assert got == (list(value) if isinstance(value, tuple) else value), key
        base = _get(default, key)
        if base is not None and value is not None:
            # YAML 1.1 reads "1e-5" as a string: every value keeps its default's type.
            numeric = isinstance(base, float) and isinstance(value, int | float)
            assert numeric or type(value) is type(base), (key, value, base)
    for shots in (1, 2, 4, 8, 16):
        epochs = preset.build_config(shots).optim.epochs
        expected = preset.epochs_by_shots.get(shots, config.optim.epochs)
        assert epochs == expected
        assert epochs >= config.optim.warmup_epochs
    if preset.model is not None:
        assert preset.model.startswith("clip:")
    from vprompt.data.suite.base import SUITE

    for dataset, values in preset.by_dataset.items():
        assert dataset in SUITE, f"{name}: by_dataset names unknown dataset {dataset!r}"
        on_it, notes = Experiment(preset.method, preset=name).config(dataset=dataset)
        for key, value in _leaves(dict(values)):
            assert _get(config_to_dict(on_it), key) == value, (dataset, key)
        assert any(dataset in note for note in notes)


def test_published_coop_settings() -> None:
    few = get_preset("coop/few-shot-16ctx")
    assert [few.epochs_for(k) for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    assert few.epochs_for(3) == 100
    assert few.epochs_for(32) == 200
    c = few.build_config(16)
    assert (c.n_ctx, c.ctx_init, c.class_specific, c.class_token_position) == (16, "", False, "end")
    o = c.optim
    assert (o.optimizer, o.lr, o.batch_size, o.epochs) == ("sgd", 0.002, 32, 200)
    assert (o.warmup_epochs, o.warmup_type, o.warmup_lr, o.step_unit) == (
        1,
        "constant",
        1e-5,
        "epoch",
    )
    b2n = get_preset("coop/base-to-novel-4ctx").build_config()
    assert (b2n.ctx_init, b2n.optim.batch_size) == ("a photo of a", 32)
    assert get_preset("coop/few-shot-16ctx-imagenet").build_config(1).optim.epochs == 50


def test_load_preset_and_unknown_names() -> None:
    method, overrides = load_preset("coop/few-shot-16ctx")
    assert method == "coop"
    assert overrides["n_ctx"] == 16
    assert overrides["optim"]["lr"] == 0.002
    with pytest.raises(UnknownNameError, match="did you mean 'coop/few-shot-16ctx'"):
        get_preset("coop/few-shot-16")
    assert "coop/nope" not in PRESETS


def test_partial_sections_keep_the_methods_other_defaults() -> None:
    cls = METHODS.get("coop")
    config = apply_config_mapping(cls.Config(), {"optim": {"epochs": 5}})
    assert config.optim.epochs == 5
    assert config.optim.lr == cls.Config().optim.lr  # not OptimConfig's own default
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lrr'"):
        apply_config_mapping(cls.Config(), {"optim": {"lrr": 1}})
    with pytest.raises(ConfigError, match="is a section"):
        apply_config_mapping(cls.Config(), {"optim": 3})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("method: coop\nconfig: {}\nnote: x\n", "missing keys \\['source'\\]"),
        ("method: coop\nconfig: {}\nnote: x\nsource: y\nextra: 1\n", "unknown keys"),
        ("method: coop\nconfig: []\nnote: x\nsource: y\n", "'config' must be a mapping"),
        ("method: coop\nconfig: {}\nnote: ''\nsource: y\n", "'note' must be a non-empty"),
        ("method: vpt\nconfig: {}\nnote: x\nsource: y\n", "differs from its folder"),
        ("method: coop\nconfig: {}\nnote: x\nsource: y\nepochs_by_shots: {1: 0}\n", "epochs"),
        ("method: coop\nconfig: {}\nnote: x\nsource: y\nby_dataset: {dtd: 3}\n", "by_dataset"),
        ("- a\n- b\n", "expected a mapping"),
        ("method: [unclosed\n", "not valid YAML"),
        ("method: !!python/object:os.system {}\n", "not valid YAML"),  # safe_load only
    ],
)
def test_malformed_preset_files_are_clear_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _parse("coop/broken", text)


def test_method_and_preset_must_agree() -> None:
    preset = get_preset("coop/few-shot-16ctx")
    assert resolve_method(preset, None) == "coop"
    assert resolve_method(preset, "coop") == "coop"
    assert resolve_method(None, "vpt") == "vpt"
    with pytest.raises(ConfigError, match="is a coop setting"):
        resolve_method(preset, "vpt")
    with pytest.raises(ConfigError, match="give --method"):
        resolve_method(None, None)


def test_protocol_runner_applies_epochs_by_shots(tmp_path) -> None:
    from vprompt.engine.protocol import ProtocolRun, _Runner

    def runner(*overrides: str) -> _Runner:
        run = ProtocolRun(
            protocol="few-shot",
            method="coop",
            model="clip:tiny",
            weights="none",
            data_root=tmp_path,
            out_dir=tmp_path / "out",
            overrides=overrides,
            preset="coop/few-shot-16ctx",
        )
        return _Runner(run)

    plain = runner()
    assert [plain.experiment.config(shots=k)[0].optim.epochs for k in (1, 2, 4, 8, 16)] == [
        50, 100, 100, 200, 200,
    ]  # fmt: skip
    assert plain.experiment.base_config().optim.batch_size == 32
    assert plain.identity()["epochs_by_shots"] == {"1": 50, "2": 100, "4": 100, "8": 200, "16": 200}
    mine = runner("optim.epochs=3", "n_ctx=4")
    assert {mine.experiment.config(shots=k)[0].optim.epochs for k in (1, 16)} == {3}  # --set wins
    assert mine.experiment.base_config().n_ctx == 4
    assert "epochs_by_shots" not in mine.identity()
    with pytest.raises(ConfigError, match="is a coop setting"):
        ProtocolRun(
            protocol="few-shot",
            method="vpt",
            model="clip:tiny",
            data_root=tmp_path,
            out_dir=tmp_path,
            preset="coop/few-shot-16ctx",
        )


# ---------------------------------------------------------------------------- CLI
def test_cli_lists_presets(run_cli) -> None:
    res = run_cli("presets", "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert [r["name"] for r in rows] == sorted(PRESETS)
    assert all(r["source"] and r["note"] and isinstance(r["config"], dict) for r in rows)
    text = run_cli("presets", "--method", "coop")
    assert text.returncode == 0
    assert "coop/few-shot-16ctx" in text.stdout
    assert "source: KaiyangZhou/CoOp" in text.stdout


def test_cli_train_with_a_preset(run_cli, tmp_path) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name, channel in (("blue", 2), ("red", 0)):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(3):
                img = rng.integers(0, 90, (32, 32, 3), dtype=np.uint8)
                img[..., channel] = 220
                Image.fromarray(img).save(folder / f"{i}.png")
    out = tmp_path / "run"
    res = run_cli(
        "train", "--preset", "coop/base-to-novel-4ctx", "--model", "clip:tiny",
        "--weights", "none", "--data", f"folder:{tmp_path / 'data'}", "--out", out,
        "--set", "optim.epochs=1", "--set", "optim.batch_size=4", "--json",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert (report["method"], report["preset"]) == ("coop", "coop/base-to-novel-4ctx")
    config = json.loads((out / "config.json").read_text())["config"]
    assert (config["n_ctx"], config["ctx_init"]) == (4, "a photo of a")  # from the preset
    assert (config["optim"]["epochs"], config["optim"]["batch_size"]) == (1, 4)  # --set on top

    clash = run_cli(
        "train", "--preset", "coop/few-shot-16ctx", "--method", "linear-probe",
        "--model", "clip:tiny", "--data", f"folder:{tmp_path / 'data'}", "--out", tmp_path / "x",
    )  # fmt: skip
    assert clash.returncode == 1
    assert clash.stderr.strip().splitlines() == [
        "vprompt: error: preset coop/few-shot-16ctx is a coop setting, but --method is "
        "'linear-probe'; drop --method or pick a preset of that method"
    ]
    unknown = run_cli("train", "--preset", "coop/fewshot", "--model", "clip:tiny",
                      "--data", "folder:x", "--out", tmp_path / "y")  # fmt: skip
    assert unknown.returncode == 1
    assert "did you mean 'coop/few-shot-16ctx'" in unknown.stderr
    neither = run_cli(
        "train", "--model", "clip:tiny", "--data", "folder:x", "--out", tmp_path / "z"
    )
    assert neither.returncode == 1
    assert "give --method" in neither.stderr


def test_cli_protocol_takes_the_method_from_the_preset(run_cli, tmp_path) -> None:
    from vprompt.data.suite.synthetic import write_fake_dataset

    write_fake_dataset("dtd", tmp_path / "data", num_classes=3, images_per_class=(2, 1, 1))
    res = run_cli(
        "protocol", "few-shot", "--preset", "coop/few-shot-16ctx", "--model", "clip:tiny",
        "--weights", "none", "--data-root", tmp_path / "data", "--datasets", "dtd",
        "--shots", "1,2", "--seeds", "1", "--out", tmp_path / "out", "--dry-run",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["todo", "dtd/shots_1/seed_1", "todo", "dtd/shots_2/seed_1"]


def test_presets_for_a_method_list_its_settings_with_defaults_and_meaning(run_cli) -> None:
    res = run_cli("presets", "--method", "maple")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.startswith("maple settings (--set KEY=VALUE; defaults are the paper's):")
    assert "  depth = 9 — J ≥ 1, the prompted blocks of both towers" in out
    assert "  optim.lr = 0.0035 — The learning rate after the warm-up" in out
    assert "maple/base-to-novel" in out  # the presets follow


def test_an_unknown_setting_suggests_the_closest() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'deth'; did you mean 'depth'\?"):
        Experiment("maple", overrides=("deth=3",)).config()
    with pytest.raises(ConfigError, match=r"did you mean 'optim.lr', "):
        Experiment("maple", overrides=("optim.lrr=1",)).config()
