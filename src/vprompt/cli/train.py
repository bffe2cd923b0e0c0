"""``vprompt train | eval``: learn prompts on a dataset and evaluate packs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from vprompt.cli.common import (
    device_option,
    feature_cache_dir,
    feature_cache_options,
    friendly_errors,
    main,
    model_for,
    preset_option,
    weights_option,
)


def _subset(data: Any, n: int | None, seed: int) -> Any:
    """A seeded random subset of ``n`` items (all of them when ``n`` is None or too large)."""
    if n is None or n >= len(data):
        return data
    import torch

    from vprompt.data.dataset import Subset

    gen = torch.Generator().manual_seed(seed)
    return Subset(data, sorted(torch.randperm(len(data), generator=gen)[:n].tolist()))


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


def _write_json(path: Path, data: Any) -> None:
    from vprompt.utils.io import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


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
@click.option("--data", "data_spec", required=True, help=_DATA_HELP)
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
    help="Config override, e.g. optim.lr=0.1 (repeatable).",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--train-subset",
    default=None,
    type=click.IntRange(min=1),
    help="Train on a seeded random subset of N images.",
)
@click.option(
    "--test-subset",
    default=None,
    type=click.IntRange(min=1),
    help="Evaluate on a seeded random subset of N test images.",
)
@click.option(
    "--resume/--no-resume",
    default=True,
    show_default=True,
    help="Continue from the run folder's last checkpoint.",
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
def train_cmd(
    method_name: str | None,
    preset_name: str | None,
    model: str | None,
    weights: str | None,
    data_spec: str,
    data_root: str | None,
    shots: int | None,
    subsample: str,
    out_dir: str,
    overrides: tuple[str, ...],
    seed: int,
    train_subset: int | None,
    test_subset: int | None,
    resume: bool,
    workers: int,
    feature_cache: str | None,
    no_feature_cache: bool,
    device: str,
    as_json: bool,
) -> None:
    """Learn a prompt for a frozen model on a dataset; writes the pack, metrics and plots to OUT."""
    from vprompt.backbones import load_backbone
    from vprompt.backbones.registry import resolve_device
    from vprompt.data.feature_cache import FeatureCache
    from vprompt.data.sources import load_data
    from vprompt.engine import evaluate, fit
    from vprompt.methods.base import METHODS
    from vprompt.methods.presets import get_preset, resolve_method

    preset = get_preset(preset_name) if preset_name else None
    method_name = resolve_method(preset, method_name)
    model = model_for(model, preset)
    cls = METHODS.get(method_name)
    if not hasattr(cls, "trainable_parameters"):
        raise click.UsageError(
            f"method {method_name!r} has nothing to train; see `vprompt zeroshot`"
        )
    config = _preset_config(cls, preset, overrides, shots)
    splits = load_data(
        data_spec,
        data_root=data_root,
        shots=shots,
        seed=seed,
        subsample=subsample,  # type: ignore[arg-type]  # click.Choice checked it
    )
    train = _subset(splits.train, train_subset, seed)
    test = _subset(splits.test, test_subset, seed + 1)
    dev = resolve_device(device)
    backbone = load_backbone(model, weights, device=dev)
    method = cls(backbone, splits.classnames, config)
    if not cls.is_prompt_method:
        click.echo(
            f"vprompt: note: {method_name} is a reference baseline, not a prompt method "
            "(it changes a copy of the backbone's weights)",
            err=True,
        )
    out = Path(out_dir)
    cache_dir = feature_cache_dir(feature_cache, no_feature_cache)
    cache = FeatureCache(cache_dir) if cache_dir is not None else None
    result = fit(
        method,
        train,
        val=splits.val,
        out_dir=out,
        device=dev,
        seed=seed,
        resume=resume,
        num_workers=workers,
        feature_cache=cache,
    )
    scores = evaluate(
        method,
        test,
        device=dev,
        num_workers=workers,
        batch_size=max(method.config.optim.batch_size, 64),
        feature_cache=cache,
    )
    report = {
        "method": method_name,
        "preset": preset_name,
        "model": model,
        "weights": backbone.weights,
        "data": data_spec,
        "shots": shots,
        "subsample": subsample,
        "test_images": scores.n,
        "test_accuracy": scores.accuracy,
        "test_loss": scores.loss,
        "per_class_accuracy": scores.per_class_accuracy,
        "selected": result.selected,
        "best_epoch": result.best_epoch,
        "pack": str(result.pack_path),
    }
    _write_json(out / "test_metrics.json", report)
    if as_json:
        click.echo(json.dumps(report, ensure_ascii=False))
        return
    click.echo(f"pack:    {result.pack_path}")
    click.echo(f"outputs: {out} (metrics.jsonl, config.json, test_metrics.json, *.png)")
    click.echo(f"test accuracy: {100 * scores.accuracy:.1f}% on {scores.n} images")


def _preset_config(cls: Any, preset: Any, overrides: tuple[str, ...], shots: int | None) -> Any:
    """The method's defaults, then the preset (with its epochs for ``shots`` unless --set
    gives optim.epochs), then the --set overrides."""
    from vprompt.methods.base import apply_overrides
    from vprompt.methods.presets import apply_config_mapping, with_epochs

    config = cls.Config()
    if preset is not None:
        config = apply_config_mapping(config, preset.config, what=f"preset {preset.name}")
        user_sets_epochs = any(o.split("=", 1)[0].strip() == "optim.epochs" for o in overrides)
        epochs = None if user_sets_epochs else preset.epochs_for(shots)
        if epochs is not None:
            config = with_epochs(config, epochs)
            click.echo(f"vprompt: preset {preset.name}: {shots} shots -> {epochs} epochs", err=True)
    return apply_overrides(config, overrides)


@main.command("eval")
@click.option("--pack", "pack_path", required=True, type=click.Path(dir_okay=False))
@click.option("--data", "data_spec", required=True, help=_DATA_HELP)
@data_root_option
@subsample_option
@click.option(
    "--split", default="test", show_default=True, type=click.Choice(["test", "val", "train"])
)
@click.option(
    "--subset", default=None, type=click.IntRange(min=1), help="Seeded random subset of N images."
)
@weights_option
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0))
@feature_cache_options
@device_option
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def eval_cmd(
    pack_path: str,
    data_spec: str,
    data_root: str | None,
    subsample: str,
    split: str,
    subset: int | None,
    weights: str | None,
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
    from vprompt.engine.pack import build_from_pack, check_classnames, load_pack
    from vprompt.errors import DatasetError

    pack = load_pack(pack_path)
    splits = load_data(
        data_spec,
        data_root=data_root,
        subsample=subsample,  # type: ignore[arg-type]
        test_only_ok=split == "test",
    )
    data = {"test": splits.test, "val": splits.val, "train": splits.train}[split]
    if data is None:
        raise DatasetError(f"{data_spec} has no {split} split")
    check_classnames(pack, data.classnames)
    dev = resolve_device(device)
    method = build_from_pack(pack, weights=weights, device=dev)
    cache_dir = feature_cache_dir(feature_cache, no_feature_cache)
    scores = evaluate(
        method,
        _subset(data, subset, 1),
        device=dev,
        num_workers=workers,
        feature_cache=FeatureCache(cache_dir) if cache_dir is not None else None,
    )
    report = {
        "pack": pack_path,
        "data": data_spec,
        "split": split,
        "images": scores.n,
        "accuracy": scores.accuracy,
        "loss": scores.loss,
        "per_class_accuracy": scores.per_class_accuracy,
    }
    if as_json:
        click.echo(json.dumps(report, ensure_ascii=False))
    else:
        click.echo(f"{split} accuracy: {100 * scores.accuracy:.1f}% on {scores.n} images")
