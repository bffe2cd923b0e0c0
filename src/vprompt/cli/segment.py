"""``vprompt segment | segment-all``: promptable segmentation with the SAM family."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from vprompt.cli.common import device_option, friendly_errors, main, output_folder, precision_option
from vprompt.segment.automatic import AutomaticMaskConfig
from vprompt.utils import jsonio

F = TypeVar("F", bound=Callable[..., Any])


mask_format_option = click.option(
    "--format",
    "form",
    type=click.Choice(["rle", "polygon"]),
    default="rle",
    help="Segmentation encoding in annotations.json (COCO): compressed RLE or polygons.",
)


def segmenter_options(fn: F, *, default_model: str | None = "sam:vit-base") -> F:
    """Model, weights, device, precision and embedding-cache options shared by every command."""
    options = [
        click.option(
            "--model",
            default=default_model,
            show_default=default_model is not None,
            help="Segmenter as sam:ARCH (see `vprompt models --family sam`).",
        ),
        click.option(
            "--weights",
            default=None,
            help="Hugging Face repo id (facebook/sam-vit-base), local save_pretrained folder, "
            "or 'none' (random init). Default: the architecture's hub id.",
        ),
        device_option,
        precision_option,
        click.option(
            "--embedding-cache",
            type=click.Path(file_okay=False),
            default=None,
            help="Folder keeping image embeddings across runs "
            "(default: $VPROMPT_CACHE/sam-embeddings).",
        ),
        click.option("--no-embedding-cache", is_flag=True, help="Keep embeddings in memory only."),
        click.option(
            "--max-pixels",
            default=None,
            type=click.IntRange(min=1),
            help="Refuse images with more pixels than this (default: Pillow's bomb limit).",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def segmenter_options_from(
    model: str | None,
    weights: str | None,
    device: str,
    precision: str,
    embedding_cache: str | None,
    no_embedding_cache: bool,
    max_pixels: int | None,
) -> Any:
    """The :class:`~vprompt.segment.incontext.SegmenterOptions` the shared options give."""
    from vprompt.data.images import DEFAULT_MAX_PIXELS
    from vprompt.segment.incontext import SegmenterOptions, default_embedding_cache

    disk: Path | None = None
    if not no_embedding_cache:
        disk = Path(embedding_cache) if embedding_cache else default_embedding_cache()
    return SegmenterOptions(
        model=model,
        weights=weights,
        device=device,
        precision=precision,
        max_pixels=max_pixels or DEFAULT_MAX_PIXELS,
        embedding_cache=disk,
    )


def build_segmenter(**seg_opts: Any) -> Any:
    """The SAM-family segmenter the shared options name."""
    from vprompt.segment import Segmenter

    return Segmenter.from_options(segmenter_options_from(**seg_opts))


def runtime_options(fn: F) -> F:
    """``--runtime torch|onnx`` and ``--onnx-decoder PATH``."""
    fn = click.option(
        "--onnx-decoder",
        type=click.Path(dir_okay=False),
        default=None,
        help="Decoder from `vprompt export onnx` for --runtime onnx (default: exported to "
        "$VPROMPT_CACHE/onnx on first use).",
    )(fn)
    return click.option(
        "--runtime",
        type=click.Choice(["torch", "onnx"]),
        default="torch",
        show_default=True,
        help="What decodes prompts: PyTorch, or onnxruntime on CPU (the image encoder stays "
        "in PyTorch).",
    )(fn)


def use_runtime(segmenter: Any, runtime: str, onnx_decoder: str | None) -> None:
    """Swap the segmenter's decoder for the ONNX one when ``runtime`` is ``onnx``."""
    if runtime != "onnx":
        return
    from vprompt.segment.onnx_runtime import OnnxSamDecoder

    segmenter.decoder = OnnxSamDecoder.for_backbone(segmenter.backbone, path=onnx_decoder)


def _explain_no_masks(counts: dict[str, int], config: AutomaticMaskConfig) -> None:
    """Which filter removed every candidate, and the option that sets it."""
    decoded, iou, stable = counts.get("decoded", 0), counts.get("pred_iou", 0), counts.get(
        "stability", 0
    )  # fmt: skip
    if decoded and not iou:
        why = (f"none of the {decoded} candidates had a predicted IoU above "
               f"{config.pred_iou_thresh} (lower --pred-iou-thresh)")  # fmt: skip
    elif iou and not stable:
        why = (f"{iou} of {decoded} candidates passed --pred-iou-thresh, none a stability of "
               f"{config.stability_score_thresh} (lower --stability-thresh)")  # fmt: skip
    elif stable and not counts.get("non_empty", 0):
        why = f"the {stable} candidates that passed both thresholds were empty masks"
    else:
        why = (f"the {counts.get('non_empty', 0)} candidates left touched a crop's edge or were "
               "removed by NMS or --min-region-area")  # fmt: skip
    warnings.warn(f"no masks: {why}", stacklevel=2)


