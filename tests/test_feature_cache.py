"""The on-disk feature cache: keys, invalidation, views, crash safety, identities."""

# Fixtures imported from feature_helpers appear as arguments below: not redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import copy
import json
import os
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from feature_helpers import (  # noqa: F401  (fixtures)
    CLASSES,
    EPOCHS,
    Counting,
    _direct,
    _features,
    _one_thread,
    _probe,
    _write_folder,
    folders,
    train_copy,
)
from vprompt.data.dataset import Subset
from vprompt.data.fashion_mnist import FashionMNIST
from vprompt.data.feature_cache import FeatureCache, FeatureKey, describe_transform, has_identity
from vprompt.data.feature_store import DATA_FILE, INDEX_FILE, META_FILE
from vprompt.data.folder import ImageFolder
from vprompt.engine.features import dataset_labels
from vprompt.methods.baselines import LinearProbe


# ---------------------------------------------------------------------------- the cache itself
def test_hit_does_not_encode_again(tiny_clip, folders, tmp_path):
    data = ImageFolder(folders[0])
    method = _probe(tiny_clip)
    cache = FeatureCache(tmp_path / "cache")
    encode = Counting(method.encode_images)
    first = _features(cache, data, method, encode)
    assert encode.images == len(data) == 32
    assert first.shape == (32, tiny_clip.embed_dim)
    assert first.dtype == torch.float32
    torch.testing.assert_close(first, _direct(method, data), rtol=1e-5, atol=1e-6)
    # A new cache object on the same folder (another process) hits too.
    again = _features(FeatureCache(tmp_path / "cache"), data, method, encode)
    assert encode.images == 32
    assert torch.equal(again, first)
    # A subset in another order is served from the same rows.
    part = Subset(data, [5, 3, 3, 30])
    assert torch.equal(_features(cache, part, method, encode), first[[5, 3, 3, 30]])
    assert encode.images == 32


def test_layout_on_disk(tiny_clip, folders, tmp_path):
    data = ImageFolder(folders[0])
    method = _probe(tiny_clip)
    cache = FeatureCache(tmp_path / "cache")
    _features(cache, data, method, method.encode_images)
    [space] = [p for p in (tmp_path / "cache").glob("*/*") if p.is_dir()]
    assert space.parent.name == space.name[:2]
    assert len(space.name) == 64
    meta = json.loads((space / META_FILE).read_text())
    assert meta["dim"] == tiny_clip.embed_dim
    assert meta["dtype"] == "float32"
    assert meta["key"]["backbone"] == "clip:tiny"
    assert meta["key"]["fingerprint"] == tiny_clip.fingerprint()
    assert meta["key"]["kind"] == "clip-image-embedding-l2"
    assert "Normalize(mean=" in meta["key"]["preprocessing"]
    index = json.loads((space / INDEX_FILE).read_text())
    assert index["identities"] == [data.identity(i) for i in range(len(data))]
    assert (space / DATA_FILE).stat().st_size == 32 * tiny_clip.embed_dim * 4


def test_transform_description_is_deterministic(tiny_clip):
    a, b = _probe(tiny_clip), _probe(tiny_clip, augment=True)
    text = describe_transform(a.input_transform(False))
    assert " at 0x" not in text
    assert text == describe_transform(_probe(tiny_clip).input_transform(False))
    assert "Resize(size=32" in text
    assert "interpolation=bicubic" in text
    assert describe_transform(b.input_transform(True)) != describe_transform(
        b.input_transform(False)
    )
    assert "RandomHorizontalFlip" in describe_transform(b.input_transform(True))


def test_preprocessing_change_recomputes(tiny_clip, folders, tmp_path):
    data = ImageFolder(folders[0])
    method = _probe(tiny_clip)
    resized = _probe(tiny_clip, image_size=32)  # squash, bilinear: other pixels
    cache = FeatureCache(tmp_path / "cache")
    encode = Counting(method.encode_images)
    plain = _features(cache, data, method, encode)
    other = _features(cache, data, method, encode, transform=resized.input_transform(False))
    assert encode.images == 64
    assert not torch.allclose(plain, other)
    torch.testing.assert_close(
        other, _direct(method, data, resized.input_transform(False)), rtol=1e-5, atol=1e-6
    )
    key = FeatureKey.create(kind="x", backbone=tiny_clip, transform=method.input_transform(False))
    with pytest.raises(ValueError, match="preprocessing"):
        cache.features(data, encode, transform=resized.input_transform(False), key=key)


