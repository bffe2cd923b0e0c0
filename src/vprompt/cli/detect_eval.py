"""``vprompt eval-detect``: COCO-style detection mAP (text queries) and the image-guided
"find all similar" protocol on a COCO-format folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from vprompt.cli.common import friendly_errors, main, output_folder
from vprompt.cli.detect_args import build_finder, detector_options
from vprompt.utils import jsonio


def _show(metrics: dict[str, Any]) -> None:
    for key in ("mAP", "mAP50", "AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
        if key in metrics:
            value = metrics[key]
            click.echo(f"  {key:6} {'n/a' if value is None else f'{100 * value:.1f}'}")


@main.command("eval-detect")
@click.argument("dataset", type=click.Path(file_okay=False))
@click.option(
    "--annotations",
    default=None,
    type=click.Path(dir_okay=False),
    help="The instances JSON (default: found in DATASET).",
)
@click.option(
    "--images",
    "images_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Where file_name paths start (default: found in DATASET).",
)
@click.option(
    "--protocol",
    type=click.Choice(["text", "find-all-similar"]),
    default="text",
    show_default=True,
    help="text: category names as queries, COCO mAP. find-all-similar: one exemplar box "
    "per category from one image, AP on all the others.",
)
@click.option("--seed", default=0, show_default=True, help="Seeds the exemplar choice.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print metrics.json on stdout.")
@detector_options
@friendly_errors
@output_folder("eval-detect")
def eval_detect_cmd(
    dataset: str,
    annotations: str | None,
    images_dir: str | None,
    protocol: str,
    seed: int,
    out: str,
    as_json: bool,
    model: str,
    weights: str | None,
    mask_model: str | None,
    mask_weights: str | None,
    score_threshold: float | None,
    nms_iou: float | None,
    class_agnostic: bool,
    top_k: int | None,
    max_pixels: int | None,
    device: str,
) -> None:
    """Evaluate a detector on a COCO-format folder (images + instances JSON).

    Writes results.json (COCO results) and metrics.json (AP, AP50, AP75, APs/m/l, AR@100,
    per-category AP; mask AP too with --masks or a mask-making detector) into --out. The
    score threshold defaults to 0 and top-k to 100, as COCO evaluation expects.

    \b
    vprompt eval-detect coco-val/ --model owlv2 --out runs/owlv2-coco
    vprompt eval-detect parts/ --model owlv2 --protocol find-all-similar --out runs/find
    """
    from vprompt.detect.coco_data import read_coco_detection
    from vprompt.detect.evaluate import evaluate_detection
    from vprompt.detect.find_all import evaluate_find_all
    from vprompt.errors import ConfigError

    data = read_coco_detection(dataset, annotations=annotations, images_dir=images_dir)
    finder = build_finder(
        model=model,
        weights=weights,
        mask_model=mask_model,
        mask_weights=mask_weights,
        device=device,
        max_pixels=max_pixels,
    )
    options = finder.default_filter(
        exemplars_only=protocol == "find-all-similar",
        score_threshold=0.0 if score_threshold is None else score_threshold,
        nms_iou=nms_iou,
        class_agnostic=class_agnostic or None,
        top_k=100 if top_k is None else top_k,
    )
    caps = finder.detector.capabilities
    limit = finder.max_pixels
    if protocol == "text":
        if not caps.text:
            raise ConfigError(f"{finder.detector.name} takes no text queries; use --protocol "
                              "find-all-similar")  # fmt: skip
        report: Any = evaluate_detection(
            lambda image, queries: finder.find(image, queries=queries, filter=options),
            data,
            filter=options,
            max_queries=caps.max_queries,
            output=Path(out),
            max_pixels=limit,
        )
    else:
        if not caps.exemplars:
            raise ConfigError(f"{finder.detector.name} takes no exemplars; find-all-similar "
                              "needs an image-guided detector such as owlv2:")  # fmt: skip
        report = evaluate_find_all(
            lambda image, exemplars: finder.find(image, exemplars=exemplars, filter=options),
            data,
            seed=seed,
            filter=options,
            output=Path(out),
            max_pixels=limit,
        )
    summary = {"model": finder.detector.name, "protocol": protocol, **report.to_dict()}
    if as_json:
        click.echo(jsonio.dumps(summary))
        return
    click.echo(f"{finder.detector.name} on {dataset} ({protocol}):")
    _show(summary.get("bbox") or summary)
    if summary.get("segm"):
        click.echo("  masks:")
        _show(summary["segm"])
    click.echo(f"wrote metrics.json and results.json to {out}")
