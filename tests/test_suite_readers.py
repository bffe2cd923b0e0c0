"""The CoOp-suite readers on synthetic copies of each dataset's real on-disk layout.

A contract test runs over every registered dataset; the specific tests pin the reference
behaviour that matters for reproducing CoOp (renames, label order, item order, subsets).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vprompt.data.items import ItemDataset, prompt_name
from vprompt.data.suite import SUITE, get_suite
from vprompt.data.suite.coop_split import (
    CALTECH_IGNORED,
    EUROSAT_RENAMES,
    sun397_classname,
    ucf101_classname,
)
from vprompt.data.suite.synthetic import write_fake_dataset, write_fake_suite
from vprompt.errors import DatasetError, UnknownNameError

ALL = SUITE.names()
PER_CLASS = (6, 3, 3)

# Published sizes: classes, train, val, test (CoOp's DATASETS.md / paper Table 7).
PUBLISHED = {
    "caltech101": (100, 4128, 1649, 2465),
    "oxford_pets": (37, 2944, 736, 3669),
    "stanford_cars": (196, 6509, 1635, 8041),
    "oxford_flowers": (102, 4093, 1633, 2463),
    "food101": (101, 50500, 20200, 30300),
    "sun397": (397, 15880, 3970, 19850),
    "dtd": (47, 2820, 1128, 1692),
    "eurosat": (10, 13500, 5400, 8100),
    "ucf101": (101, 7639, 1898, 3783),
    "fgvc_aircraft": (100, 3334, 3333, 3333),
    "imagenet": (1000, 1281167, 0, 50000),
    "imagenetv2": (1000, 0, 0, 10000),
    "imagenet_sketch": (1000, 0, 0, 50889),
    "imagenet_a": (200, 0, 0, 7500),
    "imagenet_r": (200, 0, 0, 30000),
}


def expected_sizes(name: str, classes: int) -> tuple[int, int, int]:
    spec = get_suite(name)
    train, val, test = (classes * k for k in PER_CLASS)
    if spec.eval_only:
        return 0, 0, test
    if name == "imagenet":
        return train, 0, test
    return train, val, test


def reference_order(folder: Path, name: str) -> dict[str, list[str]] | None:
    """Item paths in the order the dataset's own list files give them (None: folder-based)."""
    spec = get_suite(name)
    if spec.split_file is not None:
        data = json.loads((folder / spec.split_file).read_text())
        prefix = f"{spec.image_dir}/" if spec.image_dir else ""
        return {s: [prefix + e[0] for e in data[s]] for s in ("train", "val", "test")}
    if name == "fgvc_aircraft":
        return {
            s: [
                f"images/{line.split(' ', 1)[0]}.jpg"
                for line in (folder / f"images_variant_{s}.txt").read_text().splitlines()
            ]
            for s in ("train", "val", "test")
        }
    return None


# --------------------------------------------------------------------------- contract


def test_registry_holds_the_whole_suite_with_published_sizes():
    assert sorted(ALL) == sorted(PUBLISHED)
    for name, (c, tr, va, te) in PUBLISHED.items():
        counts = get_suite(name).counts
        assert (counts.classes, counts.train, counts.val, counts.test) == (c, tr, va, te), name


@pytest.mark.parametrize("name", ALL)
def test_reader_contract(tmp_path, name):
    spec = get_suite(name)
    folder = write_fake_dataset(name, tmp_path, images_per_class=PER_CLASS)
    assert folder == tmp_path / spec.folder
    splits = spec.load(tmp_path)
    classes = min(spec.counts.classes, 5)

    assert len(splits.classnames) == classes
    assert (len(splits.train), len(splits.val), len(splits.test)) == expected_sizes(name, classes)
    assert spec.template.count("{}") == 1
    if spec.eval_only:
        assert splits.train == []
        assert splits.val == []
    for split in (splits.train, splits.test):
        if split:
            assert sorted({d.label for d in split}) == list(range(classes))
    for d in [*splits.train, *splits.val, *splits.test]:
        assert splits.classnames[d.label] == d.classname, d
        assert "\\" not in d.path
        assert not d.path.startswith("/")
        assert ".." not in d.path.split("/")
        if spec.image_dir:
            assert d.path.startswith(f"{spec.image_dir}/"), d.path

    names = [prompt_name(n) for n in splits.classnames]
    for items in (splits.train, splits.val, splits.test):
        ds = ItemDataset(folder, items, names)
        for i in range(len(ds)):
            assert ds.path(i).is_file()
            image, label = ds[i]
            assert image.size == (16, 16)
            assert image.mode == "RGB"
            assert label == items[i].label

    order = reference_order(folder, name)
    if order is not None:
        assert [d.path for d in splits.train] == order["train"]
        assert [d.path for d in splits.val] == order["val"]
        assert [d.path for d in splits.test] == order["test"]
        # The fixture's lists are shuffled, so keeping file order is a real check.
        labels = [d.label for d in splits.train]
        assert labels != sorted(labels)
    else:
        # Folder-based readers: label order, then sorted file names within a class.
        for items in (splits.train, splits.test):
            keys = [(d.label, d.path.rsplit("/", 1)[1]) for d in items]
            assert keys == sorted(keys)


