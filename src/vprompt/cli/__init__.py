"""The ``vprompt`` command line: thin wrappers over the Python API.

Importing this package registers every command on :func:`main`.
"""

from vprompt.cli import classify, data, data_setup, protocol, train  # noqa: F401  (registers)
from vprompt.cli.common import main

__all__ = ["main"]
