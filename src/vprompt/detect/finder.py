"""Find objects from words or examples, with masks: a frozen detector plus, optionally, a
frozen ``sam:`` segmenter (grounded segmentation).

:class:`Finder` is what the ``detect`` CLI, the server's "find" box and the benchmarks call:
``find(image, queries=..., exemplars=...)`` runs the detector once for every query, applies the
shared post-processing (:class:`~vprompt.detect.result.DetectionFilter`, defaults from the
detector's reference), and — when a segmenter is attached — turns every kept box into a mask
in ONE batched decode of the image's cached SAM embedding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vprompt.backbones.detection import (
    DetectorBackbone,
    DetectorSpec,
    Exemplar,
    check_queries,
    load_detector,
)
from vprompt.data.images import DEFAULT_MAX_PIXELS, open_rgb
from vprompt.detect.result import DetectionFilter, Detections
from vprompt.errors import ConfigError, PromptError
from vprompt.prompts.spatial import Box, ObjectPrompt, PromptSet
from vprompt.segment.cache import EmbeddingCache
from vprompt.segment.segmenter import Segmenter


def query_names(
    queries: Sequence[str], exemplars: Sequence[Exemplar], detector: DetectorBackbone
) -> list[str]:
    """The label names of a call: the text queries, then one ``exemplar K`` per exemplar (or
    one ``exemplars`` concept for models whose exemplars refine a single concept)."""
    names = list(queries)
    if not exemplars:
        return names
    if detector.capabilities.negative_exemplars:
        if len(names) > 1:
            raise PromptError(
                f"{detector.name}: exemplars refine one concept, but {len(names)} text "
                "queries were given; give one query with the exemplars, or none"
            )
        return names or ["exemplars"]
    return names + [f"exemplar {k + 1}" for k in range(len(exemplars))]


def box_prompts(detections: Detections) -> PromptSet:
    """One box prompt per detection, nudged inside the image where rounding left it empty."""
    w, h = detections.image_size
    objects = []
    for x0, y0, x1, y1 in detections.boxes.astype(np.float64):
        x0, y0 = min(max(x0, 0.0), w - 1.0), min(max(y0, 0.0), h - 1.0)
        x1, y1 = min(max(x1, x0 + 1.0), float(w)), min(max(y1, y0 + 1.0), float(h))
        objects.append(ObjectPrompt(boxes=[Box(x0, y0, x1, y1)]))
    return PromptSet(objects, image_size=(w, h))


def segment_boxes(segmenter: Segmenter, image: Image.Image, detections: Detections) -> Detections:
    """Masks for every detection's box, all objects in one decode of the image's (cached)
    embedding: grounded segmentation's second half."""
    w, h = image.size
    if len(detections) == 0:
        return detections.with_masks(np.zeros((0, h, w), dtype=bool))
    seg = segmenter.segment(image, box_prompts(detections), multimask=False)
    return detections.with_masks(seg.masks[:, 0])


class Finder:
    """A frozen detector, its reference post-processing and an optional box-to-mask segmenter.

    Args:
        detector: Any registered detector backbone.
        spec: Its registry entry (defaults for the post-processing).
        segmenter: A ``sam:`` segmenter that turns kept boxes into masks (replacing any masks
            the detector made itself), or None.
        max_pixels: Largest image accepted from files.
    """

    def __init__(
        self,
        *,
        detector: DetectorBackbone,
        spec: DetectorSpec,
        segmenter: Segmenter | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.detector = detector
        self.spec = spec
        self.segmenter = segmenter
        self.max_pixels = max_pixels

    @classmethod
    def load(
        cls,
        model: str,
        weights: str | None = None,
        *,
        device: str | torch.device | None = "auto",
        masks: str | None = None,
        mask_weights: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        embedding_cache: Path | None = None,
    ) -> Finder:
        """Build from names: ``model`` a detector (``owlv2:…`` or a bare family, which takes
        the family's default architecture), ``masks`` an optional ``sam:…`` segmenter."""
        detector, spec = load_detector(model, weights, device=device)
        segmenter = None
        if masks is not None:
            if not masks.startswith("sam:"):
                raise ConfigError(f"--masks {masks!r}: expected a sam:ARCH segmenter")
            segmenter = Segmenter.load(
                masks,
                mask_weights,
                device=device,
                cache=EmbeddingCache(disk_dir=embedding_cache),
                max_pixels=max_pixels,
            )
        return cls(detector=detector, spec=spec, segmenter=segmenter, max_pixels=max_pixels)

    def default_filter(self, *, exemplars_only: bool = False, **overrides: Any) -> DetectionFilter:
        """The detector's reference defaults, with any field overridden (None: keep).

        Args:
            exemplars_only: The defaults of an exemplar-only call (image-guided NMS).
        """
        nms = self.spec.nms_iou
        if exemplars_only and self.spec.exemplar_nms_iou is not None:
            nms = self.spec.exemplar_nms_iou
        base = DetectionFilter(score_threshold=self.spec.score_threshold, nms_iou=nms)
        given = {k: v for k, v in overrides.items() if v is not None}
        return replace(base, **given)

    def open_image(self, image: Image.Image | str | Path) -> Image.Image:
        return open_rgb(image, max_pixels=self.max_pixels)

    def find(
        self,
        image: Image.Image | str | Path,
        *,
        queries: Sequence[str] = (),
        exemplars: Sequence[Exemplar] = (),
        filter: DetectionFilter | None = None,
        masks: bool = True,
    ) -> Detections:
        """Every object matching the queries / exemplars on one image, best first.

        Args:
            queries: Text queries (class names, phrases, an expression).
            exemplars: Example boxes (on this or other images).
            filter: Post-processing; the detector's defaults when None.
            masks: Decode masks with the attached segmenter (ignored without one).

        Raises:
            PromptError: Nothing to look for, or queries / exemplars the detector cannot take.
        """
        rgb = self.open_image(image)
        caps = self.detector.capabilities
        cleaned = check_queries(queries, caps, name=self.detector.name)
        if not cleaned and not exemplars:
            raise PromptError("nothing to find: give at least one text query or one exemplar")
        if exemplars and not caps.exemplars:
            raise PromptError(
                f"{self.detector.name} takes no exemplars (image-guided queries); use a model "
                "that does, e.g. owlv2:"
            )
        if any(not e.positive for e in exemplars) and not caps.negative_exemplars:
            raise PromptError(f"{self.detector.name} takes no negative exemplars")
        names = query_names(cleaned, exemplars, self.detector)
        output = self.detector.detect(rgb, queries=cleaned, exemplars=list(exemplars))
        found = Detections.from_output(output, queries=names, image_size=rgb.size)
        found = found.filtered(filter or self.default_filter(exemplars_only=not cleaned))
        if masks and self.segmenter is not None:
            found = self.segment(rgb, found)
        return found

    def segment(self, image: Image.Image, detections: Detections) -> Detections:
        """Masks for every detection's box from the segmenter, all objects in one decode of
        the image's (cached) embedding."""
        if self.segmenter is None:
            raise ConfigError("no segmenter attached (load the Finder with masks='sam:…')")
        return segment_boxes(self.segmenter, image, detections)
