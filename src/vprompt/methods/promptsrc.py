"""PromptSRC: self-regulating deep prompts (Khattak et al., ICCV 2023).

Independent deep prompts in both towers (:mod:`vprompt.methods.ivlp`) trained with three
regularisers that keep them close to the frozen model:

* **mutual agreement** with the frozen CLIP: ``L1(text, text_frozen) · λ_t`` on unit class text
  features, ``L1(image, image_frozen) · λ_i`` on unit image features, and
  ``KL(p_frozen ‖ p_prompted)`` summed and divided by the number of logits (B x C);
* **textual diversity**: the frozen text features are the mean of the frozen model's
  (unnormalised) features over a template set (the 60 ImageNet templates), then normalised;
* **Gaussian prompt aggregation (GPA)**: after epoch t (1-based) the prompts are added to a
  running sum with weight ``N(t; μ, σ²)``, normalised over the run's epochs; after the last
  epoch the prompts become that sum.

Defaults follow muzairkhattak/PromptSRC
``configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml`` (base-to-novel): 4 + 4
tokens, depth 9 in both towers, context from ``"a photo of a"``, λ_t = 25, λ_i = 10, μ = 15,
σ = 1, batch 4, SGD 0.0025 for 20 epochs, one constant warm-up epoch at 1e-5. The losses are
``trainers/promptsrc.py``'s ``forward_backward``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from vprompt.errors import ConfigError
from vprompt.methods.base import Capabilities, MethodData, MethodExample, MethodOutput
from vprompt.methods.config import OptimConfig, check_fraction
from vprompt.methods.ivlp import IVLP, IVLPConfig
from vprompt.methods.kgcoop import check_template
from vprompt.methods.registry import register_method
from vprompt.methods.vl_prompts import vl_optim

IMAGENET_TEMPLATES_60 = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
)
"""The template set of PromptSRC's textual diversity (``trainers/imagenet_templates.py``:
``IMAGENET_TEMPLATES``, 60 of the 80 templates of CLIP's ImageNet notebook)."""


def gpa_weights(epochs: int, mean: float, std: float) -> list[float]:
    """Weight of the prompts after each epoch t = 1 … ``epochs``: the Gaussian density at t,
    normalised to sum to 1 (computed relative to the largest term, so a mean far from the run's
    epochs still gives finite weights)."""
    exponents = [-0.5 * ((t - mean) / std) ** 2 for t in range(1, epochs + 1)]
    top = max(exponents)
    terms = [math.exp(e - top) for e in exponents]
    total = sum(terms)
    return [t / total for t in terms]


@dataclass(frozen=True)
class PromptSRCConfig(IVLPConfig):
    """PromptSRC's settings; the prompt fields are :class:`~vprompt.methods.ivlp.IVLPConfig`'s.

    Attributes:
        text_loss_weight: λ_t, weight of the L1 agreement of class text features.
        image_loss_weight: λ_i, weight of the L1 agreement of image features.
        logit_loss_weight: Weight of the KL agreement of logits (1 in the paper).
        gpa_mean: μ of the Gaussian over epochs (1-based).
        gpa_std: σ of the Gaussian over epochs.
        templates: The frozen text features' template set (textual diversity).
    """

    n_ctx_text: int = 4
    n_ctx_vision: int = 4
    text_depth: int = 9
    vision_depth: int = 9
    text_loss_weight: float = 25.0
    image_loss_weight: float = 10.0
    logit_loss_weight: float = 1.0
    gpa_mean: float = 15.0
    gpa_std: float = 1.0
    templates: tuple[str, ...] = IMAGENET_TEMPLATES_60
    optim: OptimConfig = field(default_factory=lambda: vl_optim(lr=0.0025, epochs=20))

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction(self.text_loss_weight, "text_loss_weight")
        check_fraction(self.image_loss_weight, "image_loss_weight")
        check_fraction(self.logit_loss_weight, "logit_loss_weight")
        mean = check_fraction(self.gpa_mean, "gpa_mean", low=float("-inf"))
        if not math.isfinite(mean):
            raise ConfigError(f"gpa_mean must be finite, got {self.gpa_mean!r}")
        if not check_fraction(self.gpa_std, "gpa_std") > 0:
            raise ConfigError(f"gpa_std must be > 0, got {self.gpa_std!r}")
        if not self.templates or len(self.templates) > 1000:
            raise ConfigError("templates must hold 1 to 1000 templates")
        for template in self.templates:
            check_template(template, "promptsrc")


