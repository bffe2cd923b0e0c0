"""The CoOp benchmark suite: 11 few-shot datasets plus the ImageNet variants.

Importing this package registers every dataset in :data:`SUITE`.
"""

from vprompt.data.suite import aircraft, coop_split, imagenet  # noqa: F401  (registers)
from vprompt.data.suite.base import (
    SUITE,
    SuiteCounts,
    SuiteDataset,
    SuiteSplits,
    get_suite,
    read_split_file,
    register_suite,
    write_split_file,
)

__all__ = [
    "SUITE",
    "SuiteCounts",
    "SuiteDataset",
    "SuiteSplits",
    "get_suite",
    "read_split_file",
    "register_suite",
    "write_split_file",
]