@pytest.mark.parametrize("name", ["dtd", "caltech101", "imagenet", "imagenet_r"])
def test_many_classes(tmp_path, name):
    write_fake_dataset(name, tmp_path, num_classes=40, images_per_class=(2, 1, 1))
    splits = get_suite(name).load(tmp_path)
    assert len(splits.classnames) == 40
    assert len(set(splits.classnames)) == 40
    assert sorted({d.label for d in splits.test}) == list(range(40))


# --------------------------------------------------------------------------- renames


def test_caltech_renames_and_ignored_folders(tmp_path):
    folder = write_fake_dataset("caltech101", tmp_path)
    splits = get_suite("caltech101").load(tmp_path)
    # Sorted folders (capitals first), renamed: Faces → face, airplanes → airplane.
    assert splits.classnames == ["face", "leopard", "motorbike", "accordion", "airplane"]
    faces = [d for d in splits.train if d.label == 0]
    assert faces
    assert all(d.path.startswith("101_ObjectCategories/Faces/") for d in faces)
    assert all(d.classname == "face" for d in faces)
    for ignored in CALTECH_IGNORED:
        assert any((folder / "101_ObjectCategories" / ignored).iterdir())
        everything = splits.train + splits.val + splits.test
        assert not any(f"/{ignored}/" in d.path for d in everything)


def test_eurosat_renames(tmp_path):
    write_fake_dataset("eurosat", tmp_path, num_classes=10, images_per_class=(1, 1, 1))
    splits = get_suite("eurosat").load(tmp_path)
    assert splits.classnames == [EUROSAT_RENAMES[k] for k in sorted(EUROSAT_RENAMES)]
    assert splits.classnames[0] == "Annual Crop Land"
    assert splits.classnames[-1] == "Sea or Lake"
    sea = [d for d in splits.test if d.classname == "Sea or Lake"]
    assert sea[0].path.startswith("2750/SeaLake/SeaLake_")


@pytest.mark.parametrize(
    ("action", "expected"),
    [("ApplyEyeMakeup", "Apply_Eye_Makeup"), ("YoYo", "Yo_Yo"), ("Archery", "Archery")],
)
def test_ucf101_classname(action, expected):
    assert ucf101_classname(action) == expected


def test_ucf101_folders_use_the_renamed_action(tmp_path):
    write_fake_dataset("ucf101", tmp_path)
    splits = get_suite("ucf101").load(tmp_path)
    assert splits.classnames[0] == "Apply_Eye_Makeup"
    item = next(d for d in splits.train if d.label == 0)
    assert item.path.startswith("UCF-101-midframes/Apply_Eye_Makeup/v_ApplyEyeMakeup_g")
    with pytest.raises(DatasetError, match="CamelCase"):
        ucf101_classname("lowercase")


@pytest.mark.parametrize(
    ("category", "expected"),
    [
        ("a/abbey", "abbey"),
        ("/a/airport_terminal", "airport_terminal"),
        ("b/bathroom/indoor", "indoor bathroom"),
        ("a/apartment_building/outdoor", "outdoor apartment_building"),
    ],
)
def test_sun397_classname(category, expected):
    assert sun397_classname(category) == expected


