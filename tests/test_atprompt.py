"""ATPrompt against an independent from-the-paper implementation on the tiny CLIP.

The reference here builds each class prompt the way ATPrompt's PromptLearner does: tokenize
"X … X attr1 X … X attr2 X … X name." whole, keep the embeddings of every real token and
splice the learned blocks into the placeholder positions, then run all 77 tokens through
open_clip's own modules (no truncation, no shared prefix, none of vprompt's text code). The
search's model is the softmax-weighted sum of such prompts' logits.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import pytest
import torch
import torch.nn.functional as F

from conftest import FOLDER_CLASSES
from vprompt import load_backbone
from vprompt.data.folder import load_folder
from vprompt.engine import fit
from vprompt.engine.experiment import Experiment
from vprompt.engine.pack import build_from_pack, load_pack, save_pack
from vprompt.errors import ConfigError, PackError
from vprompt.methods.atprompt import (
    ATPrompt,
    ATPromptConfig,
    AttributeSearch,
    attribute_groups,
    search_attributes,
)
from vprompt.methods.config import OptimConfig, apply_overrides

NAMES = ["cat", "golden retriever", "the space shuttle", "moth"]
WIDTH = 64  # clip:tiny's text width


# ---------------------------------------------------------------------------- the reference
def reference_text_features(
    backbone,
    names: Sequence[str],
    words: Sequence[str],
    blocks: Sequence[torch.Tensor],
    ctx: torch.Tensor,
) -> torch.Tensor:
    """C x E unit features of ``[SOS] blocks[0] words[0] … ctx NAME . [EOT]`` over 77 tokens."""
    model, tokenizer = backbone.model, backbone._tokenizer
    x_id = tokenizer.encode("X")[0]
    segments = [" ".join(["X"] * b.shape[0]) + f" {w}" for b, w in zip(blocks, words, strict=True)]
    text = " ".join([*segments, " ".join(["X"] * ctx.shape[0])])
    tokens = tokenizer([f"{text} {n}." for n in names])
    emb = model.token_embedding(tokens)
    c = len(names)
    pieces, pos = [emb[:, :1]], 1
    for block, word in zip(blocks, words, strict=True):
        assert bool((tokens[:, pos : pos + block.shape[0]] == x_id).all())
        pieces.append(block.unsqueeze(0).expand(c, -1, -1))
        pos += block.shape[0]
        k = len(tokenizer.encode(word))
        pieces.append(emb[:, pos : pos + k])
        pos += k
    assert bool((tokens[:, pos : pos + ctx.shape[0]] == x_id).all())
    pieces += [ctx.unsqueeze(0).expand(c, -1, -1), emb[:, pos + ctx.shape[0] :]]
    x = torch.cat(pieces, dim=1) + model.positional_embedding
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    x = x[torch.arange(c), tokens.argmax(dim=-1)] @ model.text_projection
    return F.normalize(x, dim=-1)


def reference_logits(backbone, features, names, words, blocks, ctx) -> torch.Tensor:
    text = reference_text_features(backbone, names, words, blocks, ctx)
    return backbone.model.logit_scale.exp() * features @ text.T


def image_features(backbone, images: torch.Tensor) -> torch.Tensor:
    return F.normalize(backbone.model.encode_image(images), dim=-1)


def perturb(param: torch.Tensor, seed: int, std: float = 0.3) -> None:
    with torch.no_grad():
        param.normal_(std=std, generator=torch.Generator().manual_seed(seed))


class Data:
    """A MethodData over given features: the training set, and a validation set if any."""

    def __init__(self, x, y, xv=None, yv=None, batch: int = 4) -> None:
        self.x, self.y, self.xv, self.yv, self.batch = x, y, xv, yv, batch

    @property
    def views(self) -> int:
        return 0

    @property
    def has_val(self) -> bool:
        return self.xv is not None

    def train(self, view: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        assert view is None
        for i in range(0, len(self.y), self.batch):
            yield self.x[i : i + self.batch], self.y[i : i + self.batch]

    def val(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.yv), self.batch):
            yield self.xv[i : i + self.batch], self.yv[i : i + self.batch]


# ---------------------------------------------------------------------------- the prompt
@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"attributes": ("color", "shape")}, ["color", "shape"]),
        ({"attributes": ("playfulness",), "n_ctx": 3, "n_attr_ctx": 1}, ["playfulness"]),
        (
            {"attributes": ("color", "habitat", "growth"), "n_attr_ctx": 4, "class_chunk": 3},
            ["color", "habitat", "growth"],
        ),
    ],
)
def test_logits_loss_and_gradients_equal_the_reference(tiny_clip, config, words) -> None:
    method = ATPrompt(tiny_clip, NAMES, ATPromptConfig(**config)).train()
    perturb(method.ctx, 1)
    perturb(method.attr_ctx, 2)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 3, 1])
    logits = method(images).logits
    loss = F.cross_entropy(logits, labels)
    ours = torch.autograd.grad(loss, [method.ctx, method.attr_ctx])

    ctx = method.ctx.detach().clone().requires_grad_(True)
    attr = method.attr_ctx.detach().clone().requires_grad_(True)
    feats = image_features(tiny_clip, images)
    ref = reference_logits(tiny_clip, feats, NAMES, words, list(attr.unbind(0)), ctx)
    ref_loss = F.cross_entropy(ref, labels)
    want = torch.autograd.grad(ref_loss, [ctx, attr])
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    for got, grad in zip(ours, want, strict=True):
        assert float(grad.abs().max()) > 0
        torch.testing.assert_close(got, grad, atol=1e-5 * float(grad.abs().max()), rtol=1e-3)
    with torch.no_grad():  # eval: the cached class features give the same scores
        torch.testing.assert_close(method.eval()(images).logits, ref, atol=1e-5, rtol=1e-5)


def test_prompt_layout_token_by_token(tiny_clip) -> None:
    config = ATPromptConfig(attributes=("color", "playfulness"), n_ctx=3, n_attr_ctx=2)
    method = ATPrompt(tiny_clip, ["cat", "golden retriever"], config)
    perturb(method.ctx, 4)
    perturb(method.attr_ctx, 5)
    rows = method.assembler(method.context()).detach()

    def embed(text: str) -> torch.Tensor:  # the text's tokens between SOS and EOT
        tokens = tiny_clip.tokenize([text])
        return tiny_clip.embed_tokens(tokens)[0, 1 : int(tiny_clip.eot_index(tokens)[0])]

    full = tiny_clip.embed_tokens(tiny_clip.tokenize(["x"]))[0]
    sos, eot = full[0], full[2]
    a, v = method.attr_ctx.detach(), method.ctx.detach()
    assert embed("playfulness").shape[0] == 2  # two tokens: both stay in the prompt
    for i, name in enumerate(["cat", "golden retriever"]):
        parts = [a[0], embed("color"), a[1], embed("playfulness"), v, embed(name + ".")]
        expected = torch.cat([sos[None], *parts, eot[None]])
        n = expected.shape[0]
        assert torch.equal(rows[i, :n], expected.float())
        assert int(method.assembler.eot_positions()[i]) == n - 1
    # What precedes the class name is the same in every prompt (run once by the encoder).
    assert method.assembler.shared_prefix_len == 1 + 2 + 1 + 2 + 2 + 3
    assert method.attributes == ("color", "playfulness")
    assert set(method.prompt_state()) == {"ctx", "attr_ctx"}


def test_initialisation_as_the_reference_prompt_learner(tiny_clip) -> None:
    config = ATPromptConfig(attributes=("color", "shape", "size"), n_ctx=3, n_attr_ctx=2)
    torch.manual_seed(5)
    method = ATPrompt(tiny_clip, NAMES, config)
    torch.manual_seed(5)  # class context N(0, 0.02²), then each attribute block N(0, 0.01²)
    ctx = torch.empty(3, WIDTH).normal_(std=0.02)
    blocks = [torch.empty(2, WIDTH).normal_(std=0.01) for _ in range(3)]
    assert torch.equal(method.ctx.detach(), ctx)
    assert torch.equal(method.attr_ctx.detach(), torch.stack(blocks))
    # Optional CoOp-style phrase initialisation: the phrase's word count sets n_ctx.
    phrase = ATPrompt(tiny_clip, NAMES, ATPromptConfig(ctx_init="a photo of a", n_ctx=2))
    assert phrase.config.n_ctx == 4
    tokens = tiny_clip.tokenize(["a photo of a"])
    assert torch.equal(phrase.ctx.detach(), tiny_clip.embed_tokens(tokens)[0, 1:5])


def test_defaults_are_the_reference_base_to_novel_setting() -> None:
    c = ATPromptConfig()
    assert (c.attributes, c.n_ctx, c.n_attr_ctx, c.ctx_init) == (("color", "shape"), 2, 2, "")
    assert c.candidates == ("color", "size", "shape", "habitat", "behavior")  # ImageNet's
    assert (c.init_std, c.attr_init_std) == (0.02, 0.01)
    o = c.optim
    sgd = ("sgd", 0.002, 0.9, 5e-4, 32, 100)
    assert (o.optimizer, o.lr, o.momentum, o.weight_decay, o.batch_size, o.epochs) == sgd
    warmup = (1, "constant", 1e-5, "epoch")
    assert (o.warmup_epochs, o.warmup_type, o.warmup_lr, o.step_unit) == warmup
    assert (c.search_epochs, c.search_n_ctx, c.search_max_group, c.search_lr) == (40, 4, None, 0.02)
    flowers, notes = Experiment("atprompt").config(dataset="oxford_flowers")
    assert flowers.attributes == ("color", "habitat", "growth")
    assert flowers.candidates == ("color", "flower", "habitat", "growth", "season")
    assert any("oxford_flowers" in note for note in notes)
    sketch, _ = Experiment("atprompt").config(dataset="imagenet_sketch")
    assert sketch.attributes == ("color", "shape")
    pets = Experiment("atprompt", overrides=("attributes=[]",)).config(dataset="oxford_pets")[0]
    assert pets.searches
    assert "playfulness" in pets.candidates


def test_eval_text_features_are_computed_once_per_prompt_value(tiny_clip) -> None:
    method = ATPrompt(tiny_clip, NAMES).eval()
    with torch.no_grad():
        first = method.text_features()
        assert method.text_features() is first
        method.attr_ctx.add_(0.5)  # a new attribute block invalidates the cache
        second = method.text_features()
        assert not torch.allclose(first, second)
        method.ctx.data = method.ctx.data + 0.5  # so does a new storage
        assert not torch.allclose(method.text_features(), second)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"attributes": "color"}, "attributes must be a list of words"),
        ({"attributes": (), "candidates": ()}, "needs attribute words"),
        ({"attributes": ("color", "Color")}, "holds a word twice"),
        ({"attributes": (" color",)}, "without surrounding spaces"),
        ({"attributes": ("",)}, "non-empty word"),
        ({"attributes": tuple(f"w{i}" for i in range(9))}, "at most 8 words"),
        ({"candidates": ("a", 3)}, "non-empty word"),
        ({"n_ctx": 0}, "n_ctx must be an integer from 1 to 75"),
        ({"n_ctx": 10**9}, "n_ctx must be an integer"),
        ({"n_attr_ctx": -1}, "n_attr_ctx must be an integer"),
        ({"n_ctx": True}, "n_ctx must be an integer"),
        ({"feature_views": 0}, "feature_views"),
        ({"feature_views": 10**9}, "feature_views"),
        ({"class_chunk": 0}, "class_chunk"),
        ({"search_epochs": 0}, "search_epochs"),
        ({"search_n_ctx": 10**9}, "search_n_ctx"),
        ({"search_max_group": 0}, "search_max_group"),
        ({"search_max_group": 9}, "search_max_group"),
        ({"search_lr": 0.0}, "search_lr"),
        ({"init_std": float("nan")}, "init_std"),
        ({"attr_init_std": -0.01}, "attr_init_std"),
        ({"augment": "yes"}, "augment"),
        ({"ctx_init": None}, "ctx_init"),
    ],
)
def test_bad_settings_are_refused(values, message) -> None:
    with pytest.raises(ConfigError, match=message):
        ATPromptConfig(**values)


def test_settings_that_cannot_run_are_refused(tiny_clip) -> None:
    long = ATPromptConfig(attributes=("color", "shape", "size"), n_attr_ctx=25)
    with pytest.raises(ConfigError, match="more than clip:tiny's text context"):
        ATPrompt(tiny_clip, NAMES, long)
    classifier = load_backbone("torchvision:tiny", "none")
    with pytest.raises(ConfigError, match="CLIP-like"):
        ATPrompt(classifier, NAMES)  # type: ignore[arg-type]
    # --set attributes=[] reads the candidates; a list given as a string is refused.
    with pytest.raises(ConfigError, match="list of words"):
        apply_overrides(ATPromptConfig(), ["attributes=color"])
    assert apply_overrides(ATPromptConfig(), ["attributes=[luxury]"]).attributes == ("luxury",)
    fixed = ATPrompt(tiny_clip, NAMES, ATPromptConfig(n_ctx=3))
    with pytest.raises(PackError, match="shape"):
        ATPrompt(tiny_clip, NAMES).load_prompt_state(fixed.prompt_state())


def test_pack_round_trip_and_retarget(tiny_clip, tmp_path) -> None:
    config = ATPromptConfig(attributes=("luxury",), n_ctx=2, n_attr_ctx=3)
    method = ATPrompt(tiny_clip, NAMES, config)
    perturb(method.ctx, 6)
    perturb(method.attr_ctx, 7)
    pack = load_pack(save_pack(method, tmp_path / "atprompt.safetensors"))
    assert set(pack.tensors) == {"ctx", "attr_ctx"}
    assert pack.config["attributes"] == ["luxury"]
    restored = build_from_pack(pack, backbone=tiny_clip).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(restored(images).logits, method.eval()(images).logits)
    moved = method.retarget(["bee", "kite"])
    assert moved.classnames == ["bee", "kite"]
    assert moved.attributes == ("luxury",)
    feats = image_features(tiny_clip, images)
    with torch.no_grad():
        expected = reference_logits(
            tiny_clip, feats, ["bee", "kite"], ["luxury"], [method.attr_ctx[0]], method.ctx
        )
        torch.testing.assert_close(moved(images).logits, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- the search
CANDIDATES = ("red", "round", "wooden")


def test_groups_are_every_combination_smallest_first() -> None:
    groups = attribute_groups(5)
    assert len(groups) == 31  # 2^5 - 1, as the paper enumerates
    assert groups[:5] == [(0,), (1,), (2,), (3,), (4,)]
    assert groups[5:7] == [(0, 1), (0, 2)]
    assert groups[-1] == (0, 1, 2, 3, 4)
    assert len(attribute_groups(5, max_group=2)) == 15
    assert attribute_groups(2, max_group=8) == [(0,), (1,), (0, 1)]


def test_search_model_is_the_weighted_sum_of_the_group_prompts(tiny_clip) -> None:
    torch.manual_seed(9)
    model = AttributeSearch(tiny_clip, NAMES, CANDIDATES, n_ctx=2)
    torch.manual_seed(9)  # weights U(0, 1) first, then each group's context and blocks
    assert torch.equal(model.alpha.detach(), torch.rand(7))
    ctx0 = torch.empty(2, WIDTH).normal_(std=0.02)
    assert torch.equal(model.ctx[0].detach(), ctx0)
    assert torch.equal(model.attr_ctx[0].detach(), torch.empty(1, 2, WIDTH).normal_(std=0.01))
    for g in range(7):
        perturb(model.ctx[g], 10 + g)
        perturb(model.attr_ctx[g], 20 + g)
    perturb(model.alpha, 30, std=1.0)
    feats = F.normalize(torch.randn(3, tiny_clip.embed_dim, generator=torch.Generator()), dim=-1)
    labels = torch.tensor([1, 0, 3])
    loss = F.cross_entropy(model(feats), labels)
    grads = torch.autograd.grad(loss, [model.alpha, model.attr_ctx[6]])

    alpha = model.alpha.detach().clone().requires_grad_(True)
    last = model.attr_ctx[6].detach().clone().requires_grad_(True)
    weights = alpha.softmax(0)
    ref = 0
    for g, group in enumerate(model.groups):
        blocks = list((last if g == 6 else model.attr_ctx[g].detach()).unbind(0))
        words = [CANDIDATES[i] for i in group]
        ref = ref + weights[g] * reference_logits(
            tiny_clip, feats, NAMES, words, blocks, model.ctx[g].detach()
        )
    ref_loss = F.cross_entropy(ref, labels)
    want = torch.autograd.grad(ref_loss, [alpha, last])
    assert model.groups[6] == (0, 1, 2)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
    for got, grad in zip(grads, want, strict=True):
        torch.testing.assert_close(got, grad, atol=1e-5 * float(grad.abs().max()), rtol=1e-3)


def _group_images(backbone, group: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Image features that are the class text features of ``group``'s prompt with zero learned
    vectors: the prompt anchored by exactly those words classifies them best."""
    zero = torch.zeros(1, WIDTH)
    words = [CANDIDATES[i] for i in group]
    with torch.no_grad():
        text = reference_text_features(backbone, NAMES, words, [zero] * len(words), zero)
    labels = torch.arange(len(NAMES)).repeat(2)
    return text[labels], labels


