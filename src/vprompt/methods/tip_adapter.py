"""Tip-Adapter and Tip-Adapter-F: a cache model of the labelled few-shot set (Zhang et al.,
"Tip-Adapter: Training-free Adaption of CLIP for Few-shot Classification", ECCV 2022).

**Cache** (``setup``). Keys: each training image's features averaged over the augmented views
(random resized crop, scale 0.5-1, bicubic, and a horizontal flip; ``feature_views`` = 10 as the
reference's ``augment_epoch``), then L2-normalised. Values: the one-hot labels.

**Logits** for unit-norm image features f (B x D), keys K (N x D), values V (N x C)::

    A      = f · Kᵀ                          affinities, B x N
    cache  = exp(−β (1 − A)) · V              B x C
    logits = s · f · Wᵀ + α · cache           W: the class text features of the templates

with s = 100 (the reference's constant; ``logit_scale: null`` takes the backbone's). On a
classifier backbone (no text tower) the first term is absent: pure in-context classification
from the labelled support set, on the penultimate features.

**Tip-Adapter-F** (``tip-adapter-f``) makes the keys learnable, initialised from the cache, and
trains them with cross-entropy on the tip logits (AdamW lr 1e-3, eps 1e-4, torch's default
weight decay 0.01, per-iteration cosine, batch 256, 20 epochs; 100 on EuroSAT).

**α and β** (``finish``): with validation data, both are searched on it after building (and
after training, for -F) exactly as the reference's ``search_hp`` does: β over
``i · (scale_β − 0.1) / steps_β + 0.1``, α likewise, the first strictly best accuracy in
β-major order winning (from β = α = 0, as the reference starts); without validation data the
initial values stay. The pack holds the cache, the values and the chosen α, β.

Reference: github.com/gaopengcuhk/Tip-Adapter (``main.py``, ``utils.py``: ``build_cache_model``,
``search_hp``, ``run_tip_adapter_F``; ``configs/*.yaml``: per-dataset ``init_alpha``,
``search_scale`` and epochs; ``datasets/imagenet.py``: the 7-template ImageNet ensemble).
Deliberate differences (README): the search never runs on a test split (the reference searches
ImageNet's on its test set, and keeps -F's best epoch by test accuracy); -F's epochs reuse the
cached augmented views (epoch e trains on view e mod 10) instead of drawing fresh ones; all
computation is float32 (the reference runs CLIP in fp16).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vprompt.backbones.protocols import ImageTextBackbone
from vprompt.errors import ConfigError
from vprompt.methods.base import (
    Capabilities,
    MethodData,
    MethodExample,
    MethodOutput,
    PromptMethod,
)
from vprompt.methods.baselines import frozen_features
from vprompt.methods.config import OptimConfig
from vprompt.methods.registry import register_method
from vprompt.methods.zeroshot import encode_class_prompts

_IMAGENET_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
# configs/<dataset>.yaml: init_alpha and search_scale ([β, α]); init_beta is 1 everywhere and
# search_step [200, 20]. Templates equal the suite's except ImageNet's ensemble.
_SETTINGS: dict[str, dict[str, Any]] = {
    "imagenet": {"alpha": 1.17, "search_scale": (7.0, 3.0), "templates": _IMAGENET_TEMPLATES},
    "caltech101": {"alpha": 3.0, "search_scale": (12.0, 5.0)},
    "dtd": {"alpha": 2.0, "search_scale": (13.0, 13.0)},
    "eurosat": {"alpha": 2.0, "search_scale": (12.0, 10.0)},
    "fgvc_aircraft": {"alpha": 5.0, "search_scale": (30.0, 30.0)},
    "food101": {"alpha": 1.17, "search_scale": (10.0, 10.0)},
    "oxford_flowers": {"alpha": 10.0, "search_scale": (50.0, 50.0)},
    "oxford_pets": {"alpha": 1.17, "search_scale": (7.0, 3.0)},
    "stanford_cars": {"alpha": 3.0, "search_scale": (20.0, 10.0)},
    "sun397": {"alpha": 1.17, "search_scale": (12.0, 10.0)},
    "ucf101": {"alpha": 3.0, "search_scale": (7.0, 3.0)},
}


@dataclass(frozen=True)
class TipAdapterConfig:
    """Tip-Adapter's settings; defaults are the reference's (ImageNet's α and search range).

    Attributes:
        alpha: α, the weight of the cache logits (``init_alpha``; per dataset in protocols).
        beta: β, the sharpness of the affinities (``init_beta``).
        search: Search α and β on the validation data when there is some (``search_hp``).
        search_scale: Upper ends of the (β, α) search ranges (``search_scale``).
        search_steps: Values tried for (β, α) (``search_step``).
        feature_views: Augmented views averaged into each cache key (``augment_epoch``).
        augment: Build the keys from augmented views (random resized crop 0.5-1 + flip);
            false uses each image's plain view once.
        templates: Templates of the zero-shot term's class text features (CLIP only).
        logit_scale: Scale of the zero-shot logits (the reference's 100, CLIP's trained
            value); null takes the backbone's own.
    """

    alpha: float = 1.17
    beta: float = 1.0
    search: bool = True
    search_scale: tuple[float, float] = (7.0, 3.0)
    search_steps: tuple[int, int] = (200, 20)
    feature_views: int = 10
    augment: bool = True
    templates: tuple[str, ...] = ("a photo of a {}.",)
    logit_scale: float | None = 100.0

    def __post_init__(self) -> None:
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
        scale, steps = tuple(self.search_scale), tuple(self.search_steps)
        if len(scale) != 2 or not all(isinstance(v, int | float) and v > 0.1 for v in scale):
            raise ConfigError(f"search_scale must be two numbers > 0.1 (β, α), got {scale!r}")
        if len(steps) != 2 or not all(isinstance(v, int) and v >= 1 for v in steps):
            raise ConfigError(f"search_steps must be two integers >= 1 (β, α), got {steps!r}")
        if not isinstance(self.feature_views, int) or self.feature_views < 1:
            raise ConfigError(f"feature_views must be an integer >= 1, got {self.feature_views!r}")
        for t in self.templates:
            if not isinstance(t, str) or t.count("{}") != 1:
                raise ConfigError(f"template {t!r} must contain exactly one '{{}}'")
        if self.logit_scale is not None and not self.logit_scale > 0:
            raise ConfigError(f"logit_scale must be > 0 or null, got {self.logit_scale!r}")


def tip_adapter_f_optim() -> OptimConfig:
    """``run_tip_adapter_F``: AdamW(lr 1e-3, eps 1e-4) with torch's default weight decay 0.01,
    CosineAnnealingLR over every iteration, batch 256, 20 epochs."""
    return OptimConfig(
        optimizer="adamw", lr=0.001, eps=1e-4, weight_decay=0.01, epochs=20, batch_size=256
    )


@dataclass(frozen=True)
class TipAdapterFConfig(TipAdapterConfig):
    """Tip-Adapter-F's settings: Tip-Adapter's plus the training of the keys.

    Attributes:
        optim: The reference's optimizer and schedule (:func:`tip_adapter_f_optim`).
    """

    optim: OptimConfig = field(default_factory=tip_adapter_f_optim)


def search_grid(scale: float, steps: int) -> list[float]:
    """The reference's search values: ``i * (scale - 0.1) / steps + 0.1`` for i < steps."""
    return [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]


@register_method("tip-adapter")
class TipAdapter(PromptMethod):
    """Training-free: zero-shot CLIP plus a key-value cache of the few-shot training set.

    Learned (derived) tensors, the pack: ``cache_keys`` (N x D), ``cache_values`` (N x C),
    ``alpha`` and ``beta`` (after the search).
    """

    Config = TipAdapterConfig
    capabilities = Capabilities(
        inputs="image-features",
        trains=False,
        uses_training_data=True,
        template_field="templates",
    )
    reference_settings: ClassVar[Mapping[str, Mapping[str, Any]]] = _SETTINGS
    data_shaped_state = frozenset({"cache_keys", "cache_values"})
    state_hint = "(the backbone's feature size and the classes must match)"
    text_features: torch.Tensor  # C x D unit class text features (buffer; CLIP only)
    cache_values: torch.Tensor  # N x C one-hot labels (buffer)
    alpha: torch.Tensor  # 0-d (buffer)
    beta: torch.Tensor

    def __init__(self, backbone: Any, classnames: Sequence[str], config: Any = None) -> None:
        super().__init__(backbone, classnames, config)
        cfg = self.config
        self.clip = isinstance(backbone, ImageTextBackbone)
        dim = int(backbone.embed_dim if self.clip else backbone.feature_dim)
        learn = self.capabilities.trains
        self.cache_keys = nn.Parameter(torch.zeros(0, dim), requires_grad=learn)  # N x D
        self.register_buffer("cache_values", torch.zeros(0, len(self.classnames)))
        self.register_buffer("alpha", torch.tensor(float(cfg.alpha)))
        self.register_buffer("beta", torch.tensor(float(cfg.beta)))
        if self.clip:
            text = _class_text_features(backbone, self.classnames, cfg.templates)
            self.register_buffer("text_features", text, persistent=False)
        self.to(next(backbone.parameters()).device)

    @classmethod
    def examples(cls) -> list[MethodExample]:
        return [
            MethodExample("clip:tiny", {"feature_views": 2, "search_steps": (5, 4)}),
            MethodExample("torchvision:tiny", {"feature_views": 2, "augment": False}),
        ]

    @property
    def feature_kind(self) -> str:  # type: ignore[override]
        # Raw features: the keys average unnormalised views, as the reference does.
        return "clip-image-embedding" if self.clip else "classifier-penultimate"

    # ------------------------------------------------------------------ inputs
    def input_transform(self, train: bool) -> Callable[[Image.Image], torch.Tensor]:
        if train and self.config.augment:
            return _augmentation(self.backbone)
        transform: Callable[[Image.Image], torch.Tensor] = self.backbone.transform
        return transform

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W pixels → B x D raw frozen features (CLIP embeddings, or a
        classifier's penultimate layer)."""
        with torch.no_grad():
            if self.clip:
                return self.backbone.encode_image(pixels).float()
            return frozen_features(self.backbone, pixels)

    # ------------------------------------------------------------------ lifecycle
    def setup(self, data: MethodData) -> None:
        """Build the cache: per image, the mean of its views' raw features, normalised."""
        views = range(data.views) if data.views else [None]
        total: torch.Tensor | None = None
        labels: list[torch.Tensor] = []
        for view in views:
            feats, labs = _collect(data.train(view))
            total = feats if total is None else total + feats
            labels = labels or [labs]
        assert total is not None
        keys = F.normalize(total / len(views), dim=-1)
        values = F.one_hot(labels[0].long(), len(self.classnames)).float()
        with torch.no_grad():
            self.cache_keys.data = keys.to(self.cache_keys.device)
            self.cache_values.data = values.to(self.cache_values.device)

    def finish(self, data: MethodData) -> None:
        """Search α and β on the validation data (the reference's ``search_hp``)."""
        if not self.config.search or not data.has_val:
            return
        feats, labels = _collect(data.val())
        beta, alpha = self.search(feats, labels)
        self.alpha.fill_(alpha)
        self.beta.fill_(beta)

    @torch.no_grad()
    def search(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        """(β, α) with the best accuracy on raw ``features`` / ``labels`` over the grid."""
        unit = F.normalize(features.float().to(self.cache_keys.device), dim=-1)
        labels = labels.to(unit.device)
        zero_shot = self.zero_shot_logits(unit)
        affinity = unit @ self.cache_keys.float().T  # B x N
        scale, steps = self.config.search_scale, self.config.search_steps
        alphas = search_grid(scale[1], steps[1])
        # The reference starts from 0, 0 and keeps the first strictly better accuracy.
        best, best_beta, best_alpha = 0, 0.0, 0.0
        for beta in search_grid(scale[0], steps[0]):
            cache = self._cache_logits(affinity, beta)  # B x C
            for alpha in alphas:
                hits = int(((zero_shot + alpha * cache).argmax(dim=-1) == labels).sum())
                if hits > best:
                    best, best_beta, best_alpha = hits, beta, alpha
        return best_beta, best_alpha

    # ------------------------------------------------------------------ forward
    def zero_shot_logits(self, unit: torch.Tensor) -> torch.Tensor:
        """B x D unit features → B x C zero-shot logits (zeros without a text tower)."""
        if not self.clip:
            # B x C zeros whose batch size stays a tensor dimension (exportable graphs).
            return torch.zeros_like(unit[:, :1]).expand(-1, len(self.classnames))
        scale = self.config.logit_scale
        s = self.backbone.logit_scale.float() if scale is None else float(scale)
        return s * unit @ self.text_features.T

    def _cache_logits(self, affinity: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
        return torch.exp(-beta * (1 - affinity)) @ self.cache_values.float()

    def forward_features(self, features: torch.Tensor) -> MethodOutput:
        """B x D raw features → B x C tip logits."""
        unit = F.normalize(features.float(), dim=-1)
        affinity = unit @ self.cache_keys.float().T  # B x N
        cache = self._cache_logits(affinity, self.beta)
        return MethodOutput(logits=self.zero_shot_logits(unit) + self.alpha * cache)

    def extra_repr(self) -> str:
        return (
            f"backbone={self.backbone.name}, classes={len(self.classnames)}, "
            f"cache={tuple(self.cache_keys.shape)}, alpha={float(self.alpha):.4g}, "
            f"beta={float(self.beta):.4g}"
        )


@register_method("tip-adapter-f")
class TipAdapterF(TipAdapter):
    """Tip-Adapter-F: the cache keys fine-tuned with cross-entropy (a variant of
    :class:`TipAdapter` that changes only its config and declares that it trains)."""

    Config = TipAdapterFConfig
    capabilities = Capabilities(
        inputs="image-features",
        trains=True,
        uses_training_data=True,
        template_field="templates",
    )
    reference_settings: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        **_SETTINGS,
        "eurosat": {**_SETTINGS["eurosat"], "optim": {"epochs": 100}},
    }

    @classmethod
    def examples(cls) -> list[MethodExample]:
        optim = {"epochs": 1, "batch_size": 4}
        return [
            MethodExample("clip:tiny", {"feature_views": 2, "search": False, "optim": optim}),
            MethodExample("torchvision:tiny", {"augment": False, "optim": optim}),
        ]


def _class_text_features(
    backbone: ImageTextBackbone, classnames: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """C x D: per class, the normalised mean of its normalised template embeddings (the
    reference's ``clip_classifier``; underscores read as spaces)."""
    names = [name.replace("_", " ") for name in classnames]
    return encode_class_prompts(backbone, [[t.format(n) for t in templates] for n in names])


def _augmentation(backbone: Any) -> Callable[[Image.Image], torch.Tensor]:
    """The reference's cache augmentation at the backbone's input size and normalisation:
    random resized crop (scale 0.5-1, bicubic), horizontal flip."""
    from torchvision import transforms as T

    pre = backbone.preprocess
    size = pre.size if isinstance(pre.size, int) else tuple(pre.size)
    return T.Compose(
        [
            T.Lambda(_rgb),
            T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(p=0.5),
            T.ToTensor(),
            T.Normalize(pre.mean, pre.std),
        ]
    )


def _rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB") if image.mode != "RGB" else image


def _collect(batches: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) batches → all features (N x D) and labels (N) on their device."""
    feats, labels = [], []
    for f, y in batches:
        feats.append(f.float())
        labels.append(y)
    if not feats:
        raise ConfigError("Tip-Adapter needs at least one labelled image")
    return torch.cat(feats), torch.cat(labels)