def _report(result: dict[str, Any], out: Path, as_json: bool) -> None:
    if as_json:
        click.echo(jsonio.dumps(result))
        return
    for row in result["objects"]:
        click.echo(
            f"object {row['index']}: score {row['score']:.3f}, area {row['area']} px, "
            f"bbox {row['bbox']}"
        )
    if result["objects"]:
        click.echo(f"wrote {len(result['objects'])} mask(s), overlay and annotations to {out}")
    else:
        click.echo(f"wrote no masks, only the annotations (no objects) and result.json to {out}")


@main.command("segment")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--point", "points", multiple=True, metavar="X,Y[,L]", help="Click; L=0 negative.")
@click.option("--box", "boxes", multiple=True, metavar="X0,Y0,X1,Y1", help="Box corners.")
@click.option("--scribble", "scribbles", multiple=True, metavar="X,Y;X,Y;...[:L]", help="A stroke.")
@click.option("--mask", "mask", default=None, metavar="PNG", help="A mask prompt (non-zero = in).")
@click.option(
    "--object",
    "objects",
    multiple=True,
    metavar="SPEC",
    help="One object: items point=X,Y[,L] box=… scribble=… mask=PNG joined with '|'.",
)
@click.option(
    "--scribble-mode",
    type=click.Choice(["points", "points+mask"]),
    default="points",
    show_default=True,
    help="Scribbles become sampled points, or points plus a rasterised mask prompt.",
)
@click.option(
    "--multimask",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help="Three candidates per object, best kept (auto: only for single clicks).",
)
@click.option(
    "--prev-logits",
    type=click.Path(dir_okay=False),
    default=None,
    help="logits.npy of an earlier run: refine its objects with the new prompts.",
)
@mask_format_option
@click.option("--out", "out", required=True, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print result.json on stdout.")
@runtime_options
@segmenter_options
@friendly_errors
@output_folder("segment")
def segment_cmd(
    image: str,
    points: tuple[str, ...],
    boxes: tuple[str, ...],
    scribbles: tuple[str, ...],
    mask: str | None,
    objects: tuple[str, ...],
    scribble_mode: str,
    multimask: str,
    prev_logits: str | None,
    form: str,
    out: str,
    as_json: bool,
    runtime: str,
    onnx_decoder: str | None,
    **seg_opts: Any,
) -> None:
    """Segment objects in IMAGE from points, boxes, scribbles or masks.

    \b
    vprompt segment photo.jpg --point 320,240 --out out/
    vprompt segment photo.jpg --box 10,20,200,180 --box 220,30,400,300 --out out/
    vprompt segment photo.jpg --object "point=50,60|point=90,80,0" --object "box=1,2,3,4" \\
        --out out/
    """

    from vprompt.cli.segment_args import objects_from_cli
    from vprompt.errors import PromptError
    from vprompt.prompts.spatial import MaskLogits, ObjectPrompt, PromptSet
    from vprompt.segment.export import write_image_results
    from vprompt.utils.npy import ArrayFileError, read_npy

    segmenter = build_segmenter(**seg_opts)
    use_runtime(segmenter, runtime, onnx_decoder)
    pil = segmenter.open_image(image)
    object_prompts = objects_from_cli(
        points=points,
        boxes=boxes,
        scribbles=scribbles,
        mask=mask,
        objects=objects,
        image_size=pil.size,
        scribble_mode=scribble_mode,
    )
    if prev_logits:
        try:
            previous = read_npy(prev_logits)
        except ArrayFileError as exc:
            raise PromptError(f"--prev-logits {exc}") from None
        if previous.ndim != 3 or previous.shape[0] != len(object_prompts):
            raise PromptError(
                f"--prev-logits {prev_logits}: expected N x L x L for the {len(object_prompts)} "
                f"object(s) given, got shape {previous.shape}"
            )
        object_prompts = [
            ObjectPrompt(points=o.points, boxes=o.boxes, logits=MaskLogits(previous[i]))
            if o.mask is None
            else o
            for i, o in enumerate(object_prompts)
        ]
    prompts = PromptSet(object_prompts, image_size=pil.size)
    result = segmenter.decode(
        segmenter.embed_image(pil),
        prompts,
        multimask="auto" if multimask == "auto" else multimask == "on",
        best_only=True,
    )
    out_dir = Path(out)
    summary = write_image_results(
        out_dir,
        pil,
        [result.masks[i, 0] for i in range(len(result))],
        scores=[float(s) for s in result.iou[:, 0]],
        file_name=Path(image).name,
        form="polygon" if form == "polygon" else "rle",
        objects=[
            {"stability": round(float(result.stability[i, 0]), 6), "prompt": _describe(o)}
            for i, o in enumerate(object_prompts)
        ],
        meta={"model": segmenter.backbone.name, "weights": segmenter.backbone.weights},
    )
    save_npy(out_dir / "logits.npy", result.logits[:, 0])
    _report(summary, out_dir, as_json)


def save_npy(path: Path, array: Any) -> None:
    """``np.save`` through a temporary file, so a crash never leaves half an array."""
    import numpy as np

    from vprompt.utils.io import atomic_path

    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        np.save(fh, array)


def _describe(obj: Any) -> dict[str, Any]:
    return {
        "points": [[p.x, p.y, int(p.positive)] for p in obj.points],
        "box": None if obj.box is None else [obj.box.x0, obj.box.y0, obj.box.x1, obj.box.y1],
        "mask_input": obj.has_mask_input,
    }


_AMG = AutomaticMaskConfig()  # the one home of the generator's defaults


@main.command("segment-all")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option(
    "--points-per-side", default=_AMG.points_per_side, show_default=True, type=click.IntRange(min=1)
)
@click.option(
    "--points-per-batch",
    default=_AMG.points_per_batch,
    show_default=True,
    type=click.IntRange(min=1),
)
@click.option("--pred-iou-thresh", default=_AMG.pred_iou_thresh, show_default=True, type=float)
@click.option(
    "--stability-thresh", default=_AMG.stability_score_thresh, show_default=True, type=float
)
@click.option("--box-nms-thresh", default=_AMG.box_nms_thresh, show_default=True, type=float)
@click.option(
    "--crop-layers", default=_AMG.crop_n_layers, show_default=True, type=click.IntRange(min=0)
)
@click.option(
    "--min-region-area",
    default=_AMG.min_mask_region_area,
    show_default=True,
    type=click.IntRange(min=0),
    help="Remove islands and fill holes smaller than this many pixels.",
)
@mask_format_option
@click.option("--out", "out", required=True, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print result.json on stdout.")
@segmenter_options
@friendly_errors
@output_folder("segment-all")
def segment_all_cmd(
    image: str,
    points_per_side: int,
    points_per_batch: int,
    pred_iou_thresh: float,
    stability_thresh: float,
    box_nms_thresh: float,
    crop_layers: int,
    min_region_area: int,
    form: str,
    out: str,
    as_json: bool,
    **seg_opts: Any,
) -> None:
    """Segment everything in IMAGE (SAM's automatic mask generation, its defaults).

    \b
    vprompt segment-all photo.jpg --out out/
    vprompt segment-all photo.jpg --crop-layers 1 --min-region-area 100 --out out/
    """
    from vprompt.segment.automatic import AutomaticMaskGenerator
    from vprompt.segment.export import write_image_results

    segmenter = build_segmenter(**seg_opts)
    pil = segmenter.open_image(image)
    config = AutomaticMaskConfig(
        points_per_side=points_per_side,
        points_per_batch=points_per_batch,
        pred_iou_thresh=pred_iou_thresh,
        stability_score_thresh=stability_thresh,
        box_nms_thresh=box_nms_thresh,
        crop_n_layers=crop_layers,
        min_mask_region_area=min_region_area,
    )
    generator = AutomaticMaskGenerator(segmenter, config=config)
    records = generator.generate(pil, progress=True)
    if not records:
        _explain_no_masks(generator.last_counts, config)
    out_dir = Path(out)
    summary = write_image_results(
        out_dir,
        pil,
        [r.segmentation for r in records],
        scores=[r.predicted_iou for r in records],
        file_name=Path(image).name,
        form="polygon" if form == "polygon" else "rle",
        objects=[
            {
                "stability": round(r.stability_score, 6),
                "point": [round(v, 2) for v in r.point_coords],
                "crop_box": list(r.crop_box),
            }
            for r in records
        ],
        meta={
            "model": segmenter.backbone.name,
            "weights": segmenter.backbone.weights,
            "config": dataclasses.asdict(config),
        },
    )
    _report(summary, out_dir, as_json)
