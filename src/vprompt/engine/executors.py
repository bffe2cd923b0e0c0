"""Where independent jobs run: in this process, as Ray tasks, or as SLURM jobs (submitit).

An executor maps a module-level function over picklable items and yields ``(index, result)``
as each finishes. It schedules nothing itself: Ray places tasks by their resource request and
retries those whose worker died; SLURM (through submitit) queues the jobs and requeues one
that ran out of time or was preempted. Jobs must therefore be idempotent and resumable in their
own folders (protocol jobs resume from their last epoch checkpoint), so a retry on any machine
continues the work instead of repeating it.

Errors that ``fn`` raises on purpose (:class:`~vprompt.errors.VPromptError`) are never
retried: they come back as the same error type, prefixed with ``str(item)``, so an item
should print as something short (a job key). Anything else that fails on a worker comes back
as one :class:`~vprompt.errors.VPromptError` line naming the item.

``make_executor("local" | "ray[:ADDRESS]" | "slurm[:PARTITION]" | "submitit-local")``.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from vprompt.errors import ConfigError, VPromptError

#: SLURM time limit of one job; a checkpointed job that reaches it is requeued and resumes.
DEFAULT_TIMEOUT_MIN = 24 * 60
EXECUTOR_SPECS = ("local", "ray[:ADDRESS]", "slurm[:PARTITION]", "submitit-local")


class Executor(Protocol):
    """Runs ``fn`` over items somewhere and yields ``(index, result)`` as they complete."""

    name: str  # "local", "ray", "slurm" (also submitit's local executor)

    def map(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[Any],
        *,
        desc: str = "jobs",
        progress: bool = True,
    ) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, fn(items[index]))`` for every item exactly once, in completion
        order (``local``: in order). ``fn`` and the items must be picklable (module-level
        functions). Failures propagate after retries, naming the item."""
        ...

    def close(self) -> None:
        """Release what the executor started (a local Ray instance)."""
        ...


def make_executor(
    spec: str,
    *,
    cpus_per_job: float = 1.0,
    gpus_per_job: float = 0.0,
    max_retries: int = 3,
    log_dir: Path | None = None,
    timeout_min: int = DEFAULT_TIMEOUT_MIN,
) -> Executor:
    """The executor that ``spec`` names.

    Args:
        spec: ``local`` (this process, in order), ``ray`` (a local Ray instance),
            ``ray:ADDRESS`` (a running cluster: ``auto``, ``HOST:PORT`` or
            ``ray://HOST:10001``), ``slurm`` / ``slurm:PARTITION`` (SLURM through submitit)
            or ``submitit-local`` (submitit's local executor: one process per job).
        cpus_per_job / gpus_per_job: Resources each job asks for (Ray: fractions allowed;
            SLURM: rounded up per task).
        max_retries: Ray: retries of a task whose worker died; SLURM: resubmissions of a job
            that died without a result, and requeues after a time-out or preemption.
        log_dir: submitit's folder for job pickles and logs (required for ``slurm`` and
            ``submitit-local``; on a filesystem the compute nodes share).
        timeout_min: SLURM time limit per job, in minutes.

    Raises:
        ConfigError: Unknown spec, bad resources, or the executor's extra is not installed.
    """
    kind, _, arg = spec.strip().partition(":")
    kind = kind.lower()
    if cpus_per_job <= 0 or gpus_per_job < 0:
        raise ConfigError(
            f"--cpus-per-job must be > 0 and --gpus-per-job >= 0, got {cpus_per_job} and "
            f"{gpus_per_job}"
        )
    if max_retries < 0:
        raise ConfigError(f"--max-retries must be >= 0, got {max_retries}")
    if timeout_min < 1:
        raise ConfigError(f"timeout_min must be >= 1, got {timeout_min}")
    if kind == "local" and not arg:
        return LocalExecutor()
    if kind == "ray":
        return RayExecutor(
            address=arg or None,
            cpus_per_job=cpus_per_job,
            gpus_per_job=gpus_per_job,
            max_retries=max_retries,
        )
    if kind in ("slurm", "submitit-local") and not (kind == "submitit-local" and arg):
        if log_dir is None:
            raise ConfigError(f"--executor {spec} needs a folder for submitit's job files")
        return SubmititExecutor(
            cluster="slurm" if kind == "slurm" else "local",
            partition=arg or None,
            cpus_per_job=cpus_per_job,
            gpus_per_job=gpus_per_job,
            max_retries=max_retries,
            log_dir=Path(log_dir),
            timeout_min=timeout_min,
        )
    raise ConfigError(f"unknown executor {spec!r}; expected one of {', '.join(EXECUTOR_SPECS)}")


