"""ProAPO: its operators, fitness and search on hand-made cases, strict reading of its candidate
files, its config bounds and one run through the CLI.

The expected values below are written from the paper and the reference
(MorningStarOvO/ProAPO: ``task_specific_selection.py``'s add / remove / replace / mutation /
crossover, ``get_score_based_ACC.py`` and ``util_model.get_fitness_score``), not from
vprompt's method code.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vprompt.engine.experiment import Experiment
from vprompt.errors import ConfigError
from vprompt.methods.proapo import (
    ProAPO,
    ProAPOConfig,
    Sizes,
    add_one,
    confusion_groups,
    crossover,
    delete_one,
    evolve,
    expand_with_domain,
    mutate,
    pick,
    read_descriptions,
    read_templates,
    replace_one,
    score,
)

CLASSES = ["cat", "golden_retriever", "moth"]
TINY = {
    "epochs": 2,
    "top": 2,
    "n_add": 2,
    "n_delete": 1,
    "n_replace": 2,
    "n_mutation": 1,
    "n_crossover": 2,
    "outer_epochs": 1,
    "inner_epochs": 2,
    "description_samples": 4,
}


def outcomes(make, seeds=range(200)) -> set:
    """Every child an operator gives over many seeds."""
    return {make(random.Random(s)) for s in seeds}


# ---------------------------------------------------------------------------- the operators
def test_add_gives_the_parent_plus_each_missing_item() -> None:
    parent = frozenset({0, 1})
    got = outcomes(lambda r: add_one(r, parent, [0, 1, 2, 3, 4], None))
    assert got == {frozenset({0, 1, k}) for k in (2, 3, 4)}
    # Under a seed: the uniform draw among the sorted missing items.
    expected = random.Random(7).sample([2, 3, 4], 1)[0]
    assert add_one(random.Random(7), parent, [4, 3, 2, 1, 0], None) == parent | {expected}
    assert add_one(random.Random(0), frozenset({0, 1}), [0, 1], None) is None


def test_delete_removes_one_item_only_from_sets_of_more_than_two() -> None:
    got = outcomes(lambda r: delete_one(r, frozenset({0, 1, 2}), None))
    assert got == {frozenset({1, 2}), frozenset({0, 2}), frozenset({0, 1})}
    assert delete_one(random.Random(0), frozenset({0, 1}), None) is None


def test_replace_swaps_one_item_for_a_missing_one() -> None:
    got = outcomes(lambda r: replace_one(r, frozenset({0, 1}), [0, 1, 2, 3], None))
    assert got == {frozenset(s) for s in ({2, 1}, {3, 1}, {0, 2}, {0, 3})}
    assert replace_one(random.Random(0), frozenset({0, 1}), [0, 1], None) is None


def test_mutation_draws_a_fresh_set_of_the_given_size() -> None:
    got = outcomes(lambda r: mutate(r, [0, 1, 2, 3], 2, None))
    assert got == {frozenset(s) for s in itertools.combinations(range(4), 2)}
    assert mutate(random.Random(0), [0, 1], 3, None) is None  # larger than the library


def test_crossover_keeps_the_common_items_and_draws_from_the_others() -> None:
    parents = [frozenset({0, 1, 5}), frozenset({0, 2, 5}), frozenset({0, 1, 3})]
    got = outcomes(lambda r: crossover(r, parents), seeds=range(600))
    rest = (1, 2, 3, 5)  # 0 is in every parent
    subsets = {frozenset({0, *s}) for k in range(1, 5) for s in itertools.combinations(rest, k)}
    assert got == subsets
    # The others are drawn by how many parents hold them: 1 and 5 (two parents) more often
    # than 2 and 3 (one) among the single-item children.
    counts = {i: 0 for i in rest}
    for s in range(3000):
        child = crossover(random.Random(s), parents)
        if child is not None and len(child) == 2:
            counts[next(iter(child - {0}))] += 1
    assert min(counts[1], counts[5]) > max(counts[2], counts[3])
    # Nothing to cross when the parents differ in at most one item.
    assert crossover(random.Random(0), [frozenset({0, 1}), frozenset({0})]) is None


def test_weighted_sampling_follows_the_gain_and_reverses_for_removals() -> None:
    weights = {0: -5.0, 1: 0.0, 2: 100.0}  # shifted positive like random_weighted_choice
    drawn = [pick(random.Random(s), [0, 1, 2], 1, weights)[0] for s in range(300)]
    assert drawn.count(2) > 250
    low = [pick(random.Random(s), [0, 1, 2], 1, weights, reverse=True)[0] for s in range(300)]
    assert low.count(2) < 20
    assert pick(random.Random(3), [2, 0, 1], 2) == pick(random.Random(3), [0, 1, 2], 2)


# ---------------------------------------------------------------------------- the fitness
def test_fitness_on_a_hand_made_case() -> None:
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    s = score(feats, labels, text, logit_scale=1.0)
    # logits [[1,0],[0,1],[1,0]]: two right, the third wrong; top-5 of two classes holds all.
    ce = (2 * math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 3
    assert s.top1 == pytest.approx(200 / 3)
    assert s.top5 == pytest.approx(100.0)
    assert s.cross_entropy == pytest.approx(ce)
    assert s.redundancy == pytest.approx(0.0)
    assert s.fitness((1.0, 2.0, 3.0, 4.0)) == pytest.approx(200 / 3 + 200 - 4 * ce)
    # Similar class embeddings: ‖triu(W Wᵀ − I)‖ is their cosine.
    close = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    s2 = score(feats, labels, close, logit_scale=10.0)
    logits = 10.0 * feats @ close.T
    assert s2.redundancy == pytest.approx(0.6)
    assert s2.cross_entropy == pytest.approx(float(F.cross_entropy(logits, labels)))
    assert s2.fitness((0.0, 0.0, 0.5, 10.0)) == pytest.approx(0.3 - 10 * s2.cross_entropy)


def test_evolve_keeps_the_best_and_never_scores_a_set_twice() -> None:
    target = frozenset({1, 3})
    calls: list[frozenset] = []

    def fitness(c):
        calls.append(c)
        return -len(c ^ target)

    sizes = Sizes(epochs=4, top=2, n_add=3, n_delete=3, n_replace=3, n_mutation=2, n_crossover=3)
    scored = evolve({frozenset({0}): -3.0}, range(5), fitness, sizes, random.Random(0))
    assert len(calls) == len(set(calls))
    assert max(scored, key=lambda c: scored[c]) == target


# ---------------------------------------------------------------------------- the search
@pytest.fixture
def library_file(tmp_path) -> Path:
    path = tmp_path / "templates.txt"
    lines = ["itap of a {}.", "art of the {}.", "a sketch of a {}.", "{} in the wild.", ""]
    path.write_text("\n".join(lines) + "\n")
    return path


def _features_from(method: ProAPO, template: str, copies: int = 2):
    """Training features equal to ``template``'s class embeddings: it is the best prompt."""
    with torch.no_grad():
        text = method._template_classifier([template])
    feats = text.repeat(copies, 1)
    labels = torch.arange(len(CLASSES)).repeat(copies)
    return feats, labels


