"""``--data`` specs → dataset splits.

``fashion-mnist[:PATH]``, ``folder:PATH``, ``csv:PATH``, ``json:PATH``, or the name of a
registered benchmark dataset (``oxford_pets``, ``imagenet`` …) read from ``--data-root``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from vprompt.data.dataset import DataSplits
from vprompt.data.fewshot import Subsample
from vprompt.errors import DatasetError, UnknownNameError
from vprompt.utils.registry import Registry, unknown_name_message

DATA_SOURCES: Registry[Callable[[str | None], DataSplits]] = Registry("data source")
DATA_ROOT_ENV = "VPROMPT_DATA_ROOT"


def _needs_path(kind: str, arg: str | None) -> str:
    if not arg:
        raise DatasetError(f"--data {kind}:PATH needs a path")
    return arg


def _fashion_mnist(arg: str | None) -> DataSplits:
    from vprompt.data.fashion_mnist import load_fashion_mnist

    return load_fashion_mnist(arg or None)


def _folder(arg: str | None) -> DataSplits:
    from vprompt.data.folder import load_folder

    return load_folder(_needs_path("folder", arg))


def _csv(arg: str | None) -> DataSplits:
    from vprompt.data.manifest import load_csv

    return load_csv(_needs_path("csv", arg))


def _json(arg: str | None) -> DataSplits:
    from vprompt.data.manifest import load_json_manifest

    return load_json_manifest(_needs_path("json", arg))


DATA_SOURCES.register("fashion-mnist", _fashion_mnist)
DATA_SOURCES.register("folder", _folder)
DATA_SOURCES.register("csv", _csv)
DATA_SOURCES.register("json", _json)


def resolve_data_root(data_root: str | os.PathLike[str] | None) -> Path:
    """``--data-root``, else ``$VPROMPT_DATA_ROOT``; an error naming both when neither is set."""
    value = data_root or os.environ.get(DATA_ROOT_ENV)
    if not value:
        raise DatasetError(
            f"benchmark datasets need --data-root DIR (or ${DATA_ROOT_ENV}): the folder holding "
            "oxford_pets/, imagenet/, … (see `vprompt data check`)"
        )
    return Path(value).expanduser()


def load_data(
    spec: str,
    *,
    data_root: str | os.PathLike[str] | None = None,
    shots: int | None = None,
    seed: int = 1,
    subsample: Subsample = "all",
    test_only_ok: bool = False,
) -> DataSplits:
    """Parse ``NAME[:ARG]`` and load the splits.

    ``shots``, ``seed`` and ``subsample`` apply to benchmark datasets (the reference's few-shot
    sampling and base/new split); other sources refuse them. ``test_only_ok`` accepts test-only
    benchmark datasets (ImageNet-A …) with an empty training split, for evaluation.
    """
    name, _, arg = spec.partition(":")
    key = name.strip().lower()
    if key in DATA_SOURCES:
        if shots or subsample != "all":
            raise DatasetError(
                f"--shots and --subsample apply to benchmark datasets, not to --data {spec}"
            )
        return DATA_SOURCES.get(key)(arg or None)
    from vprompt.data.suite import SUITE, get_suite
    from vprompt.data.tasks import load_suite_task

    try:
        dataset = get_suite(spec.strip())
    except UnknownNameError:
        raise UnknownNameError(
            unknown_name_message("data source", spec, DATA_SOURCES.names() + SUITE.names())
        ) from None
    task = load_suite_task(
        dataset, resolve_data_root(data_root), shots=shots, seed=seed, subsample=subsample
    )
    return task.splits(test_only_ok=test_only_ok)
