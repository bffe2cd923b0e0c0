"""vprompt: adapt frozen vision and vision-language models to new tasks through prompts."""

from vprompt.backbones import Preprocess, list_models, load_backbone
from vprompt.engine import PromptPack, build_from_pack, load_pack, save_pack
from vprompt.errors import (
    ConfigError,
    ImageLoadError,
    PackError,
    PromptError,
    UnknownNameError,
    VPromptError,
    WeightsError,
)
from vprompt.methods import METHODS, MethodOutput, Prediction, ZeroShotClassifier

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "ConfigError",
    "ImageLoadError",
    "MethodOutput",
    "PackError",
    "Prediction",
    "Preprocess",
    "PromptError",
    "PromptPack",
    "UnknownNameError",
    "VPromptError",
    "WeightsError",
    "ZeroShotClassifier",
    "__version__",
    "build_from_pack",
    "list_models",
    "load_backbone",
    "load_pack",
    "save_pack",
]
