"""SAM 3 through ``transformers``: a concept (a short noun phrase and/or exemplar boxes) →
every matching instance, with a box, a score and a mask.

SAM 3 (Carion et al., 2025) pairs a ViT image encoder with a CLIP-style text encoder, a
geometry encoder for exemplar boxes (positive or negative), a DETR encoder-decoder whose
queries each propose one instance, a presence token (is the concept in the image at all?)
and a mask head. :class:`Sam3Backbone` runs it as ``Sam3Processor`` and
``post_process_instance_segmentation`` do, but keeps every query as a candidate and leaves
thresholds to :class:`~vprompt.detect.Detections`:

- one concept per prompt: each text query is its own forward (label ``i``), batched with the
  other queries of the same image; exemplar boxes join the single text query or, without
  text, form the concept with the processor's placeholder text ``"visual"``;
- the image is encoded once (``Sam3Model.get_vision_features``) and reused by every query and
  by later calls on the same pixels;
- score = ``sigmoid(pred_logits) * sigmoid(presence_logits)``; boxes are the model's
  normalized ``x0, y0, x1, y1`` times the original size; masks are the mask logits'
  sigmoid resized (bilinear) to the original size and thresholded at ``mask_threshold``.

Exemplar boxes are geometry prompts on the image being segmented, so an exemplar must lie on
the target image itself (the same object or the same pixels).

Weight sources: a Hugging Face repo id (``facebook/sam3``, also ``hf-hub:ORG/REPO``), a local
folder saved by ``save_pretrained``, or ``none`` (deterministic random init from
:mod:`vprompt.backbones.sam3_configs`). Only safetensors checkpoints are read.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vprompt.backbones.detection import (
    DetectorCapabilities,
    DetectorOutput,
    DetectorSpec,
    Exemplar,
    check_box,
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
from vprompt.backbones.registry import RANDOM_INIT, register_family
from vprompt.backbones.sam3_configs import (
    ARCHS,
    MODEL_TYPE,
    TEXT_CONTEXT,
    TINY_ARCHS,
    VIDEO_MODEL_TYPE,
)
from vprompt.errors import PromptError, WeightsError

# Sam3Processor's text for a concept given by boxes alone.
EXEMPLAR_ONLY_TEXT = "visual"
# post_process_instance_segmentation's defaults.
SCORE_THRESHOLD = 0.3
MASK_THRESHOLD = 0.5
# Sam3Processor's label for a padded box (never produced here: one concept per prompt).
_PAD_LABEL = -10

CAPABILITIES = DetectorCapabilities(
    text=True,
    exemplars=True,
    negative_exemplars=True,
    masks=True,
    phrases=False,
    max_queries=0,
    max_query_tokens=TEXT_CONTEXT - 2,  # the start and end tokens share the context
)


def boxes_to_model(boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Pixel boxes on a ``W x H`` image → the model's frame, as ``Sam3Processor`` does.

    Args:
        boxes: K x 4 ``x0, y0, x1, y1`` in original pixels.

    Returns:
        K x 4 float32 ``cx, cy, w, h`` as fractions of the image (the image is resized to a
        square without padding, so fractions of the original are fractions of the input).
    """
    w, h = image_size
    xyxy = boxes.to(torch.float32).clone()
    xyxy[:, 0::2] = xyxy[:, 0::2] / w
    xyxy[:, 1::2] = xyxy[:, 1::2] / h
    x0, y0, x1, y1 = xyxy.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def boxes_from_model(boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`boxes_to_model`: K x 4 normalized ``cx, cy, w, h`` → pixel
    ``x0, y0, x1, y1`` on the ``W x H`` image."""
    w, h = image_size
    cx, cy, bw, bh = boxes.to(torch.float32).unbind(-1)
    xyxy = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1)
    return xyxy * torch.tensor([w, h, w, h], dtype=torch.float32, device=boxes.device)


class Sam3Backbone(HFBackbone):
    """A frozen SAM 3 concept detector and segmenter.

    Shapes: T text queries, K exemplar boxes, Q DETR queries (200 for the released model),
    h x w the mask logits (288 x 288 for the released model), H x W the original image.

    Attributes:
        name: ``sam3:ARCH``.
        weights: The weight source it was built from.
        capabilities: Text and exemplar boxes (positive and negative), with masks.
        processor: The model's ``Sam3Processor`` (its image processor and tokenizer).
        score_floor: Candidates scoring below this are dropped before masks are made: a
            full-size mask for each of Q queries per concept is ``Q x H x W`` booleans, and
            the released model scores a query that misses the concept far below any useful
            threshold (the reference keeps ``> 0.3``).
        mask_threshold: Binarizes the mask probabilities (the reference's 0.5).
        max_batch: Text queries decoded in one forward (each carries its own copy of the
            image features through the decoder).
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        processor: Any,
        name: str,
        weights: str,
        score_floor: float = 0.01,
        mask_threshold: float = MASK_THRESHOLD,
        max_batch: int = 4,
    ) -> None:
        super().__init__(model=model, name=name, weights=weights)
        self.processor = processor
        self.capabilities = CAPABILITIES
        self.score_floor = score_floor
        self.mask_threshold = mask_threshold
        self.max_batch = max_batch
        self._vision_cache: tuple[str, Any] | None = None

    @torch.inference_mode()
    def vision_features(self, image: Image.Image) -> Any:
        """The image's encoder features (``Sam3VisionEncoderOutput``, batch of 1), computed
        once per distinct image: the last image's features are kept for the next call."""
        return self._vision_features(image, pixel_key(image))

    def _vision_features(self, image: Image.Image, key: str) -> Any:
        param = next(self.model.parameters())
        key = f"{key}:{param.device}:{param.dtype}"
        if self._vision_cache is not None and self._vision_cache[0] == key:
            return self._vision_cache[1]
        self._vision_cache = None  # free the old features before computing new ones
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        pixels = self.processor.image_processor(images=[rgb], return_tensors="pt")
        pixel_values = pixels["pixel_values"].to(param.device, param.dtype)
        model: Any = self.model
        features = model.get_vision_features(pixel_values=pixel_values)
        self._vision_cache = (key, features)
        return features

    def clear_cache(self) -> None:
        """Forget the kept image features."""
        self._vision_cache = None

    @torch.inference_mode()
    def detect(
        self,
        image: Image.Image,
        *,
        queries: Sequence[str] = (),
        exemplars: Sequence[Exemplar] = (),
    ) -> DetectorOutput:
        """Every candidate instance of each concept on ``image`` (see the module docstring).

        Text query ``i`` is concept ``i``. Exemplar boxes (on ``image`` itself) refine the
        only text query, or alone form concept 0; each candidate is one DETR query.

        Returns:
            N candidates (Q per concept, less those under ``score_floor``), on the CPU:
            boxes N x 4 in original pixels (clipped), scores N, labels N, masks N x H x W.

        Raises:
            PromptError: No query and no exemplar; an empty, overlong or over-tokened query;
                exemplars next to several text queries; an exemplar on another image;
                only negative exemplars and no text.
        """
        texts = check_queries(queries, self.capabilities, name=self.name)
        if not texts and not exemplars:
            raise PromptError(f"{self.name}: nothing to look for; give a text query or exemplars")
        if exemplars and len(texts) > 1:
            raise PromptError(
                f"{self.name}: exemplars refine one concept, but {len(texts)} text queries were "
                "given; pass at most one text query with exemplars"
            )
        if exemplars and not texts and not any(ex.positive for ex in exemplars):
            raise PromptError(
                f"{self.name}: only negative exemplars and no text; a concept needs a text "
                "query or at least one positive exemplar"
            )
        key = pixel_key(image)
        geometry = self._exemplar_prompts(image, key, exemplars) if exemplars else None
        tokens = self._tokenize(texts or [EXEMPLAR_ONLY_TEXT])
        features = self._vision_features(image, key)
        parts = []
        for start in range(0, tokens["input_ids"].shape[0], self.max_batch):
            chunk = {k: v[start : start + self.max_batch] for k, v in tokens.items()}
            out = self._forward(features, chunk, geometry)
            parts.append(self._candidates(out, image.size, first_label=start))
        return DetectorOutput(
            boxes=torch.cat([p.boxes for p in parts]),
            scores=torch.cat([p.scores for p in parts]),
            labels=torch.cat([p.labels for p in parts]),
            masks=torch.cat([p.masks for p in parts if p.masks is not None]),
        )

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """T texts → T x 32 ``input_ids`` and ``attention_mask``, as ``Sam3Processor`` pads them.

        Raises:
            PromptError: A text longer than the 32-token context.
        """
        lengths = [len(ids) for ids in self.processor.tokenizer(texts, verbose=False)["input_ids"]]
        for text, n in zip(texts, lengths, strict=True):
            if n > TEXT_CONTEXT:
                raise PromptError(
                    f"query {text[:40]!r} has {n - 2} tokens; {self.name} takes at most "
                    f"{TEXT_CONTEXT - 2} (a short noun phrase)"
                )
        encoded = self.processor(text=texts, return_tensors="pt")
        device = self.device
        return {
            "input_ids": encoded["input_ids"].to(device),
            "attention_mask": encoded["attention_mask"].to(device),
        }

    def _exemplar_prompts(
        self, image: Image.Image, key: str, exemplars: Sequence[Exemplar]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exemplars → (1 x K x 4 normalized ``cx, cy, w, h`` boxes, 1 x K labels: 1 positive,
        0 negative), the geometry prompt of one concept.

        Raises:
            PromptError: An exemplar on another image or a box outside ``image``.
        """
        keys: dict[int, str] = {}
        boxes = []
        for i, ex in enumerate(exemplars):
            if ex.image is not image:
                if id(ex.image) not in keys:  # hash each distinct reference image once
                    keys[id(ex.image)] = pixel_key(ex.image)
                if keys[id(ex.image)] != key:
                    w, h = ex.image.size
                    raise PromptError(
                        f"exemplar {i}: its box is on another image ({w}x{h}); {self.name} takes "
                        "exemplar boxes on the image being searched (pass that image as the "
                        "exemplar's image)"
                    )
            boxes.append(check_box(ex.box, image.size, what=f"exemplar {i} box"))
        model_boxes = boxes_to_model(torch.tensor(boxes, dtype=torch.float32), image.size)
        labels = torch.tensor([1 if ex.positive else 0 for ex in exemplars], dtype=torch.long)
        device = self.device
        return model_boxes[None].to(device), labels[None].to(device)

    def _forward(
        self,
        features: Any,
        tokens: dict[str, torch.Tensor],
        geometry: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> Any:
        """One decoder pass for B concepts of the same image (the image features are
        broadcast over the batch, never recomputed)."""
        from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

        n = tokens["input_ids"].shape[0]
        vision = Sam3VisionEncoderOutput(
            fpn_hidden_states=tuple(t.expand(n, *t.shape[1:]) for t in features.fpn_hidden_states),
            fpn_position_encoding=tuple(
                t.expand(n, *t.shape[1:]) for t in features.fpn_position_encoding
            ),
        )
        kwargs: dict[str, Any] = {}
        if geometry is not None:
            dtype = features.fpn_hidden_states[0].dtype
            kwargs["input_boxes"] = geometry[0].to(dtype)
            kwargs["input_boxes_labels"] = geometry[1]
        model: Any = self.model
        return model(vision_embeds=vision, **tokens, **kwargs)

    def _candidates(self, out: Any, size: tuple[int, int], *, first_label: int) -> DetectorOutput:
        """B concepts' Q queries → candidates at or above ``score_floor``, on the CPU."""
        w, h = size
        scores = out.pred_logits.float().sigmoid()  # B x Q
        if out.presence_logits is not None:
            scores = scores * out.presence_logits.float().sigmoid()  # B x 1 broadcast
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=scores.device)
        boxes = out.pred_boxes.float() * scale  # B x Q x 4
        boxes[..., 0::2] = boxes[..., 0::2].clamp(0, w)
        boxes[..., 1::2] = boxes[..., 1::2].clamp(0, h)
        b, q = scores.shape
        labels = (torch.arange(b, device=scores.device) + first_label)[:, None].expand(b, q)
        keep = scores >= self.score_floor
        masks = [self._masks(out.pred_masks[i][keep[i]], (h, w)) for i in range(b)]
        return DetectorOutput(
            boxes=boxes[keep].cpu(),
            scores=scores[keep].cpu(),
            labels=labels[keep].cpu(),
            masks=torch.cat(masks) if masks else torch.zeros(0, h, w, dtype=torch.bool),
        )

    def _masks(self, logits: torch.Tensor, size: tuple[int, int], chunk: int = 16) -> torch.Tensor:
        """N x h x w mask logits → N x H x W bool on the CPU: sigmoid, bilinear resize to the
        original size, threshold (the reference's order), ``chunk`` masks at a time so only a
        few full-size float maps exist at once."""
        out = torch.zeros(logits.shape[0], *size, dtype=torch.bool)
        for start in range(0, logits.shape[0], chunk):
            probs = logits[start : start + chunk].float().sigmoid()
            full = F.interpolate(probs[None], size=size, mode="bilinear", align_corners=False)[0]
            out[start : start + chunk] = (full > self.mask_threshold).cpu()
        return out


def offline_processor(model: nn.Module) -> Any:
    """A ``Sam3Processor`` built without the hub: SAM 3's image processor at the model's input
    size and CLIP's released BPE with the 32-token context (what the released processor
    holds), for random-init builds and checkpoint folders saved without their processor."""
    import transformers as tf

    config: Any = model.config
    vision = config.vision_config
    side = int(vision.image_size)
    low = side // int(vision.backbone_config.patch_size) * int(max(vision.scale_factors))
    image_processor = tf.Sam3ImageProcessor(
        size={"height": side, "width": side}, mask_size={"height": low, "width": low}
    )
    return tf.Sam3Processor(
        image_processor=image_processor, tokenizer=clip_tokenizer(max_length=TEXT_CONTEXT)
    )


def _pretrained_processor(weights: str, model: nn.Module) -> Any:
    """The checkpoint's own processor (hub repo or folder), or the offline one where the
    folder holds none or the hub's processor files cannot be fetched."""
    import transformers as tf

    folder = Path(weights).expanduser()
    try:
        return load_pretrained_processor("sam3", weights, tf.Sam3Processor)
    except WeightsError:
        if (folder / "tokenizer_config.json").is_file():
            raise  # the folder has processor files, and they are broken: say so
        return offline_processor(model)  # none saved, or the hub's cannot be fetched


CATALOGUE = HubCatalogue(ARCHS)


def _random_init(arch: str) -> nn.Module:
    import transformers as tf

    config = ARCHS[arch].config
    return random_init(f"sam3:{arch}", lambda: tf.Sam3Config(**config), tf.Sam3Model)


def _pretrained(arch: str, weights: str) -> nn.Module:
    import transformers as tf

    # The released checkpoint is the image + video model; Sam3Model loads its detector half.
    return load_pretrained(
        f"sam3:{arch}",
        weights,
        model_cls=tf.Sam3Model,
        model_type=(MODEL_TYPE, VIDEO_MODEL_TYPE),
        tags=CATALOGUE.list_tags(arch),
    )


def build_sam3(arch: str, weights: str, device: torch.device) -> Sam3Backbone:
    model = CATALOGUE.model("sam3", arch, weights, random=_random_init, pretrained=_pretrained)
    processor = (
        offline_processor(model)
        if weights == RANDOM_INIT
        else _pretrained_processor(weights, model)
    )
    backbone = Sam3Backbone(
        model=model.eval(), processor=processor, name=f"sam3:{arch}", weights=weights
    )
    return backbone.to(device)


SAM3_FAMILY = CATALOGUE.family(
    "sam3",
    "SAM 3 concept segmentation from transformers (noun phrase and/or exemplar boxes)",
    build=build_sam3,
    tiny=TINY_ARCHS,
)

SAM3_DETECTOR = DetectorSpec(
    family="sam3",
    description="SAM 3: every instance of a noun phrase and/or exemplar boxes, with masks",
    capabilities=CAPABILITIES,
    default_model="sam3:large",
    tiny_model="sam3:tiny",
    score_threshold=SCORE_THRESHOLD,
    nms_iou=1.0,  # a DETR set: the reference applies no NMS
)

register_family(SAM3_FAMILY)
register_detector(SAM3_DETECTOR)
