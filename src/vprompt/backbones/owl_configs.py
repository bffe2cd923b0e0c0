"""Architecture tables for the OWL detectors: hub ids, and configs for random-init builds.

``--weights none`` builds an architecture from these configs without touching the network;
``tiny`` is small enough to build and run in tests on CPU. Sizes of the published checkpoints
come from the OWL-ViT and OWLv2 releases (CLIP B/32, B/16 and L/14 towers; OWL-ViT reads
768-pixel inputs, 840 for L/14; OWLv2 reads 960, 1008 for L/14).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

OwlKind = Literal["owlv2", "owlvit"]

# Both families read at most 16 text tokens, start and end markers included.
TEXT_CONTEXT = 16

# The model_type each kind's transformers config carries (a loaded checkpoint must match).
MODEL_TYPES: dict[OwlKind, str] = {"owlv2": "owlv2", "owlvit": "owlvit"}


@dataclass(frozen=True)
class OwlArch:
    """One ``owlv2:ARCH`` or ``owlvit:ARCH`` entry.

    Attributes:
        hub_id: Default weights (a Hugging Face repo id); empty for test-only architectures.
        config: Keyword arguments of the transformers config for a random-init build.
    """

    hub_id: str
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return int(self.config["vision_config"]["image_size"])


def _config(
    *,
    text: tuple[int, int, int],
    vision: tuple[int, int, int],
    image_size: int,
    patch_size: int,
    projection_dim: int,
    init_std: float = 0.02,
) -> dict[str, Any]:
    """Text and vision towers as ``(hidden, layers, heads)`` (MLP width 4 x hidden).

    ``init_std`` seeds the heads: transformers otherwise draws them with std 1
    (``initializer_factor``), which saturates every random box to the image's edge.
    """
    t_hidden, t_layers, t_heads = text
    v_hidden, v_layers, v_heads = vision
    return {
        "text_config": {
            "hidden_size": t_hidden,
            "intermediate_size": 4 * t_hidden,
            "num_hidden_layers": t_layers,
            "num_attention_heads": t_heads,
            "max_position_embeddings": TEXT_CONTEXT,
        },
        "vision_config": {
            "hidden_size": v_hidden,
            "intermediate_size": 4 * v_hidden,
            "num_hidden_layers": v_layers,
            "num_attention_heads": v_heads,
            "image_size": image_size,
            "patch_size": patch_size,
        },
        "projection_dim": projection_dim,
        "initializer_range": init_std,
    }


def _base(image_size: int, patch_size: int) -> dict[str, Any]:
    return _config(
        text=(512, 12, 8),
        vision=(768, 12, 12),
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=512,
    )


def _large(image_size: int) -> dict[str, Any]:
    return _config(
        text=(768, 12, 12),
        vision=(1024, 24, 16),
        image_size=image_size,
        patch_size=14,
        projection_dim=768,
    )


# Test-only: a 64-pixel input cut into 4 x 4 patches, one layer per tower; heads drawn wide
# enough that boxes and scores differ from patch to patch.
_TINY = _config(
    text=(32, 1, 2),
    vision=(32, 1, 2),
    image_size=64,
    patch_size=16,
    projection_dim=32,
    init_std=0.2,
)

OWLV2_ARCHS: dict[str, OwlArch] = {
    "base-patch16": OwlArch("google/owlv2-base-patch16", _base(960, 16)),
    "base-patch16-ensemble": OwlArch("google/owlv2-base-patch16-ensemble", _base(960, 16)),
    "large-patch14": OwlArch("google/owlv2-large-patch14", _large(1008)),
    "large-patch14-ensemble": OwlArch("google/owlv2-large-patch14-ensemble", _large(1008)),
    "tiny": OwlArch("", _TINY),
}

OWLVIT_ARCHS: dict[str, OwlArch] = {
    "base-patch32": OwlArch("google/owlvit-base-patch32", _base(768, 32)),
    "base-patch16": OwlArch("google/owlvit-base-patch16", _base(768, 16)),
    "large-patch14": OwlArch("google/owlvit-large-patch14", _large(840)),
    "tiny": OwlArch("", _TINY),
}

ARCHS: dict[OwlKind, dict[str, OwlArch]] = {"owlv2": OWLV2_ARCHS, "owlvit": OWLVIT_ARCHS}

TINY_ARCHS = ("tiny",)
