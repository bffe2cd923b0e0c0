"""Request and response bodies of the JSON API (``docs/serve-api.md``), as pydantic models.

Shapes and types are checked here (a wrong type is 422 ``invalid_request``); meaning (finite
coordinates inside the image, non-inverted boxes, non-empty objects) is checked by the prompt
classes themselves (422 ``invalid_prompt``), so the rules live in one place.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from vprompt.segment.automatic import AutomaticMaskConfig

MaskFormat = Literal["png", "rle", "polygon"]
MaskData = str | dict[str, Any] | list[list[float]]


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"]
    images: int
    cache_bytes: int
    cache_limit_bytes: int


class SegmenterInfo(BaseModel):
    name: str
    weights: str
    kinds: list[str]


class ClassifierInfo(BaseModel):
    name: str
    weights: str


class InspectorInfo(BaseModel):
    name: str
    weights: str = Field(description="the weight source, or 'default'")
    loaded: bool = Field(description="whether the first inspect request has loaded it yet")


class DetectorCapabilitiesOut(BaseModel):
    text: bool = Field(description="takes text queries")
    exemplars: bool = Field(description="takes example boxes (image-guided queries)")
    negative_exemplars: bool = Field(description="example boxes may be negative")
    masks: bool = Field(
        description="can return masks (its own, or from the server's segmenter with "
        "--detector-masks)"
    )


class DetectorInfo(BaseModel):
    name: str
    weights: str
    description: str
    capabilities: DetectorCapabilitiesOut
    score_threshold: float = Field(description="default score threshold (the model's reference)")
    nms_iou: float = Field(description="default NMS IoU (1.0: no NMS)")
    max_queries: int = Field(description="text queries one find request may carry")
    max_exemplars: int = Field(description="example boxes one find request may carry")


class ModelsInfo(BaseModel):
    segmenter: SegmenterInfo
    classifier: ClassifierInfo | None
    packs: list[str]
    inspector: InspectorInfo
    detector: DetectorInfo | None = Field(
        default=None, description="only present when the server was started with --detector"
    )


class ImageInfo(BaseModel):
    image_id: str
    width: int
    height: int


class RleIn(BaseModel):
    """COCO RLE of the image's size: ``counts`` compressed (a string) or a list of runs."""

    size: tuple[int, int] = Field(description="[H, W]")
    counts: str | list[int]


class ScribbleIn(BaseModel):
    points: list[tuple[float, float]] = Field(description="[[x, y], ...] along the stroke")
    positive: bool = True
    width: float = 5.0


class ObjectIn(BaseModel):
    """One object's prompts; at least one of them."""

    points: list[tuple[float, float, int]] = Field(
        default_factory=list, description="[[x, y, label], ...]; label 1 object, 0 background"
    )
    box: tuple[float, float, float, float] | None = Field(
        default=None, description="[x0, y0, x1, y1]"
    )
    scribbles: list[ScribbleIn] = Field(default_factory=list)
    mask: RleIn | None = None
    previous: str | None = Field(
        default=None, description="the logits token an earlier response returned"
    )


class SegmentRequest(BaseModel):
    objects: list[ObjectIn]
    multimask: Literal["auto"] | bool = "auto"
    format: MaskFormat = "png"
    candidates: bool = Field(
        default=False,
        description="also return every candidate mask the decoder made per object (three "
        "where multimask applies, one otherwise), each with its own logits token",
    )


class CandidateMask(BaseModel):
    score: float
    stability: float
    area: int
    bbox: list[int] = Field(description="COCO [x, y, w, h]")
    mask: MaskData
    logits: str


class SegmentedObject(BaseModel):
    score: float
    stability: float
    area: int
    bbox: list[int] = Field(description="COCO [x, y, w, h]")
    mask: MaskData
    logits: str
    candidates: list[CandidateMask] | None = Field(
        default=None,
        description="only with `candidates: true`: all candidates, in the "
        "decoder's order; the object's own fields repeat the highest-scoring one",
    )
    best: int | None = Field(default=None, description="index of the best candidate")


class SegmentResponse(BaseModel):
    image_id: str
    width: int
    height: int
    objects: list[SegmentedObject]


_AMG = AutomaticMaskConfig()  # the one home of the generator's defaults


