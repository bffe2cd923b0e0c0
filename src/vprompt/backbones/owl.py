"""The OWL detectors through ``transformers``: OWLv2 (``owlv2:``) and OWL-ViT (``owlvit:``).

Both score one predicted box per image patch against any number of query embeddings: text
queries through the CLIP text tower, exemplar boxes through the class embedding of a box the
model predicts on the reference image. :meth:`OwlBackbone.embed` runs the vision tower once per
image; :meth:`OwlBackbone.detect` then scores any query set on that embedding.

Frames: OWLv2's processor pads the image to a square (bottom and right) before resizing, so its
normalised boxes are fractions of the padded side ``max(W, H)``; OWL-ViT's stretches the image
to the square input, so its boxes are fractions of ``W`` and ``H``. Boxes leave this module in
the original image's pixels, clipped to it.

Weight sources: a Hugging Face repo id (``google/owlv2-base-patch16-ensemble``, also
``hf-hub:ORG/REPO``), a local folder holding a model and its processor saved by
``save_pretrained``, or ``none`` (seeded random init from :mod:`vprompt.backbones.owl_configs`
with CLIP's own tokenizer). Only safetensors checkpoints are read.
"""

from __future__ import annotations

import copy
import functools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import nn

from vprompt.backbones.detection import (
    DetectorCapabilities,
    DetectorOutput,
    DetectorSpec,
    Exemplar,
    check_queries,
    pixel_key,
    register_detector,
)
from vprompt.backbones.hf_loading import (
    HubCatalogue,
    load_pretrained,
    load_pretrained_processor,
    random_init,
)
from vprompt.backbones.hf_module import HFBackbone
from vprompt.backbones.hf_tokenizers import clip_tokenizer
from vprompt.backbones.owl_configs import ARCHS, MODEL_TYPES, TEXT_CONTEXT, TINY_ARCHS, OwlKind
from vprompt.backbones.registry import RANDOM_INIT, BackboneFamily, register_family
from vprompt.errors import PromptError, WeightsError

# The reference's exemplar rule keeps every predicted box within 80% of the best IoU.
EXEMPLAR_IOU_FRACTION = 0.8
# transformers' post_process_image_guided_detection suppresses overlaps above this IoU
# (scenic's playground uses 0.7); text detection in both references applies no NMS.
IMAGE_GUIDED_NMS_IOU = 0.3
EMBEDDING_CACHE_SIZE = 4
_TEXT_BATCH = 256  # text queries per pass of the text tower (LVIS has 1203 classes)
_TEXT_CACHE_SIZE = 4096
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")

CAPABILITIES = DetectorCapabilities(
    text=True, exemplars=True, masks=False, phrases=False, max_query_tokens=TEXT_CONTEXT
)


def _classes(kind: OwlKind) -> tuple[Any, Any, Any, Any]:
    """(model, config, image processor, processor) classes; imports transformers lazily."""
    import transformers as tf

    if kind == "owlv2":
        return (
            tf.Owlv2ForObjectDetection,
            tf.Owlv2Config,
            tf.Owlv2ImageProcessor,
            tf.Owlv2Processor,
        )
    return tf.OwlViTForObjectDetection, tf.OwlViTConfig, tf.OwlViTImageProcessor, tf.OwlViTProcessor


@dataclass(frozen=True, eq=False)
class OwlImageEmbedding:
    """One image through the vision tower and the box head: all that scoring queries needs.

    Shapes: P predicted boxes (one per patch), D the vision width, E the query width.

    Attributes:
        image: The image it came from (exemplars drawn on it reuse this embedding).
        features: P x D patch features, the class head's input.
        boxes: P x 4 predicted ``cx, cy, w, h`` as fractions of the model's input frame.
        class_embeds: P x E unnormalised class embeddings (what an exemplar query is).
        pixel_boxes: P x 4 float32 ``x0, y0, x1, y1`` in the image's pixels, clipped to it.
    """

    image: Image.Image
    features: torch.Tensor
    boxes: torch.Tensor
    class_embeds: torch.Tensor
    pixel_boxes: torch.Tensor


