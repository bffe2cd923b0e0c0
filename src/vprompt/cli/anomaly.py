"""``vprompt anomaly methods | check | fit | score | eval`` and ``vprompt find-similar``.

Thin wrappers over :mod:`vprompt.anomaly`: every method comes from the anomaly registry and
declares what it needs (normal shots, a labelled training set, a CLIP model); nothing here
names a method.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import click

from vprompt.cli.common import (
    device_option,
    friendly_errors,
    main,
    output_folder,
    pack_weights_options,
    weights_option,
)
from vprompt.utils import jsonio

_DATA_HELP = "mvtec:ROOT, visa:ROOT or folder:ROOT (good/, defect/, ground_truth/)."


@main.group("anomaly")
def anomaly_group() -> None:
    """Zero- and few-shot anomaly detection (industrial inspection) on frozen models."""


def _max_pixels(value: int | None) -> int:
    from vprompt.data.images import DEFAULT_MAX_PIXELS

    return value or DEFAULT_MAX_PIXELS


max_pixels_option = click.option(
    "--max-pixels",
    default=None,
    type=click.IntRange(min=1),
    help="Refuse images with more pixels than this (default: Pillow's bomb limit).",
)
set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Config override of --method."
)


@anomaly_group.command("methods")
def methods_cmd() -> None:
    """List the anomaly methods and what each needs."""
    from vprompt.anomaly import ANOMALY_METHODS

    for name in ANOMALY_METHODS:
        cls = ANOMALY_METHODS.get(name)
        caps = cls.capabilities
        needs = [
            w
            for w, on in (
                ("zero-shot", caps.zero_shot),
                ("few-shot", caps.few_shot),
                ("trained", caps.trains),
            )
            if on
        ]
        click.echo(
            f"{name:14s} {'/'.join(needs):26s} {caps.family:4s}  default {cls.default_model}"
        )


@anomaly_group.command("check")
@click.option("--data", "data_spec", required=True, help=_DATA_HELP)
@click.option("--decode", is_flag=True, help="Also decode every image and mask (slower).")
@click.option("--json", "as_json", is_flag=True, help="Print the problems as JSON.")
@friendly_errors
def check_cmd(data_spec: str, decode: bool, as_json: bool) -> None:
    """Check an anomaly dataset's layout; exit 1 when something is wrong."""
    from vprompt.anomaly.datasets import check_anomaly_data

    problems = check_anomaly_data(data_spec, decode=decode)
    errors = [p for p in problems if getattr(p, "severity", "error") == "error"]
    if as_json:
        click.echo(jsonio.dumps([_plain(p) for p in problems], indent=2))
    else:
        for p in problems:
            click.echo(f"{getattr(p, 'severity', 'error')}: {getattr(p, 'message', p)}")
        if not problems:
            click.echo(f"{data_spec}: OK")
    if errors:
        sys.exit(1)


def _plain(obj: Any) -> Any:
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return str(obj)


def _build(
    method: str,
    model: str | None,
    weights: str | None,
    device: str,
    overrides: tuple[str, ...],
    seed: int,
    object_name: str = "object",
) -> Any:
    from vprompt.anomaly import build_anomaly_method
    from vprompt.backbones.registry import resolve_device

    return build_anomaly_method(
        method,
        model=model,
        weights=weights,
        device=resolve_device(device),
        overrides=overrides,
        seed=seed,
        object_name=object_name,
    )


