"""Deep vision-language prompts: the machinery IVLP, MaPLe, PromptSRC and their successors share.

A deep VL method learns, for a frozen CLIP ViT:

* a **text context** of M tokens after the start token, ``[SOS] [V]_1 … [V]_M <init rest>
  CLASSNAME . [EOT]`` (M and its start as the multimodal-prompt-learning PromptLearners make
  them: the first M tokens of ``ctx_init`` when M ≤ 4, the rest of the phrase frozen after them);
* **deep text prompts**: M x W tokens that replace the context positions entering text blocks
  1 … J_t - 1;
* **vision prompts**: n x D tokens appended after the patch tokens before the tower's pre-norm
  (block 0) and replacing those positions before blocks 1 … J_v - 1.

Where the prompts come from is each method's own business (:meth:`DeepVLPromptMethod.prompts`:
independent parameters for IVLP, linear couplings from the text prompts for MaPLe); the
backbone seam (:class:`~vprompt.backbones.protocols.DeepPromptBackbone`) runs both towers.
Deep text prompts are the same for every class and the tower is causal, so the start token
and context still run once per step for all classes (the shared-prefix path).

Reference code read for the details: github.com/muzairkhattak/multimodal-prompt-learning
(``trainers/maple.py``, ``trainers/independentVL.py``, ``clip/model.py``) and
github.com/muzairkhattak/PromptSRC (``trainers/promptsrc.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vprompt.backbones.protocols import DeepPromptBackbone
from vprompt.errors import ConfigError
from vprompt.methods.base import MethodOutput, PromptMethod
from vprompt.methods.clip_common import clip_input_transform
from vprompt.methods.config import OptimConfig
from vprompt.methods.coop import coop_optim
from vprompt.methods.text_context import (
    PLACEHOLDER,
    ContextInit,
    PromptAssembler,
    check_n_ctx,
    encode_prompts,
)

MAX_DEPTH = 64
"""Most prompted layers a config may ask for (ViT-bigG has 48 blocks)."""
MAX_PROMPT_TOKENS = 64
"""Most prompt tokens per layer a config may ask for (the papers use 2 to 16)."""
_PHRASE_INIT_MAX = 4  # the references initialise from the phrase only when n_ctx <= 4


def vl_optim(lr: float, epochs: int, batch_size: int = 4) -> OptimConfig:
    """The deep-VL references' Dassl optimizer: SGD at ``lr`` (momentum 0.9, weight decay
    5e-4), one constant warm-up epoch at 1e-5, cosine per epoch, last partial batch dropped."""
    base = coop_optim(epochs=epochs, batch_size=batch_size)
    return OptimConfig(**{**base.__dict__, "lr": lr})


def vl_context_init(
    backbone: DeepPromptBackbone, *, n_ctx: int, init: str, std: float
) -> ContextInit:
    """The text context as the multimodal-prompt-learning PromptLearners start it.

    With an ``init`` phrase and ``n_ctx`` ≤ 4, the context is the embeddings of the phrase's
    first ``n_ctx`` tokens and the whole phrase is tokenized at the context positions (MaPLe's
    2 tokens from ``"a photo of a"`` leave ``"of a"`` frozen after them). Otherwise ``n_ctx``
    vectors are drawn with ``nn.init.normal_(std)`` from the global generator.

    Raises:
        ConfigError: ``n_ctx`` does not fit the text context, or the phrase has fewer tokens
            than ``n_ctx`` (the reference would then learn its end-of-text token).
    """
    check_n_ctx(backbone, n_ctx)
    phrase = init.replace("_", " ").strip()
    if phrase and n_ctx <= _PHRASE_INIT_MAX:
        tokens = backbone.tokenize([phrase])
        count = int(backbone.eot_index(tokens)[0]) - 1
        if count < n_ctx:
            raise ConfigError(
                f"ctx_init {init!r} has {count} tokens, fewer than the {n_ctx} context tokens "
                "it should initialise"
            )
        with torch.no_grad():
            embedded = backbone.embed_tokens(tokens)[0]
        return ContextInit(embedded[1 : 1 + n_ctx].float().clone(), phrase)
    vectors = torch.empty(n_ctx, int(backbone.text_width))
    nn.init.normal_(vectors, std=std)
    return ContextInit(vectors, " ".join([PLACEHOLDER] * n_ctx))


def normal_prompts(layers: int, tokens: int, width: int, std: float) -> nn.ParameterList:
    """``layers`` independent ``tokens x width`` parameters drawn N(0, std²) in order."""
    params = nn.ParameterList()
    for _ in range(layers):
        vectors = torch.empty(tokens, width)
        nn.init.normal_(vectors, std=std)
        params.append(nn.Parameter(vectors))
    return params


def require_deep_prompts(backbone: Any, method: str) -> DeepPromptBackbone:
    """``backbone`` as a CLIP ViT whose towers take deep prompts, or a one-line error."""
    name = getattr(backbone, "name", type(backbone).__name__)
    if not isinstance(backbone, DeepPromptBackbone) or not getattr(backbone, "is_vit", False):
        raise ConfigError(
            f"{method} prompts both towers of a CLIP vision transformer (e.g. clip:ViT-B-16); "
            f"{name} is not one"
        )
    if backbone.text_layers < 1:
        raise ConfigError(f"{method}: {name}'s text tower does not take token prompts")
    return backbone


def check_depths(backbone: DeepPromptBackbone, method: str, *, text: int, vision: int) -> None:
    """Refuse prompt depths beyond the towers' blocks, naming the tower."""
    towers = (("text", text, backbone.text_layers), ("vision", vision, len(backbone.vision_blocks)))
    for tower, depth, blocks in towers:
        if depth > blocks:
            raise ConfigError(
                f"{method}: {tower} prompt depth {depth} is more than {backbone.name}'s "
                f"{blocks} {tower} blocks"
            )


