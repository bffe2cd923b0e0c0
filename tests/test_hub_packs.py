"""Prompt packs on the Hugging Face hub, offline: a temporary folder stands in for the hub.

In-process tests replace ``HfApi.create_repo`` / ``HfApi.create_commit`` and ``hf_hub_download``
with functions backed by a folder per repository and revision (raising the hub's own errors,
built from 404 responses by ``hf_raise_for_status``). CLI tests run the real client offline
(``HF_HUB_OFFLINE=1``) against a hub cache laid out as ``hf_hub_download`` leaves it.
"""

from __future__ import annotations

import hashlib
import importlib
import pickle
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import hf_raise_for_status

from vprompt import ConfigError, PackError, ZeroShotClassifier
from vprompt.data import load_image
from vprompt.engine.hub import (
    PACK_FILENAME,
    base_model_id,
    model_card,
    parse_hub_spec,
    pull_pack,
    push_pack,
)
from vprompt.engine.pack import build_from_pack, load_pack, save_pack

CLASSES = ["cat", "dog"]


def hub_error(code: str, url: str) -> None:
    """Raise the error the hub client raises for a 404 with this ``X-Error-Code``."""
    http = importlib.import_module(HfHubHTTPError.__mro__[1].__module__.partition(".")[0])
    response = http.Response(404, headers={"X-Error-Code": code}, request=http.Request("GET", url))
    hf_raise_for_status(response)
    raise AssertionError("hf_raise_for_status did not raise")


