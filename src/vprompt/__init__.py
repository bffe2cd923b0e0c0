"""vprompt: adapt frozen vision and vision-language models to new tasks through prompts."""

from vprompt.backbones import Preprocess, list_models, load_backbone
from vprompt.data.feature_cache import FeatureCache
from vprompt.data.sources import load_data
from vprompt.data.tasks import load_suite_task
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
from vprompt.engine.experiment import Experiment, RunReport, run
from vprompt.engine.protocol import ProtocolRun, plan_jobs, run_protocol
from vprompt.errors import (
    ConfigError,
    DatasetError,
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
    PromptMethod,
    VisualPrompt,
    ZeroShotClassifier,
)
from vprompt.segment.predictor import SamPredictor

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "VPT",
    "ConfigError",
    "DatasetError",
    "EvalResult",
    "Experiment",
    "FeatureCache",
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
    "PromptMethod",
    "PromptPack",
    "ProtocolRun",
    "RunReport",
    "SamPredictor",
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
    "load_data",
    "load_pack",
    "load_suite_task",
    "plan_jobs",
    "run",
    "run_protocol",
    "save_pack",
]
