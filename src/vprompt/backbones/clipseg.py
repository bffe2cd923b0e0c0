"""CLIPSeg through ``transformers``: dense text- and image-prompted segmentation as a detector.

CLIPSeg (Lüddecke & Ecker, CVPR 2022) predicts one logit map per prompt on a square
``S x S`` squash of the image (352 for the released models). Here each map is resized back
to the original ``W x H`` (undoing the squash: a bilinear resize of the logits), turned into
probabilities by a sigmoid, and split into instances:

- foreground = probability ``> mask_threshold`` (default 0.3: the threshold the paper reports
  the released, PhraseCut+-trained model at);
- one candidate per 8-connected component: its mask, its bounding box, and as score the
  *mean* probability inside it (as Mask2Former scores a mask), so a confident object ranks
  above a faint blob that merely has one bright pixel; components of one prompt never
  overlap, so no NMS is needed;
- at most :data:`MAX_INSTANCES_PER_QUERY` components per prompt (the best), which bounds the
  memory of full-size masks on noisy maps.

:meth:`ClipSegBackbone.probability_maps` returns the dense ``H x W`` maps themselves.

Image prompts (exemplars) follow the paper's best visual prompt engineering, the variant the
released weights were trained with (``crop_blur_highlight352`` in the authors' code): on the
normalized ``S x S`` reference image, the background outside the exemplar box is blurred
(Gaussian, 15 x 15, sigma 3) and scaled to 10 %, the result is cropped to the box plus 10 %
context per side, padded to a square and resized (nearest) back to ``S x S``.

Weight sources: a Hugging Face repo id (``CIDAS/clipseg-rd64-refined``, also
``hf-hub:ORG/REPO``), a local folder written by ``save_pretrained`` (model and processor), or
``none`` (deterministic random init with CLIP's tokenizer). Only safetensors are read.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vprompt.backbones.detection import (
    DetectorCapabilities,
    DetectorOutput,
    DetectorSpec,
    Exemplar,
    check_queries,
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
from vprompt.errors import PromptError

MODEL_TYPE = "clipseg"  # the model_type a loaded checkpoint's config must carry
CONTEXT_LENGTH = 77  # CLIP's text context: <start> + 75 tokens + <end>
DEFAULT_MASK_THRESHOLD = 0.3
MAX_INSTANCES_PER_QUERY = 100
# The authors' visual prompt (crop_blur_highlight352): blur, background factor, crop context.
PROMPT_BLUR_KERNEL = 15
PROMPT_BLUR_SIGMA = 3.0
PROMPT_BACKGROUND = 0.1
PROMPT_CONTEXT = 0.1

CAPABILITIES = DetectorCapabilities(
    text=True, exemplars=True, masks=True, max_query_tokens=CONTEXT_LENGTH - 2
)


@dataclass(frozen=True)
class ClipSegArch:
    """One ``clipseg:ARCH`` entry.

    Attributes:
        hub_id: Default weights (a Hugging Face repo id); empty for test-only architectures.
        config: ``CLIPSegConfig`` overrides for a random-init build (``--weights none``).
        side: The square input side of the random-init image processor.
    """

    hub_id: str
    config: dict[str, Any] = field(default_factory=dict)
    side: int = 352


# Released models: CLIP ViT-B/16 (patch 16) with a decoder of width 64 or 16; "refined" adds
# the transposed-convolution head of the authors' rd64-uni-refined weights.
_VIT_B16 = {"vision_config": {"patch_size": 16}}
# Test-only size: a 64-pixel input (4 x 4 patches), widths of 32, a two-layer decoder. The
# default init gives logits of +-500 (saturated maps); 0.4 gives a spread of a few units, so
# parity tests compare real probabilities and the prompts disagree.
_TINY = {
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 64,
        "patch_size": 16,
    },
    "text_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    },
    "projection_dim": 32,
    "extract_layers": [0, 1],
    "reduce_dim": 16,
    "decoder_num_attention_heads": 2,
    "decoder_intermediate_size": 32,
    "use_complex_transposed_convolution": True,
    "initializer_factor": 0.4,
}

ARCHS: dict[str, ClipSegArch] = {
    "rd64-refined": ClipSegArch(
        "CIDAS/clipseg-rd64-refined",
        {**_VIT_B16, "reduce_dim": 64, "use_complex_transposed_convolution": True},
    ),
    "rd64": ClipSegArch("CIDAS/clipseg-rd64", {**_VIT_B16, "reduce_dim": 64}),
    "rd16": ClipSegArch("CIDAS/clipseg-rd16", {**_VIT_B16, "reduce_dim": 16}),
    "tiny": ClipSegArch("", _TINY, side=64),
}
TINY_ARCHS = ("tiny",)


@functools.cache
def _offline_tokenizer() -> Any:
    return clip_tokenizer(max_length=CONTEXT_LENGTH)


def random_init_processor(side: int) -> Any:
    """A random-init build's processor: the released image pipeline (squash to ``side``,
    ImageNet normalization, as the authors trained) and CLIP's tokenizer."""
    import transformers as tf

    images = tf.ViTImageProcessor(
        size={"height": side, "width": side},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        resample=Image.Resampling.BILINEAR,
    )
    return tf.CLIPSegProcessor(image_processor=images, tokenizer=_offline_tokenizer())