def frozen_text_features(
    backbone: Any, classnames: Sequence[str], templates: Sequence[str], chunk: int = 256
) -> torch.Tensor:
    """C x E: per class, the mean of the frozen model's unnormalised text features over the
    templates, normalised (PromptSRC's ``fixed_embeddings``)."""
    names = [name.replace("_", " ") for name in classnames]
    texts = [t.replace("{}", name) for name in names for t in templates]
    parts = []
    with torch.no_grad():
        for start in range(0, len(texts), chunk):
            tokens = backbone.tokenize(texts[start : start + chunk])
            parts.append(backbone.encode_text(tokens).float())
    feats = torch.cat(parts).view(len(names), len(templates), -1).mean(dim=1)
    return F.normalize(feats, dim=-1)


@register_method("promptsrc")
class PromptSRC(IVLP):
    """IVLP's prompts with PromptSRC's self-regulation; in training the three agreement terms
    come back as ``aux_loss`` (``scl_text``, ``scl_image``, ``scl_logits``).

    Learned tensors (the pack): IVLP's, plus ``gpa_sum`` (the prompts' running weighted sum
    over epochs, flattened; equal to the prompts once training has ended).
    """

    Config = PromptSRCConfig
    capabilities = Capabilities(inputs="images", retargets=True)
    gpa_sum: torch.Tensor

    def __init__(
        self, backbone: Any, classnames: Sequence[str], config: PromptSRCConfig | None = None
    ) -> None:
        super().__init__(backbone, classnames, config)
        size = sum(p.numel() for p in self._gpa_parameters())
        self.register_buffer("gpa_sum", torch.zeros(size, device=self.ctx.device))
        self._frozen_text: torch.Tensor | None = None

    @classmethod
    def examples(cls) -> list[MethodExample]:
        return [
            MethodExample(
                "clip:tiny",
                {
                    "n_ctx_text": 2,
                    "n_ctx_vision": 2,
                    "text_depth": 2,
                    "vision_depth": 2,
                    "templates": ["a photo of a {}.", "a drawing of the {}."],
                },
            )
        ]

    # ------------------------------------------------------------------ frozen side
    def frozen_text(self) -> torch.Tensor:
        """C x E unit frozen text features over the template set (computed on first use:
        only training needs them)."""
        if self._frozen_text is None:
            feats = frozen_text_features(self.clip, self.classnames, self.config.templates)
            self._frozen_text = feats
        return self._frozen_text.to(self.ctx.device)

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor) -> MethodOutput:
        """B x 3 x H x W images → B x C logits (+ the agreement terms in training)."""
        if not self.training:
            return super().forward(images)
        prompts = self.prompts()
        text = self.text_features_from(prompts)
        image = self.image_features_from(images, prompts)
        logits = self.logits(image, text)
        with torch.no_grad():
            frozen_text = self.frozen_text()
            frozen_image = F.normalize(self.clip.encode_image(images).float(), dim=-1)
            frozen_logits = self.logits(frozen_image, frozen_text)
        terms = self.agreement(text, image, logits, frozen_text, frozen_image, frozen_logits)
        return MethodOutput(logits=logits, aux_loss=terms)

    def agreement(
        self,
        text: torch.Tensor,
        image: torch.Tensor,
        logits: torch.Tensor,
        frozen_text: torch.Tensor,
        frozen_image: torch.Tensor,
        frozen_logits: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The three mutual-agreement terms, weighted."""
        cfg = self.config
        kl = (
            F.kl_div(
                F.log_softmax(logits, dim=1),
                F.log_softmax(frozen_logits, dim=1),
                reduction="sum",
                log_target=True,
            )
            / logits.numel()
        )
        return {
            "scl_text": F.l1_loss(text, frozen_text) * cfg.text_loss_weight,
            "scl_image": F.l1_loss(image, frozen_image) * cfg.image_loss_weight,
            "scl_logits": kl * cfg.logit_loss_weight,
        }

    # ------------------------------------------------------------------ GPA
    def _gpa_parameters(self) -> list[torch.nn.Parameter]:
        return [self.ctx, *self.text_deep, *self.vision]

    def after_epoch(self, epoch: int, data: MethodData) -> None:
        """Add the prompts after epoch ``epoch`` (0-based) to the running sum with their
        Gaussian weight; after the last epoch the prompts become the sum."""
        epochs = int(self.config.optim.epochs)
        weight = gpa_weights(epochs, self.config.gpa_mean, self.config.gpa_std)[epoch]
        params = self._gpa_parameters()
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1).float() for p in params])
            if epoch == 0:
                self.gpa_sum.copy_(flat * weight)
            else:
                self.gpa_sum.copy_(self.gpa_sum + flat * weight)
            if epoch == epochs - 1:
                offset = 0
                for p in params:
                    p.copy_(self.gpa_sum[offset : offset + p.numel()].view_as(p))
                    offset += p.numel()
