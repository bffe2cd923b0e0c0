"""The server's models and state, and the model-side work each endpoint needs.

Everything here that touches a model runs inside :class:`~vprompt.serve.runner.ModelRunner`,
one call at a time; the routes (:mod:`vprompt.serve.routes`) only parse, validate and encode.
"""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image

from vprompt.prompts.spatial import PromptSet
from vprompt.segment.automatic import AutomaticMaskConfig, AutomaticMaskGenerator, MaskRecord
from vprompt.segment.cache import EmbeddingCache
from vprompt.segment.segmenter import ImageEmbedding, Segmentation, Segmenter, lone_click
from vprompt.serve.classify import Classifiers
from vprompt.serve.detection import DetectorHost, no_detector_error
from vprompt.serve.inspection import Inspector
from vprompt.serve.runner import ModelRunner
from vprompt.serve.settings import ServeSettings
from vprompt.serve.store import ImageStore, StoredImage

PROMPT_KINDS = ["points", "box", "scribble", "mask"]


class Service:
    """Loads the models a :class:`ServeSettings` names and holds the server's state.

    Attributes:
        settings: The configuration.
        segmenter: The promptable segmenter, with a memory-bounded embedding cache.
        classifiers: Zero-shot classifier and packs.
        inspector: The defect-search backbone (loaded on the first inspect request).
        detector: The find endpoint's detector (None without ``settings.detector``).
        store: Uploaded images and their refinement logits.
        runner: The model lock.
    """

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.segmenter = Segmenter.load(
            settings.model,
            settings.weights,
            device=settings.device,
            cache=EmbeddingCache(max_bytes=settings.cache_bytes),
            precision=settings.precision,
            max_pixels=settings.max_pixels,
        )
        if settings.runtime == "onnx":
            from vprompt.segment.onnx_runtime import OnnxSamDecoder

            self.segmenter.decoder = OnnxSamDecoder.for_backbone(
                self.segmenter.backbone, path=settings.onnx_decoder
            )
        self.classifiers = Classifiers(
            classifier=settings.classifier,
            classifier_weights=settings.classifier_weights,
            packs=settings.packs,
            device=settings.device,
            max_classes=settings.max_classes,
            zeroshot_cache=settings.zeroshot_cache,
            allow_downloads=settings.allow_pack_downloads,
        )
        self.inspector = Inspector(
            model=settings.inspect_model,
            weights=settings.inspect_weights,
            device=settings.device,
            image_size=settings.inspect_image_size,
        )
        self.detector = (
            None
            if settings.detector is None
            else DetectorHost(
                model=settings.detector,
                weights=settings.detector_weights,
                device=settings.device,
                segmenter=self.segmenter if settings.detector_masks else None,
                max_pixels=settings.max_pixels,
                max_queries=settings.max_queries,
                max_exemplars=settings.max_exemplars,
                max_masks=settings.max_objects,
            )
        )
        self.store = ImageStore(
            max_images=settings.max_images,
            max_bytes=settings.max_store_bytes,
            ttl_s=settings.image_ttl_s,
            logits_per_image=settings.logits_per_image,
        )
        self.runner = ModelRunner(timeout_s=settings.request_timeout_s)

    def models_info(self) -> dict[str, object]:
        """The ``/api/models`` body."""
        backbone = self.segmenter.backbone
        # "detector" only when there is one: clients written before it see the same body.
        extra = {} if self.detector is None else {"detector": self.detector.info()}
        return {
            "segmenter": {
                "name": backbone.name,
                "weights": str(backbone.weights),
                "kinds": list(PROMPT_KINDS),
            },
            "classifier": self.classifiers.info(),
            "packs": sorted(self.classifiers.packs),
            "inspector": self.inspector.info(),
            **extra,
        }

    def require_detector(self) -> DetectorHost:
        """The detector, or the 409 saying how to start the server with one."""
        if self.detector is None:
            raise no_detector_error()
        return self.detector

    def check_image(self, image: Image.Image) -> None:
        """Raise PromptError for an image the segmenter cannot take (too elongated for its
        resize), before it is queued for the model."""
        self.segmenter.backbone.frame.resized_size(*image.size)

    # ------------------------------------------------------------- model calls (under the lock)

    def embed(self, image: Image.Image) -> str:
        """Embed ``image`` (or find it in the cache); returns its cache key."""
        return self.segmenter.embed_image(image).key

    def embedding(self, record: StoredImage) -> ImageEmbedding:
        """The stored image's embedding: from the cache, or computed again if it was evicted."""
        device = self.segmenter.backbone.device
        parts = self.segmenter.cache.get(record.embedding_key, device)
        if parts is None:
            emb = self.segmenter.embed_image(record.image)
            record.embedding_key = emb.key
            return emb
        return ImageEmbedding(key=record.embedding_key, image_size=record.size, parts=parts)

    def segment(
        self, record: StoredImage, prompts: PromptSet, multimask: str | bool
    ) -> Segmentation:
        """Best mask per object, in order."""
        return self.segmenter.decode(
            self.embedding(record),
            prompts,
            multimask="auto" if multimask == "auto" else bool(multimask),
            best_only=True,
        )

    def segment_candidates(
        self, record: StoredImage, prompts: PromptSet, multimask: str | bool
    ) -> list[Segmentation]:
        """Every candidate per object (one K x ... Segmentation each, in order): three for
        the objects ``multimask`` applies to (with "auto": lone clicks), one otherwise."""
        emb = self.embedding(record)
        objects = prompts.objects
        multi = [lone_click(obj) if multimask == "auto" else bool(multimask) for obj in objects]
        out: list[Segmentation | None] = [None] * len(objects)
        for flag in (True, False):
            idx = [i for i, m in enumerate(multi) if m is flag]
            if not idx:
                continue
            sub = PromptSet([objects[i] for i in idx], image_size=prompts.image_size)
            seg = self.segmenter.decode(emb, sub, multimask=flag, best_only=False)
            for j, i in enumerate(idx):
                out[i] = Segmentation(
                    masks=seg.masks[j : j + 1],
                    logits=seg.logits[j : j + 1],
                    iou=seg.iou[j : j + 1],
                    stability=seg.stability[j : j + 1],
                )
        return [s for s in out if s is not None]

    def automatic(
        self,
        record: StoredImage,
        config: AutomaticMaskConfig,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[MaskRecord]:
        """SAM's automatic masks for the stored image (stopped early when ``should_stop``)."""
        generator = AutomaticMaskGenerator(self.segmenter, config=config)
        return generator.generate(record.image, should_stop=should_stop)
