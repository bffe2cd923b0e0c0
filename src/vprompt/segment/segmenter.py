"""Promptable segmentation on one image: embed once, decode many prompts.

:class:`Segmenter` wraps a frozen :class:`~vprompt.backbones.sam.SamBackbone` with the
embedding cache and the mask post-processing SAM's processors apply (upsample the low-res
logits, drop the padding, resize to the original image, threshold at 0). Objects of a
:class:`~vprompt.prompts.spatial.PromptSet` are decoded in as few decoder calls as possible
(one per group of same-shaped prompts); the result equals decoding each object alone.

Iterative refinement: feed an object's previous low-res logits back with
``ObjectPrompt(points=..., logits=result.prompt_logits(i))``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from PIL import Image

from vprompt.backbones.registry import load_backbone
from vprompt.backbones.sam import SamBackbone
from vprompt.data.images import DEFAULT_MAX_PIXELS, open_rgb
from vprompt.errors import ConfigError, PromptError
from vprompt.prompts.resize import MaskPostprocess
from vprompt.prompts.spatial import MaskLogits, ObjectPrompt, PromptSet
from vprompt.segment.cache import EmbeddingCache, image_key
from vprompt.segment.incontext import SegmenterOptions
from vprompt.utils.precision import precision_autocast, resolve_precision

MASK_THRESHOLD = 0.0
STABILITY_OFFSET = 1.0  # SAM's automatic mask generator default
_CHUNK = 8  # objects upsampled at once: bounds the full-resolution float buffer


@dataclass(frozen=True, eq=False)
class ImageEmbedding:
    """One image's embeddings, ready for any number of decodes.

    Attributes:
        key: Content hash (the cache key).
        image_size: Original ``(W, H)``.
        parts: Named embedding tensors, batch of one (see ``SamBackbone.embed``).
    """

    key: str
    image_size: tuple[int, int]
    parts: dict[str, torch.Tensor]


@dataclass(frozen=True, eq=False)
class Segmentation:
    """Decoded masks for N objects with K candidates each.

    Attributes:
        masks: N x K x H x W bool masks of the original image.
        logits: N x K x L x L float32 low-res logits (the refinement input).
        iou: N x K predicted IoU.
        stability: N x K stability scores (IoU of the mask thresholded at ±1 around 0).
    """

    masks: NDArray[np.bool_]
    logits: NDArray[np.float32]
    iou: NDArray[np.float32]
    stability: NDArray[np.float32]

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    @property
    def best_index(self) -> NDArray[np.int64]:
        """N: the candidate with the highest predicted IoU per object."""
        return np.asarray(self.iou.argmax(axis=1), dtype=np.int64)

    def best(self) -> Segmentation:
        """The highest-IoU candidate per object (K = 1)."""
        rows = np.arange(len(self))
        k = self.best_index
        return Segmentation(
            masks=self.masks[rows, k][:, None],
            logits=self.logits[rows, k][:, None],
            iou=self.iou[rows, k][:, None],
            stability=self.stability[rows, k][:, None],
        )

    def mask(self, i: int) -> NDArray[np.bool_]:
        """Object ``i``'s best mask (H x W)."""
        return self.masks[i, int(self.best_index[i])]

    def prompt_logits(self, i: int) -> MaskLogits:
        """Object ``i``'s best low-res logits, to feed back as its next mask input."""
        return MaskLogits(self.logits[i, int(self.best_index[i])])


def stability_score(
    logits: torch.Tensor, *, threshold: float = MASK_THRESHOLD, offset: float = STABILITY_OFFSET
) -> torch.Tensor:
    """IoU between the masks at ``threshold + offset`` and ``threshold - offset`` (... x H x W).

    A mask whose area barely moves when the threshold shifts is stable. Empty at both
    thresholds scores 0.
    """
    inter = (logits > threshold + offset).sum(dim=(-1, -2), dtype=torch.int32)
    union = (logits > threshold - offset).sum(dim=(-1, -2), dtype=torch.int32)
    return _stability_ratio(inter, union)


def _stability_ratio(inter: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    """int32 pixel counts → :func:`stability_score`."""
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter.float()))


def _masks_and_stability(
    full: NDArray[np.float32], masks: NDArray[np.bool_]
) -> NDArray[np.float32]:
    """Threshold N x K x H x W CPU logits into ``masks`` (same shape) and return their
    stability scores, equal to :func:`stability_score`'s.

    numpy's whole-array ``count_nonzero`` counts a bool plane several times faster than a
    reduction over two axes (torch's or numpy's).
    """
    np.greater(full, MASK_THRESHOLD, out=masks)
    n, k = full.shape[:2]
    counts = np.zeros((2, n, k), dtype=np.int32)
    for i in range(n):
        for j in range(k):
            plane = full[i, j]
            counts[0, i, j] = np.count_nonzero(plane > MASK_THRESHOLD + STABILITY_OFFSET)
            counts[1, i, j] = np.count_nonzero(plane > MASK_THRESHOLD - STABILITY_OFFSET)
    ratio = _stability_ratio(torch.from_numpy(counts[0]), torch.from_numpy(counts[1]))
    return np.asarray(ratio.numpy(), dtype=np.float32)


