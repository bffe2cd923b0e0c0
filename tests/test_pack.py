"""Prompt packs: round trips, provenance, refusal of foreign or damaged files, atomic saves."""

from __future__ import annotations

import datetime as dt
import io
import json
import pathlib
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import vprompt
from vprompt import PackError, ZeroShotClassifier
from vprompt.data import load_image
from vprompt.engine.pack import (
    FORMAT,
    FORMAT_VERSION,
    BackboneRef,
    PromptPack,
    build_from_pack,
    check_classnames,
    load_pack,
    save_pack,
)

CLASSES = ["cat", "person", "rocket", "coffee cup"]


@pytest.fixture(scope="module")
def classifier(tiny_clip) -> ZeroShotClassifier:
    return ZeroShotClassifier(tiny_clip, CLASSES)


@pytest.fixture(scope="module")
def pack_file(classifier, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pack") / "zs.safetensors"
    save_pack(classifier, path, metrics={"top1": 0.75, "per_class": [1, 0.5]})
    return path


@pytest.fixture(scope="module")
def pack_meta(pack_file) -> dict[str, Any]:
    """The raw ``vprompt`` metadata as stored in the file's safetensors header."""
    with safe_open(str(pack_file), framework="pt") as f:
        return json.loads(f.metadata()["vprompt"])


@pytest.fixture(scope="module")
def pixels(classifier, photos_dir) -> torch.Tensor:
    paths = sorted(photos_dir.glob("*.png"))
    return torch.stack([classifier.backbone.transform(load_image(p)) for p in paths])


def write_pack(path: Path, meta: dict[str, Any] | None, tensors: dict | None = None) -> Path:
    """A safetensors file with arbitrary ``vprompt`` metadata (None: no metadata at all)."""
    tensors = tensors if tensors is not None else {"class_embeddings": torch.zeros(2, 32)}
    save_file(tensors, str(path), metadata=None if meta is None else {"vprompt": json.dumps(meta)})
    return path


# --------------------------------------------------------------------------- round trip


def test_round_trip_tensors_are_bit_identical(classifier, pack_file):
    pack = load_pack(pack_file)
    state = classifier.prompt_state()
    assert set(pack.tensors) == set(state) == {"class_embeddings"}
    for key, tensor in state.items():
        assert pack.tensors[key].dtype == tensor.dtype
        assert pack.tensors[key].shape == tensor.shape
        assert torch.equal(pack.tensors[key], tensor)
        assert pack.tensors[key].numpy().tobytes() == tensor.numpy().tobytes()


def test_metadata_fields(tiny_clip, classifier, pack_file, pack_meta):
    pack = load_pack(pack_file)
    assert pack_meta["format"] == FORMAT == "vprompt-pack"
    assert pack_meta["format_version"] == FORMAT_VERSION == 1
    assert pack.format_version == FORMAT_VERSION
    assert pack_meta["method"] == pack.method == "zeroshot"
    assert (
        pack_meta["config"]
        == pack.config
        == {
            "templates": ["a photo of a {}."],
            "descriptions": False,
        }
    )
    assert pack_meta["backbone"] == {
        "name": "clip:tiny",
        "weights": "none",
        "fingerprint": tiny_clip.fingerprint(),
    }
    assert pack.backbone == BackboneRef("clip:tiny", "none", tiny_clip.fingerprint())
    assert pack_meta["classnames"] == pack.classnames == CLASSES
    assert pack_meta["preprocess"] == pack.preprocess == tiny_clip.preprocess.to_dict()
    assert pack_meta["metrics"] == pack.metrics == {"top1": 0.75, "per_class": [1, 0.5]}
    assert pack_meta["vprompt_version"] == pack.vprompt_version == vprompt.__version__
    created = dt.datetime.fromisoformat(pack_meta["created"])
    assert created.tzinfo is not None
    assert abs((dt.datetime.now(dt.timezone.utc) - created).total_seconds()) < 3600
    # Re-serializing a loaded pack keeps its provenance (no fresh timestamp/version).
    assert pack.metadata() == pack_meta


def test_unicode_classnames_and_order_survive(tiny_clip, tmp_path):
    names = ["猫", "café au lait", "Zebra", "apple"]
    path = save_pack(ZeroShotClassifier(tiny_clip, names), tmp_path / "u.safetensors")
    assert load_pack(path).classnames == names


def test_build_from_pack_reproduces_predict_proba(tiny_clip, classifier, pack_file, pixels):
    expected = classifier.predict_proba(pixels)
    pack = load_pack(pack_file)
    # Loading the backbone afresh by the pack's name and weight source …
    rebuilt = build_from_pack(pack)
    assert isinstance(rebuilt, ZeroShotClassifier)
    assert rebuilt.classnames == CLASSES
    assert rebuilt.config == classifier.config
    assert torch.equal(rebuilt.predict_proba(pixels), expected)
    # … and reusing an already-built backbone.
    reused = build_from_pack(pack, backbone=tiny_clip)
    assert torch.equal(reused.predict_proba(pixels), expected)


def test_build_from_pack_predictions_from_paths(classifier, pack_file, photos_dir):
    paths = sorted(photos_dir.glob("*.png"))
    rebuilt = build_from_pack(load_pack(pack_file))
    assert rebuilt.predict(paths, top_k=2) == classifier.predict(paths, top_k=2)


def test_pack_holds_only_prompt_tensors(tiny_clip, pack_file):
    pack = load_pack(pack_file)
    with safe_open(str(pack_file), framework="pt") as f:
        keys = set(f.keys())
    backbone_keys = set(tiny_clip.state_dict()) | set(tiny_clip.model.state_dict())
    assert keys == {"class_embeddings"}
    assert not keys & backbone_keys
    assert pack.tensors["class_embeddings"].shape == (len(CLASSES), tiny_clip.embed_dim)
    backbone_params = sum(p.numel() for p in tiny_clip.parameters())
    assert pack.num_parameters() == len(CLASSES) * tiny_clip.embed_dim
    assert pack.num_parameters() < backbone_params / 100


def test_save_pack_of_prompt_pack_merges_metrics(classifier, tmp_path):
    pack = load_pack(save_pack(classifier, tmp_path / "a.safetensors", metrics={"a": 1}))
    again = load_pack(save_pack(pack, tmp_path / "b.safetensors", metrics={"b": 2}))
    assert again.metrics == {"a": 1, "b": 2}
    assert torch.equal(again.tensors["class_embeddings"], pack.tensors["class_embeddings"])
    assert again.created == pack.created


def test_save_pack_refuses_empty_tensor_set(tiny_clip, tmp_path):
    pack = PromptPack(
        method="zeroshot",
        config={},
        backbone=BackboneRef("clip:tiny", "none", tiny_clip.fingerprint()),
        classnames=["a"],
        preprocess=tiny_clip.preprocess.to_dict(),
        tensors={},
    )
    with pytest.raises(PackError, match="at least one tensor"):
        save_pack(pack, tmp_path / "empty.safetensors")
    assert not (tmp_path / "empty.safetensors").exists()


# --------------------------------------------------------------------------- refusing bad files


class Payload:
    """Unpickling this writes a marker file: proof that a loader executed pickle code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "pwned"))


@pytest.mark.parametrize("kind", ["torch-zip", "torch-legacy", "plain-pickle"])
def test_pickle_renamed_to_safetensors_is_refused_and_never_executed(tmp_path, kind):
    marker = tmp_path / "marker.txt"
    data = {"class_embeddings": torch.zeros(2, 32), "evil": Payload(marker)}
    path = tmp_path / "model.safetensors"
    if kind == "torch-zip":
        torch.save(data, path)
    elif kind == "torch-legacy":
        torch.save(data, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(data, protocol=4))

    # Control: the payload is live, so a loader that unpickles would leave the marker.
    if kind == "plain-pickle":
        pickle.loads(path.read_bytes())
    else:
        torch.load(io.BytesIO(path.read_bytes()), weights_only=False)
    assert marker.read_text() == "pwned"
    marker.unlink()

    with pytest.raises(PackError, match="pickle") as info:
        load_pack(path)
    assert str(path) in str(info.value)
    assert "never unpickles" in str(info.value)
    assert not marker.exists()


def _header_len(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def _pack_with_header_len(tmp_path: Path, pack: PromptPack, want) -> Path:
    """Pad ``extra`` until the safetensors header length satisfies ``want(n)``."""
    path = tmp_path / "collide.safetensors"
    pack.extra = {"pad": ""}
    save_pack(pack, path)
    n0 = _header_len(path)
    target = next(n for n in range(n0 + 64, n0 + 70_000, 8) if want(n))
    # Each padding character adds one header byte; the header is padded to 8 bytes.
    for k in range(target - n0 - 8, target - n0 + 8):
        pack.extra = {"pad": "x" * k}
        save_pack(pack, path)
        if want(_header_len(path)):
            return path
    raise AssertionError("no padding gave the wanted header length")


@pytest.mark.parametrize(
    ("first_bytes", "want"),
    [
        (b"\x80", lambda n: n % 256 == 128),
        (b"PK", lambda n: n % 65536 == 0x4B50),
    ],
    ids=["0x80", "PK"],
)
def test_valid_pack_whose_header_length_looks_like_a_pickle_signature(
    pack_file, tmp_path, first_bytes, want
):
    pack = load_pack(pack_file)
    path = _pack_with_header_len(tmp_path, pack, want)
    blob = path.read_bytes()
    assert blob.startswith(first_bytes)
    loaded = load_pack(path)
    assert loaded.classnames == CLASSES
    assert torch.equal(loaded.tensors["class_embeddings"], pack.tensors["class_embeddings"])
    # Truncated, it is reported as truncated, not as a pickle.
    path.write_bytes(blob[: 8 + _header_len(path) // 2])
    with pytest.raises(PackError, match="truncated") as info:
        load_pack(path)
    assert "pickle" not in str(info.value)


@pytest.mark.parametrize(
    ("where", "cut"),
    [
        ("<8 bytes", lambda n, size: 1),
        ("<8 bytes", lambda n, size: 7),
        ("length only", lambda n, size: 8),
        ("inside header", lambda n, size: 8 + n // 2),
        ("end of header", lambda n, size: 8 + n - 1),
        ("header, no data", lambda n, size: 8 + n),
        ("inside data", lambda n, size: 8 + n + (size - 8 - n) // 2),
        ("last byte missing", lambda n, size: size - 1),
    ],
)
def test_truncated_pack_is_refused(pack_file, tmp_path, where, cut):
    blob = pack_file.read_bytes()
    n = _header_len(pack_file)
    length = cut(n, len(blob))
    assert 0 < length < len(blob)
    path = tmp_path / "cut.safetensors"
    path.write_bytes(blob[:length])
    with pytest.raises(PackError) as info:
        load_pack(path)
    message = str(info.value)
    assert str(path) in message
    assert any(w in message for w in ("too short", "truncated", "does not fit")), message


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with pytest.raises(PackError, match=r"0 bytes.*too short"):
        load_pack(path)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes_are_refused(tmp_path, seed):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(np.random.default_rng(seed).bytes(4096))
    with pytest.raises(PackError, match=r"noise\.safetensors"):
        load_pack(path)


def test_small_header_length_with_garbage_header_is_refused(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(struct.pack("<Q", 16) + b"\xff\xfe not json at all" + b"\0" * 64)
    with pytest.raises(PackError, match="header is not JSON"):
        load_pack(path)


def test_header_with_malformed_tensor_entry_is_refused(tmp_path):
    header = json.dumps({"x": {"dtype": "F32", "shape": [1]}}).encode()
    path = tmp_path / "bad_entry.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(PackError, match="malformed tensor entry 'x'"):
        load_pack(path)


def test_tensor_data_inconsistent_with_shape_is_refused(tmp_path):
    # Offsets fit the file, but the shape needs more bytes than the offsets give.
    meta = {"__metadata__": {"vprompt": json.dumps({"format": FORMAT, "format_version": 1})}}
    meta["x"] = {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 8]}
    header = json.dumps(meta).encode()
    path = tmp_path / "inconsistent.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(PackError, match="cannot read tensors"):
        load_pack(path)


def test_missing_path_and_folder_are_refused(tmp_path):
    with pytest.raises(PackError, match="no such prompt pack"):
        load_pack(tmp_path / "nope.safetensors")
    with pytest.raises(PackError, match="no such prompt pack"):
        load_pack(tmp_path)


def test_safetensors_without_vprompt_metadata_is_refused(tmp_path):
    plain = write_pack(tmp_path / "plain.safetensors", None)
    with pytest.raises(PackError, match="not a vprompt prompt pack"):
        load_pack(plain)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.ones(3)}, str(other), metadata={"format": "pt"})
    with pytest.raises(PackError, match="not a vprompt prompt pack"):
        load_pack(other)


def test_vprompt_metadata_that_is_not_json_or_not_an_object(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(3)}, str(path), metadata={"vprompt": "{not json"})
    with pytest.raises(PackError, match="not valid JSON"):
        load_pack(path)
    write_pack(path, ["a", "list"])
    with pytest.raises(PackError, match="must be a JSON object"):
        load_pack(path)


def _raw_pack(path: Path, header: dict[str, Any] | bytes, data: bytes = b"\0" * 4) -> Path:
    """A file with safetensors framing around any header (valid JSON or not)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


_ONE_TENSOR = {"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}


@pytest.mark.parametrize(
    ("metadata", "got"),
    [(["vprompt"], "a list"), ("vprompt", "a str"), ({"vprompt": {"format": 1}}, "'vprompt'")],
    ids=["list", "string", "non-string-value"],
)
def test_metadata_section_of_the_wrong_shape_is_refused(tmp_path, metadata, got):
    path = _raw_pack(tmp_path / "m.safetensors", {"__metadata__": metadata, **_ONE_TENSOR})
    with pytest.raises(PackError, match="__metadata__ must map names to strings") as info:
        load_pack(path)
    assert got in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [1], "data_offsets": [0, 1e300]},
        {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]},
        {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]},
        {"dtype": 5, "shape": [1], "data_offsets": [0, 4]},
        ["F32", [1], [0, 4]],
    ],
    ids=["float-offset", "negative-dim", "backwards", "shape-string", "dtype-number", "list"],
)
def test_malformed_tensor_entries_are_refused(tmp_path, entry):
    path = _raw_pack(tmp_path / "e.safetensors", {"x": entry})
    with pytest.raises(PackError, match="malformed tensor entry 'x'"):
        load_pack(path)


