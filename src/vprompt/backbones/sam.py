"""The SAM family through ``transformers``: SAM, SAM-HQ, SAM 2 and EdgeTAM in image mode.

One small seam (:class:`SamBackbone`): ``preprocess`` (the model's own image processor),
``embed`` (pixels → named embedding tensors) and ``decode`` (embeddings + batched prompt
arrays → low-res logits and predicted IoU). Objects ride on the batch axis, so every object has
its own points, box and mask input and decoding N objects equals decoding each alone.
Coordinates move between the original image and the model frame only in
:mod:`vprompt.prompts.resize`; this module picks the frame that matches the model.

Weight sources: a Hugging Face repo id (``facebook/sam-vit-base``, also ``hf-hub:ORG/REPO``),
a local folder saved by ``save_pretrained``, or ``none`` (deterministic random init from
:mod:`vprompt.backbones.sam_configs`). Only safetensors checkpoints are read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from vprompt.backbones.hf_loading import HubCatalogue, load_pretrained, random_init
from vprompt.backbones.hf_module import HFBackbone
from vprompt.backbones.sam_configs import ARCHS, MODEL_TYPES, TINY_ARCHS, SamKind
from vprompt.backbones.sam_guidance import persam_guidance
from vprompt.errors import PromptError
from vprompt.prompts.resize import ResizeLongestSide, ResizeSquare
from vprompt.prompts.spatial import PromptArrays


def _classes(kind: SamKind) -> tuple[Any, Any]:
    """(model class, config class) for a kind; imports transformers lazily."""
    import transformers as tf

    return {
        "sam": (tf.SamModel, tf.SamConfig),
        "sam-hq": (tf.SamHQModel, tf.SamHQConfig),
        "sam2": (tf.Sam2Model, tf.Sam2Config),
        "edgetam": (tf.EdgeTamModel, tf.EdgeTamConfig),
    }[kind]


def _image_processor(kind: SamKind, side: int) -> Any:
    import transformers as tf

    if kind in ("sam", "sam-hq"):
        return tf.SamImageProcessor(
            size={"longest_edge": side}, pad_size={"height": side, "width": side}
        )
    low = side // 4
    return tf.Sam2ImageProcessor(
        size={"height": side, "width": side}, mask_size={"height": low, "width": low}
    )


class SamBackbone(HFBackbone):
    """A frozen promptable segmenter.

    Shapes: B objects, N points per object, K masks per object (3 with multimask output, else
    1), S the model's input side (1024 for released models), L = S / 4 the low-res side.

    Attributes:
        name: ``sam:ARCH``.
        weights: The weight source it was built from.
        kind: ``sam``, ``sam-hq``, ``sam2`` or ``edgetam``.
        frame: The coordinate frame (resize rules) of this model.
    """

    def __init__(self, *, model: nn.Module, name: str, weights: str, kind: SamKind) -> None:
        super().__init__(model=model, name=name, weights=weights)
        self.kind: SamKind = kind
        prompt_cfg: Any = model.config.prompt_encoder_config  # type: ignore[union-attr]
        side = int(prompt_cfg.image_size)
        low = side // int(prompt_cfg.patch_size) * 4
        frame_cls = ResizeLongestSide if kind in ("sam", "sam-hq") else ResizeSquare
        self.frame: ResizeLongestSide = frame_cls(target=side, low_res=low)
        self.image_processor = _image_processor(kind, side)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB images → B x 3 x S x S pixels, exactly as the model's processor prepares them.

        Raises:
            PromptError: An image the frame cannot hold (too elongated for SAM's resize).
        """
        for im in images:
            self.frame.resized_size(*im.size)
        out = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        return out["pixel_values"].to(self.device)

    @torch.inference_mode()
    def embed(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """B x 3 x S x S pixels → named image embeddings, each batch-first.

        ``embeddings`` (B x C x h x w) always; SAM-HQ adds ``intermediate.i`` (its early ViT
        features), SAM 2 and EdgeTAM add ``high_res.i`` (the FPN's finer levels).
        """
        model: Any = self.model
        if self.kind == "sam":
            return {"embeddings": model.get_image_embeddings(pixels)}
        if self.kind == "sam-hq":
            emb, inter = model.get_image_embeddings(pixels)
            parts = {"embeddings": emb}
            parts.update({f"intermediate.{i}": t for i, t in enumerate(inter)})
            return parts
        levels = model.get_image_embeddings(pixels)
        parts = {f"high_res.{i}": t for i, t in enumerate(levels[:-1])}
        parts["embeddings"] = levels[-1]
        return parts

    @torch.inference_mode()
    def decode(
        self,
        parts: dict[str, torch.Tensor],
        arrays: PromptArrays,
        *,
        multimask: bool = True,
        attention_similarity: torch.Tensor | None = None,
        target_embedding: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode B objects of ONE image in one call.

        Args:
            parts: One image's embeddings from :meth:`embed` (batch of 1).
            arrays: Model-frame prompts of B objects (:meth:`PromptSet.to_arrays`).
            multimask: Three candidate masks per object (SAM's default for ambiguous
                prompts) instead of one.
            attention_similarity: PerSAM's target-guided attention bias, B x 1 x T x HW.
            target_embedding: PerSAM's target-semantic prompt, B x 1 x 1 x C. With either,
                the decoder computes the guidance as PerSAM's reference does
                (:func:`~vprompt.backbones.sam_guidance.persam_guidance`).

        Returns:
            Low-res logits (B x K x L x L, float32) and predicted IoU (B x K).
        """
        n = _num_objects(arrays)
        device = self.device
        expanded = {k: v.expand(n, *v.shape[1:]) for k, v in parts.items()}
        kwargs: dict[str, Any] = {"multimask_output": multimask}
        if arrays["points"] is not None:
            kwargs["input_points"] = torch.from_numpy(arrays["points"]).to(device)[:, None]
            kwargs["input_labels"] = torch.from_numpy(arrays["labels"]).to(device)[:, None]
        if arrays["boxes"] is not None:
            kwargs["input_boxes"] = torch.from_numpy(arrays["boxes"]).to(device)[:, None]
        if arrays["masks"] is not None:
            kwargs["input_masks"] = torch.from_numpy(arrays["masks"]).to(device)
        if attention_similarity is not None:
            kwargs["attention_similarity"] = attention_similarity
        if target_embedding is not None:
            kwargs["target_embedding"] = target_embedding
        dtype = expanded["embeddings"].dtype
        for key in ("input_points", "input_boxes", "input_masks"):
            if key in kwargs:
                kwargs[key] = kwargs[key].to(dtype)
        model: Any = self.model
        guided = attention_similarity is not None or target_embedding is not None
        with persam_guidance(model, target_embedding) if guided else contextlib.nullcontext():
            if self.kind == "sam":
                out = model(image_embeddings=expanded["embeddings"], **kwargs)
            elif self.kind == "sam-hq":
                inter = [expanded[k] for k in sorted(expanded) if k.startswith("intermediate.")]
                out = model(
                    image_embeddings=expanded["embeddings"], intermediate_embeddings=inter, **kwargs
                )
            else:
                levels = [expanded[k] for k in sorted(expanded) if k.startswith("high_res.")]
                out = model(image_embeddings=[*levels, expanded["embeddings"]], **kwargs)
        logits = out.pred_masks.reshape(n, -1, *out.pred_masks.shape[-2:]).float()
        iou = out.iou_scores.reshape(n, -1).float()
        return logits, iou


def _num_objects(arrays: PromptArrays) -> int:
    for key in ("points", "boxes", "masks"):
        value = arrays[key]
        if value is not None:
            return int(value.shape[0])
    raise PromptError("decode: the prompt arrays hold no points, boxes or masks")


CATALOGUE = HubCatalogue(ARCHS)


def _random_init(arch: str) -> nn.Module:
    spec = ARCHS[arch]
    model_cls, config_cls = _classes(spec.kind)
    return random_init(f"sam:{arch}", lambda: config_cls(**spec.config), model_cls)


def _pretrained(arch: str, weights: str) -> nn.Module:
    spec = ARCHS[arch]
    model_cls, _ = _classes(spec.kind)
    return load_pretrained(
        f"sam:{arch}",
        weights,
        model_cls=model_cls,
        model_type=MODEL_TYPES[spec.kind],
        tags=CATALOGUE.list_tags(arch),
    )


def build_sam(arch: str, weights: str, device: torch.device) -> SamBackbone:
    model = CATALOGUE.model("sam", arch, weights, random=_random_init, pretrained=_pretrained)
    backbone = SamBackbone(
        model=model.eval(), name=f"sam:{arch}", weights=weights, kind=ARCHS[arch].kind
    )
    return backbone.to(device)


SAM_FAMILY = CATALOGUE.family(
    "sam",
    "promptable segmenters from transformers (SAM, SAM-HQ, SAM 2, EdgeTAM)",
    build=build_sam,
    tiny=TINY_ARCHS,
)
