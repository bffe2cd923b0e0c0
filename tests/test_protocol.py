"""Protocol runner end to end on synthetic copies of the benchmark layout, with a tiny CLIP."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from vprompt.data.suite import get_suite
from vprompt.data.suite.synthetic import write_fake_dataset
from vprompt.data.tasks import load_suite_task
from vprompt.engine.protocol import DOMAIN_TARGETS, plan_jobs
from vprompt.errors import ConfigError, DatasetError
from vprompt.methods.registry import METHODS

TINY = ["--model", "clip:tiny", "--weights", "none", "--device", "cpu"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("suite")
    write_fake_dataset("oxford_pets", root, num_classes=6, images_per_class=(6, 3, 2))
    write_fake_dataset("dtd", root, num_classes=5, images_per_class=(5, 3, 2))
    write_fake_dataset("eurosat", root, num_classes=4, images_per_class=(4, 2, 2))
    write_fake_dataset("imagenet", root, num_classes=6, images_per_class=(4, 0, 2))
    for name in DOMAIN_TARGETS:
        write_fake_dataset(name, root, num_classes=6, images_per_class=(0, 0, 2))
    return root


# ---------------------------------------------------------------------------- planning
def test_plan_few_shot_is_datasets_x_shots_x_seeds_in_paper_order() -> None:
    jobs = plan_jobs(
        "few-shot",
        method="linear-probe",
        datasets=["dtd", "OxfordPets"],
        shots=[1, 4],
        seeds=[1, 2],
    )
    assert [j.key for j in jobs[:4]] == [
        "oxford_pets/shots_1/seed_1",
        "oxford_pets/shots_1/seed_2",
        "oxford_pets/shots_4/seed_1",
        "oxford_pets/shots_4/seed_2",
    ]
    assert len(jobs) == 8
    assert jobs[-1].dataset == "dtd"


def test_plan_zero_shot_runs_once_per_dataset() -> None:
    jobs = plan_jobs("few-shot", method="zeroshot", datasets=["dtd"], shots=[1, 2], seeds=[1, 2])
    assert [(j.dataset, j.shots) for j in jobs] == [("dtd", None)]


def test_plan_transfer_targets() -> None:
    (dg,) = plan_jobs("domain-gen", method="zeroshot", seeds=[1])
    assert dg.dataset == "imagenet"
    assert dg.targets == DOMAIN_TARGETS
    (cross,) = plan_jobs("cross-dataset", method="zeroshot", datasets=["imagenet", "dtd"])
    assert cross.targets == ("dtd",)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"protocol": "base-to-novel", "method": "linear-probe", "datasets": ["dtd"]}, "retarget"),
        (
            {"protocol": "few-shot", "method": "linear-probe", "datasets": ["imagenet_a"]},
            "test-only",
        ),
        ({"protocol": "few-shot", "method": "linear-probe", "datasets": []}, "needs --datasets"),
        (
            {"protocol": "few-shot", "method": "linear-probe", "datasets": ["dtd"], "shots": [0]},
            ">= 1",
        ),
        ({"protocol": "zero-to-hero", "method": "zeroshot"}, "unknown protocol"),
    ],
)
def test_plan_refuses_bad_requests(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_jobs(**kwargs)


# ---------------------------------------------------------------------------- tasks
def test_task_few_shot_and_base_new(data_root: Path) -> None:
    task = load_suite_task("oxford_pets", data_root, shots=2, seed=1)
    assert len(task.train) == 12
    assert task.val is not None
    assert len(task.val) == 12
    assert all("_" not in name for name in task.classnames)  # prompt-ready names
    base = load_suite_task("oxford_pets", data_root, shots=2, seed=1, subsample="base")
    new = load_suite_task("oxford_pets", data_root, shots=2, seed=1, subsample="new")
    assert base.classnames + new.classnames == task.classnames
    assert {label for _, label in (new.test[i] for i in range(len(new.test)))} == {0, 1, 2}
    with pytest.raises(DatasetError, match="test-only"):
        load_suite_task("imagenet_a", data_root, shots=1)


def test_data_split_json_matches_reference_sampler(data_root: Path, run_cli) -> None:
    res = run_cli("data", "split", "--dataset", "oxford_pets", "--data-root", data_root,
                  "--shots", "2", "--seed", "2", "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    spec = get_suite("oxford_pets")
    split = json.loads((spec.path(data_root) / spec.split_file).read_text())
    random.seed(2)
    expected = []
    for name in ("train", "val"):
        tracker: dict[int, list] = defaultdict(list)
        for item in split[name]:
            tracker[item[1]].append(item)
        k = 2 if name == "train" else min(2, 4)
        picked = []
        for items in tracker.values():
            picked += random.sample(items, k) if len(items) >= k else items
        expected.append([f"images/{p}" for p, _, _ in picked])
    assert [d["path"] for d in out["train"]] == expected[0]
    assert [d["path"] for d in out["val"]] == expected[1]
    assert (spec.path(data_root) / "split_fewshot" / "shot_2-seed_2.json").is_file()


# ---------------------------------------------------------------------------- end to end
def test_few_shot_protocol_end_to_end_and_resume(data_root: Path, tmp_path: Path, run_cli) -> None:
    out = tmp_path / "fs"
    args = ["protocol", "few-shot", "--method", "linear-probe", *TINY,
            "--data-root", data_root, "--datasets", "oxford_pets,dtd", "--shots", "1,2",
            "--seeds", "1,2", "--out", out, "--set", "optim.epochs=1",
            "--feature-cache", tmp_path / "cache"]  # fmt: skip
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("finished  ") == 8
    table = (out / "table.md").read_text()
    assert "| OxfordPets |" in table
    assert "| DTD |" in table
    assert "**Average**" in table
    assert "1 shot" in table
    assert "2 shots" in table
    results = json.loads((out / "results.json").read_text())
    assert len(results["records"]) == 8
    accs = [r["metrics"]["accuracy"] for r in results["records"]]
    assert all(0.0 <= a <= 1.0 for a in accs)
    assert (out / "few_shot.png").is_file()
    assert (out / "table.csv").is_file()
    # Second run: everything is done already.
    again = run_cli(*args)
    assert again.returncode == 0
    assert again.stderr.count("skipped (done)") == 8
    # One lost result: only that job runs again, with the same number.
    lost = out / "jobs" / "dtd" / "shots_2" / "seed_1" / "result.json"
    before = json.loads(lost.read_text())["metrics"]["accuracy"]
    lost.unlink()
    third = run_cli(*args)
    assert third.returncode == 0
    assert third.stderr.count("finished  ") == 1
    assert "dtd/shots_2/seed_1" in third.stderr
    assert json.loads(lost.read_text())["metrics"]["accuracy"] == pytest.approx(before)
    # Dry run lists done and pending jobs.
    dry = run_cli(*args, "--dry-run")
    assert dry.stdout.count("done  ") == 8
    # A different configuration in the same folder is refused, not mixed in.
    other = run_cli(*args[:-2], "--set", "optim.lr=0.5")
    assert other.returncode == 1
    assert "different run" in other.stderr


def test_base_to_novel_zero_shot(data_root: Path, tmp_path: Path, run_cli) -> None:
    out = tmp_path / "b2n"
    res = run_cli("protocol", "base-to-novel", "--method", "zeroshot", *TINY,
                  "--data-root", data_root, "--datasets", "dtd,eurosat", "--out", out,
                  "--no-feature-cache", "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert set(data) == {"dtd", "eurosat", "average"}
    cell = data["dtd"]["zero-shot"]
    assert set(cell) == {"base", "new", "hm"}
    record = json.loads((out / "jobs" / "dtd" / "shots_0" / "seed_1" / "result.json").read_text())
    m = record["metrics"]
    assert m["hm"] == pytest.approx(2 * m["base"] * m["new"] / (m["base"] + m["new"] or 1))
    table = (out / "table.md").read_text()
    assert "| Base | Novel | HM |" in table.replace("Dataset | ", "")


def test_domain_generalization_zero_shot(data_root: Path, tmp_path: Path, run_cli) -> None:
    out = tmp_path / "dg"
    res = run_cli("protocol", "domain-gen", "--method", "zeroshot", *TINY,
                  "--data-root", data_root, "--out", out, "--no-feature-cache")  # fmt: skip
    assert res.returncode == 0, res.stderr
    table = (out / "table.md").read_text()
    for title in ("ImageNetV2", "ImageNet-Sketch", "ImageNet-A", "ImageNet-R", "Average"):
        assert title in table
    record = json.loads((out / "results.json").read_text())["records"][0]
    assert set(record["metrics"]["targets"]) == set(DOMAIN_TARGETS)


def test_protocol_errors_are_one_line(data_root: Path, tmp_path: Path, run_cli) -> None:
    res = run_cli("protocol", "base-to-novel", "--method", "linear-probe", *TINY,
                  "--data-root", data_root, "--datasets", "dtd",
                  "--out", tmp_path / "x")  # fmt: skip
    assert res.returncode == 1
    assert res.stderr.startswith("vprompt: error:")
    assert "retarget" in res.stderr
    missing = run_cli("protocol", "few-shot", "--method", "linear-probe", *TINY,
                      "--data-root", tmp_path / "nowhere", "--datasets", "dtd",
                      "--out", tmp_path / "y")  # fmt: skip
    assert missing.returncode == 1
    assert "vprompt data check" in missing.stderr


def test_train_and_eval_on_a_benchmark_dataset(data_root: Path, tmp_path: Path, run_cli) -> None:
    out, cache = tmp_path / "run", tmp_path / "cache"
    res = run_cli("train", "--method", "linear-probe", *TINY, "--data", "OxfordPets",
                  "--data-root", data_root, "--shots", "2", "--seed", "1", "--out", out,
                  "--set", "optim.epochs=2", "--feature-cache", cache, "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["shots"] == 2
    assert report["test_images"] == 12  # the fixture's full test split, 6 classes x 2
    assert list(cache.rglob("features.bin")), "linear-probe features were not cached"
    run = json.loads((out / "config.json").read_text())
    assert run["data"]["train"] == 12  # 2 shots x 6 classes
    ev = run_cli("eval", "--pack", out / "prompt.safetensors", "--data", "oxford_pets",
                 "--data-root", data_root, "--feature-cache", cache, "--json")  # fmt: skip
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["accuracy"] == pytest.approx(report["test_accuracy"])


def _dotted(config: Any, prefix: str = "") -> tuple[str, ...]:
    """Nested config overrides as ``--set`` items (``optim.batch_size=4``)."""
    items: tuple[str, ...] = ()
    for key, value in config.items():
        if isinstance(value, dict):
            items += _dotted(value, f"{prefix}{key}.")
        else:
            items += (f"{prefix}{key}={json.dumps(value)}",)
    return items


@pytest.mark.parametrize("method", METHODS.names())
def test_few_shot_protocol_runs_every_registered_method(
    method: str, data_root: Path, tmp_path: Path
) -> None:
    """Contract: any registered method yields a paper-style few-shot table on a CLIP backbone."""
    from vprompt.engine.protocol import ProtocolRun, run_protocol

    cls = METHODS.get(method)
    # The method's first tiny example (e.g. prompt depths that fit clip:tiny), then one epoch.
    examples = [e for e in cls.examples() if e.backbone == "clip:tiny"]
    overrides = _dotted(examples[0].config) if examples else ()
    if cls.capabilities.trains and cls.Config().optim.epochs > 0:
        overrides += ("optim.epochs=1", "optim.warmup_epochs=0", "optim.batch_size=8")
    run = ProtocolRun(
        protocol="few-shot",
        method=method,
        model="clip:tiny",
        weights="none",
        data_root=data_root,
        out_dir=tmp_path / method,
        overrides=overrides,
        feature_cache=tmp_path / "cache",
        progress=False,
    )
    jobs = plan_jobs("few-shot", method=method, datasets=["dtd"], shots=[1], seeds=[1])
    if method == "mapping-only":  # on CLIP it would be zero-shot: refused with a pointer
        with pytest.raises(ConfigError, match="use --method zeroshot"):
            run_protocol(run, jobs)
        return
    summary = run_protocol(run, jobs)
    (record,) = summary["records"]
    assert 0.0 <= record["metrics"]["accuracy"] <= 1.0
    assert "| DTD |" in (tmp_path / method / "table.md").read_text()


def test_base_to_novel_with_coop_through_the_cli(data_root: Path, tmp_path: Path, run_cli) -> None:
    out = tmp_path / "coop-b2n"
    res = run_cli("protocol", "base-to-novel", "--method", "coop", *TINY,
                  "--data-root", data_root, "--datasets", "dtd", "--shots", "2", "--seeds", "1",
                  "--set", "n_ctx=4", "--set", "optim.epochs=2", "--set", "optim.batch_size=4",
                  "--set", "augment=false", "--out", out, "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    cell = json.loads(res.stdout)["dtd"]["2 shots"]
    assert set(cell) == {"base", "new", "hm"}
    record = json.loads((out / "jobs" / "dtd" / "shots_2" / "seed_1" / "result.json").read_text())
    assert record["train"]["epochs"] == 2
    assert record["train"]["train_images"] == 6  # 2 shots x 3 base classes (of 5)
    assert (out / "jobs" / "dtd" / "shots_2" / "seed_1" / "train" / "prompt.safetensors").is_file()


@pytest.mark.parametrize("protocol", ["few-shot", "base-to-novel"])
def test_tables_list_each_dataset_once(protocol: str, data_root: Path, tmp_path: Path) -> None:
    """The runner's own dataset order (paper order, then the rest) must not repeat a dataset:
    every paper dataset is also a registered one."""
    from vprompt.engine.protocol import ProtocolRun, run_protocol

    run = ProtocolRun(
        protocol=protocol,  # type: ignore[arg-type]
        method="zeroshot",
        model="clip:tiny",
        weights="none",
        data_root=data_root,
        out_dir=tmp_path,
        progress=False,
    )
    jobs = plan_jobs(protocol, method="zeroshot", datasets=["dtd", "eurosat"])  # type: ignore[arg-type]
    summary = run_protocol(run, jobs)
    table = (tmp_path / "table.md").read_text()
    for title in ("DTD", "EuroSAT"):
        assert table.count(f"| {title} |") == 1, table
    assert set(summary["table"]) >= {"dtd", "eurosat"}
    csv_rows = (tmp_path / "table.csv").read_text().splitlines()
    assert sum(line.startswith("DTD,") for line in csv_rows) == 1


def test_a_job_folder_of_another_run_is_refused_or_rerun_with_overwrite(tmp_path: Path) -> None:
    from vprompt.engine.protocol import RESULT_FILE, Job, _finished

    job = Job("few-shot", "dtd", 2, 1)
    mine, theirs = {"method": "coop", "config": {"n_ctx": 16}}, {"method": "coop", "config": {}}
    folder = tmp_path / job.key
    folder.mkdir(parents=True)
    result = folder / RESULT_FILE
    assert _finished(folder, job, mine) is None  # nothing there yet
    result.write_text(json.dumps({"job": job.to_dict(), "identity": mine, "metrics": {}}))
    assert _finished(folder, job, mine, overwrite=True) is not None  # this run's: kept
    result.write_text(json.dumps({"job": job.to_dict(), "identity": theirs, "metrics": {}}))
    with pytest.raises(ConfigError, match=r"different run.*--overwrite"):
        _finished(folder, job, mine)
    assert result.is_file()
    assert _finished(folder, job, mine, overwrite=True) is None
    assert not result.exists()  # the other run's result is gone; the job runs again
    result.write_text("[1, 2]")  # valid JSON, not a record: run the job again
    assert _finished(folder, job, mine) is None


def test_dry_run_reports_missing_data(run_cli, tmp_path: Path) -> None:
    from vprompt.data.suite.synthetic import write_fake_dataset

    root = tmp_path / "root"
    write_fake_dataset("dtd", root, num_classes=2, images_per_class=(1, 1, 1))
    dry = run_cli("protocol", "few-shot", "--method", "coop", *TINY, "--data-root", root,
                  "--datasets", "dtd,eurosat", "--shots", "1", "--seeds", "1",
                  "--out", tmp_path / "out", "--dry-run")  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.strip().splitlines()
    assert lines[0].startswith("todo  dtd/shots_1/seed_1")
    assert lines[1].startswith("missing data  eurosat/shots_1/seed_1  (EuroSAT: ")
    assert "vprompt data check --dataset eurosat" in lines[1]
