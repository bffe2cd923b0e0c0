"""Find mode for ``/api/images/{image_id}/find``: objects from words or example boxes
(:class:`~vprompt.detect.finder.Finder`).

The detector is named at start-up (``--detector``), resolved through the detector registry
(:data:`~vprompt.backbones.detection.DETECTORS`, so this module names no model) and loaded
then, so a bad name fails before the server listens. With ``--detector-masks`` the found boxes
become masks through the server's own segmenter, which shares its embedding cache with the
segment endpoints. Requests are checked here, before they queue for the model, and every
error names the request field it is about.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from vprompt.backbones.detection import (
    DETECTORS,
    DetectorCapabilities,
    Exemplar,
    check_queries,
    load_detector,
)
from vprompt.detect.finder import Finder, query_names
from vprompt.detect.result import DetectionFilter, Detections
from vprompt.errors import PromptError
from vprompt.segment.segmenter import Segmenter
from vprompt.serve.errors import ApiError
from vprompt.serve.schemas import FindRequest, MaskFormat
from vprompt.serve.segment_ops import encode_mask, finite

ImageLookup = Callable[[int, str], Image.Image]
"""``(exemplar index, image id) -> image``; raises the 404 naming the field."""


def no_detector_error() -> ApiError:
    """409 for a find request to a server started without a detector."""
    known = ", ".join(f"{n}:" for n in DETECTORS.names()) or "none registered"
    return ApiError(
        409,
        "no_detector",
        "finding objects needs a detector: start the server with --detector MODEL "
        f"(detectors: {known})",
    )


@dataclass(frozen=True)
class FindPlan:
    """A checked find request, ready for the model.

    Attributes:
        queries: The cleaned text queries.
        exemplars: The example boxes with their images.
        filter: Threshold, NMS and top-k.
        masks: Whether masks are returned.
    """

    queries: list[str]
    exemplars: list[Exemplar]
    filter: DetectionFilter
    masks: bool


class DetectorHost:
    """The server's detector and what a find request may ask of it.

    Args:
        model: A registered detector, ``family:arch`` or a bare family (its default model).
        weights: Its weight source (None: the architecture's default).
        device: Where it runs.
        segmenter: The server's segmenter, to turn boxes into masks; None: no segmenter masks.
        max_pixels: Largest image the finder accepts.
        max_queries: Text queries in one request (the model's own bound may be lower).
        max_exemplars: Example boxes in one request.
        max_masks: Masks in one request (the segment endpoint's object limit).
    """

    def __init__(
        self,
        *,
        model: str,
        weights: str | None,
        device: str,
        segmenter: Segmenter | None,
        max_pixels: int,
        max_queries: int,
        max_exemplars: int,
        max_masks: int,
    ) -> None:
        detector, spec = load_detector(model, weights, device=device)
        self.finder = Finder(
            detector=detector, spec=spec, segmenter=segmenter, max_pixels=max_pixels
        )
        caps = detector.capabilities
        self.max_queries = min(max_queries, caps.max_queries or max_queries)
        self.max_exemplars = max_exemplars
        self.max_masks = max_masks

    @property
    def name(self) -> str:
        return str(self.finder.detector.name)

    @property
    def capabilities(self) -> DetectorCapabilities:
        return self.finder.detector.capabilities

    @property
    def masks_available(self) -> bool:
        """Masks come from the detector itself or from the attached segmenter."""
        return self.capabilities.masks or self.finder.segmenter is not None

    def info(self) -> dict[str, Any]:
        """The ``detector`` part of ``/api/models``."""
        caps = self.capabilities
        spec = self.finder.spec
        return {
            "name": self.name,
            "weights": str(self.finder.detector.weights),
            "description": spec.description,
            "capabilities": {
                "text": caps.text,
                "exemplars": caps.exemplars,
                "negative_exemplars": caps.negative_exemplars,
                "masks": self.masks_available,
            },
            "score_threshold": spec.score_threshold,
            "nms_iou": spec.nms_iou,
            "max_queries": self.max_queries,
            "max_exemplars": self.max_exemplars,
        }

    def check_counts(self, body: FindRequest) -> None:
        """Refuse requests over the server's limits before anything is looked up."""
        for field, given, limit in (
            ("queries", len(body.queries), self.max_queries),
            ("exemplars", len(body.exemplars), self.max_exemplars),
        ):
            if given > limit:
                raise ApiError(
                    422,
                    "too_much_work",
                    f"{field}: {given} given; this server takes at most {limit} per request",
                )

    def plan(self, body: FindRequest, lookup: ImageLookup) -> FindPlan:
        """Check a request against the detector and the server's limits.

        Raises:
            ApiError: Over a limit (422 ``too_much_work``), masks the server cannot make
                (422 ``invalid_request``), an unknown exemplar image (404).
            PromptError: Bad queries or boxes, or what the detector cannot take; the
                message names the field.
        """
        self.check_counts(body)
        caps = self.capabilities
        queries = []
        for i, query in enumerate(body.queries):
            try:
                queries += check_queries([query], caps, name=self.name)
            except PromptError as exc:
                raise PromptError(f"queries[{i}]: {exc}") from None
        try:
            check_queries(queries, caps, name=self.name)  # the model's own count limit
        except PromptError as exc:
            raise PromptError(f"queries: {exc}") from None
        if body.exemplars and not caps.exemplars:
            raise PromptError(f"exemplars: {self.name} takes no example boxes (text queries only)")
        exemplars = []
        for i, ex in enumerate(body.exemplars):
            if not ex.positive and not caps.negative_exemplars:
                raise PromptError(
                    f"exemplars[{i}].positive: {self.name} takes no negative examples "
                    "(positive must be true)"
                )
            image = lookup(i, ex.image_id)
            try:
                exemplars.append(Exemplar(image=image, box=ex.box, positive=ex.positive))
            except PromptError as exc:
                raise PromptError(f"exemplars[{i}].box: {exc}") from None
        if not queries and not exemplars:
            raise PromptError(
                "queries: nothing to find; give at least one text query or one exemplar box"
            )
        try:
            query_names(queries, exemplars, self.finder.detector)
        except PromptError as exc:
            raise PromptError(f"exemplars: {exc}") from None
        top_k = body.top_k
        if body.masks:
            if not self.masks_available:
                raise ApiError(
                    422,
                    "invalid_request",
                    f"masks: {self.name} makes no masks on this server; start it with "
                    "--detector-masks to get masks from its segmenter",
                )
            if top_k is None:
                top_k = min(self.finder.default_filter().top_k or self.max_masks, self.max_masks)
            elif top_k > self.max_masks:
                raise ApiError(
                    422,
                    "too_much_work",
                    f"top_k: {top_k} with masks; this server makes at most {self.max_masks} "
                    "masks per request",
                )
        options = self.finder.default_filter(
            exemplars_only=not queries,
            score_threshold=body.score_threshold,
            nms_iou=body.nms_iou,
            top_k=top_k,
            class_agnostic=body.class_agnostic,
        )
        return FindPlan(queries=queries, exemplars=exemplars, filter=options, masks=body.masks)

    def find(self, image: Image.Image, plan: FindPlan) -> Detections:
        """Every object the plan asks for on ``image``, best first. Model call."""
        found = self.finder.find(
            image,
            queries=plan.queries,
            exemplars=plan.exemplars,
            filter=plan.filter,
            masks=plan.masks,
        )
        if not plan.masks and found.masks is not None:
            found = dataclasses.replace(found, masks=None)  # the detector's own, not asked for
        return found


def detection_rows(found: Detections, form: MaskFormat) -> list[dict[str, Any]]:
    """Response rows, best first; ``mask`` only where the detections carry masks."""
    rows = found.to_records()
    for i, row in enumerate(rows):
        row["score"] = finite(row["score"])
        if found.masks is not None:
            row["mask"] = encode_mask(found.masks[i], form)
    return rows