def test_weights_change_recomputes(tiny_clip, folders, tmp_path):
    data = ImageFolder(folders[0])
    cache = FeatureCache(tmp_path / "cache")
    method = _probe(tiny_clip)
    encode = Counting(method.encode_images)
    before = _features(cache, data, method, encode)
    changed = copy.deepcopy(tiny_clip)
    with torch.no_grad():
        next(changed.model.visual.parameters()).add_(0.5)
    assert changed.fingerprint() != tiny_clip.fingerprint()
    other = _probe(changed)
    encode_other = Counting(other.encode_images)
    after = _features(cache, data, other, encode_other)
    assert encode_other.images == 32
    assert not torch.allclose(before, after)
    _features(cache, data, method, encode)  # the original weights still hit
    assert encode.images == 32


def test_image_change_recomputes_only_that_image(tiny_clip, train_copy, tmp_path):
    data = train_copy
    method = _probe(tiny_clip)
    cache = FeatureCache(tmp_path / "cache")
    encode = Counting(method.encode_images)
    before = _features(cache, data, method, encode)
    path = data.samples[7][0]
    old = path.stat()
    Image.new("RGB", (30, 30), (0, 255, 0)).save(path)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns + 10**9))
    after = _features(cache, data, method, encode)
    assert encode.images == 33
    assert not torch.allclose(after[7], before[7])
    assert torch.equal(after[:7], before[:7])
    assert torch.equal(after[8:], before[8:])
    torch.testing.assert_close(after, _direct(method, data), rtol=1e-5, atol=1e-6)
    # Only the modification time changes: the same pixels, served from the cache.
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns + 2 * 10**9))
    _features(cache, data, method, encode)
    assert encode.images == 33


def test_a_rewrite_with_the_same_size_and_mtime_is_not_served_stale(
    tiny_clip, train_copy, tmp_path
):
    """Tools that restore the modification time (cp -p, rsync -t, a rewrite within the
    clock's resolution) leave path, size and mtime equal: the key is the content."""
    data = train_copy
    path = data.samples[3][0]
    # Stored (uncompressed) PNGs: the size depends on the image size alone.
    Image.new("RGB", (30, 30), (200, 10, 10)).save(path, compress_level=0)
    method = _probe(tiny_clip)
    cache = FeatureCache(tmp_path / "cache")
    encode = Counting(method.encode_images)
    before = _features(cache, data, method, encode)
    old = path.stat()
    Image.new("RGB", (30, 30), (10, 10, 200)).save(path, compress_level=0)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (old.st_size, old.st_mtime_ns)
    after = _features(cache, data, method, encode)
    assert encode.images == 33
    assert not torch.equal(after[3], before[3])
    torch.testing.assert_close(after, _direct(method, data), rtol=1e-5, atol=1e-6)


def test_identity_follows_the_bytes_not_the_path(tiny_clip, folders, tmp_path):
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(folders[0], moved)
    a, b = ImageFolder(folders[0]), ImageFolder(moved)
    assert [a.identity(i) for i in range(len(a))] == [b.identity(i) for i in range(len(b))]
    method = _probe(tiny_clip)
    cache = FeatureCache(tmp_path / "cache")
    encode = Counting(method.encode_images)
    _features(cache, a, method, encode)
    _features(cache, b, method, encode)  # a moved dataset is not encoded again
    assert encode.images == 32


def test_non_finite_cached_rows_are_rebuilt_and_never_written(tiny_clip, folders, tmp_path):
    from vprompt.errors import WeightsError

    data = ImageFolder(folders[0])
    method = _probe(tiny_clip)
    cache = FeatureCache(tmp_path / "cache")
    good = _features(cache, data, method, method.encode_images)
    [space] = [p for p in (tmp_path / "cache").glob("*/*") if p.is_dir()]
    table = np.memmap(space / DATA_FILE, dtype=np.float32, mode="r+")
    table[5] = np.nan  # a damaged byte range
    table.flush()
    del table
    encode = Counting(method.encode_images)
    with pytest.warns(RuntimeWarning, match="hold NaN or infinite values; rebuilding"):
        again = _features(cache, data, method, encode)
    assert torch.equal(again, good)
    assert encode.images == 32

    def overflowing(pixels):
        out = method.encode_images(pixels)
        out[1] = float("inf")
        return out

    fresh = FeatureCache(tmp_path / "other")
    with pytest.raises(WeightsError, match="gave NaN or infinite features for image 1 of"):
        _features(fresh, data, method, overflowing)
    assert not list((tmp_path / "other").rglob(DATA_FILE))


