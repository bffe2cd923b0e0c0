"""Open-vocabulary detection, grounding and marker prompts on frozen detectors and CLIP.

Detectors are backbones (``owlv2:``, ``grounding-dino:``, ``clipseg:``, ``sam3:`` …) registered
in :data:`vprompt.backbones.detection.DETECTORS`; this package holds what every detector
shares: the result type and its post-processing, grounded segmentation, outputs.
"""

from vprompt.backbones.detection import (
    DETECTORS,
    DetectorCapabilities,
    DetectorSpec,
    Exemplar,
    register_detector,
)
from vprompt.detect.export import coco_detections, draw_detections, write_detections
from vprompt.detect.finder import Finder
from vprompt.detect.result import DetectionFilter, Detections, box_iou

__all__ = [
    "DETECTORS",
    "DetectionFilter",
    "Detections",
    "DetectorCapabilities",
    "DetectorSpec",
    "Exemplar",
    "Finder",
    "box_iou",
    "coco_detections",
    "draw_detections",
    "register_detector",
    "write_detections",
]
