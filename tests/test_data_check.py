"""``vprompt data check``: every registered dataset's install, verified with a fix per problem.

Runs on the synthetic fixtures (tiny fake copies of each dataset's real layout), which are
smaller than the published datasets: healthy fixtures give count warnings only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vprompt.data.check import COOP_DATASETS_MD, check_dataset
from vprompt.data.suite import SUITE, get_suite
from vprompt.data.suite.synthetic import write_fake_dataset

ALL = sorted(SUITE.names())


def clean_error(res, *, contains: tuple[str, ...] = ()) -> str:
    """Exit 1, exactly one ``vprompt: error: …`` line on stderr and no traceback."""
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("vprompt: error: "), res.stderr
    for needle in contains:
        assert needle in lines[0], lines[0]
    return lines[0]


def problem_lines(stdout: str, severity: str) -> list[str]:
    return [ln.strip() for ln in stdout.splitlines() if ln.strip().startswith(f"{severity}:")]


@pytest.fixture
def pets_root(tmp_path) -> Path:
    root = tmp_path / "data"
    write_fake_dataset("oxford_pets", root)
    return root


def split_path(root: Path, name: str = "oxford_pets") -> Path:
    spec = get_suite(name)
    assert spec.split_file is not None
    return spec.path(root) / spec.split_file


# --------------------------------------------------------------------------- Python API


@pytest.mark.parametrize("name", ALL)
def test_every_fixture_is_healthy_with_count_warnings_only(tmp_path, name):
    spec = get_suite(name)
    write_fake_dataset(name, tmp_path)
    report = check_dataset(spec, tmp_path, check_images=True)
    assert report.errors == [], report.lines()
    assert report.ok
    assert report.decoded
    splits = spec.load(tmp_path)
    assert report.found is not None
    assert (report.found.train, report.found.val, report.found.test) == (
        len(splits.train),
        len(splits.val),
        len(splits.test),
    )
    assert report.found.classes == len(splits.classnames)
    assert report.images_checked == len({d.path for d in splits.train + splits.val + splits.test})
    # Fixtures are smaller than the published datasets: one warning names the sizes that differ.
    (warning,) = report.warnings
    assert warning.what.startswith(f"sizes differ from the published {spec.title}: ")
    if report.found.test != spec.counts.test:
        assert f"test {report.found.test} (published {spec.counts.test})" in warning.what


def test_missing_folder_points_to_prepare(tmp_path):
    report = check_dataset(get_suite("dtd"), tmp_path)
    assert not report.ok
    (problem,) = report.problems
    assert str(tmp_path / get_suite("dtd").folder) in problem.what
    assert "vprompt data prepare --dataset dtd" in problem.fix


def test_wrong_label_range_in_test_split(pets_root):
    path = split_path(pets_root)
    data = json.loads(path.read_text())
    num_classes = len({entry[1] for entry in data["train"]})
    data["test"][0][1] = num_classes + 4
    path.write_text(json.dumps(data))
    report = check_dataset(get_suite("oxford_pets"), pets_root, check_images=False)
    assert not report.ok
    (error,) = report.errors
    assert f"outside 0..{num_classes - 1}" in error.what
    assert data["test"][0][0] in error.what


def test_label_gap_in_train_split_is_an_error(pets_root):
    path = split_path(pets_root)
    data = json.loads(path.read_text())
    last = max(entry[1] for entry in data["train"])
    for entry in data["train"]:
        if entry[1] == last:
            entry[1] = last + 3
    path.write_text(json.dumps(data))
    report = check_dataset(get_suite("oxford_pets"), pets_root, check_images=False)
    assert not report.ok
    assert any("labels must be 0.." in p.what for p in report.errors), report.lines()


def test_label_with_two_names_is_an_error(pets_root):
    path = split_path(pets_root)
    data = json.loads(path.read_text())
    data["val"][0][2] = "not_a_pet"
    path.write_text(json.dumps(data))
    report = check_dataset(get_suite("oxford_pets"), pets_root, check_images=False)
    assert [p.severity for p in report.problems].count("error") == 1
    assert "'not_a_pet'" in report.errors[0].what


@pytest.mark.parametrize(
    ("name", "aux"), [("fgvc_aircraft", "variants.txt"), ("imagenet_r", "classnames.txt")]
)
def test_missing_aux_file_is_an_error(tmp_path, name, aux):
    spec = get_suite(name)
    write_fake_dataset(name, tmp_path)
    (spec.path(tmp_path) / aux).unlink()
    report = check_dataset(spec, tmp_path)
    assert not report.ok
    assert any(aux in p.what and "vprompt data prepare" in p.fix for p in report.errors)


# --------------------------------------------------------------------------- the CLI


def test_cli_healthy_fixture_exits_0_with_count_warnings(run_cli, pets_root):
    res = run_cli("data", "check", "--dataset", "oxford_pets", "--data-root", pets_root)
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == ""
    assert res.stdout.startswith("oxford_pets: ok")
    assert problem_lines(res.stdout, "error") == []
    (warning,) = problem_lines(res.stdout, "warning")
    assert "published OxfordPets" in warning
    train = len(get_suite("oxford_pets").load(pets_root).train)
    assert f"train {train} (published 2944)" in warning
    assert "fix:" in warning


def test_cli_json_report_parses(run_cli, pets_root):
    res = run_cli(
        "data", "check", "--dataset", "oxford_pets,dtd", "--data-root", pets_root, "--json"
    )
    assert res.returncode == 1, res.stderr  # dtd is not installed
    (payload,) = res.json_lines()
    assert payload["ok"] is False
    pets, dtd = payload["datasets"]
    assert pets["dataset"] == "oxford_pets"
    assert pets["ok"] is True
    assert pets["errors"] == 0
    assert {p["severity"] for p in pets["problems"]} == {"warning"}
    assert set(pets["found"]) == {"classes", "train", "val", "test"}
    assert set(pets["problems"][0]) == {"severity", "what", "fix"}
    assert dtd["ok"] is False
    assert dtd["found"] is None
    clean_error(res, contains=("dtd",))


def test_cli_missing_split_file_gives_the_download_hint(run_cli, pets_root):
    split = split_path(pets_root)
    split.unlink()
    res = run_cli("data", "check", "--dataset", "oxford_pets", "--data-root", pets_root)
    clean_error(res, contains=("oxford_pets",))
    (error,) = problem_lines(res.stdout, "error")
    assert str(split) in error
    assert COOP_DATASETS_MD in error
    assert "place it at" in error


def test_cli_missing_image_is_named(run_cli, pets_root):
    splits = get_suite("oxford_pets").load(pets_root)
    victim = splits.test[1].path
    (get_suite("oxford_pets").path(pets_root) / victim).unlink()
    res = run_cli("data", "check", "--dataset", "oxford_pets", "--data-root", pets_root)
    clean_error(res)
    (error,) = problem_lines(res.stdout, "error")
    assert "1 of" in error
    assert victim in error


def test_cli_corrupt_image_needs_images_flag(run_cli, pets_root):
    spec = get_suite("oxford_pets")
    victim = spec.load(pets_root).train[0].path
    image = spec.path(pets_root) / victim
    Image.open(image).verify()  # a real image before we break it
    image.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    quick = run_cli("data", "check", "--dataset", "oxford_pets", "--data-root", pets_root)
    assert quick.returncode == 0, quick.stdout  # existence only
    res = run_cli("data", "check", "--dataset", "oxford_pets", "--data-root", pets_root, "--images")
    clean_error(res)
    (error,) = problem_lines(res.stdout, "error")
    assert "do not decode" in error
    assert Path(victim).name in error


def test_cli_unknown_dataset_suggests_a_name(run_cli, tmp_path):
    res = run_cli("data", "check", "--dataset", "oxford_pet", "--data-root", tmp_path)
    clean_error(res, contains=("unknown dataset 'oxford_pet'", "'oxford_pets'"))
    assert res.stdout == ""


def test_cli_all_checks_every_registered_dataset(run_cli, tmp_path):
    for name in ("eurosat", "ucf101"):
        write_fake_dataset(name, tmp_path)
    res = run_cli("data", "check", "--dataset", "all", "--data-root", tmp_path, "--json")
    (payload,) = res.json_lines()
    by_name = {r["dataset"]: r for r in payload["datasets"]}
    assert sorted(by_name) == ALL
    assert by_name["eurosat"]["ok"]
    assert by_name["ucf101"]["ok"]
    assert not by_name["imagenet"]["ok"]
    clean_error(res, contains=(f"{len(ALL) - 2} of {len(ALL)} dataset(s) have errors",))
