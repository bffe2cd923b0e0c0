"""``vprompt models | zeroshot | predict | inspect``: classification without training."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from vprompt.cli.common import (
    device_option,
    friendly_errors,
    images_argument,
    main,
    model_option,
    pack_weights_options,
    predict_options,
    weights_option,
)
from vprompt.utils import jsonio

if TYPE_CHECKING:
    from vprompt.methods.base import PromptMethod


@main.command("models")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable list.")
@click.option("--family", default=None, help="Only this family.")
@friendly_errors
def models_cmd(as_json: bool, family: str | None) -> None:
    """List every model name with its family and weight tags."""
    from vprompt.backbones import list_models

    rows = list_models(family)
    if as_json:
        click.echo(jsonio.dumps(rows, indent=1))
        return
    width = max(len("NAME"), *(len(r["name"]) for r in rows)) + 2
    fwidth = max(len("FAMILY"), *(len(r["family"]) for r in rows)) + 2
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
            click.echo(jsonio.dumps(res.to_json(), ensure_ascii=False))
        else:
            ranked = ", ".join(f"{p.label} ({p.score:.3f})" for p in res.predictions)
            click.echo(f"{res.path}: {ranked}")
    return failed


def _predict_and_report(
    classifier: PromptMethod,
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
    from vprompt.methods.clip_common import require_image_text
    from vprompt.methods.zeroshot import ZeroShotClassifier
    from vprompt.prompts.text import load_class_list

    if (classes is None) == (classes_file is None):
        raise click.UsageError("give exactly one of --classes or --classes-file")
    names = (
        load_class_list(classes_file, from_file=True)
        if classes_file
        else load_class_list(classes or "")
    )
    backbone = require_image_text(load_backbone(model, weights, device=device), "zeroshot")
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
@pack_weights_options
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
    allow_download: bool,
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
    classifier = build_from_pack(
        pack, weights=weights, device=device, allow_download=allow_download
    )
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
        click.echo(jsonio.dumps(meta, indent=1, ensure_ascii=False))
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
    click.echo(f"preprocess:  {jsonio.dumps(pack.preprocess)}")
    click.echo(f"parameters:  {meta['num_parameters']}")
    for k, v in meta["tensors"].items():
        click.echo(f"  tensor {k}: {v['dtype']} {v['shape']}")
    for key in ("config", "metrics"):
        if meta[key]:
            click.echo(f"{key + ':':<13}{jsonio.dumps(meta[key], ensure_ascii=False)[:2000]}")


@main.command("interpret")
@click.argument("pack_path", type=click.Path(dir_okay=False))
@click.option(
    "--top-k",
    default=5,
    show_default=True,
    type=click.IntRange(min=1),
    help="Nearest vocabulary tokens per context vector.",
)
@pack_weights_options
@device_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object with every vector.")
@friendly_errors
def interpret_cmd(
    pack_path: str,
    top_k: int,
    weights: str | None,
    allow_download: bool,
    device: str,
    as_json: bool,
) -> None:
    """Show the vocabulary words nearest to each learned context vector of a pack.

    Works on packs of learned-text-context methods (coop, cocoop, kgcoop, prograd …): the
    Euclidean nearest tokens in the frozen token-embedding table, as in the CoOp paper.
    """
    from vprompt.engine.pack import build_from_pack, load_pack
    from vprompt.errors import PackError
    from vprompt.methods.interpret import nearest_words

    pack = load_pack(pack_path)
    ctx = pack.tensors.get("ctx")
    if ctx is None:
        raise PackError(
            f"{pack_path}: a {pack.method} pack has no learned text context (no 'ctx' tensor; "
            f"it holds {', '.join(sorted(pack.tensors))}); interpret reads packs of "
            "coop-style methods"
        )
    method = build_from_pack(pack, weights=weights, device=device, allow_download=allow_download)
    found = nearest_words(method.backbone, ctx, top_k)
    groups = pack.classnames if ctx.dim() == 3 and ctx.shape[0] == len(pack.classnames) else None
    if as_json:
        report = {
            "pack": pack_path,
            "method": pack.method,
            "backbone": pack.backbone.name,
            "ctx_shape": list(ctx.shape),
            "top_k": top_k,
            "vectors": [entry.to_dict(groups) for entry in found],
        }
        click.echo(jsonio.dumps(report, ensure_ascii=False))
        return
    kind = "class-specific" if ctx.dim() == 3 else "shared"
    click.echo(
        f"{pack_path}: {pack.method} on {pack.backbone.name}, {ctx.shape[-2]} {kind} context "
        f"vectors; nearest tokens (Euclidean distance):"
    )
    for entry in found:
        where = f"ctx {entry.position + 1:>2}"
        if entry.group is not None:
            label = groups[entry.group] if groups is not None else f"#{entry.group}"
            where = f"{label}: {where}"
        words = ", ".join(f"{w.word!r} {w.distance:.4f}" for w in entry.nearest)
        click.echo(f"{where}: {words}")
