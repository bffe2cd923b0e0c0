"""The ``vprompt`` command line: thin wrappers over the Python API."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click

from vprompt.errors import VPromptError

F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"vprompt: error: {message}", err=True)
    sys.exit(code)


def friendly_errors(fn: F) -> F:
    """Turn vprompt's own errors into one ``vprompt: error: …`` line and exit code 1."""

    @wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except VPromptError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail("interrupted", 130)

    return run  # type: ignore[return-value]


model_option = click.option(
    "--model",
    "model",
    default="clip:ViT-B-16",
    show_default=True,
    help="Backbone as FAMILY:ARCH (see `vprompt models`).",
)
weights_option = click.option(
    "--weights",
    default=None,
    help="Weight tag, hf-hub:ORG/REPO, local file or folder, or 'none' (random init). "
    "Default: the model's default tag.",
)
device_option = click.option(
    "--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, … or auto."
)
images_argument = click.argument("images", nargs=-1, required=True)
common_predict_options = [
    click.option("--top-k", default=5, show_default=True, type=click.IntRange(min=1)),
    click.option("--json", "as_json", is_flag=True, help="One JSON object per image on stdout."),
    click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1)),
    click.option(
        "--max-pixels",
        default=None,
        type=click.IntRange(min=1),
        help="Refuse images with more pixels than this (default: Pillow's bomb limit).",
    ),
]


