"""Every dataset's recipe against its reader: fake installs packed back into original downloads.

Each synthetic fixture (the layout a reader expects) is turned into the downloads its recipe
asks for; ``prepare`` must rebuild a folder that the reader loads item for item the same.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from archive_helpers import tree, write_tar, write_zip
from vprompt.data.prepare import prepare_dataset
from vprompt.data.recipes import RECIPES, recipe_for
from vprompt.data.suite import SUITE, SuiteSplits, get_suite
from vprompt.data.suite.synthetic import write_fake_dataset


def same_items(a: SuiteSplits, b: SuiteSplits) -> bool:
    return (a.train, a.val, a.test, a.classnames) == (b.train, b.val, b.test, b.classnames)


def pack_originals(name: str, fake_root: Path, down: Path) -> None:
    """Turn a fake installed dataset back into the original downloads its recipe expects."""
    spec = get_suite(name)
    folder = spec.path(fake_root)
    sources = recipe_for(spec)
    dests = [s.dest for s in sources if s.dest]
    down.mkdir(parents=True, exist_ok=True)
    for s in sources:
        src = folder / s.dest if s.dest else folder
        if not src.exists():
            if not s.required:
                continue
            # Originals the readers never open (Pets' annotations, Cars' devkit …).
            assert s.kind != "folder", f"{name}: the fixture lacks {s.dest}"
            src.parent.mkdir(parents=True, exist_ok=True)
            if s.kind == "file":
                src.write_bytes(b"not read by the reader")
            else:
                src.mkdir()
                (src / "unused.txt").write_text("not read by the reader")
        if s.kind == "file":
            shutil.copy(src, down / s.names[0])
            continue
        if s.kind == "folder":
            shutil.copytree(src, down / s.names[0])
            continue
        members = {}
        for rel in sorted(tree(src)):
            if not s.dest and any(rel == d or rel.startswith(f"{d}/") for d in dests):
                continue  # another input provides it
            top = s.take[0]
            members[f"{top}/{rel}" if top else rel] = (src / rel).read_bytes()
        archive = down / s.names[0]
        if archive.suffix == ".zip":
            write_zip(archive, members)
        else:
            write_tar(archive, members, mode="w" if archive.suffix == ".tar" else "w:gz")


def test_every_registered_dataset_has_a_recipe():
    assert sorted(RECIPES) == sorted(SUITE.names())


@pytest.mark.parametrize("name", sorted(SUITE.names()))
def test_every_recipe_builds_what_its_reader_reads(tmp_path, name):
    fake, down, root = tmp_path / "fake", tmp_path / "downloads", tmp_path / "data"
    write_fake_dataset(name, fake)
    pack_originals(name, fake, down)
    spec = get_suite(name)
    report = prepare_dataset(spec, root, down)
    assert report.check is not None
    assert report.check.ok, report.check.lines()
    assert report.notes == []
    assert same_items(spec.load(root), spec.load(fake))
    assert prepare_dataset(spec, root, down).already_prepared


def test_imagenet_variants_take_classnames_from_the_prepared_imagenet(tmp_path):
    fake, down, root = tmp_path / "fake", tmp_path / "downloads", tmp_path / "data"
    write_fake_dataset("imagenet_r", fake)
    pack_originals("imagenet_r", fake, down)
    (down / "classnames.txt").unlink()
    spec = get_suite("imagenet_r")
    report = prepare_dataset(spec, root, down)
    (note,) = report.notes
    assert "prepare imagenet first" in note
    assert report.check is not None
    assert [p.what for p in report.check.errors] == [
        f"{spec.path(root) / 'classnames.txt'} is missing"
    ]
    imagenet = get_suite("imagenet").path(root)
    imagenet.mkdir()
    shutil.copy(spec.path(fake) / "classnames.txt", imagenet / "classnames.txt")
    report = prepare_dataset(spec, root, down)
    assert report.actions == [
        f"copied {imagenet / 'classnames.txt'} → {spec.path(root) / 'classnames.txt'}"
    ]
    assert report.check is not None
    assert report.check.ok
