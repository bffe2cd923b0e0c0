"""FGVC-Aircraft: read from the dataset's own list files, as CoOp's ``fgvc_aircraft.py`` does.

There is no split file. ``variants.txt`` lists the 100 variants; a variant's label is its line
number there (0-based). ``images_variant_{train,val,test}.txt`` hold one ``IMAGEID VARIANT``
line per image, in the order the items are kept; the variant may contain spaces
(``Cessna 172``) and slashes (``F-16A/B``).
"""

from __future__ import annotations

from pathlib import Path

from vprompt.data.items import Datum
from vprompt.data.suite.base import (
    SuiteCounts,
    SuiteDataset,
    SuiteSplits,
    read_text_lines,
    register_suite,
)
from vprompt.errors import DatasetError

IMAGE_DIR = "images"
VARIANTS_FILE = "variants.txt"
SPLIT_FILES = {split: f"images_variant_{split}.txt" for split in ("train", "val", "test")}
_HINT = (
    "it ships in fgvc-aircraft-2013b.tar.gz (folder fgvc-aircraft-2013b/data); "
    "see `vprompt data check --dataset fgvc_aircraft`"
)


def read_variants(path: Path) -> list[str]:
    """The variant names of ``variants.txt`` in file order (label = index).

    Raises:
        DatasetError: Missing file, blank lines inside it, or a variant listed twice.
    """
    names: list[str] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(read_text_lines(path, hint=_HINT), start=1):
        name = line.strip()
        if not name:
            raise DatasetError(f"{path}, line {lineno}: blank line (one variant per line)")
        if name in seen:
            raise DatasetError(
                f"{path}, line {lineno}: variant {name!r} already listed on line {seen[name]}"
            )
        seen[name] = lineno
        names.append(name)
    if not names:
        raise DatasetError(f"{path}: lists no variants")
    return names


def read_variant_list(path: Path, cname2lab: dict[str, int]) -> list[Datum]:
    """One ``images_variant_*.txt`` file → items (``images/IMAGEID.jpg``), in file order.

    Raises:
        DatasetError: Missing file, a line without a variant, or a variant that
            ``variants.txt`` does not list (named with file and line).
    """
    items = []
    for lineno, line in enumerate(read_text_lines(path, hint=_HINT), start=1):
        image_id, _, variant = line.strip().partition(" ")
        if not image_id or not variant:
            raise DatasetError(f"{path}, line {lineno}: expected 'IMAGEID VARIANT', got {line!r}")
        # The reference splits on single spaces and re-joins, which keeps the variant verbatim.
        label = cname2lab.get(variant)
        if label is None:
            raise DatasetError(
                f"{path}, line {lineno}: variant {variant!r} is not in {VARIANTS_FILE}"
            )
        items.append(Datum(f"{IMAGE_DIR}/{image_id}.jpg", label, variant))
    return items


def read_fgvc_aircraft(folder: Path) -> SuiteSplits:
    """Read FGVC-Aircraft's variant lists from its dataset folder."""
    classnames = read_variants(folder / VARIANTS_FILE)
    cname2lab = {name: label for label, name in enumerate(classnames)}
    train, val, test = (
        read_variant_list(folder / SPLIT_FILES[split], cname2lab)
        for split in ("train", "val", "test")
    )
    return SuiteSplits(train, val, test, classnames)


FGVC_AIRCRAFT = register_suite(
    SuiteDataset(
        name="fgvc_aircraft",
        title="FGVCAircraft",
        folder="fgvc_aircraft",
        template="a photo of a {}, a type of aircraft.",
        read=read_fgvc_aircraft,
        counts=SuiteCounts(classes=100, train=3334, val=3333, test=3333),
        image_dir=IMAGE_DIR,
        aliases=("aircraft",),
    )
)