def predict_options(fn: F) -> F:
    for option in reversed(common_predict_options):
        fn = option(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vprompt")
def main() -> None:
    """Adapt frozen vision and vision-language models to new tasks through prompts."""


@main.command("models")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable list.")
@click.option("--family", default=None, help="Only this family.")
@friendly_errors
def models_cmd(as_json: bool, family: str | None) -> None:
    """List every model name with its family and weight tags."""
    from vprompt.backbones import list_models

    rows = list_models(family)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    width = max(len(r["name"]) for r in rows) + 2
    fwidth = max(len(r["family"]) for r in rows) + 2
    click.echo(f"{'NAME':<{width}}{'FAMILY':<{fwidth}}TAGS")
    for r in rows:
        tags = ", ".join(r["tags"]) or ("none (tiny test model)" if r["tiny"] else "none")
        click.echo(f"{r['name']:<{width}}{r['family']:<{fwidth}}{tags}")


def _emit_results(results: Iterable[Any], as_json: bool) -> int:
    failed = 0
    for res in results:
        if res.error is not None:
            failed += 1
            click.echo(f"vprompt: error: {res.path}: {res.error}", err=True)
            continue
        if as_json:
            click.echo(json.dumps(res.to_json(), ensure_ascii=False))
        else:
            ranked = ", ".join(f"{p.label} ({p.score:.3f})" for p in res.predictions)
            click.echo(f"{res.path}: {ranked}")
    return failed


def _predict_and_report(
    classifier: Any,
    images: tuple[str, ...],
    *,
    top_k: int,
    as_json: bool,
    batch_size: int,
    max_pixels: int | None,
) -> None:
    from vprompt.data.images import DEFAULT_MAX_PIXELS, expand_image_inputs
    from vprompt.engine.predict import predict_files

    paths, input_errors = expand_image_inputs(images)
    for line in input_errors:
        click.echo(f"vprompt: error: {line}", err=True)
    results = predict_files(
        classifier,
        paths,
        top_k=top_k,
        batch_size=batch_size,
        max_pixels=max_pixels or DEFAULT_MAX_PIXELS,
    )
    failed = _emit_results(results, as_json) + len(input_errors)
    if failed:
        click.echo(
            f"vprompt: {failed} input(s) failed, {len(paths) - failed + len(input_errors)} "
            "succeeded",
            err=True,
        )
        sys.exit(1)


@main.command("zeroshot")
@images_argument
@model_option
@weights_option
@click.option("--classes", default=None, help='Comma-separated class names: "cat,dog".')
@click.option(
    "--classes-file",
    default=None,
    type=click.Path(dir_okay=False),
    help="File with one class name per line.",
)
@click.option(
    "--templates",
    default=None,
    help="Template set (default, openai-imagenet, simple-imagenet), a file with one "
    "template per line, or one template with {} for the class name.",
)
@click.option(
    "--descriptions",
    default=None,
    type=click.Path(dir_okay=False),
    help='CuPL-style JSON {"class": ["sentence", ...]}; averaged per class.',
)
@click.option(
    "--save-pack",
    default=None,
    type=click.Path(dir_okay=False),
    help="Also save the class embeddings as a prompt pack here.",
)
@device_option
@predict_options
@friendly_errors
def zeroshot_cmd(
    images: tuple[str, ...],
    model: str,
    weights: str | None,
    classes: str | None,
    classes_file: str | None,
    templates: str | None,
    descriptions: str | None,
    save_pack: str | None,
    device: str,
    top_k: int,
    as_json: bool,
    batch_size: int,
    max_pixels: int | None,
) -> None:
    """Classify IMAGES (files, folders, globs) by class names, with no training."""
    from vprompt.backbones import load_backbone
    from vprompt.engine.pack import save_pack as write_pack
    from vprompt.methods.zeroshot import ZeroShotClassifier
    from vprompt.prompts.text import load_class_list

    if (classes is None) == (classes_file is None):
        raise click.UsageError("give exactly one of --classes or --classes-file")
    names = (
        load_class_list(classes_file, from_file=True)
        if classes_file
        else load_class_list(classes or "")
    )
    backbone = load_backbone(model, weights, device=device)
    classifier = ZeroShotClassifier(backbone, names, templates=templates, descriptions=descriptions)
    if save_pack:
        write_pack(classifier, save_pack)
        click.echo(f"vprompt: saved prompt pack to {save_pack}", err=True)
    _predict_and_report(
        classifier,
        images,
        top_k=top_k,
        as_json=as_json,
        batch_size=batch_size,
        max_pixels=max_pixels,
    )


@main.command("predict")
@click.option(
    "--pack",
    "pack_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="Prompt pack (.safetensors).",
)
@images_argument
@weights_option
@click.option(
    "--classes",
    default=None,
    help="Expected class names, comma-separated; refused if they differ from the pack's.",
)
@device_option
@predict_options
@friendly_errors
def predict_cmd(
    pack_path: str,
    images: tuple[str, ...],
    weights: str | None,
    classes: str | None,
    device: str,
    top_k: int,
    as_json: bool,
    batch_size: int,
    max_pixels: int | None,
) -> None:
    """Apply a prompt pack to IMAGES (same output as `zeroshot`)."""
    from vprompt.engine.pack import build_from_pack, check_classnames, load_pack
    from vprompt.prompts.text import load_class_list

    pack = load_pack(pack_path)
    if classes is not None:
        check_classnames(pack, load_class_list(classes))
    classifier = build_from_pack(pack, weights=weights, device=device)
    _predict_and_report(
        classifier,
        images,
        top_k=top_k,
        as_json=as_json,
        batch_size=batch_size,
        max_pixels=max_pixels,
    )


@main.command("inspect")
@click.argument("pack_path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON.")
@friendly_errors
def inspect_cmd(pack_path: str, as_json: bool) -> None:
    """Show a prompt pack's metadata and tensors without loading any model."""
    from vprompt.engine.pack import load_pack

    pack = load_pack(pack_path)
    meta = pack.metadata()
    meta["tensors"] = {
        k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
        for k, v in pack.tensors.items()
    }
    meta["num_parameters"] = pack.num_parameters()
    if as_json:
        click.echo(json.dumps(meta, indent=1, ensure_ascii=False))
        return
    click.echo(f"pack:        {Path(pack_path)}")
    click.echo(
        f"format:      {meta['format']} v{meta['format_version']} "
        f"(vprompt {meta['vprompt_version']}, {meta['created']})"
    )
    click.echo(f"method:      {pack.method}")
    bb = pack.backbone
    click.echo(f"backbone:    {bb.name} weights={bb.weights} fingerprint={bb.fingerprint}")
    shown = ", ".join(pack.classnames[:10]) + (" …" if len(pack.classnames) > 10 else "")
    click.echo(f"classes:     {len(pack.classnames)}: {shown}")
    click.echo(f"preprocess:  {json.dumps(pack.preprocess)}")
    click.echo(f"parameters:  {meta['num_parameters']}")
    for k, v in meta["tensors"].items():
        click.echo(f"  tensor {k}: {v['dtype']} {v['shape']}")
    for key in ("config", "metrics"):
        if meta[key]:
            click.echo(f"{key + ':':<13}{json.dumps(meta[key], ensure_ascii=False)[:2000]}")


def _subset(data: Any, n: int | None, seed: int) -> Any:
    """A seeded random subset of ``n`` items (all of them when ``n`` is None or too large)."""
    if n is None or n >= len(data):
        return data
    import torch

    from vprompt.data.dataset import Subset

    gen = torch.Generator().manual_seed(seed)
    return Subset(data, sorted(torch.randperm(len(data), generator=gen)[:n].tolist()))


def _write_json(path: Path, data: Any) -> None:
    from vprompt.utils.io import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


@main.command("train")
@click.option(
    "--method",
    "method_name",
    required=True,
    help="Registered method (visual-prompt, mapping-only, linear-probe, full-finetune, …).",
)
@click.option("--model", "model", required=True, help="Backbone as FAMILY:ARCH.")
@weights_option
@click.option("--data", "data_spec", required=True, help="fashion-mnist[:PATH] or folder:PATH.")
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
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print the final test metrics as JSON.")
@friendly_errors
def train_cmd(
    method_name: str,
    model: str,
    weights: str | None,
    data_spec: str,
    out_dir: str,
    overrides: tuple[str, ...],
    seed: int,
    train_subset: int | None,
    test_subset: int | None,
    resume: bool,
    workers: int,
    device: str,
    as_json: bool,
) -> None:
    """Learn a prompt for a frozen model on a dataset; writes the pack, metrics and plots to OUT."""
    from vprompt.backbones import load_backbone
    from vprompt.backbones.registry import resolve_device
    from vprompt.data.sources import load_data
    from vprompt.engine import evaluate, fit
    from vprompt.methods.base import METHODS, apply_overrides

    cls = METHODS.get(method_name)
    if not hasattr(cls, "trainable_parameters"):
        raise click.UsageError(
            f"method {method_name!r} has nothing to train; see `vprompt zeroshot`"
        )
    config = apply_overrides(cls.Config(), overrides)
    splits = load_data(data_spec)
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
    result = fit(
        method,
        train,
        val=splits.val,
        out_dir=out,
        device=dev,
        seed=seed,
        resume=resume,
        num_workers=workers,
    )
    scores = evaluate(
        method,
        test,
        device=dev,
        num_workers=workers,
        batch_size=max(method.config.optim.batch_size, 64),
    )
    report = {
        "method": method_name,
        "model": model,
        "weights": backbone.weights,
        "data": data_spec,
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


@main.command("eval")
@click.option("--pack", "pack_path", required=True, type=click.Path(dir_okay=False))
@click.option("--data", "data_spec", required=True, help="fashion-mnist[:PATH] or folder:PATH.")
@click.option(
    "--split", default="test", show_default=True, type=click.Choice(["test", "val", "train"])
)
@click.option(
    "--subset", default=None, type=click.IntRange(min=1), help="Seeded random subset of N images."
)
@weights_option
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0))
@device_option
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def eval_cmd(
    pack_path: str,
    data_spec: str,
    split: str,
    subset: int | None,
    weights: str | None,
    workers: int,
    device: str,
    as_json: bool,
) -> None:
    """Evaluate a prompt pack on a dataset split."""
    from vprompt.backbones.registry import resolve_device
    from vprompt.data.sources import load_data
    from vprompt.engine import evaluate
    from vprompt.engine.pack import build_from_pack, check_classnames, load_pack
    from vprompt.errors import DatasetError

    pack = load_pack(pack_path)
    splits = load_data(data_spec)
    data = {"test": splits.test, "val": splits.val, "train": splits.train}[split]
    if data is None:
        raise DatasetError(f"{data_spec} has no {split} split")
    check_classnames(pack, data.classnames)
    dev = resolve_device(device)
    method = build_from_pack(pack, weights=weights, device=dev)
    scores = evaluate(method, _subset(data, subset, 1), device=dev, num_workers=workers)
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


if __name__ == "__main__":
    main()
