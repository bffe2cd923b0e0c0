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
from vprompt.methods.zeroshot import ZeroShotClassifier, ZeroShotConfig

__all__ = [
    "METHODS",
    "MethodOutput",
    "Prediction",
    "PromptMethod",
    "ZeroShotClassifier",
    "ZeroShotConfig",
    "config_from_dict",
    "config_to_dict",
    "register_method",
]
