"""``vprompt personalize | eval-oneshot``: in-context segmentation with any registered method
(PerSAM, PerSAM-F, SegGPT, …); each method's default model and config live with it."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import click

from vprompt.cli.common import friendly_errors, main, output_folder
from vprompt.cli.segment import mask_format_option, segmenter_options, segmenter_options_from
from vprompt.segment.incontext import SEGMENTATION_METHODS
from vprompt.utils import jsonio


def _method_help() -> str:
    rows = [
        f"{name} (default model {SEGMENTATION_METHODS.get(name).default_model})"
        for name in SEGMENTATION_METHODS.names()
    ]
    return "In-context method: " + "; ".join(rows) + "."


method_option = click.option(
    "--method",
    type=click.Choice(SEGMENTATION_METHODS.names()),
    default="persam",
    show_default=True,
    help=_method_help(),
)
set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Method setting, e.g. steps=500 for persam-f (repeatable).",
)


def _load(method: str, seg_opts: dict[str, Any], overrides: tuple[str, ...]) -> Any:
    from vprompt.segment.incontext import load_method

    return load_method(method, segmenter_options_from(**seg_opts), overrides)


def _load_mask(path: str, image: Any) -> Any:
    from vprompt.cli.segment_args import load_mask_file

    return load_mask_file(path, image.size).array


@main.command("personalize")
@click.argument("targets", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option(
    "--ref",
    "refs",
    multiple=True,
    required=True,
    type=click.Path(dir_okay=False),
    help="A reference image (repeat for several references).",
)
@click.option(
    "--ref-mask",
    "ref_masks",
    multiple=True,
    required=True,
    type=click.Path(dir_okay=False),
    help="The object's mask in the matching --ref (PNG, non-zero = object).",
)
@method_option
@set_option
@mask_format_option
@click.option("--out", "out", required=True, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON line per target on stdout.")
@functools.partial(segmenter_options, default_model=None)
@friendly_errors
@output_folder("personalize")
def personalize_cmd(
    targets: tuple[str, ...],
    refs: tuple[str, ...],
    ref_masks: tuple[str, ...],
    method: str,
    overrides: tuple[str, ...],
    form: str,
    out: str,
    as_json: bool,
    **seg_opts: Any,
) -> None:
    """Segment in every TARGET the object the reference image(s) and mask(s) show.

    \b
    vprompt personalize --ref dog.jpg --ref-mask dog.png park1.jpg park2.jpg --out out/
    vprompt personalize --ref a.jpg --ref-mask a.png --method seggpt b.jpg --out out/
    """
    from vprompt.data.images import DEFAULT_MAX_PIXELS, load_image
    from vprompt.errors import PromptError
    from vprompt.segment.export import write_image_results

    if len(refs) != len(ref_masks):
        raise PromptError(
            f"give one --ref-mask per --ref (got {len(refs)} --ref and {len(ref_masks)} --ref-mask)"
        )
    max_pixels = seg_opts["max_pixels"] or DEFAULT_MAX_PIXELS

    def open_image(path: str) -> Any:
        return load_image(path, max_pixels=max_pixels)

    ref_images = [open_image(r) for r in refs]
    pairs = [(im, _load_mask(m, im)) for im, m in zip(ref_images, ref_masks, strict=True)]
    target_images = [open_image(t) for t in targets]
    model = _load(method, seg_opts, overrides)
    results = model.fit(pairs).predict_many(target_images)
    model_name = seg_opts["model"] or SEGMENTATION_METHODS.get(method).default_model
    out_dir = Path(out)
    names = _unique_stems(targets)
    for target, image, name, result in zip(targets, target_images, names, results, strict=True):
        summary = write_image_results(
            out_dir / name,
            image,
            [result.mask],
            scores=[result.score],
            file_name=Path(target).name,
            form="polygon" if form == "polygon" else "rle",
            meta={"method": method, "model": model_name, "references": list(refs)},
        )
        row = summary["objects"][0]
        if as_json:
            click.echo(jsonio.dumps(summary))
        else:
            click.echo(
                f"{target}: score {row['score']:.3f}, area {row['area']} px -> {out_dir / name}"
            )


def _unique_stems(paths: tuple[str, ...]) -> list[str]:
    """Output folder per target: its stem, numbered when two targets share one."""
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        stem = Path(p).stem
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return names


@main.command("eval-oneshot")
@click.option(
    "--data",
    required=True,
    type=click.Path(file_okay=False),
    help="A concept folder (images/ + masks/) or a folder of them (PerSeg layout).",
)
@method_option
@set_option
@click.option("--out", "out", required=True, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@functools.partial(segmenter_options, default_model=None)
@friendly_errors
@output_folder("eval-oneshot")
def eval_oneshot_cmd(
    data: str,
    method: str,
    overrides: tuple[str, ...],
    out: str,
    as_json: bool,
    **seg_opts: Any,
) -> None:
    """One-shot mIoU: per concept, the first image + mask is the reference, the rest targets.

    \b
    vprompt eval-oneshot --data PerSeg/ --method persam --out runs/perseg
    """
    from vprompt.segment.oneshot_eval import evaluate_oneshot, load_concepts
    from vprompt.utils.io import atomic_write_text

    concepts = load_concepts(data)
    model = _load(method, seg_opts, overrides)

    def run(ref: Any, mask: Any, targets: Any) -> list[Any]:
        return [r.mask for r in model.fit([(ref, mask)]).predict_many(list(targets))]

    report = evaluate_oneshot(concepts, run, max_pixels=seg_opts["max_pixels"])
    model_name = seg_opts["model"] or SEGMENTATION_METHODS.get(method).default_model
    result = {**report.to_dict(), "method": method, "model": model_name, "data": data}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "report.json", jsonio.dumps(result, indent=1))
    if as_json:
        click.echo(jsonio.dumps(result))
        return
    for name, value in report.per_concept.items():
        click.echo(f"{name}: IoU {value:.3f}")
    click.echo(f"mIoU {report.miou:.3f} over {len(concepts)} concept(s); report in {out_dir}")
