"""PerSAM and PerSAM-F: segment one personal concept in new images from one reference mask.

Zhang et al., "Personalize Segment Anything Model with One Shot" (ICLR 2024). The segmenter
stays frozen; everything below is built from its image embeddings and its decoder.

**Target feature.** A reference mask is brought onto the embedding grid (h x w) through the
model frame (:mod:`vprompt.prompts.resize`): each grid cell gets the exact fraction of its
area the mask covers once the image is resized into the frame, so SAM's padding (cells below
or right of the resized image) gets zero and SAM 2's stretch is followed exactly. The target
embedding is the coverage-weighted mean of the reference features (the plain masked mean when
the mask covers whole cells); the target feature is that mean, L2-normalised. With several
references (the same concept in several images) the target feature is the L2-normalised mean
of their target features and the target embedding the mean of their target embeddings.

**PerSAM (training-free).** The cosine similarity of the target feature with every normalised
embedding location (h x w) is upsampled to the original size as mask logits are (bilinear to
the low-res side, then :func:`upsample_logits`). Location prior: a positive point at its
maximum, a negative one at its minimum, sent as the reference sends them (the pixel's integer
``(col, row)``; SAM adds its own half pixel). Target-guided attention: the grid similarity
standardised by the mean and std of the full-size map, through a sigmoid, applied in every
token-to-image attention of the decoder (1 x 1 x 1 x hw; the reference code resizes the
full-size map onto the whole grid instead, which misaligns it with SAM's padding on non-square
images). Target-semantic prompt: the target embedding added to the decoder's tokens before
every block and to the final attention's query (1 x 1 x 1 x C). Both are computed inside the
decoder as the reference's modified transformer computes them (the bias added *after* the
softmax, then a second softmax): :mod:`vprompt.backbones.sam_guidance`. First decode: the two
points, single mask. Cascaded post-refinement (paper and code): (1) points + the best low-res
logits, (2) the same + the box ``(x_min, y_min, x_max, y_max)`` of the current mask's pixels;
both multimask, keeping the highest predicted IoU.

**PerSAM-F.** Two weights mix the decoder's three multimask candidates:
``w1 * M1 + w2 * M2 + (1 - w1 - w2) * M3`` (``w1 = w2 = 1/3`` at the start). They are learned
on the reference image(s) with dice + sigmoid focal loss against the reference mask on the
candidates' logits upsampled to the original size (AdamW, lr 1e-3, eps 1e-4, cosine schedule,
1000 steps, as the reference code). At test time the candidates of the first decode are mixed
with the learned weights, and both refinements take the box of the current mask. As in the
reference code the location prior is the positive point only and neither guidance is used;
:class:`PerSAMFConfig` can turn both back on. (The reference code's PerSAM-F also blends in the
max of the masked features; here one target feature definition serves both methods.) Training
costs steps x reference pixels: well under a second on a GPU, about 2.5 ms per step for a
300 x 200 reference on one CPU core.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeAlias

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from PIL import Image
from tqdm.auto import tqdm

from vprompt.errors import ConfigError, PromptError
from vprompt.prompts.resize import MaskPostprocess, ResizeLongestSide
from vprompt.prompts.spatial import Box, Mask, MaskLogits, ObjectPrompt, Point, PromptSet
from vprompt.segment.incontext import (
    SEGMENTATION_METHODS,
    SegmenterOptions,
    model_for,
    register_segmentation_method,
)
from vprompt.segment.losses import dice_loss, mask_loss, sigmoid_focal_loss
from vprompt.segment.segmenter import ImageEmbedding, Segmentation, Segmenter, upsample_logits

ImageInput: TypeAlias = ImageEmbedding | Image.Image | str | Path
"""An image, or its embedding from :meth:`Segmenter.embed_image` (which skips the encoder)."""


@dataclass(frozen=True, eq=False)
class ConceptReference:
    """One example of the concept: an image and its H x W mask (bool, 0/1, 0/255 or [0, 1])."""

    image: ImageInput
    mask: NDArray[Any]

    def __post_init__(self) -> None:
        mask = (self.mask if isinstance(self.mask, Mask) else Mask(np.asarray(self.mask))).array
        if not mask.any():
            raise PromptError("reference mask is empty (expected at least one foreground pixel)")
        object.__setattr__(self, "mask", mask)


References: TypeAlias = Sequence[ConceptReference | tuple[ImageInput, Any]]
"""References as :class:`ConceptReference` objects or ``(image, mask)`` pairs."""


@dataclass(frozen=True, eq=False)
class TargetConcept:
    """What the references say about the concept.

    Attributes:
        feature: C, the L2-normalised target feature (for the similarity map).
        embedding: C, the mean target embedding (the target-semantic prompt).
        num_references: How many references were averaged.
    """

    feature: torch.Tensor
    embedding: torch.Tensor
    num_references: int


@dataclass(frozen=True, eq=False)
class PersonalizeResult:
    """The concept found in one image.

    Attributes:
        mask: H x W bool mask of the original image.
        score: The decoder's predicted IoU for the final mask.
        points: The location prior (positive first, then the negative one if used).
        similarity: H x W float32 cosine similarity with the target feature.
    """

    mask: NDArray[np.bool_]
    score: float
    points: tuple[Point, ...]
    similarity: NDArray[np.float32]


def _check_int(name: str, value: int, allowed: range) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        raise ConfigError(f"{name}: expected an int in {allowed}, got {value!r}")


def _fitted(value: Any, name: str) -> Any:
    if value is None:
        raise PromptError(f"{name}: call fit(references) first")
    return value


@dataclass(frozen=True, kw_only=True)
class PerSAMConfig:
    """PerSAM's switches (paper defaults).

    Args:
        negative_point: Add the negative point at the similarity minimum.
        guidance: Use target-guided attention and the target-semantic prompt.
        refinements: Cascaded post-refinement steps (0-2).
    """

    negative_point: bool = True
    guidance: bool = True
    refinements: int = 2

    def __post_init__(self) -> None:
        _check_int("refinements", self.refinements, range(3))


@dataclass(frozen=True, kw_only=True)
class PerSAMFConfig:
    """PerSAM-F's fine-tuning and switches (defaults of the paper's code).

    Args:
        steps: Optimiser steps.
        lr: AdamW learning rate (cosine-annealed to 0 over ``steps``).
        seed: Seed for the training run.
        negative_point: Add the negative point at the similarity minimum.
        guidance: Use target-guided attention and the target-semantic prompt.
        refinements: Cascaded post-refinement steps (0-2).
    """

    steps: int = 1000
    lr: float = 1e-3
    seed: int = 0
    negative_point: bool = False
    guidance: bool = False
    refinements: int = 2

    def __post_init__(self) -> None:
        _check_int("steps", self.steps, range(1, 10**9))
        _check_int("seed", self.seed, range(2**63))
        _check_int("refinements", self.refinements, range(3))
        if not isinstance(self.lr, int | float) or not np.isfinite(self.lr) or self.lr <= 0:
            raise ConfigError(f"lr: expected a finite number > 0, got {self.lr!r}")


def _cell_overlap(pixels: int, pixel_size: float, cells: int, cell_size: float) -> NDArray[Any]:
    """cells x pixels: the fraction of each cell's length covered by each pixel (one axis)."""
    p0 = np.arange(pixels, dtype=np.float64) * pixel_size
    c0 = np.arange(cells, dtype=np.float64) * cell_size
    inter = np.minimum(c0[:, None] + cell_size, p0[None] + pixel_size) - np.maximum(
        c0[:, None], p0[None]
    )
    return np.clip(inter, 0.0, None) / cell_size


