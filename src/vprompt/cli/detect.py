"""``vprompt detect``: find objects from words or example boxes, with optional masks."""

from __future__ import annotations

from pathlib import Path

import click

from vprompt.cli.common import friendly_errors, main, output_folder
from vprompt.cli.detect_args import (
    build_finder,
    detector_options,
    filter_from,
    parse_exemplars,
)
from vprompt.cli.segment import mask_format_option
from vprompt.utils import jsonio


def _list_detectors() -> None:
    from vprompt.backbones.detection import DETECTORS

    for name in DETECTORS.names():
        spec = DETECTORS.get(name)
        caps = spec.capabilities
        takes = [
            what
            for what, on in (
                ("text", caps.text),
                ("exemplars", caps.exemplars),
                ("negative exemplars", caps.negative_exemplars),
                ("masks", caps.masks),
                ("phrases", caps.phrases),
            )
            if on
        ]
        click.echo(
            f"{name + ':':22} {spec.description} [default {spec.default_model}; "
            f"{', '.join(takes)}; score threshold {spec.score_threshold:g}]"
        )


def unique_folders(images: list[str]) -> list[str]:
    """One sub-folder name per image: its stem, with ``-2``, ``-3`` … on repeats."""
    seen: dict[str, int] = {}
    names = []
    for image in images:
        stem = Path(image).stem or "image"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return names


@main.command("detectors")
def detectors_cmd() -> None:
    """List the detectors `vprompt detect --model` takes, with what each accepts."""
    _list_detectors()


@main.command("detect")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--query", "queries", multiple=True, metavar="TEXT", help="What to find (repeat).")
@click.option(
    "--exemplar",
    "exemplars",
    multiple=True,
    metavar="[IMG:]X0,Y0,X1,Y1",
    help="An example object: a box on IMG (default: the first image). Finds all similar.",
)
@click.option(
    "--negative-exemplar",
    "negatives",
    multiple=True,
    metavar="[IMG:]X0,Y0,X1,Y1",
    help="An object NOT to find (detectors with negative exemplars, e.g. sam3:).",
)
@mask_format_option
@click.option("--out", "out", required=True, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the result JSON on stdout.")
@detector_options
@friendly_errors
@output_folder("detect")
def detect_cmd(
    images: tuple[str, ...],
    queries: tuple[str, ...],
    exemplars: tuple[str, ...],
    negatives: tuple[str, ...],
    form: str,
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
    """Find every object in IMAGES matching text queries or example boxes.

    One image writes overlay.png, annotations.json (COCO) and result.json (plus mask PNGs
    with --masks or a mask-making detector) into --out; several images write one sub-folder
    each and a summary result.json. `vprompt detectors` lists the models.

    \b
    vprompt detect photo.jpg --model owlv2 --query "a red mug" --query "a spoon" --out out/
    vprompt detect a.jpg b.jpg --model owlv2 --exemplar a.jpg:10,20,80,90 --out out/
    vprompt detect photo.jpg --model grounding-dino --query "the dog on the left" \\
        --masks sam:vit-base --out out/
    """
    from tqdm.auto import tqdm

    from vprompt.detect.export import write_detections
    from vprompt.utils.io import atomic_write_text

    finder = build_finder(
        model=model,
        weights=weights,
        mask_model=mask_model,
        mask_weights=mask_weights,
        device=device,
        max_pixels=max_pixels,
    )
    options = filter_from(
        finder,
        score_threshold=score_threshold,
        nms_iou=nms_iou,
        class_agnostic=class_agnostic,
        top_k=top_k,
        exemplars_only=not queries,
    )
    examples = parse_exemplars(
        exemplars, negatives, default_image=Path(images[0]), open_image=finder.open_image
    )
    meta = {
        "model": finder.detector.name,
        "weights": finder.detector.weights,
        "masks": None if finder.segmenter is None else finder.segmenter.backbone.name,
        "filter": {
            "score_threshold": options.score_threshold,
            "nms_iou": options.nms_iou,
            "class_agnostic": options.class_agnostic,
            "top_k": options.top_k,
        },
        "exemplars": [
            {"box": list(e.box), "positive": e.positive, "image": spec.rpartition(":")[0] or None}
            for e, spec in zip(examples, [*exemplars, *negatives], strict=True)
        ],
    }
    out_dir = Path(out)
    single = len(images) == 1
    folders = unique_folders(list(images))
    results = []
    for k, (image, folder) in enumerate(
        zip(tqdm(images, desc="detect", unit="img", disable=single), folders, strict=True)
    ):
        pil = finder.open_image(image)
        found = finder.find(pil, queries=queries, exemplars=examples, filter=options)
        result = write_detections(
            out_dir if single else out_dir / folder,
            pil,
            found,
            file_name=Path(image).name,
            form="polygon" if form == "polygon" else "rle",
            meta=meta,
            image_id=k + 1,
        )
        results.append({"folder": None if single else folder, **result})
    summary = results[0] if single else {**meta, "images": results}
    if not single:
        atomic_write_text(out_dir / "result.json", jsonio.dumps(summary, indent=1) + "\n")
    if as_json:
        click.echo(jsonio.dumps(summary))
        return
    for res in results:
        where = f"{res['image']}: " if not single else ""
        for row in res["objects"]:
            click.echo(
                f"{where}{row['query']!r} score {row['score']:.3f} box "
                f"{[round(v, 1) for v in row['box']]}"
            )
    total = sum(len(r["objects"]) for r in results)
    click.echo(f"found {total} object(s) in {len(images)} image(s); wrote them to {out_dir}")
