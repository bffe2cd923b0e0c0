"""``vprompt train | eval``: learn prompts on a dataset and evaluate packs."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from functools import wraps
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
    pack_weights_options,
    preset_option,
    weights_option,
    with_descriptions,
)
from vprompt.utils import jsonio

_DATA_HELP = (
    "fashion-mnist[:PATH], folder:PATH, csv:PATH, json:PATH, or a benchmark dataset name "
    "(oxford_pets, imagenet, … read from --data-root)."
)
data_root_option = click.option(
    "--data-root",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder holding the benchmark datasets (default: $VPROMPT_DATA_ROOT).",
)
shots_option = click.option(
    "--shots",
    default=None,
    type=click.IntRange(min=1),
    help="Benchmark datasets: the reference's seeded K-shot sampling (seed: --seed).",
)
subsample_option = click.option(
    "--subsample",
    default="all",
    show_default=True,
    type=click.Choice(["all", "base", "new"]),
    help="Benchmark datasets: keep the base or new half of the classes.",
)


def _data_parallel(fn: Callable[..., None]) -> Callable[..., None]:
    """Run the command inside torchrun's process group when torchrun launched it, on this
    rank's device. Joined after --out was checked and before anything is written there."""

    @wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        from vprompt.engine import distributed

        with distributed.process_group(kwargs["device"]) as rank_device:
            fn(*args, **{**kwargs, "device": str(rank_device)})

    return run


@main.command("train")
@click.option(
    "--method",
    "method_name",
    default=None,
    help="Registered method (coop, visual-prompt, linear-probe, full-finetune, …); "
    "required unless --preset names it.",
)
@preset_option
@click.option(
    "--model",
    "model",
    default=None,
    help="Backbone as FAMILY:ARCH (default with --preset: the preset's model).",
)
@weights_option
@click.option(
    "--data",
    "data_spec",
    required=True,
    multiple=True,
    help=_DATA_HELP + " Repeat it for methods that learn across datasets (dam-vp-meta).",
)
@data_root_option
@shots_option
@subsample_option
@click.option(
    "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Run folder."
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Config override, e.g. optim.lr=0.1 (repeatable); `vprompt presets --method NAME` "
    "lists every key of a method with its default and meaning.",
)
@descriptions_option
@click.option(
    "--unlabeled",
    "unlabeled",
    default=None,
    type=click.Path(file_okay=False),
    help="A folder of unlabelled training images (all images under it) for methods that "
    "learn without labels (promptkd); --data still gives the classes and the test split.",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--train-subset",
    default=None,
    type=click.IntRange(min=1),
    help="Train on a seeded random subset of N images (of each dataset, with several --data).",
)
@click.option(
    "--test-subset",
    default=None,
    type=click.IntRange(min=1),
    help="Evaluate on a seeded random subset of N test images (of each dataset, with several "
    "--data).",
)
@click.option(
    "--resume/--no-resume",
    default=True,
    show_default=True,
    help="Continue this run from the run folder's last checkpoint (--no-resume: start it over).",
)
@click.option(
    "--workers",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Data-loading worker processes.",
)
@feature_cache_options
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print the final test metrics as JSON.")
@friendly_errors
@output_folder("train", param="out_dir", by_inputs=False, pass_overwrite=True)
@_data_parallel
def train_cmd(
    method_name: str | None,
    preset_name: str | None,
    model: str | None,
    weights: str | None,
    data_spec: tuple[str, ...],
    data_root: str | None,
    shots: int | None,
    subsample: str,
    out_dir: str,
    overrides: tuple[str, ...],
    descriptions: str | None,
    unlabeled: str | None,
    seed: int,
    train_subset: int | None,
    test_subset: int | None,
    resume: bool,
    workers: int,
    feature_cache: str | None,
    no_feature_cache: bool,
    device: str,
    as_json: bool,
    overwrite: bool,
) -> None:
    """Learn a prompt for a frozen model on a dataset; writes the pack, metrics and plots to OUT.

    Under ``torchrun --nproc_per_node N -m vprompt train …`` the N processes train one prompt
    data-parallel (``optim.batch_size`` is the global batch); rank 0 writes and reports.
    """
    from vprompt.engine import distributed
    from vprompt.engine.experiment import Experiment, run
    from vprompt.methods.presets import get_preset

    main = distributed.is_main()

    preset = get_preset(preset_name) if preset_name else None
    overrides = with_descriptions(overrides, descriptions)
    experiment = Experiment(method_name, preset_name, overrides)
    model = model_for(model, preset)
    cls = experiment.method_class
    if not cls.capabilities.uses_training_data:
        raise click.UsageError(
            f"method {experiment.method!r} has nothing to train; see `vprompt zeroshot`"
        )
    for note in experiment.config(shots=shots)[1] if main else ():
        click.echo(f"vprompt: {note}", err=True)
    if main and not cls.capabilities.is_prompt_method:
        click.echo(
            f"vprompt: note: {experiment.method} is a reference baseline, not a prompt method "
            "(it changes a copy of the backbone's weights)",
            err=True,
        )
    report = run(
        experiment.method,
        preset=preset_name,
        overrides=overrides,
        model=model,
        weights=weights,
        data=data_spec[0] if len(data_spec) == 1 else data_spec,
        data_root=data_root,
        shots=shots,
        subsample=subsample,  # type: ignore[arg-type]  # click.Choice checked it
        seed=seed,
        train_subset=train_subset,
        test_subset=test_subset,
        out_dir=out_dir,
        resume=resume,
        overwrite=overwrite,
        num_workers=workers,
        feature_cache=feature_cache_dir(feature_cache, no_feature_cache),
        device=device,
        unlabeled=unlabeled,
        progress=main,
    )
    if not main:
        return
    if as_json:
        click.echo(jsonio.dumps(report.summary, ensure_ascii=False))
        return
    if report.fit is not None:
        click.echo(f"pack:    {report.fit.pack_path}")
    click.echo(f"outputs: {out_dir} (metrics.jsonl, config.json, test_metrics.json, *.png)")
    click.echo(f"test accuracy: {100 * report.test.accuracy:.1f}% on {report.test.n} images")