@anomaly_group.command("fit")
@click.option("--method", required=True, help="An anomaly method (see `vprompt anomaly methods`).")
@click.option("--model", default=None, help="Frozen model as FAMILY:ARCH (default: the method's).")
@weights_option
@click.option(
    "--normal",
    "normal",
    multiple=True,
    help="Normal reference images or folders (few-shot methods).",
)
@click.option(
    "--data",
    "data_spec",
    default=None,
    help="Labelled training dataset (trained methods): " + _DATA_HELP,
)
@click.option(
    "--category",
    "categories",
    multiple=True,
    help="Categories of --data to train on (default: all).",
)
@click.option(
    "--object",
    "object_name",
    default="object",
    show_default=True,
    help="What is inspected (text methods name it in their prompts).",
)
@set_option
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@max_pixels_option
@click.option(
    "--out",
    "out_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="The pack to write (.safetensors).",
)
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@friendly_errors
def fit_cmd(
    method: str,
    model: str | None,
    weights: str | None,
    normal: tuple[str, ...],
    data_spec: str | None,
    categories: tuple[str, ...],
    object_name: str,
    overrides: tuple[str, ...],
    seed: int,
    batch_size: int,
    max_pixels: int | None,
    out_path: str,
    device: str,
    as_json: bool,
) -> None:
    """Fit a memory bank on normal images (--normal) or train anomaly prompts on a labelled
    dataset (--data); writes the pack to --out."""
    from tqdm.auto import tqdm

    from vprompt.anomaly import pack_anomaly_method, save_anomaly_pack
    from vprompt.anomaly.datasets import read_anomaly_data
    from vprompt.anomaly.evaluate import fit_references
    from vprompt.anomaly.train import history_rows, train_method
    from vprompt.data.images import expand_image_inputs
    from vprompt.errors import ConfigError

    m = _build(method, model, weights, device, overrides, seed, object_name)
    caps = m.capabilities
    limit = _max_pixels(max_pixels)
    summary: dict[str, Any] = {"method": m.name, "model": m.backbone.name, "pack": out_path}
    if caps.trains:
        if not data_spec or normal:
            raise ConfigError(f"{m.name} trains on a labelled dataset: give --data (not --normal)")
        cats = read_anomaly_data(data_spec, categories=list(categories) or None)
        samples = [s for c in cats for s in c.test]
        steps = m.config.optim.epochs * math.ceil(len(samples) / m.config.optim.batch_size)
        with tqdm(total=steps, desc=f"training {m.name}", unit="step", leave=False) as bar:
            history = train_method(
                m, samples, seed=seed, max_pixels=limit, on_step=lambda *_: bar.update(1)
            )
        summary.update(
            trained_on=[c.name for c in cats], images=len(samples), history=history_rows(history)
        )
    elif caps.few_shot:
        if not normal or data_spec:
            raise ConfigError(
                f"{m.name} fits on normal reference images: give --normal DIR (not --data)"
            )
        paths, bad = expand_image_inputs(normal)
        if bad:
            raise ConfigError(f"--normal: no images at {', '.join(bad[:5])}")
        fit_references(m, paths, batch_size=batch_size, max_pixels=limit)
        summary.update(references=len(paths))
    else:
        raise ConfigError(
            f"{m.name} is zero-shot: nothing to fit (use `vprompt anomaly score --method {m.name}`)"
        )
    pack = pack_anomaly_method(m, extra={k: v for k, v in summary.items() if k != "pack"})
    save_anomaly_pack(pack, out_path)
    summary["tensors"] = {k: list(v.shape) for k, v in pack.tensors.items()}
    if as_json:
        click.echo(jsonio.dumps(summary, indent=2))
    else:
        what = (
            f"{summary['references']} normal images"
            if "references" in summary
            else f"{summary['images']} labelled images"
        )
        click.echo(f"{m.name} on {m.backbone.name}: fitted on {what} → {out_path}")


def _method_or_pack(
    pack: str | None,
    method: str | None,
    model: str | None,
    weights: str | None,
    allow_download: bool,
    device: str,
    overrides: tuple[str, ...],
    seed: int,
    object_name: str | None,
) -> Any:
    from vprompt.anomaly import method_from_pack, read_anomaly_pack
    from vprompt.backbones.registry import resolve_device

    if pack and method:
        raise click.UsageError("give --pack or --method, not both")
    if pack:
        if overrides:
            raise click.UsageError("--set applies to --method; a pack keeps its own config")
        m = method_from_pack(
            read_anomaly_pack(pack),
            weights=weights,
            device=resolve_device(device),
            allow_download=allow_download,
        )
        if object_name:
            m.set_object_name(object_name)
        return m
    if not method:
        raise click.UsageError(
            "give --pack PACK (from `vprompt anomaly fit`) or --method for a zero-shot method"
        )
    m = _build(method, model, weights, device, overrides, seed, object_name or "object")
    if not m.capabilities.zero_shot or m.capabilities.trains:
        from vprompt.errors import ConfigError

        need = "fitted on normal images" if not m.capabilities.zero_shot else "trained"
        raise ConfigError(
            f"{m.name} must be {need} first: run `vprompt anomaly fit` and pass --pack"
        )
    return m


