"""``vprompt features …``: fill the frozen-feature cache ahead of training, in shards."""

from __future__ import annotations

import click

from vprompt.cli.common import friendly_errors, main, model_option, weights_option
from vprompt.utils import jsonio


@main.group("features")
def features_group() -> None:
    """The frozen-feature cache: fill it ahead of training and evaluation."""


@features_group.command("extract")
@model_option
@weights_option
@click.option(
    "--method",
    "method",
    default="linear-probe",
    show_default=True,
    help="Image-feature method whose features are cached (methods extracting the same kind "
    "share the entries: linear-probe and coop do on CLIP models).",
)
@click.option("--data", "data_spec", required=True, help="fashion-mnist, folder:PATH, csv:PATH …")
@click.option(
    "--data-root",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder holding benchmark datasets (default: $VPROMPT_DATA_ROOT).",
)
@click.option(
    "--split",
    default="all",
    show_default=True,
    type=click.Choice(["train", "val", "test", "all"]),
)
@click.option(
    "--shards",
    default=1,
    show_default=True,
    type=int,
    help="Shards per cache entry, one executor task each.",
)
@click.option(
    "--executor",
    "executor",
    default="local",
    show_default=True,
    help="local, ray, ray:ADDRESS, slurm …",
)
@click.option("--cpus-per-job", default=1.0, show_default=True, type=float)
@click.option("--gpus-per-job", default=0.0, show_default=True, type=float)
@click.option(
    "--feature-cache",
    "feature_cache",
    default=None,
    type=click.Path(file_okay=False),
    help="Cache folder (default: $VPROMPT_CACHE/features, i.e. ~/.cache/vprompt/features).",
)
@click.option(
    "--batch-size",
    default=32,
    show_default=True,
    type=int,
    help="Images per forward: use the training / evaluation batch size for bit-equal features.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="Device of every worker: cpu, cuda, … or auto (all workers must resolve it alike).",
)
@click.option("--json", "as_json", is_flag=True, help="Print what was filled as one JSON object.")
@friendly_errors
def extract_cmd(
    model: str,
    weights: str | None,
    method: str,
    data_spec: str,
    data_root: str | None,
    split: str,
    shards: int,
    executor: str,
    cpus_per_job: float,
    gpus_per_job: float,
    feature_cache: str | None,
    batch_size: int,
    device: str,
    as_json: bool,
) -> None:
    """Encode a dataset's images into the feature cache, in shards on many workers.

    The cache ends up bit-identical to what training or evaluation with the same method,
    batch size and device would have written; an interrupted run resumes its finished shards.
    """
    from vprompt.cli.common import feature_cache_dir
    from vprompt.engine.feature_shards import extract_features

    cache = feature_cache_dir(feature_cache, False)
    assert cache is not None
    report = extract_features(
        model,
        weights,
        data_spec,
        data_root=data_root,
        split=split,
        shards=shards,
        executor=executor,
        cache_dir=cache,
        method=method,
        batch_size=batch_size,
        device=device,
        cpus_per_job=cpus_per_job,
        gpus_per_job=gpus_per_job,
        progress=not as_json,
    )
    if as_json:
        click.echo(jsonio.dumps(report.to_dict(), ensure_ascii=False))
        return
    for entry in report.entries:
        view = "eval view" if entry.view is None else f"view {entry.view}"
        click.echo(
            f"{entry.split} ({view}): {entry.encoded} of {entry.images} images encoded in "
            f"{entry.shards} shards ({entry.reused} reused) → {entry.space}"
        )
    folders = len({e.space for e in report.entries})
    click.echo(
        f"filled {len(report.entries)} split/view entries ({folders} cache folders), "
        f"{report.images} images in {report.seconds:.1f} s ({report.executor})"
    )