def corners(boxes: torch.Tensor) -> torch.Tensor:
    """... x 4 ``cx, cy, w, h`` → ``x0, y0, x1, y1`` (the same arithmetic as transformers')."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def frame_scale(image_size: tuple[int, int], *, pads_to_square: bool) -> torch.Tensor:
    """Pixels per unit of the model's normalised frame for ``x0, y0, x1, y1`` (4, float32).

    A padded square frame spans ``max(W, H)`` pixels both ways; a stretched one spans W and H.
    """
    w, h = image_size
    if pads_to_square:
        side = float(max(w, h))
        return torch.tensor([side, side, side, side])
    return torch.tensor([float(w), float(h), float(w), float(h)])


def select_exemplar_box(
    box: torch.Tensor, pred_boxes: torch.Tensor, class_embeds: torch.Tensor
) -> int:
    """The predicted box whose class embedding stands for an exemplar box (OWL-ViT's rule).

    Candidates are the predicted boxes whose IoU with the exemplar box is at least 0.8 x the
    best one. OWL is trained with one-to-one matching, so of the several predictions that
    cover an object only one learned to carry its class while the others learned
    "background"; the reference picks it as the candidate least similar (dot product) to the
    mean class embedding of the whole image.

    Args:
        box: 4 ``x0, y0, x1, y1`` in the model's normalised frame.
        pred_boxes: P x 4 ``cx, cy, w, h`` in the same frame.
        class_embeds: P x E unnormalised class embeddings.

    Returns:
        The chosen box's index, or -1 when no predicted box overlaps ``box`` at all.
    """
    # torchvision.ops is imported here, not at module level: it pulls in torch._dynamo
    # (over a second), and every `vprompt` command imports the backbone registry.
    from torchvision.ops import box_iou

    ious = box_iou(box.float().reshape(1, 4), corners(pred_boxes.float()))[0]  # P
    if not bool((ious > 0).any()):
        return -1
    candidates = torch.nonzero(ious >= ious.max() * EXEMPLAR_IOU_FRACTION).flatten()
    mean = class_embeds.mean(dim=0)  # E
    similarity = class_embeds[candidates] @ mean
    return int(candidates[torch.argmin(similarity)])


class OwlBackbone(HFBackbone):
    """A frozen OWLv2 or OWL-ViT detector (:class:`~vprompt.backbones.detection.DetectorBackbone`).

    Shapes: P predicted boxes per image (``(S / patch)^2``: 3600 for OWLv2 B/16), Q queries.

    Attributes:
        name: ``owlv2:ARCH`` or ``owlvit:ARCH``.
        weights: The weight source it was built from.
        kind: ``owlv2`` or ``owlvit``.
        capabilities: Text and exemplar queries, boxes only, at most 16 tokens a query.
        pads_to_square: Whether the processor pads images to a square (OWLv2) instead of
            stretching them (OWL-ViT); decides how boxes map to pixels.
    """

    def __init__(
        self, *, model: nn.Module, processor: Any, name: str, weights: str, kind: OwlKind
    ) -> None:
        super().__init__(model=model, name=name, weights=weights)
        self.processor = processor
        self.kind: OwlKind = kind
        self.capabilities = CAPABILITIES
        self.pads_to_square = kind == "owlv2" and bool(
            getattr(processor.image_processor, "do_pad", True)
        )
        config: Any = model.config
        self.context = int(config.text_config.max_position_embeddings)
        self._text_cache: dict[str, torch.Tensor] = {}
        # The last few images' embeddings by pixel content: a server or a CLI run asks many
        # query sets of the same image, and exemplars come from a few reference images.
        self._embeddings: OrderedDict[str, OwlImageEmbedding] = OrderedDict()
        self.vision_runs = 0  # vision-tower runs, for tests and benchmarks

    def embed(self, image: Image.Image) -> OwlImageEmbedding:
        """The vision tower, box head and class embedding of one image (reused for the same
        pixels among the last :data:`EMBEDDING_CACHE_SIZE` images)."""
        rgb = image.convert("RGB")
        key = pixel_key(rgb)
        cached = self._embeddings.get(key)
        if cached is not None:
            self._embeddings.move_to_end(key)
            return cached
        embedding = self._embed(rgb)
        self._embeddings[key] = embedding
        while len(self._embeddings) > EMBEDDING_CACHE_SIZE:
            self._embeddings.popitem(last=False)
        return embedding

    def clear_cache(self) -> None:
        """Forget the cached image embeddings (the next call reruns the vision tower)."""
        self._embeddings.clear()

    @torch.inference_mode()
    def _embed(self, image: Image.Image) -> OwlImageEmbedding:
        self.vision_runs += 1
        model: Any = self.model
        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, next(model.parameters()).dtype)
        feature_map = model.image_embedder(pixel_values=pixels)[0]  # 1 x h x w x D
        features = feature_map.reshape(1, -1, feature_map.shape[-1])  # 1 x P x D
        boxes = model.box_predictor(features, feature_map)  # 1 x P x 4, cx cy w h
        _, class_embeds = model.class_predictor(features)  # 1 x P x E
        scale = frame_scale(image.size, pads_to_square=self.pads_to_square).to(boxes.device)
        w, h = image.size
        pixel = corners(boxes[0].float()) * scale
        pixel[:, 0::2] = pixel[:, 0::2].clamp(0, w)
        pixel[:, 1::2] = pixel[:, 1::2].clamp(0, h)
        return OwlImageEmbedding(
            image=image,
            features=features[0],
            boxes=boxes[0],
            class_embeds=class_embeds[0],
            pixel_boxes=pixel,
        )

    def check_query_tokens(self, queries: Sequence[str]) -> None:
        """Refuse a query longer than the text context (truncating would change its meaning).

        Raises:
            PromptError: Names the first query over :attr:`context` tokens.
        """
        rows = self.processor.tokenizer(list(queries), verbose=False)["input_ids"]
        for query, ids in zip(queries, rows, strict=True):
            if len(ids) > self.context:
                raise PromptError(
                    f"query {query!r} is {len(ids)} tokens long with its start and end markers; "
                    f"{self.name} reads at most {self.context}: shorten it"
                )

    @torch.inference_mode()
    def encode_queries(self, queries: Sequence[str]) -> torch.Tensor:
        """Text queries → Q x E unit-length embeddings, as the library's forward computes them.

        Each distinct query runs through the text tower once per backbone (cached).

        Raises:
            PromptError: A query longer than the text context.
        """
        if not queries:
            return torch.zeros(0, self._query_width(), device=self.device)
        missing = [q for q in dict.fromkeys(queries) if q not in self._text_cache]
        if missing:
            self.check_query_tokens(missing)
        clip: Any = getattr(self.model, self.kind)
        for start in range(0, len(missing), _TEXT_BATCH):
            chunk = missing[start : start + _TEXT_BATCH]
            tokens = self.processor(text=chunk, return_tensors="pt")
            pooled = clip.get_text_features(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device),
            ).pooler_output  # Q x E, projected
            embeds = pooled / torch.linalg.norm(pooled, ord=2, dim=-1, keepdim=True)
            if len(self._text_cache) + len(chunk) > _TEXT_CACHE_SIZE:
                self._text_cache.clear()
            self._text_cache.update(zip(chunk, embeds, strict=True))
        return torch.stack([self._text_cache[q].to(self.device) for q in queries])

    def _query_width(self) -> int:
        config: Any = self.model.config
        return int(config.text_config.hidden_size)

    def exemplar_query(
        self, exemplar: Exemplar, reference: OwlImageEmbedding | None = None
    ) -> tuple[torch.Tensor, int]:
        """The query embedding (E) an exemplar box stands for, and the predicted box it is from.

        Args:
            reference: :meth:`embed` of ``exemplar.image`` if already computed.

        Raises:
            PromptError: No box the model predicts on the reference image overlaps the
                exemplar box (the reference falls back to the nearest box by generalised IoU,
                which describes something else, so it is refused here).
        """
        ref = reference if reference is not None else self.embed(exemplar.image)
        scale = frame_scale(exemplar.image.size, pads_to_square=self.pads_to_square)
        box = torch.tensor(exemplar.box, dtype=torch.float32) / scale
        index = select_exemplar_box(box.to(ref.boxes.device), ref.boxes, ref.class_embeds)
        if index < 0:
            x0, y0, x1, y1 = exemplar.box
            w, h = exemplar.image.size
            raise PromptError(
                f"exemplar box ({x0:g},{y0:g},{x1:g},{y1:g}) on the {w}x{h} reference image: "
                f"no box {self.name} predicts there overlaps it; draw it around an object"
            )
        return ref.class_embeds[index], index

    @torch.inference_mode()
    def detect(
        self,
        image: Image.Image | OwlImageEmbedding,
        *,
        queries: Sequence[str] = (),
        exemplars: Sequence[Exemplar] = (),
    ) -> DetectorOutput:
        """Score every predicted box against the text queries, then the exemplars.

        Args:
            image: The target image, or its :meth:`embed` to score another query set without
                rerunning the vision tower.
            queries: Class names or short phrases (at most 16 tokens each).
            exemplars: Positive boxes on reference images, each its own label after the text
                queries; an exemplar on the target image itself reuses its embedding.

        Returns:
            One candidate per predicted box (P): label = the query with the highest logit,
            score = its sigmoid, exactly as ``post_process_object_detection`` computes them.
        """
        texts = check_queries(queries, self.capabilities, name=self.name)
        for ex in exemplars:
            if not ex.positive:
                raise PromptError(
                    f"{self.name} takes no negative exemplars (positive=False); give boxes "
                    "around objects to find"
                )
        if not texts and not exemplars:
            raise PromptError(f"{self.name}: nothing to look for; give a text query or an exemplar")
        parts = [self.encode_queries(texts)] if texts else []
        target = image if isinstance(image, OwlImageEmbedding) else self.embed(image)
        if exemplars:
            parts.append(self._exemplar_queries(exemplars, target))
        return self.score(target, torch.cat(parts))

    def _exemplar_queries(
        self, exemplars: Sequence[Exemplar], target: OwlImageEmbedding
    ) -> torch.Tensor:
        """K exemplars → K x E query embeddings; each reference image is embedded once."""
        references = {id(target.image): target}
        rows = []
        for ex in exemplars:
            ref = references.get(id(ex.image))
            if ref is None:
                ref = references[id(ex.image)] = self.embed(ex.image)
            rows.append(self.exemplar_query(ex, ref)[0])
        return torch.stack(rows)

    @torch.inference_mode()
    def score(self, target: OwlImageEmbedding, query_embeds: torch.Tensor) -> DetectorOutput:
        """Every predicted box of ``target`` against Q x E query embeddings."""
        model: Any = self.model
        queries = query_embeds.to(target.features.device, target.features.dtype)[None]
        mask = torch.ones(1, queries.shape[1], dtype=torch.bool, device=queries.device)
        logits, _ = model.class_predictor(target.features[None], queries, mask)  # 1 x P x Q
        # Max over logits, then the sigmoid: the library's order (sigmoid can tie saturated
        # logits and change the argmax).
        best = logits[0].max(dim=-1)
        return DetectorOutput(
            boxes=target.pixel_boxes.float().clone(),  # the embedding may score again
            scores=torch.sigmoid(best.values).float(),
            labels=best.indices.long(),
        )


CATALOGUES: dict[OwlKind, HubCatalogue] = {kind: HubCatalogue(ARCHS[kind]) for kind in ARCHS}


def _random_init(kind: OwlKind, arch: str) -> nn.Module:
    model_cls, config_cls, _, _ = _classes(kind)
    config = copy.deepcopy(ARCHS[kind][arch].config)
    return random_init(f"{kind}:{arch}", lambda: config_cls(**config), model_cls)


def _pretrained(kind: OwlKind, arch: str, weights: str) -> nn.Module:
    model_cls = _classes(kind)[0]
    return load_pretrained(
        f"{kind}:{arch}",
        weights,
        model_cls=model_cls,
        model_type=MODEL_TYPES[kind],
        tags=CATALOGUES[kind].list_tags(arch),
    )


def random_processor(kind: OwlKind, side: int) -> Any:
    """The processor a released model of this kind ships, for a ``side``-pixel input, with
    CLIP's tokenizer (for ``--weights none``)."""
    _, _, image_processor_cls, processor_cls = _classes(kind)
    size = {"height": side, "width": side}
    extra = {} if kind == "owlv2" else {"crop_size": size}
    return processor_cls(
        image_processor=image_processor_cls(size=size, **extra),
        tokenizer=clip_tokenizer(max_length=TEXT_CONTEXT),
    )


def load_processor(kind: OwlKind, name: str, weights: str) -> Any:
    """``AutoProcessor`` from the same hub id or folder as the weights, offline when the hub
    cannot be reached.

    Raises:
        WeightsError: No processor files, an unreachable hub, or a processor of another kind.
    """
    import transformers as tf

    processor = load_pretrained_processor(name, weights, tf.AutoProcessor, probe=_PROCESSOR_FILES)
    expected = _classes(kind)[3]
    if not isinstance(processor, expected):
        raise WeightsError(
            f"{weights}: holds a {type(processor).__name__}, but {name} needs an "
            f"{expected.__name__}"
        )
    return processor


def _check_frame(name: str, weights: str, model: nn.Module, processor: Any) -> None:
    """The processor must hand the model whole images at its input size (a crop would move
    every box away from the frame :func:`frame_scale` assumes)."""
    config: Any = model.config
    side = int(config.vision_config.image_size)
    ip = processor.image_processor
    size = (getattr(ip.size, "height", None), getattr(ip.size, "width", None))
    if size != (side, side):
        raise WeightsError(
            f"{weights}: the processor resizes images to {size[1]}x{size[0]}, but {name} "
            f"reads {side}x{side}"
        )
    crop = getattr(ip, "crop_size", None)
    crop_size = (getattr(crop, "height", None), getattr(crop, "width", None))
    if getattr(ip, "do_center_crop", False) and crop is not None and crop_size != size:
        raise WeightsError(
            f"{weights}: the processor center-crops its {side}x{side} input; {name} reads "
            "whole images (set do_center_crop false or crop_size to the input size)"
        )


def build_owl(kind: OwlKind, arch: str, weights: str, device: torch.device) -> OwlBackbone:
    name = f"{kind}:{arch}"
    model = CATALOGUES[kind].model(
        kind,
        arch,
        weights,
        random=functools.partial(_random_init, kind),
        pretrained=functools.partial(_pretrained, kind),
    )
    if weights == RANDOM_INIT:
        processor = random_processor(kind, ARCHS[kind][arch].image_size)
    else:
        processor = load_processor(kind, name, weights)
    _check_frame(name, weights, model, processor)
    backbone = OwlBackbone(
        model=model.eval(), processor=processor, name=name, weights=weights, kind=kind
    )
    return backbone.to(device)


def _family(kind: OwlKind, description: str) -> BackboneFamily:
    catalogue = CATALOGUES[kind]
    return catalogue.family(
        kind, description, build=functools.partial(build_owl, kind), tiny=TINY_ARCHS
    )


OWLV2_FAMILY = _family("owlv2", "OWLv2 open-vocabulary detectors from transformers")
OWLVIT_FAMILY = _family("owlvit", "OWL-ViT open-vocabulary detectors from transformers")

# Text detection: both references (transformers' examples, scenic's playground) threshold
# sigmoid scores at 0.1 and apply no NMS — OWL is trained with one-to-one matching, so it
# already predicts one box per object. Image-guided detection suppresses at
# IMAGE_GUIDED_NMS_IOU in transformers, the default of exemplar-only calls here.
OWLV2_DETECTOR = DetectorSpec(
    family="owlv2",
    description="OWLv2: open-vocabulary boxes from text queries or exemplar boxes",
    capabilities=CAPABILITIES,
    default_model="owlv2:base-patch16-ensemble",
    tiny_model="owlv2:tiny",
    score_threshold=0.1,
    nms_iou=1.0,
    exemplar_nms_iou=IMAGE_GUIDED_NMS_IOU,
)
OWLVIT_DETECTOR = DetectorSpec(
    family="owlvit",
    description="OWL-ViT: open-vocabulary boxes from text queries or exemplar boxes",
    capabilities=CAPABILITIES,
    default_model="owlvit:base-patch32",
    tiny_model="owlvit:tiny",
    score_threshold=0.1,
    nms_iou=1.0,
    exemplar_nms_iou=IMAGE_GUIDED_NMS_IOU,
)

register_family(OWLV2_FAMILY)
register_family(OWLVIT_FAMILY)
register_detector(OWLV2_DETECTOR)
register_detector(OWLVIT_DETECTOR)
