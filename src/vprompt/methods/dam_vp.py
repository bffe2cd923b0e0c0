"""DAM-VP: Diversity-Aware Meta Visual Prompting (Huang et al., CVPR 2023).

The downstream training set is split into clusters in the frozen model's feature space
(agglomerative clustering, average linkage, Euclidean distance, cut at a distance threshold:
the more diverse the data, the more clusters); every cluster gets its own pad prompt, all
initialised from one meta-prompt. An image is routed to the cluster whose prototype (the
mean feature of its members) is nearest to the image's frozen, unprompted feature, and that
cluster's prompt is added to it.

Training: the reference (``task_adapting/adapter.py``) builds one SGD optimizer over every
cluster's prompt and, for each mixed batch, routes each image to its cluster, prompts it with
that cluster's prompt and back-propagates the batch's mean cross-entropy. Each prompt therefore
receives the gradient of its own images only: this one-run training is exactly the reference's
per-cluster training, and it is what the engine runs here (``prompts[cluster]`` indexing).

The prompt is Bahng et al.'s pad prompter as the reference uses it: a learned frame of width
30 px on a 224 canvas, added to the *normalised* image (the image fills the canvas; the frame
overlays its border). Features: a classifier's pooled penultimate features (the reference's
``forward_features``); on CLIP, the image's zero-shot logits against the class prompts (the
reference's ``adapter_clip.py`` clusters and routes on ``model(image, text)[0]``).

Read-out on classifiers: ``mapping=active`` reads the C most active feature neurons (the
reference's head-freezing read-out, ViT-B/1k; the neurons with the largest spread over
standard-normal images, in index order), or ``visual-prompt``'s label mappings. The
reference's head-tuning (ResNet-50 / Swin / MoCo) trains a new linear head on the features
at lr 0.1; ``mapping=linear`` (a trained map from the source logits) is the closest here.

The meta-prompt (``meta_prompt``) is a ``dam-vp-meta`` pack (:mod:`vprompt.methods.dam_vp_meta`:
Reptile across several datasets, ``vprompt train --method dam-vp-meta --data A --data B``)
or a ``dam-vp`` pack (the mean of its cluster prompts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vprompt.backbones.protocols import ImageTextBackbone
from vprompt.data.batched import ResizeToTensor
from vprompt.errors import ConfigError, PackError
from vprompt.methods.base import Capabilities, MethodData, MethodExample, MethodOutput, PromptMethod
from vprompt.methods.config import OptimConfig
from vprompt.methods.feature_clusters import (
    MAX_ACTIVE_SAMPLES,
    MAX_CLUSTER_SAMPLES,
    MAX_CLUSTERS,
    active_neurons,
    average_linkage,
    cluster_prototypes,
    most_active,
    nearest_prototype,
    sample_features,
)
from vprompt.methods.label_mapping import LabelMapping, MappingKind
from vprompt.methods.registry import register_method
from vprompt.methods.visual_prompt import MAX_SIDE, MappingChoice, resolve_mapping

__all__ = ["DamVP", "DamVPConfig", "average_linkage", "nearest_prototype"]


@dataclass(frozen=True)
class DamVPConfig:
    """DAM-VP's task adaptation; defaults from shikiw/DAM-VP ``arguments.py`` and
    ``task_adapting/adapter.py`` unless noted.

    Attributes:
        canvas_size: Input side (reference ``--crop_size 224``); ``None``: the backbone's.
        pad_width: Frame width (reference ``--prompt_size 30`` on 224); ``None``: 30/224 of
            the canvas.
        distance_threshold: Average-linkage cut in feature units (the reference's
            ``distance_threshold``: 21 for ResNet-50/IN-1k, 31 ViT-B/IN-1k, 10 ViT-B/IN-22k,
            20 Swin-B, 18 MoCo-v3; CLIP per dataset, 6 CIFAR-10 … 75 NABirds). ``None``:
            ``threshold_ratio`` x the mean pairwise distance of the clustered features (ours:
            the reference's constants are tuned per backbone and do not transfer; 1.0 gives 47
            clusters of 1000 Fashion-MNIST images on ImageNet MobileNetV2).
        threshold_ratio: See ``distance_threshold``.
        cluster_samples: Training images clustered, drawn at random (reference: 1000).
        max_clusters: Most clusters; merging goes on past the threshold until at most this
            many remain (ours: bounds the prompt's size).
        diversity_aware: False: one prompt for all images (the reference's ``--wo_da``).
        meta_prompt: A ``dam-vp`` pack whose prompt initialises every cluster's prompt (the
            mean of its cluster prompts), as the reference loads its meta-trained prompter.
        prompt_init: Prompt without ``meta_prompt``: ``normal`` (the reference's
            ``torch.randn`` pad prompter) or ``zeros`` (starts from the plain image).
        mapping: Classifier read-out as ``visual-prompt``'s (auto: text on CLIP, frequency
            otherwise), or ``active``: the C most active feature neurons, no trained head (the
            reference's head-freezing read-out; see ``dam-vp-meta``).
        active_samples: Standard-normal images that rank the neurons for ``active``
            (reference: 512; drawn with ``seed``).
        mapping_samples: Training images used to estimate frequency mappings (``None``: all).
        templates: CLIP class prompts (reference ``f"a photo of a {c}"``).
        augment: Random horizontal flips during training (reference ``RandomHorizontalFlip``).
        seed: Seed of the random mapping.
        optim: Reference: SGD momentum 0.9, no weight decay, batch 128, 50 epochs, linear
            warm-up over the first fifth then cosine per iteration; the learning rate is per
            dataset in the paper (Tables 13-14; ``--lr`` defaults to 1e4, which its README
            never uses): 1.0 here, the rate of its meta-training (``--update_lr``).
    """

    canvas_size: int | None = None
    pad_width: int | None = None
    distance_threshold: float | None = None
    threshold_ratio: float = 1.0
    cluster_samples: int = 1000
    max_clusters: int = 64
    diversity_aware: bool = True
    meta_prompt: str | None = None
    prompt_init: Literal["normal", "zeros"] = "normal"
    mapping: MappingChoice | Literal["active"] = "auto"
    mapping_samples: int | None = None
    active_samples: int = 512
    templates: tuple[str, ...] = ("a photo of a {}",)
    augment: bool = True
    seed: int = 0
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            optimizer="sgd",
            lr=1.0,
            momentum=0.9,
            weight_decay=0.0,
            epochs=50,
            warmup_epochs=10,
            batch_size=128,
        )
    )

    def __post_init__(self) -> None:
        check_cluster_fields(self)
        if self.mapping_samples is not None and (
            not _is_int(self.mapping_samples) or self.mapping_samples < 1
        ):
            raise ConfigError(
                f"mapping_samples must be a positive integer or null, got {self.mapping_samples!r}"
            )
        if self.meta_prompt is not None and (
            not isinstance(self.meta_prompt, str) or not self.meta_prompt.strip()
        ):
            raise ConfigError(f"meta_prompt must be a pack path or null, got {self.meta_prompt!r}")
        if self.mapping not in (
            "auto", "text", "random", "frequency", "iterative", "linear", "active"
        ):  # fmt: skip
            raise ConfigError(f"unknown mapping {self.mapping!r}")


def check_cluster_fields(cfg: Any) -> None:
    """Validate the fields DAM-VP's task adaptation and its meta-training share (prompt
    geometry, clustering, templates, seed); YAML's ``1e-9`` strings become numbers."""
    for name in ("canvas_size", "pad_width"):
        value = getattr(cfg, name)
        if value is not None and (not _is_int(value) or value < 1):
            raise ConfigError(f"{name} must be a positive integer or null, got {value!r}")
    if cfg.canvas_size is not None and cfg.canvas_size > MAX_SIDE:
        raise ConfigError(f"canvas_size must be at most {MAX_SIDE}, got {cfg.canvas_size}")
    if cfg.canvas_size and cfg.pad_width and 2 * cfg.pad_width >= cfg.canvas_size:
        raise ConfigError(
            f"pad_width {cfg.pad_width} leaves no image on a {cfg.canvas_size} canvas"
        )
    for name in ("distance_threshold", "threshold_ratio"):
        value = getattr(cfg, name)
        if isinstance(value, str):  # YAML reads 1e-9 (no dot) as a string
            with contextlib.suppress(ValueError):
                object.__setattr__(cfg, name, float(value))
    if cfg.distance_threshold is not None and not _positive(cfg.distance_threshold):
        raise ConfigError(
            f"distance_threshold must be a positive number or null, got {cfg.distance_threshold!r}"
        )
    if not _positive(cfg.threshold_ratio):
        raise ConfigError(f"threshold_ratio must be > 0, got {cfg.threshold_ratio!r}")
    if not _is_int(cfg.cluster_samples) or not 1 <= cfg.cluster_samples <= MAX_CLUSTER_SAMPLES:
        raise ConfigError(
            f"cluster_samples must be an integer in [1, {MAX_CLUSTER_SAMPLES}], got "
            f"{cfg.cluster_samples!r}"
        )
    if not _is_int(cfg.max_clusters) or not 1 <= cfg.max_clusters <= MAX_CLUSTERS:
        raise ConfigError(
            f"max_clusters must be an integer in [1, {MAX_CLUSTERS}], got {cfg.max_clusters!r}"
        )
    if not isinstance(cfg.diversity_aware, bool) or not isinstance(cfg.augment, bool):
        raise ConfigError("diversity_aware and augment must be true or false")
    if cfg.prompt_init not in ("normal", "zeros"):
        raise ConfigError(f"prompt_init must be normal or zeros, got {cfg.prompt_init!r}")
    if not cfg.templates or not all(isinstance(t, str) and "{}" in t for t in cfg.templates):
        raise ConfigError(f"templates must be strings with a {{}}: {cfg.templates!r}")
    if not _is_int(cfg.active_samples) or not 2 <= cfg.active_samples <= MAX_ACTIVE_SAMPLES:
        raise ConfigError(
            f"active_samples must be an integer in [2, {MAX_ACTIVE_SAMPLES}], got "
            f"{cfg.active_samples!r}"
        )
    if not _is_int(cfg.seed):
        raise ConfigError(f"seed must be an integer, got {cfg.seed!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def pad_mask(canvas: int, pad: int) -> torch.Tensor:
    """1 x canvas x canvas: ones on the frame of width ``pad``, zeros inside."""
    mask = torch.ones(1, canvas, canvas)
    mask[:, pad : canvas - pad, pad : canvas - pad] = 0
    return mask


def resolve_geometry(
    canvas_size: int | None, pad_width: int | None, backbone: Any
) -> tuple[int, int]:
    """The canvas (default: the backbone's input side) and frame width (default: 30/224 of
    the canvas, Bahng et al.'s pad prompter) a config leaves open."""
    canvas = canvas_size or int(backbone.preprocess.size[0])
    if canvas > MAX_SIDE:
        raise ConfigError(f"canvas_size must be at most {MAX_SIDE}, got {canvas}")
    pad = pad_width or max(1, round(canvas * 30 / 224))
    if 2 * pad >= canvas:
        raise ConfigError(f"pad_width {pad} leaves no image on a {canvas} canvas")
    return canvas, pad


@register_method("dam-vp")
class DamVP(PromptMethod):
    """One pad prompt per feature-space cluster of the training data, routed by prototype.

    Learned tensors (the pack): ``prompts`` (K x 3 x canvas x canvas, zero outside the frame),
    ``prototypes`` (K x D cluster means; K comes from the data) and the mapping's
    ``mapping.*`` state on classifiers.

    Args:
        backbone: Frozen classifier (``torchvision:…``, ``timm:…``) or CLIP backbone.
        classnames: Target classes in label order.
        config: See :class:`DamVPConfig`.
    """

    Config = DamVPConfig
    capabilities = Capabilities(inputs="images", template_field="templates")
    data_shaped_state = frozenset({"prompts", "prototypes"})
    state_hint = "(canvas_size and pad_width must match the pack's)"
    mask: torch.Tensor  # 1 x canvas x canvas frame (buffer)
    prototypes: torch.Tensor  # K x D (buffer)
    readout_index: torch.Tensor  # C, mapping=active only (buffer)
    class_embeddings: torch.Tensor  # C x E, CLIP backbones only (buffer)

    def __init__(
        self, backbone: Any, classnames: Sequence[str], config: DamVPConfig | None = None
    ) -> None:
        super().__init__(backbone, classnames, config)
        self.config = cfg = _resolve(self.config, backbone)
        c, p = int(cfg.canvas_size or 0), int(cfg.pad_width or 0)
        mask = pad_mask(c, p)
        self.register_buffer("mask", mask, persistent=False)
        init = torch.randn(1, 3, c, c) if cfg.prompt_init == "normal" else torch.zeros(1, 3, c, c)
        self.prompts = nn.Parameter(init * mask)
        self.mapping: LabelMapping | None = None
        self.text = cfg.mapping == "text"
        if cfg.mapping == "active":
            self.register_buffer(
                "readout_index", torch.zeros(len(self.classnames), dtype=torch.long)
            )
            dim = int(backbone.feature_dim)
        elif self.text:
            from vprompt.methods.zeroshot import encode_class_prompts

            prompts = [[t.format(n) for t in cfg.templates] for n in self.classnames]
            self.register_buffer(
                "class_embeddings", encode_class_prompts(backbone, prompts), persistent=False
            )
            dim = len(self.classnames)
        else:
            self.mapping = LabelMapping(
                kind=cast(MappingKind, cfg.mapping),
                num_source=int(backbone.num_classes),
                num_target=len(self.classnames),
                seed=cfg.seed,
            )
            dim = int(backbone.feature_dim)
        self.register_buffer("prototypes", torch.zeros(1, dim))
        self.to(self._backbone_device())

    @classmethod
    def examples(cls) -> list[MethodExample]:
        return [
            MethodExample(
                "torchvision:tiny",
                {"canvas_size": 32, "mapping": "frequency", "distance_threshold": 1e-6},
            ),
            MethodExample("torchvision:tiny", {"canvas_size": 32, "mapping": "linear"}),
            MethodExample(
                "torchvision:tiny", {"canvas_size": 32, "mapping": "active", "active_samples": 8}
            ),
            MethodExample("clip:tiny", {"distance_threshold": 1e-6}),
        ]

    # ------------------------------------------------------------------ engine contract
    def check_prompt_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if self.mapping is not None:
            self.mapping.check_state(tensors, "mapping.")
        index = tensors.get("readout_index")
        dim = int(getattr(self.backbone, "feature_dim", 0))
        if index is not None and len(index) and not 0 <= int(index.min()) <= int(index.max()) < dim:
            raise PackError(f"{self.name} tensor 'readout_index' must hold indices in [0, {dim})")

    def trainable_parameters(self) -> list[Any]:
        mapping = list(self.mapping.parameters()) if self.mapping is not None else []
        return [self.prompts, *mapping]

    def input_transform(self, train: bool) -> Callable[[Image.Image], torch.Tensor]:
        """The image resized to the canvas and normalised (the reference adds its prompt to
        the normalised image), flipped at random when training with ``augment``."""
        pre = self.backbone.preprocess
        return ResizeToTensor(
            int(self.config.canvas_size or 0),
            flip=train and self.config.augment,
            mean=pre.mean,
            std=pre.std,
        )

    def setup(self, data: MethodData) -> None:
        """Cluster the training features, give each cluster a copy of the meta-prompt, then
        estimate a frequency label mapping with the routed prompts."""
        device = self._backbone_device()
        meta = self._meta_prompt().to(device)
        if self.config.diversity_aware:
            feats = sample_features(
                data.train(),
                lambda x: self.cluster_features(x.to(device)),
                self.config.cluster_samples,
            )
            protos = cluster_prototypes(feats, self.config).to(device)
        else:
            protos = self.prototypes.new_zeros(1, self.prototypes.shape[1])
        with torch.no_grad():
            self.prototypes.data = protos.to(device, self.prototypes.dtype)
            self.prompts.data = meta.expand(len(protos), -1, -1, -1).clone()
        if self.config.mapping == "active":
            order = active_neurons(
                self.backbone.features,
                int(self.config.canvas_size or 0),
                samples=self.config.active_samples,
                seed=self.config.seed,
                device=device,
            )
            self.readout_index.copy_(most_active(order, len(self.classnames), "the data"))
        mapping = self.mapping
        if mapping is not None and mapping.kind == "frequency" and mapping.needs_update(0):
            self._remap(data)

    def before_epoch(self, epoch: int, data: MethodData) -> None:
        """Re-estimate an iterative label mapping (ILM) with the current prompts."""
        if self.mapping is not None and self.mapping.kind == "iterative":
            self._remap(data)

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def cluster_features(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x canvas² normalised images → B x D features clustering and routing use."""
        if self.text:
            feats = F.normalize(self.backbone.encode_image(images).float(), dim=-1)
            return self.backbone.logit_scale.float() * feats @ self.class_embeddings.float().T
        return self.backbone.features(images).float()

    def route(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x canvas² normalised images → B cluster indices (nearest prototype)."""
        if len(self.prototypes) == 1:
            return torch.zeros(len(images), dtype=torch.long, device=images.device)
        return nearest_prototype(self.cluster_features(images), self.prototypes)

    def apply_prompts(self, images: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
        """Add each image's cluster prompt (its frame) to the normalised image."""
        return images + self.mask * self.prompts[clusters]

    def source_logits(self, prompted: torch.Tensor) -> torch.Tensor:
        """Prompted images → B x K source logits (B x C on CLIP and with ``active``)."""
        if self.text:
            feats = F.normalize(self.backbone.encode_image(prompted).float(), dim=-1)
            return self.backbone.logit_scale.float() * feats @ self.class_embeddings.float().T
        if self.config.mapping == "active":
            return self.backbone.features(prompted).float()[:, self.readout_index]
        return self.backbone(prompted)

    def forward(self, images: torch.Tensor) -> MethodOutput:
        """B x 3 x canvas x canvas normalised images → B x C logits."""
        logits = self.source_logits(self.apply_prompts(images, self.route(images)))
        if self.mapping is not None:
            logits = self.mapping(logits)
        return MethodOutput(logits=logits.float())

    # ------------------------------------------------------------------ helpers
    def _meta_prompt(self) -> torch.Tensor:
        """1 x 3 x canvas² initial prompt: the meta-prompt pack's mean prompt, or this
        method's own initialisation."""
        path = self.config.meta_prompt
        if path is None:
            return self.prompts.detach()[:1].clone()
        from vprompt.engine.pack import load_pack

        pack = load_pack(path)
        prompts = pack.tensors.get("prompts")
        if pack.method not in (self.name, "dam-vp-meta") or prompts is None:
            raise PackError(
                f"meta_prompt {path}: a {pack.method} pack; dam-vp initialises from a "
                "dam-vp-meta or dam-vp pack (its additive frame on the normalised image)"
            )
        shape = tuple(self.prompts.shape[1:])
        if prompts.dim() != 4 or tuple(prompts.shape[1:]) != shape:
            raise PackError(
                f"meta_prompt {path}: prompts of shape {tuple(prompts.shape)}, expected K x "
                f"{' x '.join(map(str, shape))} {self.state_hint}"
            )
        if not bool(torch.isfinite(prompts).all()):
            raise PackError(f"meta_prompt {path}: prompts hold NaN or infinite values")
        return prompts.float().mean(0, keepdim=True).to(self.mask.device) * self.mask

    def _remap(self, data: MethodData) -> None:
        assert self.mapping is not None
        was = self.training
        self.eval()
        device = self._backbone_device()

        def logits(x: torch.Tensor) -> torch.Tensor:
            x = x.to(device)
            return self.source_logits(self.apply_prompts(x, self.route(x)))

        self.mapping.update(logits, data.train(), max_samples=self.config.mapping_samples)
        self.train(was)

    def _backbone_device(self) -> torch.device:
        return next(self.backbone.parameters()).device


def _resolve(config: DamVPConfig, backbone: Any) -> DamVPConfig:
    """Fill the backbone-dependent fields so packs store concrete values."""
    canvas, pad = resolve_geometry(config.canvas_size, config.pad_width, backbone)
    if config.mapping == "active":
        if isinstance(backbone, ImageTextBackbone):
            raise ConfigError(
                f"{backbone.name} classifies through text prompts; use mapping=text/auto"
            )
        return dataclasses.replace(config, canvas_size=canvas, pad_width=pad)
    mapping = resolve_mapping(config.mapping, backbone)
    return dataclasses.replace(config, canvas_size=canvas, pad_width=pad, mapping=mapping)