def test_sun397_bad_category():
    with pytest.raises(DatasetError, match="'abbey'"):
        sun397_classname("abbey")


def test_stanford_cars_paths_start_at_the_dataset_folder(tmp_path):
    folder = write_fake_dataset("stanford_cars", tmp_path)
    splits = get_suite("stanford_cars").load(tmp_path)
    assert all(d.path.startswith("cars_train/") for d in splits.train + splits.val)
    assert all(d.path.startswith("cars_test/") for d in splits.test)
    raw = json.loads((folder / "split_zhou_StanfordCars.json").read_text())
    assert raw["test"][0][0] == splits.test[0].path


# --------------------------------------------------------------------------- aircraft


def test_aircraft_labels_follow_variants_txt_order(tmp_path):
    folder = write_fake_dataset("fgvc_aircraft", tmp_path)
    variants = (folder / "variants.txt").read_text().splitlines()
    assert "F-16A/B" in variants
    assert "Cessna 172" in variants
    (folder / "variants.txt").write_text("\n".join(reversed(variants)) + "\n")
    splits = get_suite("fgvc_aircraft").load(tmp_path)
    assert splits.classnames == variants[::-1]
    for d in splits.train + splits.val + splits.test:
        assert d.label == variants[::-1].index(d.classname)
    cessna = next(d for d in splits.test if d.classname == "Cessna 172")
    assert cessna.label == len(variants) - 1 - variants.index("Cessna 172")
    assert cessna.path.startswith("images/")
    assert cessna.path.endswith(".jpg")


def test_aircraft_unknown_variant_names_file_and_line(tmp_path):
    folder = write_fake_dataset("fgvc_aircraft", tmp_path)
    listing = folder / "images_variant_val.txt"
    lines = listing.read_text().splitlines()
    lines.insert(2, "1234567 Boeing 999")
    listing.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError) as err:
        get_suite("fgvc_aircraft").load(tmp_path)
    assert str(listing) in str(err.value)
    assert "line 3" in str(err.value)
    assert "'Boeing 999'" in str(err.value)


@pytest.mark.parametrize("missing", ["variants.txt", "images_variant_test.txt"])
def test_aircraft_missing_list_file(tmp_path, missing):
    folder = write_fake_dataset("fgvc_aircraft", tmp_path)
    (folder / missing).unlink()
    with pytest.raises(DatasetError, match="file not found") as err:
        get_suite("fgvc_aircraft").load(tmp_path)
    assert str(folder / missing) in str(err.value)


def test_aircraft_duplicate_variant(tmp_path):
    folder = write_fake_dataset("fgvc_aircraft", tmp_path)
    with (folder / "variants.txt").open("a") as f:
        f.write("A300B4\n")
    with pytest.raises(DatasetError, match="'A300B4' already listed on line 2"):
        get_suite("fgvc_aircraft").load(tmp_path)


# --------------------------------------------------------------------------- ImageNet family


def test_imagenet_labels_by_sorted_wnid_not_classnames_order(tmp_path):
    folder = write_fake_dataset("imagenet", tmp_path)
    lines = (folder / "classnames.txt").read_text().splitlines()
    (folder / "classnames.txt").write_text("\n".join(reversed(lines)) + "\n")
    (folder / "images/train/n01440764/.DS_Store").write_bytes(b"hidden")
    (folder / "preprocessed.pkl").write_bytes(b"not a pickle; must never be opened")
    spec = get_suite("imagenet")
    splits = spec.load(tmp_path)
    by_wnid = dict(line.split(" ", 1) for line in lines)
    assert splits.classnames == [by_wnid[w] for w in sorted(by_wnid)]
    assert splits.classnames[:3] == ["tench", "goldfish", "great white shark"]
    assert splits.val == []
    assert spec.fewshot_val is False
    first = [d for d in splits.train if d.label == 0]
    assert [d.path for d in first] == sorted(d.path for d in first)
    assert all(d.path.startswith("images/train/n01440764/") for d in first)
    assert all(d.path.startswith("images/val/") for d in splits.test)


def test_imagenet_train_and_val_must_hold_the_same_classes(tmp_path):
    folder = write_fake_dataset("imagenet", tmp_path)
    for f in (folder / "images/val/n01443537").iterdir():
        f.unlink()
    (folder / "images/val/n01443537").rmdir()
    with pytest.raises(DatasetError, match="only in train: \\['n01443537'\\]"):
        get_suite("imagenet").load(tmp_path)


