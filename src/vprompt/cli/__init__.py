"""The ``vprompt`` command line: thin wrappers over the Python API.

Importing this package registers every command on :func:`main`.
"""

from vprompt.cli import (  # noqa: F401  (registers)
    anomaly,
    attack,
    classify,
    data,
    data_setup,
    defend,
    detect,
    detect_eval,
    export,
    features,
    ground,
    pack,
    presets,
    protocol,
    segment,
    segment_eval,
    segment_incontext,
    serve,
    train,
    watermark,
)
from vprompt.cli.common import main

__all__ = ["main"]