def lone_click(obj: ObjectPrompt) -> bool:
    """Whether an object is prompted by exactly one click and nothing else."""
    return len(obj.points) == 1 and obj.box is None and not obj.has_mask_input


def upsample_logits(logits: torch.Tensor, plan: MaskPostprocess) -> torch.Tensor:
    """N x K x L x L low-res logits → N x K x H x W logits of the original image.

    SAM / SAM-HQ: bilinear to the padded square, crop the resized image, bilinear to the
    original. SAM 2 / EdgeTAM (``plan.direct``): bilinear straight to the original.
    """
    if plan.direct:
        return F.interpolate(logits, plan.original, mode="bilinear", align_corners=False)
    (lh, lw), (ph, pw) = logits.shape[-2:], plan.padded
    if ph % lh == 0 and pw % lw == 0:
        # Only the cropped part of the padded square: given the padded square's scale, the
        # kernel samples every kept pixel exactly as the full-size resize does.
        up = torch.ops.aten.upsample_bilinear2d.default(
            logits, list(plan.crop), False, float(ph // lh), float(pw // lw)
        )
    else:
        up = F.interpolate(logits, plan.padded, mode="bilinear", align_corners=False)
        up = up[..., : plan.crop[0], : plan.crop[1]]
    if tuple(plan.crop) == tuple(plan.original):
        return up  # a bilinear resize to the same size is the identity
    return F.interpolate(up, plan.original, mode="bilinear", align_corners=False)


class Segmenter:
    """Segment objects in images with a frozen SAM-family backbone.

    Args:
        backbone: The frozen segmenter.
        cache: Embedding cache; a private in-memory one by default.
        precision: ``auto`` (bf16 autocast on CUDA, fp32 elsewhere), ``bf16`` or ``fp32``.
        max_pixels: Largest image (in pixels) accepted from files.
        decoder: What decodes prompts (``decode`` with :meth:`SamBackbone.decode`'s
            contract): the backbone itself by default, or an
            :class:`~vprompt.segment.onnx_runtime.OnnxSamDecoder`.
    """

    def __init__(
        self,
        backbone: SamBackbone,
        *,
        cache: EmbeddingCache | None = None,
        precision: str = "auto",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        decoder: Any | None = None,
    ) -> None:
        self.backbone = backbone
        self.decoder: Any = decoder if decoder is not None else backbone
        self.cache = cache if cache is not None else EmbeddingCache()
        self.precision = resolve_precision(precision, backbone.device)
        self.max_pixels = max_pixels
        self.encodes = 0  # encoder runs, for tests and benchmarks

    @classmethod
    def load(
        cls,
        name: str = "sam:vit-base",
        weights: str | None = None,
        *,
        device: str | torch.device | None = "auto",
        **kwargs: Any,
    ) -> Segmenter:
        """Build a segmenter from a ``sam:ARCH`` name and a weight source."""
        backbone = load_backbone(name, weights, device=device)
        if not isinstance(backbone, SamBackbone):
            raise ConfigError(f"{name} is not a promptable segmenter (expected a sam:* model)")
        return cls(backbone, **kwargs)

    @classmethod
    def from_options(cls, options: SegmenterOptions, *, default: str = "sam:vit-base") -> Segmenter:
        """Build from :class:`~vprompt.segment.incontext.SegmenterOptions` (the CLI's and the
        in-context methods' shared model options), with ``default`` when they name no model."""
        return cls.load(
            options.model or default,
            options.weights,
            device=options.device,
            cache=EmbeddingCache(disk_dir=options.embedding_cache),
            precision=options.precision,
            max_pixels=options.max_pixels,
        )

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return precision_autocast(self.precision, self.backbone.device)

    def open_image(self, image: Image.Image | str | Path) -> Image.Image:
        """An RGB image from a PIL image or a file (size-limited by ``max_pixels``)."""
        return open_rgb(image, max_pixels=self.max_pixels)

    def embed_image(self, image: Image.Image | str | Path) -> ImageEmbedding:
        """The image's embedding, from the cache when this content was embedded before."""
        rgb = self.open_image(image)
        model_id = f"{self.backbone.name}|{self.backbone.fingerprint()}|{self.precision}"
        key = image_key(rgb, model_id=model_id)
        device = self.backbone.device
        parts = self.cache.get(key, device)
        if parts is None:
            pixels = self.backbone.preprocess([rgb])
            with self._autocast():
                parts = self.backbone.embed(pixels)
            self.encodes += 1
            self.cache.put(key, parts)
        return ImageEmbedding(key=key, image_size=rgb.size, parts=parts)

    def decode(
        self,
        image: ImageEmbedding | Image.Image | str | Path,
        prompts: PromptSet,
        *,
        multimask: bool | Literal["auto"] = True,
        best_only: bool = False,
        attention_similarity: torch.Tensor | None = None,
        target_embedding: torch.Tensor | None = None,
    ) -> Segmentation:
        """Masks for every object of ``prompts``, in their order.

        Args:
            image: An embedding from :meth:`embed_image`, or an image (embedded via the cache).
            prompts: Objects of this image, validated against its size.
            multimask: Three candidates per object (pick with :meth:`Segmentation.best`); with
                False the decoder's single-mask output is returned (K = 1). ``"auto"``: three
                candidates, best kept, only for objects prompted by one click (ambiguous:
                part / object / whole, as SAM advises), the single-mask output for the rest;
                it implies ``best_only``.
            best_only: Keep only the highest-IoU candidate per object (K = 1) and upsample
                only that one: the same as ``decode(...).best()``, at a third of the
                post-processing cost.
            attention_similarity: PerSAM's target-guided attention bias, passed to the decoder
                for every object (see ``SamBackbone.decode``).
            target_embedding: PerSAM's target-semantic prompt, passed likewise.
        """
        emb = image if isinstance(image, ImageEmbedding) else self.embed_image(image)
        if tuple(prompts.image_size) != tuple(emb.image_size):
            raise PromptError(
                f"prompts were made for an image of size {prompts.image_size}, but the image is "
                f"{emb.image_size} (W, H)"
            )
        frame = self.backbone.frame
        plan = frame.postprocess_sizes(emb.image_size)
        if multimask == "auto":
            best_only = True
        elif not isinstance(multimask, bool):
            raise ConfigError(f"multimask: expected True, False or 'auto', got {multimask!r}")
        n, k = len(prompts), 3 if multimask is True and not best_only else 1
        h, w = plan.original
        out_masks = np.zeros((n, k, h, w), dtype=bool)
        out_logits = np.zeros((n, k, *plan.low_res), dtype=np.float32)
        out_iou = np.zeros((n, k), dtype=np.float32)
        out_stab = np.zeros((n, k), dtype=np.float32)
        for group in prompts.groups():
            arrays = group.prompts.to_arrays(frame)
            # A group shares the number of points and whether it has a box or mask input,
            # so the "auto" rule is the same for all its objects.
            group_multi = (
                lone_click(group.prompts.objects[0]) if multimask == "auto" else bool(multimask)
            )
            with self._autocast():
                logits, iou = self.decoder.decode(
                    emb.parts,
                    arrays,
                    multimask=group_multi,
                    attention_similarity=attention_similarity,
                    target_embedding=target_embedding,
                )
            if best_only and logits.shape[1] > 1:
                rows_t = torch.arange(logits.shape[0], device=logits.device)
                pick = iou.argmax(dim=1)
                logits, iou = logits[rows_t, pick][:, None], iou[rows_t, pick][:, None]
            idx = np.asarray(group.indices)
            out_logits[idx] = logits.cpu().numpy()
            out_iou[idx] = iou.cpu().numpy()
            for start in range(0, len(idx), _CHUNK):
                rows = idx[start : start + _CHUNK]
                full = upsample_logits(logits[start : start + _CHUNK], plan)
                if full.device.type == "cpu" and full.dtype == torch.float32:
                    chunk = full.detach().contiguous().numpy()
                    if np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):  # in place
                        span = slice(int(rows[0]), int(rows[-1]) + 1)
                        out_stab[span] = _masks_and_stability(chunk, out_masks[span])
                    else:
                        masks = np.empty(chunk.shape, dtype=bool)
                        out_stab[rows] = _masks_and_stability(chunk, masks)
                        out_masks[rows] = masks
                    continue
                out_masks[rows] = (full > MASK_THRESHOLD).cpu().numpy()
                out_stab[rows] = stability_score(full).cpu().numpy()
        return Segmentation(masks=out_masks, logits=out_logits, iou=out_iou, stability=out_stab)

    def segment(
        self,
        image: Image.Image | str | Path,
        prompts: PromptSet,
        *,
        multimask: bool | Literal["auto"] = True,
    ) -> Segmentation:
        """:meth:`embed_image` then :meth:`decode`."""
        return self.decode(self.embed_image(image), prompts, multimask=multimask)