def _search_config(**values) -> ATPromptConfig:
    """Learned vectors that start (and, at this learning rate, stay) near zero."""
    settings = {
        "attributes": (),
        "candidates": CANDIDATES,
        "search_epochs": 10,
        "search_n_ctx": 1,
        "search_lr": 0.2,
        "init_std": 1e-8,
        "attr_init_std": 1e-8,
        "optim": OptimConfig(lr=1e-8, epochs=1, batch_size=4),
    }
    return ATPromptConfig(**{**settings, **values})


@pytest.mark.parametrize("target", [(0,), (2,), (1, 2), (0, 1, 2)])
def test_search_picks_the_group_that_classifies_the_held_out_data(tiny_clip, target) -> None:
    x, y = _group_images(tiny_clip, target)
    torch.manual_seed(0)
    model = search_attributes(tiny_clip, NAMES, CANDIDATES, Data(x, y, x, y), _search_config())
    assert model.best() == target
    weights = model.weights().detach()
    assert float(weights.max()) > 0.5
    torch.manual_seed(0)  # deterministic under the run's seed
    again = search_attributes(tiny_clip, NAMES, CANDIDATES, Data(x, y, x, y), _search_config())
    assert torch.equal(again.weights().detach(), weights)


def test_group_weights_learn_on_validation_data_prompts_on_training_data(tiny_clip) -> None:
    x, y = _group_images(tiny_clip, (0,))
    xv, yv = _group_images(tiny_clip, (1, 2))
    torch.manual_seed(0)
    held_out = search_attributes(tiny_clip, NAMES, CANDIDATES, Data(x, y, xv, yv), _search_config())
    assert held_out.best() == (1, 2)
    torch.manual_seed(0)  # without validation data the weights learn on the training set
    alone = search_attributes(tiny_clip, NAMES, CANDIDATES, Data(x, y), _search_config())
    assert alone.best() == (0,)
    # The prompts themselves train: at a real learning rate the group contexts move.
    torch.manual_seed(0)
    config = _search_config(optim=OptimConfig(lr=0.5, epochs=1, batch_size=4), search_epochs=2)
    moving = search_attributes(tiny_clip, NAMES, CANDIDATES, Data(x, y, xv, yv), config)
    assert float(moving.ctx[0].detach().abs().max()) > 1e-4


