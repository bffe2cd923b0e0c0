"""The on-disk feature cache and the engine's feature path (linear probe on ``clip:tiny``)."""

from __future__ import annotations

import copy
import json
import os
import struct
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from vprompt import ConfigError
from vprompt.data.dataset import Subset
from vprompt.data.fashion_mnist import FashionMNIST
from vprompt.data.feature_cache import FeatureCache, FeatureKey, describe_transform, has_identity
from vprompt.data.feature_store import DATA_FILE, INDEX_FILE, META_FILE
from vprompt.data.folder import ImageFolder
from vprompt.engine import FitEvent, evaluate, fit
from vprompt.engine.features import FeatureSource, FeatureTable, dataset_labels
from vprompt.engine.runtime import make_loader
from vprompt.methods.base import uses_image_features
from vprompt.methods.baselines import LinearProbe, LinearProbeConfig

CLASSES = ["blue", "red"]
EPOCHS = 3


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write_folder(root: Path, n: int, seed: int) -> Path:
    """``root/<class>/<i>.png``: noisy bluish / reddish images of a few sizes."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n // 2):
            base = np.array([60, 60, 170] if c == 0 else [170, 60, 60], dtype=float)
            h, w = 28 + 4 * (i % 3), 36 - 4 * (i % 2)
            pixels = np.clip(base + rng.normal(0, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("colors")
    return _write_folder(base / "train", 32, seed=1), _write_folder(base / "val", 16, seed=2)


@pytest.fixture
def train_copy(folders, tmp_path) -> ImageFolder:
    """A private copy of the training folder (tests that edit images)."""
    import shutil

    shutil.copytree(folders[0], tmp_path / "train")
    return ImageFolder(tmp_path / "train")


def _probe(backbone: Any, **config: Any) -> LinearProbe:
    torch.manual_seed(0)  # the head's initialization
    optim = replace(
        LinearProbeConfig().optim, lr=0.05, epochs=EPOCHS, batch_size=8, weight_decay=0.0
    )
    return LinearProbe(backbone, CLASSES, LinearProbeConfig(optim=optim, **config))


class Counting:
    """Wraps an encoder (a method's bound ``encode_images``), counting the images it encodes."""

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.encode = encode
        self.images = 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.images += len(pixels)
        return self.encode(pixels)


def _features(
    cache: FeatureCache,
    data: Any,
    method: LinearProbe,
    encode: Callable[[torch.Tensor], torch.Tensor],
    *,
    view: int | None = None,
    transform: Any = None,
    backbone: Any = None,
) -> torch.Tensor:
    tf = transform or method.input_transform(view is not None)
    key = FeatureKey.create(
        kind=method.feature_kind,
        backbone=backbone or method.backbone,
        transform=tf,
        view=view,
        view_seed=cache.view_seed if view is not None else 0,
    )
    return cache.features(data, encode, transform=tf, key=key, batch_size=4, progress=False)


def _direct(method: LinearProbe, data: Any, transform: Any = None) -> torch.Tensor:
    tf = transform or method.input_transform(False)
    return method.encode_images(torch.stack([tf(data[i][0]) for i in range(len(data))]))


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
    # Only the modification time changes: a new identity too.
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns + 2 * 10**9))
    _features(cache, data, method, encode)
    assert encode.images == 34


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
    assert torch.equal(got, v0[[9, 2]])
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
def test_identities_of_datasets(folders, tmp_path):
    data = ImageFolder(folders[0])
    assert has_identity(data)
    assert data.identity(3).startswith("file:")
    assert str(data.samples[3][0].name) in data.identity(3)
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


# ---------------------------------------------------------------------------- engine
def test_linear_probe_declares_image_features(tiny_clip):
    method = _probe(tiny_clip)
    assert uses_image_features(method)
    assert method.feature_views == 1
    with pytest.raises(ConfigError, match="feature_views"):
        LinearProbeConfig(feature_views=0)


def test_feature_batches_shuffle_like_the_image_loader():
    class Indexed:
        classnames = CLASSES

        def __len__(self) -> int:
            return 23

        def __getitem__(self, index: int) -> tuple[int, int]:
            return index, index

    loader = make_loader(
        Indexed(),  # type: ignore[arg-type]
        lambda x: x,
        batch_size=5,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(7),
    )
    expected = [labels.tolist() for _, labels in loader]
    table = FeatureTable(torch.arange(23.0)[:, None], torch.arange(23))
    got = [
        labels.tolist()
        for _, labels in table.batches(5, generator=torch.Generator().manual_seed(7))
    ]
    assert got == expected
    assert sorted(i for batch in got for i in batch) == list(range(23))
    assert [b.tolist() for _, b in table.batches(10)] == [
        list(range(10)),
        list(range(10, 20)),
        [20, 21, 22],
    ]