def test_deep_nesting_is_refused_in_the_header_and_in_the_metadata(pack_meta, tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    header = _raw_pack(tmp_path / "h.safetensors", ('{"a": ' + deep + "}").encode(), b"")
    with pytest.raises(PackError, match="nested deeper than 64 levels"):
        load_pack(header)
    meta = tmp_path / "meta.safetensors"
    save_file({"w": torch.ones(1)}, str(meta), metadata={"vprompt": deep})
    with pytest.raises(PackError, match="nested deeper than 64 levels"):
        load_pack(meta)
    nested: Any = "leaf"
    for _ in range(70):  # deep, but within Python's own recursion limit
        nested = {"k": nested}
    path = write_pack(tmp_path / "n.safetensors", dict(pack_meta, extra=nested))
    with pytest.raises(PackError, match="nested deeper than 64 levels"):
        load_pack(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_tensors_are_refused_before_anything_is_built(pack_meta, tmp_path, value):
    emb = torch.zeros(4, 32)
    emb[2, 5] = value
    path = write_pack(tmp_path / "nan.safetensors", pack_meta, {"class_embeddings": emb})
    with pytest.raises(PackError, match="'class_embeddings' holds NaN or infinite values"):
        load_pack(path)


def test_nan_in_metadata_is_refused_and_never_written(classifier, pack_meta, tmp_path):
    path = tmp_path / "nan-meta.safetensors"
    text = json.dumps(dict(pack_meta, metrics={"top1": float("nan")}))  # Python writes NaN
    save_file({"class_embeddings": torch.zeros(4, 32)}, str(path), metadata={"vprompt": text})
    with pytest.raises(PackError, match="NaN is not a JSON value"):
        load_pack(path)
    saved = save_pack(classifier, tmp_path / "ok.safetensors", metrics={"loss": float("inf")})
    assert load_pack(saved).metrics == {"loss": None}  # stored as null, read back


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("classnames", [{"a": 1}, 3, "cat", "dog"]),
        ("classnames", ["cat", "", "rocket", "cup"]),
        ("classnames", "cat,person"),
        ("method", ["zeroshot"]),
        ("metrics", [1, 2]),
        ("created", 5),
    ],
    ids=["objects", "empty-name", "string", "method-list", "metrics-list", "created-number"],
)
def test_metadata_fields_of_the_wrong_json_type_are_refused(pack_meta, tmp_path, field, value):
    path = write_pack(tmp_path / "t.safetensors", dict(pack_meta, **{field: value}))
    with pytest.raises(PackError, match=f"lacks or mangles field '{field}'"):
        load_pack(path)


