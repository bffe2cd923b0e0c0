"""Seeded few-shot sampling and the base/new class split, exactly as the reference code does them.

The CoOp family of papers (CoOp, CoCoOp, KgCoOp, MaPLe, PromptSRC …) all build their few-shot
sets with Dassl's ``DatasetBase.generate_fewshot_dataset`` after ``random.seed(seed)``:

* items are grouped by label in order of first appearance in the split;
* for each label, ``random.sample(items, K)`` picks K of them (all of them, in order, when the
  class has fewer than K);
* the validation split is sampled next, from the *same* random stream, with ``min(K, 4)`` shots
  (datasets that validate on their test split, like ImageNet, skip this).

:func:`few_shot` reproduces that with a private ``random.Random(seed)`` (same generator, same
stream as the seeded global one). Selections are stored as portable JSON next to the data
(``<dataset>/split_fewshot/shot_K-seed_S.json``), never as the reference's pickles.

The base-to-novel split (CoCoOp's ``subsample_classes``) sorts the labels present in the
(few-shot) training split, keeps the first ``ceil(C / 2)`` as *base* and the rest as *new*, and
relabels the kept classes from 0 in every split.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vprompt.data.items import Datum
from vprompt.errors import DatasetError
from vprompt.utils import jsonio

Subsample = Literal["all", "base", "new"]
SUBSAMPLES: tuple[Subsample, ...] = ("all", "base", "new")
SPLIT_FORMAT = "vprompt-fewshot"
SPLIT_VERSION = 1


@dataclass(frozen=True)
class FewShot:
    """A few-shot selection, in the order the sampler produced it."""

    train: list[Datum]
    val: list[Datum]


def sample_indices_per_class(labels: Sequence[int], shots: int, rng: random.Random) -> list[int]:
    """Indices of K items of every label: ``rng.sample`` per label, labels in order of first
    appearance (all of a label's items, in order, when it has fewer than K)."""
    if shots < 1:
        raise DatasetError(f"shots must be at least 1, got {shots}")
    groups: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        groups.setdefault(int(label), []).append(index)
    out: list[int] = []
    for group in groups.values():
        out.extend(rng.sample(group, shots) if len(group) >= shots else group)
    return out


def sample_per_class(items: Sequence[Datum], shots: int, rng: random.Random) -> list[Datum]:
    """K items of every label: ``rng.sample`` per label, labels in order of first appearance."""
    return [items[i] for i in sample_indices_per_class([d.label for d in items], shots, rng)]


def few_shot_indices(
    train_labels: Sequence[int], val_labels: Sequence[int] | None, *, shots: int, seed: int
) -> tuple[list[int], list[int] | None]:
    """:func:`few_shot` on label lists: the indices of the K-shot train split and of the
    ``min(K, 4)``-shot validation split (None without one), for any dataset."""
    rng = random.Random(seed)
    train = sample_indices_per_class(train_labels, shots, rng)
    val = None if val_labels is None else sample_indices_per_class(val_labels, min(shots, 4), rng)
    return train, val


def few_shot(
    train: Sequence[Datum], val: Sequence[Datum], *, shots: int, seed: int, sample_val: bool = True
) -> FewShot:
    """The reference's K-shot train split and ``min(K, 4)``-shot validation split for ``seed``.

    With ``sample_val=False`` the validation items are returned as they are.
    """
    rng = random.Random(seed)
    picked = sample_per_class(train, shots, rng)
    picked_val = sample_per_class(val, min(shots, 4), rng) if sample_val and val else list(val)
    return FewShot(picked, picked_val)


def subsample_classes(
    *splits: Sequence[Datum], subsample: Subsample = "all"
) -> tuple[list[Datum], ...]:
    """Keep the base (first half) or new (second half) classes of the first split, relabelled.

    Labels are those present in ``splits[0]``, sorted; base is the first ``ceil(C / 2)``.
    """
    if subsample not in SUBSAMPLES:
        raise DatasetError(f"subsample must be one of {', '.join(SUBSAMPLES)}, got {subsample!r}")
    if subsample == "all":
        return tuple(list(s) for s in splits)
    if not splits:
        return ()
    labels = sorted({item.label for item in splits[0]})
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabel = {old: new for new, old in enumerate(selected)}
    return tuple(
        [Datum(d.path, relabel[d.label], d.classname) for d in split if d.label in relabel]
        for split in splits
    )


def source_digest(train: Sequence[Datum], val: Sequence[Datum]) -> str:
    """A digest of the full splits a selection was drawn from (detects a changed split file)."""
    h = hashlib.sha256()
    for name, items in (("train", train), ("val", val)):
        h.update(name.encode())
        for d in items:
            h.update(jsonio.dumps(d.to_json(), ensure_ascii=False).encode())
            h.update(b"\n")
    return h.hexdigest()


def split_path(folder: Path, shots: int, seed: int) -> Path:
    """Where a selection is stored, named as the reference names its (pickled) files."""
    return folder / "split_fewshot" / f"shot_{shots}-seed_{seed}.json"


def _fallback_dir(dataset: str) -> Path:
    base = Path(os.environ.get("VPROMPT_CACHE", Path.home() / ".cache" / "vprompt"))
    return base / "splits" / dataset


def load_or_sample(
    dataset: str,
    folder: Path,
    train: Sequence[Datum],
    val: Sequence[Datum],
    *,
    shots: int,
    seed: int,
    sample_val: bool = True,
) -> FewShot:
    """The stored selection for (shots, seed) if it matches the current splits, else a new one.

    New selections are written next to the data; when the data folder is read-only, under
    ``$VPROMPT_CACHE/splits/<dataset>/`` (default ``~/.cache/vprompt``).
    """
    digest = source_digest(train, val)
    candidates = [split_path(folder, shots, seed), split_path(_fallback_dir(dataset), shots, seed)]
    for path in candidates:
        stored = _read_selection(path, digest=digest, shots=shots, seed=seed)
        if stored is not None:
            return stored
    selection = few_shot(train, val, shots=shots, seed=seed, sample_val=sample_val)
    payload = {
        "format": SPLIT_FORMAT,
        "version": SPLIT_VERSION,
        "dataset": dataset,
        "shots": shots,
        "seed": seed,
        "source_digest": digest,
        "train": [d.to_json() for d in selection.train],
        "val": [d.to_json() for d in selection.val],
    }
    text = jsonio.dumps(payload, indent=1, ensure_ascii=False) + "\n"
    from vprompt.utils.io import atomic_write_text

    for path in candidates:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, text)
            break
        except OSError:
            continue
    return selection


