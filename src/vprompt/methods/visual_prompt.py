"""Visual prompting: a learned pixel prompt + output label mapping on any frozen classifier.

On a CNN/ViT classifier the task's classes come from its source classes through a label mapping;
on CLIP the "mapping" is the text prompts (class embeddings from templates).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from PIL import Image

from vprompt.backbones.protocols import ImageTextBackbone
from vprompt.data.batched import ResizeToTensor
from vprompt.errors import ConfigError
from vprompt.methods.base import (
    Capabilities,
    MethodData,
    MethodExample,
    MethodOutput,
    PromptMethod,
    ValueImage,
)
from vprompt.methods.config import OptimConfig
from vprompt.methods.label_mapping import LabelMapping, MappingKind
from vprompt.methods.pixel_prompt import PixelPrompt, PixelRange, PromptKind
from vprompt.methods.registry import register_method

MappingChoice = Literal["auto", "text", "random", "frequency", "iterative", "linear"]


MAX_SIDE = 4096
"""Largest canvas, inner image or patch side a config may ask for (the prompt is 3 x side²)."""


@dataclass(frozen=True)
class VisualPromptConfig:
    """Pixel prompt + label mapping; defaults follow ILM-VP's expansive padding prompt.

    Attributes:
        kind: padding | fixed-patch | random-patch | full | none.
        canvas_size: Canvas side; ``None`` uses the backbone's input size.
        inner_size: Side the image is resized to inside the canvas; ``None`` = canvas size.
        pad_width: Frame width; ``None`` = (canvas - inner) / 2, or 30/224 of the canvas when
            they are equal (Bahng et al.).
        patch_size: Side of the patch prompts.
        pixel_range: ``sigmoid`` keeps frame/patch pixels in [0, 1] starting mid-grey (ILM-VP);
            ``free`` learns raw values starting black, i.e. from the mapping-only input.
        mapping: auto (text for CLIP, frequency otherwise), text, random, frequency, iterative,
            linear.
        mapping_samples: Training images used to estimate frequency mappings (``None``: all).
        templates: Text templates for CLIP's class embeddings.
        augment: Random horizontal flips during training.
        seed: Seed of the random mapping.
        mapping_lr_scale: Learning-rate multiplier of the linear mapping relative to the
            prompt (1 = one shared rate, as in ILM-VP/AutoVP).
        optim: Optimizer and schedule.
    """

    kind: PromptKind = "padding"
    canvas_size: int | None = None
    inner_size: int | None = 160
    pad_width: int | None = None
    patch_size: int = 16
    pixel_range: PixelRange = "sigmoid"
    mapping: MappingChoice = "auto"
    mapping_samples: int | None = None
    templates: tuple[str, ...] = ("a photo of a {}.",)
    augment: bool = True
    seed: int = 0
    mapping_lr_scale: float = 1.0
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(optimizer="adam", lr=0.01, epochs=10, batch_size=256)
    )

    def __post_init__(self) -> None:
        if self.kind not in ("padding", "fixed-patch", "random-patch", "full", "none"):
            raise ConfigError(
                f"kind must be padding, fixed-patch, random-patch, full or none, got {self.kind!r}"
            )
        if self.mapping not in ("auto", "text", "random", "frequency", "iterative", "linear"):
            raise ConfigError(f"unknown mapping {self.mapping!r}")
        for name in ("canvas_size", "inner_size", "pad_width", "mapping_samples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer or null, got {value!r}")
        if isinstance(self.patch_size, bool) or not isinstance(self.patch_size, int):
            raise ConfigError(f"patch_size must be a positive integer, got {self.patch_size!r}")
        if self.patch_size < 1:
            raise ConfigError(f"patch_size must be a positive integer, got {self.patch_size!r}")
        for name in ("canvas_size", "inner_size", "patch_size"):
            value = getattr(self, name)
            if value is not None and value > MAX_SIDE:
                raise ConfigError(f"{name} must be at most {MAX_SIDE} pixels, got {value}")
        if self.canvas_size and self.inner_size and self.inner_size > self.canvas_size:
            raise ConfigError(
                f"inner_size {self.inner_size} exceeds canvas_size {self.canvas_size}"
            )
        if self.canvas_size and self.patch_size > self.canvas_size:
            raise ConfigError(
                f"patch_size {self.patch_size} exceeds canvas_size {self.canvas_size}"
            )
        if self.pixel_range not in ("sigmoid", "free"):
            raise ConfigError(f"pixel_range must be sigmoid or free, got {self.pixel_range!r}")
        if not self.mapping_lr_scale > 0:
            raise ConfigError(f"mapping_lr_scale must be > 0, got {self.mapping_lr_scale}")
        if self.canvas_size and self.pad_width and 2 * self.pad_width >= self.canvas_size:
            raise ConfigError(
                f"pad_width {self.pad_width} leaves no image on a {self.canvas_size} canvas"
            )


def resolve_mapping(mapping: MappingChoice, backbone: Any) -> MappingChoice:
    """``auto`` → ``text`` on CLIP, ``frequency`` on a classifier; a text mapping needs CLIP and
    CLIP needs a text mapping (ConfigError otherwise)."""
    is_text = isinstance(backbone, ImageTextBackbone)
    if mapping == "auto":
        mapping = "text" if is_text else "frequency"
    if mapping == "text" and not is_text:
        raise ConfigError(
            f"mapping=text needs a CLIP-like backbone, {backbone.name} is a classifier"
        )
    if mapping != "text" and is_text:
        raise ConfigError(f"{backbone.name} classifies through text prompts; use mapping=text/auto")
    return mapping


def _resolve(config: VisualPromptConfig, backbone: Any) -> VisualPromptConfig:
    """Fill the backbone-dependent ``None``/``auto`` fields so packs store concrete values."""
    canvas = config.canvas_size or int(backbone.preprocess.size[0])
    inner = config.inner_size or canvas
    inner = min(inner, canvas)
    # Bahng et al.'s pad prompter is 30 px wide on a 224 canvas; keep that proportion.
    pad = config.pad_width or (
        (canvas - inner) // 2 if inner < canvas else max(1, round(canvas * 30 / 224))
    )
    mapping = resolve_mapping(config.mapping, backbone)
    return dataclasses.replace(
        config, canvas_size=canvas, inner_size=inner, pad_width=pad, mapping=mapping
    )


@register_method("visual-prompt")
class VisualPrompt(PromptMethod):
    """Learned pixels around (or on) the image, read out through a label mapping.

    Learned tensors (the pack): ``pixels.prompt`` and the mapping's ``mapping.*`` state
    (source indices, the calibration flag, the linear map's weights).

    Args:
        backbone: Frozen classifier (``torchvision:…``, ``timm:…``) or CLIP backbone.
        classnames: Target classes in label order.
        config: See :class:`VisualPromptConfig`.
    """

    Config = VisualPromptConfig
    # On CLIP the mapping is the class text features of ``templates``.
    capabilities = Capabilities(inputs="images", template_field="templates")
    mean: torch.Tensor  # 1 x 3 x 1 x 1 (buffer)
    std: torch.Tensor
    class_embeddings: torch.Tensor  # C x D, CLIP backbones only (buffer)

    def __init__(
        self, backbone: Any, classnames: Sequence[str], config: VisualPromptConfig | None = None
    ) -> None:
        super().__init__(backbone, classnames, config)
        self.config = cfg = _resolve(self.config, backbone)
        assert cfg.canvas_size is not None
        assert cfg.inner_size is not None
        assert cfg.pad_width is not None
        self.pixels = PixelPrompt(
            kind=cfg.kind,
            canvas_size=cfg.canvas_size,
            inner_size=cfg.inner_size,
            pad_width=cfg.pad_width,
            patch_size=cfg.patch_size,
            pixel_range=cfg.pixel_range,
        )
        pre = backbone.preprocess
        self.register_buffer("mean", torch.tensor(pre.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pre.std).view(1, 3, 1, 1), persistent=False)
        self.mapping: LabelMapping | None = None
        if cfg.mapping == "text":
            from vprompt.methods.zeroshot import encode_class_prompts

            prompts = [[t.format(c) for t in cfg.templates] for c in self.classnames]
            self.register_buffer(
                "class_embeddings", encode_class_prompts(backbone, prompts), persistent=False
            )
        else:
            self.mapping = LabelMapping(
                kind=cast(MappingKind, cfg.mapping),
                num_source=int(backbone.num_classes),
                num_target=len(self.classnames),
                seed=cfg.seed,
            )
        self.to(self._backbone_device())

    @classmethod
    def examples(cls) -> list[MethodExample]:
        small = {"canvas_size": 64}
        return [
            MethodExample(
                "torchvision:tiny",
                {"kind": "padding", "mapping": "frequency", **small, "inner_size": 48},
            ),
            MethodExample(
                "torchvision:tiny",
                {"kind": "fixed-patch", "mapping": "linear", **small, "inner_size": 64},
            ),
            MethodExample(
                "torchvision:tiny",
                {"kind": "random-patch", "mapping": "random", **small, "inner_size": 64},
            ),
            MethodExample(
                "torchvision:tiny",
                {"kind": "full", "mapping": "iterative", **small, "inner_size": 40},
            ),
            MethodExample("clip:tiny", {"kind": "padding", "inner_size": 24}),
            MethodExample(
                "torchvision:tiny",
                {"kind": "padding", "pixel_range": "free", "mapping": "linear", "inner_size": 48},
            ),
        ]

    # ------------------------------------------------------------------ engine contract
    def check_prompt_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if self.mapping is not None:
            self.mapping.check_state(tensors, "mapping.")

    def trainable_parameters(self) -> list[Any]:
        prompt = [self.pixels.prompt] if self.pixels.prompt is not None else []
        mapping = list(self.mapping.parameters()) if self.mapping is not None else []
        if self.config.mapping_lr_scale == 1.0 or not mapping or not prompt:
            return prompt + mapping
        return [
            {"params": prompt, "lr_scale": 1.0},
            {"params": mapping, "lr_scale": self.config.mapping_lr_scale},
        ]

    def input_transform(self, train: bool) -> Callable[[Image.Image], torch.Tensor]:
        """The image resized to the inner size, in [0, 1] (flipped at random when training with
        ``augment``); batchable, so in-memory datasets skip the per-image path."""
        return ResizeToTensor(int(self.config.inner_size or 0), flip=train and self.config.augment)

    def setup(self, data: MethodData) -> None:
        """Estimate a frequency label mapping (FLM) once, before any training."""
        mapping = self.mapping
        if mapping is not None and mapping.kind == "frequency" and mapping.needs_update(0):
            self._remap(data)

    def before_epoch(self, epoch: int, data: MethodData) -> None:
        """Re-estimate an iterative label mapping (ILM) with the current prompt."""
        if self.mapping is not None and self.mapping.kind == "iterative":
            self._remap(data)

    def _remap(self, data: MethodData) -> None:
        assert self.mapping is not None
        was = self.training
        self.eval()
        device = self._backbone_device()
        self.mapping.update(
            lambda x: self.source_logits(self.pixels(x.to(device))),
            data.train(),
            max_samples=self.config.mapping_samples,
        )
        self.train(was)

    def visualizations(self, images: torch.Tensor) -> dict[str, torch.Tensor | ValueImage]:
        if self.pixels.prompt is None:
            return {}
        with torch.no_grad():
            was = self.training
            self.eval()
            prompted = self.pixels(images.to(self._backbone_device())).clamp(0, 1).cpu()
            self.train(was)
        # Contrast-stretched with its range: learned frames often span a few grey levels only.
        return {"prompt": ValueImage.stretch(self.pixels.render()), "prompted_examples": prompted}

    # ------------------------------------------------------------------ forward
    def source_logits(self, canvas: torch.Tensor) -> torch.Tensor:
        """B x 3 x canvas x canvas in [0, 1] → B x K source logits (or B x C for CLIP)."""
        pixels = (canvas - self.mean) / self.std
        if self.mapping is None:
            feats = F.normalize(self.backbone.encode_image(pixels).float(), dim=-1)
            return self.backbone.logit_scale.float() * feats @ self.class_embeddings.T
        return self.backbone(pixels)

    def forward(self, images: torch.Tensor) -> MethodOutput:
        """B x 3 x inner x inner images in [0, 1] → B x C logits."""
        logits = self.source_logits(self.pixels(images))
        if self.mapping is not None:
            logits = self.mapping(logits)
        return MethodOutput(logits=logits.float())

    # ------------------------------------------------------------------ helpers
    def _backbone_device(self) -> torch.device:
        return next(self.backbone.parameters()).device


@dataclass(frozen=True)
class MappingOnlyConfig(VisualPromptConfig):
    """No prompt: only the label mapping (the baseline every visual prompt must beat)."""

    kind: PromptKind = "none"
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(optimizer="adam", lr=0.01, epochs=0, batch_size=256)
    )


@register_method("mapping-only")
class MappingOnly(VisualPrompt):
    """Baseline: the frozen model read out through a label mapping, with no prompt.

    With ``frequency`` mapping nothing is trained (``epochs=0``; the mapping is estimated on the
    training set); with ``linear`` mapping only the linear map is trained. A variant of
    :class:`VisualPrompt` that changes only its defaults and refuses a prompt.
    """

    Config = MappingOnlyConfig

    def __init__(
        self, backbone: Any, classnames: Sequence[str], config: MappingOnlyConfig | None = None
    ) -> None:
        if config is not None and config.kind != "none":
            raise ConfigError(
                "mapping-only has no prompt; use --method visual-prompt for kind != none"
            )
        if isinstance(backbone, ImageTextBackbone):
            # Its mapping would be the text prompts: nothing left to learn or to save.
            raise ConfigError(
                f"mapping-only on {backbone.name} (an image-text model) is zero-shot "
                "classification; use --method zeroshot"
            )
        super().__init__(backbone, classnames, config)

    @classmethod
    def examples(cls) -> list[MethodExample]:
        return [
            MethodExample(
                "torchvision:tiny", {"mapping": "linear", "canvas_size": 64, "inner_size": 64}
            ),
            MethodExample("torchvision:tiny", {"mapping": "frequency", "inner_size": 48}),
        ]
