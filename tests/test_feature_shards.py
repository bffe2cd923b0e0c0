"""Sharded feature extraction: bit-identical to the single-process fill, crash-safe, resumable."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from vprompt.backbones import load_backbone
from vprompt.data.feature_cache import FeatureCache
from vprompt.data.sources import load_data
from vprompt.engine import evaluate, fit
from vprompt.engine import feature_shards as fs
from vprompt.engine.experiment import Experiment
from vprompt.engine.features import FeatureSource

MODEL = "clip:tiny"


@pytest.fixture(autouse=True)
def _fresh_workers():
    fs._METHODS.clear()
    fs._DATA.clear()
    yield
    fs._METHODS.clear()
    fs._DATA.clear()


def _method(folder: Path, **overrides: Any) -> Any:
    splits = load_data(f"folder:{folder}")
    items = tuple(f"{k}={v}" for k, v in overrides.items())
    return Experiment("linear-probe", None, items).build(
        load_backbone(MODEL, "none"), splits.classnames
    )


def _single_process(folder: Path, cache_dir: Path, batch_size: int) -> None:
    """What training + evaluation fill: train, val, then test, through FeatureSource."""
    splits = load_data(f"folder:{folder}")
    method = _method(folder)
    cache = FeatureCache(cache_dir)
    for data in (splits.train, splits.val, splits.test):
        FeatureSource(
            method, data, cache, device=torch.device("cpu"), batch_size=batch_size, progress=False
        ).prepare([None])


def _files(cache_dir: Path) -> dict[str, bytes]:
    """Every file of the cache (but the empty lock files), by relative path."""
    return {
        str(p.relative_to(cache_dir)): p.read_bytes()
        for p in sorted(cache_dir.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def _rows(cache_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for index in cache_dir.glob("*/*/index.json"):
        meta = json.loads((index.parent / "meta.json").read_text())
        data = np.fromfile(index.parent / "features.bin", dtype=np.float32)
        ids = json.loads(index.read_text())["identities"]
        for ident, row in zip(ids, data.reshape(len(ids), meta["dim"]), strict=True):
            out[ident] = torch.from_numpy(row.copy())
    return out


def _extract(folder: Path, cache_dir: Path, executor: Any, **kwargs: Any) -> fs.ExtractReport:
    args: dict[str, Any] = {"shards": 3, "batch_size": 2, "progress": False}
    args.update(kwargs)
    return fs.extract_features(
        MODEL, "none", f"folder:{folder}", cache_dir=cache_dir, executor=executor, **args
    )


def _assert_same_cache(ours: Path, reference: Path) -> None:
    got, want = _rows(ours), _rows(reference)
    assert got.keys() == want.keys()
    assert len(got) == 24
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert _files(ours) == _files(reference)  # same entries, same bytes
    assert not (ours / fs.SHARDS_DIR).exists()


@pytest.fixture(scope="module")
def reference(tiny_folder, tmp_path_factory) -> Path:
    cache_dir = tmp_path_factory.mktemp("single") / "cache"
    _single_process(tiny_folder, cache_dir, batch_size=2)
    return cache_dir


# ---------------------------------------------------------------------------- bit identity
def test_sharded_fill_is_byte_identical_to_the_single_process_fill(
    tiny_folder, reference, tmp_path
):
    report = _extract(tiny_folder, tmp_path / "cache", "local")
    assert [(e.split, e.view, e.images, e.encoded, e.shards) for e in report.entries] == [
        ("train", None, 12, 12, 3),
        ("val", None, 6, 6, 3),
        ("test", None, 6, 6, 3),
    ]
    assert report.images == 24
    assert len({e.space for e in report.entries}) == 1  # the splits share one entry
    _assert_same_cache(tmp_path / "cache", reference)
    # A second run finds everything cached and encodes nothing.
    again = _extract(tiny_folder, tmp_path / "cache", "local")
    assert again.images == 0
    assert all(e.shards == 0 for e in again.entries)
    _assert_same_cache(tmp_path / "cache", reference)


def test_uneven_shards_and_more_shards_than_batches(tiny_folder, tmp_path):
    _single_process(tiny_folder, tmp_path / "ref", batch_size=5)
    report = _extract(tiny_folder, tmp_path / "cache", "local", batch_size=5, shards=7)
    assert [e.shards for e in report.entries] == [3, 2, 2]  # whole batches: 5+5+2, 5+1, 5+1
    _assert_same_cache(tmp_path / "cache", tmp_path / "ref")


def test_an_executor_object_is_used_and_left_open(tiny_folder, reference, tmp_path):
    from vprompt.engine.executors import make_executor

    executor = make_executor("local")
    report = _extract(tiny_folder, tmp_path / "cache", executor)
    assert report.executor == "local"
    _assert_same_cache(tmp_path / "cache", reference)


@pytest.mark.slow
def test_ray_executor_retries_a_dead_worker(tiny_folder, reference, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    marker = tmp_path / "died"
    real = fs.encode_shard

    def die_once_on_shard_1(task: fs.ShardTask) -> int:
        """The worker, killed hard (no cleanup) the first time it runs train's shard 1; a
        closure, so Ray ships it by value."""
        if task.split == "train" and Path(task.path).name.startswith("shard-00001-"):
            try:
                marker.touch(exist_ok=False)
            except FileExistsError:
                pass
            else:
                os._exit(1)
        return real(task)

    monkeypatch.setattr(fs, "encode_shard", die_once_on_shard_1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        report = _extract(tiny_folder, tmp_path / "cache", "ray")
    finally:
        ray.shutdown()
    assert marker.exists()  # a worker did die
    assert report.executor == "ray"
    _assert_same_cache(tmp_path / "cache", reference)


# ---------------------------------------------------------------------------- crash safety
def test_a_crashed_shard_leaves_nothing_visible_and_the_rerun_resumes(
    tiny_folder, reference, tmp_path, monkeypatch
):
    cache_dir = tmp_path / "cache"
    real_write = fs.write_shard

    def crash_on_shard_1(path: Path, identities: Any, rows: np.ndarray) -> None:
        if path.name.startswith("shard-00001-"):

            def half(tmp: Path) -> None:
                tmp.write_bytes(b"PK\x03\x04 half a shard")
                raise RuntimeError("worker died")

            fs.atomic_write_with(path, half)
        real_write(path, identities, rows)

    monkeypatch.setattr(fs, "write_shard", crash_on_shard_1)
    with pytest.raises(RuntimeError, match="worker died"):
        _extract(tiny_folder, cache_dir, "local")
    # Shard 0 of train is done; shard 1 never appeared, not even as a temporary file; the
    # cache entry itself does not exist yet.
    done = sorted(p.name for p in cache_dir.rglob("shard-*.npz"))
    assert len(done) == 1
    assert done[0].startswith("shard-00000-")
    assert not list(cache_dir.rglob("*.tmp"))
    assert not list(cache_dir.rglob(".work-*"))
    assert not list(cache_dir.glob("*/*/index.json"))
    assert not list(cache_dir.glob("*/*/meta.json"))

    monkeypatch.setattr(fs, "write_shard", real_write)
    encoded: list[int] = []
    real_encode = fs.encode_shard

    def counting(task: fs.ShardTask) -> int:
        encoded.append(len(task.identities))
        return real_encode(task)

    monkeypatch.setattr(fs, "encode_shard", counting)
    report = _extract(tiny_folder, cache_dir, "local")
    assert report.entries[0].reused == 1
    assert sum(encoded) == 24 - 4  # the finished shard was not encoded again
    _assert_same_cache(cache_dir, reference)


def test_a_damaged_shard_is_encoded_again(tiny_folder, reference, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    monkeypatch.setattr(fs, "_merge", lambda entry: None)  # stop before the merge
    monkeypatch.setattr(fs.shutil, "rmtree", lambda *a, **k: None)
    _extract(tiny_folder, cache_dir, "local")
    shards = sorted(cache_dir.rglob("shard-*.npz"))
    assert len(shards) == 9
    shards[2].write_bytes(shards[2].read_bytes()[:100])  # cut short by hand
    monkeypatch.undo()
    report = _extract(tiny_folder, cache_dir, "local")
    assert sum(e.reused for e in report.entries) == 8
    _assert_same_cache(cache_dir, reference)


# ---------------------------------------------------------------------------- engine uses it
def test_training_and_evaluation_use_the_filled_cache(tiny_folder, tmp_path):
    cache_dir = tmp_path / "cache"
    _extract(tiny_folder, cache_dir, "local", batch_size=4)
    splits = load_data(f"folder:{tiny_folder}")
    method = _method(tiny_folder, **{"optim.epochs": 1})
    encoded: list[int] = []
    real = method.encode_images

    def counting(pixels: torch.Tensor) -> torch.Tensor:
        encoded.append(len(pixels))
        return real(pixels)

    method.encode_images = counting  # type: ignore[method-assign]
    cache = FeatureCache(cache_dir)
    fit(
        method,
        splits.train,
        val=splits.val,
        out_dir=tmp_path / "run",
        progress=False,
        feature_cache=cache,
    )
    scores = evaluate(method, splits.test, progress=False, feature_cache=cache)
    assert scores.n == 6
    assert encoded == []


# ---------------------------------------------------------------------------- CLI
def test_cli_extract(run_cli, tiny_folder, reference, tmp_path):
    cache_dir = tmp_path / "cache"
    args = ["features", "extract", "--model", MODEL, "--weights", "none"]
    args += ["--data", f"folder:{tiny_folder}", "--feature-cache", str(cache_dir)]
    args += ["--device", "cpu"]
    result = run_cli(*args, "--shards", "3", "--batch-size", "2", "--json")
    assert result.returncode == 0, result.stderr
    [report] = result.json_lines()
    assert report["images"] == 24
    assert report["executor"] == "local"
    assert [e["split"] for e in report["entries"]] == ["train", "val", "test"]
    _assert_same_cache(cache_dir, reference)
    text = run_cli(*args, "--split", "train")
    assert text.returncode == 0, text.stderr
    assert "train (eval view): 0 of 12 images encoded in 0 shards" in text.stdout
    assert "filled 1 split/view entries (1 cache folders), 0 images" in text.stdout


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("--model", "clip:nope"), "clip:nope"),
        (("--shards", "0"), "--shards must be an integer >= 1"),
        (("--data", "folder:/does/not/exist"), "/does/not/exist"),
        (("--method", "visual-prompt"), "sees pixels"),
    ],
)
def test_cli_bad_input(run_cli, tiny_folder, tmp_path, change, message):
    args = {
        "--model": MODEL,
        "--weights": "none",
        "--data": f"folder:{tiny_folder}",
        "--feature-cache": str(tmp_path / "cache"),
    }
    args[change[0]] = change[1]
    result = run_cli("features", "extract", *[s for kv in args.items() for s in kv])
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vprompt: error:")
    assert message in lines[0]
    assert not (tmp_path / "cache").exists()


def test_a_worker_with_other_weights_refuses_its_shard(tiny_folder, tmp_path, monkeypatch):
    from vprompt.errors import WeightsError

    real = fs.encode_shard

    def other_weights(task: fs.ShardTask) -> int:
        return real(dataclasses.replace(task, weights_digest="0" * 64))

    monkeypatch.setattr(fs, "encode_shard", other_weights)
    with pytest.raises(WeightsError, match="is not the driver's"):
        _extract(tiny_folder, tmp_path / "cache", "local")
    assert not list((tmp_path / "cache").rglob("shard-*.npz"))
    assert not list((tmp_path / "cache").glob("*/*/meta.json"))