@main.command("eval")
@click.option(
    "--pack",
    "pack_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="The prompt pack to evaluate (with --method: the pack the method starts from).",
)
@click.option(
    "--method",
    "method_name",
    default=None,
    help="Evaluate a method that learns nothing beforehand (zeroshot, test-time methods such "
    "as tpt), built on --model or on --pack's model and context.",
)
@click.option("--model", default=None, help="Backbone as FAMILY:ARCH for --method without --pack.")
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Config override of --method."
)
@click.option("--data", "data_spec", required=True, help=_DATA_HELP)
@data_root_option
@subsample_option
@click.option(
    "--split", default="test", show_default=True, type=click.Choice(["test", "val", "train"])
)
@click.option(
    "--subset", default=None, type=click.IntRange(min=1), help="Seeded random subset of N images."
)
@pack_weights_options
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0))
@feature_cache_options
@device_option
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def eval_cmd(
    pack_path: str | None,
    method_name: str | None,
    model: str | None,
    overrides: tuple[str, ...],
    data_spec: str,
    data_root: str | None,
    subsample: str,
    split: str,
    subset: int | None,
    weights: str | None,
    allow_download: bool,
    workers: int,
    feature_cache: str | None,
    no_feature_cache: bool,
    device: str,
    as_json: bool,
) -> None:
    """Evaluate a prompt pack on a dataset split."""
    from vprompt.backbones.registry import resolve_device
    from vprompt.data.feature_cache import FeatureCache
    from vprompt.data.sources import load_data
    from vprompt.engine import evaluate
    from vprompt.engine.experiment import random_subset
    from vprompt.engine.pack import build_from_pack, check_classnames, load_pack
    from vprompt.errors import DatasetError

    if pack_path is None and method_name is None:
        raise click.UsageError("give --pack, or --method with --model (or with --pack)")
    splits = load_data(
        data_spec,
        data_root=data_root,
        subsample=subsample,  # type: ignore[arg-type]
        test_only_ok=split == "test",
    )
    data = {"test": splits.test, "val": splits.val, "train": splits.train}[split]
    if data is None:
        raise DatasetError(f"{data_spec} has no {split} split")
    dev = resolve_device(device)
    if method_name is None:
        assert pack_path is not None
        pack = load_pack(pack_path)
        check_classnames(pack, data.classnames)
        method = build_from_pack(pack, weights=weights, device=dev, allow_download=allow_download)
    else:
        method = _method_for_eval(
            method_name, overrides, pack_path, model, weights, allow_download, dev, data_spec,
            data.classnames,
        )  # fmt: skip
    cache_dir = feature_cache_dir(feature_cache, no_feature_cache)
    scores = evaluate(
        method,
        random_subset(data, subset, 1),
        device=dev,
        num_workers=workers,
        feature_cache=FeatureCache(cache_dir) if cache_dir is not None else None,
    )
    report = {
        "pack": pack_path,
        "method": method.name,
        "data": data_spec,
        "split": split,
        "images": scores.n,
        "accuracy": scores.accuracy,
        "loss": scores.loss,
        "per_class_accuracy": scores.per_class_accuracy,
    }
    if as_json:
        click.echo(jsonio.dumps(report, ensure_ascii=False))
    else:
        click.echo(f"{split} accuracy: {100 * scores.accuracy:.1f}% on {scores.n} images")


def _method_for_eval(
    method_name: str,
    overrides: tuple[str, ...],
    pack_path: str | None,
    model: str | None,
    weights: str | None,
    allow_download: bool,
    device: Any,
    data_spec: str,
    classnames: list[str],
) -> Any:
    """``--method``: a method that learns nothing beforehand, on ``--model`` or on the pack's
    backbone with the pack as its ``init_pack``, for the data's classes (and, on a benchmark
    dataset, its reference settings and template)."""
    from pathlib import Path

    from vprompt.backbones import load_backbone
    from vprompt.engine.experiment import Experiment, benchmark_dataset
    from vprompt.engine.pack import build_from_pack, load_pack

    experiment = Experiment(method_name, None, overrides)
    cls = experiment.method_class
    if cls.capabilities.uses_training_data:
        raise click.UsageError(
            f"{method_name} learns from training data: train it (vprompt train) and evaluate "
            "its pack with --pack alone"
        )
    if pack_path is not None:
        if "init_pack" not in {f.name for f in dataclasses.fields(cls.Config)}:
            raise click.UsageError(f"{method_name} does not start from a pack; drop --pack")
        base = build_from_pack(
            load_pack(pack_path), weights=weights, device=device, allow_download=allow_download
        )
        backbone = base.backbone
        local = not pack_path.startswith("hf-hub:")  # a hub spec stays a spec
        start = json.dumps(str(Path(pack_path).expanduser().absolute()) if local else pack_path)
        experiment = Experiment(method_name, None, (*overrides, f"init_pack={start}"))
    elif model is None:
        raise click.UsageError(f"--method {method_name} needs --model (or --pack)")
    else:
        backbone = load_backbone(model, weights, device=device)
    suite = benchmark_dataset(data_spec)
    return experiment.build(
        backbone,
        classnames,
        dataset=suite.name if suite else None,
        template=suite.template if suite else None,
    ).to(device)
