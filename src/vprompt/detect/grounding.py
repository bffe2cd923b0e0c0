"""Referring-expression grounding methods: which region does "the taller of the two dogs"
mean? Registered by name, like every other method, so the CLI and server never name them.

- ``marker-clip``: candidate regions are marked on the image one at a time and a frozen CLIP
  ranks the marked images against the expression (:func:`~vprompt.detect.referring.rank_regions`:
  red circle, reverse blur … and the bias subtraction of Shtedritski et al. 2023).
- ``detector``: a phrase-grounding detector (Grounding DINO, or any text detector) reads the
  whole expression as one query; its best-scoring box is the answer.

Candidates come from a :class:`CandidateSource`: a detector's boxes for a query (the
expression by default), SAM's automatic masks, or boxes given by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, TypeVar

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from vprompt.detect.finder import Finder
from vprompt.detect.markers import Region
from vprompt.detect.referring import rank_regions, regions_from_boxes, regions_from_detections
from vprompt.detect.result import Detections
from vprompt.errors import ConfigError, PromptError
from vprompt.segment.automatic import AutomaticMaskConfig, AutomaticMaskGenerator
from vprompt.segment.segmenter import Segmenter
from vprompt.utils.registry import Registry

CandidateKind = Literal["detector", "automatic", "boxes"]
DEFAULT_CANDIDATES = 10


@dataclass(frozen=True, eq=False)
class GroundingResult:
    """The candidates of one expression, their scores and the chosen one.

    Attributes:
        expression: The expression as grounded.
        method: The grounding method's name.
        candidates: N candidate regions (boxes, masks when they have them); their ``scores``
            are the source's own (detector score, SAM's predicted IoU, 1 for given boxes).
        scores: N float32: the method's ranking score (higher is better).
        best: Index of the chosen candidate.
        records: Per-candidate details, best first (JSON-ready).
    """

    expression: str
    method: str
    candidates: Detections
    scores: NDArray[np.float32]
    best: int
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def box(self) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = (float(v) for v in self.candidates.boxes[self.best])
        return x0, y0, x1, y1

    def chosen(self) -> Detections:
        """The chosen candidate alone, labelled with the expression, scored by the method."""
        one = self.candidates.select([self.best])
        return Detections(
            boxes=one.boxes,
            scores=self.scores[[self.best]].astype(np.float32),
            labels=np.zeros(1, np.int64),
            queries=(self.expression,),
            image_size=one.image_size,
            masks=one.masks,
        )


@dataclass(frozen=True)
class GroundingOptions:
    """Everything a grounding method may be built from (what ``ground``'s options say).

    Attributes:
        finder: The detector (and segmenter), for ``detector`` grounding and candidates.
        load_clip: Builds the frozen CLIP backbone, for ``marker-clip`` (called only by
            methods that need it, so the others never load one).
        marker: Marker name(s): ``red-circle``, ``blur``, ``red-circle+blur`` …; several are
            scored as separate images and summed.
        subtract: The paper's bias subtraction.
        negatives: Expressions for the subtraction (None: the built-in set).
    """

    finder: Finder | None = None
    load_clip: Callable[[], Any] | None = None
    marker: tuple[str, ...] = ("red-circle",)
    subtract: bool = True
    negatives: tuple[str, ...] | None = None


class GroundingMethod(Protocol):
    name: ClassVar[str]
    needs_candidates: ClassVar[bool]

    def ground(
        self, image: Image.Image, expression: str, candidates: Detections | None
    ) -> GroundingResult: ...


GROUNDING_METHODS: Registry[Callable[[GroundingOptions], GroundingMethod]] = Registry(
    "grounding method"
)
G = TypeVar("G")


def register_grounding_method(name: str) -> Callable[[G], G]:
    """Register a class whose ``from_options(GroundingOptions)`` builds the method."""

    def decorate(cls: G) -> G:
        cls.name = name  # type: ignore[attr-defined]
        GROUNDING_METHODS.register(name, cls.from_options)  # type: ignore[attr-defined]
        return cls

    return decorate


@register_grounding_method("marker-clip")
class MarkerClipGrounding:
    """Mark each candidate, let a frozen CLIP rank the marked images."""

    name: ClassVar[str]
    needs_candidates: ClassVar[bool] = True

    def __init__(
        self,
        *,
        clip: Any,
        marker: Sequence[str] = ("red-circle",),
        subtract: bool = True,
        negatives: Sequence[str] | None = None,
    ) -> None:
        self.clip = clip
        self.marker = tuple(marker)
        self.subtract = subtract
        self.negatives = None if negatives is None else tuple(negatives)

    @classmethod
    def from_options(cls, options: GroundingOptions) -> MarkerClipGrounding:
        if options.load_clip is None:
            raise ConfigError("marker-clip grounding needs a CLIP model (--clip clip:ARCH)")
        return cls(
            clip=options.load_clip(),
            marker=options.marker,
            subtract=options.subtract,
            negatives=options.negatives,
        )

    def ground(
        self, image: Image.Image, expression: str, candidates: Detections | None
    ) -> GroundingResult:
        if candidates is None or len(candidates) == 0:
            raise PromptError(f"no candidate regions to rank for {expression!r}")
        regions = regions_from_detections(candidates)
        ranked = rank_regions(
            self.clip,
            image,
            expression,
            regions,
            marker=list(self.marker),
            subtract=self.subtract,
            negatives=self.negatives,
        )
        return GroundingResult(
            expression=ranked.expression,
            method=self.name,
            candidates=candidates,
            scores=ranked.scores,
            best=ranked.best,
            records=ranked.to_records(regions),
        )


@register_grounding_method("detector")
class DetectorGrounding:
    """The detector reads the whole expression as one query; its best box is the answer."""

    name: ClassVar[str]
    needs_candidates: ClassVar[bool] = False

    def __init__(self, *, finder: Finder, max_candidates: int = DEFAULT_CANDIDATES) -> None:
        self.finder = finder
        self.max_candidates = max_candidates

    @classmethod
    def from_options(cls, options: GroundingOptions) -> DetectorGrounding:
        if options.finder is None or not options.finder.detector.capabilities.text:
            raise ConfigError("detector grounding needs a text detector (--model FAMILY:ARCH)")
        return cls(finder=options.finder)

    def ground(
        self, image: Image.Image, expression: str, candidates: Detections | None
    ) -> GroundingResult:
        found = self.finder.find(
            image,
            queries=[expression],
            filter=self.finder.default_filter(score_threshold=0.0, top_k=self.max_candidates),
        )
        if len(found) == 0:
            raise PromptError(f"{self.finder.detector.name} proposed no box for {expression!r}")
        records = [
            {"index": i, "score": round(float(s), 6), "box": [round(float(v), 2) for v in b]}
            for i, (s, b) in enumerate(zip(found.scores, found.boxes, strict=True))
        ]
        return GroundingResult(
            expression=found.queries[0],
            method=self.name,
            candidates=found,
            scores=found.scores.copy(),
            best=0,  # filtered detections come best first
            records=records,
        )


@dataclass(frozen=True)
class CandidateSource:
    """Where candidate regions come from.

    Attributes:
        kind: ``detector`` (the finder's boxes for ``query``, default the expression),
            ``automatic`` (SAM's automatic masks from the finder's segmenter) or ``boxes``.
        boxes: The given boxes (``kind="boxes"``).
        query: What the detector looks for (None: the expression itself).
        limit: Most candidates kept (best first).
        automatic: The automatic mask generator's options (SAM's defaults when None).
    """

    kind: CandidateKind
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    query: str | None = None
    limit: int = DEFAULT_CANDIDATES
    automatic: AutomaticMaskConfig | None = None

    def regions(
        self,
        image: Image.Image,
        expression: str,
        *,
        finder: Finder | None = None,
        segmenter: Segmenter | None = None,
    ) -> Detections:
        """The candidates on ``image`` as detections (boxes, masks when there are masks).

        Args:
            finder: The detector (``detector`` candidates).
            segmenter: SAM (``automatic`` candidates; default: the finder's).
        """
        if self.kind == "boxes":
            regions = regions_from_boxes(list(self.boxes), image_size=image.size)
            return _as_detections(regions, np.ones(len(regions), np.float32), image.size)
        if self.kind == "detector":
            if finder is None:
                raise ConfigError("detector candidates need a detector (--model FAMILY:ARCH)")
            found = finder.find(
                image,
                queries=[self.query or expression],
                filter=finder.default_filter(score_threshold=0.0, top_k=self.limit),
            )
            if len(found) == 0:
                raise PromptError(f"{finder.detector.name} proposed no candidate regions")
            return found
        segmenter = segmenter or (finder.segmenter if finder is not None else None)
        if segmenter is None:
            raise ConfigError("automatic candidates need a segmenter (--masks sam:ARCH)")
        generator = AutomaticMaskGenerator(segmenter, config=self.automatic)
        records = generator.generate(image)[: self.limit]
        if not records:
            raise PromptError("the automatic mask generator found no regions in this image")
        regions = [Region.from_mask(r.segmentation) for r in records]
        scores = np.asarray([r.predicted_iou for r in records], np.float32)
        return _as_detections(regions, scores, image.size)


def _as_detections(
    regions: Sequence[Region], scores: NDArray[np.float32], size: tuple[int, int]
) -> Detections:
    masks = None
    if regions and all(r.mask is not None for r in regions):
        masks = np.stack([np.asarray(r.mask) for r in regions])
    return Detections(
        boxes=np.asarray([r.box for r in regions], np.float32).reshape(-1, 4),
        scores=scores,
        labels=np.zeros(len(regions), np.int64),
        queries=("candidate",),
        image_size=size,
        masks=masks,
    )


def ground(
    method: GroundingMethod,
    image: Image.Image,
    expression: str,
    *,
    source: CandidateSource | None,
    finder: Finder | None = None,
    segmenter: Segmenter | None = None,
) -> GroundingResult:
    """Candidates (when the method ranks candidates), then the method."""
    candidates = None
    if method.needs_candidates:
        if source is None:
            raise ConfigError(f"{method.name} ranks candidates; say where they come from")
        candidates = source.regions(image, expression, finder=finder, segmenter=segmenter)
    return method.ground(image, expression, candidates)


def read_negatives(path: str | Path) -> tuple[str, ...]:
    """One expression per line (blank lines and ``#`` comments skipped)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--negatives {path}: cannot read it as UTF-8 text ({exc})") from None
    lines = [ln.strip() for ln in text.splitlines()]
    out = tuple(ln for ln in lines if ln and not ln.startswith("#"))
    if not out:
        raise ConfigError(f"--negatives {path}: expected one expression per line, found none")
    return out