@pytest.fixture(scope="module")
def plain_run(tiny_clip, folders, tmp_path_factory):
    train, val = ImageFolder(folders[0]), ImageFolder(folders[1])
    method = _probe(tiny_clip)
    result = fit(method, train, val=val, out_dir=tmp_path_factory.mktemp("plain"), progress=False)
    return method, result


def _volatile_free(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in h.items() if k not in ("seconds", "images_per_s")} for h in history]


def test_fit_with_cache_equals_fit_without(plain_run, tiny_clip, folders, tmp_path):
    plain, plain_result = plain_run
    train, val = ImageFolder(folders[0]), ImageFolder(folders[1])
    cache = FeatureCache(tmp_path / "cache")
    method = _probe(tiny_clip)
    result = fit(
        method, train, val=val, out_dir=tmp_path / "run", progress=False, feature_cache=cache
    )
    for key, value in plain.prompt_state().items():
        torch.testing.assert_close(method.prompt_state()[key], value, rtol=1e-4, atol=1e-5)
    assert result.best_epoch == plain_result.best_epoch
    assert [h["val_acc"] for h in result.history] == [h["val_acc"] for h in plain_result.history]
    assert [h["train_acc"] for h in result.history] == [
        h["train_acc"] for h in plain_result.history
    ]
    for ours, theirs in zip(result.history, plain_result.history, strict=True):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4)
        assert ours["images_per_s"] > 0
    # Training and validation images share one space (same encoder, same preprocessing).
    [index] = list((tmp_path / "cache").glob("*/*/index.json"))
    assert len(json.loads(index.read_text())["identities"]) == len(train) + len(val)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["feature_cache"] == {"dtype": "float32", "views": 0, "view_seed": None}

    # Evaluation with the cache: same accuracy, close logits-derived loss; pixels predict the same.
    a = evaluate(plain, val, progress=False)
    b = evaluate(method, val, progress=False, feature_cache=cache)
    assert b.accuracy == a.accuracy
    assert b.confusion == a.confusion
    assert b.loss == pytest.approx(a.loss, rel=1e-4)
    images = torch.stack([method.input_transform(False)(val[i][0]) for i in range(4)])
    with torch.no_grad():
        torch.testing.assert_close(
            method(images).logits, plain(images).logits, rtol=1e-4, atol=1e-5
        )

    # A second run on the warm cache encodes nothing.
    warm = _probe(tiny_clip)
    calls = Counting(warm.encode_images)
    warm.encode_images = calls  # type: ignore[method-assign]
    fit(warm, train, val=val, out_dir=tmp_path / "warm", progress=False, feature_cache=cache)
    assert calls.images == 0
    assert evaluate(warm, val, progress=False, feature_cache=cache).accuracy == b.accuracy
    assert calls.images == 0
    for key, value in method.prompt_state().items():
        assert torch.equal(warm.prompt_state()[key], value)


def test_resume_on_the_feature_path_is_bit_identical(tiny_clip, folders, tmp_path):
    train, val = ImageFolder(folders[0]), ImageFolder(folders[1])
    cache = FeatureCache(tmp_path / "cache")
    reference = _probe(tiny_clip)
    ref_result = fit(
        reference, train, val=val, out_dir=tmp_path / "a", progress=False, feature_cache=cache
    )

    def interrupt(event: FitEvent) -> None:
        if event.kind == "step" and event.epoch == 1 and event.step == 6:
            raise KeyboardInterrupt

    out = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        fit(
            _probe(tiny_clip),
            train,
            val=val,
            out_dir=out,
            progress=False,
            feature_cache=cache,
            callbacks=[interrupt],
        )
    assert json.loads((out / "checkpoint.json").read_text())["epochs_done"] == 1
    with pytest.raises(ConfigError, match="feature_cache"):
        fit(_probe(tiny_clip), train, val=val, out_dir=out, progress=False)
    resumed = _probe(tiny_clip)
    result = fit(resumed, train, val=val, out_dir=out, progress=False, feature_cache=cache)
    for key, value in reference.prompt_state().items():
        assert torch.equal(resumed.prompt_state()[key], value)
    assert _volatile_free(result.history) == _volatile_free(ref_result.history)
    assert result.best_epoch == ref_result.best_epoch


