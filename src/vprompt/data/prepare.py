"""Build a dataset's expected folder from the original archives the user downloaded.

vprompt never downloads. The user fetches each dataset's original files (links in
:data:`vprompt.data.check.HOMEPAGES` and CoOp's DATASETS.md) into one folder; the dataset's
recipe (:mod:`vprompt.data.recipes`) says which files to look for there, what to extract from
them and where it goes. Everything is staged in a temporary folder next to its destination and
renamed into place, so an interrupted run leaves no half-built dataset, and a second run only
adds what is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vprompt.data.archives import extract, extract_nested, member_root
from vprompt.data.check import CheckReport, check_dataset, homepage
from vprompt.data.recipes import Source, recipe_for
from vprompt.data.suite.base import SuiteDataset
from vprompt.errors import DatasetError
from vprompt.utils.io import atomic_write_text

_WNID = re.compile(r"^n\d{8}$")


@dataclass
class PrepareReport:
    """What ``prepare_dataset`` did.

    Attributes:
        dataset: Registry name.
        folder: The dataset folder.
        already_prepared: Nothing was written: what the downloads hold was already in place
            (``notes`` says what is still missing).
        actions: One line per input put in place.
        notes: What the user still has to do (e.g. download the split file).
        removed: Archives deleted afterwards (``keep_archives=False``).
        check: The install check run at the end.
    """

    dataset: str
    folder: str
    already_prepared: bool = False
    actions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    check: CheckReport | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "folder": self.folder,
            "already_prepared": self.already_prepared,
            "actions": self.actions,
            "notes": self.notes,
            "removed": self.removed,
            "check": self.check.to_json() if self.check is not None else None,
        }


@dataclass(frozen=True)
class _Found:
    source: Source
    path: Path | None  # the file or folder; None when it must come out of ``container`` or be made
    container: Path | None = None


def _done(source: Source, folder: Path) -> bool:
    paths = source.provides or (source.dest,)
    return all((folder / p).exists() for p in paths) if folder.is_dir() else False


def _locate(source: Source, spec: SuiteDataset, downloads: Path, data_root: Path) -> _Found:
    want_dir = source.kind == "folder"
    for base in (downloads, downloads / spec.folder):
        for name in source.names:
            path = base / name
            if path.is_dir() if want_dir else path.is_file():
                return _Found(source, path)
    for name in source.from_data_root:
        if (data_root / name).is_file():
            return _Found(source, data_root / name)
    for name in source.inside:
        if (downloads / name).is_file():
            return _Found(source, None, downloads / name)
    return _Found(source, None)


def _missing_message(spec: SuiteDataset, missing: list[Source], downloads: Path) -> str:
    wanted = "; ".join(
        " or ".join([*s.names, *(f"{c} (holding it)" for c in s.inside)]) for s in missing
    )
    return (
        f"{spec.title}: {downloads} lacks {wanted}; download the original files from "
        f"{homepage(spec.name)} into {downloads}"
    )


def _place(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; merge folders child by child; never overwrite what exists."""
    if not dst.exists() and not dst.is_symlink():
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
    elif dst.is_dir() and not dst.is_symlink() and src.is_dir() and not src.is_symlink():
        for child in sorted(src.iterdir()):
            _place(child, dst / child.name)


def imagenet_classnames(train_dir: Path) -> str:
    """``classnames.txt`` for ImageNet: sorted wnid folders paired with CLIP's class names.

    Raises:
        DatasetError: ``train_dir`` does not hold exactly the 1000 ``n########`` folders.
    """
    wnids = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and _WNID.match(p.name))
    if len(wnids) != 1000:
        raise DatasetError(
            f"{train_dir}: expected the 1000 ImageNet class folders (n########), found "
            f"{len(wnids)}; put a classnames.txt into the downloads folder instead"
        )
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return "".join(f"{w} {n}\n" for w, n in zip(wnids, IMAGENET_CLASSNAMES, strict=True))


def _check_class_folders(path: Path) -> None:
    entries = list(path.iterdir())
    if not any(e.is_dir() for e in entries):
        raise DatasetError(
            f"{path}: expected one sub-folder per class (n01440764/ …), found "
            f"{len(entries)} files directly inside; sort the validation images into class "
            "folders first (e.g. with the widely used valprep.sh script)"
        )


