"""Sharded feature extraction: fill the feature cache on many workers, then merge.

The driver finds, for each (split, view), the images the cache entry still lacks, in the order
the single-process fill (:meth:`~vprompt.data.feature_cache.FeatureCache.ensure`) would encode
them, and cuts that list into contiguous shards *on batch boundaries*: every shard encodes
exactly the batches the single-process fill would have encoded, so the features are bit-equal
whatever the model's batch behaviour. Each shard is one executor task (DESIGN.md: Ray tasks for
feature shards) that rebuilds the method in its process, encodes through the engine's own
:class:`~vprompt.engine.features.FeatureSource` into a private scratch cache, and publishes its
rows with one atomic rename as ``shard-<k>-<digest>.npz``; a file of that name is complete.

The driver then appends the shards in order to the real cache entry (same key, same files,
same bytes as the single-process fill) and removes them. A shard left by an interrupted run is
reused when its digest (cache entry, batch size, identities) still matches; nothing is visible
in the cache entry itself before the merge.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import secrets
import shutil
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from vprompt.data.feature_cache import FeatureCache, FeatureKey, has_identity
from vprompt.data.feature_store import CacheDtype, FeatureSpace
from vprompt.data.sources import DATA_ROOT_ENV
from vprompt.errors import ConfigError, DatasetError, VPromptError, WeightsError
from vprompt.utils import jsonio
from vprompt.utils.io import atomic_write_with
from vprompt.utils.precision import precision_tag

if TYPE_CHECKING:
    from vprompt.data.dataset import DataSplits
    from vprompt.engine.executors import Executor
    from vprompt.methods.base import PromptMethod

Split = Literal["train", "val", "test", "all"]
SHARDS_DIR = "shards"
# Rows appended to the cache entry per write while merging (each write rewrites the index).
_MERGE_ROWS = 65536


@dataclass(frozen=True)
class Source:
    """What a worker needs to rebuild the method and the data (all plain, picklable values)."""

    model: str
    weights: str | None
    method: str
    data_spec: str
    data_root: str | None
    device: str


@dataclass(frozen=True)
class ShardTask:
    """One shard: dataset ``indices`` of ``split`` (identities ``identities``) for ``view``.

    Attributes:
        key: The cache entry's key as the driver computed it (the worker must agree).
        path: Where the finished shard goes (``.npz``: ``identities``, N x D float32 ``rows``).
    """

    source: Source
    split: str
    view: int | None
    key: FeatureKey
    indices: tuple[int, ...]
    identities: tuple[str, ...]
    batch_size: int
    path: str
    weights_digest: str

    def __str__(self) -> str:
        view = "eval view" if self.view is None else f"view {self.view}"
        return f"{self.split} ({view}) {Path(self.path).name}"


@dataclass(frozen=True)
class EntryReport:
    """One (split, view) filled: the entry's folder ``space``, the split's ``images``, how
    many were ``encoded`` now (the rest were cached), in how many ``shards``, of which
    ``reused`` were found finished by an earlier, interrupted run."""

    split: str
    view: int | None
    space: str
    images: int
    encoded: int
    shards: int
    reused: int


@dataclass(frozen=True)
class ExtractReport:
    """What :func:`extract_features` filled."""

    entries: list[EntryReport]
    executor: str
    seconds: float

    @property
    def images(self) -> int:
        """Images encoded by this run."""
        return sum(e.encoded for e in self.entries)

    def to_dict(self) -> dict[str, Any]:
        return {
            "entries": [dataclasses.asdict(e) for e in self.entries],
            "images": self.images,
            "executor": self.executor,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class _Entry:
    report: EntryReport
    space: FeatureSpace
    tasks: list[ShardTask]


def extract_features(
    model: str,
    weights: str | None,
    data_spec: str,
    *,
    data_root: str | os.PathLike[str] | None = None,
    split: Split | Sequence[str] = "all",
    shards: int = 1,
    executor: Executor | str = "local",
    cache_dir: str | os.PathLike[str],
    method: str = "linear-probe",
    batch_size: int = 256,
    views: Sequence[int | None] | None = None,
    device: str = "cpu",
    dtype: CacheDtype = "float32",
    view_seed: int = 0,
    cpus_per_job: float = 1.0,
    gpus_per_job: float = 0.0,
    progress: bool = True,
) -> ExtractReport:
    """Fill the feature cache for ``method`` on ``model`` over ``data_spec`` in shards.

    The cache ends up exactly as ``vprompt train`` / ``evaluate`` with the same method, batch
    size, device and cache settings would have filled it (same entries, same bytes).

    Args:
        split: ``train``, ``val``, ``test``, ``all`` or a list of them.
        shards: Shards per entry (fewer when the entry has fewer batches to encode).
        executor: An executor, or its spec for :func:`~vprompt.engine.executors.make_executor`
            (``local``, ``ray``, ``ray:ADDRESS`` …), closed afterwards.
        method: The image-feature method whose features are cached (methods that extract the
            same kind under the same preprocessing share the entries).
        views: Views to fill (``None``: the evaluation view); default: the views training
            uses for ``train``, the evaluation view for the other splits.
        device: Device every worker encodes on (``auto``: each worker's best); its precision
            is part of the key, so all workers must resolve it alike (they check).

    Raises:
        ConfigError: ``shards`` or ``batch_size`` below 1, or a method that does not use
            cached features.
        DatasetError: The data has no such split, or its images have no identities.
    """
    start = time.perf_counter()
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
        raise ConfigError(f"--shards must be an integer >= 1, got {shards!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    root = data_root or os.environ.get(DATA_ROOT_ENV)  # the workers' environment may differ
    source = Source(
        model=model,
        weights=weights,
        method=method,
        data_spec=data_spec,
        data_root=str(Path(root).expanduser().absolute()) if root else None,
        device=device,
    )
    cache = FeatureCache(Path(cache_dir).absolute(), dtype=dtype, view_seed=view_seed)
    splits = _data(source)
    names = _split_names(split, splits)
    datasets = {name: _split(splits, name, source.data_spec) for name in names}
    run = _executor(executor, cpus_per_job, gpus_per_job, cache.root)
    try:
        wanted = None if views is None else tuple(dict.fromkeys(views))
        ask = KeysTask(source, tuple(splits.classnames), cache.view_seed, wanted)
        keys = _keys(ask, run)
        entries: list[_Entry] = []
        claimed: dict[Path, set[str]] = {}  # splits may share an entry (same key): fill it once
        for name in names:
            for view in keys.train_views if name == "train" else keys.other_views:
                entries.append(
                    _plan(
                        keys.keys[view],
                        datasets[name],
                        name,
                        view,
                        source=source,
                        cache=cache,
                        shards=shards,
                        batch_size=batch_size,
                        digest=keys.weights_digest,
                        claimed=claimed,
                    )
                )
        tasks = [
            t for e in entries for t in e.tasks if _read_shard(Path(t.path), t.identities) is None
        ]
        for _ in run.map(encode_shard, tasks, desc="feature shards", progress=progress):
            pass
    finally:
        if isinstance(executor, str):
            run.close()
    for entry in entries:
        _merge(entry)
    for folder in {Path(t.path).parent for e in entries for t in e.tasks}:
        shutil.rmtree(folder, ignore_errors=True)  # with any scratch left by killed workers
    with contextlib.suppress(OSError):
        (cache.root / SHARDS_DIR).rmdir()  # when nothing else is in flight there
    return ExtractReport(
        [e.report for e in entries], executor=run.name, seconds=time.perf_counter() - start
    )


# ---------------------------------------------------------------------------- driver
def _executor(executor: Executor | str, cpus: float, gpus: float, root: Path) -> Executor:
    if not isinstance(executor, str):
        return executor
    from vprompt.engine.executors import make_executor

    # submitit's job files go next to the shards (a folder the workers share with the driver).
    jobs = root / SHARDS_DIR / "jobs"
    return make_executor(executor, cpus_per_job=cpus, gpus_per_job=gpus, log_dir=jobs)


def _split_names(split: Split | Sequence[str], splits: DataSplits) -> list[str]:
    wanted = [split] if isinstance(split, str) else list(split)
    names: list[str] = []
    for one in wanted:
        if one == "all":
            names += ["train", "test"] if splits.val is None else ["train", "val", "test"]
        elif one in ("train", "val", "test"):
            names.append(one)
        else:
            raise ConfigError(f"split must be train, val, test or all, got {one!r}")
    return list(dict.fromkeys(names))


def _split(splits: DataSplits, name: str, spec: str) -> Any:
    data = {"train": splits.train, "val": splits.val, "test": splits.test}[name]
    if data is None:
        raise DatasetError(f"{spec} has no {name} split")
    if not has_identity(data):
        raise DatasetError(f"{spec}: its {name} images have no identities, so none are cached")
    return data


def feature_key(
    method: PromptMethod, view: int | None, *, view_seed: int, device: torch.device
) -> FeatureKey:
    """The key :class:`~vprompt.engine.features.FeatureSource` files ``view`` under (with a
    cache of ``view_seed``, encoding on ``device``)."""
    transform = method.input_transform(view is not None)
    return FeatureKey.create(
        kind=str(method.feature_kind),
        backbone=method.backbone,
        transform=transform,
        view=view,
        view_seed=view_seed if view is not None else 0,
        compute=precision_tag(device),
    )


def _plan(
    key: FeatureKey,
    data: Any,
    split: str,
    view: int | None,
    *,
    source: Source,
    cache: FeatureCache,
    shards: int,
    batch_size: int,
    digest: str,
    claimed: dict[Path, set[str]],
) -> _Entry:
    """The shards of one (split, view): its missing images, in the single-process fill's
    order, cut on batch boundaries."""
    space = FeatureSpace(cache.space_dir(key), key.to_dict(), cache.dtype)
    ids = [data.identity(i) for i in range(len(data))]
    known = claimed.setdefault(space.path, set(space.read().identities))
    pending: dict[str, int] = {}  # first index of each missing image
    for index, ident in enumerate(ids):
        if ident not in known and ident not in pending:
            pending[ident] = index
    known.update(pending)
    names, indices = list(pending), list(pending.values())
    batches = -(-len(names) // batch_size)
    count = min(shards, batches)
    folder = cache.root / SHARDS_DIR / f"{space.path.name}-{split}-{view}"
    tasks: list[ShardTask] = []
    for k, part in enumerate(np.array_split(np.arange(batches), count) if count else []):
        lo, hi = int(part[0]) * batch_size, min((int(part[-1]) + 1) * batch_size, len(names))
        part_ids = tuple(names[lo:hi])
        shard_hash = hashlib.sha256(
            jsonio.dumps([space.path.name, batch_size, part_ids]).encode()
        ).hexdigest()
        tasks.append(
            ShardTask(
                source=source,
                split=split,
                view=view,
                key=key,
                indices=tuple(indices[lo:hi]),
                identities=part_ids,
                batch_size=batch_size,
                path=str(folder / f"shard-{k:05d}-{shard_hash[:16]}.npz"),
                weights_digest=digest,
            )
        )
    report = EntryReport(
        split=split,
        view=view,
        space=str(space.path),
        images=len(ids),
        encoded=len(names),
        shards=len(tasks),
        reused=sum(_read_shard(Path(t.path), t.identities) is not None for t in tasks),
    )
    return _Entry(report, space, tasks)


def _merge(entry: _Entry) -> None:
    """Append the entry's shards in order, then remove them."""
    names: list[str] = []
    chunks: list[np.ndarray] = []
    for task in entry.tasks:
        shard = _read_shard(Path(task.path), task.identities)
        if shard is None:
            raise RuntimeError(f"feature shard {task.path} is missing or damaged after its run")
        names += task.identities
        chunks.append(shard)
        if len(names) >= _MERGE_ROWS:
            entry.space.append(names, np.concatenate(chunks))
            names, chunks = [], []
    if chunks:
        entry.space.append(names, np.concatenate(chunks))
    for task in entry.tasks:
        with contextlib.suppress(OSError):
            Path(task.path).unlink()


def _read_shard(path: Path, identities: Sequence[str]) -> np.ndarray | None:
    """The shard's N x D float32 rows, or None when it is absent or not the expected one."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            ids, rows = npz["identities"], npz["rows"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if (
        ids.tolist() != list(identities)
        or rows.dtype != np.float32
        or rows.ndim != 2
        or rows.shape[0] != len(identities)
    ):
        return None
    return np.asarray(rows)


# ---------------------------------------------------------------------------- workers
_METHODS: dict[tuple[Any, ...], Any] = {}
_DATA: dict[tuple[Any, ...], Any] = {}


def _data(source: Source) -> DataSplits:
    from vprompt.data.sources import load_data

    cached = (source.data_spec, source.data_root)
    if cached not in _DATA:
        _DATA[cached] = load_data(source.data_spec, data_root=source.data_root)
    splits: DataSplits = _DATA[cached]
    return splits


def _keys(task: KeysTask, executor: Executor) -> Keys:
    """The run's keys, computed in this process (where a later training run computes them),
    or by the first worker when the workers' device is not on this machine."""
    try:
        _device(task.source)
    except VPromptError:
        [(_, keys)] = list(executor.map(entry_keys, [task], desc="feature keys", progress=False))
        return keys
    return entry_keys(task)


def _device(source: Source) -> torch.device:
    from vprompt.backbones.registry import resolve_device

    return resolve_device(source.device)


def _method(source: Source, classnames: tuple[str, ...]) -> PromptMethod:
    """The frozen method (built once per process: rebuilding a backbone is the slow part)."""
    from vprompt.backbones import load_backbone
    from vprompt.engine.experiment import Experiment

    cached = (source.model, source.weights, source.method, classnames, source.device)
    if cached not in _METHODS:
        experiment = Experiment(source.method, None, ())
        if experiment.method_class.capabilities.inputs != "image-features":
            raise ConfigError(
                f"{source.method} sees pixels, not cached features: pick a method that "
                "declares inputs='image-features' (linear-probe, coop …)"
            )
        backbone = load_backbone(source.model, source.weights, device=_device(source))
        built = experiment.build(backbone, list(classnames)).to(_device(source))
        built.eval()
        _METHODS.clear()  # one model per worker process at a time
        _METHODS[cached] = built
    method: PromptMethod = _METHODS[cached]
    return method


@dataclass(frozen=True)
class KeysTask:
    """Ask a worker for the cache keys (and default views) of the run."""

    source: Source
    classnames: tuple[str, ...]
    view_seed: int
    views: tuple[int | None, ...] | None

    def __str__(self) -> str:
        return f"{self.source.method} on {self.source.model}"


@dataclass(frozen=True)
class Keys:
    """Views to fill for the training split and the others, and the key of every view."""

    train_views: tuple[int | None, ...]
    other_views: tuple[int | None, ...]
    keys: dict[int | None, FeatureKey]
    weights_digest: str


def entry_keys(task: KeysTask) -> Keys:
    """The run's views and keys, computed by the method as a worker builds it."""
    from vprompt.engine.features import augmented_views

    method = _method(task.source, task.classnames)
    if task.views is not None:
        train = other = task.views
    else:
        count = augmented_views(method)
        train, other = (tuple(range(count)) if count else (None,)), (None,)
    keys = {
        view: feature_key(method, view, view_seed=task.view_seed, device=_device(task.source))
        for view in dict.fromkeys((*train, *other))
    }
    return Keys(train, other, keys, _weights_digest(method.backbone))


def _weights_digest(backbone: Any) -> str:
    """A hash of every weight's bytes: stricter than ``backbone.fingerprint()`` (which samples
    and sums), so a worker holding other weights is never merged into the driver's entry."""
    cached = getattr(backbone, "_vprompt_shard_digest", None)
    if isinstance(cached, str):
        return cached
    h = hashlib.sha256()
    for name, tensor in sorted(backbone.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        h.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest = h.hexdigest()
    backbone._vprompt_shard_digest = digest
    return digest


def encode_shard(task: ShardTask) -> int:
    """Encode one shard exactly as the single-process fill would and publish it atomically.

    Runs in a worker process (any executor); the rows go through the engine's own
    :class:`~vprompt.engine.features.FeatureSource`, into a scratch cache of this call.
    """
    from vprompt.data.dataset import Subset
    from vprompt.engine.features import FeatureSource

    splits = _data(task.source)
    method = _method(task.source, tuple(splits.classnames))
    data = _split(splits, task.split, task.source.data_spec)
    ids = tuple(data.identity(i) for i in task.indices)
    if ids != task.identities:
        raise DatasetError(
            f"{task.source.data_spec} ({task.split}) changed while its features were extracted"
        )
    # The key was computed once, in the driver (or by the first worker); the worker's own
    # key and the weights' bytes must agree with it.
    key = feature_key(method, task.view, view_seed=task.key.view_seed, device=_device(task.source))
    if key != task.key or _weights_digest(method.backbone) != task.weights_digest:
        raise WeightsError(
            f"this worker's {task.source.model} ({task.source.weights}) is not the driver's: "
            f"other weights or preprocessing on this machine ({key} vs {task.key})"
        )
    folder = Path(task.path).parent
    scratch = folder / f".work-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        part = FeatureSource(
            method,
            Subset(data, list(task.indices)),
            FeatureCache(scratch, view_seed=task.key.view_seed),
            device=_device(task.source),
            batch_size=task.batch_size,
            progress=False,
        )
        rows = part.table(task.view).features.cpu().numpy()
        write_shard(Path(task.path), task.identities, rows)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return len(task.identities)


def write_shard(path: Path, identities: Sequence[str], rows: np.ndarray) -> None:
    """Write a shard to a temporary file and rename it into place (never seen half-written)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                identities=np.asarray(list(identities), dtype=str),
                rows=np.ascontiguousarray(rows, dtype=np.float32),
            )
            fh.flush()
            os.fsync(fh.fileno())

    atomic_write_with(path, write)