@anomaly_group.command("score")
@click.argument("images", nargs=-1, required=True)
@click.option("--pack", default=None, help="A pack from `vprompt anomaly fit`.")
@click.option("--method", default=None, help="A zero-shot method instead of a pack (e.g. winclip).")
@click.option("--model", default=None, help="With --method: FAMILY:ARCH (default: the method's).")
@pack_weights_options
@click.option("--object", "object_name", default=None, help="What is inspected (text methods).")
@set_option
@click.option(
    "--threshold",
    default=None,
    type=float,
    help="Map score above which a pixel is a defect (writes masks).",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@max_pixels_option
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@device_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image on stdout.")
@friendly_errors
@output_folder("anomaly-score", param="out_dir")
def score_cmd(
    images: tuple[str, ...],
    pack: str | None,
    method: str | None,
    model: str | None,
    weights: str | None,
    allow_download: bool,
    object_name: str | None,
    overrides: tuple[str, ...],
    threshold: float | None,
    seed: int,
    batch_size: int,
    max_pixels: int | None,
    out_dir: str,
    device: str,
    as_json: bool,
) -> None:
    """Score images: OUT/result.json (image scores), OUT/heatmaps/NAME.png overlays and, with
    --threshold, OUT/masks/NAME.png."""
    from vprompt.anomaly.output import score_images

    m = _method_or_pack(
        pack, method, model, weights, allow_download, device, overrides, seed, object_name
    )
    rows = score_images(
        m,
        images,
        Path(out_dir),
        threshold=threshold,
        batch_size=batch_size,
        max_pixels=_max_pixels(max_pixels),
    )
    if as_json:
        for row in rows:
            click.echo(jsonio.dumps(row))
    else:
        for row in rows:
            flag = "  DEFECT" if row.get("defect") else ""
            click.echo(f"{row['score']:.6g}  {row['image']}{flag}")
        click.echo(f"wrote {out_dir}/result.json and heat maps")


@anomaly_group.command("eval")
@click.option("--data", "data_spec", required=True, help=_DATA_HELP)
@click.option(
    "--method", default=None, help="An anomaly method (with --shots for few-shot methods)."
)
@click.option(
    "--pack", default=None, help="A trained pack (AnomalyCLIP / Bayes-PFL) to apply zero-shot."
)
@click.option("--model", default=None, help="With --method: FAMILY:ARCH (default: the method's).")
@pack_weights_options
@click.option(
    "--shots",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Normal training images per category to fit on.",
)
@click.option(
    "--category", "categories", multiple=True, help="Categories to evaluate (default: all)."
)
@set_option
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--save-maps",
    default=4,
    show_default=True,
    type=click.IntRange(min=0),
    help="Heat-map overlays written per category.",
)
@max_pixels_option
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@friendly_errors
@output_folder("anomaly-eval", param="out_dir")
def eval_cmd(
    data_spec: str,
    method: str | None,
    pack: str | None,
    model: str | None,
    weights: str | None,
    allow_download: bool,
    shots: int,
    categories: tuple[str, ...],
    overrides: tuple[str, ...],
    seed: int,
    batch_size: int,
    save_maps: int,
    max_pixels: int | None,
    out_dir: str,
    device: str,
    as_json: bool,
) -> None:
    """Per-category image AUROC, F1-max, pixel AUROC, pixel F1-max and AUPRO: OUT/table.md,
    OUT/results.json, OUT/roc.png and heat maps under OUT/maps/."""
    from vprompt.anomaly.datasets import read_anomaly_data
    from vprompt.anomaly.output import run_evaluation

    cats = read_anomaly_data(data_spec, categories=list(categories) or None)
    if pack:
        m = _method_or_pack(
            pack, None, None, weights, allow_download, device, overrides, seed, None
        )
    else:
        if not method:
            raise click.UsageError("give --method (and --shots K for few-shot methods) or --pack")
        m = _build(method, model, weights, device, overrides, seed)
    summary = run_evaluation(
        m,
        cats,
        Path(out_dir),
        data=data_spec,
        shots=shots,
        seed=seed,
        batch_size=batch_size,
        save_maps=save_maps,
        max_pixels=_max_pixels(max_pixels),
    )
    if as_json:
        click.echo(jsonio.dumps(summary, indent=2))
    else:
        click.echo((Path(out_dir) / "table.md").read_text(encoding="utf-8"), nl=False)


