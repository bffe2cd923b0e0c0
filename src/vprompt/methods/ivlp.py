"""IVLP: independent deep prompts in both CLIP towers (the MaPLe paper's baseline).

Khattak et al., "MaPLe: Multi-modal Prompt Learning", CVPR 2023, Table 1's "IVLP" row: the
text tower learns a context after the start token and fresh tokens at its first J_t blocks,
the vision tower learns n tokens appended to its sequence at its first J_v blocks, with no link
between the two (MaPLe couples them; :mod:`vprompt.methods.maple`).

Defaults follow muzairkhattak/multimodal-prompt-learning
``configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml``: 2 text and 2 vision tokens, depth
12 in both towers, text context from ``"a photo of a"``, batch 4, SGD 0.0035 for 5 epochs with
one constant warm-up epoch at 1e-5. Every prompt not taken from the phrase is drawn
N(0, 0.02²) (``clip/model.py``: ``ResidualAttentionBlock_IVLP`` and ``VisionTransformer``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vprompt.methods.base import Capabilities, MethodExample
from vprompt.methods.config import OptimConfig, check_fraction, check_int
from vprompt.methods.registry import register_method
from vprompt.methods.vl_prompts import (
    MAX_DEPTH,
    MAX_PROMPT_TOKENS,
    DeepVLPromptMethod,
    VLPrompts,
    check_depths,
    normal_prompts,
    vl_optim,
)


@dataclass(frozen=True)
class IVLPConfig:
    """Independent vision-language prompts.

    Attributes:
        n_ctx_text: M, learned text tokens per layer (the first M tokens of ``ctx_init`` when
            M ≤ 4, as in the reference).
        n_ctx_vision: n, learned vision tokens per layer.
        ctx_init: Phrase the text context starts from (empty: N(0, init_std²)).
        text_depth: J_t ≥ 1: text blocks 0 … J_t - 1 get prompts (1: the input only).
        vision_depth: J_v ≥ 0: vision blocks 0 … J_v - 1 get prompts (0: no vision prompts).
        init_std: Standard deviation of the randomly initialised prompts.
        augment: Random resized crop and flip for training, as the reference configs do.
        class_chunk: Classes per text-encoder call with activation checkpointing (bounds
            memory for 1000 classes); None runs all classes at once.
        optim: Optimizer and schedule.
    """

    n_ctx_text: int = 2
    n_ctx_vision: int = 2
    ctx_init: str = "a photo of a"
    text_depth: int = 12
    vision_depth: int = 12
    init_std: float = 0.02
    augment: bool = True
    class_chunk: int | None = None
    optim: OptimConfig = field(default_factory=lambda: vl_optim(lr=0.0035, epochs=5))

    def __post_init__(self) -> None:
        check_int(self.n_ctx_text, "n_ctx_text", 1, MAX_PROMPT_TOKENS)
        check_int(self.n_ctx_vision, "n_ctx_vision", 1, MAX_PROMPT_TOKENS)
        check_int(self.text_depth, "text_depth", 1, MAX_DEPTH)
        check_int(self.vision_depth, "vision_depth", 0, MAX_DEPTH)
        check_fraction(self.init_std, "init_std")
        if self.class_chunk is not None:
            check_int(self.class_chunk, "class_chunk", 1, 1 << 20)


@register_method("ivlp")
class IVLP(DeepVLPromptMethod):
    """Independent deep prompts in both towers; cross-entropy on the prompted CLIP logits.

    Learned tensors (the pack): ``ctx`` (M x W), ``text_deep.{k}`` (M x W, text block k + 1),
    ``vision.{k}`` (n x D, vision block k).
    """

    Config = IVLPConfig
    capabilities = Capabilities(inputs="images", retargets=True)
    state_hint = "(token counts and depths must match)"

    def __init__(
        self, backbone: Any, classnames: Sequence[str], config: IVLPConfig | None = None
    ) -> None:
        super().__init__(backbone, classnames, config)
        cfg = self.config
        check_depths(self.clip, self.name, text=cfg.text_depth, vision=cfg.vision_depth)
        self.init_text(n_ctx=cfg.n_ctx_text, ctx_init=cfg.ctx_init, std=cfg.init_std)
        width_t, width_v = int(self.clip.text_width), int(self.clip.vision_width)
        self.text_deep = normal_prompts(
            cfg.text_depth - 1, self.ctx.shape[0], width_t, cfg.init_std
        )
        self.vision = normal_prompts(cfg.vision_depth, cfg.n_ctx_vision, width_v, cfg.init_std)
        self.to(self.clip.logit_scale.device)

    @classmethod
    def examples(cls) -> list[MethodExample]:
        return [
            MethodExample("clip:tiny", {"text_depth": 2, "vision_depth": 2}),
            MethodExample(
                "clip:tiny",
                {"n_ctx_text": 3, "ctx_init": "", "text_depth": 1, "vision_depth": 0},
            ),
        ]

    def prompts(self) -> VLPrompts:
        return VLPrompts(self.ctx, list(self.text_deep), list(self.vision))
