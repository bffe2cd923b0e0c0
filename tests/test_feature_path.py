"""The engine's feature path: fit/evaluate on cached features (linear probe on ``clip:tiny``)."""

# Fixtures imported from feature_helpers appear as arguments below: not redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import json
import warnings
from typing import Any

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
from vprompt import ConfigError
from vprompt.data.dataset import Subset
from vprompt.data.feature_cache import FeatureCache
from vprompt.data.folder import ImageFolder
from vprompt.engine import FitEvent, evaluate, fit
from vprompt.engine.features import FeatureSource, FeatureTable, dataset_labels
from vprompt.engine.runtime import make_loader
from vprompt.methods.baselines import LinearProbeConfig


def test_linear_probe_declares_image_features(tiny_clip):
    method = _probe(tiny_clip)
    assert method.capabilities.inputs == "image-features"
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
    from vprompt.methods.config import apply_overrides
    from vprompt.methods.registry import METHODS

    cls = METHODS.get("vpt")
    overrides = ["num_tokens=2", "optim.epochs=1", "optim.batch_size=16", "optim.warmup_epochs=0"]
    config = apply_overrides(cls.Config(), overrides)
    method = cls(tiny_clip, CLASSES, config)
    assert method.capabilities.inputs == "images"
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

        def hook(epoch: int, data: Any, seen: Any = seen) -> None:
            seen.extend((epoch, tuple(f.shape)) for f, _ in data.train())

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
    from vprompt.data.items import Datum, ItemDataset

    items = [Datum(f"missing/{i}.jpg", i % 3, f"c{i % 3}") for i in range(7)]
    data = ItemDataset(tmp_path, items)
    assert dataset_labels(data).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert dataset_labels(Subset(data, [6, 1, 5])).tolist() == [0, 1, 2]