@main.command("find-similar")
@click.argument("targets", nargs=-1, required=True)
@click.option("--example", "example", required=True, help="The image with the marked defect.")
@click.option(
    "--box",
    "boxes",
    multiple=True,
    metavar="X0,Y0,X1,Y1",
    help="A defect box on --example (pixels).",
)
@click.option(
    "--mask", "masks", multiple=True, help="A defect mask image (same size as --example)."
)
@click.option(
    "--scribble", "scribbles", multiple=True, metavar="X,Y;X,Y;…", help="A stroke over the defect."
)
@click.option("--scribble-width", default=8.0, show_default=True, type=click.FloatRange(min=0.5))
@click.option(
    "--model",
    default="torchvision:mobilenet_v2",
    show_default=True,
    help="Frozen backbone for the patch features.",
)
@weights_option
@click.option(
    "--refine",
    "refine_model",
    default=None,
    metavar="sam:ARCH",
    help="Refine each region into a mask with this segmenter.",
)
@click.option("--refine-weights", default=None, help="Weights for --refine.")
@click.option("--top-k", default=20, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--threshold",
    default=0.0,
    show_default=True,
    type=float,
    help="Margin above which a pixel joins a region.",
)
@set_option
@max_pixels_option
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print the regions as JSON.")
@friendly_errors
@output_folder("find-similar", param="out_dir")
def find_similar_cmd(
    targets: tuple[str, ...],
    example: str,
    boxes: tuple[str, ...],
    masks: tuple[str, ...],
    scribbles: tuple[str, ...],
    scribble_width: float,
    model: str,
    weights: str | None,
    refine_model: str | None,
    refine_weights: str | None,
    top_k: int,
    threshold: float,
    overrides: tuple[str, ...],
    max_pixels: int | None,
    out_dir: str,
    device: str,
    as_json: bool,
) -> None:
    """Mark a defect on one image (--box / --mask / --scribble); find similar regions in
    TARGETS (images or folders): OUT/regions.json, OUT/heatmaps/, OUT/regions/ crops."""
    from vprompt.anomaly.find_similar import region_mask
    from vprompt.anomaly.output import run_find_similar
    from vprompt.backbones import load_backbone
    from vprompt.backbones.registry import resolve_device
    from vprompt.cli.segment_args import load_mask_file, parse_box, parse_scribble
    from vprompt.data.images import load_image

    limit = _max_pixels(max_pixels)
    image = load_image(example, max_pixels=limit)
    if not (boxes or masks or scribbles):
        raise click.UsageError("mark the defect on --example with --box, --mask or --scribble")
    parsed = [parse_box(b) for b in boxes]
    marked = region_mask(
        image.size,
        boxes=[(b.x0, b.y0, b.x1, b.y1) for b in parsed],
        masks=[load_mask_file(m, image.size).array for m in masks],
        scribbles=[parse_scribble(s, width=scribble_width) for s in scribbles],
    )
    dev = resolve_device(device)
    backbone = load_backbone(model, weights, device=dev)
    segmenter = None
    if refine_model:
        from vprompt.segment.segmenter import Segmenter

        segmenter = Segmenter.load(refine_model, refine_weights, device=dev, max_pixels=limit)
    summary = run_find_similar(
        example=Path(example),
        example_mask=marked,
        example_image=image,
        targets=targets,
        backbone=backbone,
        overrides=(*overrides, f"top_k={top_k}", f"threshold={threshold}"),
        segmenter=segmenter,
        max_pixels=limit,
        out=Path(out_dir),
    )
    if as_json:
        click.echo(jsonio.dumps(summary, indent=2))
    else:
        for r in summary["regions"]:
            x0, y0, x1, y1 = r["box"]
            click.echo(f"{r['score']:.4f}  {r['image']}  box {x0:g},{y0:g},{x1:g},{y1:g}")
        click.echo(f"{len(summary['regions'])} regions; wrote {out_dir}/regions.json and heat maps")
