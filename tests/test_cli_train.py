"""`vprompt train` / `vprompt eval` end to end through the real CLI, on synthetic image folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory):
    """train/val/test folders of two easily separated classes (reddish vs bluish noise)."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 6), ("test", 8)):
        for name, channel in (("blue", 2), ("red", 0)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 80, (40, 40, 3), dtype=np.uint8)
                img[..., channel] = rng.integers(170, 255, (40, 40), dtype=np.uint8)
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


def vp_train_args(folder, out, *, epochs: int = 2) -> list:
    """The `vprompt train` arguments of the visual-prompt run the tests below share."""
    return [
        "train", "--method", "visual-prompt", "--model", "torchvision:tiny", "--weights", "none",
        "--data", f"folder:{folder}", "--out", out, "--set", f"optim.epochs={epochs}",
        "--set", "optim.batch_size=8", "--set", "mapping=linear", "--set", "inner_size=48",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(run_cli, colour_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "vp"
    result = run_cli(
        *vp_train_args(colour_folder, out),
        "--json",
    )
    return result, out


def test_train_writes_pack_metrics_plots_and_reports_test_accuracy(trained):
    result, out = trained
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["test_images"] == 16
    assert 0.0 <= report["test_accuracy"] <= 1.0
    assert report["selected"] == "best-val"  # a val split exists, so selection used it
    for name in (
        "prompt.safetensors",
        "metrics.jsonl",
        "config.json",
        "test_metrics.json",
        "learning_curves.png",
        "prompt.png",
        "prompted_examples.png",
    ):
        assert (out / name).is_file(), name
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]
    assert all(json.loads(line)["val_acc"] is not None for line in lines)
    assert (out / "prompt.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_of_the_pack_reproduces_the_train_commands_test_accuracy(
    trained, run_cli, colour_folder
):
    result, out = trained
    report = json.loads(result.stdout.strip().splitlines()[-1])
    ev = run_cli(
        "eval", "--pack", out / "prompt.safetensors", "--data", f"folder:{colour_folder}", "--json"
    )
    assert ev.returncode == 0, ev.stderr
    scores = json.loads(ev.stdout)
    assert scores["images"] == 16
    assert scores["accuracy"] == report["test_accuracy"]
    inspect = run_cli("inspect", out / "prompt.safetensors", "--json")
    meta = json.loads(inspect.stdout)
    assert meta["method"] == "visual-prompt"
    assert meta["backbone"]["name"] == "torchvision:tiny"
    assert meta["classnames"] == ["blue", "red"]
    assert set(meta["tensors"]) == {
        "pixels.prompt",
        "mapping.indices",
        "mapping.calibrated",
        "mapping.linear.weight",
        "mapping.linear.bias",
    }


def test_rerunning_a_finished_run_resumes_instead_of_retraining(trained, run_cli, colour_folder):
    _, out = trained
    before = (out / "prompt.safetensors").read_bytes()
    again = run_cli(
        *vp_train_args(colour_folder, out),
        "--json",
    )
    assert again.returncode == 0, again.stderr
    assert "epoch 1/2" not in again.stderr  # nothing retrained
    assert (out / "prompt.safetensors").read_bytes() == before
    changed = run_cli(
        *vp_train_args(colour_folder, out, epochs=3),
    )
    assert changed.returncode == 1
    assert "vprompt: error:" in changed.stderr
    assert "--overwrite" in changed.stderr
    assert "Traceback" not in changed.stderr
    assert (out / "prompt.safetensors").read_bytes() == before  # nothing lost


@pytest.mark.parametrize(
    ("method", "model", "data", "sets", "message"),
    [
        ("bogus", "torchvision:tiny", None, [], "unknown method 'bogus'"),
        ("visual-prompt", "torchvision:tiny", None, ["optim.lrr=1"], "unknown key 'optim.lrr'"),
        ("visual-prompt", "torchvision:tiny", None, ["kind=spiral"], "kind must be"),
        ("visual-prompt", "torchvision:tiny", "folder:/does/not/exist", [], "expected"),
        ("visual-prompt", "torchvision:mobilenet_v3", None, [], "did you mean"),
    ],
)
def test_train_bad_inputs_give_one_line_errors(
    run_cli, colour_folder, tmp_path, method, model, data, sets, message
):
    overrides = [arg for s in sets for arg in ("--set", s)]
    result = run_cli(
        "train",
        "--method",
        method,
        "--model",
        model,
        "--weights",
        "none",
        "--data",
        data or f"folder:{colour_folder}",
        "--out",
        tmp_path / "run",
        *overrides,
    )
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("vprompt: error:")]
    assert len(errors) == 1, result.stderr
    assert message in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_full_finetune_is_labelled_not_a_prompt_method(run_cli, colour_folder, tmp_path):
    result = run_cli(
        "train",
        "--method",
        "full-finetune",
        "--model",
        "torchvision:tiny",
        "--weights",
        "none",
        "--data",
        f"folder:{colour_folder}",
        "--out",
        tmp_path / "ft",
        "--set",
        "optim.epochs=1",
        "--set",
        "optim.batch_size=8",
    )
    assert result.returncode == 0, result.stderr
    assert "not a prompt method" in result.stderr


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("m.csv", "path,label,split\na.png,red,train,EXTRA\n", "m.csv:2: 4 values"),
        ("s.json", '{"train": [["a.png", 10000000000, "red"]], "val": [], "test": []}', "0..0"),
    ],
    ids=["csv-extra-cells", "json-label-1e10"],
)
def test_train_refuses_hostile_manifests_in_one_line(run_cli, tmp_path, name, content, message):
    manifest = tmp_path / name
    manifest.write_text(content)
    kind = manifest.suffix.lstrip(".")
    result = run_cli(
        *vp_train_args(tmp_path, tmp_path / "run")[:7],
        "--data",
        f"{kind}:{manifest}",
        "--out",
        tmp_path / "run",
    )
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("vprompt: error:")]
    assert len(errors) == 1, result.stderr
    assert message in errors[0], result.stderr
    assert str(manifest) in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing was started