class AutomaticRequest(BaseModel):
    """SAM's automatic mask generator options (defaults: :class:`AutomaticMaskConfig`'s);
    bounded to keep calls finite."""

    points_per_side: int = Field(default=_AMG.points_per_side, ge=1, le=128)
    pred_iou_thresh: float = Field(default=_AMG.pred_iou_thresh, ge=0.0, le=1.0)
    stability_score_thresh: float = Field(default=_AMG.stability_score_thresh, ge=0.0, le=1.0)
    box_nms_thresh: float = Field(default=_AMG.box_nms_thresh, ge=0.0, le=1.0)
    crop_n_layers: int = Field(default=_AMG.crop_n_layers, ge=0, le=3)
    min_mask_region_area: int = Field(default=_AMG.min_mask_region_area, ge=0)
    format: MaskFormat = "rle"


class AutomaticObject(BaseModel):
    score: float
    stability: float
    area: int
    bbox: list[int] = Field(description="COCO [x, y, w, h]")
    mask: MaskData
    point: list[float] = Field(description="[x, y] of the prompt point")


class AutomaticResponse(BaseModel):
    image_id: str
    width: int
    height: int
    objects: list[AutomaticObject]


class Label(BaseModel):
    label: str
    score: float


class ClassifyResponse(BaseModel):
    predictions: list[Label]
    source: str


class FindSimilarRequest(BaseModel):
    """A marked region on one uploaded image (the union of its boxes, scribbles and mask) and
    the uploaded images to search for regions like it."""

    image_id: str = Field(description="the example image (already uploaded)")
    boxes: list[tuple[float, float, float, float]] = Field(
        default_factory=list, description="[[x0, y0, x1, y1], ...] around the defect"
    )
    scribbles: list[ScribbleIn] = Field(
        default_factory=list, description="painted strokes; each pixel within width/2 counts"
    )
    mask: RleIn | None = Field(default=None, description="COCO RLE of the example's size")
    targets: list[str] | None = Field(
        default=None, description="image ids to search (default: every other uploaded image)"
    )
    top_k: int = Field(default=10, ge=1, le=100, description="regions returned, best first")
    threshold: float = Field(
        default=0.0,
        ge=-2.0,
        le=2.0,
        description="margin (nearest marked patch minus nearest unmarked patch, cosine) above "
        "which a pixel belongs to a found region",
    )
    format: MaskFormat = "rle"
    heatmaps: bool = Field(default=True, description="also return one heat map per target")


class FoundRegionOut(BaseModel):
    image_id: str
    box: list[float] = Field(description="[x0, y0, x1, y1] in that image's pixels")
    score: float = Field(description="peak margin inside the region")
    area: int = Field(description="pixels in the region's mask")
    mask: MaskData


class HeatmapOut(BaseModel):
    image_id: str
    width: int = Field(description="the grid's width (the image's, scaled down)")
    height: int
    png: str = Field(
        description="data:image/png;base64 grayscale map: 0 is `min`, 255 is `max` (margins)"
    )
    min: float
    max: float


class FindSimilarResponse(BaseModel):
    image_id: str
    targets: list[str]
    regions: list[FoundRegionOut]
    heatmaps: list[HeatmapOut]


class ExemplarIn(BaseModel):
    """An example object: a box on an uploaded image (this one or another)."""

    image_id: str = Field(description="the image the box is on (already uploaded)")
    box: tuple[float, float, float, float] = Field(description="[x0, y0, x1, y1] in its pixels")
    positive: bool = Field(
        default=True, description="false: an object not to find (detectors with negatives)"
    )


class FindRequest(BaseModel):
    """What to find on the image: text queries and/or example boxes, and the post-processing
    (defaults: the detector's reference settings, see ``/api/models``)."""

    queries: list[str] = Field(
        default_factory=list, description="class names, phrases or expressions to find"
    )
    exemplars: list[ExemplarIn] = Field(default_factory=list)
    score_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    nms_iou: float | None = Field(default=None, ge=0.0, le=1.0, description="1.0: no NMS")
    class_agnostic: bool = Field(
        default=False, description="suppress overlapping boxes across queries too"
    )
    top_k: int | None = Field(default=None, ge=1, le=1000, description="most detections kept")
    masks: bool = Field(default=False, description="also return an instance mask per detection")
    format: MaskFormat = "rle"


class DetectionOut(BaseModel):
    box: list[float] = Field(description="[x0, y0, x1, y1] in the image's pixels")
    score: float
    label: int = Field(description="index into the response's `queries`")
    query: str
    area: int | float = Field(description="pixels in the mask with masks, else the box's area")
    mask: MaskData | None = Field(default=None, description="only with `masks: true`")


class FindResponse(BaseModel):
    detections: list[DetectionOut] = Field(description="best score first")
    queries: list[str] = Field(
        description="what each label stands for: the text queries, then `exemplar K` (or "
        "one `exemplars` concept)"
    )
    image: ImageInfo
