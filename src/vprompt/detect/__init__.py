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
from vprompt.detect.grounding import (
    GROUNDING_METHODS,
    CandidateSource,
    GroundingOptions,
    GroundingResult,
    ground,
    register_grounding_method,
)
from vprompt.detect.markers import MARKERS, Region, get_marker, with_params
from vprompt.detect.refcoco import GroundingReport, Ref, check_refs, evaluate_grounding, read_refs
from vprompt.detect.referring import (
    RankResult,
    rank_regions,
    regions_from_boxes,
    regions_from_detections,
)
from vprompt.detect.result import DetectionFilter, Detections, box_iou
from vprompt.detect.set_of_mark import SetOfMarks, render_set_of_marks

__all__ = [
    "DETECTORS",
    "EVAL_FILTER",
    "GROUNDING_METHODS",
    "MARKERS",
    "CandidateSource",
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
    "GroundingOptions",
    "GroundingReport",
    "GroundingResult",
    "RankResult",
    "Ref",
    "Region",
    "SetOfMarks",
    "box_iou",
    "check_coco_detection",
    "check_refs",
    "choose_exemplars",
    "coco_detections",
    "draw_detections",
    "evaluate_detection",
    "evaluate_find_all",
    "evaluate_grounding",
    "get_marker",
    "ground",
    "rank_regions",
    "read_coco_detection",
    "read_refs",
    "regions_from_boxes",
    "regions_from_detections",
    "register_detector",
    "register_grounding_method",
    "render_set_of_marks",
    "run_cocoeval",
    "with_params",
    "write_detections",
]
