"""Is a CoOp-suite dataset installed correctly? Every problem comes with how to fix it.

:func:`check_dataset` verifies a dataset folder under ``--data-root`` the way the readers will
use it: the folder, its split file and auxiliary files, every image the splits reference (and,
optionally, that each one decodes), labels 0..C-1 with one name each, and the sizes against the
published ones. ``vprompt data check`` prints the result.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from vprompt.data.items import Datum
from vprompt.data.suite.base import SuiteCounts, SuiteDataset, SuiteSplits, read_json_file
from vprompt.errors import DatasetError, VPromptError

Severity = Literal["error", "warning"]

COOP_DATASETS_MD = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"

# Section anchors of CoOp's DATASETS.md (where the split files and layouts are described).
_ANCHORS: dict[str, str] = {
    "imagenet": "imagenet",
    "caltech101": "caltech101",
    "oxford_pets": "oxfordpets",
    "stanford_cars": "stanfordcars",
    "oxford_flowers": "flowers102",
    "food101": "food101",
    "sun397": "sun397",
    "dtd": "dtd",
    "eurosat": "eurosat",
    "fgvc_aircraft": "fgvcaircraft",
    "ucf101": "ucf101",
    "imagenetv2": "imagenetv2",
    "imagenet_sketch": "imagenet-sketch",
    "imagenet_a": "imagenet-a",
    "imagenet_r": "imagenet-r",
}

# Where each dataset's original files are published.
HOMEPAGES: dict[str, str] = {
    "imagenet": "https://image-net.org/download.php",
    "caltech101": "https://data.caltech.edu/records/mzrjq-6wc02",
    "oxford_pets": "https://www.robots.ox.ac.uk/~vgg/data/pets/",
    "stanford_cars": "https://ai.stanford.edu/~jkrause/cars/car_dataset.html",
    "oxford_flowers": "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
    "food101": "https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/",
    "sun397": "https://vision.princeton.edu/projects/2010/SUN/",
    "dtd": "https://www.robots.ox.ac.uk/~vgg/data/dtd/",
    "eurosat": "https://github.com/phelber/EuroSAT",
    "fgvc_aircraft": "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/",
    "ucf101": f"{COOP_DATASETS_MD}#ucf101",
    "imagenetv2": "https://github.com/modestyachts/ImageNetV2",
    "imagenet_sketch": "https://github.com/HaohanWang/ImageNet-Sketch",
    "imagenet_a": "https://github.com/hendrycks/natural-adv-examples",
    "imagenet_r": "https://github.com/hendrycks/imagenet-r",
}

_IMAGENET_FAMILY = ("imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
# Files the readers need besides the split file and the images (relative to the folder).
AUX_FILES: dict[str, tuple[str, ...]] = {
    **{name: ("classnames.txt",) for name in _IMAGENET_FAMILY},
    "fgvc_aircraft": (
        "variants.txt",
        "images_variant_train.txt",
        "images_variant_val.txt",
        "images_variant_test.txt",
    ),
}
MAX_LISTED = 5


def coop_link(name: str) -> str:
    """CoOp's DATASETS.md, at the dataset's section when it has one."""
    anchor = _ANCHORS.get(name)
    return f"{COOP_DATASETS_MD}#{anchor}" if anchor else COOP_DATASETS_MD


def homepage(name: str) -> str:
    """The dataset's official download page (CoOp's DATASETS.md when there is none)."""
    return HOMEPAGES.get(name, coop_link(name))


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an install.

    Attributes:
        severity: ``error`` (the dataset cannot be used as is) or ``warning`` (it can, but
            differs from the published one — expected for fixtures and subsets).
        what: What is wrong, naming the file or value.
        fix: What to do about it.
    """

    severity: Severity
    what: str
    fix: str


