"""Checks shared by the COCO-format and refs readers: problems collected with their fixes,
safe relative paths, bounded JSON reads, image sizes from headers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from PIL import Image, UnidentifiedImageError

from vprompt.data.check import Problem, Severity
from vprompt.errors import DatasetError, ImageLoadError
from vprompt.utils import jsonio

MAX_LISTED = 3
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class CocoDataError(DatasetError):
    """A COCO-format folder with problems; ``problems`` lists every one (errors first)."""

    def __init__(self, where: Path, problems: Sequence[Problem]) -> None:
        errors = [p for p in problems if p.severity == "error"]
        listed = "; ".join(f"{p.what} (fix: {p.fix})" for p in errors[:MAX_LISTED])
        more = f"; and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
        super().__init__(f"{where}: {len(errors)} problem(s): {listed}{more}")
        self.problems = list(problems)


class Findings:
    """Problems in the order found; those with a ``group`` are folded into one line each."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.groups: dict[str, list[Problem]] = {}

    def add(self, severity: Severity, what: str, fix: str, *, group: str | None = None) -> None:
        problem = Problem(severity, what, fix)
        if group is None:
            self.problems.append(problem)
        else:
            self.groups.setdefault(group, []).append(problem)

    def error(self, what: str, fix: str, *, group: str | None = None) -> None:
        self.add("error", what, fix, group=group)

    def collected(self) -> list[Problem]:
        out = list(self.problems)
        for group, items in self.groups.items():
            if len(items) == 1:
                out.append(items[0])
                continue
            listed = "; ".join(p.what for p in items[:MAX_LISTED])
            more = " …" if len(items) > MAX_LISTED else ""
            out.append(
                Problem(items[0].severity, f"{len(items)} {group}: {listed}{more}", items[0].fix)
            )
        return sorted(out, key=lambda p: p.severity != "error")


# ------------------------------------------------------------------------------ small checks
def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def unsafe_relative_path(name: str) -> str | None:
    """Why ``name`` may not be used as a path inside a dataset folder, or None if it may."""
    if not name.strip():
        return "is empty"
    if "\x00" in name:
        return "holds a NUL character"
    for flavour in (PurePosixPath(name), PureWindowsPath(name)):
        if flavour.is_absolute() or flavour.anchor:
            return "is an absolute path"
        if ".." in flavour.parts:
            return "climbs out of the folder with '..'"
    return None


def header_size(path: Path) -> tuple[int, int]:
    """``(W, H)`` from the file's header as a viewer shows it (EXIF rotation applied).

    Raises:
        ImageLoadError: Not an image, or unreadable.
    """
    try:
        with Image.open(path) as img:
            w, h = img.size
            if img.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSING:
                w, h = h, w
            return w, h
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(path, f"cannot read the header ({exc})") from None


def read_json_bounded(path: Path, *, max_bytes: int, fix: str, found: Findings) -> Any:
    """The JSON document at ``path``, or None after recording why it cannot be read."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            found.error(
                f"{path} is {size} bytes, more than the limit of {max_bytes}",
                "check it is the right file, or raise max_json_bytes",
            )
            return None
        return jsonio.loads(path.read_bytes(), what=str(path))
    except OSError as exc:
        found.error(f"{path}: cannot read ({exc.strerror or exc})", fix)
    except jsonio.JSONInputError as exc:
        found.error(str(exc), fix)
    return None
