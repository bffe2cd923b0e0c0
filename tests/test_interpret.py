"""Reading learned context vectors as their nearest vocabulary words (API and CLI)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vprompt.errors import ConfigError, WeightsError
from vprompt.methods.interpret import nearest_words
from vprompt.methods.registry import METHODS

WORDS = ["photo", "cat", "dog", "shuttle"]


def word_ids(backbone, words):
    ids = [backbone._tokenizer.encode(w) for w in words]
    assert all(len(i) == 1 for i in ids)  # single-token words
    return [i[0] for i in ids]


def test_token_table_and_decoder(tiny_clip) -> None:
    table = tiny_clip.token_embedding_table()
    assert table.shape == (49408, tiny_clip.text_width)
    assert not table.requires_grad
    ids = word_ids(tiny_clip, WORDS)
    torch.testing.assert_close(table[ids], tiny_clip.embed_tokens(torch.tensor([ids]))[0].detach())
    assert [tiny_clip.decode_token(i) for i in ids] == WORDS


def test_context_set_to_word_embeddings_decodes_back_to_the_words(tiny_clip) -> None:
    ids = word_ids(tiny_clip, WORDS)
    ctx = tiny_clip.token_embedding_table()[ids].clone()  # M x W
    found = nearest_words(tiny_clip, ctx, k=3)
    assert [e.position for e in found] == [0, 1, 2, 3]
    assert all(e.group is None for e in found)
    assert [e.nearest[0].word for e in found] == WORDS
    assert [e.nearest[0].token_id for e in found] == ids
    for entry in found:
        assert entry.nearest[0].distance == pytest.approx(0.0, abs=1e-5)
        distances = [w.distance for w in entry.nearest]
        assert distances == sorted(distances)
        assert distances[1] > 0


def test_class_specific_context_is_read_per_class(tiny_clip) -> None:
    ids = word_ids(tiny_clip, WORDS)
    table = tiny_clip.token_embedding_table()
    ctx = torch.stack([table[ids[:2]], table[ids[2:]]]) + 1e-4  # C=2 x M=2 x W, slightly off
    found = nearest_words(tiny_clip, ctx, k=1)
    assert [(e.group, e.position, e.nearest[0].word) for e in found] == [
        (0, 0, "photo"), (0, 1, "cat"), (1, 0, "dog"), (1, 1, "shuttle"),
    ]  # fmt: skip
    assert found[0].to_dict(["a", "b"])["class"] == "a"


def test_bad_contexts_are_clear_errors(tiny_clip) -> None:
    with pytest.raises(ConfigError, match="M x W or G x M x W"):
        nearest_words(tiny_clip, torch.zeros(3), k=1)
    with pytest.raises(ConfigError, match="context width 7 differs"):
        nearest_words(tiny_clip, torch.zeros(2, 7), k=1)
    with pytest.raises(WeightsError, match="no token vocabulary"):
        nearest_words(object(), torch.zeros(2, 7), k=1)


# ---------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def coop_pack(run_cli, tmp_path_factory):
    """A CoOp pack trained for one epoch on a tiny two-colour folder dataset."""
    root = tmp_path_factory.mktemp("interpret")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name, channel in (("blue", 2), ("red", 0)):
            folder = root / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(4):
                img = rng.integers(0, 90, (32, 32, 3), dtype=np.uint8)
                img[..., channel] = 220
                Image.fromarray(img).save(folder / f"{i}.png")
    res = run_cli(
        "train", "--method", "coop", "--model", "clip:tiny", "--weights", "none",
        "--data", f"folder:{root / 'data'}", "--out", root / "run",
        "--set", "optim.epochs=1", "--set", "optim.batch_size=4", "--set", "n_ctx=4",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return root / "run" / "prompt.safetensors"


def test_cli_interpret_lists_nearest_words(run_cli, coop_pack) -> None:
    res = run_cli("interpret", coop_pack, "--top-k", "3", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert (report["method"], report["backbone"], report["ctx_shape"]) == (
        "coop",
        "clip:tiny",
        [4, 64],
    )
    assert [v["position"] for v in report["vectors"]] == [0, 1, 2, 3]
    for vector in report["vectors"]:
        assert len(vector["nearest"]) == 3
        distances = [w["distance"] for w in vector["nearest"]]
        assert distances == sorted(distances)
        assert distances[0] > 0
        assert all(isinstance(w["word"], str) and w["word"] for w in vector["nearest"])
    text = run_cli("interpret", coop_pack, "--top-k", "2")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.strip().splitlines()
    assert "4 shared context vectors" in lines[0]
    assert [line.split(":")[0] for line in lines[1:]] == [f"ctx  {i}" for i in (1, 2, 3, 4)]


def test_cli_interpret_refuses_packs_without_a_context(run_cli, tiny_clip, tmp_path) -> None:
    from vprompt.engine.pack import save_pack
    from vprompt.methods.zeroshot import ZeroShotClassifier

    pack = save_pack(ZeroShotClassifier(tiny_clip, ["cat", "dog"]), tmp_path / "zs.safetensors")
    res = run_cli("interpret", pack)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("vprompt: error: ")
    assert "has no learned text context (no 'ctx' tensor" in lines[0]


@pytest.mark.parametrize(
    "name", [m for m in ("coop", "cocoop", "kgcoop", "prograd") if m in METHODS]
)
def test_phrase_initialised_packs_of_every_text_context_method_read_back(
    name, tiny_clip, tmp_path
) -> None:
    from vprompt.engine.pack import load_pack, save_pack
    from vprompt.methods.config import apply_overrides

    cls = METHODS.get(name)
    method = cls(
        tiny_clip, ["cat", "dog"], apply_overrides(cls.Config(), ["ctx_init=a photo of a"])
    )
    pack = load_pack(save_pack(method, tmp_path / f"{name}.safetensors"))
    found = nearest_words(tiny_clip, pack.tensors["ctx"], k=2)
    assert [e.nearest[0].word for e in found] == ["a", "photo", "of", "a"]
    assert max(e.nearest[0].distance for e in found) < 1e-5
