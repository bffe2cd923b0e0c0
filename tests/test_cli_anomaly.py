"""``vprompt anomaly check | methods | fit | score | eval`` and ``vprompt find-similar``,
end to end through the real CLI on a tiny synthetic MVTec-layout set."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from vprompt.anomaly.synthetic import write_inspection_set
from vprompt.cli import main

TINY_PM = [
    "--set",
    "image_size=64",
    "--set",
    "resize=64",
    "--set",
    "pretrain_dim=16",
    "--set",
    "target_dim=8",
]


@pytest.fixture(scope="module")
def inspection(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspection") / "set"
    write_inspection_set(
        root,
        categories=("brick", "grass"),
        train_per_category=3,
        good_test=2,
        defects_per_type=1,
        size=64,
        seed=0,
    )
    return root


def _cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def test_fit_then_score_through_the_real_cli(run_cli, inspection, tmp_path):
    pack = tmp_path / "bank.safetensors"
    fitted = run_cli(
        "anomaly", "fit", "--method", "patch-memory", "--model", "torchvision:tiny", "--weights",
        "none", "--normal", inspection / "brick" / "train" / "good", *TINY_PM, "--out", pack,
        "--device", "cpu", "--json",
    )  # fmt: skip
    assert fitted.returncode == 0, fitted.stderr
    summary = json.loads(fitted.stdout)
    assert summary["references"] == 3
    assert pack.is_file()
    out = tmp_path / "scored"
    scored = run_cli(
        "anomaly", "score", "--pack", pack, inspection / "brick" / "test", "--threshold", "0.5",
        "--out", out, "--device", "cpu", "--json",
    )  # fmt: skip
    assert scored.returncode == 0, scored.stderr
    rows = scored.json_lines()
    assert len(rows) == 6  # 2 good + 4 defect types
    assert all(r["score"] >= 0 and "defect" in r for r in rows)
    result = json.loads((out / "result.json").read_text())
    assert len(result["images"]) == 6
    for row in result["images"]:
        assert (out / row["heatmap"]).is_file()
        assert (out / row["mask"]).is_file()


def test_eval_writes_the_papers_table_and_roc_plot(inspection, tmp_path):
    out = tmp_path / "eval"
    result = _cli(
        "anomaly", "eval", "--data", f"mvtec:{inspection}", "--method", "patch-memory",
        "--model", "torchvision:tiny", "--weights", "none", "--shots", "2", *TINY_PM,
        "--out", out, "--device", "cpu", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{") :])
    assert [c["name"] for c in summary["categories"]] == ["brick", "grass"]
    for cat in summary["categories"]:
        assert cat["shots"] == 2
        assert len(cat["references"]) == 2
        assert cat["num_test"] == 6
        assert cat["num_anomalous"] == 4
        for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max"):
            assert 0 <= cat[key] <= 1
    table = (out / "table.md").read_text()
    assert "| Category | Image AUROC | Image F1-max | Pixel AUROC | Pixel F1-max | AUPRO |" in table
    assert "| **mean** |" in table
    assert (out / "roc.png").is_file()
    assert len(list((out / "maps" / "brick").glob("*.png"))) == 4


def test_zero_shot_winclip_scores_without_a_pack(inspection, tmp_path):
    result = _cli(
        "anomaly", "eval", "--data", f"mvtec:{inspection}", "--method", "winclip",
        "--model", "clip:tiny", "--weights", "none", "--category", "grass", "--save-maps", "0",
        "--out", tmp_path / "w", "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "| grass |" in result.output


def test_anomalyclip_trains_on_one_set_and_applies_zero_shot(inspection, tmp_path):
    pack = tmp_path / "prompts.safetensors"
    sets = ["--set", "depth=2", "--set", "dpam_start=1", "--set", "feature_layers=[1]"]
    sets += ["--set", "image_size=32", "--set", "optim.epochs=1", "--set", "optim.batch_size=4"]
    trained = _cli(
        "anomaly", "fit", "--method", "anomalyclip", "--model", "clip:tiny", "--weights", "none",
        "--data", f"mvtec:{inspection}", "--category", "brick", *sets, "--out", pack,
        "--device", "cpu", "--json",
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    summary = json.loads(trained.output[trained.output.index("{") :])
    assert summary["trained_on"] == ["brick"]
    assert summary["images"] == 6
    assert len(summary["history"]) == 1
    evaluated = _cli(
        "anomaly", "eval", "--data", f"mvtec:{inspection}", "--pack", pack, "--category",
        "grass", "--save-maps", "0", "--out", tmp_path / "e", "--device", "cpu",
    )  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    assert "| grass |" in evaluated.output


def test_find_similar_ranks_regions_and_writes_heat_maps(inspection, tmp_path):
    example = inspection / "brick" / "test" / "hole" / "000.png"
    out = tmp_path / "found"
    result = _cli(
        "find-similar", inspection / "brick" / "test", "--example", example, "--box", "10,10,40,40",
        "--model", "torchvision:tiny", "--weights", "none", "--set", "pretrain_dim=16",
        "--set", "target_dim=8", "--top-k", "3", "--threshold", "-1", "--out", out,
        "--device", "cpu", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{") :])
    assert 1 <= len(summary["regions"]) <= 3
    scores = [r["score"] for r in summary["regions"]]
    assert scores == sorted(scores, reverse=True)
    assert len(list((out / "heatmaps").glob("*.png"))) == 6
    assert all((out / r["mask"]).is_file() for r in summary["regions"])


def test_check_and_methods(inspection, tmp_path):
    ok = _cli("anomaly", "check", "--data", f"mvtec:{inspection}")
    assert ok.exit_code == 0
    assert "OK" in ok.output
    listed = _cli("anomaly", "methods")
    for name in ("patch-memory", "winclip", "anomalyclip", "bayes-pfl"):
        assert name in listed.output
    (inspection / "grass" / "ground_truth" / "hole").rename(tmp_path / "moved")
    try:
        broken = _cli("anomaly", "check", "--data", f"mvtec:{inspection}")
        assert broken.exit_code == 1
        assert "mask" in broken.output
    finally:
        (tmp_path / "moved").rename(inspection / "grass" / "ground_truth" / "hole")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["anomaly", "eval", "--data", "mvtec:/nonexistent", "--method", "winclip"],
            "/nonexistent",
        ),
        (
            ["anomaly", "score", "--method", "patch-memory", "x.png"],
            "fitted on normal images first",
        ),
        (["anomaly", "fit", "--method", "winclip", "--model", "torchvision:tiny"], "image-text"),
        (["anomaly", "score", "--pack", "{pickle}", "x.png"], "never unpickles"),
        (["find-similar", ".", "--example", "{image}", "--box", "0,0,999,5"], "not inside"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args, message, tmp_path, inspection):
    import torch

    torch.save({"bank": torch.zeros(2, 2)}, tmp_path / "p.safetensors")
    image = sorted((inspection / "brick" / "test" / "good").glob("*.png"))[0]
    filled = [a.format(pickle=tmp_path / "p.safetensors", image=image) for a in args]
    result = _cli(*filled, "--weights", "none", "--out", tmp_path / "o")
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert message in lines[0]
    assert "Traceback" not in result.output
