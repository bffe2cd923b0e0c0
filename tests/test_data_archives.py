"""Safe extraction of downloaded archives: nothing is ever written outside the destination."""

from __future__ import annotations

import io
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

from archive_helpers import jpeg, tree, write_tar, write_zip
from vprompt.data.archives import extract, safe_parts
from vprompt.errors import DatasetError

# --------------------------------------------------------------------------- archive builders


# --------------------------------------------------------------------------- safe extraction


@pytest.mark.parametrize(
    "name", ["../evil.txt", "a/../../evil.txt", "/etc/evil.txt", "C:/evil.txt", "..\\evil.txt"]
)
def test_unsafe_member_names_are_refused(name):
    with pytest.raises(DatasetError, match="refusing to extract member"):
        safe_parts(name, Path("x.tar"))


def test_safe_names_are_normalised():
    assert safe_parts("./images//a.jpg", Path("x.tar")) == ("images", "a.jpg")


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_traversal_member_writes_nothing_outside(tmp_path, kind):
    members = {"images/a.jpg": jpeg(1), "../evil.txt": b"evil"}
    archive = (
        write_tar(tmp_path / "in" / "x.tar.gz", members)
        if kind == "tar"
        else write_zip(tmp_path / "in" / "x.zip", members)
    )
    dest = tmp_path / "out" / "deep"
    dest.mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"\.\./evil\.txt"):
        extract(archive, dest)
    assert not (tmp_path / "out" / "evil.txt").exists()
    assert not (tmp_path / "evil.txt").exists()


def _tar_with(tmp_path: Path, info: tarfile.TarInfo) -> Path:
    path = tmp_path / "special.tar"
    with tarfile.open(path, "w") as tf:
        ok = tarfile.TarInfo("images/a.jpg")
        data = jpeg(2)
        ok.size = len(data)
        tf.addfile(ok, io.BytesIO(data))
        tf.addfile(info)
    return path


@pytest.mark.parametrize(
    ("link_type", "target"),
    [
        (tarfile.SYMTYPE, "../../outside"),
        (tarfile.SYMTYPE, "/etc/passwd"),
        (tarfile.LNKTYPE, "../x"),
        (tarfile.SYMTYPE, "sub/../../../x"),
    ],
)
@pytest.mark.parametrize("python_filter", [True, False], ids=["data-filter", "own-checks"])
def test_links_pointing_outside_are_refused(
    tmp_path, monkeypatch, link_type, target, python_filter
):
    # Our own checks must hold on Pythons without tarfile's "data" filter, too.
    monkeypatch.setattr("vprompt.data.archives._HAS_DATA_FILTER", python_filter)
    info = tarfile.TarInfo("images/link")
    info.type = link_type
    info.linkname = target
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(DatasetError, match="refusing to extract member 'images/link'"):
        extract(_tar_with(tmp_path, info), dest)
    assert not (dest / "images" / "link").exists()


def test_links_inside_are_kept(tmp_path):
    info = tarfile.TarInfo("images/b.jpg")
    info.type = tarfile.SYMTYPE
    info.linkname = "a.jpg"
    dest = tmp_path / "out"
    dest.mkdir()
    extract(_tar_with(tmp_path, info), dest)
    assert (dest / "images" / "b.jpg").read_bytes() == (dest / "images" / "a.jpg").read_bytes()


@pytest.mark.parametrize(
    ("link_type", "target", "refused"),
    [
        (tarfile.SYMTYPE, "../..", True),  # the archive root: DATA_ROOT once jpg/ is moved
        (tarfile.SYMTYPE, "../labels.mat", True),  # a file that is not extracted
        (tarfile.LNKTYPE, "oxford/labels.mat", True),
        (tarfile.SYMTYPE, "a.jpg", False),
        (tarfile.SYMTYPE, "../jpg/a.jpg", False),
    ],
)
def test_links_must_stay_inside_the_folder_that_is_taken(tmp_path, link_type, target, refused):
    """data prepare extracts one folder of an archive and moves it into the dataset folder: a
    link that only stays inside the archive would point out of the dataset once moved."""
    path = tmp_path / "flowers.tar"
    with tarfile.open(path, "w") as tf:
        for name, data in (("oxford/labels.mat", b"labels"), ("oxford/jpg/a.jpg", jpeg(3))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("oxford/jpg/link")
        link.type = link_type
        link.linkname = target
        tf.addfile(link)
    dest = tmp_path / "out"
    dest.mkdir()
    if refused:
        with pytest.raises(DatasetError, match=r"points outside the folder oxford/jpg/"):
            extract(path, dest, take=("oxford/jpg",))
        assert not (dest / "oxford" / "jpg" / "link").exists()
        whole = tmp_path / "whole"
        whole.mkdir()
        extract(path, whole)  # the whole archive taken: the same link stays inside it
        assert (whole / "oxford" / "jpg" / "link").is_symlink() == (link_type == tarfile.SYMTYPE)
    else:
        extract(path, dest, take=("oxford/jpg",))
        assert (dest / "oxford" / "jpg" / "link").read_bytes() == jpeg(3)


@pytest.mark.parametrize("dev_type", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
@pytest.mark.parametrize("python_filter", [True, False], ids=["data-filter", "own-checks"])
def test_device_files_are_refused(tmp_path, monkeypatch, dev_type, python_filter):
    monkeypatch.setattr("vprompt.data.archives._HAS_DATA_FILTER", python_filter)
    info = tarfile.TarInfo("images/dev")
    info.type = dev_type
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(DatasetError, match="special file"):
        extract(_tar_with(tmp_path, info), dest)


def test_zip_symlinks_are_refused(tmp_path):
    path = tmp_path / "links.zip"
    with zipfile.ZipFile(path, "w") as zf:
        info = zipfile.ZipInfo("images/link")
        info.external_attr = (0o120777) << 16
        zf.writestr(info, "../../outside")
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(DatasetError, match="symbolic links"):
        extract(path, dest)


def test_extract_takes_only_the_requested_folder(tmp_path):
    archive = write_tar(
        tmp_path / "a.tar.gz", {"top/data/x.txt": b"x", "top/other/y.txt": b"y", "z.txt": b"z"}
    )
    dest = tmp_path / "out"
    dest.mkdir()
    assert extract(archive, dest, take=("top/data",)) == 1
    assert tree(dest) == {"top/data/x.txt"}


def test_damaged_archive_is_a_clear_error(tmp_path):
    good = write_tar(tmp_path / "a.tar.gz", {"images/a.jpg": jpeg(1) * 50})
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(DatasetError, match=r"broken\.tar\.gz"):
        extract(broken, dest)
    not_archive = tmp_path / "notes.tar.gz"
    not_archive.write_text("hello")
    with pytest.raises(DatasetError, match=r"notes\.tar\.gz: not a tar archive"):
        extract(not_archive, dest)
    unnamed = tmp_path / "download.bin"
    unnamed.write_text("hello")
    with pytest.raises(DatasetError, match="not a zip or tar archive"):
        extract(unnamed, dest)
    # Content decides when the name does not say.
    shutil.copy(write_zip(tmp_path / "z.zip", {"images/a.jpg": b"x"}), unnamed)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert extract(unnamed, fresh) == 1
