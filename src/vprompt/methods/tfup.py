"""TFUP and TFUP-T: training-free unsupervised prompts for CLIP (Long et al., "Training-Free
Unsupervised Prompt for Vision-Language Models", arXiv 2404.16339).

Neither method reads a training label: the training images are unlabelled data of the target
classes and every label comes from zero-shot CLIP (pseudo-labels). Both declare it
(``uses_labels=False``: ``vprompt train --unlabeled DIR``); the tests check that true labels
change nothing.

**Representative samples** (``setup``). Per class c, with p = softmax(10 · f Wᵀ) the zero-shot
probabilities of every unit training feature f (W: unit class text features):

1. *instance confidence*: the ``candidate_factor`` x k images with the highest p(c);
2. *prototype score*: for each candidate j, Σₖ KL(pⱼ ‖ pₖ) over the candidates k; the k lowest
   (the candidates nearest the class's prototype) are kept, pseudo-labelled c.

k = clamp(int(N · ``cache_proportion`` / C), 9, 16) for the cache (N images, C classes).

**Feature Cache Model**: keys are the kept images' unit features (K, M x D), values their
one-hot pseudo-labels (V, M x C).

**Multi-level Similarity Measure** for a unit test feature f::

    KLₘ    = KL(softmax(10 · f Wᵀ) ‖ softmax(10 · Kₘ Wᵀ))        semantic level, per key m
    simₘ   = 2 · (1 − (KLₘ − min KL) / (max KL − min KL))          in [0, 2], per test image
    cache  = exp(−β (1 − (f Kᵀ) ⊙ sim)) V                          feature level ⊙ semantic
    logits = 100 · f Wᵀ + α · cache                                α = 0.3, β = 1, no search

**TFUP-T** (``tfup-t``) adds a residual image adapter (D → D/4 → D, no biases, ReLU after
each layer; f' = normalise(0.2 · A(f) + 0.8 · f) on the raw feature) and a residual on the class
text features (W' = normalise(0.5 · W̃ + 0.5 · R), W̃ the raw mean template embedding, R
learned, zeros at first). Its epochs come in two stages:

* the first ``stage_one_epochs`` (5): cross-entropy of 100 · f' W'ᵀ on an augmented view of
  the *refined set* — k = max(9, int(N · ``training_proportion`` / C)) images per class chosen
  as above, labelled by TFUP's prediction (an image chosen for several classes counts as often
  as it is chosen);
* then, on every image: pseudo-labels from TFUP's logits of the plain ("weak") view through
  the adapters (f', W', the cache), kept where their softmax exceeds 0.9, supervise the
  augmented ("strong") view's 100 · f'_s W'ᵀ by cross-entropy; plus 0.3 x the negative entropy
  of the batch's mean prediction (the marginal-distribution entropy loss).

Training items are (plain, augmented) pairs: ``encode_images`` returns both features side by
side (B x 2D; the plain one twice at evaluation). TFUP-T predicts with 100 · f' W'ᵀ (the
reference's inference, without the cache). AdamW (lr 0.012, eps 0.003, weight decay 0.1),
batch 256, 30 epochs, cosine per iteration.

Reference: github.com/wlb12345/TFUP (``main.py``: ``TFUP``, ``TFUP_T``, ``inference_TFUP_T``,
the shot counts; ``utils.py``: ``refine_few_shots_without_label``, ``get_sim_based_kl``,
``marginal_loss``, ``TextAdapter``, ``Adapter``; ``configs/*.yaml``). Deliberate differences
(README): class text features from the run's templates (the reference averages GPT-3.5
descriptions it ships only for its domain-adaptation datasets); float32 throughout (the
reference runs fp16); when all KL values of a test image are equal (one cached image) every
similarity is 2 where the reference divides by zero; stage one sees the refined images inside
full epochs of the training set (the others contribute no loss) rather than epochs of the
refined set alone; the cosine schedule ends at the last step (the reference's runs past its
period); the kept epoch is chosen on validation data or is the last (the reference keeps the
best test accuracy); augmented views come from the feature cache's ``feature_views``.

Per-dataset settings: the reference's configs differ only on its domain-adaptation datasets
(Office-31: lr 0.05 and ``training_proportion`` 0.5, 0.75 on its amazon domain; VisDA-2017:
``training_proportion`` 0.5 and the single template ``"a photo of a {}."`` instead of GPT-3.5
descriptions; Office-Home and DomainNet: the defaults). None of them is a benchmark dataset of
the suite, so neither method declares ``reference_settings``: those settings are TFUP-T's presets
(``tfup-t/unsupervised``, ``-office31``, ``-visda17``). TFUP's own values (α, β,
``cache_proportion``) are the same in every config.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vprompt.errors import ConfigError
from vprompt.methods.base import (
    Capabilities,
    MethodData,
    MethodExample,
    MethodOutput,
    PromptMethod,
)
from vprompt.methods.clip_common import clip_train_transform, require_image_text
from vprompt.methods.config import OptimConfig
from vprompt.methods.registry import register_method

_MAX_INT = 10_000  # bound of every integer field (shots, epochs, factors)


def _check_int(name: str, value: Any, low: int, high: int = _MAX_INT) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def _check_number(name: str, value: Any, low: float, high: float | None = None) -> None:
    ok = not isinstance(value, bool) and isinstance(value, int | float)
    if not ok or not low <= value or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"{name} must be a number in {bound}, got {value!r}")


@dataclass(frozen=True)
class TFUPConfig:
    """TFUP's settings; defaults are the reference's (``main.py`` ``extend_cfg``, the same in
    every ``configs/*.yaml``).

    Attributes:
        alpha: α, weight of the cache logits (``TRAINER.TFUP.alpha``).
        beta: β, sharpness of the cache affinities (``TRAINER.TFUP.beta``).
        cache_proportion: Cached images per class as a share of N / C (``cache_proportion``).
        min_cache_shots / max_cache_shots: The clamp of the cache's images per class
            (``max(9, …)``, ``min(16, …)`` in ``main.py``).
        candidate_factor: Candidates per class by confidence, per kept image (the ``2`` of
            ``after_shots*2``).
        prob_scale: Scale of the probabilities behind the selection and the semantic
            similarity (the ``10.`` of ``refine_few_shots_without_label`` / ``get_sim_based_kl``).
        logit_scale: Scale of the zero-shot logits (the reference's ``100.``).
        templates: Templates of the class text features (averaged raw embeddings).
    """

    alpha: float = 0.3
    beta: float = 1.0
    cache_proportion: float = 0.3
    min_cache_shots: int = 9
    max_cache_shots: int = 16
    candidate_factor: int = 2
    prob_scale: float = 10.0
    logit_scale: float = 100.0
    templates: tuple[str, ...] = ("a photo of a {}.",)

    def __post_init__(self) -> None:
        _check_number("alpha", self.alpha, 0.0)
        _check_number("beta", self.beta, 0.0)
        _check_number("cache_proportion", self.cache_proportion, 0.0)
        _check_int("min_cache_shots", self.min_cache_shots, 1)
        _check_int("max_cache_shots", self.max_cache_shots, 1)
        if self.min_cache_shots > self.max_cache_shots:
            raise ConfigError(
                f"min_cache_shots ({self.min_cache_shots}) must be <= max_cache_shots "
                f"({self.max_cache_shots})"
            )
        _check_int("candidate_factor", self.candidate_factor, 1, 100)
        for name in ("prob_scale", "logit_scale"):
            value = getattr(self, name)
            _check_number(name, value, 0.0)
            if not value > 0:
                raise ConfigError(f"{name} must be > 0, got {value!r}")
        if isinstance(self.templates, str) or not self.templates:
            raise ConfigError("templates must be a non-empty list of strings")
        for t in self.templates:
            if not isinstance(t, str) or t.count("{}") != 1:
                raise ConfigError(f"template {t!r} must contain exactly one '{{}}'")


def tfup_t_optim() -> OptimConfig:
    """``TFUP_T``: AdamW(lr 0.012 as ``configs/office_home.yaml``, eps 0.003, weight decay
    0.1), cosine per iteration, batch 256, 30 epochs (``OPTIM.MAX_EPOCH``)."""
    return OptimConfig(
        optimizer="adamw", lr=0.012, eps=0.003, weight_decay=0.1, epochs=30, batch_size=256
    )


@dataclass(frozen=True)
class TFUPTConfig(TFUPConfig):
    """TFUP-T's settings: TFUP's plus the adapters and their training.

    Attributes:
        ratio_alpha: Share of the image adapter's output in the adapted feature
            (``ratio_alpha``).
        ratio_beta: Share of the learned residual in the class text features (``ratio_beta``).
        adapter_reduction: Bottleneck reduction of the image adapter (``Adapter(512, 4)``).
        training_proportion: Refined images per class as a share of N / C
            (``training_proportion``).
        min_training_shots: Lower clamp of the refined images per class (``max(9, …)``).
        stage_one_epochs: Epochs on the refined set before the weak/strong stage
            (``OPTIM.WARMUP_EPOCH``).
        confidence: Softmax threshold of the weak view's pseudo-labels (``> 0.9``).
        marginal_weight: Weight of the marginal-distribution entropy loss (``0.3``).
        feature_views: Augmented views cached per training image (the reference draws a
            fresh one every epoch: one per epoch).
        optim: The reference's optimizer and schedule (:func:`tfup_t_optim`).
    """

    ratio_alpha: float = 0.2
    ratio_beta: float = 0.5
    adapter_reduction: int = 4
    training_proportion: float = 0.75
    min_training_shots: int = 9
    stage_one_epochs: int = 5
    confidence: float = 0.9
    marginal_weight: float = 0.3
    feature_views: int = 30
    optim: OptimConfig = field(default_factory=tfup_t_optim)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_number("ratio_alpha", self.ratio_alpha, 0.0, 1.0)
        _check_number("ratio_beta", self.ratio_beta, 0.0, 1.0)
        if self.ratio_beta == 1.0:
            raise ConfigError("ratio_beta must be < 1 (the residual starts at zero)")
        _check_int("adapter_reduction", self.adapter_reduction, 1, 4096)
        _check_number("training_proportion", self.training_proportion, 0.0)
        _check_int("min_training_shots", self.min_training_shots, 1)
        _check_int("stage_one_epochs", self.stage_one_epochs, 0)
        _check_number("confidence", self.confidence, 0.0, 1.0)
        _check_number("marginal_weight", self.marginal_weight, 0.0)
        _check_int("feature_views", self.feature_views, 1, 1000)
        if not isinstance(self.optim, OptimConfig):
            raise ConfigError(f"optim must be an optimizer section, got {self.optim!r}")


# ---------------------------------------------------------------------------- the computations
def shots_per_class(
    images: int, classes: int, proportion: float, low: int, high: int | None
) -> int:
    """``int(N · proportion / C)`` clamped to [low, high] (``main.py``'s shot counts)."""
    shots = max(low, int(images * proportion / classes))
    return shots if high is None else min(high, shots)


def kl_matrix(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """A x C probabilities, B x C log-probabilities → A x B: KL(pₐ ‖ q_b)."""
    log_p = torch.log(p)
    return (p * log_p).sum(dim=1, keepdim=True) - p @ log_q.T


def select_representatives(
    probs: torch.Tensor, shots: int, factor: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, the ``shots`` most prototypical of its ``factor · shots`` most confident
    images. ``probs``: N x C. Returns (indices, their class) in class order; an image may
    appear for several classes."""
    indices, classes = [], []
    for c in range(probs.shape[1]):
        order = torch.sort(probs[:, c], descending=True, stable=True).indices
        cand = order[: factor * shots]
        p = probs[cand]
        score = kl_matrix(p, torch.log(p)).sum(dim=1)  # Σₖ KL(pⱼ ‖ pₖ)
        keep = cand[torch.sort(score, stable=True).indices[:shots]]
        indices.append(keep)
        classes.append(torch.full_like(keep, c))
    return torch.cat(indices), torch.cat(classes)


def semantic_similarity(query_probs: torch.Tensor, key_probs: torch.Tensor) -> torch.Tensor:
    """B x C and M x C probabilities → B x M: 2 · (1 − min-max-scaled KL(query ‖ key)) per
    query (the z-scoring before the min-max scaling changes nothing); 2 where all are equal."""
    kl = kl_matrix(query_probs, torch.log(key_probs))
    low = kl.min(dim=1, keepdim=True).values
    span = kl.max(dim=1, keepdim=True).values - low
    scaled = torch.where(span > 0, (kl - low) / span.clamp_min(1e-30), torch.zeros_like(kl))
    return 2 * (1 - scaled)


def multilevel_cache_logits(
    unit: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor,
    beta: float,
    prob_scale: float,
) -> torch.Tensor:
    """exp(−β(1 − (f Kᵀ) ⊙ sim)) V for unit features f (B x D), unit keys K (M x D), values
    V (M x C) and unit class text features W (C x D)."""
    sim = semantic_similarity(
        F.softmax(prob_scale * unit @ weights.T, dim=1),
        F.softmax(prob_scale * keys @ weights.T, dim=1),
    )
    affinity = (unit @ keys.T) * sim
    return torch.exp(-beta * (1 - affinity)) @ values


def marginal_entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """−H(mean softmax) of a batch (``marginal_loss``: log(p + 1e-6))."""
    mean = F.softmax(logits, dim=1).mean(dim=0)
    return (mean * torch.log(mean + 1e-6)).sum()


@torch.no_grad()
def raw_class_weights(
    backbone: Any, classnames: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """C x D: per class, the mean of its templates' raw (unnormalised) text embeddings, as the
    reference averages its prompts' embeddings (underscores read as spaces)."""
    rows = []
    for name in classnames:
        texts = [t.format(name.replace("_", " ")) for t in templates]
        rows.append(backbone.encode_text(backbone.tokenize(texts)).float().mean(dim=0))
    return torch.stack(rows)


def _features(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Batches → all features (N x D); their labels are never read."""
    feats = [f.float() for f, _ in batches]
    if not feats:
        raise ConfigError("TFUP needs at least one (unlabelled) training image")
    return torch.cat(feats)


# ---------------------------------------------------------------------------- TFUP
@register_method("tfup")
class TFUP(PromptMethod):
    """Training-free: zero-shot CLIP plus a multi-level-similarity cache of pseudo-labelled,
    representative unlabelled training images.

    The pack: ``cache_keys`` (M x D unit features) and ``cache_values`` (M x C one-hot
    pseudo-labels).
    """

    Config = TFUPConfig
    capabilities = Capabilities(
        inputs="image-features",
        trains=False,
        uses_training_data=True,
        retargets=False,  # the cache's values are pseudo-labels over these classes
        template_field="templates",
        uses_labels=False,
    )
    feature_kind = "clip-image-embedding"  # raw, as Tip-Adapter's (shared cache entries)
    data_shaped_state = frozenset({"cache_keys", "cache_values"})
    state_hint = "(the backbone's feature size and the classes must match)"
    cache_keys: torch.Tensor
    cache_values: torch.Tensor
    text_raw: torch.Tensor  # C x D raw mean template embeddings (non-persistent)

    def __init__(self, backbone: Any, classnames: Sequence[str], config: Any = None) -> None:
        super().__init__(backbone, classnames, config)
        clip = require_image_text(backbone, self.name)
        self.dim = int(clip.embed_dim)
        classes = len(self.classnames)
        self.register_buffer("cache_keys", torch.zeros(0, self.dim))
        self.register_buffer("cache_values", torch.zeros(0, classes))
        text = raw_class_weights(clip, self.classnames, self.config.templates)
        self.register_buffer("text_raw", text, persistent=False)
        self.to(next(backbone.parameters()).device)

    @classmethod
    def examples(cls) -> list[MethodExample]:
        return [MethodExample("clip:tiny", {"min_cache_shots": 1, "max_cache_shots": 2})]

    def input_transform(self, train: bool) -> Callable[[Image.Image], torch.Tensor]:
        transform: Callable[[Image.Image], torch.Tensor] = self.backbone.transform
        return transform  # the reference encodes the unlabelled images with the test transform

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W pixels → B x D raw CLIP image embeddings (frozen)."""
        with torch.no_grad():
            return self.backbone.encode_image(pixels).float()

    # ------------------------------------------------------------------ the cache
    def zero_shot_weights(self) -> torch.Tensor:
        """C x D unit class text features of the templates."""
        return F.normalize(self.text_raw, dim=-1)

    def tfup_logits(self, unit: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """B x D unit features → B x C: s · f Wᵀ + α · multi-level cache logits."""
        cfg = self.config
        logits = cfg.logit_scale * unit @ weights.T
        if len(self.cache_keys) == 0:
            return logits
        cache = multilevel_cache_logits(
            unit, self.cache_keys, self.cache_values, weights, cfg.beta, cfg.prob_scale
        )
        return logits + cfg.alpha * cache

    @torch.no_grad()
    def build_cache(self, features: torch.Tensor) -> None:
        """Select, pseudo-label and cache representative images from N x D raw features."""
        cfg = self.config
        unit = F.normalize(features.float().to(self.text_raw.device), dim=-1)
        probs = F.softmax(cfg.prob_scale * unit @ self.zero_shot_weights().T, dim=1)
        shots = shots_per_class(
            len(unit), len(self.classnames), cfg.cache_proportion,
            cfg.min_cache_shots, cfg.max_cache_shots,
        )  # fmt: skip
        index, classes = select_representatives(probs, shots, cfg.candidate_factor)
        self.cache_keys.data = unit[index].clone()
        self.cache_values.data = F.one_hot(classes, len(self.classnames)).float()

    def plain_features(self, data: MethodData) -> torch.Tensor:
        """N x D raw features of the plain view of every training image (labels unread)."""
        return _features(data.train())

    def setup(self, data: MethodData) -> None:
        """Build the Feature Cache Model from the unlabelled training images."""
        self.build_cache(self.plain_features(data))

    def forward_features(self, features: torch.Tensor) -> MethodOutput:
        """B x D raw features → B x C TFUP logits."""
        unit = F.normalize(features.float(), dim=-1)
        return MethodOutput(logits=self.tfup_logits(unit, self.zero_shot_weights()))

    def extra_repr(self) -> str:
        return (
            f"backbone={self.backbone.name}, classes={len(self.classnames)}, "
            f"cache={tuple(self.cache_keys.shape)}"
        )


# ---------------------------------------------------------------------------- TFUP-T
class PlainAndAugmented:
    """PIL image → 2 x 3 x H x W: the plain (weak) view and an augmented (strong) one."""

    def __init__(self, plain: Callable[[Image.Image], torch.Tensor], augmented: Any) -> None:
        self.plain, self.augmented = plain, augmented

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.stack([self.plain(img), self.augmented(img)])


@register_method("tfup-t")
class TFUPT(TFUP):
    """TFUP-T: TFUP's cache plus a residual image adapter and residual class text features,
    trained on pseudo-labels only.

    The pack: TFUP's cache, ``text_residual`` (C x D) and ``image_adapter.*`` weights.
    """

    Config = TFUPTConfig
    capabilities = Capabilities(
        inputs="image-features",
        trains=True,
        uses_training_data=True,
        retargets=False,  # the text residual is per class
        template_field="templates",
        uses_labels=False,
    )
    feature_kind = "clip-image-embedding-plain-and-view"

    def __init__(self, backbone: Any, classnames: Sequence[str], config: Any = None) -> None:
        super().__init__(backbone, classnames, config)
        cfg = self.config
        hidden = self.dim // cfg.adapter_reduction
        if hidden < 1:
            raise ConfigError(
                f"adapter_reduction {cfg.adapter_reduction} leaves no hidden unit of the "
                f"{self.dim}-d features"
            )
        device = self.text_raw.device
        self.text_residual = nn.Parameter(
            torch.zeros(len(self.classnames), self.dim, device=device)
        )
        self.image_adapter = nn.Sequential(
            nn.Linear(self.dim, hidden, bias=False),
            nn.ReLU(),
            nn.Linear(hidden, self.dim, bias=False),
            nn.ReLU(),
        ).to(device)
        self.epoch = 0
        # Stage one: every training image's unit plain feature, how often it was refined and
        # its TFUP pseudo-label (rebuilt by before_epoch; deterministic, not in the pack).
        self._stage_one: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def examples(cls) -> list[MethodExample]:
        optim = {"epochs": 1, "batch_size": 4}
        small = {"min_cache_shots": 1, "max_cache_shots": 2, "min_training_shots": 2}
        return [MethodExample("clip:tiny", {**small, "feature_views": 2, "optim": optim})]

    # ------------------------------------------------------------------ inputs
    def input_transform(self, train: bool) -> Callable[[Image.Image], torch.Tensor]:
        plain: Callable[[Image.Image], torch.Tensor] = self.backbone.transform
        if not train:
            return plain
        return PlainAndAugmented(plain, clip_train_transform(self.backbone))

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W → B x 2D (the raw embedding twice); B x 2 x 3 x H x W (plain and
        augmented views) → B x 2D (both raw embeddings side by side)."""
        with torch.no_grad():
            if pixels.dim() == 5:
                weak = self.backbone.encode_image(pixels[:, 0]).float()
                strong = self.backbone.encode_image(pixels[:, 1]).float()
                return torch.cat([weak, strong], dim=-1)
            feats = self.backbone.encode_image(pixels).float()
            return torch.cat([feats, feats], dim=-1)

    def plain_features(self, data: MethodData) -> torch.Tensor:
        return _features(data.train())[:, : self.dim]

    # ------------------------------------------------------------------ the adapters
    def class_weights(self) -> torch.Tensor:
        """C x D: normalise((1 − r_β) W̃ + r_β R)."""
        rb = self.config.ratio_beta
        return F.normalize((1 - rb) * self.text_raw + rb * self.text_residual, dim=-1)

    def adapt(self, raw: torch.Tensor) -> torch.Tensor:
        """B x D raw features → normalise(r_α A(f) + (1 − r_α) f)."""
        ra = self.config.ratio_alpha
        return F.normalize(ra * self.image_adapter(raw) + (1 - ra) * raw, dim=-1)

    # ------------------------------------------------------------------ lifecycle
    def setup(self, data: MethodData) -> None:
        super().setup(data)
        self._stage_one = None

    def before_epoch(self, epoch: int, data: MethodData) -> None:
        """Remember the epoch; in stage one, refine the training set (once per run)."""
        self.epoch = epoch
        if epoch < self.config.stage_one_epochs and self._stage_one is None:
            self._stage_one = self.refine(self.plain_features(data))

    @torch.no_grad()
    def refine(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """N x D raw features → (N x D unit features, N refinement counts, N TFUP pseudo-labels)."""
        cfg = self.config
        unit = F.normalize(features.float().to(self.text_raw.device), dim=-1)
        weights = self.zero_shot_weights()
        probs = F.softmax(cfg.prob_scale * unit @ weights.T, dim=1)
        shots = shots_per_class(
            len(unit), len(self.classnames), cfg.training_proportion, cfg.min_training_shots, None
        )
        index, _ = select_representatives(probs, shots, cfg.candidate_factor)
        counts = torch.bincount(index, minlength=len(unit)).float()
        labels = self.tfup_logits(unit, weights).argmax(dim=1)
        return unit, counts, labels

    # ------------------------------------------------------------------ forward
    def forward_features(self, features: torch.Tensor) -> MethodOutput:
        """B x 2D (plain, augmented) raw features → B x C logits: 100 · f' W'ᵀ of the plain
        view in eval mode; of the augmented view in training, with the stage's loss terms."""
        features = features.float()
        weak_raw, strong_raw = features[:, : self.dim], features[:, self.dim :]
        weights = self.class_weights()
        scale = self.config.logit_scale
        if not self.training:
            return MethodOutput(logits=scale * self.adapt(weak_raw) @ weights.T)
        strong_logits = scale * self.adapt(strong_raw) @ weights.T
        if self.epoch < self.config.stage_one_epochs:
            return MethodOutput(
                strong_logits, {"pseudo_ce": self._stage_one_loss(weak_raw, strong_logits)}
            )
        return MethodOutput(strong_logits, self._stage_two_losses(weak_raw, strong_logits, weights))

    def _stage_one_loss(self, weak_raw: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self._stage_one is None:
            raise ConfigError("tfup-t: before_epoch must refine the training set first")
        unit, counts, labels = self._stage_one
        with torch.no_grad():  # which training image each item is: its nearest plain feature
            image = (F.normalize(weak_raw, dim=-1) @ unit.T).argmax(dim=1)
            weight, target = counts[image], labels[image]
        if not bool(weight.sum() > 0):
            return logits.sum() * 0.0
        losses = F.cross_entropy(logits, target, reduction="none")
        return (weight * losses).sum() / weight.sum()

    def _stage_two_losses(
        self, weak_raw: torch.Tensor, logits: torch.Tensor, weights: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        cfg = self.config
        with torch.no_grad():
            weak = self.tfup_logits(self.adapt(weak_raw), weights)
            conf, pseudo = F.softmax(weak, dim=1).max(dim=1)
            keep = conf > cfg.confidence
        ce = F.cross_entropy(logits[keep], pseudo[keep]) if bool(keep.any()) else logits.sum() * 0.0
        return {
            "pseudo_ce": ce,
            "marginal_entropy": cfg.marginal_weight * marginal_entropy_loss(logits),
        }
