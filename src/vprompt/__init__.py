"""vprompt: adapt frozen vision and vision-language models to new tasks through prompts."""

from vprompt.backbones import Preprocess, list_models, load_backbone
from vprompt.engine import (
    EvalResult,
    FitResult,
    PromptPack,
    build_from_pack,
    evaluate,
    fit,
    load_pack,
    save_pack,
)
from vprompt.errors import (
    ConfigError,
    ImageLoadError,
    PackError,
    PromptError,
    UnknownNameError,
    VPromptError,
    WeightsError,
)
from vprompt.methods import (
    METHODS,
    VPT,
    FullFineTune,
    LinearProbe,
    MappingOnly,
    MethodOutput,
    Prediction,
    VisualPrompt,
    ZeroShotClassifier,
)

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "VPT",
    "ConfigError",
    "EvalResult",
    "FitResult",
    "FullFineTune",
    "ImageLoadError",
    "LinearProbe",
    "MappingOnly",
    "MethodOutput",
    "PackError",
    "Prediction",
    "Preprocess",
    "PromptError",
    "PromptPack",
    "UnknownNameError",
    "VPromptError",
    "VisualPrompt",
    "WeightsError",
    "ZeroShotClassifier",
    "__version__",
    "build_from_pack",
    "evaluate",
    "fit",
    "list_models",
    "load_backbone",
    "load_pack",
    "save_pack",
]
