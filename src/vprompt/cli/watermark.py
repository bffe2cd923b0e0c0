"""``vprompt watermark train | embed | detect | eval``: learned watermark keys on frozen models."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from vprompt.cli.common import device_option, friendly_errors, main, output_folder, weights_option
from vprompt.utils import jsonio

_DATA_HELP = "fashion-mnist[:PATH], folder:PATH, csv:PATH, json:PATH, or a benchmark dataset name."
_KEY_HELP = "A key file from `vprompt watermark train` (key.safetensors)."


@main.group("watermark")
def watermark_group() -> None:
    """Imperceptible learned watermarks that a frozen model plus a small key head detect."""


def _data_options(fn: Any) -> Any:
    fn = click.option(
        "--data-root",
        type=click.Path(file_okay=False),
        default=None,
        help="Folder holding the benchmark datasets (default: $VPROMPT_DATA_ROOT).",
    )(fn)
    return click.option("--data", "data_spec", required=True, help=_DATA_HELP)(fn)


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: expected comma-separated numbers", param_hint=what
        ) from None


def _key_backbone(
    key: Any, key_path: str, model: str | None, weights: str | None, device: Any
) -> Any:
    """The frozen backbone a key names (refused when ``--model`` names another one)."""
    from vprompt.backbones import load_backbone
    from vprompt.watermark.key_file import WatermarkKeyError

    name = key.backbone["name"]
    if model is not None and model != name:
        raise WatermarkKeyError(f"{key_path}: this key was trained for {name}, not {model}")
    return load_backbone(name, weights or key.backbone["weights"], device=device)


@watermark_group.command("train")
@click.option("--model", required=True, help="Frozen model as FAMILY:ARCH.")
@weights_option
@_data_options
@click.option(
    "--eps", "eps_text", default="4/255", show_default=True, help="L∞ bound: 4/255 or 0.0157."
)
@click.option("--epochs", default=5, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option(
    "--hidden",
    default=64,
    show_default=True,
    type=click.IntRange(0, 4096),
    help="Head width; 0: linear.",
)
@click.option("--lr-delta", default=0.05, show_default=True, type=float)
@click.option("--lr-head", default=1e-2, show_default=True, type=float)
@click.option(
    "--target-fpr", default=0.01, show_default=True, type=float, help="On clean training images."
)
@click.option(
    "--train-subset",
    default=None,
    type=click.IntRange(min=1),
    help="Seeded random subset of N training images.",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@friendly_errors
@output_folder("watermark-train", param="out_dir")
def train_cmd(
    model: str,
    weights: str | None,
    data_spec: str,
    data_root: str | None,
    eps_text: str,
    epochs: int,
    batch_size: int,
    hidden: int,
    lr_delta: float,
    lr_head: float,
    target_fpr: float,
    train_subset: int | None,
    seed: int,
    out_dir: str,
    device: str,
    as_json: bool,
) -> None:
    """Learn a watermark key on the TRAINING split; writes OUT/key.safetensors, OUT/delta.png
    (δ amplified) and OUT/training.png."""
    from vprompt.backbones import load_backbone
    from vprompt.backbones.registry import resolve_device
    from vprompt.data.sources import load_data
    from vprompt.engine.experiment import random_subset
    from vprompt.watermark.detector import (
        FrozenFeatures,
        KeyDetector,
        backbone_record,
        feature_dim_of,
        pixel_spec,
    )
    from vprompt.watermark.evaluate import plot_training, save_delta_png
    from vprompt.watermark.key_file import WatermarkKey, save_key
    from vprompt.watermark.train import WatermarkTrainConfig, parse_eps, train_key

    config = WatermarkTrainConfig(
        eps=parse_eps(eps_text),
        hidden=hidden,
        epochs=epochs,
        batch_size=batch_size,
        lr_delta=lr_delta,
        lr_head=lr_head,
        target_fpr=target_fpr,
        seed=seed,
    )
    splits = load_data(data_spec, data_root=data_root)
    train = random_subset(splits.train, train_subset, seed)
    dev = resolve_device(device)
    backbone = load_backbone(model, weights, device=dev)
    features = FrozenFeatures(backbone)
    spec = pixel_spec(backbone)
    detector = KeyDetector(
        features=features,
        size=spec["size"],
        mean=spec["mean"],
        std=spec["std"],
        feature_dim=feature_dim_of(features, spec["size"], dev),
        hidden=hidden,
    ).to(dev)
    trained = train_key(detector, train, config)
    key = WatermarkKey(
        delta=trained.delta,
        head=detector.head_tensors(),
        eps=config.eps,
        hidden=hidden,
        threshold=trained.threshold,
        target_fpr=target_fpr,
        backbone=backbone_record(backbone),
        pixels=spec,
        train={**config.describe(), "data": data_spec, "images": len(train)},
        metrics={"history": trained.history, **trained.train_metrics},
    )
    out = Path(out_dir)
    path = save_key(key, out / "key.safetensors")
    save_delta_png(trained.delta, config.eps, out / "delta.png")
    plot_training(trained.history, out / "training.png")
    summary = {
        "key": str(path),
        "eps": config.eps,
        **trained.train_metrics,
        "history": trained.history,
    }
    if as_json:
        click.echo(jsonio.dumps(summary, ensure_ascii=False))
        return
    click.echo(f"key:     {path} (also delta.png, training.png)")
    click.echo(
        f"training images: {100 * trained.train_metrics['train_tpr']:.1f}% of marked and "
        f"{100 * trained.train_metrics['train_fpr']:.1f}% of clean ones detected"
    )


@watermark_group.command("embed")
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False), help=_KEY_HELP)
@click.argument("images", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option(
    "--max-pixels", default=None, type=click.IntRange(min=1), help="Refuse larger images."
)
@friendly_errors
@output_folder("watermark-embed", param="out_dir")
def embed_cmd(key_path: str, images: tuple[str, ...], out_dir: str, max_pixels: int | None) -> None:
    """Add the key's mark to IMAGES (files, folders, globs); writes OUT/NAME.png (lossless)."""
    import warnings

    from vprompt.data.images import DEFAULT_MAX_PIXELS, expand_image_inputs, load_image
    from vprompt.errors import ImageLoadError
    from vprompt.utils.io import atomic_path
    from vprompt.watermark.detector import embed_image
    from vprompt.watermark.key_file import load_key

    key = load_key(key_path)
    paths, errors = expand_image_inputs(images)
    for line in errors:
        click.echo(f"vprompt: error: {line}", err=True)
    out = Path(out_dir)
    used: set[str] = set()
    failed = len(errors)
    h, w = key.size
    for p in paths:
        try:
            image = load_image(p, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
        except ImageLoadError as exc:
            click.echo(f"vprompt: error: {exc}", err=True)
            failed += 1
            continue
        if image.width < w or image.height < h:
            warnings.warn(
                f"{p}: {image.width}x{image.height} is smaller than the key's {w}x{h}; the mark "
                "is weaker below the model's input size",
                stacklevel=1,
            )
        name, i = f"{p.stem}.png", 1
        while name in used:
            name, i = f"{p.stem}-{i}.png", i + 1
        used.add(name)
        with atomic_path(out / name) as tmp:
            embed_image(image, key.delta).save(tmp, format="PNG")
        click.echo(f"{p} -> {out / name}")
    if failed:
        click.echo(f"vprompt: {failed} input(s) failed, {len(used)} succeeded", err=True)
        sys.exit(1)


@watermark_group.command("detect")
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False), help=_KEY_HELP)
@click.argument("images", nargs=-1, required=True)
@click.option("--model", default=None, help="Refuse the key unless it was made for this model.")
@weights_option
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option(
    "--max-pixels", default=None, type=click.IntRange(min=1), help="Refuse larger images."
)
@device_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image on stdout.")
@friendly_errors
def detect_cmd(
    key_path: str,
    images: tuple[str, ...],
    model: str | None,
    weights: str | None,
    batch_size: int,
    max_pixels: int | None,
    device: str,
    as_json: bool,
) -> None:
    """Say, per image, whether it carries the key's mark (probability and yes/no)."""
    import math

    import torch

    from vprompt.backbones.registry import resolve_device
    from vprompt.data.images import DEFAULT_MAX_PIXELS, expand_image_inputs, load_image
    from vprompt.errors import ImageLoadError
    from vprompt.watermark.detector import detector_for, pixel_reader, score_pixels
    from vprompt.watermark.key_file import load_key

    key = load_key(key_path)
    dev = resolve_device(device)
    detector = detector_for(key, _key_backbone(key, key_path, model, weights, dev), dev, key_path)
    reader = pixel_reader(key.size)
    paths, errors = expand_image_inputs(images)
    for line in errors:
        click.echo(f"vprompt: error: {line}", err=True)
    failed = len(errors)
    for start in range(0, len(paths), batch_size):
        ok, pixels = [], []
        for p in paths[start : start + batch_size]:
            try:
                pixels.append(reader(load_image(p, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)))
                ok.append(p)
            except ImageLoadError as exc:
                click.echo(f"vprompt: error: {exc}", err=True)
                failed += 1
        if not ok:
            continue
        logits = score_pixels(detector, torch.stack(pixels), batch_size)
        for p, logit in zip(ok, logits.tolist(), strict=True):
            prob = 1 / (1 + math.exp(-logit)) if logit > -700 else 0.0
            yes = logit > key.threshold
            if as_json:
                row = {"path": str(p), "probability": prob, "logit": logit, "watermarked": yes}
                click.echo(jsonio.dumps(row, ensure_ascii=False))
            else:
                click.echo(f"{p}: {prob:.4f} {'yes' if yes else 'no'}")
    if failed:
        click.echo(
            f"vprompt: {failed} input(s) failed, {len(paths) - failed + len(errors)} succeeded",
            err=True,
        )
        sys.exit(1)


