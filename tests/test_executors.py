"""Executors of protocol jobs: in-process, a real local Ray instance, submitit's local executor."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from vprompt.data.suite.synthetic import write_fake_dataset
from vprompt.engine.executors import Executor, make_executor
from vprompt.engine.protocol import Job, ProtocolRun, plan_jobs, run_protocol
from vprompt.errors import ConfigError, VPromptError

# CoOp trains for three epochs, with an epoch checkpoint after each: enough to kill a job after
# its first epoch and see the retry continue from the second.
COOP = ("n_ctx=4", "optim.epochs=3", "optim.batch_size=4", "optim.warmup_epochs=0",
        "augment=false")  # fmt: skip


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("suite")
    write_fake_dataset("dtd", root, num_classes=5, images_per_class=(5, 3, 2))
    write_fake_dataset("eurosat", root, num_classes=4, images_per_class=(4, 2, 2))
    return root


def _protocol(data_root: Path, out: Path) -> tuple[ProtocolRun, list[Job]]:
    run = ProtocolRun(
        protocol="few-shot",
        method="coop",
        model="clip:tiny",
        weights="none",
        data_root=data_root,
        out_dir=out,
        overrides=COOP,
        progress=False,
    )
    return run, plan_jobs("few-shot", method="coop", datasets=["dtd", "eurosat"], shots=[1],
                          seeds=[1])  # fmt: skip


@pytest.fixture(scope="module")
def local_table(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The reference: the same protocol in this process (the default executor)."""
    out = tmp_path_factory.mktemp("local")
    run_protocol(*_protocol(data_root, out))
    return (out / "table.md").read_text()


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    pytest.importorskip("ray")
    import ray
    import ray.cloudpickle

    # Functions of this module (the job that kills its worker) travel to workers by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


# ---------------------------------------------------------------------------- spec, extras
@pytest.mark.parametrize("spec", ["dask", "local:4", "submitit-local:x", ""])
def test_unknown_executor_is_one_line(spec: str) -> None:
    with pytest.raises(ConfigError, match="unknown executor") as info:
        make_executor(spec, log_dir=Path("unused"))
    assert "\n" not in str(info.value)


def test_bad_resources_are_refused() -> None:
    with pytest.raises(ConfigError, match="cpus-per-job"):
        make_executor("local", cpus_per_job=0)
    with pytest.raises(ConfigError, match="max-retries"):
        make_executor("local", max_retries=-1)


@pytest.mark.parametrize(
    ("spec", "module", "extra"),
    [("ray", "ray", "ray"), ("ray:auto", "ray", "ray"), ("slurm:gpu", "submitit", "slurm"),
     ("submitit-local", "submitit", "slurm")],
)  # fmt: skip
def test_missing_extra_is_one_line(
    spec: str, module: str, extra: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(ConfigError) as info:
        make_executor(spec, log_dir=tmp_path)
    assert str(info.value) == f"--executor {spec} needs the {extra} extra: pip install " + (
        f"'vprompt[{extra}]'"
    )


def test_missing_extra_through_the_cli(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from vprompt.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)
    res = CliRunner().invoke(main, ["protocol", "few-shot", "--method", "coop", "--model",
                                    "clip:tiny", "--weights", "none", "--data-root",
                                    str(data_root), "--datasets", "dtd", "--shots", "1",
                                    "--seeds", "1", "--out", str(tmp_path / "o"),
                                    "--executor", "ray"])  # fmt: skip
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1] == (
        "vprompt: error: --executor ray needs the ray extra: pip install 'vprompt[ray]'"
    )


# ---------------------------------------------------------------------------- map contract
def _square(x: int) -> int:
    if x == 13:
        raise ConfigError("thirteen is refused")
    if x == 17:
        raise ValueError("a bug")
    return x * x


def _check_map(executor: Executor) -> None:
    items = [1, 2, 3, 4, 5]
    got = list(executor.map(_square, items, progress=False))
    assert sorted(i for i, _ in got) == [0, 1, 2, 3, 4]
    assert dict(got) == {i: x * x for i, x in enumerate(items)}
    assert list(executor.map(_square, [], progress=False)) == []
    with pytest.raises(ConfigError, match=r"^13: thirteen is refused$"):
        list(executor.map(_square, [2, 13], progress=False))


def test_local_map_yields_in_order_and_names_the_failing_item() -> None:
    executor = make_executor("local")
    assert executor.name == "local"
    _check_map(executor)
    assert [i for i, _ in executor.map(_square, [3, 1, 2], progress=False)] == [0, 1, 2]
    with pytest.raises(ValueError, match="a bug"):  # not ours: raised as it is, here
        list(executor.map(_square, [17], progress=False))


def test_ray_map_yields_every_index_once_and_does_not_retry_errors(ray_cluster: None) -> None:
    executor = make_executor("ray", max_retries=2)
    assert executor.name == "ray"
    _check_map(executor)
    with pytest.raises(VPromptError, match=r"^17: failed on a Ray worker: ValueError: a bug"):
        list(executor.map(_square, [17], progress=False))
    executor.close()
    import ray

    assert ray.is_initialized()  # close() leaves a Ray instance it did not start


