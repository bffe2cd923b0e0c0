"""Prompt methods, each registered by name once the package is imported.

Importing a method module registers its methods: adding a method is one file, one test file
and its module's name in the registration import below (``docs/adding-a-method.md``).
"""

# Registration: every method module, imported once.
from vprompt.methods import (  # noqa: F401
    atprompt,
    baselines,
    cocoop,
    coop,
    coprompt,
    dam_vp,
    dam_vp_meta,
    difftpt,
    ivlp,
    kgcoop,
    maple,
    proapo,
    prograd,
    promptkd,
    promptsrc,
    tfup,
    tip_adapter,
    tpt,
    visual_prompt,
    vpt,
    zeroshot,
)
from vprompt.methods.base import (
    Capabilities,
    MethodData,
    MethodExample,
    MethodOutput,
    Prediction,
    PromptMethod,
)
from vprompt.methods.baselines import FullFineTune, LinearProbe
from vprompt.methods.cocoop import CoCoOp, CoCoOpConfig
from vprompt.methods.config import OptimConfig, apply_overrides, config_from_dict, config_to_dict
from vprompt.methods.coop import CoOp, CoOpConfig
from vprompt.methods.kgcoop import KgCoOp, KgCoOpConfig
from vprompt.methods.prograd import ProGrad, ProGradConfig, ProGradOutput
from vprompt.methods.registry import METHODS, register_method
from vprompt.methods.visual_prompt import MappingOnly, VisualPrompt, VisualPromptConfig
from vprompt.methods.vpt import VPT, VPTConfig
from vprompt.methods.zeroshot import ZeroShotClassifier, ZeroShotConfig

__all__ = [
    "METHODS",
    "VPT",
    "Capabilities",
    "CoCoOp",
    "CoCoOpConfig",
    "CoOp",
    "CoOpConfig",
    "FullFineTune",
    "KgCoOp",
    "KgCoOpConfig",
    "LinearProbe",
    "MappingOnly",
    "MethodData",
    "MethodExample",
    "MethodOutput",
    "OptimConfig",
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
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "register_method",
]
