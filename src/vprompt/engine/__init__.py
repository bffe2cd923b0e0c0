"""Engine: fit / evaluate, checkpoints, schedules, reports and prompt packs."""

from vprompt.engine.evaluate import EvalResult, evaluate
from vprompt.engine.events import FitEvent
from vprompt.engine.fit import FitResult, fit
from vprompt.engine.pack import (
    FORMAT_VERSION,
    BackboneRef,
    PromptPack,
    build_from_pack,
    load_pack,
    pack_method,
    save_pack,
)
from vprompt.engine.schedule import LRSchedule

__all__ = [
    "FORMAT_VERSION",
    "BackboneRef",
    "EvalResult",
    "FitEvent",
    "FitResult",
    "LRSchedule",
    "PromptPack",
    "build_from_pack",
    "evaluate",
    "fit",
    "load_pack",
    "pack_method",
    "save_pack",
]
