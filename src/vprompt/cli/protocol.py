"""``vprompt protocol``: the papers' evaluation protocols as resumable jobs and tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from vprompt.cli.common import (
    descriptions_option,
    device_option,
    feature_cache_dir,
    feature_cache_options,
    friendly_errors,
    main,
    model_for,
    output_folder,
    preset_option,
    weights_option,
    with_descriptions,
)
from vprompt.utils import jsonio

_DEFAULT_SHOTS = {
    "few-shot": "1,2,4,8,16",
    "base-to-novel": "16",
    "cross-dataset": "16",
    "domain-gen": "16",
}


def _int_list(value: str, what: str) -> list[int]:
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        message = f"{what}: expected comma-separated integers, got {value!r}"
        raise click.BadParameter(message) from None
    if not items:
        raise click.BadParameter(f"{what} is empty")
    return items


@main.command("protocol")
@click.argument(
    "protocol", type=click.Choice(["few-shot", "base-to-novel", "cross-dataset", "domain-gen"])
)
@click.option(
    "--method",
    "method_name",
    default=None,
    help="Registered method; required unless --preset names it.",
)
@preset_option
@click.option(
    "--model",
    default=None,
    help="Backbone as FAMILY:ARCH (default with --preset: the preset's model).",
)
@weights_option
@click.option(
    "--data-root",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder holding the datasets (default: $VPROMPT_DATA_ROOT).",
)
@click.option(
    "--datasets",
    default="",
    help="Comma-separated datasets (few-shot, base-to-novel: required; cross-dataset: targets, "
    "default the other ten; domain-gen: targets, default the four ImageNet variants).",
)
@click.option(
    "--source",
    default="imagenet",
    show_default=True,
    help="Training dataset of cross-dataset and domain-gen.",
)
@click.option(
    "--shots",
    default=None,
    help="Comma-separated shots per class (default: 1,2,4,8,16 for few-shot, else 16).",
)
@click.option("--seeds", default="1,2,3", show_default=True, help="Comma-separated seeds.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Config override.")
@descriptions_option
@click.option(
    "--select",
    default="last",
    show_default=True,
    type=click.Choice(["last", "best-val"]),
    help="Keep the last epoch's prompt (as the reference code) or the best on validation.",
)
@feature_cache_options
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0))
@device_option
@click.option(
    "--executor",
    "executor_spec",
    default="local",
    show_default=True,
    metavar="SPEC",
    help="Where jobs run: local (this process), ray (a local Ray instance), ray:ADDRESS (a Ray "
    "cluster, e.g. ray:auto), slurm[:PARTITION] (SLURM through submitit) or submitit-local. "
    "Needs the ray or slurm extra; see docs/scaling.md.",
)
@click.option(
    "--cpus-per-job",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="CPUs each job asks of Ray or SLURM.",
)
@click.option(
    "--gpus-per-job",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="GPUs each job asks of Ray (fractions share a GPU) or SLURM (rounded up).",
)
@click.option(
    "--max-retries",
    default=3,
    show_default=True,
    type=click.IntRange(min=0),
    help="Ray: retries of a job whose worker died; SLURM: resubmissions and requeues. A retry "
    "resumes from the job's last epoch checkpoint.",
)
@click.option(
    "--timeout-min",
    default=24 * 60,
    show_default=True,
    type=click.IntRange(min=1),
    help="SLURM time limit per job (minutes); a job reaching it is requeued and resumes.",
)
@click.option("--dry-run", is_flag=True, help="List the jobs (and which are done) and stop.")
@click.option("--json", "as_json", is_flag=True, help="Print results.json's table data.")
@friendly_errors
@output_folder("protocol", param="out_dir", by_inputs=False, pass_overwrite=True)
def protocol_cmd(
    protocol: str,
    method_name: str | None,
    preset_name: str | None,
    model: str | None,
    weights: str | None,
    data_root: str | None,
    datasets: str,
    source: str,
    shots: str | None,
    seeds: str,
    out_dir: str,
    overrides: tuple[str, ...],
    descriptions: str | None,
    select: str,
    feature_cache: str | None,
    no_feature_cache: bool,
    workers: int,
    device: str,
    executor_spec: str,
    cpus_per_job: float,
    gpus_per_job: float,
    max_retries: int,
    timeout_min: int,
    dry_run: bool,
    as_json: bool,
    overwrite: bool,
) -> None:
    """Run a paper protocol: every (dataset x shots x seed) job, skipping finished ones.

    Writes OUT/jobs/<dataset>/shots_K/seed_S/result.json per job, then OUT/results.json,
    OUT/table.md and OUT/table.csv laid out like the papers' tables. With --executor ray or
    slurm the jobs run as Ray tasks or SLURM jobs writing into the same OUT (on a filesystem
    every worker shares); this process shows the progress and writes the table.
    """
    from vprompt.data.sources import resolve_data_root
    from vprompt.engine.executors import make_executor
    from vprompt.engine.protocol import (
        RESULT_FILE,
        ProtocolRun,
        missing_datasets,
        plan_jobs,
        run_protocol,
    )
    from vprompt.methods.presets import get_preset, resolve_method

    preset = get_preset(preset_name) if preset_name else None
    overrides = with_descriptions(overrides, descriptions)
    method_name = resolve_method(preset, method_name)
    model = model_for(model, preset)
    jobs = plan_jobs(
        protocol,  # type: ignore[arg-type]  # click.Choice checked it
        method=method_name,
        datasets=[d.strip() for d in datasets.split(",") if d.strip()],
        shots=_int_list(shots or _DEFAULT_SHOTS[protocol], "--shots"),
        seeds=_int_list(seeds, "--seeds"),
        source=source,
    )
    out = Path(out_dir)
    if dry_run:
        root = resolve_data_root(data_root)
        for job in jobs:
            done = (out / "jobs" / job.key / RESULT_FILE).is_file()
            targets = f" -> {','.join(job.targets)}" if job.targets else ""
            missing = missing_datasets(job, root)
            state = "done" if done else ("missing data" if missing else "todo")
            why = f"  ({'; '.join(missing)})" if missing and not done else ""
            click.echo(f"{state}  {job.key}{targets}{why}")
        return
    cache = feature_cache_dir(feature_cache, no_feature_cache)
    run = ProtocolRun(
        protocol=protocol,  # type: ignore[arg-type]
        method=method_name,
        model=model,
        weights=weights,
        data_root=resolve_data_root(data_root),
        out_dir=out,
        overrides=overrides,
        select=select,  # type: ignore[arg-type]
        device=device,
        num_workers=workers,
        feature_cache=cache,
        preset=preset_name,
        overwrite=overwrite,
    )

    def report(job: Any, record: dict[str, Any], skipped: bool) -> None:
        metrics = record["metrics"]
        text = ", ".join(
            f"{k} {100 * v:.2f}" for k, v in metrics.items() if isinstance(v, int | float)
        )
        for name, value in metrics.get("targets", {}).items():
            text += f", {name} {100 * value:.2f}"
        click.echo(f"{'skipped (done)' if skipped else 'finished'}  {job.key}: {text}", err=True)

    executor = make_executor(
        executor_spec,
        cpus_per_job=cpus_per_job,
        gpus_per_job=gpus_per_job,
        max_retries=max_retries,
        log_dir=out / "submitit",
        timeout_min=timeout_min,
    )
    try:
        summary = run_protocol(run, jobs, on_job=report, executor=executor)
    finally:
        executor.close()
    if as_json:
        click.echo(jsonio.dumps(summary["table"], ensure_ascii=False))
        return
    click.echo((out / "table.md").read_text(encoding="utf-8"))
    click.echo(f"outputs: {out} (results.json, table.md, table.csv, jobs/)")
