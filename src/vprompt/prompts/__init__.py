"""The prompt vocabulary users hand in: text templates and class descriptions."""

from vprompt.prompts.text import (
    TEMPLATE_SETS,
    build_class_prompts,
    load_class_list,
    load_descriptions,
    resolve_templates,
)

__all__ = [
    "TEMPLATE_SETS",
    "build_class_prompts",
    "load_class_list",
    "load_descriptions",
    "resolve_templates",
]
