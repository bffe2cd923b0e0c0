"""Errors that vprompt raises for bad input.

Every error names the offending input and what was expected, so the CLI can print it as one
line. They all derive from :class:`VPromptError`, which the CLI turns into exit code 1 (2 for
usage errors) without a traceback.
"""

from __future__ import annotations


class VPromptError(Exception):
    """Base class for every error vprompt raises on purpose."""


class UnknownNameError(VPromptError, KeyError):
    """A name (model, method, template set, dataset) that no registry holds."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class WeightsError(VPromptError):
    """Weights that cannot be found, read or loaded into the requested architecture."""


class PackError(VPromptError):
    """A prompt pack that is unreadable, of an unknown format, or does not fit its use."""


class ImageLoadError(VPromptError):
    """An image that cannot be found, decoded, or is larger than allowed."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class PromptError(VPromptError, ValueError):
    """A prompt (template, description file, class list, spatial prompt) that is invalid."""


class ConfigError(VPromptError, ValueError):
    """A configuration value outside its allowed range or of the wrong kind."""


class DatasetError(VPromptError):
    """A dataset that is missing, incomplete or malformed."""


class OutputError(VPromptError):
    """An output folder or file that cannot be written, or that holds another run's files."""


def describe_os_error(exc: OSError, action: str | None = None) -> str:
    """One line for a failed file operation, naming the file: ``/a/b: No space left on
    device``, or with ``action`` ``cannot write /a/b: No space left on device``."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is None:
        return f"{action or 'file operation failed'}: {reason}"
    return f"{action + ' ' if action else ''}{exc.filename}: {reason}"


def is_allocation_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed memory allocation: Python's MemoryError, or the
    RuntimeError PyTorch raises on CPU ("can't allocate memory") and CUDA ("out of memory")."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower()
    )
