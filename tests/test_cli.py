"""The real ``vprompt`` command line, end to end in subprocesses (offline, CPU).

Each subprocess costs several seconds (torch + open_clip imports), so outputs that several tests
check are produced once per module.
"""

from __future__ import annotations

import io
import json
import pathlib
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from vprompt.engine.pack import load_pack
from vprompt.prompts.text import resolve_templates

CLASSES = "cat,person,rocket,coffee"
CLASS_LIST = CLASSES.split(",")
TINY = ("--model", "clip:tiny", "--weights", "none")
PHOTO_NAMES = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.png"]


# --------------------------------------------------------------------------- helpers


def assert_clean_error(res, *, code: int = 1, errors: int = 1, contains: tuple[str, ...] = ()):
    """Exit ``code``, ``errors`` lines of ``vprompt: error: …``, no traceback, nothing else odd."""
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr
    assert "Traceback" not in res.stdout
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    error_lines = [ln for ln in lines if ln.startswith("vprompt: error: ")]
    assert len(error_lines) == errors, res.stderr
    # Anything else on stderr is vprompt's own one-line summary, never a stray warning.
    assert all(ln.startswith("vprompt: ") for ln in lines), res.stderr
    text = "\n".join(error_lines)
    for needle in contains:
        assert needle in text, res.stderr
    return error_lines


def check_prediction_lines(records: list[dict[str, Any]], images: list[Path], top_k: int):
    assert [r["image"] for r in records] == [str(p) for p in images]
    for r in records:
        assert set(r) == {"image", "predictions"}
        preds = r["predictions"]
        assert len(preds) == top_k
        assert all(set(p) == {"label", "score"} for p in preds)
        scores = [p["score"] for p in preds]
        assert scores == sorted(scores, reverse=True)
        assert all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in scores)
        labels = [p["label"] for p in preds]
        assert len(set(labels)) == top_k
        assert set(labels) <= set(CLASS_LIST)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def photos(photos_dir) -> list[Path]:
    paths = sorted(photos_dir.glob("*.png"))
    assert [p.name for p in paths] == PHOTO_NAMES
    return paths


@pytest.fixture(scope="module")
def zeroshot_run(run_cli, photos_dir, work):
    """`zeroshot --json --top-k 3 --save-pack` on the photos folder with clip:tiny."""
    pack = work / "tiny.safetensors"
    res = run_cli(
        "zeroshot",
        photos_dir,
        *TINY,
        "--classes",
        CLASSES,
        "--json",
        "--top-k",
        "3",
        "--save-pack",
        pack,
    )
    return res, pack


@pytest.fixture(scope="module")
def predict_run(run_cli, zeroshot_run, photos_dir):
    _, pack = zeroshot_run
    return run_cli("predict", "--pack", pack, photos_dir, "--json", "--top-k", "3")


# --------------------------------------------------------------------------- models / help


def test_models_lists_names_and_tags(run_cli):
    res = run_cli("models")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["NAME", "FAMILY", "TAGS"]
    tiny = next(ln for ln in lines if ln.split()[0] == "clip:tiny")
    assert "tiny test model" in tiny
    b16 = next(ln for ln in lines if ln.split()[0] == "clip:ViT-B-16")
    assert "openai" in b16.split(None, 2)[2]


def test_models_json(run_cli):
    res = run_cli("models", "--json")
    assert res.returncode == 0, res.stderr
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert rows["clip:tiny"]["tiny"] is True
    assert rows["clip:tiny"]["tags"] == []
    assert rows["clip:tiny"]["default_weights"] == "none"
    b16 = rows["clip:ViT-B-16"]
    assert b16["family"] == "clip"
    assert b16["arch"] == "ViT-B-16"
    assert "openai" in b16["tags"]
    assert b16["default_weights"] == "openai"
    assert b16["tiny"] is False