def test_float16_storage(tiny_clip, folders, tmp_path):
    data = ImageFolder(folders[0])
    method = _probe(tiny_clip)
    full = _features(FeatureCache(tmp_path / "c"), data, method, method.encode_images)
    half_cache = FeatureCache(tmp_path / "c", dtype="float16")
    half = _features(half_cache, data, method, method.encode_images)
    assert half.dtype == torch.float32
    assert not torch.equal(half, full)
    torch.testing.assert_close(half, full, rtol=0, atol=2e-3)
    assert len([p for p in (tmp_path / "c").glob("*/*") if p.is_dir()]) == 2
    with pytest.raises(ValueError, match="dtype"):
        FeatureCache(tmp_path, dtype="int8")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- augmented views
def _strong_augment(method: LinearProbe) -> Any:
    from torchvision import transforms as T

    tail = [
        t
        for t in method.input_transform(False).transforms
        if not isinstance(t, T.Resize | T.CenterCrop)
    ]
    return T.Compose([T.RandomResizedCrop(32, scale=(0.3, 1.0)), T.RandomHorizontalFlip(), *tail])


def test_views_differ_and_reproduce_across_caches(tiny_clip, folders, tmp_path):
    data = ImageFolder(folders[0])
    method = _probe(tiny_clip)
    tf = _strong_augment(method)
    a, b = FeatureCache(tmp_path / "a"), FeatureCache(tmp_path / "b")
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    v0 = _features(a, data, method, method.encode_images, view=0, transform=tf)
    v1 = _features(a, data, method, method.encode_images, view=1, transform=tf)
    # Drawing views leaves the global generators where they were.
    assert torch.equal(torch.rand(3), expected_next)
    assert not torch.allclose(v0, v1)
    assert (v0 - v1).abs().amax(dim=1).gt(1e-4).sum() >= 28  # nearly every image differs
    eval_view = _features(a, data, method, method.encode_images)
    assert not torch.allclose(v0, eval_view)
    # Another cache (another process, another machine) draws the very same views …
    assert torch.equal(_features(b, data, method, method.encode_images, view=1, transform=tf), v1)
    assert torch.equal(_features(b, data, method, method.encode_images, view=0, transform=tf), v0)
    # … in whatever order the images come, and a different view seed draws others.
    part = Subset(data, [9, 2])
    got = _features(
        FeatureCache(tmp_path / "c"), part, method, method.encode_images, view=0, transform=tf
    )
    # Same views; a batch of 2 instead of 32 may change BLAS blocking in the last bits.
    torch.testing.assert_close(got, v0[[9, 2]], rtol=1e-5, atol=1e-6)
    other = FeatureCache(tmp_path / "d", view_seed=1)
    assert not torch.allclose(
        _features(other, data, method, method.encode_images, view=0, transform=tf), v0
    )


# ---------------------------------------------------------------------------- crash safety
def _space(cache_root: Path) -> Path:
    [space] = [p for p in cache_root.glob("*/*") if p.is_dir()]
    return space


