"""Engine: prompt packs (and, later, fit / evaluate / protocols / reports)."""

from vprompt.engine.pack import (
    FORMAT_VERSION,
    BackboneRef,
    PromptPack,
    build_from_pack,
    load_pack,
    pack_method,
    save_pack,
)

__all__ = [
    "FORMAT_VERSION",
    "BackboneRef",
    "PromptPack",
    "build_from_pack",
    "load_pack",
    "pack_method",
    "save_pack",
]