def _require(module: str, *, executor: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"--executor {executor} needs the {extra} extra: pip install 'vprompt[{extra}]'"
        ) from None


# ---------------------------------------------------------------------------- failures
@dataclass(frozen=True)
class _Failure:
    """A VPromptError raised by ``fn`` on a worker, carried back as a value (so it is never
    retried, and its type survives even when its constructor takes other arguments)."""

    kind: type[VPromptError]
    message: str


def _call(fn: Callable[[Any], Any], item: Any) -> Any:
    """Run ``fn(item)`` on a worker, returning vprompt's own errors instead of raising them."""
    try:
        return fn(item)
    except VPromptError as exc:
        return _Failure(type(exc), str(exc))


def _named(kind: type[VPromptError], message: str, item: Any) -> VPromptError:
    """The error ``kind`` with ``message`` prefixed by the item (VPromptError when ``kind``
    cannot be built from one message)."""
    text = f"{_describe(item)}: {message}"
    try:
        return kind(text)
    except Exception:
        return VPromptError(text)


def _describe(item: Any) -> str:
    text = str(item)
    return text if len(text) <= 120 else text[:117] + "..."


def _result(value: Any, item: Any) -> Any:
    if isinstance(value, _Failure):
        raise _named(value.kind, value.message, item)
    return value


# ---------------------------------------------------------------------------- local
class LocalExecutor:
    """Every item in this process, in order (what the protocol runner always did)."""

    name = "local"

    def map(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[Any],
        *,
        desc: str = "jobs",
        progress: bool = True,
    ) -> Iterator[tuple[int, Any]]:
        bar = tqdm(total=len(items), desc=desc, unit="job", disable=not progress)
        try:
            for index, item in enumerate(items):
                try:
                    value = fn(item)
                except VPromptError as exc:
                    raise _named(type(exc), str(exc), item) from exc
                bar.update(1)
                yield index, value
        finally:
            bar.close()

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------- ray
class RayExecutor:
    """Each item a Ray task with its resource request, retried when its worker dies."""

    name = "ray"

    def __init__(
        self,
        *,
        address: str | None,
        cpus_per_job: float,
        gpus_per_job: float,
        max_retries: int,
    ) -> None:
        ray = _require("ray", executor=f"ray{':' + address if address else ''}", extra="ray")
        self.max_retries = max_retries
        # Only a Ray instance this executor started is shut down by close().
        self._owns = not ray.is_initialized()
        if self._owns:
            extra = {} if address else {"include_dashboard": False}
            try:
                ray.init(address=address or None, ignore_reinit_error=True, **extra)
            except ConnectionError as exc:
                raise ConfigError(f"--executor ray:{address}: {exc}") from None
        self._task = ray.remote(
            num_cpus=cpus_per_job,
            num_gpus=gpus_per_job,
            max_retries=max_retries,
            retry_exceptions=False,  # only system failures (a dead worker) are retried
        )(_call)

    def map(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[Any],
        *,
        desc: str = "jobs",
        progress: bool = True,
    ) -> Iterator[tuple[int, Any]]:
        import ray
        from ray.exceptions import RayError, RayTaskError

        index_of = {self._task.remote(fn, item): i for i, item in enumerate(items)}
        pending = list(index_of)
        bar = tqdm(total=len(items), desc=desc, unit="job", disable=not progress)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    i = index_of[ref]
                    try:
                        value = ray.get(ref)
                    except RayTaskError as exc:
                        cause = getattr(exc, "cause", None) or exc
                        raise VPromptError(
                            f"{_describe(items[i])}: failed on a Ray worker: "
                            f"{type(cause).__name__}: {_last_line(cause)}"
                        ) from exc
                    except RayError as exc:  # the worker died on every try
                        raise VPromptError(
                            f"{_describe(items[i])}: its Ray worker died "
                            f"{self.max_retries + 1} time(s) (--max-retries "
                            f"{self.max_retries}): {type(exc).__name__}: {_last_line(exc)}"
                        ) from exc
                    bar.update(1)
                    yield i, _result(value, items[i])
        finally:
            bar.close()
            for ref in pending:  # a failure or an abandoned loop: stop the rest
                with contextlib.suppress(Exception):  # already finished or gone
                    ray.cancel(ref)

    def close(self) -> None:
        if self._owns:
            import ray

            if ray.is_initialized():
                ray.shutdown()
            self._owns = False


