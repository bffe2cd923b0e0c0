"""Watermark prompts: an imperceptible learned perturbation that a frozen model recognises.

* :mod:`~vprompt.watermark.channel`: the differentiable robustness channel (JPEG, resize, noise).
* :mod:`~vprompt.watermark.detector`: frozen features + key head, embedding and scoring.
* :mod:`~vprompt.watermark.train`: learning δ and the head on the training split.
* :mod:`~vprompt.watermark.evaluate`: detection and survival metrics on the test split.
* :mod:`~vprompt.watermark.key_file`: key files (safetensors + JSON metadata, never pickles).
"""

from vprompt.watermark.channel import ChannelConfig, diff_jpeg, robustness_channel
from vprompt.watermark.detector import (
    FrozenFeatures,
    KeyDetector,
    detector_for,
    embed_image,
    embed_pixels,
)
from vprompt.watermark.evaluate import EvalConfig, WatermarkReport, evaluate_key
from vprompt.watermark.key_file import WatermarkKey, WatermarkKeyError, load_key, save_key
from vprompt.watermark.train import TrainedKey, WatermarkTrainConfig, parse_eps, train_key

__all__ = [
    "ChannelConfig",
    "EvalConfig",
    "FrozenFeatures",
    "KeyDetector",
    "TrainedKey",
    "WatermarkKey",
    "WatermarkKeyError",
    "WatermarkReport",
    "WatermarkTrainConfig",
    "detector_for",
    "diff_jpeg",
    "embed_image",
    "embed_pixels",
    "evaluate_key",
    "load_key",
    "parse_eps",
    "robustness_channel",
    "save_key",
    "train_key",
]
