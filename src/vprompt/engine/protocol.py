"""Evaluation protocols of the CoOp family of papers, as resumable jobs.

* ``few-shot``: train on K shots of each dataset, test on its full test split.
* ``base-to-novel``: train on K shots of the base half of the classes; test on the base classes
  and, with the same learned prompt, on the new half (CoCoOp).
* ``cross-dataset``: train on a source dataset (ImageNet), test on the others.
* ``domain-gen``: train on ImageNet, test on ImageNet-V2, -Sketch, -A and -R.

Each (dataset x shots x seed) is a :class:`Job` with its own folder and ``result.json``; a job
whose result exists is skipped, and an interrupted one resumes from its last epoch checkpoint,
so jobs can be spread over processes or machines sharing one output folder: the runner hands
the unfinished ones to an executor (:mod:`vprompt.engine.executors`: this process, Ray tasks or
SLURM jobs), each running :func:`run_one_job`. As in the reference
code, the prompt of the *last* epoch is kept (``select="last"``); ``select="best-val"`` picks
the epoch on the few-shot validation split. The test split never selects anything.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from vprompt.data.suite import SUITE, get_suite
from vprompt.data.tasks import SuiteTask, load_suite_task
from vprompt.engine.evaluate import evaluate
from vprompt.engine.executors import Executor, LocalExecutor
from vprompt.engine.experiment import Experiment, train_and_test
from vprompt.engine.fit import Selection
from vprompt.engine.protocol_table import (
    Table,
    base_to_novel_table,
    few_shot_table,
    harmonic_mean,
    plot_few_shot,
    transfer_table,
)
from vprompt.errors import ConfigError, VPromptError
from vprompt.methods.base import PromptMethod
from vprompt.methods.config import config_to_dict
from vprompt.methods.presets import get_preset, resolve_method
from vprompt.methods.registry import METHODS
from vprompt.utils import jsonio
from vprompt.utils.io import atomic_write_text

ProtocolName = Literal["few-shot", "base-to-novel", "cross-dataset", "domain-gen"]
PROTOCOLS: tuple[ProtocolName, ...] = ("few-shot", "base-to-novel", "cross-dataset", "domain-gen")
#: The papers' dataset order (CoOp Table / CoCoOp Table 1).
PAPER_ORDER = (
    "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
    "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101",
)  # fmt: skip
DOMAIN_TARGETS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
RESULT_FILE = "result.json"


@dataclass(frozen=True)
class Job:
    """One independent unit: train on ``dataset`` (K shots, seed), then test.

    Attributes:
        protocol: Which protocol the job belongs to.
        dataset: The training (source) dataset.
        shots: Shots per class; None for methods without training (zero-shot).
        seed: Few-shot sampling and training seed.
        targets: Datasets tested with the source's prompt (cross-dataset, domain-gen).
    """

    protocol: ProtocolName
    dataset: str
    shots: int | None
    seed: int
    targets: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.dataset}/shots_{self.shots if self.shots else 0}/seed_{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "dataset": self.dataset,
            "shots": self.shots,
            "seed": self.seed,
            "targets": list(self.targets),
        }


@dataclass(frozen=True)
class ProtocolRun:
    """Everything a protocol run needs besides its jobs.

    Attributes:
        protocol: Protocol name.
        method: Registered method name.
        model: Backbone as ``family:arch``.
        data_root: Folder holding the datasets.
        out_dir: Output folder (jobs, results.json, table.md/.csv, plots).
        weights: Weight source (None: the model's default).
        overrides: ``key=value`` config overrides (``--set``).
        select: ``last`` (the reference's choice) or ``best-val``.
        device: Torch device.
        num_workers: Data-loading workers.
        feature_cache: Folder of the frozen-feature cache for methods that declare it.
        progress: Progress bars.
        preset: A published setting (``vprompt presets``) applied over the method's defaults
            before ``overrides``; its ``epochs_by_shots`` sets each job's epochs unless
            ``overrides`` set ``optim.epochs``.
        overwrite: Rerun jobs whose folders hold another run's results or checkpoints
            (otherwise refused); this run's own finished jobs are still skipped.
    """

    protocol: ProtocolName
    method: str
    model: str
    data_root: Path
    out_dir: Path
    weights: str | None = None
    overrides: tuple[str, ...] = ()
    select: Literal["last", "best-val"] = "last"
    device: str = "cpu"
    num_workers: int = 0
    feature_cache: Path | None = None
    progress: bool = True
    eval_batch_size: int = 256
    preset: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        # Accept str paths (and ~) from Python callers.
        for name in ("data_root", "out_dir", "feature_cache"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value).expanduser())
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"unknown protocol {self.protocol!r}; known: {', '.join(PROTOCOLS)}")
        if self.select not in ("last", "best-val"):
            raise ConfigError(f"select must be last or best-val, got {self.select!r}")
        if self.preset is not None:
            resolve_method(get_preset(self.preset), self.method)


def uses_training_data(method: str) -> bool:
    """Whether ``method`` learns from each job's training data (its declared capability);
    methods that do not run once per dataset, without shots."""
    return METHODS.get(method).capabilities.uses_training_data


def plan_jobs(
    protocol: ProtocolName,
    *,
    method: str,
    datasets: Sequence[str] = (),
    shots: Sequence[int] = (16,),
    seeds: Sequence[int] = (1, 2, 3),
    source: str = "imagenet",
) -> list[Job]:
    """The jobs of a protocol, validated before anything runs.

    Methods without training run one job per dataset (shots None, first seed).

    Raises:
        ConfigError: Unknown protocol, empty shots/seeds, test-only datasets as training sets,
            or a transfer protocol with a method that cannot change its classes.
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    caps = METHODS.get(method).capabilities
    trainable = caps.uses_training_data
    if protocol != "few-shot" and not caps.retargets:
        raise ConfigError(
            f"{protocol} tests a prompt on classes it was not trained on, and method {method!r} "
            "cannot change its classes (it does not declare `retargets`); use few-shot, or a "
            "text-side method (zeroshot, coop, …)"
        )
    if trainable and (not shots or not seeds):
        raise ConfigError("give at least one --shots value and one --seeds value")
    if any(k < 1 for k in shots):
        raise ConfigError(f"shots must be >= 1, got {list(shots)}")
    shot_list: list[int | None] = list(dict.fromkeys(shots)) if trainable else [None]
    seed_list = list(dict.fromkeys(seeds)) if trainable else [seeds[0] if seeds else 1]
    names = [get_suite(d).name for d in datasets]
    if protocol in ("few-shot", "base-to-novel"):
        if not names:
            raise ConfigError(f"{protocol} needs --datasets")
        for name in names:
            if SUITE.get(name).eval_only:
                raise ConfigError(f"{name} is test-only; it belongs to domain-gen as a target")
        return [
            Job(protocol, name, k, s)
            for name in sorted(names, key=_paper_rank)
            for k in shot_list
            for s in seed_list
        ]
    src = get_suite(source).name
    if SUITE.get(src).eval_only:
        raise ConfigError(f"the source dataset {src} is test-only")
    if protocol == "domain-gen":
        targets = tuple(names) if names else DOMAIN_TARGETS
    else:
        targets = tuple(n for n in (names or PAPER_ORDER) if n != src)
    if not targets:
        raise ConfigError(f"{protocol} needs target datasets besides the source {src}")
    return [Job(protocol, src, k, s, targets) for k in shot_list for s in seed_list]


def _paper_rank(name: str) -> tuple[int, str]:
    return (PAPER_ORDER.index(name) if name in PAPER_ORDER else len(PAPER_ORDER), name)


# ---------------------------------------------------------------------------- running
class _Runner:
    """Holds what jobs share: the frozen backbone and the experiment (method, preset, --set)."""

    def __init__(self, run: ProtocolRun) -> None:
        from vprompt.backbones import load_backbone
        from vprompt.backbones.registry import resolve_device

        self.run = run
        self.experiment = Experiment(run.method, run.preset, run.overrides)
        self.cls = self.experiment.method_class
        self.learns_from_data = self.cls.capabilities.uses_training_data
        preset = self.experiment.preset_spec
        self.epochs_by_shots = (
            dict(preset.epochs_by_shots)
            if preset is not None and "optim.epochs" not in self.experiment.user_keys
            else {}
        )
        self.device = resolve_device(run.device)
        self.backbone = load_backbone(run.model, run.weights, device=self.device)
        self.cache = None
        if run.feature_cache is not None:
            from vprompt.data.feature_cache import FeatureCache

            self.cache = FeatureCache(run.feature_cache)
        self._identity: dict[str, Any] | None = None

    def identity(self) -> dict[str, Any]:
        if self._identity is None:
            self._identity = self._compute_identity()
        return self._identity

    def _compute_identity(self) -> dict[str, Any]:
        identity = {
            "method": self.run.method,
            "config": config_to_dict(self.experiment.base_config()),
            "model": self.run.model,
            "weights": str(self.backbone.weights),
            "fingerprint": self.backbone.fingerprint(),
            "select": self.run.select,
        }
        if self.epochs_by_shots:
            identity["epochs_by_shots"] = {str(k): v for k, v in self.epochs_by_shots.items()}
        return identity

    def templates(self, task: SuiteTask) -> tuple[str, ...]:
        """The template(s) the method uses on ``task``'s dataset: its reference's, else the
        dataset's paper template."""
        return self.cls.templates_for(task.spec.name, task.template)

    def target_settings(self, dataset: str) -> dict[str, Any]:
        """The method's ``target_settings`` fields as its config has them on ``dataset``
        (reference settings, preset, ``--set``): what follows a retargeted method there."""
        config, _ = self.experiment.config(dataset=dataset)
        return {key: getattr(config, key) for key in sorted(self.cls.target_settings)}

    def build(self, task: SuiteTask, shots: int | None = None) -> PromptMethod:
        return self.experiment.build(
            self.backbone,
            task.classnames,
            shots=shots,
            dataset=task.spec.name,
            template=task.template,
        )

    def train_and_test(
        self, method: PromptMethod, task: SuiteTask, job: Job, folder: Path, desc: str
    ) -> tuple[dict[str, Any], float]:
        """Fit on the task's training split (for methods that learn from data), then test."""
        splits = task.splits() if self.learns_from_data else None
        val = splits.val if splits is not None else None
        select: Selection = "best-val" if self.run.select == "best-val" and val else "last"
        fitted, scores = train_and_test(
            method,
            splits.train if splits is not None else None,
            task.test,
            out_dir=folder / "train",
            val=val,
            select=select,
            seed=job.seed,
            device=self.device,
            feature_cache=self.cache,
            num_workers=self.run.num_workers,
            progress=self.run.progress,
            eval_batch_size=self.run.eval_batch_size,
            desc=desc,
            overwrite=self.run.overwrite,
        )
        if fitted is None or splits is None:
            return {"selected": None}, scores.accuracy
        note = None
        if self.run.select == "best-val" and val is None:
            note = f"{task.spec.title} has no validation split; kept the last epoch"
        info = {
            "selected": fitted.selected,
            "best_epoch": fitted.best_epoch,
            "epochs": fitted.epochs_run,
            "train_images": len(splits.train),
            "note": note,
        }
        return info, scores.accuracy

    def test(self, method: PromptMethod, task: SuiteTask, desc: str) -> float:
        result = evaluate(
            method,
            task.test,
            device=self.device,
            batch_size=self.run.eval_batch_size,
            num_workers=self.run.num_workers,
            progress=self.run.progress,
            desc=desc,
            feature_cache=self.cache,
        )
        return result.accuracy

    def execute(self, job: Job, folder: Path) -> dict[str, Any]:
        root = self.run.data_root
        if job.protocol == "base-to-novel":
            k, s = job.shots, job.seed
            base = load_suite_task(job.dataset, root, shots=k, seed=s, subsample="base")
            new = load_suite_task(job.dataset, root, shots=k, seed=s, subsample="new")
            if not self.cls.capabilities.uses_labels:
                # Transductive, as methods that learn without labels report it (PromptKD):
                # the K-shot images of every class, unlabelled, then each half tested apart.
                every = load_suite_task(job.dataset, root, shots=k, seed=s)
                method = self.build(every, k)
                info, _ = self.train_and_test(method, every, job, folder, f"{job.dataset} all")
                info["note"] = "transductive: trained on unlabelled images of base and new classes"
                b = self.test(method.retarget(base.classnames, templates=self.templates(base)),
                              base, f"{job.dataset} base")  # fmt: skip
            else:
                method = self.build(base, k)
                info, b = self.train_and_test(method, base, job, folder, f"{job.dataset} base")
            moved = method.retarget(new.classnames, templates=self.templates(new))
            n = self.test(moved, new, "new")
            return {"metrics": {"base": b, "new": n, "hm": harmonic_mean(b, n)}, "train": info}
        task = load_suite_task(job.dataset, root, shots=job.shots, seed=job.seed)
        method = self.build(task, job.shots)
        info, acc = self.train_and_test(method, task, job, folder, f"{job.dataset} test")
        if job.protocol == "few-shot":
            return {"metrics": {"accuracy": acc}, "train": info}
        targets: dict[str, float] = {}
        for name in job.targets:
            target = load_suite_task(name, root)
            moved = method.retarget(
                target.classnames,
                templates=self.templates(target),
                settings=self.target_settings(name),
            )
            targets[name] = self.test(moved, target, f"{name} test")
        return {"metrics": {"source": acc, "targets": targets}, "train": info}


def run_protocol(
    run: ProtocolRun,
    jobs: Sequence[Job],
    *,
    on_job: Callable[[Job, dict[str, Any], bool], None] | None = None,
    executor: Executor | None = None,
) -> dict[str, Any]:
    """Run (or skip, when finished) every job, then write ``results.json``, ``table.md``,
    ``table.csv`` and, for few-shot, ``few_shot.png`` into ``run.out_dir``.

    Finished jobs are skipped here; the others go to ``executor`` (default: this process, in
    order), each as :func:`run_one_job`, which writes the job's folder and ``result.json``
    exactly as a local run does. The report is written here from every job's record.

    Args:
        on_job: Called with ``(job, record, skipped)``: first for each finished job, then for
            each job as it completes.
        executor: Where the unfinished jobs run (:func:`~vprompt.engine.executors.
            make_executor`); the caller closes it. With an executor other than ``local`` this
            process builds the backbone on the CPU only to identify the run, and the workers
            run without progress bars.

    Returns:
        ``{"records": [...], "table": {...}}`` as written to ``results.json``.

    Raises:
        ConfigError: ``out_dir`` holds results of a different method, model or configuration.
    """
    _check_folders(jobs, run.data_root)
    out = Path(run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    executor = executor or LocalExecutor()
    in_process = executor.name == "local"
    # In this process the driver's runner serves the jobs; elsewhere each worker builds its own
    # (on its device) and this one only identifies the run, on the CPU.
    runner = _runner_for(run) if in_process else _Runner(replace(run, device="cpu"))
    try:
        identity = runner.identity()
        plan = {"identity": identity, "preset": run.preset, "jobs": [j.to_dict() for j in jobs]}
        _write_json(out / "protocol.json", plan)
        records: list[dict[str, Any] | None] = [None] * len(jobs)
        todo: list[int] = []
        for i, job in enumerate(jobs):
            record = _finished(out / "jobs" / job.key, job, identity, overwrite=run.overwrite)
            if record is None:
                todo.append(i)
                continue
            records[i] = record
            if on_job is not None:
                on_job(job, record, True)
        worker_run = run if in_process else replace(run, progress=False)
        payloads = [JobPayload(worker_run, jobs[i], identity) for i in todo]
        if not in_process:
            del runner  # the workers build their own
        results = executor.map(
            run_one_job, payloads, desc=f"{run.protocol} jobs", progress=run.progress
        )
        for k, record in results:
            i = todo[k]
            records[i] = record
            if on_job is not None:
                on_job(jobs[i], record, False)
    finally:
        if in_process:
            _RUNNERS.pop(run, None)
    done = [r for r in records if r is not None]
    if len(done) != len(jobs):
        raise VPromptError(f"the {executor.name} executor returned {len(done)} of {len(jobs)} jobs")
    return write_report(run.protocol, done, out, method=run.method)


@dataclass(frozen=True, eq=False)
class JobPayload:
    """What a worker needs to run one job: the run (which it rebuilds once per process), the
    job, and the run's identity as the driver computed it (written into the result)."""

    run: ProtocolRun
    job: Job
    identity: dict[str, Any]

    def __str__(self) -> str:
        return f"job {self.job.key}"


#: The runner of the run this process works for (a worker builds the backbone once).
_RUNNERS: dict[ProtocolRun, _Runner] = {}


def _runner_for(run: ProtocolRun) -> _Runner:
    runner = _RUNNERS.get(run)
    if runner is None:
        _RUNNERS.clear()  # one run (one backbone) per process at a time
        runner = _RUNNERS[run] = _Runner(run)
    return runner


def run_one_job(payload: JobPayload) -> dict[str, Any]:
    """Run one job into ``OUT/jobs/<key>`` and write its ``result.json`` atomically; on any
    process or machine that sees the output folder and the data. A rerun resumes from the
    job's last epoch checkpoint.

    Returns:
        The job's record (as in ``result.json``).

    Raises:
        ConfigError: This worker's run differs from the driver's (method, config, weights source
            or the weights' fingerprint, which is exact on any device and thread count).
    """
    run, job = payload.run, payload.job
    runner = _runner_for(run)
    if runner.identity() != payload.identity:
        raise ConfigError(
            "this worker builds a different run than the driver (method, config or weights "
            "differ; is the same vprompt version installed everywhere?)"
        )
    folder = Path(run.out_dir) / "jobs" / job.key
    torch.manual_seed(job.seed)
    started = time.perf_counter()
    outcome = runner.execute(job, folder)
    record = {
        "job": job.to_dict(),
        "identity": payload.identity,
        **outcome,
        "seconds": time.perf_counter() - started,
    }
    _write_json(folder / RESULT_FILE, record)
    return record


def missing_datasets(job: Job, data_root: Path) -> list[str]:
    """One line per dataset of ``job`` (source and targets) whose folder is not under
    ``data_root``, naming what is missing."""
    missing = []
    for name in dict.fromkeys((job.dataset, *job.targets)):
        try:
            SUITE.get(name).require_folder(data_root)
        except VPromptError as exc:
            missing.append(str(exc))
    return missing


def _check_folders(jobs: Sequence[Job], data_root: Path) -> None:
    """Fail before loading any model when a dataset folder is missing."""
    names = dict.fromkeys(n for job in jobs for n in (job.dataset, *job.targets))
    for name in names:
        SUITE.get(name).require_folder(data_root)


def _finished(
    folder: Path, job: Job, identity: Mapping[str, Any], *, overwrite: bool = False
) -> dict[str, Any] | None:
    """The job's result when this run finished it; None when it must run (no result, a torn
    one, or another run's with ``overwrite``)."""
    path = folder / RESULT_FILE
    if not path.is_file():
        return None
    try:
        record = jsonio.loads(path.read_bytes(), what=str(path))
    except (OSError, jsonio.JSONInputError):
        return None  # a torn or unreadable result: run the job again
    if not isinstance(record, dict):
        return None
    if record.get("identity") != identity or record.get("job") != job.to_dict():
        if overwrite:
            path.unlink(missing_ok=True)
            return None
        raise ConfigError(
            f"{path} holds a result of a different run (method, config, model or job differ); "
            "use another --out folder, or pass --overwrite to rerun it there"
        )
    return dict(record)


def dataset_order() -> list[str]:
    """Every registered dataset once: the papers' order first, then the others by name."""
    return list(dict.fromkeys([*PAPER_ORDER, *sorted(SUITE.names())]))


def build_table(
    protocol: ProtocolName, records: Sequence[Mapping[str, Any]], *, method: str
) -> Table:
    """The paper-style table of a protocol's job records."""
    titles = {name: SUITE.get(name).title for name in SUITE.names()}
    if protocol == "few-shot":
        return few_shot_table(records, titles, dataset_order())
    if protocol == "base-to-novel":
        return base_to_novel_table(records, titles, dataset_order())
    title = (
        "Cross-dataset transfer (top-1 %)"
        if protocol == "cross-dataset"
        else "Domain generalization (top-1 %)"
    )
    return transfer_table(records, titles, title=title, method=method)


def write_report(
    protocol: ProtocolName, records: Sequence[Mapping[str, Any]], out: Path, *, method: str
) -> dict[str, Any]:
    """Write results.json, table.md, table.csv (and the few-shot plot) from job records."""
    table = build_table(protocol, records, method=method)
    header = f"# {protocol}: {method}\n\n"
    atomic_write_text(out / "table.md", header + table.markdown())
    atomic_write_text(out / "table.csv", table.csv())
    if protocol == "few-shot":
        titles = {name: SUITE.get(name).title for name in SUITE.names()}
        plot_few_shot(records, titles, dataset_order(), out / "few_shot.png")
    summary = {"protocol": protocol, "records": list(records), "table": table.data}
    _write_json(out / "results.json", summary)
    return summary


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, jsonio.dumps(data, indent=1, ensure_ascii=False) + "\n")
