"""Frozen backbones: the only package that imports open_clip / transformers / timm / torchvision.

Every family registers itself here on import (detector families register in their own
module, with their detector entry), so ``load_backbone`` knows every name.
"""

from vprompt.backbones.classifier import ClassifierBackbone
from vprompt.backbones.clip import CLIP_FAMILY, ClipBackbone
from vprompt.backbones.clipseg import CLIPSEG_FAMILY, ClipSegBackbone
from vprompt.backbones.grounding_dino import (
    GROUNDING_DINO_FAMILY,
    MM_GROUNDING_DINO_FAMILY,
    GroundingDinoBackbone,
)
from vprompt.backbones.owl import OWLV2_FAMILY, OWLVIT_FAMILY, OwlBackbone
from vprompt.backbones.preprocess import Preprocess, build_eval_transform
from vprompt.backbones.protocols import (
    Backbone,
    DeepPromptBackbone,
    ImageTextBackbone,
    NotAViTError,
    PromptableSegmenter,
    TokenBackbone,
)
from vprompt.backbones.registry import (
    FAMILIES,
    RANDOM_INIT,
    BackboneFamily,
    list_models,
    load_backbone,
    register_family,
    split_name,
)
from vprompt.backbones.sam import SAM_FAMILY, SamBackbone
from vprompt.backbones.sam3 import SAM3_FAMILY, Sam3Backbone
from vprompt.backbones.seggpt import SEGGPT_FAMILY, SegGptBackbone
from vprompt.backbones.timm_family import TIMM_FAMILY
from vprompt.backbones.torchvision_family import TORCHVISION_FAMILY

register_family(CLIP_FAMILY)
register_family(TIMM_FAMILY)
register_family(TORCHVISION_FAMILY)
register_family(SAM_FAMILY)
register_family(SEGGPT_FAMILY)

__all__ = [
    "CLIPSEG_FAMILY",
    "FAMILIES",
    "GROUNDING_DINO_FAMILY",
    "MM_GROUNDING_DINO_FAMILY",
    "OWLV2_FAMILY",
    "OWLVIT_FAMILY",
    "RANDOM_INIT",
    "SAM3_FAMILY",
    "SAM_FAMILY",
    "SEGGPT_FAMILY",
    "Backbone",
    "BackboneFamily",
    "ClassifierBackbone",
    "ClipBackbone",
    "ClipSegBackbone",
    "DeepPromptBackbone",
    "GroundingDinoBackbone",
    "ImageTextBackbone",
    "NotAViTError",
    "OwlBackbone",
    "Preprocess",
    "PromptableSegmenter",
    "Sam3Backbone",
    "SamBackbone",
    "SegGptBackbone",
    "TokenBackbone",
    "build_eval_transform",
    "list_models",
    "load_backbone",
    "register_family",
    "split_name",
]
