"""A name → object registry that validates names and refuses duplicates."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from typing import Generic, TypeVar

from vprompt.errors import UnknownNameError

T = TypeVar("T")

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")


def close_matches(name: str, candidates: list[str], n: int = 3) -> list[str]:
    """Candidates that look like ``name`` (case-insensitive), best first."""
    lowered = {c.lower(): c for c in candidates}
    hits = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.5)
    # Substring hits catch "b16" → "vit-b-16" style abbreviations difflib scores low.
    subs = [c for c in candidates if name.lower() in c.lower() and c.lower() not in hits]
    out = [lowered[h] for h in hits] + subs
    return out[:n]


def unknown_name_message(kind: str, name: str, candidates: list[str]) -> str:
    """The one-line message for an unknown name, with suggestions when there are any."""
    guesses = close_matches(name, candidates)
    hint = f"; did you mean {', '.join(repr(g) for g in guesses)}?" if guesses else ""
    return (
        f"unknown {kind} {name!r}{hint} (see `vprompt {kind}s` for the full list)"
        if kind in {"model"}
        else f"unknown {kind} {name!r}{hint} (known: {', '.join(sorted(candidates)[:20])})"
    )


class Registry(Generic[T]):
    """Lower-case names mapped to objects; registration is once per name."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        if not _NAME.match(name):
            raise ValueError(
                f"{self.kind} name {name!r} must be lower-case letters, digits, '-', '_' or '.'"
            )
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(
                unknown_name_message(self.kind, name, list(self._items))
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> list[str]:
        return sorted(self._items)
