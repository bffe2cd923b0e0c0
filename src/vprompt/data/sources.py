"""``--data`` specs → dataset splits: ``fashion-mnist[:PATH]``, ``folder:PATH``."""

from __future__ import annotations

from collections.abc import Callable

from vprompt.data.dataset import DataSplits
from vprompt.errors import DatasetError
from vprompt.utils.registry import Registry

DATA_SOURCES: Registry[Callable[[str | None], DataSplits]] = Registry("data source")


def _fashion_mnist(arg: str | None) -> DataSplits:
    from vprompt.data.fashion_mnist import load_fashion_mnist

    return load_fashion_mnist(arg or None)


def _folder(arg: str | None) -> DataSplits:
    from vprompt.data.folder import load_folder

    if not arg:
        raise DatasetError("--data folder:PATH needs a path")
    return load_folder(arg)


DATA_SOURCES.register("fashion-mnist", _fashion_mnist)
DATA_SOURCES.register("folder", _folder)


def load_data(spec: str) -> DataSplits:
    """Parse ``NAME[:ARG]`` and load the splits."""
    name, _, arg = spec.partition(":")
    return DATA_SOURCES.get(name.strip().lower())(arg or None)