def mask_to_grid(
    mask: NDArray[np.bool_], frame: ResizeLongestSide, grid: tuple[int, int]
) -> NDArray[np.float32]:
    """An H x W mask as the covered fraction of each cell of the h x w embedding grid.

    The grid tiles the model's ``target x target`` frame; the image occupies the resized
    ``(w', h')`` top-left part of it (all of it for SAM 2), so padding cells get 0.
    """
    h, w = mask.shape
    new_w, new_h = frame.resized_size(w, h)
    gh, gw = grid
    rows = _cell_overlap(h, new_h / h, gh, frame.target / gh)  # gh x H
    cols = _cell_overlap(w, new_w / w, gw, frame.target / gw)  # gw x W
    out = (rows.astype(np.float32) @ mask.astype(np.float32)) @ cols.T.astype(np.float32)
    return np.asarray(out, dtype=np.float32)


def _unit(x: torch.Tensor, *, dim: int) -> torch.Tensor:
    """L2-normalise along ``dim``; zero vectors stay zero.

    Callers work in float64: features of random-init models can be small enough for their
    squares to underflow in float32.
    """
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True)
    return x / torch.where(norm > 0, norm, torch.ones_like(norm))


def _embed(segmenter: Segmenter, image: ImageInput) -> ImageEmbedding:
    return image if isinstance(image, ImageEmbedding) else segmenter.embed_image(image)