def test_setup_fixes_the_searched_attributes_in_the_prompt_state(tiny_clip, tmp_path) -> None:
    config = _search_config(search_max_group=2)
    torch.manual_seed(1)
    method = ATPrompt(tiny_clip, NAMES, config)
    assert method.attributes == CANDIDATES  # before the search every candidate has its slot
    assert set(method.prompt_state()) == {"ctx", "attr_ctx", "selected", "search_scores"}
    assert method.attr_ctx.shape == (3, 2, WIDTH)
    x, y = _group_images(tiny_clip, (0, 2))
    torch.manual_seed(0)
    method.setup(Data(x, y, x, y))
    assert method.attributes == ("red", "wooden")
    assert method.selected.tolist() == [1, 0, 1]
    scores = method.search_scores
    assert scores.shape == (6,)  # groups of at most two
    assert float(scores.sum()) == pytest.approx(1.0)
    assert int(scores.argmax()) == 4  # the group (0, 2)
    # The prompt is anchored by the chosen words, with their candidates' blocks.
    perturb(method.ctx, 11)
    perturb(method.attr_ctx, 12)
    feats = F.normalize(torch.randn(2, tiny_clip.embed_dim), dim=-1)
    blocks = [method.attr_ctx[0], method.attr_ctx[2]]
    with torch.no_grad():
        expected = reference_logits(tiny_clip, feats, NAMES, ["red", "wooden"], blocks, method.ctx)
        torch.testing.assert_close(
            method.forward_features(feats).logits, expected, atol=1e-5, rtol=1e-5
        )
    # Packs keep the choice (the config still asks for a search), and so do retargets.
    pack = load_pack(save_pack(method, tmp_path / "searched.safetensors"))
    assert pack.config["attributes"] == []
    assert pack.tensors["selected"].tolist() == [1, 0, 1]
    restored = build_from_pack(pack, backbone=tiny_clip).eval()
    assert restored.attributes == ("red", "wooden")
    with torch.no_grad():
        torch.testing.assert_close(
            restored.forward_features(feats).logits, expected, atol=1e-5, rtol=1e-5
        )
    assert method.retarget(["bee"]).attributes == ("red", "wooden")