def test_trailing_bytes_are_ignored_and_overwritten(tiny_clip, train_copy, tmp_path):
    data = train_copy
    method = _probe(tiny_clip)
    cache = FeatureCache(tmp_path / "cache")
    encode = Counting(method.encode_images)
    sub = Subset(data, range(20))
    first = _features(cache, sub, method, encode)
    space = _space(tmp_path / "cache")
    with open(space / DATA_FILE, "ab") as fh:  # an append that crashed before its index
        fh.write(b"\x7f" * 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(_features(cache, sub, method, encode), first)
    assert encode.images == 20
    full = _features(cache, data, method, encode)  # appends after the indexed rows
    assert encode.images == 32
    assert torch.equal(full[:20], first)
    torch.testing.assert_close(full, _direct(method, data), rtol=1e-5, atol=1e-6)
    assert (space / DATA_FILE).stat().st_size == 32 * tiny_clip.embed_dim * 4


@pytest.mark.parametrize(
    "damage",
    ["index-garbage", "index-shape", "truncated-data", "meta-dim", "meta-garbage", "duplicate"],
)
def test_damaged_space_is_rebuilt_with_a_warning(damage, tiny_clip, folders, tmp_path):
    data = ImageFolder(folders[0])
    method = _probe(tiny_clip)
    cache = FeatureCache(tmp_path / "cache")
    encode = Counting(method.encode_images)
    first = _features(cache, data, method, encode)
    space = _space(tmp_path / "cache")
    if damage == "index-garbage":
        (space / INDEX_FILE).write_text("{not json")
    elif damage == "index-shape":
        (space / INDEX_FILE).write_text(json.dumps({"format": 1, "identities": {"a": 0}}))
    elif damage == "truncated-data":
        with open(space / DATA_FILE, "r+b") as fh:
            fh.truncate(100)
    elif damage == "meta-dim":
        meta = json.loads((space / META_FILE).read_text())
        meta["dim"] = -3
        (space / META_FILE).write_text(json.dumps(meta))
    elif damage == "meta-garbage":
        (space / META_FILE).write_bytes(b"\x80\x04pickle?")
    else:
        index = json.loads((space / INDEX_FILE).read_text())
        index["identities"][1] = index["identities"][0]
        (space / INDEX_FILE).write_text(json.dumps(index))
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        again = _features(cache, data, method, encode)
    assert encode.images == 64
    torch.testing.assert_close(again, first, rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _features(cache, data, method, encode)
    assert encode.images == 64


def test_encoder_dim_change_under_same_key_rebuilds(tiny_clip, folders, tmp_path):
    data = ImageFolder(folders[0])
    method = _probe(tiny_clip)
    cache = FeatureCache(tmp_path / "cache")
    _features(cache, Subset(data, range(8)), method, method.encode_images)
    with pytest.warns(RuntimeWarning, match="dim"):
        out = _features(cache, data, method, lambda x: method.encode_images(x)[:, :4])
    assert out.shape == (32, 4)


# ---------------------------------------------------------------------------- identities
@pytest.mark.parametrize("failure", ["not-a-folder", "disk-full"])
def test_an_unwritable_cache_falls_back_to_memory_with_a_warning(
    tiny_clip, folders, tmp_path, monkeypatch, failure
):
    import errno

    from vprompt.data.feature_store import FeatureSpace

    data = ImageFolder(folders[0])
    method = _probe(tiny_clip)
    root = tmp_path / "cache"
    if failure == "not-a-folder":
        root.write_text("VPROMPT_CACHE points at a file")
    else:

        def full(self, identities, rows):
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path / DATA_FILE))

        monkeypatch.setattr(FeatureSpace, "append", full)
    cache = FeatureCache(root)
    encode = Counting(method.encode_images)
    with pytest.warns(RuntimeWarning, match="going on without it") as caught:
        got = _features(cache, data, method, encode)
    assert len(caught) == 1
    reason = "Not a directory" if failure == "not-a-folder" else "No space left on device"
    assert reason in str(caught[0].message)
    assert cache.unwritable is not None
    torch.testing.assert_close(got, _direct(method, data), rtol=1e-5, atol=1e-6)
    assert encode.images == 32  # each image once (in memory from then on)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert torch.equal(_features(cache, data, method, encode), got)
    assert encode.images == 32
    if failure == "not-a-folder":
        assert root.read_text() == "VPROMPT_CACHE points at a file"  # nothing lost


def test_a_failing_encoder_is_not_taken_for_a_failing_cache(tiny_clip, folders, tmp_path):
    data = ImageFolder(folders[0])
    method = _probe(tiny_clip)

    def broken(pixels):
        raise OSError("decoder exploded")

    cache = FeatureCache(tmp_path / "cache")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(OSError, match="decoder exploded"):
            _features(cache, data, method, broken)
    assert cache.unwritable is None


def test_identities_of_datasets(folders, tmp_path):
    data = ImageFolder(folders[0])
    assert has_identity(data)
    import hashlib

    digest = hashlib.blake2b(data.samples[3][0].read_bytes(), digest_size=16).hexdigest()
    assert data.identity(3) == f"content:{digest}"
    sub = Subset(data, [4, 1])
    assert has_identity(sub)
    assert sub.identity(1) == data.identity(1)
    assert Subset(sub, [1]).identity(0) == data.identity(1)

    class NoIdentity:
        classnames = CLASSES

        def __len__(self) -> int:
            return 1

        def __getitem__(self, index: int) -> tuple[Image.Image, int]:
            return Image.new("RGB", (8, 8)), 0

    assert not has_identity(NoIdentity())
    assert not has_identity(Subset(NoIdentity(), [0]))
    assert dataset_labels(sub).tolist() == [data.samples[4][1], data.samples[1][1]]
    assert dataset_labels(NoIdentity()).tolist() == [0]


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_identity_follows_the_pixels(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (5, 28, 28))
    labels = np.arange(5) % 10
    for img, lbl in (
        ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    ):
        _write_idx(tmp_path / img, images)
        _write_idx(tmp_path / lbl, labels)
    train, test = FashionMNIST(tmp_path, split="train"), FashionMNIST(tmp_path, split="test")
    assert train.identity(2) == FashionMNIST(tmp_path, split="train").identity(2)
    assert len({train.identity(i) for i in range(5)}) == 5
    assert train.identity(2) != test.identity(2)
    assert dataset_labels(Subset(train, [4, 0])).tolist() == [4, 0]
    changed = images.copy()
    changed[4, 0, 0] ^= 1
    _write_idx(tmp_path / "train-images-idx3-ubyte", changed)
    assert FashionMNIST(tmp_path, split="train").identity(2) != train.identity(2)