class FakeHub:
    """repo_id → {revision: folder}; every call recorded in ``calls``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.repos: dict[str, dict[str, Path]] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def folder(self, repo_id: str, revision: str = "main") -> Path:
        return self.repos[repo_id][revision]

    def tag(self, repo_id: str, tag: str) -> None:
        target = self.root / f"{repo_id.replace('/', '--')}@{tag}"
        shutil.copytree(self.folder(repo_id), target)
        self.repos[repo_id][tag] = target

    def create_repo(self, api: HfApi, repo_id: str, **kwargs: Any) -> str:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        if repo_id not in self.repos:
            folder = self.root / repo_id.replace("/", "--")
            folder.mkdir(parents=True)
            self.repos[repo_id] = {"main": folder}
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, api: HfApi, repo_id: str, operations: Any, **kwargs: Any) -> None:
        ops = list(operations)
        self.calls.append(("create_commit", {"repo_id": repo_id, "operations": ops, **kwargs}))
        folder = self.folder(repo_id, kwargs.get("revision") or "main")
        for op in ops:
            with op.as_file() as fh:
                (folder / op.path_in_repo).write_bytes(fh.read())

    def download(self, repo_id: str, filename: str, **kwargs: Any) -> str:
        self.calls.append(("hf_hub_download", {"repo_id": repo_id, "filename": filename, **kwargs}))
        url = f"https://huggingface.co/{repo_id}/resolve/{kwargs.get('revision')}/{filename}"
        if repo_id not in self.repos:
            hub_error("RepoNotFound", url)
        revision = kwargs.get("revision") or "main"
        if revision not in self.repos[repo_id]:
            hub_error("RevisionNotFound", url)
        file = self.folder(repo_id, revision) / filename
        if not file.is_file():
            hub_error("EntryNotFound", url)
        return str(file)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> FakeHub:
    fake = FakeHub(tmp_path / "hub")

    def create_repo(api: HfApi, repo_id: str, **kwargs: Any) -> str:
        return fake.create_repo(api, repo_id, **kwargs)

    def create_commit(api: HfApi, repo_id: str, operations: Any, **kwargs: Any) -> None:
        fake.create_commit(api, repo_id, operations, **kwargs)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.download)
    return fake


@pytest.fixture(scope="module")
def classifier(tiny_clip) -> ZeroShotClassifier:
    return ZeroShotClassifier(tiny_clip, CLASSES)


@pytest.fixture(scope="module")
def pack_file(classifier, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hub-pack") / "zs.safetensors"
    save_pack(classifier, path, metrics={"top1": 0.75, "per_class": [1.0, 0.5]})
    return path


def front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    head, sep, _ = card[4:].partition("\n---\n")
    assert sep
    meta = yaml.safe_load(head)
    assert isinstance(meta, dict)
    return meta


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(exc.value)
    assert text
    assert "\n" not in text
    return text


# --------------------------------------------------------------------------- push / pull


def test_push_uploads_pack_and_card(hub, pack_file):
    url = push_pack(pack_file, "org/zs", private=True, commit_message="first")
    assert url == "https://huggingface.co/org/zs"
    (name, repo), (name2, commit) = hub.calls
    assert (name, name2) == ("create_repo", "create_commit")
    assert repo["exist_ok"] is True
    assert repo["private"] is True
    assert commit["commit_message"] == "first"
    assert sorted(op.path_in_repo for op in commit["operations"]) == [
        "README.md",
        PACK_FILENAME,
    ]
    folder = hub.folder("org/zs")
    assert (folder / PACK_FILENAME).read_bytes() == pack_file.read_bytes()
    card = (folder / "README.md").read_text(encoding="utf-8")
    meta = front_matter(card)
    assert meta["library_name"] == "vprompt"
    assert meta["tags"] == ["vprompt", "prompt-learning", "zeroshot"]
    assert "base_model" not in meta  # weights 'none' name no hub model
    pack = load_pack(pack_file)
    assert "zeroshot" in card
    assert "clip:tiny" in card
    assert pack.backbone.fingerprint in card
    assert "`cat`, `dog`" in card
    assert "| top1 | 0.75 |" in card
    assert "vprompt predict --pack hf-hub:org/zs image.jpg" in card
    assert 'load_pack("hf-hub:org/zs")' in card


def test_push_a_pack_object(hub, pack_file):
    push_pack(load_pack(pack_file), "org/obj")
    pulled = load_pack(hub.folder("org/obj") / PACK_FILENAME)
    assert torch.equal(
        pulled.tensors["class_embeddings"], load_pack(pack_file).tensors["class_embeddings"]
    )


def test_card_base_model_and_long_class_lists(pack_file):
    pack = load_pack(pack_file)
    many = [f"class {i}" for i in range(60)]
    hubbed = replace(
        pack, backbone=replace(pack.backbone, weights="hf-hub:timm/vit_tiny"), classnames=many
    )
    card = model_card(hubbed, "org/many")
    assert front_matter(card)["base_model"] == "timm/vit_tiny"
    assert "`class 49`" in card
    assert "`class 50`" not in card
    assert "and 10 more" in card
    assert base_model_id("openai") is None
    assert base_model_id("/models/clip.bin") is None
    assert base_model_id("hf-hub:a/b") == "a/b"


def test_pull_returns_the_pushed_file(hub, pack_file):
    push_pack(pack_file, "org/zs")
    local = pull_pack("org/zs")
    assert local.read_bytes() == pack_file.read_bytes()
    assert hub.calls[-1][1]["filename"] == PACK_FILENAME


def test_load_pack_from_hub_round_trip(hub, pack_file, classifier, photos_dir):
    push_pack(pack_file, "org/zs")
    pack = load_pack("hf-hub:org/zs")
    original = load_pack(pack_file)
    assert pack.method == original.method
    assert pack.classnames == original.classnames
    assert set(pack.tensors) == set(original.tensors)
    for key, tensor in original.tensors.items():
        assert pack.tensors[key].numpy().tobytes() == tensor.numpy().tobytes()
    as_path = load_pack(Path("hf-hub:org/zs"))  # the server's --pack NAME=PATH is a Path
    assert torch.equal(as_path.tensors["class_embeddings"], pack.tensors["class_embeddings"])
    rebuilt = build_from_pack(pack)  # its own backbone: clip:tiny with weights 'none'
    images = sorted(photos_dir.glob("*.png"))
    pixels = torch.stack([classifier.backbone.transform(load_image(p)) for p in images])
    assert torch.equal(rebuilt.predict_proba(pixels), classifier.predict_proba(pixels))


def test_revision_is_passed_through(hub, pack_file, tiny_clip, tmp_path):
    push_pack(pack_file, "org/zs")
    hub.tag("org/zs", "v1")
    other = save_pack(ZeroShotClassifier(tiny_clip, ["car", "bus", "train"]), tmp_path / "b.st")
    push_pack(other, "org/zs")
    assert load_pack("hf-hub:org/zs@v1").classnames == CLASSES
    assert hub.calls[-1][1]["revision"] == "v1"
    assert load_pack("hf-hub:org/zs").classnames == ["car", "bus", "train"]
    assert hub.calls[-1][1]["revision"] is None
    assert pull_pack("org/zs", revision="v1").read_bytes() == pack_file.read_bytes()
    assert parse_hub_spec("hf-hub:org/zs@refs/pr/1") == ("org/zs", "refs/pr/1")
    with pytest.raises(PackError, match="no revision 'v9'") as exc:
        load_pack("hf-hub:org/zs@v9")
    one_line(exc)


@pytest.mark.parametrize(
    "spec", ["hf-hub:a/b/c", "hf-hub:org/re po", "hf-hub:org/a--b", "hf-hub:", "hf-hub:org/x@"]
)
def test_invalid_hub_specs_are_one_line_pack_errors(hub, spec):
    with pytest.raises(PackError) as exc:
        load_pack(spec)
    assert spec.removeprefix("hf-hub:").rstrip("@") in one_line(exc)
    assert not hub.calls


@pytest.mark.parametrize("repo_id", ["a/b/c", "org/re po", "-org/x", "x.git", ""])
def test_invalid_repo_ids_refused_before_any_call(hub, pack_file, repo_id):
    with pytest.raises(ConfigError) as exc:
        push_pack(pack_file, repo_id)
    one_line(exc)
    with pytest.raises(ConfigError):
        pull_pack(repo_id)
    assert not hub.calls


def test_missing_repo_and_repo_without_pack(hub, pack_file):
    with pytest.raises(PackError, match="no such repository") as exc:
        load_pack("hf-hub:org/nothing")
    one_line(exc)
    hub.create_repo(HfApi(), "org/empty")
    (hub.folder("org/empty") / "README.md").write_text("# not a pack\n")
    with pytest.raises(PackError, match=f"has no {PACK_FILENAME}") as exc:
        pull_pack("org/empty")
    one_line(exc)


def test_hub_file_is_read_strictly_never_unpickled(hub, tmp_path):
    hub.create_repo(HfApi(), "org/pickled")
    (hub.folder("org/pickled") / PACK_FILENAME).write_bytes(pickle.dumps({"x": 1}, protocol=4))
    with pytest.raises(PackError, match="never unpickles") as exc:
        load_pack("hf-hub:org/pickled")
    one_line(exc)


def test_push_refuses_a_file_that_is_not_a_pack(hub, tmp_path):
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"\x00" * 32)
    with pytest.raises(PackError):
        push_pack(bogus, "org/bogus")
    assert not hub.calls


def test_offline_with_nothing_cached_says_what_to_do(tmp_path):
    """The real client, cache only: nothing there is a one-line error with the way on."""
    with pytest.raises(PackError, match="not in this machine's Hugging Face cache") as exc:
        pull_pack("org/zs", cache_dir=tmp_path / "cache", local_files_only=True)
    assert "vprompt pack pull org/zs" in one_line(exc)


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def hub_cache(tmp_path, pack_file) -> dict[str, str]:
    """An offline hub cache holding org/zs at main, laid out as hf_hub_download leaves it."""
    cache = tmp_path / "hf-cache"
    sha = hashlib.sha1(pack_file.read_bytes()).hexdigest()
    repo = cache / "models--org--zs"
    (repo / "snapshots" / sha).mkdir(parents=True)
    shutil.copyfile(pack_file, repo / "snapshots" / sha / PACK_FILENAME)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    return {
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
    }


def stderr_line(result) -> str:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_cli_pull_and_predict_offline(run_cli, hub_cache, pack_file, photos_dir, tmp_path):
    out = tmp_path / "pulled.safetensors"
    pulled = run_cli("pack", "pull", "org/zs", "--out", out, env=hub_cache)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.strip() == str(out)
    assert out.read_bytes() == pack_file.read_bytes()

    from_hub = run_cli("predict", "--pack", "hf-hub:org/zs", photos_dir, "--json", env=hub_cache)
    assert from_hub.returncode == 0, from_hub.stderr
    local = run_cli("predict", "--pack", pack_file, photos_dir, "--json", env=hub_cache)
    assert local.returncode == 0, local.stderr
    assert from_hub.json_lines() == local.json_lines()
    assert len(from_hub.json_lines()) == 4

    missing = run_cli("pack", "pull", "org/other", env=hub_cache)
    line = stderr_line(missing)
    assert "HF_HUB_OFFLINE" in line
    assert "vprompt pack pull org/other" in line


def test_cli_push_to_unreachable_hub_is_one_line(run_cli, pack_file, tmp_path):
    result = run_cli(
        "pack",
        "push",
        pack_file,
        "org/zs",
        env={
            "HF_ENDPOINT": "http://127.0.0.1:9",
            "HF_HUB_OFFLINE": "0",
            "HF_HOME": str(tmp_path / "hf-home"),
            "HF_TOKEN": "hf_fake_token_for_tests",
        },
        timeout=120,
    )
    line = stderr_line(result)
    assert "cannot push to hf-hub:org/zs" in line
    assert "cannot be reached" in line


def test_an_unanswering_hub_falls_back_to_the_cache_at_once(monkeypatch, hub_cache, tmp_path):
    """No retries against a hub that does not answer: the probe finds the endpoint closed, the
    cache answers for what it holds, and a missing pack says why in one line."""
    import huggingface_hub.constants as constants

    from vprompt.backbones.downloads import offline_unless_reachable, probe_hub

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: closed
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    assert "127.0.0.1:9 does not answer" in str(probe_hub(timeout=2))
    with offline_unless_reachable(True) as reason:
        assert reason is not None
        assert constants.HF_HUB_OFFLINE is True
    assert constants.HF_HUB_OFFLINE is False  # restored
    with offline_unless_reachable(False) as reason:  # nothing to download: no probe
        assert reason is None
        assert constants.HF_HUB_OFFLINE is False

    cache = Path(hub_cache["HF_HUB_CACHE"])
    found = pull_pack("org/zs", cache_dir=cache)
    assert found.name == PACK_FILENAME
    with pytest.raises(PackError, match=r"127\.0\.0\.1:9 does not answer") as exc:
        pull_pack("org/other", cache_dir=cache)
    assert "vprompt pack pull org/other" in one_line(exc)

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert probe_hub(timeout=2) is None  # behind a proxy only the HTTP client can tell
