"""Prompt methods, each registered by name once the package is imported."""

from vprompt.methods.base import (
    METHODS,
    MethodOutput,
    Prediction,
    PromptMethod,
    config_from_dict,
    config_to_dict,
    register_method,
)
from vprompt.methods.baselines import FullFineTune, LinearProbe
from vprompt.methods.cocoop import CoCoOp, CoCoOpConfig
from vprompt.methods.coop import CoOp, CoOpConfig
from vprompt.methods.kgcoop import KgCoOp, KgCoOpConfig
from vprompt.methods.prograd import ProGrad, ProGradConfig, ProGradOutput
from vprompt.methods.visual_prompt import MappingOnly, VisualPrompt, VisualPromptConfig
from vprompt.methods.vpt import VPT, VPTConfig
from vprompt.methods.zeroshot import ZeroShotClassifier, ZeroShotConfig

__all__ = [
    "METHODS",
    "VPT",
    "CoCoOp",
    "CoCoOpConfig",
    "CoOp",
    "CoOpConfig",
    "FullFineTune",
    "KgCoOp",
    "KgCoOpConfig",
    "LinearProbe",
    "MappingOnly",
    "MethodOutput",
    "Prediction",
    "ProGrad",
    "ProGradConfig",
    "ProGradOutput",
    "PromptMethod",
    "VPTConfig",
    "VisualPrompt",
    "VisualPromptConfig",
    "ZeroShotClassifier",
    "ZeroShotConfig",
    "config_from_dict",
    "config_to_dict",
    "register_method",
]