def test_build_errors_name_the_pack_file(pack_meta, tiny_clip, tmp_path):
    path = write_pack(
        tmp_path / "t.safetensors", pack_meta, {"class_embeddings": torch.ones(3, 32)}
    )
    with pytest.raises(PackError, match=r"t\.safetensors: zeroshot tensor 'class_embeddings'"):
        build_from_pack(load_pack(path), backbone=tiny_clip)


def test_a_pack_too_big_for_memory_is_a_pack_error(pack_file, tiny_clip, monkeypatch):
    """A config or class list sized past this machine's memory is one line, not a crash."""
    from vprompt.methods.zeroshot import ZeroShotClassifier as ZeroShot

    def allocate(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"
        )

    monkeypatch.setattr(ZeroShot, "from_state", classmethod(allocate))
    with pytest.raises(PackError, match="needs more memory than is available"):
        build_from_pack(load_pack(pack_file), backbone=tiny_clip)


@pytest.mark.parametrize("version", [999, 2, 0, -1, "1", None, 1.5])
def test_unsupported_format_version_is_refused(pack_meta, tmp_path, version):
    meta = dict(pack_meta, format_version=version)
    path = write_pack(tmp_path / "v.safetensors", meta)
    with pytest.raises(PackError, match="format version") as info:
        load_pack(path)
    assert repr(version) in str(info.value)
    if version == 999:
        assert "upgrade vprompt" in str(info.value)


