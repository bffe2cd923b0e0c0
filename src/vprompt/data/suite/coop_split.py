"""The nine datasets CoOp reads from its ``split_zhou_*.json`` files.

CoOp (``datasets/*.py`` of KaiyangZhou/CoOp) builds each split file once from the original
archives — with ``random.shuffle`` and no fixed seed — and from then on only reads it. The
published split files are therefore the reference: the readers here read them as they are, in
file order, and never rebuild them. ``OxfordPets.read_split`` joins each path to the image
folder; :func:`~vprompt.data.suite.base.read_split_file` does the same, keeping the paths
relative to the dataset folder.

The class names inside the split files are already the renamed ones. The renaming rules are
kept here as data (:data:`CALTECH_RENAMES`, :data:`EUROSAT_RENAMES`, :func:`ucf101_classname`,
:func:`sun397_classname`) because ``vprompt data prepare`` and the synthetic fixtures need them
to turn the original folder names into the split files' names.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from vprompt.data.suite.base import (
    SuiteCounts,
    SuiteDataset,
    SuiteSplits,
    read_split_file,
    register_suite,
)
from vprompt.errors import DatasetError

COOP_DATASETS_URL = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"

# Caltech101 category folders CoOp leaves out (datasets/caltech101.py ``IGNORED``).
CALTECH_IGNORED: tuple[str, ...] = ("BACKGROUND_Google", "Faces_easy")
# Caltech101 folder → class name (``NEW_CNAMES``); other folders keep their name.
CALTECH_RENAMES: dict[str, str] = {
    "airplanes": "airplane",
    "Faces": "face",
    "Leopards": "leopard",
    "Motorbikes": "motorbike",
}
# EuroSAT folder → class name (datasets/eurosat.py ``NEW_CNAMES``).
EUROSAT_RENAMES: dict[str, str] = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}

_CAMEL_WORD = re.compile(r"[A-Z][^A-Z]*")


def ucf101_classname(folder_action: str) -> str:
    """UCF101's CamelCase action (``ApplyEyeMakeup``) → CoOp's class name (``Apply_Eye_Makeup``).

    CoOp also names the ``UCF-101-midframes`` sub-folders this way. Like the reference's
    ``re.findall("[A-Z][^A-Z]*", action)``, characters before the first capital are dropped.

    Raises:
        DatasetError: ``folder_action`` has no capital letter (nothing would be left).
    """
    words = _CAMEL_WORD.findall(folder_action)
    if not words:
        raise DatasetError(f"UCF101 action {folder_action!r}: expected a CamelCase name")
    return "_".join(words)


def sun397_classname(category_path: str) -> str:
    """SUN397 category path → CoOp's class name.

    The first part (the letter folder) is dropped and the rest reversed, so qualifiers such as
    indoor/outdoor come first: ``a/abbey`` → ``abbey``, ``b/bathroom/indoor`` → ``indoor
    bathroom``. A leading ``/`` (as in SUN397's ``ClassName.txt``) is ignored.

    Raises:
        DatasetError: The path has no part after the letter folder.
    """
    parts = category_path.strip().strip("/").split("/")[1:]
    if not parts or not all(parts):
        raise DatasetError(
            f"SUN397 category {category_path!r}: expected 'letter/name[/qualifier]', e.g. 'a/abbey'"
        )
    return " ".join(reversed(parts))


def split_file_reader(
    split_file: str, image_dir: str, *, name: str
) -> Callable[[Path], SuiteSplits]:
    """A reader for a dataset whose splits come from CoOp's ``split_file``.

    Args:
        split_file: The JSON file's name inside the dataset folder.
        image_dir: The folder (relative to the dataset folder) the split's paths start from;
            ``""`` where they are relative to the dataset folder itself (StanfordCars).
        name: The dataset's registry name, for the error message.
    """

    def read(folder: Path) -> SuiteSplits:
        path = folder / split_file
        if not path.is_file():
            raise DatasetError(
                f"{path}: split file not found. Download {split_file} from the link in CoOp's "
                f"DATASETS.md ({COOP_DATASETS_URL}) and place it in {folder}; "
                f"`vprompt data check --dataset {name}` lists everything that is missing"
            )
        return read_split_file(path, image_dir)

    read.__name__ = f"read_{name}"
    read.__doc__ = f"Read {split_file} (paths under {image_dir or 'the dataset folder'}/)."
    return read


def _register(
    *,
    name: str,
    title: str,
    folder: str,
    image_dir: str,
    split_file: str,
    template: str,
    counts: tuple[int, int, int, int],
    aliases: tuple[str, ...] = (),
) -> SuiteDataset:
    return register_suite(
        SuiteDataset(
            name=name,
            title=title,
            folder=folder,
            template=template,
            read=split_file_reader(split_file, image_dir, name=name),
            counts=SuiteCounts(*counts),
            split_file=split_file,
            image_dir=image_dir,
            aliases=aliases,
        )
    )


CALTECH101 = _register(
    name="caltech101",
    title="Caltech101",
    folder="caltech-101",
    image_dir="101_ObjectCategories",
    split_file="split_zhou_Caltech101.json",
    template="a photo of a {}.",
    counts=(100, 4128, 1649, 2465),
)
OXFORD_PETS = _register(
    name="oxford_pets",
    title="OxfordPets",
    folder="oxford_pets",
    image_dir="images",
    split_file="split_zhou_OxfordPets.json",
    template="a photo of a {}, a type of pet.",
    counts=(37, 2944, 736, 3669),
    aliases=("pets", "OxfordIIITPet"),
)
STANFORD_CARS = _register(
    name="stanford_cars",
    title="StanfordCars",
    folder="stanford_cars",
    # The split's paths start at the dataset folder: cars_train/00001.jpg, cars_test/….
    image_dir="",
    split_file="split_zhou_StanfordCars.json",
    template="a photo of a {}.",
    counts=(196, 6509, 1635, 8041),
    aliases=("cars",),
)
OXFORD_FLOWERS = _register(
    name="oxford_flowers",
    title="Flowers102",
    folder="oxford_flowers",
    image_dir="jpg",
    split_file="split_zhou_OxfordFlowers.json",
    template="a photo of a {}, a type of flower.",
    counts=(102, 4093, 1633, 2463),
    aliases=("OxfordFlowers", "flowers"),
)
FOOD101 = _register(
    name="food101",
    title="Food101",
    folder="food-101",
    image_dir="images",
    split_file="split_zhou_Food101.json",
    template="a photo of {}, a type of food.",
    counts=(101, 50500, 20200, 30300),
)
SUN397 = _register(
    name="sun397",
    title="SUN397",
    folder="sun397",
    image_dir="SUN397",
    split_file="split_zhou_SUN397.json",
    template="a photo of a {}.",
    counts=(397, 15880, 3970, 19850),
)
DTD = _register(
    name="dtd",
    title="DTD",
    folder="dtd",
    image_dir="images",
    split_file="split_zhou_DescribableTextures.json",
    template="{} texture.",
    counts=(47, 2820, 1128, 1692),
    aliases=("DescribableTextures", "textures"),
)
EUROSAT = _register(
    name="eurosat",
    title="EuroSAT",
    folder="eurosat",
    image_dir="2750",
    split_file="split_zhou_EuroSAT.json",
    template="a centered satellite photo of {}.",
    counts=(10, 13500, 5400, 8100),
)
UCF101 = _register(
    name="ucf101",
    title="UCF101",
    folder="ucf101",
    image_dir="UCF-101-midframes",
    split_file="split_zhou_UCF101.json",
    template="a photo of a person doing {}.",
    counts=(101, 7639, 1898, 3783),
)