def test_imagenetv2_numbered_folders(tmp_path):
    folder = write_fake_dataset("imagenetv2", tmp_path)
    lines = (folder / "classnames.txt").read_text().splitlines()
    (folder / "classnames.txt").write_text("\n".join(reversed(lines)) + "\n")
    splits = get_suite("imagenetv2").load(tmp_path)
    names = [line.split(" ", 1)[1] for line in reversed(lines)]
    assert splits.classnames == names  # label i is line i of classnames.txt
    for d in splits.test:
        assert d.path.split("/")[1] == str(d.label)
        assert d.classname == names[d.label]
    sub = folder / "imagenetv2-matched-frequency-format-val" / "2"
    for f in sub.iterdir():
        f.unlink()
    sub.rmdir()
    with pytest.raises(DatasetError, match="label 2") as err:
        get_suite("imagenetv2").load(tmp_path)
    assert str(sub) in str(err.value)


@pytest.mark.parametrize(
    ("name", "image_dir"), [("imagenet_a", "imagenet-a"), ("imagenet_r", "imagenet-r")]
)
def test_imagenet_a_r_class_subset_and_readme(tmp_path, name, image_dir):
    folder = write_fake_dataset(name, tmp_path, num_classes=4)
    listed = dict(
        line.split(" ", 1) for line in (folder / "classnames.txt").read_text().splitlines()
    )
    present = sorted(p.name for p in (folder / image_dir).iterdir() if p.is_dir())
    assert len(listed) > len(present) == 4
    assert (folder / image_dir / "README.txt").is_file()
    splits = get_suite(name).load(tmp_path)
    assert splits.classnames == [listed[w] for w in present]
    assert {d.path.split("/")[1] for d in splits.test} == set(present)
    assert all("README" not in d.path for d in splits.test)
    # A folder classnames.txt does not list is an error, not a silent extra class.
    (folder / image_dir / "n99999999").mkdir()
    with pytest.raises(DatasetError, match="n99999999"):
        get_suite(name).load(tmp_path)


def test_imagenet_sketch_reads_sorted_wnid_folders(tmp_path):
    folder = write_fake_dataset("imagenet_sketch", tmp_path)
    splits = get_suite("imagenet_sketch").load(tmp_path)
    wnids = sorted(p.name for p in (folder / "images").iterdir())
    assert [
        next(d for d in splits.test if d.label == i).path.split("/")[1] for i in range(5)
    ] == wnids


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("n01440764 tench\nn01443537\n", "line 2: expected 'WNID class name'"),
        ("n01440764 tench\nn01440764 tinca\n", "line 2: n01440764 is already listed on line 1"),
    ],
)
def test_malformed_classnames_txt(tmp_path, content, needle):
    folder = write_fake_dataset("imagenet_sketch", tmp_path)
    (folder / "classnames.txt").write_text(content)
    with pytest.raises(DatasetError, match=needle) as err:
        get_suite("imagenet_sketch").load(tmp_path)
    assert str(folder / "classnames.txt") in str(err.value)


def test_missing_classnames_txt_says_where_it_comes_from(tmp_path):
    folder = write_fake_dataset("imagenet_r", tmp_path)
    (folder / "classnames.txt").unlink()
    with pytest.raises(DatasetError) as err:
        get_suite("imagenet_r").load(tmp_path)
    msg = str(err.value)
    assert str(folder / "classnames.txt") in msg
    assert "CoOp" in msg
    assert "copy it" in msg


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("OxfordPets", "oxford_pets"),
        ("oxford-pets", "oxford_pets"),
        ("imagenet-sketch", "imagenet_sketch"),
        ("ImageNet-A", "imagenet_a"),
        ("imagenet-v2", "imagenetv2"),
        ("Flowers102", "oxford_flowers"),
        ("OxfordFlowers", "oxford_flowers"),
        ("DescribableTextures", "dtd"),
        ("FGVCAircraft", "fgvc_aircraft"),
        ("SUN397", "sun397"),
        ("Caltech-101", "caltech101"),
    ],
)
def test_alias_lookup(alias, name):
    assert get_suite(alias).name == name


