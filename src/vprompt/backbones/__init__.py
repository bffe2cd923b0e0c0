"""Frozen backbones: the only package that imports open_clip / transformers / timm / torchvision.

Every family registers itself here on import, so ``load_backbone`` knows every name.
"""

from vprompt.backbones.clip import CLIP_FAMILY, ClipBackbone
from vprompt.backbones.preprocess import Preprocess, build_eval_transform
from vprompt.backbones.protocols import Backbone, ImageTextBackbone
from vprompt.backbones.registry import (
    FAMILIES,
    RANDOM_INIT,
    BackboneFamily,
    list_models,
    load_backbone,
    register_family,
    split_name,
)

register_family(CLIP_FAMILY)

__all__ = [
    "FAMILIES",
    "RANDOM_INIT",
    "Backbone",
    "BackboneFamily",
    "ClipBackbone",
    "ImageTextBackbone",
    "Preprocess",
    "build_eval_transform",
    "list_models",
    "load_backbone",
    "register_family",
    "split_name",
]
