"""Few-shot sampling and the base/new split against an independent re-implementation of the
reference procedure (Dassl's generate_fewshot_dataset after random.seed, CoCoOp's
subsample_classes), written here from the reference's description."""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict

import pytest

from vprompt.data.fewshot import (
    few_shot,
    load_or_sample,
    sample_per_class,
    split_path,
    subsample_classes,
)
from vprompt.data.items import Datum
from vprompt.errors import DatasetError


class RefDatum:
    def __init__(self, impath: str, label: int, classname: str) -> None:
        self.impath, self.label, self.classname = impath, label, classname


def ref_generate_fewshot(*sources, num_shots, repeat=False):
    output = []
    for source in sources:
        tracker = defaultdict(list)
        for item in source:
            tracker[item.label].append(item)
        dataset = []
        for _label, items in tracker.items():
            if len(items) >= num_shots:
                sampled = random.sample(items, num_shots)
            elif repeat:
                sampled = random.choices(items, k=num_shots)
            else:
                sampled = items
            dataset.extend(sampled)
        output.append(dataset)
    return output[0] if len(output) == 1 else output


def ref_subsample(*args, subsample="all"):
    if subsample == "all":
        return args
    labels = sorted({item.label for item in args[0]})
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabeler = {y: y_new for y_new, y in enumerate(selected)}
    output = []
    for dataset in args:
        output.append(
            [
                RefDatum(i.impath, relabeler[i.label], i.classname)
                for i in dataset
                if i.label in selected
            ]
        )
    return output


def make_split(n_classes: int, per_class: int, seed: int, prefix: str) -> list[Datum]:
    """Items in a shuffled (not label-sorted) order, some classes smaller than others."""
    rng = random.Random(seed)
    items = [
        Datum(f"{prefix}/c{c}/img_{i}.jpg", c, f"class_{c}")
        for c in range(n_classes)
        for i in range(per_class - (c % 3))
    ]
    rng.shuffle(items)
    return items


def as_ref(items: list[Datum]) -> list[RefDatum]:
    return [RefDatum(d.path, d.label, d.classname) for d in items]


def paths(items) -> list[str]:
    return [getattr(i, "impath", None) or i.path for i in items]


TRAIN = make_split(23, 20, 0, "train")
VAL = make_split(23, 6, 1, "val")


@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_selection_matches_reference(shots: int, seed: int) -> None:
    random.seed(seed)
    ref_train = ref_generate_fewshot(as_ref(TRAIN), num_shots=shots)
    ref_val = ref_generate_fewshot(as_ref(VAL), num_shots=min(shots, 4))
    ours = few_shot(TRAIN, VAL, shots=shots, seed=seed)
    assert paths(ours.train) == paths(ref_train)
    assert paths(ours.val) == paths(ref_val)
    assert [d.label for d in ours.train] == [d.label for d in ref_train]


def test_small_classes_keep_all_their_items_in_order() -> None:
    items = [Datum(f"a{i}", 0, "a") for i in range(3)] + [Datum(f"b{i}", 1, "b") for i in range(9)]
    picked = sample_per_class(items, 5, random.Random(1))
    assert [d.path for d in picked[:3]] == ["a0", "a1", "a2"]
    assert len(picked) == 8
    assert {d.label for d in picked[3:]} == {1}


def test_without_val_sampling_val_is_untouched_and_train_unchanged() -> None:
    with_val = few_shot(TRAIN, VAL, shots=4, seed=2)
    without = few_shot(TRAIN, VAL, shots=4, seed=2, sample_val=False)
    assert paths(without.train) == paths(with_val.train)
    assert without.val == VAL


def test_bad_shots_is_an_error() -> None:
    with pytest.raises(DatasetError, match="at least 1"):
        few_shot(TRAIN, VAL, shots=0, seed=1)


@pytest.mark.parametrize("subsample", ["base", "new"])
@pytest.mark.parametrize("n_classes", [10, 23])
def test_base_new_matches_reference(subsample: str, n_classes: int) -> None:
    train = make_split(n_classes, 8, 3, "t")
    test = make_split(n_classes, 4, 4, "s")
    ours = subsample_classes(train, test, subsample=subsample)
    ref = ref_subsample(as_ref(train), as_ref(test), subsample=subsample)
    for mine, theirs in zip(ours, ref, strict=True):
        assert paths(mine) == paths(theirs)
        assert [d.label for d in mine] == [d.label for d in theirs]
    base_count = math.ceil(n_classes / 2)
    expected = base_count if subsample == "base" else n_classes - base_count
    assert sorted({d.label for d in ours[0]}) == list(range(expected))
    # Relabelled from 0, names travel with the items.
    offset = 0 if subsample == "base" else base_count
    assert all(d.classname == f"class_{d.label + offset}" for d in ours[1])


def test_base_new_labels_come_from_the_first_split() -> None:
    # Labels absent from the training split never become base classes.
    train = [Datum("a", 0, "a"), Datum("c", 2, "c")]
    test = [Datum("x", 0, "a"), Datum("y", 1, "b"), Datum("z", 2, "c")]
    _base_train, base_test = subsample_classes(train, test, subsample="base")
    assert [d.path for d in base_test] == ["x"]
    _new_train, new_test = subsample_classes(train, test, subsample="new")
    assert [(d.path, d.label) for d in new_test] == [("z", 0)]


def test_unknown_subsample_is_an_error() -> None:
    with pytest.raises(DatasetError, match="all, base, new"):
        subsample_classes(TRAIN, subsample="half")  # type: ignore[arg-type]


def test_selection_is_stored_as_json_and_reused(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("VPROMPT_CACHE", str(tmp_path / "cache"))
    first = load_or_sample("toy", tmp_path, TRAIN, VAL, shots=4, seed=1)
    path = split_path(tmp_path, 4, 1)
    stored = json.loads(path.read_text())
    assert stored["format"] == "vprompt-fewshot"
    assert stored["train"] == [d.to_json() for d in first.train]
    # A stored selection wins over sampling (here: hand-edited to one item).
    stored["train"] = stored["train"][:1]
    path.write_text(json.dumps(stored))
    again = load_or_sample("toy", tmp_path, TRAIN, VAL, shots=4, seed=1)
    assert again.train == first.train[:1]


def test_stale_or_corrupt_selection_is_resampled(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("VPROMPT_CACHE", str(tmp_path / "cache"))
    first = load_or_sample("toy", tmp_path, TRAIN, VAL, shots=2, seed=3)
    path = split_path(tmp_path, 2, 3)
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        again = load_or_sample("toy", tmp_path, TRAIN, VAL, shots=2, seed=3)
    assert again == first
    # The split file changed since: the stored selection is not reused.
    with pytest.warns(UserWarning, match="different splits"):
        changed = load_or_sample("toy", tmp_path, TRAIN[:-5], VAL, shots=2, seed=3)
    assert changed == few_shot(TRAIN[:-5], VAL, shots=2, seed=3)


def test_read_only_data_folder_falls_back_to_cache(tmp_path, monkeypatch) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "split_fewshot").write_text("a file where a folder should be")
    monkeypatch.setenv("VPROMPT_CACHE", str(tmp_path / "cache"))
    picked = load_or_sample("toy", data, TRAIN, VAL, shots=1, seed=1)
    stored = tmp_path / "cache" / "splits" / "toy" / "split_fewshot" / "shot_1-seed_1.json"
    assert json.loads(stored.read_text())["train"] == [d.to_json() for d in picked.train]
