"""Architecture tables for the SAM family: hub ids, and configs for random-init builds.

``--weights none`` builds an architecture from these configs without touching the network
(benchmarks time real-sized models with random weights); the ``tiny*`` architectures are small
enough to build and run in tests on CPU. Shapes of the published checkpoints come from the
SAM, SAM-HQ, SAM 2 and EdgeTAM papers' released configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

SamKind = Literal["sam", "sam-hq", "sam2", "edgetam"]

# The model_type each kind's transformers config carries (a loaded checkpoint must match).
MODEL_TYPES: dict[SamKind, str] = {
    "sam": "sam",
    "sam-hq": "sam_hq",
    "sam2": "sam2",
    "edgetam": "edgetam",
}


@dataclass(frozen=True)
class SamArch:
    """One ``sam:ARCH`` entry.

    Attributes:
        kind: Which transformers model class runs it.
        hub_id: Default weights (a Hugging Face repo id); empty for test-only architectures.
        config: Keyword overrides for a random-init build (``--weights none``).
    """

    kind: SamKind
    hub_id: str
    config: dict[str, Any] = field(default_factory=dict)


def _vit(hidden: int, layers: int, heads: int, global_attn: list[int]) -> dict[str, Any]:
    return {
        "vision_config": {
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "global_attn_indexes": global_attn,
        }
    }


def _hiera(
    hidden: int,
    blocks: list[int],
    heads: list[int],
    global_blocks: list[int],
    windows: list[int],
    background: list[int],
) -> dict[str, Any]:
    dims = [hidden * 2**i for i in range(4)]
    return {
        "vision_config": {
            "backbone_config": {
                "model_type": "sam2_hiera_det_model",
                "hidden_size": hidden,
                "num_attention_heads": heads[0],
                "blocks_per_stage": blocks,
                "embed_dim_per_stage": dims,
                "num_attention_heads_per_stage": heads,
                "global_attention_blocks": global_blocks,
                "window_size_per_stage": windows,
                "window_positional_embedding_background_size": background,
            },
            "backbone_channel_list": dims[::-1],
        }
    }


_VIT_B = _vit(768, 12, 12, [2, 5, 8, 11])
_VIT_L = _vit(1024, 24, 16, [5, 11, 17, 23])
_VIT_H = _vit(1280, 32, 16, [7, 15, 23, 31])
_HIERA_T = _hiera(96, [1, 2, 7, 2], [1, 2, 4, 8], [5, 7, 9], [8, 4, 14, 7], [7, 7])
_HIERA_S = _hiera(96, [1, 2, 11, 2], [1, 2, 4, 8], [7, 10, 13], [8, 4, 14, 7], [7, 7])
_HIERA_B = _hiera(112, [2, 3, 16, 3], [2, 4, 8, 16], [12, 16, 20], [8, 4, 14, 7], [14, 14])
_HIERA_L = _hiera(144, [2, 6, 36, 4], [2, 4, 8, 16], [23, 33, 43], [8, 4, 16, 8], [7, 7])

# Test-only sizes: a 256-pixel input, 16 x 16 embeddings, 64 x 64 low-res masks.
TINY_SIDE = 256
_TINY_PROMPT = {"hidden_size": 32, "image_size": TINY_SIDE, "patch_size": 16}
_TINY_DECODER = {
    "hidden_size": 32,
    "mlp_dim": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "iou_head_hidden_dim": 32,
}
_TINY_VIT = {
    "vision_config": {
        "hidden_size": 32,
        "output_channels": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "mlp_dim": 64,
        "image_size": TINY_SIDE,
        "patch_size": 16,
        "window_size": 4,
        "global_attn_indexes": [1],
        "num_pos_feats": 16,
    },
    "prompt_encoder_config": {**_TINY_PROMPT, "mask_input_channels": 4},
    "mask_decoder_config": _TINY_DECODER,
}
_TINY_HIERA = {
    "vision_config": {
        "backbone_config": {
            "model_type": "sam2_hiera_det_model",
            "hidden_size": 16,
            "num_attention_heads": 1,
            "image_size": [TINY_SIDE, TINY_SIDE],
            "blocks_per_stage": [1, 1, 2, 1],
            "embed_dim_per_stage": [16, 32, 64, 128],
            "num_attention_heads_per_stage": [1, 1, 2, 2],
            "window_size_per_stage": [8, 4, 4, 4],
            "global_attention_blocks": [3],
            "window_positional_embedding_background_size": [4, 4],
        },
        "backbone_channel_list": [128, 64, 32, 16],
        "backbone_feature_sizes": [[64, 64], [32, 32], [16, 16]],
        "fpn_hidden_size": 32,
    },
    "prompt_encoder_config": {**_TINY_PROMPT, "mask_input_channels": 4},
    "mask_decoder_config": _TINY_DECODER,
}

ARCHS: dict[str, SamArch] = {
    "vit-base": SamArch("sam", "facebook/sam-vit-base", _VIT_B),
    "vit-large": SamArch("sam", "facebook/sam-vit-large", _VIT_L),
    "vit-huge": SamArch("sam", "facebook/sam-vit-huge", _VIT_H),
    "hq-vit-base": SamArch("sam-hq", "syscv-community/sam-hq-vit-base", _VIT_B),
    "hq-vit-large": SamArch("sam-hq", "syscv-community/sam-hq-vit-large", _VIT_L),
    "hq-vit-huge": SamArch("sam-hq", "syscv-community/sam-hq-vit-huge", _VIT_H),
    "sam2-hiera-tiny": SamArch("sam2", "facebook/sam2-hiera-tiny-hf", _HIERA_T),
    "sam2-hiera-small": SamArch("sam2", "facebook/sam2-hiera-small-hf", _HIERA_S),
    "sam2-hiera-base-plus": SamArch("sam2", "facebook/sam2-hiera-base-plus-hf", _HIERA_B),
    "sam2-hiera-large": SamArch("sam2", "facebook/sam2-hiera-large-hf", _HIERA_L),
    "sam2.1-hiera-tiny": SamArch("sam2", "facebook/sam2.1-hiera-tiny", _HIERA_T),
    "sam2.1-hiera-small": SamArch("sam2", "facebook/sam2.1-hiera-small", _HIERA_S),
    "sam2.1-hiera-base-plus": SamArch("sam2", "facebook/sam2.1-hiera-base-plus", _HIERA_B),
    "sam2.1-hiera-large": SamArch("sam2", "facebook/sam2.1-hiera-large", _HIERA_L),
    "edgetam": SamArch("edgetam", "yonigozlan/EdgeTAM-hf"),
    "tiny": SamArch("sam", "", _TINY_VIT),
    "tiny-hq": SamArch(
        "sam-hq", "", {**_TINY_VIT, "mask_decoder_config": {**_TINY_DECODER, "vit_dim": 32}}
    ),
    "tiny-sam2": SamArch("sam2", "", _TINY_HIERA),
}

TINY_ARCHS = ("tiny", "tiny-hq", "tiny-sam2")