class Data:
    views = 0
    has_val = False

    def __init__(self, feats, labels) -> None:
        self.feats, self.labels = feats, labels

    def train(self, view=None):
        yield self.feats[:3], self.labels[:3]
        yield self.feats[3:], self.labels[3:]


def test_search_finds_the_known_best_template(tiny_clip, library_file) -> None:
    config = ProAPOConfig(
        templates_file=str(library_file), stage="templates", worst_decrease=1000.0, **TINY
    )
    method = ProAPO(tiny_clip, CLASSES, config)
    library = method.library()
    assert library[0] == "a photo of a {}."
    assert len(library) == 5
    feats, labels = _features_from(method, "{} in the wild.")
    # Brute force over every subset: the constructed best is the template alone.
    table = method._template_table(library)
    best = max(
        (s for k in range(1, 6) for s in itertools.combinations(range(5), k)),
        key=lambda s: score(
            feats, labels, F.normalize(table[list(s)].mean(0), dim=-1), 100.0
        ).fitness(config.template_weights),
    )
    assert [library[i] for i in best] == ["{} in the wild."]
    method.setup(Data(feats, labels))
    assert method.chosen["templates"] == ["{} in the wild."]
    torch.testing.assert_close(method.class_embeddings, feats[:3])


def test_same_seed_same_result_other_seeds_other_paths(tiny_clip, tmp_path) -> None:
    desc = tmp_path / "d.json"
    desc.write_text(json.dumps({c: [f"it has trait {i}." for i in range(4)] for c in CLASSES}))
    gen = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(9, tiny_clip.embed_dim, generator=gen), dim=-1)
    labels = torch.arange(3).repeat(3)
    results = []
    for seed in (5, 5, 6):
        config = ProAPOConfig(descriptions=str(desc), seed=seed, **TINY)
        method = ProAPO(tiny_clip, CLASSES, config)
        method.setup(Data(feats, labels))
        results.append((method.chosen, method.class_embeddings.clone()))
        assert set(method.chosen["descriptions"]) == set(CLASSES)
        assert all(method.chosen["descriptions"].values())
    assert results[0][0] == results[1][0]
    assert torch.equal(results[0][1], results[1][1])
    # Other seeds explore other candidates.
    sizes = Sizes(epochs=2, top=2, n_add=2, n_delete=1, n_replace=1, n_mutation=1, n_crossover=1)
    explored = {
        tuple(evolve({frozenset({0}): 0.0}, range(8), len, sizes, random.Random(s)))
        for s in range(4)
    }
    assert len(explored) > 1