def _build(
    found: _Found, spec: SuiteDataset, built: Path, work: Path, report: PrepareReport
) -> list[Path]:
    """Put one input into ``built`` (the staged dataset folder); returns the archives used."""
    source, folder = found.source, Path(report.folder)
    target = built / source.dest if source.dest else built
    if source.kind == "folder":
        assert found.path is not None
        _check_class_folders(found.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(found.path.resolve(), target_is_directory=True)
        report.actions.append(f"linked {found.path} → {folder / source.dest}")
        return []
    if source.kind == "file":
        if found.path is None:  # a made file
            assert source.make == "imagenet-classnames"
            train_dir = f"{spec.image_dir}/train"
            train = next((p for p in (built / train_dir, folder / train_dir) if p.is_dir()), None)
            if train is None:
                raise DatasetError(f"{folder}: no {train_dir} folder to name the classes from")
            atomic_write_text(target, imagenet_classnames(train))
            report.actions.append(f"wrote {folder / source.dest} (CLIP's ImageNet class names)")
            return []
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(found.path, target)
        report.actions.append(f"copied {found.path} → {folder / source.dest}")
        return []
    archive, used = found.path, [found.path] if found.path is not None else []
    if archive is None:
        assert found.container is not None
        nested = Path(tempfile.mkdtemp(dir=work))
        archive = extract_nested(found.container, source.names, nested)
        if archive is None:
            raise DatasetError(
                f"{found.container} holds none of {', '.join(source.names)}; is it the "
                "original archive?"
            )
        used = [found.container]
    out = Path(tempfile.mkdtemp(dir=work))
    extract(archive, out, take=source.take)
    root = member_root(out, source.take)
    if root is None:
        raise DatasetError(
            f"{archive}: holds none of the expected folders "
            f"({', '.join(t or '(top level)' for t in source.take)}); is it the original archive?"
        )
    if source.dest:
        _place(root, target)
    else:
        for child in sorted(root.iterdir()):
            _place(child, built / child.name)
    report.actions.append(f"extracted {archive.name} → {folder / source.dest}")
    return used


def prepare_dataset(
    spec: SuiteDataset,
    data_root: str | os.PathLike[str],
    downloads: str | os.PathLike[str],
    *,
    keep_archives: bool = True,
    check_images: bool = False,
) -> PrepareReport:
    """Build ``data_root/<spec.folder>`` from the original files in ``downloads``.

    Args:
        spec: The registered dataset.
        data_root: The folder that holds every dataset's folder (``--data-root``).
        downloads: Where the user saved the original archives (never downloaded here).
        keep_archives: Keep the archives (and link extracted-folder inputs such as ImageNet's
            ``train/``); False deletes used archives and moves such folders instead.
        check_images: Also decode every image in the final check.

    Returns:
        What was done, what is left to do, and the install check.

    Raises:
        DatasetError: A required input is missing (naming the accepted file names and the
            download page), an archive is damaged or holds an unsafe member.
    """
    root = Path(data_root).expanduser()
    down = Path(downloads).expanduser()
    if not down.is_dir():
        raise DatasetError(f"{down}: downloads folder (--from) does not exist")
    folder = spec.path(root)
    report = PrepareReport(dataset=spec.name, folder=str(folder))
    pending = [s for s in recipe_for(spec) if not _done(s, folder)]
    if not pending:
        report.already_prepared = True
        report.check = check_dataset(spec, root, check_images=check_images)
        return report
    located = [_locate(s, spec, down, root) for s in pending]
    absent = [f for f in located if f.path is None and f.container is None]
    missing = [f.source for f in absent if f.source.required]
    if missing:
        raise DatasetError(_missing_message(spec, missing, down))
    todo = []
    for f in located:
        if f.path is None and f.container is None and f.source.make is None:
            if f.source.note:
                report.notes.append(f.source.note)
        else:
            todo.append(f)
    if not todo:  # only optional inputs are missing, and the user has been told which
        report.already_prepared = True
        report.check = check_dataset(spec, root, check_images=check_images)
        return report
    root.mkdir(parents=True, exist_ok=True)
    used: list[Path] = []
    # Staged next to where it ends up (inside the folder when it exists, even through a
    # symlink to another disk), so that moving it into place is a rename.
    work = Path(
        tempfile.mkdtemp(prefix=".vprompt-prepare-", dir=folder if folder.is_dir() else root)
    )
    try:
        built = work / spec.folder
        built.mkdir()
        for f in todo:
            try:
                used += _build(f, spec, built, work, report)
            except DatasetError as exc:
                if f.source.required or f.source.make is None:
                    raise
                report.notes.append(f"{exc}; {f.source.note}")
        if folder.is_dir():
            for child in sorted(built.iterdir()):
                _place(child, folder / child.name)
        else:
            _place(built, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not keep_archives:
        _remove_inputs(located, used, folder, report)
    report.check = check_dataset(spec, root, check_images=check_images)
    return report


def _remove_inputs(
    located: list[_Found], used: list[Path], folder: Path, report: PrepareReport
) -> None:
    for f in located:
        link = folder / f.source.dest
        if f.source.kind == "folder" and f.path is not None and link.is_symlink():
            link.unlink()
            shutil.move(str(f.path), str(link))
            report.actions.append(f"moved {f.path} → {link}")
    for path in dict.fromkeys(used):
        path.unlink(missing_ok=True)
        report.removed.append(str(path))
