"""JSON in and out of vprompt: standard JSON only, bounded, never NaN.

Python's ``json`` writes and reads ``NaN``/``Infinity`` (not JSON: most other readers refuse
them) and a deeply nested document makes it raise ``RecursionError``. Everything vprompt
writes goes through :func:`dumps` (a non-finite number becomes ``null``) and everything it
reads from a user's file goes through :func:`loads` (non-standard constants, nesting beyond
``max_depth`` and undecodable text are one :class:`JSONInputError` naming the input).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from vprompt.errors import VPromptError

MAX_DEPTH = 64
"""Deepest nesting :func:`loads` accepts; vprompt's own files nest fewer than 10 levels."""


class JSONInputError(VPromptError, ValueError):
    """Text that is not standard JSON, or nests deeper than allowed.

    Attributes:
        reason: What is wrong, without the input's name (for callers that word their own).
    """

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(f"{what}: {reason}")
        self.reason = reason


def finite(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) replaced by None, recursively through
    dicts, lists and tuples (tuples become lists, as JSON has no tuples); numpy scalars and
    arrays become plain numbers and lists first."""
    if isinstance(value, np.generic | np.ndarray):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` that never writes ``NaN``/``Infinity`` (they become ``null``)."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def loads(text: str | bytes, *, what: str, max_depth: int = MAX_DEPTH) -> Any:
    """Parse standard JSON from ``what`` (a file name or a description, for the message).

    Raises:
        JSONInputError: Not UTF-8, not JSON, ``NaN``/``Infinity`` constants, or nesting
            deeper than ``max_depth``.
    """
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JSONInputError(
                what, f"not UTF-8 text (byte {exc.start}); expected a UTF-8 JSON document"
            ) from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise JSONInputError(what, f"JSON nested deeper than {max_depth} levels") from None
    except ValueError as exc:  # JSONDecodeError, and the constants refused above
        raise JSONInputError(what, f"not valid JSON ({exc})") from None
    if _depth_exceeds(value, max_depth):
        raise JSONInputError(what, f"JSON nested deeper than {max_depth} levels")
    return value


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether ``value`` nests more than ``limit`` containers deep (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth + 1 > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False