def test_a_stored_choice_must_be_a_group_the_search_could_make(tiny_clip) -> None:
    method = ATPrompt(tiny_clip, NAMES, _search_config(search_max_group=2))
    state = method.prompt_state()
    for bad in ([0, 0, 0], [1, 2, 0], [1, 1, 1]):
        with pytest.raises(PackError, match="'selected'"):
            method.load_prompt_state({**state, "selected": torch.tensor(bad)})
    assert method.attributes == CANDIDATES  # nothing was loaded


def test_a_resumed_run_keeps_the_searched_attributes(tiny_clip, tiny_folder, tmp_path) -> None:
    data = load_folder(tiny_folder)
    names = list(data.train.classnames)
    config = apply_overrides(
        ATPromptConfig(),
        [
            "attributes=[]",
            "candidates=[red, green]",
            "search_epochs=1",
            "search_n_ctx=1",
            "optim.epochs=1",
            "optim.batch_size=4",
        ],
    )
    torch.manual_seed(0)
    method = ATPrompt(tiny_clip, names, config)
    fit(method, data.train, val=data.val, out_dir=tmp_path / "run", progress=False)
    assert method.selected.sum() >= 1
    fresh = ATPrompt(tiny_clip, names, config)
    assert fresh.attributes == ("red", "green")
    fit(fresh, data.train, val=data.val, out_dir=tmp_path / "run", progress=False)  # finished
    assert fresh.attributes == method.attributes
    assert torch.equal(fresh.search_scores, method.search_scores)