def _as_references(references: References) -> list[ConceptReference]:
    if isinstance(references, ConceptReference):
        references = [references]
    out = []
    for i, ref in enumerate(references):
        if isinstance(ref, ConceptReference):
            out.append(ref)
            continue
        if not isinstance(ref, tuple | list) or len(ref) != 2:
            raise PromptError(
                f"reference {i}: expected a ConceptReference or an (image, mask) pair"
            )
        try:
            out.append(ConceptReference(ref[0], ref[1]))
        except PromptError as exc:
            raise PromptError(f"reference {i}: {exc}") from exc
    if not out:
        raise PromptError("references: expected at least one (image, mask) reference, got none")
    return out


def target_concept(segmenter: Segmenter, references: References) -> TargetConcept:
    """The target feature and embedding of one or more references (see the module notes)."""
    refs = _as_references(references)
    features, embeddings = [], []
    for i, ref in enumerate(refs):
        emb = _embed(segmenter, ref.image)
        w, h = emb.image_size
        if ref.mask.shape != (h, w):
            raise PromptError(
                f"reference {i}: mask has shape {ref.mask.shape}, but its image is {w} x {h} "
                f"(expected (H, W) = {(h, w)})"
            )
        feats = emb.parts["embeddings"][0].double()  # C x h x w
        cover = mask_to_grid(ref.mask, segmenter.backbone.frame, (feats.shape[1], feats.shape[2]))
        weights = torch.from_numpy(cover).to(feats.device, torch.float64)
        total = weights.sum()
        if float(total) <= 0:
            raise PromptError(f"reference {i}: the mask covers no embedding cell")
        mean = (feats * weights).sum(dim=(1, 2)) / total  # C
        embeddings.append(mean)
        features.append(_unit(mean, dim=0))
    return TargetConcept(
        feature=_unit(torch.stack(features).mean(0), dim=0).float(),
        embedding=torch.stack(embeddings).mean(0).float(),
        num_references=len(refs),
    )


@dataclass(frozen=True, eq=False)
class _Prior:
    """One image's location prior and guidance."""

    embedding: ImageEmbedding
    plan: MaskPostprocess
    similarity: NDArray[np.float32]  # H x W
    points: tuple[Point, ...]
    attention: torch.Tensor | None  # 1 x 1 x 1 x hw
    target: torch.Tensor | None  # 1 x 1 x 1 x C

    def prompts(self, box: Box | None = None, logits: MaskLogits | None = None) -> PromptSet:
        obj = ObjectPrompt(points=self.points, boxes=() if box is None else (box,), logits=logits)
        return PromptSet([obj], image_size=self.embedding.image_size)

    def decode(self, segmenter: Segmenter, *, multimask: bool) -> Segmentation:
        """The first decode: the location prior plus the guidance (when used)."""
        return segmenter.decode(
            self.embedding,
            self.prompts(),
            multimask=multimask,
            attention_similarity=self.attention,
            target_embedding=self.target,
        )


def _pixel_point(index: int, width: int, *, positive: bool) -> Point:
    """The reference's ``point_selection``: a flat index of the similarity map becomes the
    integer ``(col, row)`` it sends to SAM (which adds its own half-pixel shift)."""
    row, col = divmod(index, width)
    return Point(float(col), float(row), positive=positive)


def _locate(
    segmenter: Segmenter,
    concept: TargetConcept,
    image: ImageInput,
    config: PerSAMConfig | PerSAMFConfig,
) -> _Prior:
    emb = _embed(segmenter, image)
    frame = segmenter.backbone.frame
    plan = frame.postprocess_sizes(emb.image_size)
    feats = _unit(emb.parts["embeddings"][0].double(), dim=0)  # C x h x w
    c, gh, gw = feats.shape
    feature = concept.feature.to(feats.device, torch.float64)
    grid = (feature @ feats.reshape(c, gh * gw)).reshape(gh, gw).float()  # cosine, h x w
    low = F.interpolate(grid[None, None], plan.low_res, mode="bilinear", align_corners=False)
    full = upsample_logits(low, plan)[0, 0]  # H x W
    sim = full.cpu().numpy().astype(np.float32)
    width = sim.shape[1]
    points = [_pixel_point(int(np.argmax(sim)), width, positive=True)]
    if config.negative_point:
        points.append(_pixel_point(int(np.argmin(sim)), width, positive=False))
    attention = target = None
    if config.guidance:
        std = full.std()
        scale = std if torch.isfinite(std) and std > 0 else torch.ones_like(std)
        attention = torch.sigmoid((grid - full.mean()) / scale).reshape(1, 1, 1, gh * gw)
        target = concept.embedding.to(feats.device).reshape(1, 1, 1, c)
    return _Prior(emb, plan, sim, tuple(points), attention, target)


