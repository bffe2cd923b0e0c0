"""SegGPT through ``transformers``: segment a target image from example (image, mask) pairs.

SegGPT (Wang et al., 2023) stacks a prompt image over the target and its prompt mask over a
blank mask, and paints the missing half. Pre- and post-processing are the model's own
``SegGptImageProcessor``: binary masks go in as one-label segmentation maps (``num_labels=1``:
background black, foreground white) and come back through the palette's nearest colour.
Several reference pairs for one target are combined with the model's feature ensemble
(``feature_ensemble=True``), which averages the target half across prompts inside the
encoder, as the paper does for few-shot inference.

Weight sources: a Hugging Face repo id (``BAAI/seggpt-vit-large``, also ``hf-hub:ORG/REPO``),
a local folder saved by ``save_pretrained``, or ``none`` (deterministic random init). Only
safetensors checkpoints are read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike
from PIL import Image
from torch import nn

from vprompt.backbones.hf_loading import HubCatalogue, load_pretrained, random_init
from vprompt.backbones.hf_module import HFBackbone
from vprompt.errors import PromptError

EmbeddingType = Literal["instance", "semantic"]
MODEL_TYPE = "seggpt"  # the model_type a loaded checkpoint's config must carry


@dataclass(frozen=True)
class SegGptArch:
    """One ``seggpt:ARCH`` entry.

    Attributes:
        hub_id: Default weights (a Hugging Face repo id); empty for test-only architectures.
        config: ``SegGptConfig`` overrides for a random-init build (``--weights none``).
    """

    hub_id: str
    config: dict[str, Any] = field(default_factory=dict)


# Test-only size: 32 x 32 halves (a 64 x 32 painting), 8-pixel patches. The wide init makes
# random predictions hold both classes, so parity tests compare real masks, not empty ones.
_TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "mlp_dim": 64,
    "image_size": [64, 32],
    "patch_size": 8,
    "pretrain_image_size": 32,
    "decoder_hidden_size": 16,
    "merge_index": 1,
    "intermediate_hidden_state_indices": [1, 2],
    "initializer_range": 0.5,
}

ARCHS: dict[str, SegGptArch] = {
    "vit-large": SegGptArch("BAAI/seggpt-vit-large"),
    "tiny": SegGptArch("", _TINY),
}
TINY_ARCHS = ("tiny",)


@dataclass(frozen=True, eq=False)
class SegGptPrediction:
    """One target's prediction, at the target's original size (CPU tensors).

    Attributes:
        mask: H x W bool, the processor's palette decision (pixel nearer white than black).
        foreground: H x W float32 in [0, 1], the painted mask's brightness (mean of the
            un-normalized RGB / 255); ``foreground > 0.5`` is the same decision as ``mask``
            up to float rounding.
    """

    mask: torch.Tensor
    foreground: torch.Tensor


def _image_processor(half: tuple[int, int]) -> Any:
    import transformers as tf

    return tf.SegGptImageProcessor(size={"height": half[0], "width": half[1]})


class SegGptBackbone(HFBackbone):
    """A frozen in-context segmenter.

    Shapes: P reference pairs, T targets, h x w one half of the model's painting (448 x 448
    for the released model).

    Attributes:
        name: ``seggpt:ARCH``.
        weights: The weight source it was built from.
        input_size: (h, w) each image and mask is resized to.
    """

    def __init__(self, *, model: nn.Module, name: str, weights: str) -> None:
        super().__init__(model=model, name=name, weights=weights)
        config: Any = model.config
        size = config.image_size
        height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        # The painting stacks prompt over target, so each half is half the configured height.
        self.input_size = (height // 2, width)
        self.image_processor = _image_processor(self.input_size)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def preprocess_prompts(
        self, prompt_images: Sequence[Image.Image], prompt_masks: Sequence[ArrayLike]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """P images and P binary H x W masks → (P x 3 x h x w pixels, P x 3 x h x w masks).

        Raises:
            PromptError: No pairs, unequal counts, or a mask that is not 2-D, not binary, or
                not the size of its image.
        """
        if not prompt_images:
            raise PromptError("SegGPT needs at least one reference (image, mask) pair")
        if len(prompt_images) != len(prompt_masks):
            raise PromptError(
                f"got {len(prompt_images)} reference images but {len(prompt_masks)} masks"
            )
        maps = [
            _label_map(m, im, i)
            for i, (im, m) in enumerate(zip(prompt_images, prompt_masks, strict=True))
        ]
        out = self.image_processor(
            images=None,
            prompt_images=[im.convert("RGB") for im in prompt_images],
            prompt_masks=maps,
            num_labels=1,
            return_tensors="pt",
        )
        return self._to_model(out["prompt_pixel_values"]), self._to_model(out["prompt_masks"])

    def preprocess_targets(self, targets: Sequence[Image.Image]) -> torch.Tensor:
        """T images → T x 3 x h x w pixels."""
        out = self.image_processor(
            images=[im.convert("RGB") for im in targets], return_tensors="pt"
        )
        return self._to_model(out["pixel_values"])

    def _to_model(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def segment(
        self,
        prompt_images: Sequence[Image.Image],
        prompt_masks: Sequence[ArrayLike],
        targets: Sequence[Image.Image],
        *,
        embedding_type: EmbeddingType = "instance",
        batch_size: int = 8,
    ) -> list[SegGptPrediction]:
        """Segment every target from the same reference pairs.

        One pair: targets ride on the batch axis, ``batch_size`` per forward. Several pairs:
        one forward per target with the pairs on the batch axis and the feature ensemble on
        (it averages over the whole batch, so targets cannot share a forward).

        Args:
            prompt_images: P reference images.
            prompt_masks: P binary H x W masks (bool or 0/1), each the size of its image.
            targets: T images to segment.
            embedding_type: SegGPT's task token: ``instance`` (the released default) or
                ``semantic``.
            batch_size: Targets per forward in the one-pair case.

        Returns:
            T predictions at each target's original size.
        """
        if embedding_type not in ("instance", "semantic"):
            raise PromptError(
                f"embedding_type: expected 'instance' or 'semantic', got {embedding_type!r}"
            )
        prompt_pixels, masks = self.preprocess_prompts(prompt_images, prompt_masks)
        if not targets:
            return []
        sizes = [(im.height, im.width) for im in targets]
        n = prompt_pixels.shape[0]
        results: list[SegGptPrediction] = []
        if n == 1:
            step = max(1, int(batch_size))
            for start in range(0, len(targets), step):
                pixels = self.preprocess_targets(targets[start : start + step])
                b = pixels.shape[0]
                pred = self._forward(
                    pixels,
                    prompt_pixels.expand(b, -1, -1, -1),
                    masks.expand(b, -1, -1, -1),
                    ensemble=False,
                    embedding_type=embedding_type,
                )
                results += self._postprocess(pred, sizes[start : start + b])
            return results
        for target, size in zip(targets, sizes, strict=True):
            pixels = self.preprocess_targets([target]).expand(n, -1, -1, -1)
            pred = self._forward(
                pixels, prompt_pixels, masks, ensemble=True, embedding_type=embedding_type
            )
            # The ensemble makes every item's target half the same up to the decoder's
            # border rows; the first item is the prediction, as in SegGPT's own inference.
            results += self._postprocess(pred[:1], [size])
        return results

    def _forward(
        self,
        pixels: torch.Tensor,
        prompt_pixels: torch.Tensor,
        masks: torch.Tensor,
        *,
        ensemble: bool,
        embedding_type: EmbeddingType,
    ) -> torch.Tensor:
        """B pairs → B x 3 x 2h x w float32 paintings (prompt mask over predicted mask)."""
        model: Any = self.model
        out = model(
            pixel_values=pixels,
            prompt_pixel_values=prompt_pixels,
            prompt_masks=masks,
            feature_ensemble=ensemble,
            embedding_type=embedding_type,
        )
        return out.pred_masks.float()

    def _postprocess(
        self, paintings: torch.Tensor, sizes: list[tuple[int, int]]
    ) -> list[SegGptPrediction]:
        labels = self.image_processor.post_process_semantic_segmentation(
            SimpleNamespace(pred_masks=paintings), target_sizes=sizes, num_labels=1
        )
        half = paintings[:, :, paintings.shape[2] // 2 :]  # B x 3 x h x w
        mean = half.new_tensor(self.image_processor.image_mean)[:, None, None]
        std = half.new_tensor(self.image_processor.image_std)[:, None, None]
        rgb = ((half * std + mean) * 255).clamp(0, 255)
        brightness = rgb.mean(dim=1, keepdim=True) / 255  # B x 1 x h x w
        preds = []
        for i, size in enumerate(sizes):
            # Nearest, like the processor's own resize of the painted mask.
            fg = F.interpolate(brightness[i : i + 1], size=size, mode="nearest")[0, 0]
            preds.append(SegGptPrediction(mask=(labels[i] == 1).cpu(), foreground=fg.cpu()))
        return preds


def _label_map(mask: ArrayLike, image: Image.Image, index: int) -> np.ndarray:
    """A binary H x W mask → a uint8 label map (0 background, 1 foreground) for the processor."""
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise PromptError(f"reference mask {index}: expected H x W, got shape {arr.shape}")
    if arr.shape != (image.height, image.width):
        raise PromptError(
            f"reference mask {index}: size {arr.shape[1]} x {arr.shape[0]} (W x H) does not "
            f"match its image, {image.width} x {image.height}"
        )
    binary = arr.dtype == np.bool_ or (
        np.issubdtype(arr.dtype, np.number) and bool(np.isin(arr, (0, 1)).all())
    )
    if not binary:
        raise PromptError(f"reference mask {index}: expected a bool or 0/1 mask")
    return arr.astype(np.uint8)


CATALOGUE = HubCatalogue(ARCHS)


def _random_init(arch: str) -> nn.Module:
    import transformers as tf

    return random_init(
        f"seggpt:{arch}",
        lambda: tf.SegGptConfig(**ARCHS[arch].config),
        tf.SegGptForImageSegmentation,
    )


def _pretrained(arch: str, weights: str) -> nn.Module:
    import transformers as tf

    return load_pretrained(
        f"seggpt:{arch}",
        weights,
        model_cls=tf.SegGptForImageSegmentation,
        model_type=MODEL_TYPE,
        tags=CATALOGUE.list_tags(arch),
    )


def build_seggpt(arch: str, weights: str, device: torch.device) -> SegGptBackbone:
    model = CATALOGUE.model("seggpt", arch, weights, random=_random_init, pretrained=_pretrained)
    backbone = SegGptBackbone(model=model.eval(), name=f"seggpt:{arch}", weights=weights)
    return backbone.to(device)


SEGGPT_FAMILY = CATALOGUE.family(
    "seggpt",
    "in-context segmentation from example image/mask pairs (SegGPT, transformers)",
    build=build_seggpt,
    tiny=TINY_ARCHS,
)
