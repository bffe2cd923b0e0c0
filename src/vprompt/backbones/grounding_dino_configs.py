"""Architecture tables for ``grounding-dino:`` and ``mm-grounding-dino:``: hub ids, and configs
for random-init builds.

``--weights none`` builds an architecture from these configs without the network; the ``tiny``
architectures are small enough to build and run in tests on CPU. Backbone shapes follow the
transformers conversion scripts of the released checkpoints (IDEA-Research's Swin-T / Swin-B
Grounding DINO; OpenMMLab's MM-Grounding-DINO Swin-T / B / L and LLMDet, which share its
architecture). Every released model reads a 256-token caption through ``bert-base-uncased``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

GroundingKind = Literal["grounding-dino", "mm-grounding-dino"]

# The model_type each kind's transformers config carries (a loaded checkpoint must match).
MODEL_TYPES: dict[GroundingKind, str] = {
    "grounding-dino": "grounding-dino",
    "mm-grounding-dino": "mm-grounding-dino",
}

# The text context of every released model (config.max_text_len): the whole caption, with
# [CLS], [SEP] and one "." after each phrase, must fit in it.
MAX_TEXT_LEN = 256


@dataclass(frozen=True)
class GroundingArch:
    """One ``grounding-dino:ARCH`` or ``mm-grounding-dino:ARCH`` entry.

    Attributes:
        hub_id: Default weights (a Hugging Face repo id); empty for test-only architectures.
        config: Config overrides for a random-init build (``--weights none``).
        image_size: ``(shortest_edge, longest_edge)`` of the random-init image processor.
    """

    hub_id: str
    config: dict[str, Any] = field(default_factory=dict)
    image_size: tuple[int, int] = (800, 1333)


def _swin(
    embed: int, depths: list[int], heads: list[int], window: int, side: int, out: list[int]
) -> dict[str, Any]:
    return {
        "model_type": "swin",
        "embed_dim": embed,
        "depths": depths,
        "num_heads": heads,
        "window_size": window,
        "image_size": side,
        "out_indices": out,
    }


_SWIN_T = _swin(96, [2, 2, 6, 2], [3, 6, 12, 24], 7, 224, [2, 3, 4])
_SWIN_B = _swin(128, [2, 2, 18, 2], [4, 8, 16, 32], 12, 384, [2, 3, 4])
_SWIN_L = _swin(192, [2, 2, 18, 2], [6, 12, 24, 48], 12, 384, [1, 2, 3, 4])

# Released models use bert-base-uncased; a random init gets the vocabulary of
# vprompt.backbones.hf_tokenizers.wordpiece_tokenizer instead (filled in at build time).
_BERT_BASE: dict[str, Any] = {"model_type": "bert"}


def _real(swin: dict[str, Any], levels: int = 4) -> dict[str, Any]:
    return {"backbone_config": swin, "text_config": _BERT_BASE, "num_feature_levels": levels}


# Test-only size: a 4-stage Swin with 16 channels, a 1-layer BERT of width 32, one encoder and
# two decoder layers (transformers ties the box heads of decoder layers, which needs two), 10
# queries; images are resized to a 64-pixel short side (96 at most).
_TINY: dict[str, Any] = {
    "backbone_config": _swin(16, [1, 1, 1, 1], [1, 1, 2, 2], 4, 64, [2, 3, 4]),
    "text_config": {
        "model_type": "bert",
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    },
    "d_model": 32,
    "encoder_layers": 1,
    "decoder_layers": 2,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_n_points": 2,
    "decoder_n_points": 2,
    "num_queries": 10,
}
TINY_IMAGE_SIZE = (64, 96)

GROUNDING_DINO_ARCHS: dict[str, GroundingArch] = {
    "swin-t": GroundingArch("IDEA-Research/grounding-dino-tiny", _real(_SWIN_T)),
    "swin-b": GroundingArch("IDEA-Research/grounding-dino-base", _real(_SWIN_B)),
    "tiny": GroundingArch("", _TINY, TINY_IMAGE_SIZE),
}

_MM = "openmmlab-community/mm_grounding_dino_"
MM_GROUNDING_DINO_ARCHS: dict[str, GroundingArch] = {
    # Zero-shot on COCO; the transformers documentation's default checkpoint.
    "swin-t": GroundingArch(f"{_MM}tiny_o365v1_goldg_v3det", _real(_SWIN_T)),
    "swin-t-o365-goldg": GroundingArch(f"{_MM}tiny_o365v1_goldg", _real(_SWIN_T)),
    "swin-t-o365-goldg-grit": GroundingArch(f"{_MM}tiny_o365v1_goldg_grit", _real(_SWIN_T)),
    "swin-t-o365-goldg-grit-v3det": GroundingArch(
        f"{_MM}tiny_o365v1_goldg_grit_v3det", _real(_SWIN_T)
    ),
    "swin-b": GroundingArch(f"{_MM}base_o365v1_goldg_v3det", _real(_SWIN_B)),
    "swin-l": GroundingArch(f"{_MM}large_o365v2_oiv6_goldg", _real(_SWIN_L, levels=5)),
    # Trained on COCO among "all" their data: not zero-shot on COCO.
    "swin-b-all": GroundingArch(f"{_MM}base_all", _real(_SWIN_B)),
    "swin-l-all": GroundingArch(f"{_MM}large_all", _real(_SWIN_L, levels=5)),
    # LLMDet (Fu et al., 2025): MM-Grounding-DINO fine-tuned with a language model's captions.
    "llmdet-swin-t": GroundingArch("iSEE-Laboratory/llmdet_tiny", _real(_SWIN_T)),
    "llmdet-swin-b": GroundingArch("iSEE-Laboratory/llmdet_base", _real(_SWIN_B)),
    "llmdet-swin-l": GroundingArch("iSEE-Laboratory/llmdet_large", _real(_SWIN_L, levels=5)),
    "tiny": GroundingArch("", _TINY, TINY_IMAGE_SIZE),
}

TINY_ARCHS = ("tiny",)
