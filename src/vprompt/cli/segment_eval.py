"""``vprompt eval-clicks``: the interactive-segmentation protocol (NoC, NoF, mIoU@k)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from vprompt.cli.common import friendly_errors, main, output_folder
from vprompt.cli.segment import build_segmenter, segmenter_options
from vprompt.utils import jsonio


def _thresholds(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected numbers like 0.85,0.9") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise click.BadParameter(f"{text!r}: thresholds must lie in (0, 1]")
    return values


@main.command("eval-clicks")
@click.option(
    "--data",
    "data",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder with images/ and masks/ (masks/STEM.png per image; instance PNGs allowed).",
)
@click.option("--max-clicks", default=20, show_default=True, type=click.IntRange(1, 100))
@click.option("--thresholds", default="0.85,0.9", show_default=True, help="IoU targets for NoC.")
@click.option(
    "--ignore-value", default=None, type=click.IntRange(1, 65535), help="Never an object."
)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@segmenter_options
@friendly_errors
@output_folder("eval-clicks")
def eval_clicks_cmd(
    data: str,
    max_clicks: int,
    thresholds: str,
    ignore_value: int | None,
    out: str,
    as_json: bool,
    **seg_opts: Any,
) -> None:
    """Simulate clicks (each at the centre of the largest error) and report NoC / mIoU@k.

    \b
    vprompt eval-clicks --data GrabCut/ --model sam:vit-base --out runs/clicks
    """
    from vprompt.segment.click_data import load_click_folder, sam_predictor_factory
    from vprompt.segment.clicks import evaluate_clicks, plot_miou_curve
    from vprompt.utils.io import atomic_write_text

    levels = _thresholds(thresholds)
    samples = load_click_folder(data, ignore_value=ignore_value)
    segmenter = build_segmenter(**seg_opts)
    pairs, make = sam_predictor_factory(segmenter, samples)
    report = evaluate_clicks(pairs, make, max_clicks=max_clicks, thresholds=levels)
    result = report.to_dict()
    result.update(
        model=segmenter.backbone.name,
        weights=segmenter.backbone.weights,
        data=str(data),
        samples=[{"image": s.image.name, "object_id": s.object_id} for s in samples],
    )
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "report.json", jsonio.dumps(result, indent=1))
    plot = plot_miou_curve(report, out_dir / "miou_curve.png")
    if as_json:
        click.echo(jsonio.dumps(result))
        return
    for t in levels:
        click.echo(f"NoC@{t * 100:g}: {report.noc[t]:.2f}   NoF@{t * 100:g}: {report.nof[t]}")
    ks = [k for k in (1, 3, 5, 10, 20) if k <= max_clicks]
    click.echo("mIoU@k: " + ", ".join(f"{k}: {report.miou_at[k - 1]:.3f}" for k in ks))
    click.echo(f"{len(samples)} object(s); report in {out_dir / 'report.json'}")
    if plot is not None:
        click.echo(f"plot: {plot}")