def _mask_box(mask: NDArray[np.bool_]) -> Box | None:
    """The reference's refinement box: ``(x_min, y_min, x_max, y_max)`` of the mask's pixel
    indices, inclusive. None for an empty mask, and for a mask one pixel wide or tall (the
    reference would send that zero-area box; a :class:`Box` is never empty, so the refinement
    step then goes on without one, which the README lists)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0 or rows[0] == rows[-1] or cols[0] == cols[-1]:
        return None
    return Box(float(cols[0]), float(rows[0]), float(cols[-1]), float(rows[-1]))


def _refine(
    segmenter: Segmenter,
    prior: _Prior,
    start: tuple[NDArray[np.float32], NDArray[np.bool_], float],
    boxes: Sequence[bool],
) -> PersonalizeResult:
    """Cascaded post-refinement from ``(low-res logits, mask, score)``: one multimask decode
    per step, fed the previous best logits (and the current mask's box where asked)."""
    logits, mask, score = start
    for use_box in boxes:
        box = _mask_box(mask) if use_box else None
        out = segmenter.decode(
            prior.embedding, prior.prompts(box, MaskLogits(logits)), multimask=True
        )
        k = int(out.best_index[0])
        logits, mask, score = out.logits[0, k], out.masks[0, k], float(out.iou[0, k])
    return PersonalizeResult(
        mask=mask, score=score, points=prior.points, similarity=prior.similarity
    )


def _mix(weights: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """2 learned weights → the 3 mixing weights ``(w1, w2, 1 - w1 - w2)`` applied to K=3 maps."""
    full = torch.cat([weights, 1 - weights.sum(0, keepdim=True)])
    return torch.einsum("k,k...->...", full, candidates)


class _SamMethod:
    """What PerSAM and PerSAM-F share as registered in-context segmentation methods."""

    name: ClassVar[str]
    family: ClassVar[str] = "sam"
    default_model: ClassVar[str] = "sam:vit-base"
    tiny_model: ClassVar[str] = "sam:tiny"
    config_class: ClassVar[type]

    def __init__(self, segmenter: Segmenter, *, config: Any = None) -> None:
        if config is not None and not isinstance(config, self.config_class):
            raise ConfigError(
                f"{self.name}: expected a {self.config_class.__name__}, got {type(config).__name__}"
            )
        self.segmenter = segmenter
        self.config = config or self.config_class()
        self._concept: TargetConcept | None = None

    @classmethod
    def load(cls, options: SegmenterOptions, config: Any = None) -> Any:
        """The method on the SAM-family segmenter ``options`` name (default ``sam:vit-base``)."""
        return cls(Segmenter.from_options(options, default=model_for(cls, options)), config=config)

    @property
    def concept(self) -> TargetConcept:
        return _fitted(self._concept, self.name)

    predict: Callable[[ImageInput], PersonalizeResult]  # each method's own

    def predict_many(self, images: Sequence[ImageInput]) -> list[PersonalizeResult]:
        """:meth:`predict` for each image, in order."""
        return [self.predict(image) for image in images]


@register_segmentation_method("persam")
class PerSAM(_SamMethod):
    """Training-free personalisation.

    Args:
        segmenter: The frozen segmenter.
        config: Switches; the paper's defaults when omitted.
    """

    config_class: ClassVar[type] = PerSAMConfig
    config: PerSAMConfig

    def fit(self, references: References) -> PerSAM:
        """Compute the target concept of the references."""
        self._concept = target_concept(self.segmenter, references)
        return self

    def predict(self, image: ImageInput) -> PersonalizeResult:
        """Find the concept in ``image``."""
        prior = _locate(self.segmenter, self.concept, image, self.config)
        first = prior.decode(self.segmenter, multimask=False)
        start = (first.logits[0, 0], first.masks[0, 0], float(first.iou[0, 0]))
        return _refine(self.segmenter, prior, start, (False, True)[: self.config.refinements])


@register_segmentation_method("persam-f")
class PerSAMF(_SamMethod):
    """PerSAM-F: two learned weights mixing SAM's three candidate masks.

    Args:
        segmenter: The frozen segmenter (never modified; only the two weights are trained).
        config: Training settings and switches; the reference code's defaults when omitted.

    Attributes:
        losses: The training loss of each step of the last :meth:`fit`.
    """

    config_class: ClassVar[type] = PerSAMFConfig
    config: PerSAMFConfig

    def __init__(self, segmenter: Segmenter, *, config: PerSAMFConfig | None = None) -> None:
        super().__init__(segmenter, config=config)
        self._weights: torch.Tensor | None = None  # 2
        self.losses: list[float] = []

    @property
    def weights(self) -> NDArray[np.float32]:
        """The 3 mixing weights ``(w1, w2, 1 - w1 - w2)`` of candidates 1, 2, 3."""
        w = _fitted(self._weights, self.name).cpu().numpy().astype(np.float32)
        return np.concatenate([w, [1 - w.sum()]]).astype(np.float32)

    def fit(self, references: References) -> PerSAMF:
        """Compute the target concept, then learn the weights on the references (loss averaged).

        Each reference is decoded with its own location prior; its three candidates' logits,
        upsampled to its original size, are constants, so only the 2 weights get gradients.
        """
        refs = _as_references(references)
        self._concept = target_concept(self.segmenter, refs)
        device = self.segmenter.backbone.device
        candidates, targets = [], []
        for ref in refs:
            prior = _locate(self.segmenter, self._concept, ref.image, self.config)
            out = prior.decode(self.segmenter, multimask=True)
            low = torch.from_numpy(out.logits[0]).to(device)  # 3 x L x L
            candidates.append(upsample_logits(low[None], prior.plan)[0])  # 3 x H x W
            targets.append(torch.tensor(ref.mask, dtype=torch.float32, device=device))
        self._weights, self.losses = self._train(candidates, targets, device)
        return self

    def _train(
        self, candidates: list[torch.Tensor], targets: list[torch.Tensor], device: torch.device
    ) -> tuple[torch.Tensor, list[float]]:
        cfg = self.config
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.manual_seed(cfg.seed)
            weights = torch.nn.Parameter(torch.full((2,), 1 / 3, device=device))
            opt = torch.optim.AdamW([weights], lr=cfg.lr, eps=1e-4)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
            history = torch.empty(cfg.steps, device=device)
            pairs = list(zip(candidates, targets, strict=True))
            # 1,000 steps take a while on a CPU: a bar on a terminal (none when piped).
            steps = tqdm(range(cfg.steps), desc=f"{self.name}: learning the mask weights",
                         unit="step", leave=False, file=sys.stderr, disable=None)  # fmt: skip
            for step in steps:
                loss = torch.stack([mask_loss(_mix(weights, c), t) for c, t in pairs]).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                history[step] = loss.detach()
        return weights.detach(), history.cpu().tolist()

    def predict(self, image: ImageInput) -> PersonalizeResult:
        """Find the concept in ``image``: mixed candidates, then the cascaded refinement."""
        mix = self.weights
        prior = _locate(self.segmenter, self.concept, image, self.config)
        out = prior.decode(self.segmenter, multimask=True)
        low = np.tensordot(mix, out.logits[0], axes=1).astype(np.float32)  # L x L
        full = upsample_logits(torch.from_numpy(low)[None, None], prior.plan)[0, 0]
        start = (low, (full > 0).numpy(), float(mix @ out.iou[0]))
        return _refine(self.segmenter, prior, start, (True, True)[: self.config.refinements])


def personalize(
    segmenter: Segmenter,
    references: References,
    targets: Sequence[ImageInput] | ImageInput,
    *,
    method: str = "persam",
    config: PerSAMConfig | PerSAMFConfig | None = None,
) -> list[PersonalizeResult]:
    """Fit ``method`` (``persam`` or ``persam-f``) on the references; one result per target."""
    cls = SEGMENTATION_METHODS.get(method)
    if cls.family != "sam":
        raise ConfigError(
            f"{method} runs on {cls.family}:* models, not on a SAM segmenter; "
            f"use vprompt.segment.load_method({method!r}, ...)"
        )
    model = cls(segmenter, config=config).fit(references)
    if isinstance(targets, ImageEmbedding | Image.Image | str | Path):
        targets = [targets]
    return list(model.predict_many(targets))


__all__ = [
    "ConceptReference",
    "PerSAM",
    "PerSAMConfig",
    "PerSAMF",
    "PerSAMFConfig",
    "PersonalizeResult",
    "TargetConcept",
    "dice_loss",
    "mask_to_grid",
    "personalize",
    "sigmoid_focal_loss",
    "target_concept",
]
