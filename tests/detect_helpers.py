"""A deterministic fake detector for engine / CLI tests, registered once per process as
``fake-detector:exact`` (text + exemplars) and ``fake-detector:concept`` (SAM 3-like: masks,
negative exemplars).

Its candidates are fixed boxes scaled to the image, with scores that depend on the query
text and the exemplar boxes only, so every expected value in a test can be written by hand.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn

from vprompt.backbones.detection import (
    DETECTORS,
    DetectorCapabilities,
    DetectorOutput,
    DetectorSpec,
    Exemplar,
    register_detector,
)
from vprompt.backbones.registry import FAMILIES, BackboneFamily, register_family

FAMILY = "fake-detector"
# Boxes as fractions of W and H; the first two overlap (IoU 0.6 after scaling).
FRACTIONS = torch.tensor(
    [[0.1, 0.1, 0.5, 0.5], [0.15, 0.1, 0.55, 0.5], [0.6, 0.6, 0.9, 0.95], [0.0, 0.7, 0.2, 1.0]]
)

TEXT = DetectorCapabilities(text=True, exemplars=True, max_queries=8, max_query_tokens=16)
CONCEPT = DetectorCapabilities(
    text=True, exemplars=True, negative_exemplars=True, masks=True, max_queries=8
)


def query_scores(n_labels: int) -> torch.Tensor:
    """N x Q scores: label q scores candidate n with (n + q) % 4 / 4 + 0.1."""
    n = torch.arange(FRACTIONS.shape[0])[:, None]
    q = torch.arange(n_labels)[None, :]
    return ((n + q) % 4).float() / 4 + 0.1


class FakeDetector(nn.Module):
    def __init__(self, arch: str) -> None:
        super().__init__()
        self.name = f"{FAMILY}:{arch}"
        self.weights = "none"
        self.capabilities = CONCEPT if arch == "concept" else TEXT
        self.dummy = nn.Parameter(torch.zeros(1))
        self.calls = 0

    def fingerprint(self) -> str:
        return "fake"

    def detect(
        self,
        image: Image.Image,
        *,
        queries: Sequence[str] = (),
        exemplars: Sequence[Exemplar] = (),
    ) -> DetectorOutput:
        self.calls += 1
        w, h = image.size
        boxes = FRACTIONS * torch.tensor([w, h, w, h], dtype=torch.float32)
        n_labels = len(queries) + (
            len(exemplars) if not self.capabilities.negative_exemplars else int(not queries)
        )
        scores = query_scores(max(n_labels, 1))
        best, labels = scores.max(dim=1)
        masks = None
        if self.capabilities.masks:
            masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
            for i, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
                masks[i, y0:y1, x0:x1] = True
        return DetectorOutput(boxes=boxes, scores=best, labels=labels, masks=masks)


def _build(arch: str, weights: str, device: torch.device) -> FakeDetector:
    return FakeDetector(arch).to(device)


def register_fake_detectors() -> None:
    """Register the family and both detector specs (idempotent)."""
    if FAMILY in FAMILIES:
        return
    register_family(
        BackboneFamily(
            name=FAMILY,
            description="deterministic fake detector (tests only)",
            list_archs=lambda: ["exact", "concept"],
            list_tags=lambda arch: [],
            default_weights=lambda arch: "none",
            build=_build,
            tiny=("exact", "concept"),
        )
    )
    if FAMILY not in DETECTORS:
        register_detector(
            DetectorSpec(
                family=FAMILY,
                description="fake",
                capabilities=TEXT,
                default_model=f"{FAMILY}:exact",
                tiny_model=f"{FAMILY}:exact",
                score_threshold=0.3,
                nms_iou=0.5,
            )
        )
