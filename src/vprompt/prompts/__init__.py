"""The prompt vocabulary users hand in: spatial prompts, text templates and class descriptions."""

from vprompt.prompts.resize import MaskPostprocess, ResizeLongestSide
from vprompt.prompts.spatial import (
    POINT_PAD_LABEL,
    Box,
    Mask,
    MaskLogits,
    ObjectPrompt,
    Point,
    PromptArrays,
    PromptGroup,
    PromptSet,
    Scribble,
)
from vprompt.prompts.text import (
    TEMPLATE_SETS,
    build_class_prompts,
    load_class_list,
    load_descriptions,
    resolve_templates,
)

__all__ = [
    "POINT_PAD_LABEL",
    "TEMPLATE_SETS",
    "Box",
    "Mask",
    "MaskLogits",
    "MaskPostprocess",
    "ObjectPrompt",
    "Point",
    "PromptArrays",
    "PromptGroup",
    "PromptSet",
    "ResizeLongestSide",
    "Scribble",
    "build_class_prompts",
    "load_class_list",
    "load_descriptions",
    "resolve_templates",
]