# ---------------------------------------------------------------------------- protocols
def test_ray_runs_the_protocol_with_the_local_table(
    ray_cluster: None, data_root: Path, tmp_path: Path, local_table: str
) -> None:
    run, jobs = _protocol(data_root, tmp_path / "ray")
    executor = make_executor("ray", cpus_per_job=1)
    seen: list[tuple[str, bool]] = []
    try:
        summary = run_protocol(
            run, jobs, executor=executor, on_job=lambda j, r, s: seen.append((j.key, s))
        )
    finally:
        executor.close()
    assert sorted(seen) == [("dtd/shots_1/seed_1", False), ("eurosat/shots_1/seed_1", False)]
    assert (tmp_path / "ray" / "table.md").read_text() == local_table
    assert [r["job"]["dataset"] for r in summary["records"]] == ["dtd", "eurosat"]
    for job in jobs:
        folder = tmp_path / "ray" / "jobs" / job.key
        assert (folder / "result.json").is_file()
        assert (folder / "train" / "prompt.safetensors").is_file()


def _dying_job(scratch: str, fn: Callable[[Any], Any], payload: Any) -> Any:
    """Run ``fn(payload)``, logging each trained epoch; the first job to finish an epoch
    checkpoint kills its worker right after it (once over all workers, by a flag file)."""
    import importlib

    fit: Any = importlib.import_module("vprompt.engine.fit")  # the package exports fit() too
    root = Path(scratch)
    if not getattr(fit, "_test_patched", False):
        train, save = fit.train_one_epoch, fit.save_checkpoint

        def logged_train(*args: Any, **kwargs: Any) -> Any:
            with (root / "epochs.log").open("a") as fh:
                fh.write(f"{fit._test_job} {kwargs['epoch']} {os.getpid()}\n")
            return train(*args, **kwargs)

        def save_then_die(out: Path, ckpt: Any) -> None:
            save(out, ckpt)
            if ckpt.epochs_done == 1 and not ckpt.finished:
                try:
                    os.close(os.open(root / "killed", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    return
                (root / "killed").write_text(fit._test_job)
                os._exit(1)

        fit.train_one_epoch, fit.save_checkpoint = logged_train, save_then_die
        fit._test_patched = True
    fit._test_job = str(payload)
    return fn(payload)


class _KillingExecutor:
    """Ray, with every job wrapped in :func:`_dying_job`."""

    name = "ray"

    def __init__(self, inner: Executor, scratch: Path) -> None:
        self.inner, self.scratch = inner, scratch

    def map(
        self, fn: Callable[[Any], Any], items: Sequence[Any], *, desc: str = "jobs",
        progress: bool = True,
    ) -> Iterator[tuple[int, Any]]:  # fmt: skip
        wrapped = partial(_dying_job, str(self.scratch), fn)
        return self.inner.map(wrapped, items, desc=desc, progress=progress)

    def close(self) -> None:
        self.inner.close()


def test_a_killed_worker_is_retried_and_the_job_resumes(
    ray_cluster: None, data_root: Path, tmp_path: Path, local_table: str
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    run, jobs = _protocol(data_root, tmp_path / "out")
    executor = _KillingExecutor(make_executor("ray", max_retries=2), scratch)
    try:
        run_protocol(run, jobs, executor=executor)
    finally:
        executor.close()
    killed = (scratch / "killed").read_text()  # "job dtd/shots_1/seed_1"
    log = [line.split() for line in (scratch / "epochs.log").read_text().splitlines()]
    epochs = [(int(e), pid) for _, key, e, pid in log if f"job {key}" == killed]
    # Epoch 0 in the killed worker, then epochs 1 and 2 in another: resumed, not restarted.
    assert [e for e, _ in epochs] == [0, 1, 2], log
    assert epochs[0][1] != epochs[1][1] == epochs[2][1]
    # The resumed run matches an uninterrupted one, and the table is complete.
    assert (tmp_path / "out" / "table.md").read_text() == local_table


@pytest.mark.slow  # ~25 s: each job is a fresh process importing torch and open_clip
def test_submitit_local_runs_the_protocol_with_the_local_table(
    data_root: Path, tmp_path: Path, local_table: str
) -> None:
    pytest.importorskip("submitit")
    run, jobs = _protocol(data_root, tmp_path / "sub")
    executor = make_executor("submitit-local", log_dir=tmp_path / "sub" / "submitit")
    assert executor.name == "slurm"
    summary = run_protocol(run, jobs, executor=executor)
    assert len(summary["records"]) == 2
    assert (tmp_path / "sub" / "table.md").read_text() == local_table
    # A second run finds every job done and submits nothing.
    seen: list[bool] = []
    run_protocol(run, jobs, executor=executor, on_job=lambda j, r, s: seen.append(s))
    assert seen == [True, True]