def test_confusion_groups_put_confused_classes_together() -> None:
    """The worst class first, with every class its images' top-5 holds (>= 4 %)."""
    text = torch.eye(8)
    worst = torch.tensor([-1.0, -1, -1, 0.5, 0.3, 1.0, 0.2, 0.1])  # class 3 looks like 5
    clean = torch.tensor([1.0, 0.5, 0.4, 0.3, 0.2, -1, -1, -1])  # class 0, right
    feats = F.normalize(torch.stack([worst, worst, clean]), dim=-1)
    labels = torch.tensor([3, 3, 0])
    groups = confusion_groups(feats, labels, text, 100.0, threshold=4.0, max_groups=4)
    # 2.5 ln 8 = 5.2: five classes a group; class 0 keeps only the classes left.
    assert groups == [[3, 4, 5, 6, 7], [0, 1, 2]]
    assert confusion_groups(feats, labels, text, 100.0, threshold=4.0, max_groups=1) == [
        [3, 4, 5, 6, 7]
    ]
    # A class whose only confusers are taken forms no group.
    solo = F.normalize(
        torch.stack([worst, worst, torch.tensor([1.0, -1, -1, 0.5, 0.3, 0.2, 0.1, -1])]), dim=-1
    )
    assert confusion_groups(solo, labels, text, 100.0, threshold=4.0, max_groups=4) == [
        [3, 4, 5, 6, 7]
    ]


def test_domain_words_rewrite_the_templates() -> None:
    got = expand_with_domain(["a photo of a {}."], ["Pet"])
    assert got == [
        "a photo of a {}.",
        "a photo of a {}, a type of pet.",
        "a photo of a pet: {}.",
        "a pet of a {}.",
        "a pet photo of a {}.",
    ]


