"""DAM-VP's meta-prompt: one pad prompt meta-learned across several datasets with Reptile
(Huang et al., "Diversity-Aware Meta Visual Prompting", CVPR 2023, Sec. 3.3).

``vprompt train --method dam-vp-meta --data A --data B …`` learns the prompt that ``dam-vp``
then copies into every cluster of a new dataset (``--set meta_prompt=PACK``).

**Tasks.** Each dataset is one task, clustered once before training exactly as ``dam-vp``
clusters its data (frozen features of ``cluster_samples`` random images, average linkage cut
at the threshold; prototypes are cluster means): task t has K_t prototypes.

**One meta step** takes one shuffled batch from every task. For task t, K_t copies φ of the
meta-prompt θ are trained for ``inner_steps`` Adam steps on that batch (each image routed to
its nearest prototype and prompted with its copy; cross-entropy of the task's read-out). Then::

    θ ← θ − meta_step_size · Σₜ (K_t θ − Σₖ φₜₖ) / Σₜ K_t

(Reptile towards the mean of all fast copies; with ``diversity_aware=false`` every K_t is 1).
The inner learning rate follows a cosine from ``optim.lr`` to 0 over all meta steps (no
warm-up; step s of S, counted from 1: lr = ½ (1 + cos(π s / S)) · optim.lr). An epoch has as
many meta steps as the smallest task has batches, so every task is seen equally often; each
task's batches are reshuffled every epoch.

**Read-out** (the reference's head-freezing / CLIP set-ups; there is no trained head):

* classifiers (``readout=active``): task t's C_t logits are the frozen pooled features at the
  C_t *most active* neurons — those with the largest standard deviation over
  ``active_samples`` standard-normal images — taken in increasing index order (the
  reference's ``torch.unique`` of the top-C_t indices);
* CLIP (``readout=text``): scaled cosine similarity with task t's class prompts; clustering
  and routing use the zero-shot logits against them, as ``dam-vp`` on CLIP.

**Kept prompt** (``keep=best-loss``, the reference's): after each meta step the meta-prompt's
cross-entropy on the step's batches (mean over tasks); the prompt with the lowest one is kept.
``keep=last`` keeps the final one.

The pack's ``prompts`` (1 x 3 x canvas²) is what ``dam-vp``'s ``meta_prompt`` reads; its
classes are all tasks' classes (``"NAME: class"``) and, evaluated, it predicts among all of
them with the meta-prompt alone (the reference's query evaluation).

Reference: github.com/shikiw/DAM-VP (``meta-training/meta_hf.py``: ``Meta.forward``,
``computer_diff``, ``computer_meta_weight``, ``get_active_neuron_index``, ``rep2logit``,
``lr_scheduler``, ``coarse_clustering``; ``meta_clip.py``; ``main_hf.py``; ``arguments.py``;
README commands). Deliberate differences (README): the training transform is ``dam-vp``'s
(resize to the canvas, random flips; the reference resizes to 256 and crops 224 at random);
routing uses the same clustering threshold rule as ``dam-vp`` (the reference's constants are
per backbone); the run does not fine-tune on a test dataset after every epoch to report
progress (train ``dam-vp`` from the pack for that); the meta-training runs inside the set-up
hook, so an interrupted run starts over; the head-tuning variant (``meta_ht.py``: a linear
head per task trained along) is not here.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from vprompt.backbones.protocols import ImageTextBackbone
from vprompt.data.batched import ResizeToTensor
from vprompt.errors import ConfigError, PackError
from vprompt.methods.base import (
    Batch,
    Capabilities,
    DataTask,
    MethodData,
    MethodExample,
    MethodOutput,
    PromptMethod,
)
from vprompt.methods.config import OptimConfig
from vprompt.methods.dam_vp import _is_int, check_cluster_fields, pad_mask, resolve_geometry
from vprompt.methods.feature_clusters import (
    active_neurons,
    cluster_prototypes,
    most_active,
    nearest_prototype,
    sample_features,
)
from vprompt.methods.registry import register_method

Readout = Literal["auto", "active", "text"]


@dataclass(frozen=True)
class DamVPMetaConfig:
    """DAM-VP's meta-training; defaults from shikiw/DAM-VP ``arguments.py`` and the README's
    meta-training commands unless noted.

    Attributes:
        canvas_size: Input side (``None``: the backbone's); the ``dam-vp`` runs that start
            from this pack must use the same canvas and frame.
        pad_width: Frame width (``None``: 30/224 of the canvas).
        distance_threshold: Clustering cut, as ``dam-vp``'s (``None``: ``threshold_ratio`` x
            the mean pairwise distance of each task's clustered features).
        threshold_ratio: See ``distance_threshold``.
        cluster_samples: Training images clustered per task (reference: 1000).
        max_clusters: Most clusters per task.
        diversity_aware: False: one copy of the meta-prompt per task (the reference's
            ``--wo_da``).
        prompt_init: The meta-prompt's start: ``normal`` (the reference's pad prompter) or
            ``zeros``.
        templates: CLIP class prompts (reference ``f"a photo of a {c}"``).
        augment: Random horizontal flips of the training images.
        readout: ``active`` (classifiers: the most active feature neurons), ``text`` (CLIP),
            ``auto``: by backbone.
        active_samples: Standard-normal images that rank the neurons (reference: 512).
        inner_steps: Adam steps per task and meta step (README: 4; ``--update_step``).
        meta_step_size: Reptile's outer step (README: 0.5; ``--meta_step_size``).
        keep: ``best-loss`` (the reference) or ``last``.
        seed: Seed of the noise images that rank the neurons.
        optim: The inner optimizer: Adam (``eps``, ``weight_decay``) at ``lr`` (the
            reference's ``--meta_lr``: 1.0 in its README's CLIP command, 0.5 for ViT-B/1k)
            with the cosine described in the module docstring; ``epochs`` (reference 200) of
            meta steps over batches of ``batch_size`` images per task (128).
    """

    canvas_size: int | None = None
    pad_width: int | None = None
    distance_threshold: float | None = None
    threshold_ratio: float = 1.0
    cluster_samples: int = 1000
    max_clusters: int = 64
    diversity_aware: bool = True
    prompt_init: Literal["normal", "zeros"] = "normal"
    readout: Readout = "auto"
    templates: tuple[str, ...] = ("a photo of a {}",)
    active_samples: int = 512
    inner_steps: int = 4
    meta_step_size: float = 0.5
    keep: Literal["best-loss", "last"] = "best-loss"
    augment: bool = True
    seed: int = 0
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            optimizer="adam", lr=1.0, weight_decay=0.0, epochs=200, batch_size=128
        )
    )

    def __post_init__(self) -> None:
        check_cluster_fields(self)
        if self.readout not in ("auto", "active", "text"):
            raise ConfigError(f"readout must be auto, active or text, got {self.readout!r}")
        if not _is_int(self.inner_steps) or self.inner_steps < 1:
            raise ConfigError(f"inner_steps must be a positive integer, got {self.inner_steps!r}")
        step = self.meta_step_size
        if not isinstance(step, (int, float)) or isinstance(step, bool) or not 0 < step <= 1:
            raise ConfigError(f"meta_step_size must be in (0, 1], got {step!r}")
        if self.keep not in ("best-loss", "last"):
            raise ConfigError(f"keep must be best-loss or last, got {self.keep!r}")
        if self.optim.optimizer != "adam":
            raise ConfigError(
                f"dam-vp-meta's inner optimizer is Adam (the reference's); got "
                f"optim.optimizer={self.optim.optimizer!r}"
            )
        plain = OptimConfig()
        for name in ("warmup_epochs", "warmup_lr", "grad_clip", "step_unit", "drop_last"):
            if getattr(self.optim, name) != getattr(plain, name):
                raise ConfigError(
                    f"dam-vp-meta does not use optim.{name}: its inner rate follows a cosine "
                    "from optim.lr over all meta steps, without warm-up"
                )


def reptile_update(
    theta: torch.Tensor, fast: Sequence[torch.Tensor], step_size: float
) -> torch.Tensor:
    """θ − step_size · Σₜ (K_t θ − Σₖ φₜₖ) / Σₜ K_t for task copies ``fast`` (K_t x …)."""
    count = sum(len(f) for f in fast)
    diff = sum((len(f) * theta[0] - f.sum(0) for f in fast), torch.zeros_like(theta[0]))
    return theta - step_size * (diff / count).unsqueeze(0)


def inner_lr(peak: float, step: int, total: int) -> float:
    """The inner learning rate at meta step ``step`` (from 1) of ``total``: a cosine to 0."""
    return 0.5 * (1 + math.cos(math.pi * step / total)) * peak


@register_method("dam-vp-meta")
class DamVPMeta(PromptMethod):
    """A pad prompt meta-learned across datasets, to initialise ``dam-vp``'s cluster prompts.

    Learned tensors (the pack): ``prompts`` (1 x 3 x canvas², zero inside the frame) and the
    read-out, ``readout_index`` (C feature indices, classifiers) or ``class_embeddings``
    (C x E unit text embeddings, CLIP), for all tasks' classes in run order.
    """

    Config = DamVPMetaConfig
    capabilities = Capabilities(
        inputs="images", trains=False, template_field="templates", multi_dataset=True
    )
    state_hint = "(canvas_size and pad_width must match the pack's)"
    mask: torch.Tensor  # 1 x canvas x canvas frame (buffer)
    readout_index: torch.Tensor  # C (buffer, classifiers)
    class_embeddings: torch.Tensor  # C x E (buffer, CLIP)

    def __init__(
        self, backbone: Any, classnames: Sequence[str], config: DamVPMetaConfig | None = None
    ) -> None:
        super().__init__(backbone, classnames, config)
        cfg = self.config
        canvas, pad = resolve_geometry(cfg.canvas_size, cfg.pad_width, backbone)
        text = isinstance(backbone, ImageTextBackbone)
        readout = cfg.readout if cfg.readout != "auto" else ("text" if text else "active")
        if (readout == "text") != text:
            raise ConfigError(
                f"readout={readout} does not fit {backbone.name}: text on CLIP-like backbones, "
                "active on classifiers"
            )
        self.config = cfg = dataclasses.replace(
            cfg, canvas_size=canvas, pad_width=pad, readout=readout
        )
        self.register_buffer("mask", pad_mask(canvas, pad), persistent=False)
        init = torch.randn(1, 3, canvas, canvas) if cfg.prompt_init == "normal" else None
        self.prompts = nn.Parameter(
            init * self.mask if init is not None else torch.zeros(1, 3, canvas, canvas)
        )
        c = len(self.classnames)
        if readout == "text":
            self.register_buffer("class_embeddings", torch.zeros(c, int(backbone.embed_dim)))
        else:
            self.register_buffer("readout_index", torch.zeros(c, dtype=torch.long))
        self._task_spans: list[tuple[int, int]] = [(0, c)]
        self.meta_losses: list[float] = []
        self.kept_step = 0
        self.to(self._device())

    @classmethod
    def examples(cls) -> list[MethodExample]:
        tiny: dict[str, Any] = {"canvas_size": 32, "active_samples": 16, "inner_steps": 2}
        tiny["optim"] = {"epochs": 1, "batch_size": 4}
        return [
            MethodExample("torchvision:tiny", {**tiny, "distance_threshold": 1e-6}),
            MethodExample("clip:tiny", {**tiny, "canvas_size": None}),
        ]

    # ------------------------------------------------------------------ state
    def pack_notes(self) -> dict[str, Any]:
        """The meta-prompt's loss after every meta step and the step kept (from 1)."""
        return {"meta_losses": [round(v, 6) for v in self.meta_losses], "kept_step": self.kept_step}

    def check_prompt_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        index = tensors.get("readout_index")
        dim = int(getattr(self.backbone, "feature_dim", 0))
        if (
            index is not None
            and len(index)
            and not (0 <= int(index.min()) <= int(index.max()) < dim)
        ):
            raise PackError(f"dam-vp-meta tensor 'readout_index' must hold indices in [0, {dim})")

    def input_transform(self, train: bool) -> Callable[[Image.Image], torch.Tensor]:
        """The image resized to the canvas and normalised, flipped at random when training
        with ``augment`` (as ``dam-vp``)."""
        pre = self.backbone.preprocess
        return ResizeToTensor(
            int(self.config.canvas_size or 0),
            flip=train and self.config.augment,
            mean=pre.mean,
            std=pre.std,
        )

    # ------------------------------------------------------------------ forward
    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """Features the read-out takes: unit image embeddings (CLIP) or pooled features."""
        if self.config.readout == "text":
            return F.normalize(self.backbone.encode_image(images).float(), dim=-1)
        return self.backbone.features(images).float()

    def _readout(self, feats: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
        lo, hi = span
        if self.config.readout == "text":
            scale = self.backbone.logit_scale.float()
            return scale * feats @ self.class_embeddings[lo:hi].float().T
        return feats[:, self.readout_index[lo:hi]]

    def forward(self, images: torch.Tensor) -> MethodOutput:
        """B x 3 x canvas² normalised images → B x C logits over every task's classes, with
        the meta-prompt added."""
        feats = self._embed(images + self.mask * self.prompts)
        return MethodOutput(logits=self._readout(feats, (0, len(self.classnames))))

    # ------------------------------------------------------------------ meta-training
    def setup(self, data: MethodData) -> None:
        """Build each task's read-out and prototypes, then run the Reptile meta-training."""
        device, tasks = self._device(), data.tasks
        self._set_readouts(tasks)
        protos = [self._prototypes(data, t) for t in range(len(tasks))]
        cfg, batch = self.config, self.config.optim.batch_size
        per_epoch = min(math.ceil(t.size / batch) for t in tasks)
        if per_epoch == 0:
            raise ConfigError("dam-vp-meta needs training images in every dataset")
        total = cfg.optim.epochs * per_epoch
        base = int(torch.randint(0, 2**62, (1,)))  # the run's seeded generator
        theta = self.prompts.detach().clone()
        best, best_loss = theta.clone(), math.inf
        self.meta_losses, self.kept_step = [], 0
        bar = tqdm(total=total, desc="dam-vp-meta: meta steps", unit="step", file=sys.stderr,
                   leave=False, disable=total < 2)  # fmt: skip
        step = 0
        for epoch in range(cfg.optim.epochs):
            streams = [
                data.shuffled(self._generator(base, epoch, t), task=t, batch_size=batch)
                for t in range(len(tasks))
            ]
            for batches in zip(*streams, strict=False):
                if step - epoch * per_epoch >= per_epoch:
                    break
                step += 1
                lr = inner_lr(cfg.optim.lr, step, total)
                theta, loss = self._meta_step(theta, batches, tasks, protos, lr, device)
                self.meta_losses.append(loss)
                if cfg.keep == "last" or loss < best_loss:
                    best, best_loss, self.kept_step = theta.clone(), loss, step
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        bar.close()
        with torch.no_grad():
            self.prompts.copy_(best)

    def _meta_step(
        self,
        theta: torch.Tensor,
        batches: Sequence[Batch],
        tasks: Sequence[DataTask],
        protos: Sequence[torch.Tensor | None],
        lr: float,
        device: torch.device,
    ) -> tuple[torch.Tensor, float]:
        """One Reptile step over one batch per task → new θ and its mean loss after it."""
        fast_all = []
        routed = []
        for (images, labels), task, proto, span in zip(
            batches, tasks, protos, self._task_spans, strict=True
        ):
            x, y = images.to(device), labels.to(device) - task.offset
            route = self._route(x, proto, span)
            fast = theta.expand(len(proto) if proto is not None else 1, -1, -1, -1).clone()
            fast.requires_grad_(True)
            optim = self.config.optim
            opt = torch.optim.Adam(
                [fast], lr=lr, betas=optim.betas, weight_decay=optim.weight_decay, eps=optim.eps
            )
            with torch.enable_grad():
                for _ in range(self.config.inner_steps):
                    loss = F.cross_entropy(
                        self._readout(self._embed(x + self.mask * fast[route]), span), y
                    )
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            fast_all.append(fast.detach())
            routed.append((x, y, span))
        theta = reptile_update(theta, fast_all, self.config.meta_step_size)
        with torch.no_grad():
            after = [
                float(F.cross_entropy(self._readout(self._embed(x + self.mask * theta), span), y))
                for x, y, span in routed
            ]
        return theta, sum(after) / len(after)

    def _set_readouts(self, tasks: Sequence[DataTask]) -> None:
        """Each task's class span in the run's classes, and its read-out tensors."""
        if sum(len(t.classnames) for t in tasks) != len(self.classnames):
            raise ConfigError("dam-vp-meta: the datasets' classes differ from the run's")
        self._task_spans = [(t.offset, t.offset + len(t.classnames)) for t in tasks]
        if self.config.readout == "text":
            from vprompt.methods.zeroshot import encode_class_prompts

            for task, (lo, hi) in zip(tasks, self._task_spans, strict=True):
                prompts = [[tp.format(c) for tp in self.config.templates] for c in task.classnames]
                self.class_embeddings[lo:hi] = encode_class_prompts(self.backbone, prompts)
            return
        order = active_neurons(
            self.backbone.features,
            int(self.config.canvas_size or 0),
            samples=self.config.active_samples,
            seed=self.config.seed,
            device=self._device(),
        )
        for task, (lo, hi) in zip(tasks, self._task_spans, strict=True):
            self.readout_index[lo:hi] = most_active(order, len(task.classnames), task.name)

    def _cluster_features(self, images: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
        """What clustering and routing compare: pooled features, or CLIP's task logits."""
        with torch.no_grad():
            feats = self._embed(images)
            return self._readout(feats, span) if self.config.readout == "text" else feats

    def _prototypes(self, data: MethodData, task: int) -> torch.Tensor | None:
        """Task ``task``'s K x D cluster prototypes (None without diversity awareness)."""
        if not self.config.diversity_aware:
            return None
        span, device = self._task_spans[task], self._device()
        feats = sample_features(
            data.train(task=task),
            lambda x: self._cluster_features(x.to(device), span),
            self.config.cluster_samples,
        )
        return cluster_prototypes(feats, self.config).to(device)

    def _route(
        self, images: torch.Tensor, protos: torch.Tensor | None, span: tuple[int, int]
    ) -> torch.Tensor:
        if protos is None or len(protos) == 1:
            return torch.zeros(len(images), dtype=torch.long, device=images.device)
        return nearest_prototype(self._cluster_features(images, span), protos)

    @staticmethod
    def _generator(base: int, epoch: int, task: int) -> torch.Generator:
        return torch.Generator().manual_seed((base + 1_000_003 * epoch + 7919 * task) % 2**63)

    def _device(self) -> torch.device:
        return next(self.backbone.parameters()).device
