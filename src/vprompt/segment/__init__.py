"""Promptable segmentation: SAM-family segmenters, automatic masks, in-context methods,
interactive evaluation and mask outputs."""

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
from vprompt.segment.segmenter import ImageEmbedding, Segmentation, Segmenter, stability_score

__all__ = [
    "ClickPredictor",
    "ClickReport",
    "ClickTrace",
    "EmbeddingCache",
    "ImageEmbedding",
    "Segmentation",
    "Segmenter",
    "evaluate_clicks",
    "iou",
    "next_click",
    "plot_miou_curve",
    "simulate_clicks",
    "stability_score",
]