def test_unknown_dataset_suggests_close_matches():
    with pytest.raises(UnknownNameError) as err:
        get_suite("oxford_pet")
    assert "'oxford_pets'" in str(err.value)


# --------------------------------------------------------------------------- split files


def _pets_split(tmp_path: Path) -> Path:
    folder = write_fake_dataset("oxford_pets", tmp_path)
    return folder / "split_zhou_OxfordPets.json"


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda data: "{not json", "not valid JSON"),
        (lambda data: json.dumps([data["train"]]), "expected an object with train, val and test"),
        (lambda data: json.dumps({"train": [], "val": []}), "expected an object with train"),
        (
            lambda data: json.dumps({**data, "val": [[data["val"][0][0], "x", "abyssinian"]]}),
            "label 'x' is not an integer",
        ),
        (
            lambda data: json.dumps({**data, "test": [["a.jpg", 0]]}),
            "expected \\[path, label, classname\\]",
        ),
    ],
)
def test_malformed_split_file_names_the_file(tmp_path, mutate, needle):
    path = _pets_split(tmp_path)
    path.write_text(mutate(json.loads(path.read_text())))
    with pytest.raises(DatasetError, match=needle) as err:
        get_suite("oxford_pets").load(tmp_path)
    assert str(path) in str(err.value)


def test_missing_split_file_is_actionable(tmp_path):
    path = _pets_split(tmp_path)
    path.unlink()
    with pytest.raises(DatasetError) as err:
        get_suite("oxford_pets").load(tmp_path)
    msg = str(err.value)
    assert str(path) in msg
    assert "split_zhou_OxfordPets.json" in msg
    assert "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md" in msg
    assert "vprompt data check" in msg


# --------------------------------------------------------------------------- the fixtures


def test_fixtures_are_deterministic_and_seeded(tmp_path):
    a = write_fake_dataset("dtd", tmp_path / "a", seed=3)
    b = write_fake_dataset("dtd", tmp_path / "b", seed=3)
    c = write_fake_dataset("dtd", tmp_path / "c", seed=4)
    split = "split_zhou_DescribableTextures.json"
    assert (a / split).read_bytes() == (b / split).read_bytes()
    assert (a / split).read_bytes() != (c / split).read_bytes()
    first = get_suite("dtd").load(tmp_path / "a").train[0].path
    assert (a / first).read_bytes() == (b / first).read_bytes()


def test_fixture_images_are_coloured_by_class(tmp_path):
    folder = write_fake_dataset("eurosat", tmp_path, num_classes=3)
    splits = get_suite("eurosat").load(tmp_path)
    ds = ItemDataset(folder, splits.train)

    def mean(label: int) -> np.ndarray:
        pics = [np.asarray(ds[i][0], float) for i in range(len(ds)) if ds.items[i].label == label]
        return np.mean([p.reshape(-1, 3).mean(0) for p in pics], axis=0)

    assert np.abs(mean(0) - mean(1)).max() > 30
    assert np.abs(mean(1) - mean(2)).max() > 30


def test_fixture_rewrites_itself_but_never_real_data(tmp_path):
    write_fake_dataset("dtd", tmp_path, num_classes=5)
    write_fake_dataset("dtd", tmp_path, num_classes=3)  # replaces the earlier fixture
    assert len(get_suite("dtd").load(tmp_path).classnames) == 3
    real = tmp_path / "real"
    (real / "dtd" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError, match="refusing"):
        write_fake_dataset("dtd", real)
    assert (real / "dtd" / "images").is_dir()


def test_write_fake_suite(tmp_path):
    out = write_fake_suite(tmp_path, ["OxfordPets", "imagenet-a"], num_classes=2)
    assert out == {
        "oxford_pets": tmp_path / "oxford_pets",
        "imagenet_a": tmp_path / "imagenet-adversarial",
    }
    assert len(get_suite("imagenet_a").load(tmp_path).classnames) == 2


def test_bad_fixture_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_classes"):
        write_fake_dataset("dtd", tmp_path, num_classes=0)
    with pytest.raises(ValueError, match="images_per_class"):
        write_fake_dataset("dtd", tmp_path, images_per_class=(1, -1, 1))