def test_train_with_the_search_and_predict_through_the_cli(tiny_folder, run_cli, tmp_path) -> None:
    out = tmp_path / "atprompt"
    res = run_cli("train", "--method", "atprompt", "--model", "clip:tiny", "--weights", "none",
                  "--data", f"folder:{tiny_folder}", "--out", out, "--set", "attributes=[]",
                  "--set", "candidates=[red, green, blue]", "--set", "search_epochs=1",
                  "--set", "search_n_ctx=1", "--set", "optim.epochs=1", "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["test_images"] == 6
    pack = load_pack(out / "prompt.safetensors")
    assert pack.method == "atprompt"
    assert set(pack.tensors) == {"ctx", "attr_ctx", "selected", "search_scores"}
    assert pack.tensors["attr_ctx"].shape == (3, 2, WIDTH)
    assert pack.tensors["search_scores"].shape == (7,)
    chosen = pack.tensors["selected"].tolist()
    assert set(chosen) <= {0, 1}
    assert sum(chosen) >= 1
    assert int(pack.tensors["search_scores"].argmax()) == attribute_groups(3).index(
        tuple(i for i, flag in enumerate(chosen) if flag)
    )
    image = next((tiny_folder / "test" / "red_thing").glob("*.png"))
    pred = run_cli("predict", "--pack", out / "prompt.safetensors", image, "--json")
    assert pred.returncode == 0, pred.stderr
    labels = [p["label"] for p in json.loads(pred.stdout)["predictions"]]
    assert sorted(labels) == sorted(FOLDER_CLASSES)