def box_in_square(
    box: tuple[float, float, float, float], image_size: tuple[int, int], side: int
) -> tuple[int, int, int, int]:
    """A box in an image's pixels → ``(row0, row1, col0, col1)`` of the pixels it covers
    once the image is squashed to ``side x side`` (at least one pixel each way)."""
    w, h = image_size
    sx, sy = side / w, side / h
    c0 = min(side - 1, math.floor(box[0] * sx))
    r0 = min(side - 1, math.floor(box[1] * sy))
    c1 = max(c0 + 1, min(side, math.ceil(box[2] * sx)))
    r1 = max(r0 + 1, min(side, math.ceil(box[3] * sy)))
    return r0, r1, c0, c1


def visual_prompt(pixels: torch.Tensor, region: tuple[int, int, int, int]) -> torch.Tensor:
    """The authors' image prompt: darken and blur outside the object, crop, re-square.

    Args:
        pixels: 3 x S x S normalized reference image (the processor's output).
        region: ``(row0, row1, col0, col1)`` of the object in it.

    Returns:
        3 x S x S conditional pixels.
    """
    from torchvision.transforms.functional import gaussian_blur

    _, side_h, side_w = pixels.shape
    r0, r1, c0, c1 = region
    mask = torch.zeros((side_h, side_w), dtype=pixels.dtype, device=pixels.device)
    mask[r0:r1, c0:c1] = 1
    k = PROMPT_BLUR_KERNEL
    blurred = gaussian_blur(pixels, [k, k], [PROMPT_BLUR_SIGMA, PROMPT_BLUR_SIGMA])
    blended = pixels * mask + PROMPT_BACKGROUND * blurred * (1 - mask)
    # Context of 10 % of the box's own extent on each side, clipped (the authors' crop).
    h, w = r1 - r0, c1 - c0
    top = int(max(0.0, r0 - PROMPT_CONTEXT * h))
    bottom = int(min(float(side_h), r1 + PROMPT_CONTEXT * h))
    left = int(max(0.0, c0 - PROMPT_CONTEXT * w))
    right = int(min(float(side_w), c1 + PROMPT_CONTEXT * w))
    crop = blended[:, top:bottom, left:right]
    ch, cw = crop.shape[1:]
    # Pad the short side with zeros (the mean colour once normalized), centred.
    pad_x, pad_y = max(0, ch - cw), max(0, cw - ch)
    crop = F.pad(crop, (pad_x // 2, pad_x - pad_x // 2, pad_y // 2, pad_y - pad_y // 2))
    return F.interpolate(crop[None], size=(side_h, side_w), mode="nearest")[0]


def map_instances(
    probs: torch.Tensor, *, threshold: float, max_per_query: int = MAX_INSTANCES_PER_QUERY
) -> DetectorOutput:
    """Dense probability maps → one candidate per connected foreground component.

    Args:
        probs: N x H x W probabilities, one map per query.
        threshold: Foreground is ``prob > threshold``.
        max_per_query: Keep at most this many components of one map (highest scores).

    Returns:
        Candidates with 8-connected component masks, their bounding boxes (pixel edges:
        ``x1`` is one past the last column), the mean probability inside as score, and the
        map's index as label; per query, best score first.
    """
    from scipy import ndimage

    maps = probs.detach().float().cpu().numpy()
    n, h, w = maps.shape
    boxes: list[list[float]] = []
    scores: list[float] = []
    labels: list[int] = []
    masks: list[np.ndarray] = []
    eight = np.ones((3, 3), dtype=bool)
    for label in range(n):
        prob = maps[label]
        components, count = ndimage.label(prob > threshold, structure=eight)
        if count == 0:
            continue
        ids = np.arange(1, count + 1)
        means = np.asarray(ndimage.mean(prob, components, index=ids), dtype=np.float64)
        slices = ndimage.find_objects(components)
        order = np.argsort(-means, kind="stable")[:max_per_query]
        for i in order:
            rows, cols = slices[i]
            boxes.append([cols.start, rows.start, cols.stop, rows.stop])
            scores.append(float(means[i]))
            labels.append(label)
            masks.append(components == i + 1)
    stacked = np.stack(masks) if masks else np.zeros((0, h, w), dtype=bool)
    return DetectorOutput(
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        scores=torch.tensor(scores, dtype=torch.float32),
        labels=torch.tensor(labels, dtype=torch.long),
        masks=torch.from_numpy(stacked),
    )


class ClipSegBackbone(HFBackbone):
    """A frozen text- and image-prompted segmenter, as a detector of connected regions.

    Shapes: N prompts (text queries, then exemplars), S the model's square input side,
    H x W the original image.

    Attributes:
        name: ``clipseg:ARCH``.
        weights: The weight source it was built from.
        capabilities: Text queries and (positive) exemplars; masks.
        processor: The model's ``CLIPSegProcessor``.
        mask_threshold: Foreground probability for :meth:`detect`'s instances.
    """

    capabilities = CAPABILITIES

    def __init__(
        self,
        *,
        model: nn.Module,
        processor: Any,
        name: str,
        weights: str,
        mask_threshold: float = DEFAULT_MASK_THRESHOLD,
    ) -> None:
        super().__init__(model=model, name=name, weights=weights)
        self.processor = processor
        self.mask_threshold = mask_threshold

    def _pixels(self, image: Image.Image) -> torch.Tensor:
        """RGB image → 1 x 3 x S x S, as the model's processor squashes it."""
        out = self.processor.image_processor(images=[image.convert("RGB")], return_tensors="pt")
        return out["pixel_values"].to(self.device, next(self.model.parameters()).dtype)

    def _text_embeddings(self, queries: list[str]) -> torch.Tensor:
        tokenizer = self.processor.tokenizer
        for q, ids in zip(queries, tokenizer(queries)["input_ids"], strict=True):
            if len(ids) > CONTEXT_LENGTH:
                raise PromptError(
                    f"query {q!r} has {len(ids) - 2} tokens; {self.name} reads at most "
                    f"{CONTEXT_LENGTH - 2}"
                )
        enc = tokenizer(
            queries, padding="max_length", max_length=CONTEXT_LENGTH, return_tensors="pt"
        )
        model: Any = self.model
        return model.get_conditional_embeddings(
            batch_size=len(queries),
            input_ids=enc["input_ids"].to(self.device),
            attention_mask=enc["attention_mask"].to(self.device),
        )

    def _exemplar_embeddings(self, exemplars: Sequence[Exemplar]) -> torch.Tensor:
        prompts = []
        for k, ex in enumerate(exemplars):
            if not ex.positive:
                raise PromptError(
                    f"exemplar {k} is negative; {self.name} takes positive exemplars only"
                )
            pixels = self._pixels(ex.image)[0]
            region = box_in_square(ex.box, ex.image.size, int(pixels.shape[-1]))
            prompts.append(visual_prompt(pixels, region))
        model: Any = self.model
        return model.get_conditional_embeddings(
            batch_size=len(prompts), conditional_pixel_values=torch.stack(prompts)
        )

    @torch.inference_mode()
    def logits(
        self,
        image: Image.Image,
        *,
        queries: Sequence[str] = (),
        exemplars: Sequence[Exemplar] = (),
    ) -> torch.Tensor:
        """N x S x S logit maps on the squashed image: the model's own output.

        The vision tower runs once; every prompt then goes through the light decoder, as the
        model's forward does for a batch of copies of the image.

        Raises:
            PromptError: No prompt at all, a bad query, or a negative exemplar.
        """
        cleaned = check_queries(queries, self.capabilities, name=self.name)
        if not cleaned and not exemplars:
            raise PromptError(f"{self.name} needs at least one text query or exemplar")
        conditions = []
        if cleaned:
            conditions.append(self._text_embeddings(cleaned))
        if exemplars:
            conditions.append(self._exemplar_embeddings(exemplars))
        condition = torch.cat(conditions)  # N x P
        model: Any = self.model
        vision = model.clip.get_image_features(
            pixel_values=self._pixels(image), output_hidden_states=True
        )
        n = condition.shape[0]
        # hidden_states[0] is the embedding output, so layer i is at i + 1.
        activations = [vision.hidden_states[i + 1].expand(n, -1, -1) for i in model.extract_layers]
        out = model.decoder(activations, condition)
        return out.logits.reshape(n, *out.logits.shape[-2:]).float()

    def probability_maps(
        self,
        image: Image.Image,
        *,
        queries: Sequence[str] = (),
        exemplars: Sequence[Exemplar] = (),
    ) -> torch.Tensor:
        """N x H x W float32 probabilities on the original image, one map per prompt (text
        queries first, then exemplars): the logits resized back from the square squash,
        then a sigmoid."""
        w, h = image.size
        low = self.logits(image, queries=queries, exemplars=exemplars)
        full = F.interpolate(low[:, None], size=(h, w), mode="bilinear", align_corners=False)
        return full[:, 0].sigmoid().cpu()

    def detect(
        self,
        image: Image.Image,
        *,
        queries: Sequence[str] = (),
        exemplars: Sequence[Exemplar] = (),
    ) -> DetectorOutput:
        """Connected regions of each prompt's map above :attr:`mask_threshold`, with masks.

        Raises:
            PromptError: No prompt at all, a bad query, or a negative exemplar.
        """
        maps = self.probability_maps(image, queries=queries, exemplars=exemplars)
        return map_instances(maps, threshold=self.mask_threshold)


# ---------------------------------------------------------------------------- building

CATALOGUE = HubCatalogue(ARCHS)


def _model_class() -> Any:
    import transformers as tf

    return tf.CLIPSegForImageSegmentation


def _random_init(arch: str) -> nn.Module:
    import transformers as tf

    spec = ARCHS[arch]
    return random_init(f"clipseg:{arch}", lambda: tf.CLIPSegConfig(**spec.config), _model_class())


def _pretrained(arch: str, weights: str) -> nn.Module:
    return load_pretrained(
        f"clipseg:{arch}",
        weights,
        model_cls=_model_class(),
        model_type=MODEL_TYPE,
        tags=CATALOGUE.list_tags(arch),
    )


def build_clipseg(arch: str, weights: str, device: torch.device) -> ClipSegBackbone:
    import transformers as tf

    name = f"clipseg:{arch}"
    model = CATALOGUE.model("clipseg", arch, weights, random=_random_init, pretrained=_pretrained)
    if weights == RANDOM_INIT:
        processor = random_init_processor(ARCHS[arch].side)
    else:
        processor = load_pretrained_processor(name, weights, tf.CLIPSegProcessor)
    backbone = ClipSegBackbone(model=model.eval(), processor=processor, name=name, weights=weights)
    return backbone.to(device)


CLIPSEG_FAMILY = register_family(
    CATALOGUE.family(
        "clipseg",
        "CLIPSeg text- and image-prompted segmenters from transformers (CIDAS)",
        build=build_clipseg,
        tiny=TINY_ARCHS,
    )
)

register_detector(
    DetectorSpec(
        family="clipseg",
        description="CLIPSeg: connected regions of text- or image-prompted probability maps",
        capabilities=CAPABILITIES,
        default_model="clipseg:rd64-refined",
        tiny_model="clipseg:tiny",
        # Regions are already above the map threshold (their mean too); regions of one prompt
        # are disjoint, so NMS has nothing to remove.
        score_threshold=DEFAULT_MASK_THRESHOLD,
        nms_iou=1.0,
    )
)
