"""The detector seam: open-vocabulary detectors and concept segmenters behind one protocol.

A detector backbone takes one RGB image plus what to look for — text queries (class names,
phrases, referring expressions) and/or exemplars (a box on a reference image, positive or
negative) — and returns every candidate it scores, in the original image's pixels, before any
score threshold, NMS or top-k (those live in :class:`vprompt.detect.Detections`, the same for
every model). What a backbone can take is declared in :class:`DetectorCapabilities`, never
probed.

Coordinates: boxes are ``x0, y0, x1, y1`` floats in pixels of the image as given (``W x H``),
``0 <= x0 < x1 <= W``; masks are ``H x W`` booleans of that image.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image

from vprompt.errors import PromptError, UnknownNameError
from vprompt.utils.registry import Registry

MAX_QUERY_CHARS = 256  # longer "queries" are pasted documents, not phrases


@dataclass(frozen=True)
class DetectorCapabilities:
    """What a detector backbone accepts and returns.

    Attributes:
        text: Free-text queries (one label per query).
        exemplars: Image-guided queries: a box on a reference image finds similar objects.
        negative_exemplars: Exemplar boxes may be negative (``positive=False``) to exclude
            look-alikes (SAM 3).
        masks: Returns an instance mask per detection.
        phrases: Queries are grounded as phrases inside one caption, so a long referring
            expression is one query (Grounding DINO); without it a query is matched as a
            whole class name.
        max_queries: Most text queries in one call (the text encoder's context bounds it);
            0 for no limit.
        max_query_tokens: Most text tokens one query may have after tokenization.
    """

    text: bool
    exemplars: bool
    negative_exemplars: bool = False
    masks: bool = False
    phrases: bool = False
    max_queries: int = 0
    max_query_tokens: int = 0


@dataclass(frozen=True)
class Exemplar:
    """One example object: a box on a reference image.

    Attributes:
        image: The reference image (RGB); may be the target image itself.
        box: ``x0, y0, x1, y1`` in that image's pixels.
        positive: False marks an object *not* to find (only where
            ``negative_exemplars`` is declared).
    """

    image: Image.Image
    box: tuple[float, float, float, float]
    positive: bool = True

    def __post_init__(self) -> None:
        check_box(self.box, self.image.size, what="exemplar box")


def pixel_key(image: Image.Image) -> str:
    """A digest of an image's RGB pixels and size: the key of per-image embedding caches
    (same pixels, same key, whatever PIL object holds them)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    digest = hashlib.blake2b(rgb.tobytes(), digest_size=16)
    digest.update(f"{rgb.size}".encode())
    return digest.hexdigest()


def check_box(
    box: Sequence[float], image_size: tuple[int, int], *, what: str = "box"
) -> tuple[float, float, float, float]:
    """Validate ``x0, y0, x1, y1`` against a ``W x H`` image; return it as floats.

    Raises:
        PromptError: Not four finite numbers, empty, or reaching outside the image.
    """
    w, h = image_size
    if len(box) != 4:
        raise PromptError(f"{what} {list(box)!r}: expected four numbers X0,Y0,X1,Y1")
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise PromptError(f"{what} {list(box)!r}: expected four numbers X0,Y0,X1,Y1") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise PromptError(f"{what} {list(box)!r}: coordinates must be finite")
    if not (x0 < x1 and y0 < y1):
        raise PromptError(f"{what} ({x0:g},{y0:g},{x1:g},{y1:g}): needs X0 < X1 and Y0 < Y1")
    if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
        raise PromptError(
            f"{what} ({x0:g},{y0:g},{x1:g},{y1:g}) reaches outside the {w}x{h} image "
            f"(expected 0 <= X0 < X1 <= {w} and 0 <= Y0 < Y1 <= {h})"
        )
    return x0, y0, x1, y1


def check_queries(
    queries: Sequence[str], capabilities: DetectorCapabilities, *, name: str
) -> list[str]:
    """Strip and validate text queries for a detector; return them.

    Raises:
        PromptError: An empty query, one over :data:`MAX_QUERY_CHARS` characters, more queries
            than the model takes, or text given to a model without text queries.
    """
    cleaned = [" ".join(str(q).split()) for q in queries]
    if cleaned and not capabilities.text:
        raise PromptError(f"{name} takes no text queries (it finds objects from exemplars)")
    for q, raw in zip(cleaned, queries, strict=True):
        if not q:
            raise PromptError(f"query {raw!r} is empty; expected a word or a phrase")
        if len(q) > MAX_QUERY_CHARS:
            raise PromptError(
                f"query {q[:40]!r}… has {len(q)} characters; expected at most {MAX_QUERY_CHARS}"
            )
    if capabilities.max_queries and len(cleaned) > capabilities.max_queries:
        raise PromptError(
            f"{name} takes at most {capabilities.max_queries} text queries per call, "
            f"got {len(cleaned)}"
        )
    return cleaned


@dataclass(frozen=True, eq=False)
class DetectorOutput:
    """Every candidate a detector scored on one image (before thresholds, NMS, top-k).

    Shapes: N candidates; H x W the original image.

    Attributes:
        boxes: N x 4 float32 ``x0, y0, x1, y1`` in original-image pixels, clipped to it.
        scores: N float32 in [0, 1].
        labels: N int64: the query each candidate answers (index into the text queries,
            then the exemplar groups, in the order given).
        masks: N x H x W bool instance masks, or None.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor | None = None


@runtime_checkable
class DetectorBackbone(Protocol):
    """A frozen open-vocabulary detector (``owlv2:``, ``grounding-dino:``, ``sam3:`` …)."""

    name: str
    weights: str
    capabilities: DetectorCapabilities

    def fingerprint(self) -> str: ...

    def detect(
        self,
        image: Image.Image,
        *,
        queries: Sequence[str] = (),
        exemplars: Sequence[Exemplar] = (),
    ) -> DetectorOutput:
        """Score candidates on ``image`` for each text query and the exemplars.

        Labels count text queries first (``0 .. len(queries) - 1``). On a model without
        ``negative_exemplars`` each exemplar is its own query, labelled after the text ones.
        On one with it (SAM 3) the exemplars refine a single concept: they join the only text
        query (label 0) or, with no text, form the concept alone (label 0); exemplars next to
        several text queries are refused with a :class:`~vprompt.errors.PromptError`.
        """
        ...


@dataclass(frozen=True)
class DetectorSpec:
    """A registered detector: one backbone family and what the CLI and server need to know
    about it without building it.

    Attributes:
        family: The backbone family prefix (``owlv2``), also the registry name.
        description: One line for ``vprompt detect --help`` and the server's model list.
        capabilities: What it accepts and returns (the same object the backbone carries).
        default_model: ``family:arch`` used when only the family is named.
        tiny_model: The test architecture (random init, builds in well under a second).
        score_threshold: The reference's default score threshold for this model.
        nms_iou: Default NMS IoU (1.0: the model's output needs none, e.g. DETR-style sets).
        exemplar_nms_iou: Default NMS IoU when only exemplars are given (None: ``nms_iou``);
            OWL's image-guided post-processing suppresses at 0.3 where its text path does not.
    """

    family: str
    description: str
    capabilities: DetectorCapabilities
    default_model: str
    tiny_model: str
    score_threshold: float
    nms_iou: float = 0.5
    exemplar_nms_iou: float | None = None


DETECTORS: Registry[DetectorSpec] = Registry("detector")


def register_detector(spec: DetectorSpec) -> DetectorSpec:
    """Register a detector family (its module also registers the backbone family)."""
    return DETECTORS.register(spec.family, spec)


def detector_spec(model: str) -> DetectorSpec:
    """The detector a ``family:arch`` (or bare family) name belongs to.

    Raises:
        UnknownNameError: The family is not a registered detector (lists those that are).
    """
    family = model.split(":", 1)[0].lower()
    if family not in DETECTORS.names():
        raise UnknownNameError(
            f"model {model!r} is not a detector; detectors are "
            f"{', '.join(f'{n}:' for n in DETECTORS.names()) or 'none registered'}"
        )
    return DETECTORS.get(family)


def load_detector(
    model: str, weights: str | None = None, *, device: Any = "auto"
) -> tuple[DetectorBackbone, DetectorSpec]:
    """Build a registered detector and return it with its registry entry.

    Args:
        model: ``family:arch``, or a bare family for its default architecture.
        weights: Its weight source (None: the architecture's default).

    Raises:
        UnknownNameError: The family is not a detector.
    """
    from vprompt.backbones.registry import load_backbone

    spec = detector_spec(model)
    name = model if ":" in model else spec.default_model
    backbone = load_backbone(name, weights, device=device)
    if not isinstance(backbone, DetectorBackbone):
        raise UnknownNameError(f"model {name!r} is not a detector ({type(backbone).__name__})")
    return backbone, spec
