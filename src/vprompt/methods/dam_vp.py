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

Read-out on classifiers: ``visual-prompt``'s label mappings. The reference either reads the C
most active feature neurons (head-freezing, ViT-B/1k) or trains a new linear head on the
features at lr 0.1 (head-tuning, ResNet-50 / Swin / MoCo); ``mapping=linear`` (a trained map
from the source logits) is the closest here.

Not here: the meta-training of the meta-prompt (the reference's Reptile over six datasets,
each clustered the same way) needs several training sets in one run, which the engine's single
training set does not give; ``meta_prompt`` instead initialises from a ``dam-vp`` pack trained
elsewhere (e.g. with ``diversity_aware=false`` on another dataset).
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

from vprompt.data.batched import ResizeToTensor
from vprompt.errors import ConfigError, PackError
from vprompt.methods.base import Capabilities, MethodData, MethodExample, MethodOutput, PromptMethod
from vprompt.methods.config import OptimConfig
from vprompt.methods.label_mapping import LabelMapping, MappingKind
from vprompt.methods.registry import register_method
from vprompt.methods.visual_prompt import MAX_SIDE, MappingChoice, resolve_mapping

MAX_CLUSTER_SAMPLES = 5000
"""Most training images clustered (the distance matrix is N x N)."""
MAX_CLUSTERS = 256
"""Most clusters (each holds a 3 x canvas² prompt)."""


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
            otherwise).
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
    mapping: MappingChoice = "auto"
    mapping_samples: int | None = None
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
        for name in ("canvas_size", "pad_width", "mapping_samples"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ConfigError(f"{name} must be a positive integer or null, got {value!r}")
        if self.canvas_size is not None and self.canvas_size > MAX_SIDE:
            raise ConfigError(f"canvas_size must be at most {MAX_SIDE}, got {self.canvas_size}")
        if self.canvas_size and self.pad_width and 2 * self.pad_width >= self.canvas_size:
            raise ConfigError(
                f"pad_width {self.pad_width} leaves no image on a {self.canvas_size} canvas"
            )
        for name in ("distance_threshold", "threshold_ratio"):
            value = getattr(self, name)
            if isinstance(value, str):  # YAML reads 1e-9 (no dot) as a string
                with contextlib.suppress(ValueError):
                    object.__setattr__(self, name, float(value))
        if self.distance_threshold is not None and not _positive(self.distance_threshold):
            raise ConfigError(
                f"distance_threshold must be a positive number or null, got "
                f"{self.distance_threshold!r}"
            )
        if not _positive(self.threshold_ratio):
            raise ConfigError(f"threshold_ratio must be > 0, got {self.threshold_ratio!r}")
        if not _is_int(self.cluster_samples) or not 1 <= self.cluster_samples <= (
            MAX_CLUSTER_SAMPLES
        ):
            raise ConfigError(
                f"cluster_samples must be an integer in [1, {MAX_CLUSTER_SAMPLES}], got "
                f"{self.cluster_samples!r}"
            )
        if not _is_int(self.max_clusters) or not 1 <= self.max_clusters <= MAX_CLUSTERS:
            raise ConfigError(
                f"max_clusters must be an integer in [1, {MAX_CLUSTERS}], got {self.max_clusters!r}"
            )
        if not isinstance(self.diversity_aware, bool) or not isinstance(self.augment, bool):
            raise ConfigError("diversity_aware and augment must be true or false")
        if self.meta_prompt is not None and (
            not isinstance(self.meta_prompt, str) or not self.meta_prompt.strip()
        ):
            raise ConfigError(f"meta_prompt must be a pack path or null, got {self.meta_prompt!r}")
        if self.prompt_init not in ("normal", "zeros"):
            raise ConfigError(f"prompt_init must be normal or zeros, got {self.prompt_init!r}")
        if self.mapping not in ("auto", "text", "random", "frequency", "iterative", "linear"):
            raise ConfigError(f"unknown mapping {self.mapping!r}")
        if not self.templates or not all(isinstance(t, str) and "{}" in t for t in self.templates):
            raise ConfigError(f"templates must be strings with a {{}}: {self.templates!r}")
        if not _is_int(self.seed):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def average_linkage(
    features: torch.Tensor, threshold: float, max_clusters: int = MAX_CLUSTERS
) -> torch.Tensor:
    """Agglomerative clustering with average linkage on Euclidean distances.

    Merges the two closest clusters (mean pairwise distance between their members) while that
    distance is below ``threshold``, or while more than ``max_clusters`` remain.

    Args:
        features: N x D.
        threshold: Cut distance.
        max_clusters: Most clusters kept.

    Returns:
        N cluster indices, numbered 0, 1, … in order of each cluster's first member.
    """
    x = features.detach().double().cpu()
    n = len(x)
    dist = torch.cdist(x, x)  # N x N
    dist.fill_diagonal_(math.inf)
    sizes = torch.ones(n, dtype=torch.float64)
    owner = torch.arange(n)
    remaining = n
    while remaining > 1:
        flat = int(torch.argmin(dist))
        i, j = divmod(flat, n)
        if float(dist[i, j]) >= threshold and remaining <= max_clusters:
            break
        # Lance-Williams update for average linkage: the merged cluster's mean distance.
        merged = (sizes[i] * dist[i] + sizes[j] * dist[j]) / (sizes[i] + sizes[j])
        dist[i], dist[:, i] = merged, merged
        dist[i, i] = math.inf
        dist[j], dist[:, j] = math.inf, math.inf
        sizes[i] += sizes[j]
        owner[owner == j] = i
        remaining -= 1
    _, first = torch.unique(owner, return_inverse=True)
    order = {int(c): k for k, c in enumerate(dict.fromkeys(first.tolist()))}
    return torch.tensor([order[int(c)] for c in first.tolist()], dtype=torch.long)


def nearest_prototype(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """B x D features, K x D prototypes → B indices of the nearest prototype (Euclidean)."""
    # Exact differences: the matmul shortcut loses the small distances of tiny features.
    dist = torch.cdist(
        features.float(), prototypes.float(), compute_mode="donot_use_mm_for_euclid_dist"
    )
    return dist.argmin(dim=1)


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
    class_embeddings: torch.Tensor  # C x E, CLIP backbones only (buffer)

    def __init__(
        self, backbone: Any, classnames: Sequence[str], config: DamVPConfig | None = None
    ) -> None:
        super().__init__(backbone, classnames, config)
        self.config = cfg = _resolve(self.config, backbone)
        c, p = int(cfg.canvas_size or 0), int(cfg.pad_width or 0)
        mask = torch.ones(1, c, c)
        mask[:, p : c - p, p : c - p] = 0
        self.register_buffer("mask", mask, persistent=False)
        init = torch.randn(1, 3, c, c) if cfg.prompt_init == "normal" else torch.zeros(1, 3, c, c)
        self.prompts = nn.Parameter(init * mask)
        self.mapping: LabelMapping | None = None
        if cfg.mapping == "text":
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
            MethodExample("clip:tiny", {"distance_threshold": 1e-6}),
        ]

    # ------------------------------------------------------------------ engine contract
    def check_prompt_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if self.mapping is not None:
            self.mapping.check_state(tensors, "mapping.")

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
            feats = self._collect_features(data)
            labels = average_linkage(feats, self._threshold(feats), self.config.max_clusters)
            k = int(labels.max()) + 1
            protos = torch.stack([feats[labels == i].mean(0) for i in range(k)]).to(device)
        else:
            protos = self.prototypes.new_zeros(1, self.prototypes.shape[1])
        with torch.no_grad():
            self.prototypes.data = protos.to(device, self.prototypes.dtype)
            self.prompts.data = meta.expand(len(protos), -1, -1, -1).clone()
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
        if self.mapping is None:
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
        """Prompted images → B x K source logits (B x C on CLIP)."""
        if self.mapping is None:
            feats = F.normalize(self.backbone.encode_image(prompted).float(), dim=-1)
            return self.backbone.logit_scale.float() * feats @ self.class_embeddings.float().T
        return self.backbone(prompted)

    def forward(self, images: torch.Tensor) -> MethodOutput:
        """B x 3 x canvas x canvas normalised images → B x C logits."""
        logits = self.source_logits(self.apply_prompts(images, self.route(images)))
        if self.mapping is not None:
            logits = self.mapping(logits)
        return MethodOutput(logits=logits.float())

    # ------------------------------------------------------------------ helpers
    def _collect_features(self, data: MethodData) -> torch.Tensor:
        """N x D features of ``cluster_samples`` training images drawn uniformly at random
        (the reference takes the first 1000 of its shuffled loader), in dataset order."""
        feats = keys = order = None
        seen = 0
        for images, _ in data.train():
            batch = self.cluster_features(images.to(self._backbone_device())).cpu()
            idx = torch.arange(seen, seen + len(batch))
            rand = torch.rand(len(batch))
            seen += len(batch)
            if feats is None or keys is None or order is None:
                feats, keys, order = batch, rand, idx
            else:
                feats, keys = torch.cat([feats, batch]), torch.cat([keys, rand])
                order = torch.cat([order, idx])
            if len(keys) > self.config.cluster_samples:  # keep the smallest random keys
                keep = keys.topk(self.config.cluster_samples, largest=False).indices
                feats, keys, order = feats[keep], keys[keep], order[keep]
        if feats is None or order is None:
            raise ConfigError("dam-vp needs training images to cluster")
        return feats[order.argsort()]

    def _threshold(self, feats: torch.Tensor) -> float:
        if self.config.distance_threshold is not None:
            return float(self.config.distance_threshold)
        n = len(feats)
        if n < 2:
            return math.inf
        mean = float(torch.cdist(feats.double(), feats.double()).sum()) / (n * (n - 1))
        return self.config.threshold_ratio * mean if mean > 0 else math.inf

    def _meta_prompt(self) -> torch.Tensor:
        """1 x 3 x canvas² initial prompt: the meta-prompt pack's mean prompt, or this
        method's own initialisation."""
        path = self.config.meta_prompt
        if path is None:
            return self.prompts.detach()[:1].clone()
        from vprompt.engine.pack import load_pack

        pack = load_pack(path)
        prompts = pack.tensors.get("prompts")
        if pack.method != self.name or prompts is None:
            raise PackError(
                f"meta_prompt {path}: a {pack.method} pack; dam-vp initialises from a dam-vp "
                "pack (its additive frame on the normalised image)"
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
    canvas = config.canvas_size or int(backbone.preprocess.size[0])
    if canvas > MAX_SIDE:
        raise ConfigError(f"canvas_size must be at most {MAX_SIDE}, got {canvas}")
    pad = config.pad_width or max(1, round(canvas * 30 / 224))
    if 2 * pad >= canvas:
        raise ConfigError(f"pad_width {pad} leaves no image on a {canvas} canvas")
    mapping = resolve_mapping(config.mapping, backbone)
    return dataclasses.replace(config, canvas_size=canvas, pad_width=pad, mapping=mapping)