@pytest.mark.parametrize(
    ("command", "needles"),
    [
        ((), ("models", "zeroshot", "predict", "inspect")),
        (("models",), ("--json", "--family")),
        (
            ("zeroshot",),
            (
                "IMAGES",
                "--classes",
                "--classes-file",
                "--templates",
                "--descriptions",
                "--save-pack",
                "--top-k",
                "--json",
                "--max-pixels",
            ),
        ),
        (("predict",), ("--pack", "IMAGES", "--classes", "--weights", "--top-k", "--json")),
        (("inspect",), ("PACK_PATH", "--json")),
        (("train",), ("--set", "vprompt presets --method NAME", "--unlabeled", "--descriptions")),
        (("eval",), ("--method", "--pack", "--model", "--set")),
    ],
    ids=["main", "models", "zeroshot", "predict", "inspect", "train", "eval"],
)
def test_help(run_cli, command, needles):
    res = run_cli(*command, "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("Usage: ")
    for needle in needles:
        assert needle in res.stdout
    assert res.stderr == ""


# --------------------------------------------------------------------------- zeroshot / predict


def test_zeroshot_json(zeroshot_run, photos):
    res, pack = zeroshot_run
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    records = res.json_lines()
    assert len(records) == len(res.stdout.splitlines()) == 4  # one JSON object per line
    check_prediction_lines(records, photos, top_k=3)
    assert f"saved prompt pack to {pack}" in res.stderr
    assert load_pack(pack).classnames == CLASS_LIST


def test_predict_with_saved_pack_gives_identical_output(zeroshot_run, predict_run):
    res, _ = zeroshot_run
    assert predict_run.returncode == 0, predict_run.stderr
    assert predict_run.stdout == res.stdout
    assert "Traceback" not in predict_run.stderr


@pytest.mark.slow
def test_zeroshot_vit_b_16_random_weights(run_cli, photos_dir, photos):
    res = run_cli(
        "zeroshot",
        photos_dir,
        "--model",
        "clip:ViT-B-16",
        "--weights",
        "none",
        "--classes",
        CLASSES,
        "--json",
        "--top-k",
        "2",
        "--device",
        "cpu",
    )
    assert res.returncode == 0, res.stderr
    assert res.stderr.splitlines() == [  # said once, in vprompt's one-line form
        "vprompt: warning: clip:ViT-B-16 has random weights (--weights none): its predictions "
        "are random; use it to check a pipeline, not to measure one"
    ]
    assert "Traceback" not in res.stderr
    check_prediction_lines(res.json_lines(), photos, top_k=2)


@pytest.fixture(scope="module")
def text_run(run_cli, photos, work):
    """Plain-text output, classes from a file, the openai-imagenet template set, a saved pack."""
    classes = work / "classes.txt"
    classes.write_text("# my classes\ncat\n\nperson\nrocket\ncoffee\n")
    pack = work / "openai.safetensors"
    res = run_cli(
        "zeroshot",
        *photos,
        *TINY,
        "--classes-file",
        classes,
        "--templates",
        "openai-imagenet",
        "--save-pack",
        pack,
    )
    return res, pack


def test_zeroshot_text_output_with_classes_file(text_run, photos):
    res, _ = text_run
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == len(photos)
    item = re.compile(r"^(\S.*?) \((\d\.\d{3})\)$")
    for line, photo in zip(lines, photos, strict=True):
        prefix = f"{photo}: "
        assert line.startswith(prefix)
        ranked = [item.match(part) for part in line[len(prefix) :].split(", ")]
        assert all(ranked), line
        # default --top-k 5, clamped to the 4 classes
        assert sorted(m.group(1) for m in ranked) == sorted(CLASS_LIST)
        scores = [float(m.group(2)) for m in ranked]
        assert scores == sorted(scores, reverse=True)
        assert sum(scores) == pytest.approx(1.0, abs=0.01)


def test_zeroshot_templates_set_is_used(text_run):
    _, pack = text_run
    stored = load_pack(pack)
    assert stored.classnames == CLASS_LIST
    assert tuple(stored.config["templates"]) == resolve_templates("openai-imagenet")
    assert len(stored.config["templates"]) > 10
    assert stored.config["descriptions"] is False


def test_zeroshot_templates_file(run_cli, photos, work, zeroshot_run):
    templates = work / "templates.txt"
    templates.write_text("# two templates\na blurry photo of a {}.\n\nart of the {}.\n")
    pack = work / "tfile.safetensors"
    res = run_cli(
        "zeroshot",
        *photos,
        *TINY,
        "--classes",
        CLASSES,
        "--templates",
        templates,
        "--json",
        "--top-k",
        "3",
        "--save-pack",
        pack,
    )
    assert res.returncode == 0, res.stderr
    check_prediction_lines(res.json_lines(), photos, top_k=3)
    assert load_pack(pack).config["templates"] == ["a blurry photo of a {}.", "art of the {}."]
    other, _ = zeroshot_run
    default_scores = [r["predictions"][0]["score"] for r in other.json_lines()]
    assert [r["predictions"][0]["score"] for r in res.json_lines()] != default_scores


def test_zeroshot_descriptions_file(run_cli, photos, work):
    descriptions = work / "descriptions.json"
    descriptions.write_text(
        json.dumps(
            {
                "cat": ["a small furry pet with whiskers", "a cat sitting on a sofa"],
                "person": ["a human being"],
                "rocket": ["a rocket launching into the sky"],
                "coffee": ["a cup of hot coffee", "an espresso"],
            }
        )
    )
    pack = work / "cupl.safetensors"
    res = run_cli(
        "zeroshot",
        *photos,
        *TINY,
        "--classes",
        CLASSES,
        "--descriptions",
        descriptions,
        "--json",
        "--top-k",
        "4",
        "--save-pack",
        pack,
    )
    assert res.returncode == 0, res.stderr
    check_prediction_lines(res.json_lines(), photos, top_k=4)
    config = load_pack(pack).config
    assert config["descriptions"] is True
    assert config["templates"] == []


# --------------------------------------------------------------------------- inspect


def test_inspect_text(run_cli, zeroshot_run):
    _, pack = zeroshot_run
    res = run_cli("inspect", pack)
    assert res.returncode == 0, res.stderr
    stored = load_pack(pack)
    out = res.stdout
    assert f"pack:        {pack}" in out
    assert "format:      vprompt-pack v1" in out
    assert "method:      zeroshot" in out
    assert f"backbone:    clip:tiny weights=none fingerprint={stored.backbone.fingerprint}" in out
    assert "classes:     4: cat, person, rocket, coffee" in out
    assert "tensor class_embeddings: float32 [4, 32]" in out
    assert "parameters:  128" in out


def test_inspect_json(run_cli, zeroshot_run):
    _, pack = zeroshot_run
    res = run_cli("inspect", pack, "--json")
    assert res.returncode == 0, res.stderr
    meta = json.loads(res.stdout)
    stored = load_pack(pack)
    assert meta.pop("tensors") == {"class_embeddings": {"shape": [4, 32], "dtype": "float32"}}
    assert meta.pop("num_parameters") == 128
    assert meta == stored.metadata()
    assert meta["format"] == "vprompt-pack"
    assert meta["classnames"] == CLASS_LIST


# --------------------------------------------------------------------------- bad input


def test_corrupt_image_among_good_ones(run_cli, photos, work):
    folder = work / "mixed"
    folder.mkdir()
    for p in photos[:2]:
        shutil.copy(p, folder / p.name)
    (folder / "broken.png").write_bytes(b"this is not a png")
    data = photos[2].read_bytes()
    (folder / "half.png").write_bytes(data[: len(data) // 2])
    res = run_cli("zeroshot", folder, *TINY, "--classes", CLASSES, "--json", "--top-k", "2")
    good = [folder / p.name for p in photos[:2]]
    check_prediction_lines(res.json_lines(), good, top_k=2)
    errors = assert_clean_error(res, errors=2)
    assert errors[0].startswith(f"vprompt: error: {folder / 'broken.png'}: ")
    assert "not a recognised image format" in errors[0]
    assert errors[1].startswith(f"vprompt: error: {folder / 'half.png'}: ")
    assert "2 input(s) failed, 2 succeeded" in res.stderr


def test_missing_path(run_cli, work):
    missing = work / "no-such-folder"
    res = run_cli("zeroshot", missing, *TINY, "--classes", CLASSES, "--json")
    assert res.stdout == ""
    assert_clean_error(res, contains=(str(missing), "no such file or folder"))


def test_unknown_model(run_cli, photos):
    res = run_cli("zeroshot", photos[0], "--model", "clip:ViT-B-61", "--classes", CLASSES)
    assert res.stdout == ""
    (line,) = assert_clean_error(res, contains=("unknown model 'clip:ViT-B-61'", "did you mean"))
    assert "'clip:ViT-B-16'" in line


def test_unknown_weight_tag(run_cli, photos):
    res = run_cli(
        "zeroshot",
        photos[0],
        "--model",
        "clip:ViT-B-16",
        "--weights",
        "opneai",
        "--classes",
        CLASSES,
    )
    assert res.stdout == ""
    assert_clean_error(res, contains=("unknown tag 'opneai'", "did you mean 'openai'"))


def test_unknown_device(run_cli, photos):
    res = run_cli("zeroshot", photos[0], *TINY, "--classes", CLASSES, "--device", "gpu0")
    assert_clean_error(res, contains=("unknown device 'gpu0'",))


@pytest.mark.parametrize(
    "classes", [(), ("--classes", CLASSES, "--classes-file", "x.txt")], ids=["neither", "both"]
)
def test_classes_and_classes_file_are_exclusive(run_cli, photos, classes):
    res = run_cli("zeroshot", photos[0], *TINY, *classes)
    assert res.returncode == 2
    assert res.stdout == ""
    assert "Traceback" not in res.stderr
    assert "Error: give exactly one of --classes or --classes-file" in res.stderr


def test_predict_with_mismatched_classes(run_cli, zeroshot_run, photos):
    _, pack = zeroshot_run
    res = run_cli("predict", "--pack", pack, photos[0], "--classes", "cat,person,rocket")
    assert res.stdout == ""
    assert_clean_error(res, contains=("class list does not match", "missing ['coffee']"))


def test_predict_refuses_pickle_renamed_to_safetensors(run_cli, photos, work):
    marker = work / "pwned.txt"

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.write_text, (pathlib.Path(marker), "pwned"))

    fake = work / "evil.safetensors"
    torch.save({"class_embeddings": torch.zeros(4, 32), "x": Payload()}, fake)
    # Control: the payload is live.
    torch.load(io.BytesIO(fake.read_bytes()), weights_only=False)
    assert marker.exists()
    marker.unlink()

    res = run_cli("predict", "--pack", fake, photos[0])
    assert res.stdout == ""
    assert_clean_error(res, contains=(str(fake), "pickle", "never unpickles"))
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["nan-tensor", "deep-metadata", "metadata-list"])
def test_predict_and_inspect_refuse_hostile_packs_in_one_line(
    run_cli, zeroshot_run, photos, work, damage
):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    _, pack = zeroshot_run
    with safe_open(str(pack), "pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(pack))
    bad = work / f"{damage}.safetensors"
    if damage == "nan-tensor":
        tensors["class_embeddings"][0, 0] = float("nan")
        save_file(tensors, str(bad), metadata=meta)
    elif damage == "deep-metadata":
        save_file(tensors, str(bad), metadata={"vprompt": "[" * 50_000 + "]" * 50_000})
    else:
        header = json.dumps({"__metadata__": ["vprompt"]}).encode()
        bad.write_bytes(len(header).to_bytes(8, "little") + header)
    commands = [("predict", "--pack", bad, photos[0], "--json")]
    if damage == "deep-metadata":  # inspect reads the pack through the same load_pack
        commands.append(("inspect", bad))
    for args in commands:
        res = run_cli(*args)
        assert res.stdout == ""
        assert_clean_error(res, contains=(str(bad),))


def test_inspect_refuses_truncated_pack(run_cli, zeroshot_run, work):
    _, pack = zeroshot_run
    data = pack.read_bytes()
    cut = work / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 20])
    res = run_cli("inspect", cut)
    assert res.stdout == ""
    assert_clean_error(res, contains=(str(cut), "truncated prompt pack"))