@dataclass
class CheckReport:
    """The result of checking one dataset.

    Attributes:
        dataset: Registry name.
        folder: The dataset folder that was checked.
        problems: Everything found, errors first in the order checked.
        found: Sizes as read (None when the splits could not be read).
        images_checked: How many referenced images were looked at.
        decoded: Whether the images were also opened and decoded.
    """

    dataset: str
    folder: str
    problems: list[Problem] = field(default_factory=list)
    found: SuiteCounts | None = None
    images_checked: int = 0
    decoded: bool = False

    @property
    def ok(self) -> bool:
        """No errors (warnings allowed)."""
        return not self.errors

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def add(self, severity: Severity, what: str, fix: str) -> None:
        self.problems.append(Problem(severity, what, fix))

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "folder": self.folder,
            "ok": self.ok,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "found": asdict(self.found) if self.found is not None else None,
            "images_checked": self.images_checked,
            "decoded": self.decoded,
            "problems": [asdict(p) for p in self.problems],
        }

    def summary(self) -> str:
        """One line: status, sizes and the number of problems."""
        status = "ok" if self.ok else "FAILED"
        sizes = (
            f"{self.found.classes} classes, {self.found.train} train, {self.found.val} val, "
            f"{self.found.test} test"
            if self.found is not None
            else "splits not read"
        )
        counts = f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)"
        return f"{self.dataset}: {status} — {self.folder} — {sizes}; {counts}"

    def lines(self) -> list[str]:
        """The summary, then one line per problem with its fix."""
        return [self.summary()] + [
            f"  {p.severity}: {p.what} — fix: {p.fix}" for p in self.problems
        ]


def _prepare_hint(spec: SuiteDataset, data_root: Path) -> str:
    return (
        f"`vprompt data prepare --dataset {spec.name} --data-root {data_root} --from DOWNLOADS` "
        f"(originals: {homepage(spec.name)})"
    )


def _split_hint(spec: SuiteDataset, path: Path) -> str:
    return (
        f"download {spec.split_file} from CoOp's DATASETS.md ({coop_link(spec.name)}) "
        f"and place it at {path}"
    )


def _check_files(spec: SuiteDataset, folder: Path, data_root: Path, report: CheckReport) -> None:
    """Split file, auxiliary files and image folder: present and readable."""
    if spec.split_file is not None:
        split = folder / spec.split_file
        if not split.is_file():
            report.add("error", f"split file {split} is missing", _split_hint(spec, split))
        else:
            try:
                data = read_json_file(split)
            except DatasetError as exc:
                report.add("error", str(exc), _split_hint(spec, split))
            else:
                if not isinstance(data, dict) or not all(
                    isinstance(data.get(k), list) for k in ("train", "val", "test")
                ):
                    report.add(
                        "error",
                        f"{split}: expected an object with train, val and test lists",
                        _split_hint(spec, split),
                    )
    for name in AUX_FILES.get(spec.name, ()):
        path = folder / name
        if not path.is_file():
            if name == "classnames.txt":
                fix = (
                    f"run {_prepare_hint(spec, data_root)}, which writes it (ImageNet) or copies "
                    f"it from the prepared imagenet folder, or download it via "
                    f"{coop_link(spec.name)} and place it at {path}"
                )
            else:
                fix = f"it ships in the original archive; run {_prepare_hint(spec, data_root)}"
            report.add("error", f"{path} is missing", fix)
    images = folder / spec.image_dir if spec.image_dir else folder
    if not images.is_dir():
        report.add(
            "error",
            f"image folder {images} is missing",
            f"extract the original images there, or run {_prepare_hint(spec, data_root)}",
        )


def _check_labels(splits: SuiteSplits, report: CheckReport, fix: str) -> None:
    """Labels 0..C-1 in every split, each label always with the same class name."""
    names = splits.classnames
    for split, items in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        outside = [d for d in items if not 0 <= d.label < len(names)]
        if outside:
            d = outside[0]
            report.add(
                "error",
                f"{len(outside)} {split} item(s) have labels outside 0..{len(names) - 1} "
                f"(first: {d.path} with label {d.label})",
                fix,
            )
        renamed = [d for d in items if 0 <= d.label < len(names) and d.classname != names[d.label]]
        if renamed:
            d = renamed[0]
            report.add(
                "error",
                f"{len(renamed)} {split} item(s) name their label differently from the class "
                f"list (first: {d.path}: label {d.label} is {d.classname!r}, "
                f"expected {names[d.label]!r})",
                fix,
            )


