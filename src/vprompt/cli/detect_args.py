"""Options shared by ``detect``, ``ground``, ``eval-detect`` and ``eval-ground``: which
detector, its post-processing, optional masks, and how exemplars / boxes are written."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from vprompt.cli.common import device_option

F = TypeVar("F", bound=Callable[..., Any])


def _apply(fn: F, options: list[Callable[[F], F]]) -> F:
    for option in reversed(options):
        fn = option(fn)
    return fn


def model_options(fn: F, *, model_required: bool = False) -> F:
    """``--model``, ``--weights``, ``--masks``, ``--mask-weights``, ``--max-pixels``, device."""
    return _apply(
        fn,
        [
            click.option(
                "--model",
                required=model_required,
                default=None,
                help="Detector as FAMILY:ARCH or a bare FAMILY for its default "
                "(`vprompt detectors` lists them).",
            ),
            click.option(
                "--weights",
                default=None,
                help="Hub id, local save_pretrained folder, or 'none' (random init). "
                "Default: the architecture's hub id.",
            ),
            click.option(
                "--masks",
                "mask_model",
                default=None,
                metavar="sam:ARCH",
                help="Turn kept boxes into masks with this segmenter (one batched decode).",
            ),
            click.option("--mask-weights", default=None, help="Weight source of --masks."),
            click.option(
                "--max-pixels",
                default=None,
                type=click.IntRange(min=1),
                help="Refuse images with more pixels than this (default: Pillow's bomb limit).",
            ),
            device_option,
        ],
    )


def detector_options(fn: F) -> F:
    """:func:`model_options` with ``--model`` required, plus the post-processing filter."""
    fn = _apply(
        fn,
        [
            click.option(
                "--score-threshold",
                type=float,
                default=None,
                help="Keep detections scoring at least this (default: the detector's "
                "reference value).",
            ),
            click.option(
                "--nms-iou",
                type=float,
                default=None,
                help="Suppress boxes overlapping a better one above this IoU (1 = off; "
                "default: the detector's).",
            ),
            click.option("--class-agnostic", is_flag=True, help="NMS across queries, not within."),
            click.option(
                "--top-k",
                type=click.IntRange(min=0),
                default=None,
                help="Keep at most K (0 = all).",
            ),
        ],
    )
    return model_options(fn, model_required=True)


def build_finder(
    *,
    model: str,
    weights: str | None,
    mask_model: str | None,
    mask_weights: str | None,
    device: str,
    max_pixels: int | None,
) -> Any:
    from vprompt.data.images import DEFAULT_MAX_PIXELS
    from vprompt.detect.finder import Finder

    return Finder.load(
        model,
        weights,
        device=device,
        masks=mask_model,
        mask_weights=mask_weights,
        max_pixels=max_pixels or DEFAULT_MAX_PIXELS,
    )


def filter_from(
    finder: Any,
    *,
    score_threshold: float | None,
    nms_iou: float | None,
    class_agnostic: bool,
    top_k: int | None,
    exemplars_only: bool = False,
) -> Any:
    """The detector's defaults (image-guided ones for exemplar-only calls), overridden by
    whichever options were given."""
    return finder.default_filter(
        exemplars_only=exemplars_only,
        score_threshold=score_threshold,
        nms_iou=nms_iou,
        class_agnostic=class_agnostic or None,
        top_k=top_k,
    )


def parse_box(text: str, what: str) -> tuple[float, float, float, float]:
    """``X0,Y0,X1,Y1`` → four finite floats (checked against an image later)."""
    from vprompt.errors import PromptError

    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise PromptError(f"{what} {text!r}: expected four numbers X0,Y0,X1,Y1")
    return values[0], values[1], values[2], values[3]


def parse_boxes(text: str, what: str) -> list[tuple[float, float, float, float]]:
    """``X0,Y0,X1,Y1;X0,Y0,X1,Y1…`` → boxes."""
    from vprompt.errors import PromptError

    items = [t for t in text.split(";") if t.strip()]
    if not items:
        raise PromptError(f"{what} {text!r}: expected boxes X0,Y0,X1,Y1 separated by ';'")
    return [parse_box(t, what) for t in items]


def parse_exemplars(
    specs: Sequence[str],
    negatives: Sequence[str],
    *,
    default_image: Path,
    open_image: Callable[[Path], Any],
) -> list[Any]:
    """``[IMG:]X0,Y0,X1,Y1`` specs → :class:`~vprompt.backbones.detection.Exemplar` s.

    Without ``IMG:`` the box is on ``default_image`` (the first image given). A path may hold
    colons; the box is what follows the last one. Each reference image is opened once.
    """
    from vprompt.backbones.detection import Exemplar
    from vprompt.errors import PromptError

    opened: dict[Path, Any] = {}
    out = []
    for spec, positive in [(s, True) for s in specs] + [(s, False) for s in negatives]:
        flag = "--exemplar" if positive else "--negative-exemplar"
        path_text, sep, box_text = spec.rpartition(":")
        path = Path(path_text) if sep else default_image
        if sep and not path_text:
            raise PromptError(f"{flag} {spec!r}: expected [IMAGE:]X0,Y0,X1,Y1")
        box = parse_box(box_text, flag)
        if path not in opened:
            opened[path] = open_image(path)
        try:
            out.append(Exemplar(image=opened[path], box=box, positive=positive))
        except PromptError as exc:
            raise PromptError(f"{flag} {spec!r}: {exc}") from None
    return out
