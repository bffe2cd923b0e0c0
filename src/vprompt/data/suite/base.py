"""What a CoOp-suite dataset is: where it lives, how it is read, how it is prompted.

Each dataset of the benchmark the field reports on (CoOp, CoCoOp, KgCoOp, MaPLe, PromptSRC …) is
one :class:`SuiteDataset` in :data:`SUITE`, with a small reader that turns its folder under
``--data-root`` into :class:`SuiteSplits`. Readers follow the reference code (CoOp's
``datasets/*.py``) item for item, so split order — and therefore seeded few-shot sampling —
matches it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vprompt.data.items import Datum, label_names
from vprompt.errors import DatasetError, UnknownNameError
from vprompt.utils import jsonio
from vprompt.utils.registry import Registry, unknown_name_message


@dataclass(frozen=True)
class SuiteSplits:
    """The full (not yet few-shot) splits of one dataset, in the reference code's item order.

    Attributes:
        train: Training items ([] for test-only datasets).
        val: Validation items ([] where the reference has none; ImageNet validates on test).
        test: Test items.
        classnames: Raw class names in label order (as the split file spells them).
    """

    train: list[Datum]
    val: list[Datum]
    test: list[Datum]
    classnames: list[str]


@dataclass(frozen=True)
class SuiteCounts:
    """Published sizes (CoOp paper, Table 7 and the DATASETS.md of its repo)."""

    classes: int
    train: int
    val: int
    test: int


@dataclass(frozen=True)
class SuiteDataset:
    """One registered benchmark dataset.

    Attributes:
        name: Registry name, as CoOp's config files spell it (``oxford_pets``).
        title: The name the papers' tables use (``OxfordPets``).
        folder: The dataset's folder under ``--data-root`` (``oxford_pets``).
        template: The hand-written prompt the papers use for it; exactly one ``{}``.
        read: Dataset folder → :class:`SuiteSplits`; raises DatasetError naming what is missing.
        counts: Published sizes, checked by ``vprompt data check``.
        split_file: The split JSON inside ``folder`` (None where the dataset ships its own
            split lists, as FGVCAircraft and the ImageNet family do).
        image_dir: Sub-folder holding the images (relative to ``folder``).
        fewshot_val: Whether few-shot sampling also samples the validation split; False where
            the reference validates on the test split (ImageNet).
        eval_only: A test set only (ImageNet-V2/-Sketch/-A/-R), used for domain generalization.
        aliases: Other accepted spellings (the papers' names, torchvision-style names).
    """

    name: str
    title: str
    folder: str
    template: str
    read: Callable[[Path], SuiteSplits]
    counts: SuiteCounts
    split_file: str | None = None
    image_dir: str = "images"
    fewshot_val: bool = True
    eval_only: bool = False
    aliases: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.template.count("{}") != 1:
            raise ValueError(f"{self.name}: template must contain exactly one '{{}}'")

    def path(self, data_root: str | Path) -> Path:
        """The dataset's folder under ``data_root``."""
        return Path(data_root).expanduser() / self.folder

    def require_folder(self, data_root: str | Path) -> Path:
        """The dataset's folder, or a DatasetError saying how to install it."""
        folder = self.path(data_root)
        if not folder.is_dir():
            raise DatasetError(
                f"{self.title}: {folder} does not exist; see `vprompt data check --dataset "
                f"{self.name} --data-root {data_root}` and `vprompt data prepare`"
            )
        return folder

    def load(self, data_root: str | Path) -> SuiteSplits:
        """Read the full splits from ``data_root``."""
        return self.read(self.require_folder(data_root))


SUITE: Registry[SuiteDataset] = Registry("dataset")
_ALIASES: dict[str, str] = {}


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def register_suite(dataset: SuiteDataset) -> SuiteDataset:
    """Register a dataset under its name and aliases (spelling-insensitive: case, ``-``, ``_``)."""
    SUITE.register(dataset.name, dataset)
    for alias in (dataset.name, dataset.title, *dataset.aliases):
        key = _key(alias)
        if _ALIASES.get(key, dataset.name) != dataset.name:
            raise ValueError(f"dataset alias {alias!r} is already taken by {_ALIASES[key]!r}")
        _ALIASES[key] = dataset.name
    return dataset


def get_suite(name: str) -> SuiteDataset:
    """Look a dataset up by name or alias, with close-match suggestions when unknown."""
    found = _ALIASES.get(_key(name))
    if found is None:
        raise UnknownNameError(unknown_name_message("dataset", name, SUITE.names()))
    return SUITE.get(found)


def read_json_file(path: Path) -> object:
    """Parse a JSON file with errors that name it (never anything but JSON)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return jsonio.loads(raw, what=str(path))
    except jsonio.JSONInputError as exc:
        raise DatasetError(str(exc)) from None


def read_text_lines(path: Path, *, hint: str = "") -> list[str]:
    """A UTF-8 text file's lines, trailing blank lines dropped, with errors that name it.

    Args:
        path: The file.
        hint: Appended to the "file not found" message (where the file comes from).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found{'; ' + hint if hint else ''}") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror})") from None
    return text.rstrip().splitlines()


def read_split_file(path: Path, image_dir: str) -> SuiteSplits:
    """A ``split_zhou_*.json`` file: ``{"train"|"val"|"test": [[impath, label, classname], …]}``.

    ``impath`` is relative to ``image_dir``; the items' paths become relative to the dataset
    folder (``image_dir/impath``).
    """
    data = read_json_file(path)
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), list) for k in ("train", "val", "test")
    ):
        raise DatasetError(f"{path}: expected an object with train, val and test lists")
    prefix = image_dir.strip("/")

    def convert(split: str) -> list[Datum]:
        out = []
        for i, entry in enumerate(data[split]):
            item = Datum.from_json(entry, where=f"{path} [{split}][{i}]")
            out.append(
                Datum(f"{prefix}/{item.path}" if prefix else item.path, item.label, item.classname)
            )
        return out

    train, val, test = convert("train"), convert("val"), convert("test")
    try:
        return SuiteSplits(train, val, test, label_names(train))
    except DatasetError as exc:
        raise DatasetError(f"{path} [train]: {exc}") from None


def write_split_file(path: Path, splits: SuiteSplits, image_dir: str) -> None:
    """Write ``splits`` in the ``split_zhou`` format (paths relative to ``image_dir``)."""
    from vprompt.utils.io import atomic_write_text

    prefix = image_dir.strip("/") + "/" if image_dir.strip("/") else ""

    def convert(items: Sequence[Datum]) -> list[list[str | int]]:
        out: list[list[str | int]] = []
        for d in items:
            if prefix and not d.path.startswith(prefix):
                raise DatasetError(f"{d.path}: not inside {image_dir}/")
            out.append([d.path[len(prefix) :], d.label, d.classname])
        return out

    payload = {
        "train": convert(splits.train),
        "val": convert(splits.val),
        "test": convert(splits.test),
    }
    atomic_write_text(path, jsonio.dumps(payload, indent=4) + "\n")