def _unique_paths(items: Iterable[Datum]) -> list[str]:
    return list(dict.fromkeys(d.path for d in items))


def _progress(iterable: Iterable[Any], *, total: int, desc: str) -> Iterable[Any]:
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal, silence when piped (scripts, tests, --json).
    return tqdm(iterable, total=total, desc=desc, unit="img", disable=None, leave=False)


def _decode_error(path: Path) -> str | None:
    from vprompt.data.images import load_image

    try:
        load_image(path)
    except VPromptError as exc:
        return str(exc)
    return None


def _check_images(
    folder: Path, paths: Sequence[str], report: CheckReport, *, decode: bool, fix: str
) -> None:
    missing = [
        p for p in _progress(paths, total=len(paths), desc="files") if not (folder / p).is_file()
    ]
    report.images_checked = len(paths)
    if missing:
        listed = ", ".join(missing[:MAX_LISTED]) + (" …" if len(missing) > MAX_LISTED else "")
        report.add(
            "error",
            f"{len(missing)} of {len(paths)} referenced images are missing under {folder} "
            f"(first: {listed})",
            fix,
        )
    if not decode:
        return
    report.decoded = True
    gone = set(missing)
    present = [folder / p for p in paths if p not in gone]
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(
            _progress(pool.map(_decode_error, present), total=len(present), desc="decode")
        )
    broken = [msg for msg in results if msg is not None]
    if broken:
        listed = "; ".join(broken[:MAX_LISTED]) + (" …" if len(broken) > MAX_LISTED else "")
        report.add(
            "error",
            f"{len(broken)} of {len(present)} images do not decode ({listed})",
            "re-extract these files from the original archive (they are truncated or corrupt)",
        )


def _check_counts(spec: SuiteDataset, found: SuiteCounts, report: CheckReport) -> None:
    expected = spec.counts
    differ = [
        f"{key} {getattr(found, key)} (published {getattr(expected, key)})"
        for key in ("classes", "train", "val", "test")
        if getattr(found, key) != getattr(expected, key)
    ]
    if differ:
        report.add(
            "warning",
            f"sizes differ from the published {spec.title}: {', '.join(differ)}",
            "a full install must match; expected for test fixtures and subsets, otherwise "
            "re-download the original archives and the split file",
        )


def check_dataset(
    spec: SuiteDataset, data_root: str | os.PathLike[str], *, check_images: bool = True
) -> CheckReport:
    """Check one dataset's install under ``data_root``.

    Args:
        spec: The registered dataset.
        data_root: The folder that holds every dataset's folder (``--data-root``).
        check_images: Also open and decode every referenced image (slow on full installs);
            their existence is always checked.

    Returns:
        The report; ``report.ok`` is False when any error was found.
    """
    root = Path(data_root).expanduser()
    folder = spec.path(root)
    report = CheckReport(dataset=spec.name, folder=str(folder))
    if not folder.is_dir():
        report.add(
            "error",
            f"dataset folder {folder} does not exist",
            f"put the {spec.title} files there as CoOp's DATASETS.md describes "
            f"({coop_link(spec.name)}), or run {_prepare_hint(spec, root)}",
        )
        return report
    _check_files(spec, folder, root, report)
    if report.errors:
        return report
    reinstall = f"re-download the split file ({coop_link(spec.name)}) or re-run prepare"
    try:
        splits = spec.load(root)
    except DatasetError as exc:
        report.add("error", f"cannot read the splits: {exc}", reinstall)
        return report
    report.found = SuiteCounts(
        classes=len(splits.classnames),
        train=len(splits.train),
        val=len(splits.val),
        test=len(splits.test),
    )
    _check_labels(splits, report, reinstall)
    paths = _unique_paths([*splits.train, *splits.val, *splits.test])
    _check_images(
        folder,
        paths,
        report,
        decode=check_images,
        fix=f"re-extract the original images, or run {_prepare_hint(spec, root)}",
    )
    _check_counts(spec, report.found, report)
    return report
