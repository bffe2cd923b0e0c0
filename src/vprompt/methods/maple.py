"""MaPLe: multi-modal prompt learning (Khattak et al., CVPR 2023).

Text prompts at the first J blocks of the text tower; the vision prompts at the same blocks are
generated from them by one linear coupling function per block (text width W → vision width D),
so the two towers' prompts learn together: ``vision_0 = proj(ctx)`` enters the vision tower with
its tokens, ``vision_k = proj_k(text_k)`` replaces them before vision block k.

Defaults follow muzairkhattak/multimodal-prompt-learning
``configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml`` (base-to-novel, few-shot): J = 9,
2 tokens from ``"a photo of a"`` (``"of a"`` stays frozen after them), batch 4, SGD 0.0035 for
5 epochs, one constant warm-up epoch at 1e-5; the cross-dataset config uses J = 3, 2 epochs at
0.0026 (preset ``maple/cross-dataset``). Parameters are created in the reference's order
(``MultiModalPromptLearner.__init__``): the context, ``proj``, the deep text prompts
(N(0, 0.02²) each), then one ``Linear`` whose copies are every deep coupling, so all deep
couplings start equal as in ``_get_clones``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

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
class MaPLeConfig:
    """MaPLe's settings.

    Attributes:
        n_ctx: Learned tokens per layer in both towers (``N_CTX``).
        ctx_init: Phrase the text context starts from when ``n_ctx`` ≤ 4 (``CTX_INIT``);
            otherwise, or when empty, N(0, init_std²).
        depth: J ≥ 1, the prompted blocks of both towers (``PROMPT_DEPTH``; 1 is shallow
            MaPLe: the input only).
        init_std: Standard deviation of the deep text prompts (and of a random context).
        augment: Random resized crop and flip for training, as the reference configs do.
        class_chunk: Classes per text-encoder call with activation checkpointing; None runs
            all classes at once.
        optim: Optimizer and schedule.
    """

    n_ctx: int = 2
    ctx_init: str = "a photo of a"
    depth: int = 9
    init_std: float = 0.02
    augment: bool = True
    class_chunk: int | None = None
    optim: OptimConfig = field(default_factory=lambda: vl_optim(lr=0.0035, epochs=5))

    def __post_init__(self) -> None:
        check_int(self.n_ctx, "n_ctx", 1, MAX_PROMPT_TOKENS)
        check_int(self.depth, "depth", 1, MAX_DEPTH)
        check_fraction(self.init_std, "init_std")
        if self.class_chunk is not None:
            check_int(self.class_chunk, "class_chunk", 1, 1 << 20)


@register_method("maple")
class MaPLe(DeepVLPromptMethod):
    """Multi-modal prompt learning: deep text prompts coupled into the vision tower.

    Learned tensors (the pack): ``ctx`` (M x W), ``text_deep.{k}`` (M x W, text block k + 1),
    ``proj`` (W → D, block 0's coupling), ``couplings.{k}`` (W → D, block k + 1's).
    """

    Config = MaPLeConfig
    capabilities = Capabilities(inputs="images", retargets=True)
    state_hint = "(n_ctx and depth must match)"

    def __init__(
        self, backbone: Any, classnames: Sequence[str], config: MaPLeConfig | None = None
    ) -> None:
        super().__init__(backbone, classnames, config)
        cfg = self.config
        check_depths(self.clip, self.name, text=cfg.depth, vision=cfg.depth)
        self.init_text(n_ctx=cfg.n_ctx, ctx_init=cfg.ctx_init, std=cfg.init_std)
        width_t, width_v = int(self.clip.text_width), int(self.clip.vision_width)
        m = self.ctx.shape[0]
        self.proj = nn.Linear(width_t, width_v)
        self.text_deep = normal_prompts(cfg.depth - 1, m, width_t, cfg.init_std)
        coupling = nn.Linear(width_t, width_v)
        self.couplings = nn.ModuleList(copy.deepcopy(coupling) for _ in range(cfg.depth - 1))
        self.to(self.clip.logit_scale.device)

    @classmethod
    def examples(cls) -> list[MethodExample]:
        return [
            MethodExample("clip:tiny", {"depth": 2}),
            MethodExample("clip:tiny", {"n_ctx": 3, "ctx_init": "", "depth": 1}),
        ]

    def prompts(self) -> VLPrompts:
        text = list(self.text_deep)
        vision = [self.proj(self.ctx)] + [f(t) for f, t in zip(self.couplings, text, strict=True)]
        return VLPrompts(self.ctx, text, vision)