def test_unknown_format_is_refused(pack_meta, tmp_path):
    path = write_pack(tmp_path / "f.safetensors", dict(pack_meta, format="other-pack"))
    with pytest.raises(PackError, match="unknown pack format 'other-pack'"):
        load_pack(path)


def test_unknown_method_is_refused(pack_meta, tmp_path):
    path = write_pack(tmp_path / "m.safetensors", dict(pack_meta, method="no-such-method"))
    with pytest.raises(PackError, match="'no-such-method'") as info:
        load_pack(path)
    assert "zeroshot" in str(info.value)  # the known methods are listed


@pytest.mark.parametrize("field", ["method", "config", "backbone", "classnames", "preprocess"])
def test_missing_metadata_field_is_refused(pack_meta, tmp_path, field):
    meta = {k: v for k, v in pack_meta.items() if k != field}
    path = write_pack(tmp_path / "missing.safetensors", meta)
    with pytest.raises(PackError, match=f"lacks or mangles field '{field}'"):
        load_pack(path)


@pytest.mark.parametrize("field", ["name", "weights", "fingerprint"])
def test_missing_backbone_field_is_refused(pack_meta, tmp_path, field):
    backbone = {k: v for k, v in pack_meta["backbone"].items() if k != field}
    path = write_pack(tmp_path / "missing.safetensors", dict(pack_meta, backbone=backbone))
    with pytest.raises(PackError, match=f"'{field}'"):
        load_pack(path)