@watermark_group.command("eval")
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False), help=_KEY_HELP)
@_data_options
@click.option("--model", default=None, help="Refuse the key unless it was made for this model.")
@weights_option
@click.option("--jpeg", "jpeg_text", default="90,75,50", show_default=True, help="JPEG qualities.")
@click.option(
    "--resize",
    "resize_text",
    default="0.5",
    show_default=True,
    help="Resize factors (down and back).",
)
@click.option(
    "--test-subset",
    default=None,
    type=click.IntRange(min=1),
    help="Seeded random subset of N test images.",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@friendly_errors
@output_folder("watermark-eval", param="out_dir")
def eval_cmd(
    key_path: str,
    data_spec: str,
    data_root: str | None,
    model: str | None,
    weights: str | None,
    jpeg_text: str,
    resize_text: str,
    test_subset: int | None,
    seed: int,
    batch_size: int,
    out_dir: str,
    device: str,
    as_json: bool,
) -> None:
    """Detection rate, false positives, AUROC and PSNR on the TEST split, clean and after real
    JPEG and resizing; writes OUT/watermark.json, OUT/watermark.md and OUT/watermark.png."""
    from vprompt.backbones.registry import resolve_device
    from vprompt.data.sources import load_data
    from vprompt.engine.experiment import random_subset
    from vprompt.errors import ConfigError
    from vprompt.watermark.detector import detector_for
    from vprompt.watermark.evaluate import EvalConfig, evaluate_key, markdown_table, write_report
    from vprompt.watermark.key_file import load_key

    qualities = _floats(jpeg_text, "--jpeg")
    if any(q != int(q) for q in qualities):
        raise ConfigError(f"--jpeg {jpeg_text!r}: qualities are integers 1-100")
    config = EvalConfig(
        jpeg_qualities=tuple(int(q) for q in qualities),
        resize_scales=_floats(resize_text, "--resize"),
        batch_size=batch_size,
    )
    key = load_key(key_path)
    splits = load_data(data_spec, data_root=data_root, test_only_ok=True)
    test = random_subset(splits.test, test_subset, seed)
    dev = resolve_device(device)
    detector = detector_for(key, _key_backbone(key, key_path, model, weights, dev), dev, key_path)
    report = evaluate_key(detector, key.delta, key.threshold, test, config)
    extra = {"key": key_path, "data": data_spec, "backbone": key.backbone["name"], "eps": key.eps}
    write_report(report, out_dir, extra)
    if as_json:
        click.echo(jsonio.dumps({**extra, **report.to_json()}, ensure_ascii=False))
        return
    click.echo(markdown_table(report).rstrip())
    click.echo(f"outputs: {out_dir} (watermark.json, watermark.md, watermark.png)")
