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


class ModelsInfo(BaseModel):
    segmenter: SegmenterInfo
    classifier: ClassifierInfo | None
    packs: list[str]
    inspector: InspectorInfo


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