def _read_selection(path: Path, *, digest: str, shots: int, seed: int) -> FewShot | None:
    if not path.is_file():
        return None
    try:
        data = jsonio.loads(path.read_bytes(), what=str(path))
    except (OSError, jsonio.JSONInputError) as exc:
        warnings.warn(f"{path}: unreadable few-shot split ({exc}); sampling again", stacklevel=3)
        return None
    ok = (
        isinstance(data, dict)
        and data.get("format") == SPLIT_FORMAT
        and data.get("version") == SPLIT_VERSION
        and data.get("shots") == shots
        and data.get("seed") == seed
        and isinstance(data.get("train"), list)
        and isinstance(data.get("val"), list)
    )
    if not ok:
        warnings.warn(f"{path}: not a vprompt few-shot split; sampling again", stacklevel=3)
        return None
    if data.get("source_digest") != digest:
        warnings.warn(
            f"{path}: drawn from different splits than the current split file; sampling again",
            stacklevel=3,
        )
        return None
    try:
        train = [Datum.from_json(e, where=f"{path} [train]") for e in data["train"]]
        val = [Datum.from_json(e, where=f"{path} [val]") for e in data["val"]]
    except DatasetError as exc:
        warnings.warn(f"{exc}; sampling again", stacklevel=3)
        return None
    return FewShot(train, val)