# ---------------------------------------------------------------------------- files and config
def test_bad_files_are_refused_in_one_line(tmp_path, monkeypatch) -> None:
    import vprompt.methods.proapo as proapo

    cases = {
        "t-missing": (lambda p: None, read_templates, "cannot read"),
        "t-noslot": (lambda p: p.write_text("a photo\n"), read_templates, "line 1"),
        "t-empty": (lambda p: p.write_text("\n\n"), read_templates, "no template"),
        "t-binary": (lambda p: p.write_bytes(b"\xff{}\n"), read_templates, "UTF-8"),
        "d-json": (lambda p: p.write_text("{"), None, "not valid JSON|JSON"),
        "d-nan": (lambda p: p.write_text('{"cat": NaN}'), None, "NaN"),
        "d-list": (lambda p: p.write_text("[]"), None, "JSON object"),
        "d-kind": (lambda p: p.write_text('{"cat": [1]}'), None, "list of strings"),
        "d-missing": (lambda p: p.write_text('{"cat": ["x"]}'), None, "golden_retriever"),
    }
    for name, (write, reader, message) in cases.items():
        path = tmp_path / name
        write(path)
        read = reader or (lambda p: read_descriptions(p, CLASSES))
        with pytest.raises(ConfigError, match=message) as info:
            read(str(path))
        assert "\n" not in str(info.value)
        assert name in str(info.value)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"cat": ["a"], "golden retriever": ["b", "b"], "moth": ["c"]}))
    assert read_descriptions(str(good), CLASSES) == [["a"], ["b"], ["c"]]
    big = tmp_path / "big.txt"
    big.write_text("a {}\n" * 10)
    monkeypatch.setattr(proapo, "MAX_FILE_BYTES", 8)
    with pytest.raises(ConfigError, match="more than 8"):
        read_templates(str(big))


def test_config_is_checked() -> None:
    ints = [k for k, v in vars(ProAPOConfig()).items() if type(v) is int]
    assert {"seed", "epochs", "n_desc_add"} <= set(ints)
    for name in ints:
        for value in (10**9, -1):
            with pytest.raises(ConfigError, match=name):
                ProAPOConfig(**{name: value})
    for bad, message in (
        ({"template": "no slot"}, "exactly one"),
        ({"stage": "all"}, "stage"),
        ({"sampling": "best"}, "sampling"),
        ({"template_weights": (1.0, 2.0)}, "template_weights"),
        ({"description_weights": (0.0, 0.0, -1.0, 1.0)}, "description_weights"),
        ({"confuse_threshold": 0.0}, "confuse_threshold"),
        ({"worst_decrease": -1.0}, "worst_decrease"),
        ({"domain_words": ("",)}, "domain_words"),
    ):
        with pytest.raises(ConfigError, match=message):
            ProAPOConfig(**bad)


def test_reference_settings_per_dataset() -> None:
    pets, _ = Experiment("proapo").config(dataset="oxford_pets", template="a photo of a {}.")
    assert (pets.sampling, pets.max_templates, pets.outer_epochs) == ("weighted", 32, 1)
    assert pets.domain_words == ("pet", "domestic animals", "breed", "dog or cat")
    dtd, _ = Experiment("proapo").config(dataset="dtd", template="{} texture.")
    assert dtd.template == "{} texture."
    assert dtd.template_weights == (0.0, 0.0, 0.5, 10.0)


# ---------------------------------------------------------------------------- the CLI
def test_train_and_predict_through_the_cli(tiny_folder, run_cli, tmp_path) -> None:
    from vprompt.engine.pack import load_pack

    names = sorted(p.name for p in (tiny_folder / "train").iterdir())
    desc = tmp_path / "desc.json"
    desc.write_text(json.dumps({n: [f"a {n} shape.", f"looks {n}."] for n in names}))
    out = tmp_path / "run"
    sets = [f"{k}={v}" for k, v in TINY.items()]
    res = run_cli("train", "--method", "proapo", "--model", "clip:tiny", "--weights", "none",
                  "--data", f"folder:{tiny_folder}", "--out", out, "--descriptions", desc,
                  *[a for s in sets for a in ("--set", s)], "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["test_images"] == 6
    pack = load_pack(out / "prompt.safetensors")
    assert pack.method == "proapo"
    assert set(pack.tensors) == {"class_embeddings"}
    chosen = pack.extra["chosen"]  # readable in the pack: the search's choice
    assert chosen["templates"]
    assert all("{}" in t for t in chosen["templates"])
    assert set(chosen["descriptions"]) <= set(names)
    image = next((tiny_folder / "test" / names[0]).glob("*.png"))
    pred = run_cli("predict", "--pack", out / "prompt.safetensors", image, "--json")
    assert pred.returncode == 0, pred.stderr
    assert json.loads(pred.stdout)["predictions"][0]["label"] in names