def test_mangled_metadata_field_is_refused(pack_meta, tmp_path):
    path = write_pack(tmp_path / "mangled.safetensors", dict(pack_meta, backbone="clip:tiny"))
    with pytest.raises(PackError, match="lacks or mangles"):
        load_pack(path)


# --------------------------------------------------------------------------- building


@pytest.fixture(scope="module")
def weight_files(tiny_clip, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny CLIP weights saved to a file, and a copy with one tensor perturbed."""
    folder = tmp_path_factory.mktemp("weights")
    state = {k: v.detach().clone().contiguous() for k, v in tiny_clip.model.state_dict().items()}
    same = folder / "same.safetensors"
    save_file(state, str(same))
    state["visual.proj"] = state["visual.proj"] + 0.01
    other = folder / "perturbed.safetensors"
    save_file(state, str(other))
    return same, other


def test_same_weights_from_a_file_are_accepted(pack_file, weight_files, pixels, classifier):
    same, _ = weight_files
    rebuilt = build_from_pack(load_pack(pack_file), weights=str(same))
    assert rebuilt.backbone.weights == str(same)
    assert torch.equal(rebuilt.predict_proba(pixels), classifier.predict_proba(pixels))


def test_other_weights_are_refused_by_fingerprint(pack_file, pack_meta, weight_files):
    _, other = weight_files
    with pytest.raises(PackError, match="fingerprint") as info:
        build_from_pack(load_pack(pack_file), weights=str(other))
    message = str(info.value)
    assert pack_meta["backbone"]["fingerprint"] in message
    assert str(other) in message


def test_backbone_name_mismatch_is_refused(pack_meta, tiny_clip, tmp_path):
    meta = dict(pack_meta, backbone=dict(pack_meta["backbone"], name="clip:ViT-B-16"))
    path = write_pack(tmp_path / "n.safetensors", meta, {"class_embeddings": torch.zeros(4, 32)})
    with pytest.raises(PackError, match=r"made for backbone 'clip:ViT-B-16', got 'clip:tiny'"):
        build_from_pack(load_pack(path), backbone=tiny_clip)


def test_unloadable_weight_source_is_a_pack_error(pack_meta, tmp_path):
    meta = dict(pack_meta, backbone=dict(pack_meta["backbone"], weights="no-such-tag"))
    path = write_pack(tmp_path / "w.safetensors", meta, {"class_embeddings": torch.zeros(4, 32)})
    with pytest.raises(PackError, match=r"cannot load the pack's backbone.*no-such-tag"):
        build_from_pack(load_pack(path))


def test_preprocess_mismatch_is_refused(pack_meta, tiny_clip, tmp_path):
    meta = dict(pack_meta, preprocess=dict(pack_meta["preprocess"], size=[64, 64]))
    path = write_pack(tmp_path / "p.safetensors", meta, {"class_embeddings": torch.zeros(4, 32)})
    with pytest.raises(PackError, match="preprocessing"):
        build_from_pack(load_pack(path), backbone=tiny_clip)


@pytest.mark.parametrize(
    "config",
    [{"templates": 5}, {"templates": ["no placeholder"]}, {"bogus_key": 1}],
    ids=["wrong-type", "bad-template", "unknown-key"],
)
def test_invalid_config_in_pack_is_a_pack_error(pack_meta, tiny_clip, tmp_path, config):
    path = write_pack(
        tmp_path / "c.safetensors",
        dict(pack_meta, config=config),
        {"class_embeddings": torch.zeros(4, 32)},
    )
    with pytest.raises(PackError, match="config is invalid"):
        build_from_pack(load_pack(path), backbone=tiny_clip)


@pytest.mark.parametrize(
    "tensors",
    [
        {"class_embeddings": torch.zeros(3, 32)},
        {"class_embeddings": torch.zeros(4, 16)},
        {"class_embeddings": torch.zeros(4, 32), "extra": torch.zeros(1)},
        {"other": torch.zeros(4, 32)},
    ],
    ids=["too-few-rows", "wrong-dim", "extra-tensor", "wrong-name"],
)
def test_tensors_that_do_not_fit_are_refused(pack_meta, tiny_clip, tmp_path, tensors):
    path = write_pack(tmp_path / "t.safetensors", pack_meta, tensors)
    with pytest.raises(PackError):
        build_from_pack(load_pack(path), backbone=tiny_clip)


# --------------------------------------------------------------------------- class lists


def test_check_classnames(pack_file):
    pack = load_pack(pack_file)
    check_classnames(pack, list(CLASSES))
    check_classnames(pack, tuple(CLASSES))
    with pytest.raises(PackError, match=r"missing \['coffee cup'\]"):
        check_classnames(pack, CLASSES[:3])
    with pytest.raises(PackError, match=r"not in pack \['horse'\]"):
        check_classnames(pack, [*CLASSES, "horse"])
    with pytest.raises(PackError, match=r"missing \['rocket'\]; not in pack \['rockets'\]"):
        check_classnames(pack, ["cat", "person", "rockets", "coffee cup"])
    with pytest.raises(PackError, match="different order"):
        check_classnames(pack, list(reversed(CLASSES)))
    with pytest.raises(PackError, match="duplicates"):
        check_classnames(pack, [*CLASSES, "cat"])
    with pytest.raises(PackError, match="4 classes"):
        check_classnames(pack, [])


# --------------------------------------------------------------------------- atomic saves


def test_failed_save_leaves_previous_pack_untouched(classifier, tiny_clip, tmp_path, monkeypatch):
    import safetensors.torch

    folder = tmp_path / "out"
    path = save_pack(classifier, folder / "zs.safetensors")
    before = path.read_bytes()
    calls = []

    def broken_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        with open(filename, "wb") as fh:  # half a file, then the disk "fills up"
            fh.write(b"\x00" * 100)
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    other = ZeroShotClassifier(tiny_clip, ["dog", "cat"])
    with pytest.raises(OSError, match="No space left"):
        save_pack(other, path)

    assert calls
    assert Path(calls[0]) != path  # it wrote somewhere else first
    assert Path(calls[0]).parent == folder
    assert path.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["zs.safetensors"]
    assert load_pack(path).classnames == CLASSES


def test_successful_overwrite_replaces_pack_and_leaves_no_temp_files(
    classifier, tiny_clip, tmp_path
):
    path = save_pack(classifier, tmp_path / "zs.safetensors")
    save_pack(ZeroShotClassifier(tiny_clip, ["dog", "cat"]), path)
    assert load_pack(path).classnames == ["dog", "cat"]
    assert [p.name for p in tmp_path.iterdir()] == ["zs.safetensors"]


def test_save_creates_missing_folders(classifier, tmp_path):
    path = save_pack(classifier, tmp_path / "a" / "b" / "zs.safetensors")
    assert load_pack(path).classnames == CLASSES


# --------------------------------------------------------------------------- weights a pack names


def _pack_naming(classifier, tmp_path: Path, name: str, weights: str) -> Path:
    """A pack of ``classifier``'s tensors that names other weights (as a shared file may)."""
    from vprompt.engine.pack import pack_method

    pack = pack_method(classifier)
    pack.backbone = BackboneRef(name, weights, "0" * 16)
    return save_pack(pack, tmp_path / "shared.safetensors")


@pytest.mark.parametrize(
    ("name", "weights", "fetch"),
    [
        ("torchvision:mobilenet_v2", "IMAGENET1K_V1", "download.pytorch.org"),
        ("torchvision:resnet18", "hf-hub:someone/weights", "someone/weights"),
    ],
    ids=["torch-hub-url", "hf-hub"],
)
def test_a_pack_never_downloads_the_weights_it_names(
    classifier, tmp_path, monkeypatch, name, weights, fetch
):
    import urllib.request

    import huggingface_hub.constants as hub

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # nothing cached here
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    before = (urllib.request.urlopen, hub.HF_HUB_OFFLINE)
    path = _pack_naming(classifier, tmp_path, name, weights)
    with pytest.raises(PackError) as info:
        build_from_pack(load_pack(path))
    text = str(info.value)
    assert text.startswith(f"{path}: the pack names {name} weights {weights!r}")
    assert "not on this machine" in text
    assert fetch in text
    assert f"--weights {weights}" in text
    assert "--allow-download" in text
    assert not list((tmp_path / "torch").rglob("*.pth"))  # nothing was fetched
    assert (urllib.request.urlopen, hub.HF_HUB_OFFLINE) == before  # switched back


def test_weights_the_user_names_or_allows_load_as_usual(classifier, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    from vprompt.engine import pack as pack_module

    seen: list[tuple[str, bool]] = []

    def fake_load(name, weights, *, device):  # records whether downloads were off
        seen.append((weights, hub.HF_HUB_OFFLINE))
        raise PackError("stop here")

    monkeypatch.setattr(pack_module, "load_backbone", fake_load)
    path = _pack_naming(classifier, tmp_path, "clip:ViT-B-16", "openai")
    for kwargs in ({}, {"weights": "openai"}, {"allow_download": True}):
        with pytest.raises(PackError):
            build_from_pack(load_pack(path), **kwargs)
    assert seen == [("openai", True), ("openai", False), ("openai", False)]
    seen.clear()
    folder = tmp_path / "my-weights"
    folder.mkdir()
    for local in ("none", str(folder)):  # nothing to download: loaded as they are
        with pytest.raises(PackError):
            build_from_pack(load_pack(_pack_naming(classifier, tmp_path, "clip:tiny", local)))
    assert seen == [("none", False), (str(folder), False)]


@pytest.mark.real
def test_weights_already_on_this_machine_load_without_asking(tmp_path):
    """The ImageNet MobileNetV2 weights in the torch cache (scripts/install-assets.sh) load
    for a pack that names them, with downloads off."""
    from vprompt.backbones import load_backbone
    from vprompt.methods.registry import METHODS

    cached = Path(torch.hub.get_dir()) / "checkpoints" / "mobilenet_v2-b0353104.pth"
    if not cached.is_file():
        pytest.skip(f"ImageNet MobileNetV2 weights not in {cached.parent}")
    backbone = load_backbone("torchvision:mobilenet_v2", "IMAGENET1K_V1")
    probe = METHODS.get("linear-probe")(backbone, ["a", "b"])
    path = save_pack(probe, tmp_path / "probe.safetensors")
    rebuilt = build_from_pack(load_pack(path))
    assert rebuilt.backbone.fingerprint() == backbone.fingerprint()
