"""Promptable segmentation: SAM-family segmenters, automatic masks, in-context methods,
interactive evaluation and mask outputs."""

from vprompt.segment.automatic import (
    AutomaticMaskConfig,
    AutomaticMaskGenerator,
    MaskRecord,
)
from vprompt.segment.cache import EmbeddingCache
from vprompt.segment.clicks import (
    ClickPredictor,
    ClickReport,
    ClickTrace,
    evaluate_clicks,
    iou,
    next_click,
    plot_miou_curve,
    simulate_clicks,
)
from vprompt.segment.persam import (
    PERSONALIZERS,
    ConceptReference,
    PerSAM,
    PerSAMConfig,
    PerSAMF,
    PerSAMFConfig,
    PersonalizeResult,
    TargetConcept,
    personalize,
    target_concept,
)
from vprompt.segment.seggpt import InContextMask, SegGptSegmenter
from vprompt.segment.segmenter import ImageEmbedding, Segmentation, Segmenter, stability_score

__all__ = [
    "PERSONALIZERS",
    "AutomaticMaskConfig",
    "AutomaticMaskGenerator",
    "ClickPredictor",
    "ClickReport",
    "ClickTrace",
    "ConceptReference",
    "EmbeddingCache",
    "ImageEmbedding",
    "InContextMask",
    "MaskRecord",
    "PerSAM",
    "PerSAMConfig",
    "PerSAMF",
    "PerSAMFConfig",
    "PersonalizeResult",
    "SegGptSegmenter",
    "Segmentation",
    "Segmenter",
    "TargetConcept",
    "evaluate_clicks",
    "iou",
    "next_click",
    "personalize",
    "plot_miou_curve",
    "simulate_clicks",
    "stability_score",
    "target_concept",
]
