"""``vprompt ground`` and ``vprompt eval-ground``: referring expressions on a frozen CLIP with
marker prompts, or on a phrase-grounding detector."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from vprompt.cli.common import friendly_errors, main, output_folder
from vprompt.cli.detect_args import build_finder, model_options, parse_boxes
from vprompt.utils import jsonio

F = TypeVar("F", bound=Callable[..., Any])


def grounding_options(fn: F) -> F:
    """Method, CLIP model, markers, subtraction and candidates (shared by both commands)."""
    options = [
        click.option(
            "--method",
            default="marker-clip",
            show_default=True,
            help="Grounding method: marker-clip (CLIP ranks marked candidates) or detector "
            "(a phrase-grounding detector reads the expression).",
        ),
        click.option(
            "--clip",
            "clip_model",
            default="clip:ViT-B-16",
            show_default=True,
            help="The frozen CLIP that ranks marked candidates.",
        ),
        click.option("--clip-weights", default=None, help="Weight source of --clip."),
        click.option(
            "--marker",
            "markers",
            multiple=True,
            metavar="NAME[+NAME]",
            help="How a candidate is marked: red-circle (default), box, contour, blur, grey, "
            "crop, or a '+' combination on one image; repeat to sum several markings.",
        ),
        click.option(
            "--no-subtract",
            is_flag=True,
            help="Skip the bias subtraction (each marked image's mean score over unrelated "
            "expressions).",
        ),
        click.option(
            "--negatives",
            default=None,
            type=click.Path(dir_okay=False),
            help="Unrelated expressions for the subtraction, one per line (default: built in).",
        ),
        click.option(
            "--candidate-query",
            default=None,
            help="What the detector proposes candidates for (default: the expression).",
        ),
        click.option(
            "--max-candidates",
            default=10,
            show_default=True,
            type=click.IntRange(min=1, max=1000),
            help="Most candidate regions ranked.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _build(
    *,
    method: str,
    candidates: str,
    clip_model: str,
    clip_weights: str | None,
    markers: tuple[str, ...],
    no_subtract: bool,
    negatives: str | None,
    candidate_query: str | None,
    max_candidates: int,
    model: str | None,
    weights: str | None,
    mask_model: str | None,
    mask_weights: str | None,
    device: str,
    max_pixels: int | None,
    allow_boxes: bool,
) -> tuple[Any, Any, Any, Any]:
    """(method, candidate source, finder, segmenter) from the options."""
    from vprompt.backbones.clip import ClipBackbone
    from vprompt.backbones.registry import load_backbone
    from vprompt.detect.grounding import (
        GROUNDING_METHODS,
        CandidateSource,
        GroundingOptions,
        read_negatives,
    )
    from vprompt.errors import ConfigError
    from vprompt.segment.segmenter import Segmenter

    build_method = GROUNDING_METHODS.get(method)
    finder = segmenter = None
    if model is not None:
        finder = build_finder(
            model=model,
            weights=weights,
            mask_model=mask_model,
            mask_weights=mask_weights,
            device=device,
            max_pixels=max_pixels,
        )
        segmenter = finder.segmenter
    elif mask_model is not None:
        segmenter = Segmenter.load(mask_model, mask_weights, device=device)
    if candidates == "detector":
        source = CandidateSource(kind="detector", query=candidate_query, limit=max_candidates)
    elif candidates == "automatic":
        source = CandidateSource(kind="automatic", limit=max_candidates)
    elif allow_boxes:
        boxes = tuple(parse_boxes(candidates, "--candidates"))
        source = CandidateSource(kind="boxes", boxes=boxes, limit=max_candidates)
    else:
        raise ConfigError(f"--candidates {candidates!r}: expected detector or automatic here")

    def load_clip() -> ClipBackbone:
        clip = load_backbone(clip_model, clip_weights, device=device)
        if not isinstance(clip, ClipBackbone):
            raise ConfigError(f"--clip {clip_model}: expected a clip:ARCH model")
        return clip

    options = GroundingOptions(
        finder=finder,
        load_clip=load_clip,
        marker=markers or ("red-circle",),
        subtract=not no_subtract,
        negatives=None if negatives is None else read_negatives(negatives),
    )
    return build_method(options), source, finder, segmenter


@main.command("ground")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--expression", required=True, help='What to find, e.g. "the dog on the left".')
@click.option(
    "--candidates",
    default="detector",
    show_default=True,
    metavar="detector|automatic|BOXES",
    help="Candidate regions: the detector's boxes (--model), SAM's automatic masks (--model "
    "and --masks), or boxes 'X0,Y0,X1,Y1;X0,Y0,X1,Y1'.",
)
@grounding_options
@click.option("--out", "out", required=True, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print result.json on stdout.")
@model_options
@friendly_errors
@output_folder("ground")
def ground_cmd(
    image: str,
    expression: str,
    candidates: str,
    out: str,
    as_json: bool,
    **options: Any,
) -> None:
    """Find the one region of IMAGE that an expression refers to.

    Writes overlay.png (the chosen region), annotations.json (COCO), result.json (every
    candidate's score) and candidates.png: the candidates as numbered Set-of-Mark regions,
    whose legend is in result.json, ready to send to a multimodal LLM.

    \b
    vprompt ground photo.jpg --expression "the taller of the two dogs" --model owlv2 \\
        --candidate-query dog --out out/
    vprompt ground photo.jpg --expression "the left mug" --candidates "10,10,80,90;120,15,200,95" \\
        --marker blur --out out/
    vprompt ground photo.jpg --expression "the man in red" --method detector \\
        --model grounding-dino --masks sam:vit-base --out out/
    """
    from vprompt.data.images import DEFAULT_MAX_PIXELS, open_rgb
    from vprompt.detect.export import write_detections
    from vprompt.detect.finder import segment_boxes
    from vprompt.detect.grounding import ground
    from vprompt.detect.referring import regions_from_detections
    from vprompt.detect.set_of_mark import render_set_of_marks
    from vprompt.utils.io import atomic_write_with

    method, source, finder, segmenter = _build(candidates=candidates, allow_boxes=True, **options)
    limit = options["max_pixels"] or DEFAULT_MAX_PIXELS
    pil = open_rgb(image, max_pixels=limit)
    result = ground(method, pil, expression, source=source, finder=finder, segmenter=segmenter)
    chosen = result.chosen()
    if chosen.masks is None and segmenter is not None:
        chosen = segment_boxes(segmenter, pil, chosen)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    marks = render_set_of_marks(pil, regions_from_detections(result.candidates))
    atomic_write_with(out_dir / "candidates.png", lambda tmp: marks.image.save(tmp, format="PNG"))
    meta = {
        "method": result.method,
        "expression": result.expression,
        "model": None if finder is None else finder.detector.name,
        "clip": getattr(getattr(method, "clip", None), "name", None),
        "markers": list(options["markers"] or ("red-circle",)),
        "chosen": {"index": result.best, "box": [round(v, 2) for v in result.box]},
        "candidates": result.records,
        "set_of_mark": {"image": "candidates.png", "legend": marks.legend},
    }
    summary = write_detections(out_dir, pil, chosen, file_name=Path(image).name, meta=meta)
    if as_json:
        click.echo(jsonio.dumps(summary))
        return
    box = ", ".join(f"{v:.1f}" for v in result.box)
    click.echo(
        f"{result.expression!r}: candidate {result.best} of {len(result.candidates)} at "
        f"({box}); wrote overlay, candidates and result.json to {out_dir}"
    )


@main.command("eval-ground")
@click.argument("refs", type=click.Path(dir_okay=False))
@click.option(
    "--candidates",
    default="detector",
    show_default=True,
    type=click.Choice(["detector", "automatic"]),
    help="Candidate regions per image: the detector's boxes or SAM's automatic masks.",
)
@click.option("--iou", "iou_threshold", default=0.5, show_default=True, type=float)
@grounding_options
@click.option("--out", "out", required=True, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary on stdout.")
@model_options
@friendly_errors
@output_folder("eval-ground")
def eval_ground_cmd(
    refs: str,
    candidates: str,
    iou_threshold: float,
    out: str,
    as_json: bool,
    **options: Any,
) -> None:
    """Referring-expression accuracy (IoU >= 0.5) on a RefCOCO-style JSON.

    REFS is {"images_dir": …, "refs": [{"image", "expression", "box": [x0,y0,x1,y1]}]} (or
    "bbox": [x,y,w,h]); grounding.json in --out holds every ref's prediction and IoU.

    \b
    vprompt eval-ground refcoco-val.json --model owlv2 --out runs/refcoco-red-circle
    vprompt eval-ground refs.json --method detector --model grounding-dino --out runs/gd
    """
    from vprompt.detect.grounding import ground
    from vprompt.detect.refcoco import evaluate_grounding, read_refs

    data = read_refs(refs)
    method, source, finder, segmenter = _build(candidates=candidates, allow_boxes=False, **options)

    def ground_fn(image: Any, expression: str) -> tuple[float, float, float, float]:
        found = ground(method, image, expression, source=source, finder=finder, segmenter=segmenter)
        return found.box

    report = evaluate_grounding(ground_fn, data, iou_threshold=iou_threshold, output=Path(out))
    summary = {k: v for k, v in report.to_dict().items() if k != "records"}
    summary["method"] = method.name
    if as_json:
        click.echo(jsonio.dumps(summary))
        return
    click.echo(
        f"{method.name}: accuracy {100 * report.accuracy:.1f}% at IoU >= {iou_threshold:g} on "
        f"{len(report.records)} refs (mean IoU {report.mean_iou:.3f}); wrote grounding.json "
        f"to {out}"
    )