class VLPrompts(NamedTuple):
    """One step's prompts for both towers.

    Attributes:
        ctx: M x W text context (block 0's prompt positions).
        text_deep: J_t - 1 tensors of M x W, entering text blocks 1 …
        vision: J_v tensors of n x D (empty: the vision tower runs unprompted).
    """

    ctx: torch.Tensor
    text_deep: list[torch.Tensor]
    vision: list[torch.Tensor]


class DeepVLPromptMethod(PromptMethod):
    """The shared body of IVLP, MaPLe, PromptSRC …: prompted image and text features and the
    CLIP logits between them. A subclass builds its parameters after ``super().__init__``
    (calling :meth:`init_text` first, as the references build the context first) and defines
    :meth:`prompts`.

    Shapes: B images, C classes, E joint embedding size.
    """

    assembler: PromptAssembler
    ctx: nn.Parameter

    def __init__(self, backbone: Any, classnames: Sequence[str], config: Any = None) -> None:
        super().__init__(backbone, classnames, config)
        require_deep_prompts(backbone, self.name)
        self._text_key: tuple[tuple[int, int], ...] | None = None
        self._text_value: torch.Tensor | None = None

    def init_text(self, *, n_ctx: int, ctx_init: str, std: float) -> None:
        """Create ``ctx`` (M x W) and the class prompt assembler."""
        start = vl_context_init(self.clip, n_ctx=n_ctx, init=ctx_init, std=std)
        self.ctx = nn.Parameter(start.vectors)
        # The class prompts: [SOS] <context> <rest of the init phrase> NAME . [EOT]
        self.assembler = PromptAssembler(
            self.clip, self.classnames, n_ctx=start.n_ctx, prompt_prefix=start.prompt_prefix
        )

    @property
    def clip(self) -> DeepPromptBackbone:
        """The backbone, typed as the deep-prompt seam it was checked to be."""
        backbone: DeepPromptBackbone = self.backbone
        return backbone

    # ------------------------------------------------------------------ the method's own
    def prompts(self) -> VLPrompts:
        """This step's prompts for both towers (differentiable); each method defines it."""
        raise NotImplementedError(f"{type(self).__name__} builds no prompts (define prompts())")

    # ------------------------------------------------------------------ features
    def text_features_from(self, prompts: VLPrompts) -> torch.Tensor:
        """C x E unit-norm class text features of ``prompts`` (every step while training)."""
        chunk = getattr(self.config, "class_chunk", None)
        raw = encode_prompts(
            self.clip,
            self.assembler,
            prompts.ctx,
            chunk=chunk,
            checkpointed=chunk is not None,
            deep=prompts.text_deep,
            normalize=False,
        )
        return F.normalize(self.adapt_text(raw), dim=-1)

    def adapt_text(self, features: torch.Tensor) -> torch.Tensor:
        """C x E text features before normalisation → what is normalised (default: as is;
        CoPrompt adds its residual adapter here)."""
        return features

    def adapt_image(self, features: torch.Tensor) -> torch.Tensor:
        """B x E image features before normalisation → what is normalised (default: as is)."""
        return features

    def text_features(self) -> torch.Tensor:
        """C x E unit-norm class text features of the current prompts; outside training they
        are computed once per prompt value (so inference costs what zero-shot costs)."""
        if self.training or torch.is_grad_enabled():
            return self.text_features_from(self.prompts())
        key = tuple((t._version, t.data_ptr()) for t in self.prompt_tensors().values())
        if self._text_value is None or self._text_key != key:
            self._text_key, self._text_value = key, self.text_features_from(self.prompts())
        return self._text_value

    def image_features_from(self, images: torch.Tensor, prompts: VLPrompts) -> torch.Tensor:
        """B x E unit-norm prompted image features."""
        raw = self.clip.encode_image_prompted(images, prompts.vision).float()
        return F.normalize(self.adapt_image(raw), dim=-1)

    def logits(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """B x C scaled cosines between unit image and class text features."""
        return self.clip.logit_scale.float() * image.float() @ text.float().T

    def forward(self, images: torch.Tensor) -> MethodOutput:
        """B x 3 x H x W images → B x C logits of the prompted towers."""
        prompts = self.prompts()
        text = self.text_features_from(prompts) if self.training else self.text_features()
        return MethodOutput(logits=self.logits(self.image_features_from(images, prompts), text))

    # ------------------------------------------------------------------ contract
    def input_transform(self, train: bool) -> Callable[[Image.Image], torch.Tensor]:
        return clip_input_transform(self.backbone, train and self.config.augment)

    def extra_repr(self) -> str:
        return f"backbone={self.clip.name}, classes={len(self.classnames)}"