def test_augmented_views_rotate_per_epoch(tiny_clip, folders, tmp_path, monkeypatch):
    train, val = ImageFolder(folders[0]), ImageFolder(folders[1])
    cache = FeatureCache(tmp_path / "cache")
    asked: list[int | None] = []
    original = FeatureSource.table

    def spy(self: FeatureSource, view: int | None = None) -> FeatureTable:
        if self.data is train:
            asked.append(view)
        return original(self, view)

    monkeypatch.setattr(FeatureSource, "table", spy)
    method = _probe(tiny_clip, augment=True, feature_views=2)
    fit(method, train, val=val, out_dir=tmp_path / "run", progress=False, feature_cache=cache)
    assert asked == [0, 1, 0]
    # Two training views + the validation view; the training set's plain view is never needed.
    metas = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*/*/meta.json")]
    assert sorted(str(m["key"]["view"]) for m in metas) == ["0", "1", "None"]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["feature_cache"] == {"dtype": "float32", "views": 2, "view_seed": 0}
    again = _probe(tiny_clip, augment=True, feature_views=2)
    fit(again, train, val=val, out_dir=tmp_path / "again", progress=False, feature_cache=cache)
    for key, value in method.prompt_state().items():
        assert torch.equal(again.prompt_state()[key], value)


def test_dataset_without_identity_falls_back_silently(plain_run, tiny_clip, folders, tmp_path):
    plain, _ = plain_run

    class InMemory:
        """The same images as the folders, without identities."""

        def __init__(self, folder: ImageFolder) -> None:
            self.classnames = folder.classnames
            self.items = [folder[i] for i in range(len(folder))]

        def __len__(self) -> int:
            return len(self.items)

        def __getitem__(self, index: int) -> tuple[Image.Image, int]:
            return self.items[index]

    train, val = InMemory(ImageFolder(folders[0])), InMemory(ImageFolder(folders[1]))
    cache = FeatureCache(tmp_path / "cache")
    method = _probe(tiny_clip)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = fit(
            method, train, val=val, out_dir=tmp_path / "run", progress=False, feature_cache=cache
        )
        evaluate(method, val, progress=False, feature_cache=cache)
    assert not (tmp_path / "cache").exists()
    assert "feature_cache" not in json.loads((tmp_path / "run" / "config.json").read_text())
    for key, value in plain.prompt_state().items():
        assert torch.equal(method.prompt_state()[key], value)
    assert result.epochs_run == EPOCHS


def test_image_methods_ignore_the_cache(tiny_clip, folders, tmp_path):
    from vprompt.methods.base import METHODS, apply_overrides

    cls = METHODS.get("vpt")
    overrides = ["num_tokens=2", "optim.epochs=1", "optim.batch_size=16", "optim.warmup_epochs=0"]
    config = apply_overrides(cls.Config(), overrides)
    method = cls(tiny_clip, CLASSES, config)
    assert not uses_image_features(method)
    fit(
        method,
        ImageFolder(folders[0]),
        out_dir=tmp_path / "run",
        progress=False,
        feature_cache=FeatureCache(tmp_path / "cache"),
    )
    assert not (tmp_path / "cache").exists()


def test_before_epoch_sees_features_for_feature_methods(tiny_clip, folders, tmp_path):
    train = ImageFolder(folders[0])
    for cache in (None, FeatureCache(tmp_path / "cache")):
        method = _probe(tiny_clip)
        seen: list[tuple[int, tuple[int, ...]]] = []

        def hook(epoch: int, batches: Callable[[], Any], seen: Any = seen) -> None:
            seen.extend((epoch, tuple(f.shape)) for f, _ in batches())

        method.before_epoch = hook  # type: ignore[method-assign]
        fit(
            method,
            train,
            out_dir=tmp_path / f"run-{cache is None}",
            progress=False,
            feature_cache=cache,
        )
        dim = tiny_clip.embed_dim
        assert seen == [(e, (8, dim)) for e in range(EPOCHS) for _ in range(4)]


def test_labels_are_read_without_decoding_images(tmp_path):
    """Feature-path labels come from all_labels(): no image file is opened (none exist here)."""
    from vprompt.data.dataset import Subset
    from vprompt.data.items import Datum, ItemDataset
    from vprompt.engine.features import dataset_labels

    items = [Datum(f"missing/{i}.jpg", i % 3, f"c{i % 3}") for i in range(7)]
    data = ItemDataset(tmp_path, items)
    assert dataset_labels(data).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert dataset_labels(Subset(data, [6, 1, 5])).tolist() == [0, 1, 2]