def test_out_folders_that_cannot_or_must_not_be_written(run_cli, colour_folder, tmp_path):
    in_the_way = tmp_path / "file"
    in_the_way.write_text("not a folder")
    res = run_cli(*vp_train_args(colour_folder, in_the_way / "run"))
    assert res.returncode == 1
    assert res.stderr.splitlines()[-1].startswith("vprompt: error: cannot create output folder")
    assert "Traceback" not in res.stderr
    assert in_the_way.read_text() == "not a folder"
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("months of work")
    res = run_cli(*vp_train_args(colour_folder, theirs, epochs=1))
    assert res.returncode == 1
    assert "files vprompt did not write (thesis.tex)" in res.stderr
    assert "--overwrite" in res.stderr
    res = run_cli(*vp_train_args(colour_folder, theirs, epochs=1), "--overwrite")
    assert res.returncode == 0, res.stderr
    assert (theirs / "prompt.safetensors").is_file()
    assert (theirs / "thesis.tex").read_text() == "months of work"  # written next to, not over


def test_a_tampered_checkpoint_is_one_line_and_overwrite_starts_over(
    trained, run_cli, colour_folder, tmp_path
):
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    _, source = trained
    out = tmp_path / "vp"
    shutil.copytree(source, out)
    path = out / "checkpoint.safetensors"
    with safe_open(str(path), "pt") as fh:
        progress = json.loads(fh.metadata()["vprompt-checkpoint"])
    progress["history"] = "rewritten by hand"
    save_file(
        load_file(str(path)), str(path), metadata={"vprompt-checkpoint": json.dumps(progress)}
    )
    res = run_cli(*vp_train_args(colour_folder, out))
    assert res.returncode == 1
    errors = [line for line in res.stderr.splitlines() if line.startswith("vprompt: error:")]
    assert errors == [
        f"vprompt: error: {path}: damaged checkpoint: 'history' is 'rewritten by hand', expected "
        "list; pass --overwrite (overwrite=True) to start over there, or choose a new out dir"
    ]
    assert "Traceback" not in res.stderr
    res = run_cli(*vp_train_args(colour_folder, out), "--overwrite", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.splitlines()[-1])["test_accuracy"] >= 0


def test_an_unwritable_feature_cache_is_a_warning_not_a_failure(run_cli, colour_folder, tmp_path):
    in_the_way = tmp_path / "cache-file"
    in_the_way.write_text("not a folder")
    res = run_cli(
        "train", "--method", "linear-probe", "--model", "clip:tiny", "--weights", "none",
        "--data", f"folder:{colour_folder}", "--out", tmp_path / "lp", "--set", "optim.epochs=1",
        env={"VPROMPT_CACHE": str(in_the_way)},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    warnings = [line for line in res.stderr.splitlines() if "vprompt: warning:" in line]
    assert len(warnings) == 1, res.stderr
    assert "feature cache" in warnings[0]
    assert "Not a directory; going on without it" in warnings[0]
    assert in_the_way.read_text() == "not a folder"


def test_a_plain_class_folder_is_split_and_says_so(run_cli, tiny_folder, tmp_path) -> None:
    plain = tiny_folder / "train"  # <class>/<image> only, no train/ and test/
    res = run_cli("train", "--method", "coop", "--model", "clip:tiny", "--weights", "none",
                  "--data", f"folder:{plain}", "--out", tmp_path / "run", "--set", "n_ctx=2",
                  "--set", "optim.epochs=1", "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["test_images"] == 3  # 1 of 4 each
    notes = [ln for ln in res.stderr.splitlines() if "has no train/ and test/ folders" in ln]
    assert len(notes) == 1, res.stderr
    assert "split each class's images 80/20 into train (9) and test (3)" in notes[0]
    again = run_cli("train", "--method", "coop", "--model", "clip:tiny", "--weights", "none",
                    "--data", f"folder:{plain}", "--out", tmp_path / "run2", "--set", "n_ctx=2",
                    "--set", "optim.epochs=1", "--json")  # fmt: skip
    assert (
        json.loads(again.stdout.strip().splitlines()[-1])["test_accuracy"]
        == json.loads(res.stdout.strip().splitlines()[-1])["test_accuracy"]
    )  # the same split every run