def _last_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


# ---------------------------------------------------------------------------- submitit
class _Checkpointable:
    """The callable submitit runs: ``checkpoint`` lets submitit requeue a job that reaches its
    time limit or is preempted (it resumes from its own folder's checkpoint)."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn

    def __call__(self, item: Any) -> Any:
        return _call(self.fn, item)

    def checkpoint(self, item: Any) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, item)


class SubmititExecutor:
    """Each item a SLURM job (one job array per map), or a local process with
    ``cluster="local"``; a job that died without a result is resubmitted."""

    def __init__(
        self,
        *,
        cluster: str,
        partition: str | None,
        cpus_per_job: float,
        gpus_per_job: float,
        max_retries: int,
        log_dir: Path,
        timeout_min: int,
    ) -> None:
        spec = "slurm" + (f":{partition}" if partition else "") if cluster == "slurm" else (
            "submitit-local"
        )  # fmt: skip
        submitit = _require("submitit", executor=spec, extra="slurm")
        self.name = "slurm"
        self.max_retries = max_retries
        self.poll_s = 0.5 if cluster == "local" else 10.0
        log_dir.mkdir(parents=True, exist_ok=True)
        if cluster == "slurm":
            if shutil.which("sbatch") is None:
                raise ConfigError(
                    f"--executor {spec} needs SLURM's sbatch on PATH (run it on a login node)"
                )
            self._executor = submitit.AutoExecutor(
                folder=log_dir, cluster="slurm", slurm_max_num_timeout=max_retries
            )
            params: dict[str, Any] = {
                "name": "vprompt",
                "timeout_min": timeout_min,
                "nodes": 1,
                "tasks_per_node": 1,
                "cpus_per_task": max(1, math.ceil(cpus_per_job)),
                "gpus_per_node": math.ceil(gpus_per_job),
            }
            if partition:
                params["slurm_partition"] = partition
        else:
            self._executor = submitit.LocalExecutor(folder=log_dir, max_num_timeout=max_retries)
            params = {"timeout_min": timeout_min}
        self._executor.update_parameters(**params)

    def map(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[Any],
        *,
        desc: str = "jobs",
        progress: bool = True,
    ) -> Iterator[tuple[int, Any]]:
        from submitit.core.utils import FailedJobError, UncompletedJobError

        task = _Checkpointable(fn)
        jobs = dict(enumerate(self._executor.map_array(task, list(items)))) if items else {}
        tries = dict.fromkeys(jobs, 0)
        bar = tqdm(total=len(items), desc=desc, unit="job", disable=not progress)
        try:
            while jobs:
                finished = [i for i, job in jobs.items() if job.done()]
                if not finished:
                    time.sleep(self.poll_s)
                for i in finished:
                    job = jobs.pop(i)
                    try:
                        value = job.result()
                    except UncompletedJobError as exc:  # killed, node failure: try again
                        if tries[i] >= self.max_retries:
                            raise VPromptError(
                                f"{_describe(items[i])}: its job {job.job_id} died without a "
                                f"result {tries[i] + 1} time(s) (--max-retries "
                                f"{self.max_retries}); logs in {self._executor.folder}"
                            ) from exc
                        tries[i] += 1
                        jobs[i] = self._executor.submit(task, items[i])
                        continue
                    except FailedJobError as exc:
                        raise VPromptError(
                            f"{_describe(items[i])}: job {job.job_id} failed: "
                            f"{_last_line(exc)} (log: {job.paths.stderr})"
                        ) from exc
                    bar.update(1)
                    yield i, _result(value, items[i])
        finally:
            bar.close()
            for job in jobs.values():  # a failure or an abandoned loop: stop the rest
                with contextlib.suppress(Exception):  # already finished or gone
                    job.cancel(check=False)

    def close(self) -> None:
        pass
