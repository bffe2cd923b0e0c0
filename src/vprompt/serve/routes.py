"""The ``/api`` endpoints of ``docs/serve-api.md``.

Handlers parse and validate, hand model work to the service's runner (one call at a time, in a
worker thread) and CPU work (decoding uploads, encoding masks) to worker threads, so the event
loop stays responsive.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

import anyio
from fastapi import APIRouter, File, Form, Request, Response, UploadFile

from vprompt.errors import ConfigError, PromptError
from vprompt.segment.automatic import AutomaticMaskConfig, GenerationStopped
from vprompt.serve.classify import predict_image
from vprompt.serve.detection import detection_rows
from vprompt.serve.errors import ApiError
from vprompt.serve.inspection import found_regions, heatmap_rows, marked_region
from vprompt.serve.runner import ThreadSlots, in_thread
from vprompt.serve.schemas import (
    AutomaticRequest,
    AutomaticResponse,
    ClassifyResponse,
    ErrorResponse,
    FindRequest,
    FindResponse,
    FindSimilarRequest,
    FindSimilarResponse,
    Health,
    ImageInfo,
    ModelsInfo,
    SegmentRequest,
    SegmentResponse,
)
from vprompt.serve.segment_ops import (
    automatic_objects,
    candidate_objects,
    prompt_set,
    segmented_objects,
)
from vprompt.serve.service import Service
from vprompt.serve.store import StoredImage
from vprompt.serve.uploads import decode_upload

_DISCONNECT_POLL_S = 0.2
_E = {"model": ErrorResponse}
ERRORS: dict[int | str, dict[str, Any]] = {
    400: _E,
    404: _E,
    409: _E,
    413: _E,
    415: _E,
    422: _E,
    503: _E,
}


async def _read_upload(file: UploadFile, limit: int) -> bytes:
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, "too_large", f"upload is over the limit of {limit} bytes")
    if not data:
        raise ApiError(415, "unsupported_media", "upload is empty (expected an image file)")
    return data


def build_router(service: Service) -> APIRouter:
    """Every ``/api`` route, bound to ``service``."""
    router = APIRouter(prefix="/api", responses=ERRORS)
    settings = service.settings
    store = service.store
    decodes = ThreadSlots(settings.max_concurrent_decodes)

    async def decode(data: bytes) -> Any:
        return await decodes.run(lambda: decode_upload(data, max_pixels=settings.max_pixels))

    def _info(image_id: str, size: tuple[int, int]) -> dict[str, Any]:
        return {"image_id": image_id, "width": size[0], "height": size[1]}

    @router.get("/health", response_model=Health)
    async def health() -> dict[str, Any]:
        """Liveness plus the number of kept images and the embedding cache's use."""
        cache = service.segmenter.cache
        return {
            "status": "ok",
            "images": len(store),
            "cache_bytes": cache.nbytes,
            "cache_limit_bytes": cache.max_bytes,
        }

    # exclude_unset: "detector" is left out, not null, on a server without one.
    @router.get("/models", response_model=ModelsInfo, response_model_exclude_unset=True)
    async def models() -> dict[str, Any]:
        """The segmenter, the zero-shot classifier (or null), the loaded pack names, the
        inspect backbone and, on a server started with one, the detector of ``/find``."""
        return service.models_info()

    @router.post("/images", status_code=201, response_model=ImageInfo)
    async def upload_image(file: UploadFile = File(...)) -> dict[str, Any]:  # noqa: B008
        """Store an image (multipart field ``file``) and embed it once."""
        data = await _read_upload(file, settings.max_upload_bytes)
        rgb = await decode(data)
        try:
            service.check_image(rgb)
        except PromptError as exc:
            raise ApiError(400, "bad_image", f"{file.filename or 'upload'}: {exc}") from None
        key = await service.runner.run(service.embed, rgb)
        record = store.add(rgb, key)
        return _info(record.image_id, record.size)

    @router.get("/images/{image_id}", response_model=ImageInfo)
    async def get_image(image_id: str) -> dict[str, Any]:
        """An image's size (404 when unknown or expired)."""
        return _info(image_id, store.get(image_id).size)

    @router.delete("/images/{image_id}", status_code=204, response_class=Response)
    async def delete_image(image_id: str) -> Response:
        """Forget an image and its refinement logits."""
        store.delete(image_id)
        return Response(status_code=204)

    @router.post(
        "/images/{image_id}/segment",
        response_model=SegmentResponse,
        response_model_exclude_none=True,
    )
    async def segment(image_id: str, body: SegmentRequest) -> dict[str, Any]:
        """Masks for one or more objects from points, boxes, scribbles, masks or refinement."""
        record = store.get(image_id)
        prompts = prompt_set(
            body,
            record.size,
            lambda token: store.logits(image_id, token),
            max_objects=settings.max_objects,
        )
        if body.candidates:
            segs = await service.runner.run(
                service.segment_candidates, record, prompts, body.multimask
            )
            all_tokens = [
                [store.remember_logits(image_id, s.logits[0, k]) for k in range(s.logits.shape[1])]
                for s in segs
            ]
            objects = await in_thread(candidate_objects, segs, all_tokens, body.format)
            return {**_info(image_id, record.size), "objects": objects}
        seg = await service.runner.run(service.segment, record, prompts, body.multimask)
        tokens = [store.remember_logits(image_id, seg.logits[i, 0]) for i in range(len(seg))]
        objects = await in_thread(segmented_objects, seg, tokens, body.format)
        return {**_info(image_id, record.size), "objects": objects}

    @router.post("/images/{image_id}/automatic", response_model=AutomaticResponse)
    async def automatic(
        image_id: str, request: Request, body: AutomaticRequest | None = None
    ) -> dict[str, Any]:
        """Every object in the image (SAM's automatic mask generator), within the server's
        work limits; the work stops when the client goes away."""
        body = body or AutomaticRequest()
        record = store.get(image_id)
        try:
            config = AutomaticMaskConfig(
                points_per_side=body.points_per_side,
                pred_iou_thresh=body.pred_iou_thresh,
                stability_score_thresh=body.stability_score_thresh,
                box_nms_thresh=body.box_nms_thresh,
                crop_n_layers=body.crop_n_layers,
                min_mask_region_area=body.min_mask_region_area,
            )
        except ConfigError as exc:
            raise ApiError(422, "invalid_request", str(exc)) from None
        prompts, crops = config.work()
        if prompts > settings.max_automatic_prompts or crops > settings.max_automatic_crops:
            raise ApiError(
                422,
                "too_much_work",
                f"points_per_side={config.points_per_side} with crop_n_layers="
                f"{config.crop_n_layers} asks for {prompts} point prompts over {crops} crop(s); "
                f"this server allows {settings.max_automatic_prompts} prompts and "
                f"{settings.max_automatic_crops} crops per request",
            )
        gone = threading.Event()

        async def watch() -> None:
            with contextlib.suppress(Exception):  # a broken receive channel ends the watch
                while not await request.is_disconnected():
                    await anyio.sleep(_DISCONNECT_POLL_S)
                gone.set()

        watcher = asyncio.ensure_future(watch())
        try:
            records = await service.runner.run(service.automatic, record, config, gone.is_set)
        except GenerationStopped:
            raise ApiError(499, "client_closed", "the client went away; work stopped") from None
        finally:
            watcher.cancel()
        objects = await in_thread(automatic_objects, records, body.format)
        return {**_info(image_id, record.size), "objects": objects}

    @router.post("/classify", response_model=ClassifyResponse)
    async def classify(
        file: UploadFile = File(...),  # noqa: B008
        classes: str | None = Form(None),
        pack: str | None = Form(None),
        top_k: int = Form(5, ge=1, le=1000),
    ) -> dict[str, Any]:
        """Top-k labels of an image: zero-shot over ``classes``, or a loaded ``pack``."""
        classifiers = service.classifiers
        if (classes is None) == (pack is None):
            raise ApiError(
                422, "invalid_request", "give exactly one of the form fields 'classes' or 'pack'"
            )
        if pack is not None:
            method = classifiers.pack(pack)
            source = f"pack:{pack}"
        else:
            classifiers.require_zeroshot()
            names = classifiers.class_list(classes or "")
            source = "zero-shot"
        data = await _read_upload(file, settings.max_upload_bytes)
        rgb = await decode(data)

        def run() -> list[Any]:
            chosen = method if pack is not None else classifiers.zeroshot(names)
            return predict_image(chosen, rgb, top_k)

        predictions = await service.runner.run(run)
        return {
            "predictions": [{"label": p.label, "score": round(p.score, 6)} for p in predictions],
            "source": source,
        }

    def _named(field: str, image_id: str) -> StoredImage:
        try:
            return store.get(image_id)
        except ApiError as exc:
            raise ApiError(exc.status_code, exc.code, f"{field}: {exc.message}") from None

    @router.post("/find-similar", response_model=FindSimilarResponse)
    async def find_similar(body: FindSimilarRequest) -> dict[str, Any]:
        """Inspect mode: regions like the one marked on ``image_id`` in the target images,
        ranked over all of them, with one heat map per target."""
        example = _named("image_id", body.image_id)
        if body.targets is None:
            ids = [i for i in store.ids() if i != body.image_id]
            if not ids:
                raise ApiError(
                    422,
                    "invalid_request",
                    "targets: no other uploaded image to search (upload more images or list "
                    "the targets)",
                )
        else:
            ids = list(body.targets)
            if not ids:
                raise ApiError(422, "invalid_request", "targets: empty list (give image ids)")
            seen: set[str] = set()
            for i, image_id in enumerate(ids):
                if image_id in seen:
                    raise ApiError(
                        422, "invalid_request", f"targets[{i}]: {image_id[:64]!r} is given twice"
                    )
                seen.add(image_id)
        limit = settings.max_inspect_targets
        if len(ids) > limit:
            raise ApiError(
                422,
                "too_much_work",
                f"targets: {len(ids)} images; this server searches at most {limit} per request",
            )
        targets = [_named(f"targets[{i}]", image_id) for i, image_id in enumerate(ids)]
        region = await in_thread(
            lambda: marked_region(body, example.size, max_parts=settings.max_objects)
        )
        result = await service.runner.run(
            lambda: service.inspector.search(
                example.image,
                region,
                [t.image for t in targets],
                top_k=body.top_k,
                threshold=body.threshold,
            )
        )

        def encode() -> dict[str, Any]:
            return {
                "image_id": body.image_id,
                "targets": ids,
                "regions": found_regions(result, ids, body.format),
                "heatmaps": heatmap_rows(result.heatmaps, ids) if body.heatmaps else [],
            }

        return await in_thread(encode)

    @router.post(
        "/images/{image_id}/find", response_model=FindResponse, response_model_exclude_none=True
    )
    async def find(image_id: str, body: FindRequest) -> dict[str, Any]:
        """Every object on the image matching the text queries and / or the example boxes
        (on this or other uploaded images), best first, with masks on request."""
        host = service.require_detector()
        host.check_counts(body)  # before any lookup: an oversized request is refused as such
        record = store.get(image_id)
        plan = host.plan(body, lambda i, ref: _named(f"exemplars[{i}].image_id", ref).image)
        found = await service.runner.run(host.find, record.image, plan)
        rows = await in_thread(detection_rows, found, body.format)
        return {
            "detections": rows,
            "queries": list(found.queries),
            "image": _info(image_id, record.size),
        }

    return router
