"""Architecture tables for the ``sam3:`` family: hub ids, and configs for random-init builds.

``sam3:large`` is the released SAM 3 detector (``facebook/sam3``); its shapes are
``Sam3Config``'s defaults (a 1008-pixel ViT-L/14 with 32 layers, a 24-layer CLIP-style text
encoder with a 32-token context, 6-layer DETR encoder and decoder with 200 queries), so
``--weights none`` builds it from an empty override. ``sam3:tiny`` is test-only: every part
present, each as small as ``Sam3Model`` accepts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The model_types a checkpoint's config may carry: a bare detector (what ``save_pretrained``
# of a ``Sam3Model`` writes) or the released image + video checkpoint, whose detector half
# ``Sam3Model`` loads on its own (it reads ``detector_config`` and skips the tracker weights).
MODEL_TYPE = "sam3"
VIDEO_MODEL_TYPE = "sam3_video"

# Sam3Processor pads and caps every prompt at 32 tokens (start and end tokens included), the
# text encoder's position table.
TEXT_CONTEXT = 32


@dataclass(frozen=True)
class Sam3Arch:
    """One ``sam3:ARCH`` entry.

    Attributes:
        hub_id: Default weights (a Hugging Face repo id); empty for test-only architectures.
        config: ``Sam3Config`` keyword overrides for a random-init build (``--weights none``).
    """

    hub_id: str
    config: dict[str, Any] = field(default_factory=dict)


# Test-only sizes: a 64-pixel input, 8-pixel patches (an 8 x 8 grid, windows of 4, position
# table tiled from 4 x 4 as the released 336 → 1008 one is), FPN levels 32, 16, 8 and 4, 8
# queries. The wide init spreads scores and mask logits, so parity tests compare decisions
# that are not all on the threshold.
TINY_SIDE = 64
_TINY_INIT = 0.2
_TINY_WIDTH = 32


def _tiny_config() -> dict[str, Any]:
    def part(**kwargs: Any) -> dict[str, Any]:
        return {**kwargs, "initializer_range": _TINY_INIT}

    blocks = {"hidden_size": _TINY_WIDTH, "num_attention_heads": 2, "intermediate_size": 64}
    return {
        "vision_config": part(
            backbone_config=part(
                model_type="sam3_vit_model",
                hidden_size=_TINY_WIDTH,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=TINY_SIDE,
                patch_size=8,
                window_size=4,
                global_attn_indexes=[1],
                pretrain_image_size=TINY_SIDE // 2,
            ),
            fpn_hidden_size=_TINY_WIDTH,
            backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]],
        ),
        "text_config": part(
            model_type="clip_text_model",
            hidden_size=_TINY_WIDTH,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            projection_dim=_TINY_WIDTH,
            max_position_embeddings=TEXT_CONTEXT,
        ),
        "geometry_encoder_config": part(num_layers=1, **blocks),
        "detr_encoder_config": part(num_layers=1, **blocks),
        "detr_decoder_config": part(num_layers=1, num_queries=8, **blocks),
        # GroupNorm(8, hidden) in the pixel decoder needs a width divisible by 8.
        "mask_decoder_config": part(hidden_size=_TINY_WIDTH, num_attention_heads=2),
        "initializer_range": _TINY_INIT,
    }


ARCHS: dict[str, Sam3Arch] = {
    "large": Sam3Arch("facebook/sam3"),
    "tiny": Sam3Arch("", _tiny_config()),
}

TINY_ARCHS = ("tiny",)
