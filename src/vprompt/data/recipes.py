"""Where each dataset's original downloads go: one :class:`Source` per input, as data.

``vprompt data prepare`` (:mod:`vprompt.data.prepare`) follows these recipes. The layouts are
those of CoOp's DATASETS.md, which the readers in :mod:`vprompt.data.suite` expect; image
folders are written as ``{image_dir}`` so they follow :attr:`SuiteDataset.image_dir`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from vprompt.data.check import coop_link
from vprompt.data.suite.base import SuiteDataset
from vprompt.errors import DatasetError

SourceKind = Literal["archive", "file", "folder"]
Maker = Literal["imagenet-classnames"]
_IMAGES = "{image_dir}"  # stands for the dataset's image folder (SuiteDataset.image_dir)


@dataclass(frozen=True)
class Source:
    """One input a recipe takes from the downloads folder.

    Attributes:
        names: Accepted file (or folder) names, relative to the downloads folder; the first
            one found wins. Also looked for inside a sub-folder named like the dataset folder.
        dest: Where it goes, relative to the dataset folder (``""``: the folder itself;
            ``{image_dir}``: the dataset's image folder).
        kind: ``archive`` (extracted), ``file`` (copied) or ``folder`` (linked, or moved with
            ``--remove-archives``).
        take: For archives, the folders inside it whose content becomes ``dest``; the first
            one present wins (``""``: the archive's top level).
        provides: Paths (relative to the dataset folder) whose presence means this input is
            already in place; defaults to ``dest``.
        inside: Archives that may hold this one (searched by file name), e.g. a zip around
            a tarball.
        from_data_root: Also accepted, relative to ``--data-root`` (an already-prepared
            dataset's file, like ImageNet's ``classnames.txt``).
        required: Whether preparation fails without it. Optional inputs are the files of
            CoOp's layout that the readers never open (they use the split file), copied when
            present, and files the user may add later (split files).
        make: How to produce it when no file is found.
        note: What to tell the user when an optional input is missing (nothing if empty).
    """

    names: tuple[str, ...]
    dest: str
    kind: SourceKind = "archive"
    take: tuple[str, ...] = ("",)
    provides: tuple[str, ...] = ()
    inside: tuple[str, ...] = ()
    from_data_root: tuple[str, ...] = ()
    required: bool = True
    make: Maker | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if not self.names or (not self.dest and not self.provides):
            raise ValueError(f"{self}: needs names, and provides when dest is the folder itself")


# A dataset's inputs, in the order they are built.
Recipe = tuple[Source, ...]


def _images(
    top: str,
    names: tuple[str, ...],
    *,
    take: tuple[str, ...] = (),
    inside: tuple[str, ...] = (),
) -> Source:
    """An archive whose folder ``top`` (or one of ``take``) holds the dataset's image folder."""
    return Source(names=names, dest=_IMAGES, take=(top, *take), inside=inside)


_CLASSNAMES_NOTE = (
    "classnames.txt (one 'wnid class name' line per class) is needed: prepare imagenet first "
    "(it writes one) and run this again, or download it via CoOp's DATASETS.md"
)


def _imagenet_variant(archives: tuple[str, ...], top: str) -> Recipe:
    return (
        _images(top, names=archives),
        Source(
            names=("classnames.txt",),
            dest="classnames.txt",
            kind="file",
            from_data_root=("imagenet/classnames.txt",),
            required=False,
            note=_CLASSNAMES_NOTE,
        ),
    )


RECIPES: dict[str, Recipe] = {
    "caltech101": (
        _images(
            "101_ObjectCategories",
            names=("101_ObjectCategories.tar.gz", "101_ObjectCategories.tgz"),
            inside=("caltech-101.zip", "caltech101.zip", "caltech-101.tar.gz"),
        ),
    ),
    "oxford_pets": (
        _images("images", names=("images.tar.gz", "images.tgz")),
        Source(
            names=("annotations.tar.gz", "annotations.tgz"),
            dest="annotations",
            take=("annotations",),
            required=False,
        ),
    ),
    "oxford_flowers": (
        _images("jpg", names=("102flowers.tgz", "102flowers.tar.gz")),
        Source(names=("imagelabels.mat",), dest="imagelabels.mat", kind="file", required=False),
        Source(names=("cat_to_name.json",), dest="cat_to_name.json", kind="file", required=False),
    ),
    "food101": (
        Source(
            names=("food-101.tar.gz", "food-101.tgz"),
            dest="",
            take=("food-101",),
            provides=(_IMAGES,),
        ),
    ),
    "dtd": (
        Source(
            names=("dtd-r1.0.1.tar.gz", "dtd-r1.0.1.tgz", "dtd.tar.gz"),
            dest="",
            take=("dtd",),
            provides=(_IMAGES,),
        ),
    ),
    "eurosat": (
        _images(
            "2750",
            names=("EuroSAT.zip", "EuroSAT_RGB.zip", "eurosat.zip"),
            take=("EuroSAT/2750", "EuroSAT_RGB", "EuroSAT"),
        ),
    ),
    "stanford_cars": (
        Source(
            names=("cars_train.tgz", "cars_train.tar.gz"),
            dest="cars_train",
            take=("cars_train",),
        ),
        Source(names=("cars_test.tgz", "cars_test.tar.gz"), dest="cars_test", take=("cars_test",)),
        Source(
            names=("car_devkit.tgz", "car_devkit.tar.gz"),
            dest="devkit",
            take=("devkit",),
            required=False,
        ),
        Source(
            names=("cars_test_annos_withlabels.mat",),
            dest="cars_test_annos_withlabels.mat",
            kind="file",
            required=False,
        ),
    ),
    "fgvc_aircraft": (
        Source(
            names=("fgvc-aircraft-2013b.tar.gz", "fgvc-aircraft-2013b.tgz"),
            dest="",
            take=("fgvc-aircraft-2013b/data",),
            provides=(
                _IMAGES,
                "variants.txt",
                "images_variant_train.txt",
                "images_variant_val.txt",
                "images_variant_test.txt",
            ),
        ),
    ),
    "sun397": (_images("SUN397", names=("SUN397.tar.gz", "SUN397.tgz")),),
    "ucf101": (_images("UCF-101-midframes", names=("UCF-101-midframes.zip",)),),
    "imagenet": (
        Source(
            names=("train", "imagenet/train", "ILSVRC2012/train", "ILSVRC/Data/CLS-LOC/train"),
            dest=f"{_IMAGES}/train",
            kind="folder",
        ),
        Source(
            names=("val", "imagenet/val", "ILSVRC2012/val", "ILSVRC/Data/CLS-LOC/val"),
            dest=f"{_IMAGES}/val",
            kind="folder",
        ),
        Source(
            names=("classnames.txt",),
            dest="classnames.txt",
            kind="file",
            required=False,
            make="imagenet-classnames",
            note="classnames.txt is linked from CoOp's DATASETS.md",
        ),
    ),
    "imagenetv2": _imagenet_variant(
        ("imagenetv2-matched-frequency.tar.gz", "imagenetv2-matched-frequency-format-val.tar.gz"),
        "imagenetv2-matched-frequency-format-val",
    ),
    "imagenet_sketch": _imagenet_variant(("ImageNet-Sketch.zip", "imagenet-sketch.zip"), "sketch"),
    "imagenet_a": _imagenet_variant(("imagenet-a.tar", "imagenet-a.tar.gz"), "imagenet-a"),
    "imagenet_r": _imagenet_variant(("imagenet-r.tar", "imagenet-r.tar.gz"), "imagenet-r"),
}


def recipe_for(spec: SuiteDataset) -> Recipe:
    """The dataset's recipe with ``{image_dir}`` resolved and its split file added."""
    recipe = RECIPES.get(spec.name)
    if recipe is None:
        raise DatasetError(f"{spec.title}: no preparation recipe; see {coop_link(spec.name)}")
    image_dir = spec.image_dir.strip("/")

    def resolve(path: str) -> str:
        return path.replace(_IMAGES, image_dir).strip("/")

    sources = [
        replace(s, dest=resolve(s.dest), provides=tuple(resolve(p) for p in s.provides))
        for s in recipe
    ]
    if spec.split_file is not None:
        sources.append(
            Source(
                names=(spec.split_file,),
                dest=spec.split_file,
                kind="file",
                required=False,
                note=(
                    f"the split file {spec.split_file} is not in the downloads folder: download "
                    f"it from {coop_link(spec.name)} into it and run prepare again"
                ),
            )
        )
    return tuple(sources)
