"""ProGrad: CoOp updated only where it keeps zero-shot knowledge (Zhu et al., ICCV 2023).

Each step computes two gradients of the context: ``g_ce`` of the training loss and ``g_kl`` of
the distillation loss ``T² · KL(softmax(z_zs / T) ‖ softmax(z / T))`` toward zero-shot CLIP with
the hand-crafted template. Where they conflict (negative cosine), the update drops ``λ`` times
the component of ``g_ce`` along ``g_kl``::

    g = g_ce − λ (g_ce · ĝ_kl) ĝ_kl   if g_ce · g_kl < 0,   else g_ce.

The method does this in :meth:`ProGrad.backward`, the engine's backward hook; one projection per
trainable tensor, as Dassl's ``prograd_backward_and_update`` does.

Defaults follow BeierZhu/Prompt-align: ``ProGrad.public/configs/trainers/ProGrad/rn50.yaml``
(batch 32, SGD lr 0.002, 200 epochs, 1 constant warm-up epoch at 1e-5, cosine, ``LOSS.T 1.0``,
``CTX_INIT: True``), ``scripts/prograd.sh`` (``LAMBDA=1.0``, 16 context tokens, end position) and
``trainers/prograd.py`` (the context initialisation from the dataset template, the KD loss).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image

from vprompt.backbones.protocols import ImageTextBackbone
from vprompt.errors import ConfigError
from vprompt.methods.base import Capabilities, MethodExample, MethodOutput, PromptMethod
from vprompt.methods.clip_common import (
    CLIP_IMAGE_FEATURES,
    clip_input_transform,
    clip_logits,
    require_image_text,
    unit_image_features,
)
from vprompt.methods.config import OptimConfig
from vprompt.methods.coop import CoOpConfig, coop_optim
from vprompt.methods.kgcoop import check_template, template_text_features
from vprompt.methods.registry import register_method
from vprompt.methods.text_context import (
    ContextInit,
    ContextTextFeatures,
    check_n_ctx,
    learned_context,
    refuse_class_specific,
)


@dataclass(frozen=True)
class ProGradOutput(MethodOutput):
    """ProGrad's forward output: the logits plus, in training, the zero-shot teacher's.

    Attributes:
        zeroshot_logits: B x C logits of zero-shot CLIP with the hand-crafted template on the
            same images (no gradient); None outside training.
    """

    zeroshot_logits: torch.Tensor | None = None


@dataclass(frozen=True)
class ProGradConfig(CoOpConfig):
    """ProGrad's settings (few-shot defaults of the reference); the remaining fields are
    :class:`~vprompt.methods.coop.CoOpConfig`'s.

    Attributes:
        n_ctx: M (16).
        init_from_template: Without ``ctx_init``, initialise the context from the template as
            the reference's ``CTX_INIT: True`` does (:func:`template_init`); false for
            N(0, 0.02²) random vectors.
        template: The zero-shot teacher's prompt and the context's initial phrase; runs on a
            benchmark dataset take ProGrad's own template for it (``reference_settings``).
        grad_lambda: λ, how much of the conflicting component is removed (``LOSS.LAMBDA``; the
            paper uses 0.8 for 8/16 shots on Flowers102, DTD and EuroSAT).
        temperature: T of the distillation loss (``LOSS.T``).
        optim: Batch 32, 200 epochs (the 8/16-shot setting), Dassl's CoOp optimizer.
    """

    n_ctx: int = 16
    init_from_template: bool = True
    template: str = "a photo of a {}."
    grad_lambda: float = 1.0
    temperature: float = 1.0
    optim: OptimConfig = field(default_factory=lambda: coop_optim(epochs=200, batch_size=32))

    def __post_init__(self) -> None:
        super().__post_init__()
        check_template(self.template, "prograd")
        if not self.grad_lambda >= 0:
            raise ConfigError(f"grad_lambda must be >= 0, got {self.grad_lambda!r}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature!r}")


def template_init(backbone: ImageTextBackbone, template: str, n_ctx: int) -> ContextInit | None:
    """ProGrad's initial context from the dataset template, as its reference builds it.

    The phrase is the template without its trailing ``" {}."`` (for a template whose class
    name is not at the end, the words before ``{}``); its word count P fills the last P of the
    M context positions with the embeddings of its first P tokens, the others start at zero,
    and the prompts are tokenized with ``"X" * (M - P)`` plus the phrase at the context
    positions, so a phrase with more tokens than words (``"pet,"``) keeps the rest frozen after
    the context. None when the template has no words before the class name.

    Raises:
        ConfigError: The phrase has more words than M (the reference asserts the same).
    """
    phrase = template.replace(" {}.", "").replace("_", " ")
    if "{}" in phrase:
        phrase = template.split("{}", 1)[0].strip().replace("_", " ")
    if not phrase.strip():
        return None
    p = len(phrase.split(" "))
    check_n_ctx(backbone, n_ctx)
    if p > n_ctx:
        raise ConfigError(
            f"prograd: template {template!r} has {p} words before the class name, more than "
            f"n_ctx={n_ctx}; raise n_ctx or set init_from_template=false"
        )
    with torch.no_grad():
        embedded = backbone.embed_tokens(backbone.tokenize([phrase]))[0]
    vectors = torch.zeros(n_ctx, embedded.shape[-1])
    vectors[n_ctx - p :] = embedded[1 : 1 + p].float()
    prefix = " ".join(["X"] * (n_ctx - p))
    return ContextInit(vectors, f"{prefix} {phrase}")


def project_conflicting(grad: torch.Tensor, reference: torch.Tensor, lam: float) -> torch.Tensor:
    """``grad − λ (grad · r̂) r̂`` when ``grad · reference < 0``, else ``grad`` (any shape).

    A zero ``reference`` leaves ``grad`` unchanged. No host synchronisation.
    """
    norm = reference.norm()
    unit = torch.where(norm > 0, reference / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0.0)
    dot = (grad * unit).sum()
    return grad - lam * dot.clamp(max=0.0) * unit


@register_method("prograd")
class ProGrad(PromptMethod):
    """Prompt-aligned gradient: CoOp's loss, its update projected off the zero-shot conflict.

    :meth:`forward_features` returns a :class:`ProGradOutput` (with the zero-shot logits in
    training); the engine then calls :meth:`backward` instead of ``loss.backward()``.
    Learned tensors: ``ctx``.
    """

    Config = ProGradConfig
    capabilities = Capabilities(
        inputs="image-features",
        retargets=True,
        template_field="template",
        custom_backward=True,
    )
    feature_kind = CLIP_IMAGE_FEATURES
    # trainers/prograd.py CUSTOM_TEMPLATES, where they differ from the datasets' own.
    reference_settings: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "oxford_pets": {"template": "a type of pet, a photo of a {}."},
        "oxford_flowers": {"template": "a type of flower, a photo of a {}."},
        "fgvc_aircraft": {"template": "a type of aircraft, a photo of a {}."},
        "dtd": {"template": "a texture of {}."},
        "food101": {"template": "a type of food, a photo of {}."},
    }
    state_hint = "(n_ctx, class-specific context and classes must match)"
    handcrafted: torch.Tensor  # C x D, unit norm (buffer, rebuilt from the template)

    def __init__(
        self,
        backbone: ImageTextBackbone,
        classnames: Sequence[str],
        config: ProGradConfig | None = None,
    ) -> None:
        super().__init__(backbone, classnames, config)
        clip = require_image_text(backbone, "prograd")
        cfg = self.config
        start = None
        if cfg.init_from_template and not cfg.ctx_init.strip():
            start = template_init(clip, cfg.template, cfg.n_ctx)
        self.ctx, self.assembler, self.config = learned_context(clip, self.classnames, cfg, start)
        self._text = ContextTextFeatures(clip, self.assembler, self.config.class_chunk)
        hand = template_text_features(clip, self.classnames, cfg.template)
        self.register_buffer("handcrafted", hand, persistent=False)
        self.to(clip.logit_scale.device)

    @classmethod
    def examples(cls) -> list[MethodExample]:
        return [
            MethodExample("clip:tiny", {"n_ctx": 8}),
            MethodExample(
                "clip:tiny",
                {"init_from_template": False, "n_ctx": 4, "class_token_position": "middle"},
            ),
        ]

    def text_features(self) -> torch.Tensor:
        """C x D unit-norm class text features of the learned context."""
        return self._text(self.ctx, training=self.training)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return unit_image_features(self.backbone, pixels)

    def forward_features(self, features: torch.Tensor) -> ProGradOutput:
        """B x D unit-norm image features → B x C logits (+ zero-shot logits in training)."""
        logits = clip_logits(self.backbone, features, self.text_features())
        if not self.training:
            return ProGradOutput(logits=logits)
        with torch.no_grad():
            zeroshot = clip_logits(self.backbone, features, self.handcrafted)
        return ProGradOutput(logits=logits, zeroshot_logits=zeroshot)

    def input_transform(self, train: bool) -> Callable[[Image.Image], torch.Tensor]:
        return clip_input_transform(self.backbone, train and self.config.augment)

    def distill_loss(self, logits: torch.Tensor, zeroshot_logits: torch.Tensor) -> torch.Tensor:
        """T² · KL(softmax(zero-shot / T) ‖ softmax(logits / T)), summed over classes and
        averaged over the B images.

        The reference writes it as the soft-target cross-entropy; the two differ by the
        teacher's entropy, a constant, so their gradients are equal.
        """
        t = self.config.temperature
        student = F.log_softmax(logits.float() / t, dim=-1)
        teacher = F.log_softmax(zeroshot_logits.float() / t, dim=-1)
        kl = F.kl_div(student, teacher, reduction="batchmean", log_target=True)
        return kl * (t * t)

    def backward(self, loss: torch.Tensor, output: MethodOutput, labels: torch.Tensor) -> None:
        """Fill ``.grad`` of the context with the projected gradient of ``loss``.

        Args:
            loss: The engine's training loss (cross-entropy plus any auxiliary terms).
            output: This step's :meth:`forward_features` output, in training mode.
            labels: B class indices (the loss already holds them; unused here).
        """
        del labels
        if not isinstance(output, ProGradOutput) or output.zeroshot_logits is None:
            raise ValueError(
                "ProGrad.backward needs the training-mode output of ProGrad's forward "
                "(with zero-shot logits)"
            )
        params = [p for p in self.trainable_parameters() if p.requires_grad]
        kl = self.distill_loss(output.logits, output.zeroshot_logits)
        kl_grads = torch.autograd.grad(kl, params, retain_graph=True, allow_unused=True)
        loss.backward()
        lam = self.config.grad_lambda
        for param, kl_grad in zip(params, kl_grads, strict=True):
            if param.grad is not None and kl_grad is not None:
                param.grad = project_conflicting(param.grad, kl_grad, lam)

    def retarget(
        self,
        classnames: Sequence[str],
        *,
        templates: Sequence[str] | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> Any:
        """The learned context on other classes, with ``templates`` (one) as the teacher."""
        refuse_class_specific(self.name, self.config)
        return super().retarget(classnames, templates=templates, settings=settings)

    def extra_repr(self) -> str:
        return (
            f"backbone={self.backbone.name}, classes={len(self.classnames)}, "
            f"n_ctx={self.config.n_ctx}, grad_lambda={self.config.grad_lambda}"
        )
