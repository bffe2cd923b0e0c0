"""One benchmark task: a suite dataset's splits after few-shot sampling and the base/new split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vprompt.data.dataset import DataSplits
from vprompt.data.fewshot import FewShot, Subsample, load_or_sample, subsample_classes
from vprompt.data.images import ImageReader
from vprompt.data.items import ItemDataset, label_names, prompt_name
from vprompt.data.suite.base import SuiteDataset, get_suite
from vprompt.errors import DatasetError

# The benchmark suite decodes images as the papers' code does (Dassl's read_image).
READER: ImageReader = "reference"


@dataclass(frozen=True)
class SuiteTask:
    """What a protocol job trains and tests on.

    Attributes:
        spec: The registered dataset.
        train: Training images (None for test-only datasets).
        val: Validation images (None where the reference validates on the test split).
        test: Test images.
        shots: Images per class in ``train`` (None: the full split).
        seed: The few-shot sampling seed.
        subsample: ``all``, ``base`` or ``new`` classes.
    """

    spec: SuiteDataset
    train: ItemDataset | None
    val: ItemDataset | None
    test: ItemDataset
    shots: int | None
    seed: int
    subsample: Subsample

    @property
    def classnames(self) -> list[str]:
        return self.test.classnames

    @property
    def template(self) -> str:
        return self.spec.template

    def splits(self, *, test_only_ok: bool = False) -> DataSplits:
        """As :class:`DataSplits` for ``fit``/``evaluate``.

        Args:
            test_only_ok: Allow test-only datasets (their ``train`` is then empty).
        """
        if self.train is None and test_only_ok:
            empty = ItemDataset(self.test.root, [], self.test.classnames, reader=READER)
            return DataSplits(self.spec.name, empty, self.test, None)
        if self.train is None:
            raise DatasetError(
                f"{self.spec.title} is a test-only dataset; train on another one "
                "(e.g. imagenet) and evaluate on it"
            )
        return DataSplits(self.spec.name, self.train, self.test, self.val)


def load_suite_task(
    dataset: str | SuiteDataset,
    data_root: str | Path,
    *,
    shots: int | None = None,
    seed: int = 1,
    subsample: Subsample = "all",
) -> SuiteTask:
    """Read ``dataset`` under ``data_root`` and apply the reference's few-shot and class split.

    Args:
        shots: K images per class for training (``min(K, 4)`` for validation); None or 0 keeps
            the full splits.
        seed: Few-shot sampling seed (the reference's ``--seed``).
        subsample: Keep ``base`` or ``new`` classes (relabelled from 0), or ``all``.
    """
    spec = get_suite(dataset) if isinstance(dataset, str) else dataset
    full = spec.load(data_root)
    if spec.eval_only:
        if shots or subsample != "all":
            raise DatasetError(
                f"{spec.title} is a test-only dataset: it has no training split to sample "
                "shots or base/new classes from"
            )
        test_only = ItemDataset(spec.path(data_root), full.test, reader=READER)
        return SuiteTask(spec, None, None, test_only, None, seed, "all")
    train, val = full.train, full.val
    if shots:
        picked: FewShot = load_or_sample(
            spec.name,
            spec.path(data_root),
            full.train,
            full.val,
            shots=shots,
            seed=seed,
            sample_val=spec.fewshot_val,
        )
        train, val = picked.train, picked.val
    train, val, test = subsample_classes(train, val, full.test, subsample=subsample)
    if not train:
        raise DatasetError(f"{spec.title}: no training images left after the {subsample} split")
    names = [prompt_name(n) for n in label_names(train)]
    folder = spec.path(data_root)
    return SuiteTask(
        spec,
        ItemDataset(folder, train, names, reader=READER),
        ItemDataset(folder, val, names, reader=READER) if val else None,
        ItemDataset(folder, test, names, reader=READER),
        shots or None,
        seed,
        subsample,
    )
