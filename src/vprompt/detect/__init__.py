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
from vprompt.detect.coco_data import (
    CocoDataError,
    CocoDetectionSet,
    check_coco_detection,
    read_coco_detection,
)
from vprompt.detect.evaluate import (
    EVAL_FILTER,
    CocoMetrics,
    DetectionReport,
    evaluate_detection,
    run_cocoeval,
)
from vprompt.detect.export import coco_detections, draw_detections, write_detections
from vprompt.detect.find_all import (
    ExemplarChoice,
    FindAllReport,
    choose_exemplars,
    evaluate_find_all,
)
from vprompt.detect.finder import Finder
from vprompt.detect.refcoco import GroundingReport, Ref, check_refs, evaluate_grounding, read_refs
from vprompt.detect.result import DetectionFilter, Detections, box_iou

__all__ = [
    "DETECTORS",
    "EVAL_FILTER",
    "CocoDataError",
    "CocoDetectionSet",
    "CocoMetrics",
    "DetectionFilter",
    "DetectionReport",
    "Detections",
    "DetectorCapabilities",
    "DetectorSpec",
    "Exemplar",
    "ExemplarChoice",
    "FindAllReport",
    "Finder",
    "GroundingReport",
    "Ref",
    "box_iou",
    "check_coco_detection",
    "check_refs",
    "choose_exemplars",
    "coco_detections",
    "draw_detections",
    "evaluate_detection",
    "evaluate_find_all",
    "evaluate_grounding",
    "read_coco_detection",
    "read_refs",
    "register_detector",
    "run_cocoeval",
    "write_detections",
]
