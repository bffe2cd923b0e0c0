"""``vprompt data prepare``: original archives → the layout the readers expect, safely.

The archives are tiny fakes with the real member layout of each dataset's original download
(``images.tar.gz`` holding ``images/abyssinian_1.jpg`` …), built in a temporary folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from archive_helpers import jpeg, write_tar, write_zip
from vprompt.data.check import COOP_DATASETS_MD, HOMEPAGES
from vprompt.data.items import Datum
from vprompt.data.prepare import imagenet_classnames, prepare_dataset
from vprompt.data.suite import SuiteSplits, get_suite, write_split_file
from vprompt.data.suite.synthetic import write_fake_dataset
from vprompt.errors import DatasetError

# --------------------------------------------------------------------------- archive builders


# --------------------------------------------------------------------------- datasets


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


def split_of(name: str, classes: list[str], files: dict[str, list[str]]) -> SuiteSplits:
    """Splits whose items are ``files[split]`` ("<class index>:<path under image_dir>")."""
    image_dir = get_suite(name).image_dir.strip("/")

    def items(split: str) -> list[Datum]:
        out = []
        for entry in files[split]:
            label, _, path = entry.partition(":")
            full = f"{image_dir}/{path}" if image_dir else path
            out.append(Datum(full, int(label), classes[int(label)]))
        return out

    return SuiteSplits(items("train"), items("val"), items("test"), classes)


def write_split(name: str, down: Path, splits: SuiteSplits) -> None:
    spec = get_suite(name)
    assert spec.split_file is not None
    write_split_file(down / spec.split_file, splits, spec.image_dir)


def same_items(a: SuiteSplits, b: SuiteSplits) -> bool:
    return (a.train, a.val, a.test, a.classnames) == (b.train, b.val, b.test, b.classnames)


def assert_prepared(res, name: str) -> None:
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    assert f"{name}: ok" in res.stdout, res.stdout
    assert "error:" not in res.stdout


# OxfordPets: images.tar.gz → images/<breed>_<n>.jpg; annotations.tar.gz → annotations/…
PETS = ["abyssinian", "american_bulldog", "yorkshire_terrier"]


def pets_downloads(down: Path) -> SuiteSplits:
    write_tar(
        down / "images.tar.gz",
        {f"images/{c}_{i}.jpg": jpeg(10 * k + i) for k, c in enumerate(PETS) for i in (1, 2, 3)},
    )
    write_tar(
        down / "annotations.tar.gz",
        {
            "annotations/list.txt": b"#Image CLASS-ID SPECIES BREED ID\n",
            "annotations/trimaps/abyssinian_1.png": b"png",
        },
    )
    splits = split_of(
        "oxford_pets",
        PETS,
        {
            split: [f"{k}:{c}_{i}.jpg" for k, c in enumerate(PETS)]
            for split, i in (("train", 1), ("val", 2), ("test", 3))
        },
    )
    write_split("oxford_pets", down, splits)
    return splits


def test_pets_prepare_then_read_and_rerun_is_idempotent(run_cli, tmp_path):
    down, root = tmp_path / "downloads", tmp_path / "data"
    expected = pets_downloads(down)
    res = run_cli(
        "data", "prepare", "--dataset", "oxford_pets", "--data-root", root, "--from", down
    )
    assert_prepared(res, "oxford_pets")
    assert "extracted images.tar.gz" in res.stdout
    spec = get_suite("oxford_pets")
    folder = spec.path(root)
    assert same_items(spec.load(root), expected)
    assert (folder / "annotations" / "list.txt").is_file()
    assert [p.name for p in root.iterdir()] == [spec.folder]  # no staging left behind
    assert (down / "images.tar.gz").is_file()  # kept by default
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}

    again = run_cli(
        "data", "prepare", "--dataset", "oxford_pets", "--data-root", root, "--from", down
    )
    assert_prepared(again, "oxford_pets")
    assert "already prepared" in again.stdout
    assert "extracted" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before


def test_missing_archive_lists_accepted_names_and_download_page(run_cli, tmp_path):
    down, root = tmp_path / "downloads", tmp_path / "data"
    pets_downloads(down)
    (down / "images.tar.gz").unlink()
    res = run_cli(
        "data", "prepare", "--dataset", "oxford_pets", "--data-root", root, "--from", down
    )
    clean_error(res, contains=("images.tar.gz or images.tgz", HOMEPAGES["oxford_pets"], str(down)))
    assert not root.exists() or list(root.iterdir()) == []


def test_inputs_the_reader_never_opens_are_optional(tmp_path):
    down, root = tmp_path / "downloads", tmp_path / "data"
    pets_downloads(down)
    (down / "annotations.tar.gz").unlink()  # CoOp's layout has it; the split file suffices
    spec = get_suite("oxford_pets")
    report = prepare_dataset(spec, root, down)
    assert report.notes == []
    assert report.check is not None
    assert report.check.ok
    assert not (spec.path(root) / "annotations").exists()
    # It is added when it turns up later.
    pets_downloads(down)
    report = prepare_dataset(spec, root, down)
    assert report.actions == [f"extracted annotations.tar.gz → {spec.path(root) / 'annotations'}"]


def test_traversal_member_is_refused_and_nothing_is_written(run_cli, tmp_path):
    down, root = tmp_path / "downloads", tmp_path / "data"
    pets_downloads(down)
    write_tar(down / "images.tar.gz", {"images/abyssinian_1.jpg": jpeg(1), "../evil": b"x"})
    res = run_cli(
        "data", "prepare", "--dataset", "oxford_pets", "--data-root", root, "--from", down
    )
    clean_error(res, contains=("images.tar.gz", "refusing to extract member '../evil'"))
    assert not (tmp_path / "evil").exists()
    assert not (root.parent / "evil").exists()
    assert list(root.iterdir()) == []  # neither the dataset nor the staging folder


def test_missing_split_file_is_a_note_not_a_failure(tmp_path):
    down, root = tmp_path / "downloads", tmp_path / "data"
    pets_downloads(down)
    spec = get_suite("oxford_pets")
    assert spec.split_file is not None
    (down / spec.split_file).unlink()
    report = prepare_dataset(spec, root, down)
    assert (spec.path(root) / "images" / "abyssinian_1.jpg").is_file()
    (note,) = report.notes
    assert spec.split_file in note
    assert COOP_DATASETS_MD in note
    assert report.check is not None
    assert [p.what for p in report.check.errors] == [
        f"split file {spec.path(root) / spec.split_file} is missing"
    ]
    # Once the user downloads it, a second run adds just that file.
    write_split("oxford_pets", down, pets_downloads(tmp_path / "again"))
    report = prepare_dataset(spec, root, down)
    assert report.notes == []
    assert report.actions == [
        f"copied {down / spec.split_file} → {spec.path(root) / spec.split_file}"
    ]
    assert report.check is not None
    assert report.check.ok


# EuroSAT: EuroSAT.zip → 2750/<Class>/<Class>_<n>.jpg
def test_eurosat_zip(run_cli, tmp_path):
    down, root = tmp_path / "downloads", tmp_path / "data"
    folders = ["AnnualCrop", "Forest"]
    write_zip(
        down / "EuroSAT.zip",
        {
            f"2750/{c}/{c}_{i}.jpg": jpeg(5 * k + i)
            for k, c in enumerate(folders)
            for i in (1, 2, 3)
        },
    )
    expected = split_of(
        "eurosat",
        ["Annual Crop Land", "Forest"],
        {
            split: [f"{k}:{c}/{c}_{i}.jpg" for k, c in enumerate(folders)]
            for split, i in (("train", 1), ("val", 2), ("test", 3))
        },
    )
    write_split("eurosat", down, expected)
    res = run_cli("data", "prepare", "--dataset", "eurosat", "--data-root", root, "--from", down)
    assert_prepared(res, "eurosat")
    assert same_items(get_suite("eurosat").load(root), expected)


# FGVCAircraft: fgvc-aircraft-2013b.tar.gz; its fgvc-aircraft-2013b/data/ becomes the folder.
def test_aircraft_tarball_data_folder_becomes_the_dataset(run_cli, tmp_path):
    down, root = tmp_path / "downloads", tmp_path / "data"
    variants = ["707-320", "A300B4", "Cessna 172"]
    ids = {
        split: [f"{base + k:07d}" for k in range(3)]
        for split, base in (("train", 1000), ("val", 2000), ("test", 3000))
    }
    data = "fgvc-aircraft-2013b/data"
    members = {f"{data}/variants.txt": "".join(f"{v}\n" for v in variants).encode()}
    for split, names in ids.items():
        members[f"{data}/images_variant_{split}.txt"] = "".join(
            f"{n} {v}\n" for n, v in zip(names, variants, strict=True)
        ).encode()
        members.update({f"{data}/images/{n}.jpg": jpeg(int(n)) for n in names})
    members["fgvc-aircraft-2013b/README.html"] = b"<html/>"
    members["fgvc-aircraft-2013b/evaluation.m"] = b"%"
    write_tar(down / "fgvc-aircraft-2013b.tar.gz", members)
    res = run_cli(
        "data", "prepare", "--dataset", "fgvc_aircraft", "--data-root", root, "--from", down
    )
    assert_prepared(res, "fgvc_aircraft")
    spec = get_suite("fgvc_aircraft")
    assert not (spec.path(root) / "README.html").exists()
    splits = spec.load(root)
    assert splits.classnames == variants
    assert [Path(d.path).stem for d in splits.test] == ids["test"]
    assert [d.classname for d in splits.train] == variants


# Caltech101: caltech-101.zip holds caltech-101/101_ObjectCategories.tar.gz.
def test_caltech_nested_archive_and_remove_archives(run_cli, tmp_path):
    down, root = tmp_path / "downloads", tmp_path / "data"
    folders = ["accordion", "airplanes", "BACKGROUND_Google"]
    inner = write_tar(
        tmp_path / "build" / "101_ObjectCategories.tar.gz",
        {
            f"101_ObjectCategories/{c}/image_{i:04d}.jpg": jpeg(7 * k + i)
            for k, c in enumerate(folders)
            for i in (1, 2, 3)
        },
    )
    write_zip(
        down / "caltech-101.zip",
        {
            "caltech-101/101_ObjectCategories.tar.gz": inner.read_bytes(),
            "caltech-101/Annotations.tar": b"not needed",
            "__MACOSX/caltech-101/._101_ObjectCategories.tar.gz": b"junk",
        },
    )
    expected = split_of(
        "caltech101",
        ["accordion", "airplane"],
        {
            split: [f"{k}:{c}/image_{i:04d}.jpg" for k, c in enumerate(folders[:2])]
            for split, i in (("train", 1), ("val", 2), ("test", 3))
        },
    )
    write_split("caltech101", down, expected)
    res = run_cli(
        "data",
        "prepare",
        "--dataset",
        "caltech101",
        "--data-root",
        root,
        "--from",
        down,
        "--remove-archives",
    )
    assert_prepared(res, "caltech101")
    assert same_items(get_suite("caltech101").load(root), expected)
    assert not (down / "caltech-101.zip").exists()
    assert f"removed {down / 'caltech-101.zip'}" in res.stdout
    assert (down / get_suite("caltech101").split_file).is_file()  # plain files are copied


def test_json_output(run_cli, tmp_path):
    down, root = tmp_path / "downloads", tmp_path / "data"
    pets_downloads(down)
    res = run_cli(
        "data", "prepare", "--dataset", "pets", "--data-root", root, "--from", down, "--json"
    )
    assert res.returncode == 0, res.stderr
    (payload,) = res.json_lines()
    assert payload["dataset"] == "oxford_pets"
    assert payload["already_prepared"] is False
    assert payload["check"]["ok"] is True
    assert len(payload["actions"]) == 3  # images, annotations, split file


# ImageNet: extracted train/ and val/ class folders are linked; classnames.txt from CLIP's names.
def test_imagenet_classnames_from_clip_names(tmp_path):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    train = tmp_path / "train"
    wnids = [f"n{1440764 + 7 * i:08d}" for i in range(1000)]
    for w in reversed(wnids):
        (train / w).mkdir(parents=True)
    lines = imagenet_classnames(train).splitlines()
    assert len(lines) == 1000
    assert lines[0] == f"{wnids[0]} {IMAGENET_CLASSNAMES[0]}"
    assert lines[-1] == f"{wnids[-1]} {IMAGENET_CLASSNAMES[-1]}"
    (train / wnids[3]).rmdir()
    with pytest.raises(DatasetError, match="found 999"):
        imagenet_classnames(train)


def test_imagenet_folders_are_linked_and_flat_val_refused(tmp_path):
    fake, down, root = tmp_path / "fake", tmp_path / "downloads", tmp_path / "data"
    write_fake_dataset("imagenet", fake)
    spec = get_suite("imagenet")
    images = spec.path(fake) / spec.image_dir
    down.mkdir()
    shutil.copytree(images / "val", down / "val")
    flat = tmp_path / "flat"
    shutil.copytree(images / "train", flat)
    # The raw ILSVRC validation set is one flat folder: refused with what to do.
    (down / "train").symlink_to(flat)
    for f in list((down / "val").rglob("*.*")):
        f.rename(down / "val" / f.name)
    for d in sorted((down / "val").iterdir()):
        if d.is_dir():
            d.rmdir()
    with pytest.raises(DatasetError, match="one sub-folder per class"):
        prepare_dataset(spec, root, down)
    assert not spec.path(root).exists()
    # Class-folder form works; the folders are linked, not copied.
    shutil.rmtree(down / "val")
    shutil.copytree(images / "val", down / "val")
    shutil.copy(spec.path(fake) / "classnames.txt", down / "classnames.txt")
    report = prepare_dataset(spec, root, down)
    assert report.check is not None
    assert report.check.ok, report.check.lines()
    assert (spec.path(root) / spec.image_dir / "val").is_symlink()
    assert same_items(spec.load(root), spec.load(fake))


def test_imagenet_remove_archives_moves_the_folders(tmp_path):
    fake, down, root = tmp_path / "fake", tmp_path / "downloads", tmp_path / "data"
    write_fake_dataset("imagenet", fake)
    spec = get_suite("imagenet")
    images = spec.path(fake) / spec.image_dir
    down.mkdir()
    for split in ("train", "val"):
        shutil.copytree(images / split, down / split)
    shutil.copy(spec.path(fake) / "classnames.txt", down / "classnames.txt")
    report = prepare_dataset(spec, root, down, keep_archives=False)
    assert report.check is not None
    assert report.check.ok, report.check.lines()
    for split in ("train", "val"):
        moved = spec.path(root) / spec.image_dir / split
        assert moved.is_dir()
        assert not moved.is_symlink()
        assert not (down / split).exists()
    assert (down / "classnames.txt").is_file()
    assert same_items(spec.load(root), spec.load(fake))


def test_adds_into_a_dataset_folder_that_is_a_symlink(tmp_path):
    down, root, elsewhere = tmp_path / "downloads", tmp_path / "data", tmp_path / "big_disk"
    pets_downloads(down)
    annotations = down / "annotations.tar.gz"
    annotations.rename(tmp_path / "later.tar.gz")
    spec = get_suite("oxford_pets")
    prepare_dataset(spec, root, down)
    # The user moves the dataset to another disk and links it back.
    elsewhere.mkdir()
    spec.path(root).rename(elsewhere / "pets")
    spec.path(root).symlink_to(elsewhere / "pets", target_is_directory=True)
    (tmp_path / "later.tar.gz").rename(annotations)
    report = prepare_dataset(spec, root, down)
    assert report.actions == [f"extracted annotations.tar.gz → {spec.path(root) / 'annotations'}"]
    assert (elsewhere / "pets" / "annotations" / "list.txt").is_file()
    assert spec.path(root).is_symlink()
    assert sorted(p.name for p in (elsewhere / "pets").iterdir()) == sorted(
        ["annotations", "images", spec.split_file]
    )