def test_device_errors_are_config_errors(monkeypatch):
    # `--device` reaches resolve_device; bad values must be vprompt errors, not torch tracebacks.
    from vprompt.backbones.registry import resolve_device
    from vprompt.errors import ConfigError

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda:0")


def test_predict_never_downloads_what_a_shared_pack_names(run_cli, zeroshot_run, photos, work):
    from vprompt.engine.pack import BackboneRef, load_pack, save_pack

    _, source = zeroshot_run
    pack = load_pack(source)
    pack.backbone = BackboneRef("torchvision:mobilenet_v2", "IMAGENET1K_V1", "0" * 16)
    shared = save_pack(pack, work / "shared.safetensors")
    empty = work / "empty-torch-home"
    res = run_cli("predict", "--pack", shared, photos[0], env={"TORCH_HOME": str(empty)})
    assert res.stdout == ""
    (line,) = assert_clean_error(res, contains=(str(shared), "--allow-download"))
    assert "never downloads what a pack names" in line
    assert not list(empty.rglob("*.pth"))


def test_random_weights_warning_is_a_warning_class() -> None:
    import warnings

    from vprompt import load_backbone
    from vprompt.backbones import registry

    registry._WARNED_RANDOM.discard("torchvision:mobilenet_v2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_backbone("torchvision:mobilenet_v2", "none")
        load_backbone("torchvision:mobilenet_v2", "none")  # once per model and process
        load_backbone("torchvision:tiny", "none")  # test models are random by definition
    said = [w for w in caught if issubclass(w.category, registry.RandomWeightsWarning)]
    assert [str(w.message).split(" (")[0] for w in said] == [
        "torchvision:mobilenet_v2 has random weights"
    ]


def test_weights_that_cannot_be_downloaded_say_what_to_do_once(run_cli, photos_dir) -> None:
    res = run_cli("zeroshot", "--model", "clip:ViT-B-32", "--weights", "laion2b_s34b_b79k",
                  "--classes", "cat,dog", photos_dir / "chelsea.png",
                  env={"HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert "ERROR:root" not in res.stderr  # open_clip's own log line is not repeated
    lines = res.stderr.strip().splitlines()
    assert lines[0].startswith("vprompt: warning: fetching clip:ViT-B-32 weights")
    assert len(lines) == 2, res.stderr
    error = lines[1]
    assert error.startswith("vprompt: error: cannot download clip:ViT-B-32 weights")
    for needle in ("laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "--weights PATH", "hub cache",
                   "--weights none"):  # fmt: skip
        assert needle in error


def test_torchvision_weights_that_cannot_be_downloaded_name_the_file_and_cache() -> None:
    from vprompt import load_backbone
    from vprompt.backbones.downloads import no_downloads
    from vprompt.errors import WeightsError

    with pytest.raises(WeightsError) as caught, no_downloads():
        load_backbone("torchvision:resnet18", "IMAGENET1K_V1")
    text = str(caught.value)
    assert text.startswith("cannot download torchvision:resnet18 weights 'IMAGENET1K_V1'")
    assert "resnet18-f37072fd.pth" in text
    assert "hub/checkpoints/" in text
    assert "--weights none" in text
