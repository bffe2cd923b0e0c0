"""ProAPO: progressively automatic prompt optimization (Qian et al., "ProAPO: Progressively
Automatic Prompt Optimization for Visual Classification", CVPR 2025).

Training-free: an evolutionary search over *text prompts* of a frozen CLIP, scored on the cached
image features of the few-shot training split, whose result is a zero-shot classifier.

**Stage 1, task-specific templates** (``setup``). The library: the baseline ``template`` first,
then the candidates (``templates_file``, else the 60 ImageNet templates), each also rewritten
with the dataset's ``domain_words`` (", a type of W.", "W: {}", "photo" → "W" / "W photo").
Every single template is scored; those whose top-1 accuracy falls ``worst_decrease`` points or
more below the baseline's are dropped (default ``100 · 2 / C + 0.1``) and, with
``max_templates`` > 0, only the best ones by fitness are kept. The population starts from
``top`` single templates drawn from the library; for ``epochs`` iterations the ``top`` best sets
each spawn up to ``n_add`` / ``n_delete`` / ``n_replace`` children (one template added, removed
when the set holds more than two, or swapped), then ``n_mutation`` random sets of ``2 + epoch``
templates and ``n_crossover`` children of the ``top`` parents (their common templates plus
``k ~ U{1..|rest|}`` of the others, drawn by how many parents hold them) join it. Each
operator makes up to ``n + 64`` draws and keeps only sets never seen before.

**Stage 2, class-specific descriptions** (with ``descriptions``, ``stage: both``). A class's
prompt for description d is ``(template.format(name) + " " + d).lower()`` for each chosen
template; a "description" may also be the empty one (the class name alone). The start: the
best of all descriptions, the names alone and ``description_samples`` random subsets per
class (half with a size drawn per class, half with one size for all). Then, ``outer_epochs``
times, the classes are split into groups of confused classes — the worst classes by
cross-entropy first, each with the classes that take ≥ ``confuse_threshold`` % of its images'
top-5 predictions — at most ``int(10 ln C)`` classes, ``int(2.5 ln C)`` per group and
``max_groups`` groups; each group's descriptions are searched with the same operators
(``inner_epochs``, ``top_descriptions``, ``n_desc_*``) while the other classes stay fixed, and
every class keeps at least one prompt.

**Fitness** (the entropy-constrained score): with logits ``s · f · Wᵀ`` (s: the backbone's
logit scale) on the training features f and class embeddings W (C x D, unit)::

    fitness = w₁ · top1% + w₅ · top5% + w_r · ‖triu(W Wᵀ − I)‖_F − w_ce · CE(logits, y)

with ``(w₁, w₅, w_r, w_ce)`` = ``template_weights`` in stage 1 and ``description_weights`` in
stage 2. **Sampling**: ``uniform`` draws candidates uniformly; ``weighted`` by each candidate's
own fitness gain over the baseline (+ ``epsilon``, or its exponential), reversed for removals.

The pack holds the searched classifier ``class_embeddings`` (C x D); the chosen prompts are in
``method.chosen`` and in the pack's ``extra["chosen"]`` (:meth:`pack_notes`), for people to read.

Reference: github.com/MorningStarOvO/ProAPO (``tools/process/task_specific_selection.py``,
``class_specific_selection_with_same_template.py``, ``models/APO_score_func/
get_score_based_ACC.py``, ``models/APO_split_group/``, ``models/util_prompt.py``,
``utils/util_model.py``: ``get_fitness_score``, ``random_weighted_choice``;
``configs/option.py`` defaults; ``data/dataset/*/config/clip_ViT-B-32-num_shots_1.yaml``;
``run/ProAPO_ViT-B-32.sh``: ``--APO_mode agnostic_and_dependent --add_dataset_species_flag``).
Deliberate differences (README): groups come from classification confusion only (no k-means /
silhouette or per-class importance score, so no faiss / scikit-learn), worst classes first;
only the ``add_one`` edits (the reference's default) are implemented; candidate sets are
deduplicated as sets; invalid children (a class left without prompts) are skipped like
duplicates; top-5 uses min(5, C); each group's search starts from the best selection alone
(the reference carries its other top candidates over); descriptions are not pre-filtered by
the ``threshold_worst_decrease`` memory; the ``templates_file`` is used as written (the
reference lower-cases its library); the search reads the few-shot training split only.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from vprompt.errors import ConfigError, PackError
from vprompt.methods.base import Capabilities, MethodData, MethodExample, MethodOutput, PromptMethod
from vprompt.methods.clip_common import (
    CLIP_IMAGE_FEATURES,
    clip_logits,
    require_image_text,
    unit_image_features,
)
from vprompt.methods.promptsrc import IMAGENET_TEMPLATES_60
from vprompt.methods.registry import register_method
from vprompt.utils import jsonio

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 16 * 1024 * 1024
"""Largest templates / descriptions file read."""
_MAX_COUNT = 100_000  # bound on population sizes and candidate counts
_MAX_EPOCHS = 1_000
Sampling = Literal["uniform", "weighted"]
Stage = Literal["templates", "both"]
Weights = tuple[float, float, float, float]

# dataset_type_list.json: the words --add_dataset_species_flag rewrites the templates with.
_DOMAIN_WORDS: dict[str, tuple[str, ...]] = {
    "caltech101": ("object", "everyday objects", "common items"),
    "dtd": ("textures", "patterns", "texture", "pattern", "surface", "material"),
    "eurosat": (
        "satellite photo",
        "land cover",
        "remote sensing",
        "satellite imagery",
        "centered satellite photo",
        "aerial or satellite images",
    ),
    "fgvc_aircraft": ("aircraft", "aircraft models", "airplane", "plane", "airliner"),
    "oxford_flowers": ("flower", "floral", "botanical", "bloom"),
    "food101": ("food", "dishes", "cuisine", "nourishment"),
    "imagenet": ("real scenario", "natural scene"),
    "oxford_pets": ("pet", "domestic animals", "breed", "dog or cat"),
    "stanford_cars": ("car", "vehicles", "cars", "auto-mobile"),
    "sun397": ("scene", "place"),
    "ucf101": ("human action", "action", "human activities", "person doing"),
}
# data/dataset/<name>/config/clip_ViT-B-32-num_shots_1.yaml ("agnostic" → template_weights,
# epochs, max_templates, sampling; "specific" → description_weights, max_groups,
# outer_epochs, description_sample; DTD's values are the defaults). (w1, w5, w_r, w_ce).
# ucf101's yaml misspells num_max_prompt(s), so the reference keeps 0 there too.
_YAML: dict[str, dict[str, Any]] = {
    "caltech101": {
        "template_weights": (0.005, 0.008, 0.0, 10.0),
        "epochs": 6,
        "description_weights": (0.08, 0.0, 0.0, 10.0),
        "max_groups": 1,
        "outer_epochs": 2,
    },
    "dtd": {},
    "eurosat": {
        "template_weights": (0.05, 0.0, 1.0, 10.0),
        "max_templates": 256,
        "description_weights": (0.08, 0.0, 0.0, 10.0),
        "max_groups": 1,
        "outer_epochs": 2,
    },
    "fgvc_aircraft": {
        "template_weights": (1.0, 0.0, 0.0, 10.0),
        "max_templates": 256,
        "epochs": 7,
        "description_weights": (0.02, 0.5, 0.0, 10.0),
    },
    "oxford_flowers": {
        "template_weights": (0.01, 0.0, 0.01, 10.0),
        "max_templates": 256,
        "epochs": 5,
        "description_weights": (0.0, 0.08, 0.0, 10.0),
        "description_sample": False,
    },
    "food101": {
        "template_weights": (0.01, 0.01, 0.05, 10.0),
        "max_templates": 256,
        "description_weights": (0.01, 0.0, 0.0, 10.0),
        "max_groups": 1,
        "outer_epochs": 1,
        "description_sample": False,
    },
    "imagenet": {
        "template_weights": (0.0, 0.05, 0.01, 10.0),
        "description_weights": (0.008, 0.8, 0.0, 10.0),
        "max_groups": 2,
        "outer_epochs": 2,
    },
    "oxford_pets": {
        "template_weights": (0.05, 0.1, 0.1, 10.0),
        "max_templates": 32,
        "sampling": "weighted",
        "description_weights": (0.0, 0.0001, 0.0, 10.0),
        "max_groups": 1,
        "outer_epochs": 1,
        "description_sample": False,
    },
    "stanford_cars": {
        "template_weights": (0.01, 0.1, 0.01, 10.0),
        "epochs": 6,
        "description_weights": (0.0, 0.001, 0.0, 10.0),
        "max_groups": 2,
        "outer_epochs": 2,
        "description_sample": False,
    },
    "sun397": {
        "template_weights": (0.05, 0.0, 0.001, 10.0),
        "max_templates": 64,
        "description_weights": (0.005, 0.0, 0.0, 10.0),
        "max_groups": 3,
    },
    "ucf101": {
        "template_weights": (0.0, 0.1, 0.0, 10.0),
        "epochs": 5,
        "description_weights": (0.008, 0.5, 0.0, 10.0),
        "description_sample": False,
    },
}
_SETTINGS: dict[str, dict[str, Any]] = {
    name: {"domain_words": _DOMAIN_WORDS[name], **values} for name, values in _YAML.items()
}


@dataclass(frozen=True)
class ProAPOConfig:
    """ProAPO's settings; defaults are the reference's (``configs/option.py`` with DTD's
    ``clip_ViT-B-32-num_shots_1.yaml``, the first of its per-dataset configs).

    Attributes:
        template: The baseline template, first in the library (``init_dataset_prompt``).
        templates_file: Candidate templates, one with ``{}`` per line; None: the 60 ImageNet
            templates.
        domain_words: Words each candidate is also rewritten with (``dataset_type_list.json``,
            ``--add_dataset_species_flag``).
        descriptions: CuPL-style JSON file ``{class: [sentences]}`` for stage 2.
        stage: ``templates`` (``APO_mode agnostic``) or ``both`` (``agnostic_and_dependent``;
            stage 2 runs only with descriptions).
        sampling: ``uniform`` (``prompt_sample_mode mean``) or ``weighted``.
        weighted_exp: Weighted sampling by exp(gain) instead of gain + ``epsilon``.
        epsilon: ``threshold_epsilon_linear``.
        template_weights: Stage 1 fitness weights (top-1, top-5, redundancy, cross-entropy).
        description_weights: Stage 2 fitness weights, same order.
        epochs: Stage 1 iterations (``epochs``).
        top: Parents per iteration and initial population (``num_top``).
        n_add / n_delete / n_replace / n_mutation / n_crossover: Children per operator
            (``num_add``, ``num_remove``, ``num_replace``, ``num_mutation``, ``num_crossover``).
        max_templates: Keep the best this many single templates (0: all; ``num_max_prompt``).
        worst_decrease: Drop templates this many top-1 points worse than the baseline; None:
            ``100 · 2 / C + 0.1`` (``threshold_worst_decrease``).
        outer_epochs / inner_epochs: Stage 2 regroupings and iterations per group.
        top_descriptions: Stage 2 parents (``num_dependent_top``).
        n_desc_add / n_desc_delete / n_desc_replace / n_desc_mutation / n_desc_crossover:
            Stage 2 children per operator (``num_dependent_*``).
        max_groups: Groups searched per outer epoch (``num_max_search_group``).
        confuse_threshold: % of a class's images whose top-5 holds another class to group
            them (``threshold_confuse``).
        description_sample: Start stage 2 from the best of random description subsets
            (``description_sample_flag``); else from all descriptions.
        description_samples: Random subsets tried (``num_description_sample_random`` +
            ``num_description_sample_same``).
        seed: Seed of the search's random draws.
        batch_size: Sentences per text-encoder forward.
    """

    template: str = "a photo of a {}."
    templates_file: str | None = None
    domain_words: tuple[str, ...] = ()
    descriptions: str | None = None
    stage: Stage = "both"
    sampling: Sampling = "uniform"
    weighted_exp: bool = False
    epsilon: float = 1.0
    template_weights: Weights = (0.0, 0.0, 0.5, 10.0)
    description_weights: Weights = (0.0, 0.5, 0.0, 10.0)
    epochs: int = 8
    top: int = 4
    n_add: int = 8
    n_delete: int = 8
    n_replace: int = 8
    n_mutation: int = 8
    n_crossover: int = 16
    max_templates: int = 0
    worst_decrease: float | None = None
    outer_epochs: int = 3
    inner_epochs: int = 4
    top_descriptions: int = 4
    n_desc_add: int = 8
    n_desc_delete: int = 8
    n_desc_replace: int = 8
    n_desc_mutation: int = 4
    n_desc_crossover: int = 16
    max_groups: int = 4
    confuse_threshold: float = 4.0
    description_sample: bool = True
    description_samples: int = 32
    seed: int = 42
    batch_size: int = 256

    def __post_init__(self) -> None:
        _check_template(self.template, "template")
        for name in ("templates_file", "descriptions"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(f"{name} must be a file path or null, got {value!r}")
        if not all(isinstance(w, str) and w.strip() for w in self.domain_words):
            raise ConfigError(f"domain_words must be non-empty strings: {self.domain_words!r}")
        if self.stage not in ("templates", "both"):
            raise ConfigError(f"stage must be templates or both, got {self.stage!r}")
        if self.sampling not in ("uniform", "weighted"):
            raise ConfigError(f"sampling must be uniform or weighted, got {self.sampling!r}")
        for name in ("template_weights", "description_weights"):
            w = tuple(getattr(self, name))
            if len(w) != 4 or not all(_finite(v) and v >= 0 for v in w):
                raise ConfigError(
                    f"{name} must be four numbers >= 0 (top-1, top-5, redundancy, "
                    f"cross-entropy), got {w!r}"
                )
        if not _finite(self.epsilon) or self.epsilon < 0:
            raise ConfigError(f"epsilon must be a number >= 0, got {self.epsilon!r}")
        if not _finite(self.confuse_threshold) or not 0 < self.confuse_threshold <= 100:
            raise ConfigError(
                f"confuse_threshold must be in (0, 100], got {self.confuse_threshold!r}"
            )
        if self.worst_decrease is not None and (
            not _finite(self.worst_decrease) or self.worst_decrease <= 0
        ):
            raise ConfigError(f"worst_decrease must be > 0 or null, got {self.worst_decrease!r}")
        bounds = {
            "epochs": (0, _MAX_EPOCHS),
            "outer_epochs": (0, _MAX_EPOCHS),
            "inner_epochs": (0, _MAX_EPOCHS),
            "top": (1, 1_000),
            "top_descriptions": (1, 1_000),
            "max_templates": (0, _MAX_COUNT),
            "max_groups": (0, _MAX_COUNT),
            "description_samples": (0, _MAX_COUNT),
            "seed": (0, 10**9 - 1),
            "batch_size": (1, 65_536),
        }
        for name in ("n_add", "n_delete", "n_replace", "n_mutation", "n_crossover"):
            bounds[name] = (0, _MAX_COUNT)
            bounds[name.replace("n_", "n_desc_")] = (0, _MAX_COUNT)
        for name, (low, high) in bounds.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_template(template: Any, where: str) -> str:
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ConfigError(f"{where}: template {template!r} must contain exactly one '{{}}'")
    try:
        template.format("x")
    except (IndexError, KeyError, ValueError):
        raise ConfigError(f"{where}: template {template!r} is not a format string") from None
    return template


# ---------------------------------------------------------------------------- candidate files
def _read_file(path: str, what: str) -> str:
    p = Path(path).expanduser()
    try:
        size = p.stat().st_size
        if not p.is_file():
            raise ConfigError(f"{p}: {what} file is not a regular file")
        if size > MAX_FILE_BYTES:
            raise ConfigError(f"{p}: {what} file is {size} bytes, more than {MAX_FILE_BYTES}")
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the {what} file ({exc.strerror})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: {what} file is not UTF-8 text (byte {exc.start})") from None


def read_templates(path: str) -> list[str]:
    """One template with ``{}`` per non-empty line (duplicates dropped, order kept)."""
    lines = [line.strip() for line in _read_file(path, "templates").splitlines()]
    out: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        _check_template(line, f"{Path(path).expanduser()} line {number}")
        if line not in out:
            out.append(line)
    if not out:
        raise ConfigError(f"{Path(path).expanduser()}: templates file holds no template")
    return out


def read_descriptions(path: str, classnames: Sequence[str]) -> list[list[str]]:
    """Per class (in order), its description sentences from a CuPL-style JSON file.

    A class is found under its name or with underscores read as spaces; keys for other
    classes are allowed (a dataset's file used on a subset of its classes).
    """
    where = Path(path).expanduser()
    try:
        data = jsonio.loads(_read_file(path, "descriptions"), what=str(where))
    except jsonio.JSONInputError as exc:
        raise ConfigError(" ".join(str(exc).split())) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object {{class: [sentences]}}")
    for key, value in data.items():
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: descriptions of {key!r} must be a list of strings")
    out: list[list[str]] = []
    missing = []
    for name in classnames:
        value = data.get(name, data.get(name.replace("_", " ")))
        sentences = [" ".join(v.split()) for v in value or [] if v.strip()]
        if not sentences:
            missing.append(name)
        out.append(list(dict.fromkeys(sentences)))
    if missing:
        raise ConfigError(f"{where}: no descriptions for classes {missing[:10]}")
    return out


def expand_with_domain(templates: Sequence[str], words: Sequence[str]) -> list[str]:
    """Each template followed by its rewrites with each domain word (``add_dataset_type_to
    _template``): ". " → ", a type of W.", " {}" → " W: {}", and where it says "photo",
    "photo" → "W" and → "W photo"; lower-cased, duplicates dropped."""
    out: list[str] = []
    for t in templates:
        out.append(t)
        for word in (w.lower() for w in words):
            out.append(t.replace(".", f", a type of {word}."))
            out.append(t.replace(" {}", f" {word}: {{}}"))
            if "photo" in t:
                out.append(t.replace("photo", word))
                out.append(t.replace("photo", f"{word} photo"))
    kept = [t for t in dict.fromkeys(out) if t.count("{}") == 1]
    return kept


# ---------------------------------------------------------------------------- the fitness
@dataclass(frozen=True)
class Score:
    """One candidate's scores on the training features (accuracies in %)."""

    top1: float
    top5: float
    redundancy: float
    cross_entropy: float

    def fitness(self, weights: Sequence[float]) -> float:
        w1, w5, wr, wce = weights
        return w1 * self.top1 + w5 * self.top5 + wr * self.redundancy - wce * self.cross_entropy


@torch.no_grad()
def score(
    features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, logit_scale: float
) -> Score:
    """Scores of C x D unit class embeddings ``text`` on N x D unit ``features``."""
    logits = logit_scale * features.float() @ text.float().T
    k = min(5, text.shape[0])
    top = logits.topk(k, dim=-1).indices
    hits = top == labels[:, None]
    sim = text.float() @ text.float().T
    redundancy = torch.triu(sim - torch.eye(len(sim), device=sim.device)).norm()
    return Score(
        top1=100.0 * float(hits[:, 0].float().mean()),
        top5=100.0 * float(hits.any(dim=-1).float().mean()),
        redundancy=float(redundancy),
        cross_entropy=float(F.cross_entropy(logits, labels)),
    )


# ---------------------------------------------------------------------------- the operators
Candidate = frozenset[int]


def pick(
    rng: random.Random,
    items: Sequence[int],
    k: int,
    weights: Mapping[int, float] | None = None,
    *,
    reverse: bool = False,
) -> list[int]:
    """``k`` distinct items: uniformly, or by ``weights`` as the reference's
    ``random_weighted_choice`` (shifted positive, normalised; ``reverse`` favours the low)."""
    pool = sorted(items)
    if weights is None:
        return rng.sample(pool, k)
    p = [weights[i] + 1e-4 for i in pool]
    if min(p) < 0:
        low = min(p)
        p = [v - low + 1e-4 for v in p]
    total = sum(p)
    p = [v / total for v in p]
    if reverse:
        p = [1 - v + 1e-4 for v in p]
    chosen: list[int] = []
    for _ in range(k):
        i = rng.choices(range(len(pool)), weights=p)[0]
        chosen.append(pool[i])
        del pool[i], p[i]
    return chosen


def add_one(
    rng: random.Random, parent: Candidate, library: Sequence[int], w: Mapping[int, float] | None
) -> Candidate | None:
    """Edit: the parent plus one library item it lacks."""
    rest = [i for i in library if i not in parent]
    return parent | set(pick(rng, rest, 1, w)) if rest else None


def delete_one(
    rng: random.Random, parent: Candidate, w: Mapping[int, float] | None
) -> Candidate | None:
    """Edit: the parent less one item (only from a parent of more than two)."""
    if len(parent) <= 2:
        return None
    return parent - set(pick(rng, list(parent), 1, w, reverse=True))


def replace_one(
    rng: random.Random, parent: Candidate, library: Sequence[int], w: Mapping[int, float] | None
) -> Candidate | None:
    """Edit: one of the parent's items swapped for one it lacks."""
    rest = [i for i in library if i not in parent]
    if not rest or not parent:
        return None
    out = pick(rng, list(parent), 1, w, reverse=True)
    new = pick(rng, rest, 1, w)
    return (parent - set(out)) | set(new)


def mutate(
    rng: random.Random, library: Sequence[int], size: int, w: Mapping[int, float] | None
) -> Candidate | None:
    """Evolution: a fresh random set of ``size`` library items."""
    return frozenset(pick(rng, library, size, w)) if size <= len(library) else None


def crossover(rng: random.Random, parents: Sequence[Candidate]) -> Candidate | None:
    """Evolution: the parents' common items plus ``k ~ U{1..|rest|}`` of the others, each
    drawn by how many parents hold it."""
    counts: dict[int, int] = {}
    for parent in parents:
        for i in parent:
            counts[i] = counts.get(i, 0) + 1
    common = {i for i, n in counts.items() if n == len(parents)}
    rest = {i: float(n) for i, n in counts.items() if n < len(parents)}
    if len(rest) <= 1:
        return None
    k = rng.randint(1, len(rest))
    return frozenset(common | set(pick(rng, list(rest), k, rest)))


@dataclass(frozen=True)
class Sizes:
    """Population sizes of one evolutionary search."""

    epochs: int
    top: int
    n_add: int
    n_delete: int
    n_replace: int
    n_mutation: int
    n_crossover: int


def evolve(
    population: Mapping[Candidate, float],
    library: Sequence[int],
    fitness: Callable[[Candidate], float],
    sizes: Sizes,
    rng: random.Random,
    *,
    weights: Mapping[int, float] | None = None,
    valid: Callable[[Candidate], bool] = bool,
) -> dict[Candidate, float]:
    """The iterative search: edits of the ``top`` best, mutation and crossover, ``epochs``
    times; returns every scored candidate (insertion order; ties keep the earlier)."""
    scored = dict(population)
    seen = set(scored)

    def generate(count: int, make: Callable[[], Candidate | None]) -> None:
        made = 0
        for _ in range(count + 64 if count > 0 else 0):
            child = make()
            if child is None or child in seen or not valid(child):
                continue
            seen.add(child)
            scored[child] = fitness(child)
            made += 1
            if made == count:
                return

    for epoch in range(sizes.epochs):
        ranked = ranking(scored)
        top = ranked[: sizes.top]
        if len(top) < sizes.top:
            top = [rng.choice(top) for _ in range(sizes.top)]
        for parent in top:
            if all(i in parent for i in library):
                continue
            generate(sizes.n_add, partial(add_one, rng, parent, library, weights))
            generate(sizes.n_delete, partial(delete_one, rng, parent, weights))
            generate(sizes.n_replace, partial(replace_one, rng, parent, library, weights))
        generate(sizes.n_mutation, partial(mutate, rng, library, 2 + epoch, weights))
        generate(sizes.n_crossover, partial(crossover, rng, top))
    return scored


def ranking(scored: Mapping[Candidate, float]) -> list[Candidate]:
    """Candidates by fitness, best first (a stable sort: ties keep their order)."""
    return sorted(scored, key=lambda c: -scored[c])


# ---------------------------------------------------------------------------- the method
@register_method("proapo")
class ProAPO(PromptMethod):
    """Training-free prompt search; the result is a zero-shot classifier (``class_embeddings``,
    C x D) whose chosen templates and descriptions are in :attr:`chosen`."""

    Config = ProAPOConfig
    capabilities = Capabilities(
        inputs="image-features",
        trains=False,
        uses_training_data=True,
        retargets=False,
        template_field="template",
    )
    reference_settings: ClassVar[Mapping[str, Mapping[str, Any]]] = _SETTINGS
    feature_kind = CLIP_IMAGE_FEATURES
    state_hint = "(the backbone's embedding size and the classes must match)"
    class_embeddings: torch.Tensor  # C x D unit (buffer, the pack's state)

    def __init__(self, backbone: Any, classnames: Sequence[str], config: Any = None) -> None:
        clip = require_image_text(backbone, "proapo")
        super().__init__(clip, classnames, config)
        self.chosen: dict[str, Any] = {"templates": [self.config.template], "descriptions": {}}
        names = [self._name(c) for c in self.classnames]
        text = self._encode([self.config.template.format(n) for n in names])
        self.register_buffer("class_embeddings", text, persistent=False)
        self.to(clip.logit_scale.device)

    @classmethod
    def examples(cls) -> list[MethodExample]:
        tiny = {
            "epochs": 2,
            "top": 2,
            "n_add": 2,
            "n_delete": 1,
            "n_replace": 1,
            "n_mutation": 1,
            "n_crossover": 2,
        }
        return [MethodExample("clip:tiny", tiny)]

    @staticmethod
    def _name(classname: str) -> str:
        return classname.replace("_", " ")

    # ------------------------------------------------------------------ state
    def prompt_tensors(self) -> dict[str, torch.Tensor]:
        return {"class_embeddings": self.class_embeddings}

    def check_prompt_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        norms = tensors["class_embeddings"].float().norm(dim=-1)
        if not bool(((norms - 1).abs() < 1e-3).all()):
            raise PackError("proapo tensor 'class_embeddings' must hold unit-norm rows")

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def _encode(self, sentences: Sequence[str]) -> torch.Tensor:
        """Sentences → unit text embeddings (float32), in batches."""
        chunks = []
        step = self.config.batch_size
        for start in range(0, len(sentences), step):
            tokens = self.backbone.tokenize(list(sentences[start : start + step]))
            chunks.append(F.normalize(self.backbone.encode_text(tokens).float(), dim=-1))
        return torch.cat(chunks)

    @property
    def _scale(self) -> float:
        return float(self.backbone.logit_scale)

    def library(self) -> list[str]:
        """Stage 1's candidate templates: the baseline first (before the threshold filter)."""
        cfg = self.config
        base = read_templates(cfg.templates_file) if cfg.templates_file else IMAGENET_TEMPLATES_60
        lib = expand_with_domain(base, cfg.domain_words) if cfg.domain_words else list(base)
        return [cfg.template] + [t for t in dict.fromkeys(lib) if t != cfg.template]

    # ------------------------------------------------------------------ the search
    def setup(self, data: MethodData) -> None:
        """Run both stages on the training features; keep the best classifier."""
        feats, labels = [], []
        for f, y in data.train():
            feats.append(F.normalize(f.float(), dim=-1))
            labels.append(y.long())
        if not feats:
            raise ConfigError("proapo needs at least one labelled training image")
        x = torch.cat(feats).to(self.class_embeddings.device)
        y = torch.cat(labels).to(x.device)
        rng = random.Random(self.config.seed)
        descriptions = None
        if self.config.descriptions is not None and self.config.stage == "both":
            descriptions = read_descriptions(self.config.descriptions, self.classnames)
        templates = self.search_templates(x, y, rng)
        text = self._template_classifier(templates)
        chosen_desc: dict[str, list[str]] = {}
        if descriptions is not None:
            text, chosen_desc = self.search_descriptions(x, y, templates, descriptions, rng)
        with torch.no_grad():
            self.class_embeddings.copy_(text)
        self.chosen = {"templates": list(templates), "descriptions": chosen_desc}
        log.info("proapo chose templates %s", templates)

    def pack_notes(self) -> dict[str, Any]:
        """The chosen templates and per-class descriptions, readable in the pack."""
        return {"chosen": self.chosen}

    def _template_table(self, templates: Sequence[str]) -> torch.Tensor:
        """T x C x D unit embeddings of every template filled with every class name."""
        names = [self._name(c) for c in self.classnames]
        flat = self._encode([t.format(n) for t in templates for n in names])
        return flat.reshape(len(templates), len(names), -1)

    def _template_classifier(self, templates: Sequence[str]) -> torch.Tensor:
        return F.normalize(self._template_table(templates).mean(dim=0), dim=-1)

    def search_templates(self, x: torch.Tensor, y: torch.Tensor, rng: random.Random) -> list[str]:
        """Stage 1: the best set of templates (baseline first in the library)."""
        cfg = self.config
        library = self.library()
        table = self._template_table(library)  # T x C x D
        weights = cfg.template_weights

        def fitness_of(c: Candidate) -> float:
            text = F.normalize(table[sorted(c)].mean(dim=0), dim=-1)
            return score(x, y, text, self._scale).fitness(weights)

        singles = [score(x, y, table[i], self._scale) for i in range(len(library))]
        threshold = cfg.worst_decrease
        if threshold is None:
            threshold = 100.0 * 2 / len(self.classnames) + 0.1
        keep = [0] + [
            i for i in range(1, len(library)) if singles[0].top1 - singles[i].top1 < threshold
        ]
        if cfg.max_templates:
            keep = sorted(keep, key=lambda i: -singles[i].fitness(weights))[: cfg.max_templates]
            keep.sort()
        single_fit = {i: singles[i].fitness(weights) for i in keep}
        w = self._sampling_weights(single_fit, singles[0].fitness(weights))
        start = keep if cfg.top > len(keep) else pick(rng, keep, cfg.top)
        population = {frozenset([i]): single_fit[i] for i in start}
        sizes = Sizes(cfg.epochs, cfg.top, cfg.n_add, cfg.n_delete, cfg.n_replace,
                      cfg.n_mutation, cfg.n_crossover)  # fmt: skip
        scored = evolve(population, keep, fitness_of, sizes, rng, weights=w)
        best = ranking(scored)[0]
        return [library[i] for i in sorted(best)]

    def _sampling_weights(
        self, fitness: Mapping[int, float], baseline: float
    ) -> dict[int, float] | None:
        cfg = self.config
        if cfg.sampling == "uniform":
            return None
        if cfg.weighted_exp:
            return {i: math.exp(min(f - baseline, 50.0)) for i, f in fitness.items()}
        return {i: f - baseline + cfg.epsilon for i, f in fitness.items()}

    def search_descriptions(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        templates: Sequence[str],
        descriptions: Sequence[Sequence[str]],
        rng: random.Random,
    ) -> tuple[torch.Tensor, dict[str, list[str]]]:
        """Stage 2: per class, the best description subset under the chosen templates.

        Items: per class, index 0 is the class name alone and 1.. its descriptions; item
        (c, k) has global id ``offset[c] + k``.
        """
        cfg = self.config
        n_cls = len(self.classnames)
        pools = [["", *d] for d in descriptions]
        offset = [0]
        for pool in pools:
            offset.append(offset[-1] + len(pool))
        owner = [c for c, pool in enumerate(pools) for _ in pool]
        sentences = []
        for c, pool in enumerate(pools):
            name = self._name(self.classnames[c])
            for d in pool:
                for t in templates:
                    sentences.append(f"{t.format(name)} {d}".strip().lower())
        item_sum = self._encode(sentences).reshape(len(owner), len(templates), -1).sum(dim=1)
        weights = cfg.description_weights

        def classifier(sel: Candidate) -> torch.Tensor:
            ids = torch.tensor(sorted(sel), device=item_sum.device)
            own = torch.tensor([owner[i] for i in sorted(sel)], device=item_sum.device)
            sums = torch.zeros(n_cls, item_sum.shape[1], device=item_sum.device)
            sums.index_add_(0, own, item_sum[ids])
            return F.normalize(sums, dim=-1)

        def fitness_of(sel: Candidate) -> float:
            return score(x, y, classifier(sel), self._scale).fitness(weights)

        def valid(sel: Candidate) -> bool:
            return len({owner[i] for i in sel}) == n_cls

        # The start: all descriptions, names alone, random subsets (per class / same size).
        starts: list[Candidate] = [
            frozenset(i for c in range(n_cls) for i in range(offset[c] + 1, offset[c + 1])),
            frozenset(offset[c] for c in range(n_cls)),
        ]
        if cfg.description_sample:
            half = cfg.description_samples // 2
            for s in range(cfg.description_samples):
                same = None
                if s >= half:
                    longest = max(len(d) for d in descriptions)
                    same = rng.randint(int(longest / 3 + 0.71), longest)
                sel: set[int] = set()
                for c, own in enumerate(descriptions):
                    size = len(own)
                    n = same if same is not None else rng.randint(int(size / 3 + 0.71), size)
                    n = max(1, min(n, size))
                    sel.update(offset[c] + 1 + k for k in rng.sample(range(size), n))
                starts.append(frozenset(sel))
        start_fit = {s: fitness_of(s) for s in dict.fromkeys(starts)}
        current = ranking(start_fit)[0] if cfg.description_sample else starts[0]
        current_fit = start_fit[current]
        sizes = Sizes(cfg.inner_epochs, cfg.top_descriptions, cfg.n_desc_add, cfg.n_desc_delete,
                      cfg.n_desc_replace, cfg.n_desc_mutation, cfg.n_desc_crossover)  # fmt: skip
        for _ in range(cfg.outer_epochs):
            groups = confusion_groups(
                x, y, classifier(current), self._scale, cfg.confuse_threshold, cfg.max_groups
            )
            for group in groups:
                members = set(group)
                fixed = frozenset(i for i in current if owner[i] not in members)
                library = [i for c in group for i in range(offset[c], offset[c + 1])]

                def full(part: Candidate, fixed: frozenset[int] = fixed) -> Candidate:
                    return fixed | part

                def fit_part(part: Candidate, full: Callable[..., Candidate] = full) -> float:
                    return fitness_of(full(part))

                def valid_part(part: Candidate, members: set[int] = members) -> bool:
                    return {owner[i] for i in part} == members

                part = frozenset(i for i in current if owner[i] in members)
                w = None
                if cfg.sampling == "weighted":
                    single = {}
                    for i in library:
                        alone = frozenset(j for j in part if owner[j] != owner[i]) | {i}
                        single[i] = fit_part(alone)
                    w = self._sampling_weights(single, current_fit)
                scored = evolve({part: current_fit}, library, fit_part, sizes, rng,
                                weights=w, valid=valid_part)  # fmt: skip
                best = ranking(scored)[0]
                current, current_fit = full(best), scored[best]
        assert valid(current)
        chosen = {
            self.classnames[c]: [pools[c][i - offset[c]] or self._name(self.classnames[c])
                                 for i in sorted(current) if owner[i] == c]
            for c in range(n_cls)
        }  # fmt: skip
        return classifier(current), chosen

    # ------------------------------------------------------------------ forward
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W preprocessed pixels → B x D unit-norm image embeddings (frozen)."""
        return unit_image_features(self.backbone, pixels)

    def forward_features(self, features: torch.Tensor) -> MethodOutput:
        """B x D unit image embeddings → B x C logits."""
        return MethodOutput(logits=clip_logits(self.backbone, features, self.class_embeddings))

    def extra_repr(self) -> str:
        return f"backbone={self.backbone.name}, classes={len(self.classnames)}"


@torch.no_grad()
def confusion_groups(
    features: torch.Tensor,
    labels: torch.Tensor,
    text: torch.Tensor,
    logit_scale: float,
    threshold: float,
    max_groups: int,
) -> list[list[int]]:
    """Groups of confused classes, worst first: each class present in ``labels`` (by its
    images' cross-entropy, highest first) with the unassigned classes found in ≥ ``threshold``
    % of its images' top-5 predictions; at most ``int(10 ln C)`` classes in all, ``int(2.5 ln
    C)`` (≥ 2) per group, ``max_groups`` groups; single-class groups are dropped."""
    n_cls = text.shape[0]
    logits = logit_scale * features.float() @ text.float().T
    top = logits.topk(min(5, n_cls), dim=-1).indices
    present = sorted(set(labels.tolist()))
    loss = {c: float(F.cross_entropy(logits[labels == c], labels[labels == c])) for c in present}
    order = sorted(present, key=lambda c: -loss[c])
    max_total = min(n_cls, int(math.log(n_cls) * 10)) if n_cls > 1 else 1
    per_group = max(2, int(math.log(n_cls) * 2.5)) if n_cls > 1 else 1
    taken: set[int] = set()
    groups: list[list[int]] = []
    total = 0
    for c in order:
        if len(groups) >= max_groups or total >= max_total:
            break
        if c in taken:
            continue
        rows = top[labels == c]
        group = [c]
        for j in range(n_cls):
            if j == c or j in taken or len(group) >= per_group:
                continue
            if 100.0 * float((rows == j).any(dim=-1).float().mean()) >= threshold:
                group.append(j)
        taken.update(group)
        total += len(group)
        if len(group) > 1:
            groups.append(group)
    return groups
