"""``vprompt attack train | eval`` through the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from vprompt.attack import PatchFile, PatchTransformConfig


def test_attack_train_then_eval_end_to_end(run_cli, tiny_folder, tmp_path):
    """A targeted patch against zero-shot clip:tiny on the training split, then scored on the
    test split by the victim recorded in the patch file."""
    train_dir, eval_dir = tmp_path / "train", tmp_path / "eval"
    data = f"folder:{tiny_folder}"
    trained = run_cli(
        "attack", "train", "--model", "clip:tiny", "--weights", "none", "--data", data,
        "--size", "0.1", "--shape", "circle", "--target", "green_thing", "--epochs", "1",
        "--batch-size", "6", "--seed", "3", "--out", train_dir, "--device", "cpu", "--json",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    summary = json.loads(trained.stdout)
    assert summary["target"] == 1
    assert (train_dir / "patch.safetensors").is_file()
    assert (train_dir / "patch.png").is_file()
    evaluated = run_cli(
        "attack", "eval", "--patch", train_dir / "patch.safetensors", "--data", data,
        "--placements", "2", "--grid", "2", "--out", eval_dir, "--device", "cpu", "--json",
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout)
    assert report["split"] == "test"
    assert report["images"] == 6  # 2 test images per class, never the 12 training ones
    assert report["target_name"] == "green_thing"
    assert report["victim"]["model"] == "clip:tiny"
    for key in ("clean_accuracy", "patched_accuracy_random", "patched_accuracy_worst"):
        assert 0 <= report[key] <= 1
    assert json.loads((eval_dir / "robust.json").read_text())["images"] == 6
    assert "| clean accuracy |" in (eval_dir / "robust.md").read_text()
    assert (eval_dir / "examples.png").is_file()
    assert (eval_dir / "patch.png").is_file()


def _bad_file(path, case):
    from safetensors.torch import save_file

    meta = json.dumps(
        PatchFile(
            patch=torch.rand(3, 4, 4), transform=PatchTransformConfig(), classnames=["a"]
        ).metadata()
    )
    if case == "pickle":
        torch.save({"patch": torch.rand(3, 4, 4)}, path)
    elif case == "nan":
        save_file({"patch": torch.full((3, 4, 4), math.nan)}, str(path), {"vprompt": meta})
    elif case == "shape":
        save_file({"patch": torch.rand(3, 4, 5)}, str(path), {"vprompt": meta})
    else:
        path.write_bytes(b"hello, not a patch at all")


@pytest.mark.parametrize("case", ["pickle", "nan", "shape", "junk"])
def test_hostile_patch_file_is_one_line_error(tiny_folder, tmp_path, case):
    from vprompt.cli import main

    bad = tmp_path / f"{case}.safetensors"
    _bad_file(bad, case)
    result = CliRunner().invoke(
        main,
        ["attack", "eval", "--patch", str(bad), "--model", "clip:tiny", "--weights", "none",
         "--data", f"folder:{tiny_folder}", "--out", str(tmp_path / "out")],
    )  # fmt: skip
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("vprompt: error: ")
    assert str(bad) in lines[0]
    assert "Traceback" not in result.output


def test_unknown_target_names_the_option(tiny_folder, tmp_path):
    from vprompt.cli import main

    result = CliRunner().invoke(
        main,
        ["attack", "train", "--model", "clip:tiny", "--weights", "none",
         "--data", f"folder:{tiny_folder}", "--target", "zebra", "--out", str(tmp_path / "o")],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "--target" in result.output
    assert "zebra" in result.output
