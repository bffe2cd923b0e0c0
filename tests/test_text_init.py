"""How the CoOp family's contexts start, against the reference PromptLearners (tiny CLIP).

The references below follow KaiyangZhou/CoOp ``trainers/coop.py`` (``ctx_init``: the *word*
count sets M, the phrase's extra sub-word tokens stay frozen after the context; class-specific
contexts only without an init; random init ``nn.init.normal_`` from the run's seeded
generator) and BeierZhu/Prompt-align ``trainers/prograd.py`` (the context initialised from
the dataset template's words, right-aligned after zeros). They use none of vprompt's text code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vprompt.engine.experiment import Experiment
from vprompt.engine.pack import load_pack
from vprompt.errors import ConfigError
from vprompt.methods.cocoop import CoCoOp, CoCoOpConfig
from vprompt.methods.coop import CoOp, CoOpConfig
from vprompt.methods.kgcoop import KgCoOp, KgCoOpConfig
from vprompt.methods.prograd import ProGrad, ProGradConfig

NAMES = ["cat", "golden retriever", "moth"]


def reference_prompts(backbone, ctx: torch.Tensor, prompt_prefix: str, names, n_ctx: int):
    """CoOp's PromptLearner with ``prompt_prefix`` at the context positions: C x 77 x W
    embeddings (SOS, ctx, then the tokens after position 1 + n_ctx) and the token ids."""
    model = backbone.model
    tokens = backbone._tokenizer([f"{prompt_prefix} {n}." for n in names])
    with torch.no_grad():
        emb = model.token_embedding(tokens)
    c = len(names)
    ctx = ctx if ctx.dim() == 3 else ctx.unsqueeze(0).expand(c, -1, -1)
    return torch.cat([emb[:, :1], ctx, emb[:, 1 + n_ctx :]], dim=1), tokens


def reference_features(backbone, prompts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    model = backbone.model
    x = prompts + model.positional_embedding
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection
    return F.normalize(x, dim=-1)


@pytest.mark.parametrize("method_cls", [CoOp, ProGrad])
def test_a_context_longer_than_the_text_tower_is_refused_before_allocation(
    tiny_clip, method_cls
) -> None:
    """The reference's clip.tokenize raises on a prompt past 77 tokens; the open_clip
    tokenizer would cut it silently (dropping the class name and the end token)."""
    config = method_cls.Config(n_ctx=10**9)
    with pytest.raises(ConfigError, match="does not fit clip:tiny's text context of 77"):
        method_cls(tiny_clip, NAMES, config)
    with pytest.raises(ConfigError, match="'golden retriever' needs 78 tokens"):
        method_cls(tiny_clip, NAMES, method_cls.Config(n_ctx=73))
    assert method_cls(tiny_clip, NAMES, method_cls.Config(n_ctx=72)).ctx.shape[-2] == 72


# ---------------------------------------------------------------------------- item 3
@pytest.mark.parametrize("method_cls", [CoOp, KgCoOp])
def test_ctx_init_counts_words_and_keeps_extra_tokens_frozen(tiny_clip, method_cls) -> None:
    phrase = "a close-up photo of the"  # 5 words, 7 tokens ("close", "-", "up")
    config_cls = CoOpConfig if method_cls is CoOp else KgCoOpConfig
    method = method_cls(tiny_clip, NAMES, config_cls(ctx_init=phrase))
    assert method.config.n_ctx == 5
    with torch.no_grad():
        embedded = tiny_clip.model.token_embedding(tiny_clip._tokenizer([phrase]))[0]
    torch.testing.assert_close(method.ctx.detach(), embedded[1:6])
    prompts, tokens = reference_prompts(tiny_clip, method.ctx.detach(), phrase, NAMES, 5)
    with torch.no_grad():
        expected = reference_features(tiny_clip, prompts, tokens)
        torch.testing.assert_close(method.eval().text_features(), expected, atol=1e-5, rtol=1e-5)


def test_cocoop_ctx_init_counts_words(tiny_clip) -> None:
    phrase = "a close-up photo"  # 3 words, 5 tokens: the context holds "a close -"
    method = CoCoOp(tiny_clip, NAMES, CoCoOpConfig(ctx_init=phrase))
    assert method.config.n_ctx == 3
    with torch.no_grad():
        embedded = tiny_clip.model.token_embedding(tiny_clip._tokenizer([phrase]))[0]
    torch.testing.assert_close(method.ctx.detach(), embedded[1:4])
    for row in method.assembler.token_suffix:  # "up photo" stay frozen before every name
        torch.testing.assert_close(row[:2], embedded[4:6])


# ---------------------------------------------------------------------------- item 4
def test_class_specific_with_an_init_is_one_shared_context(tiny_clip) -> None:
    method = CoOp(tiny_clip, NAMES, CoOpConfig(ctx_init="a photo of a", class_specific=True))
    assert method.ctx.shape == (4, tiny_clip.text_width)
    assert method.config.class_specific is False  # what the pack records
    random = CoOp(tiny_clip, NAMES, CoOpConfig(n_ctx=2, class_specific=True))
    assert random.ctx.shape == (len(NAMES), 2, tiny_clip.text_width)


# ---------------------------------------------------------------------------- item 2
def test_prograd_initialises_from_the_template_words_like_its_reference(tiny_clip) -> None:
    template = "a type of pet, a photo of a {}."  # ProGrad's OxfordPets template
    method = ProGrad(tiny_clip, NAMES, ProGradConfig(n_ctx=16, template=template))
    init = "a type of pet, a photo of a"  # template.replace(" {}.", "")
    words = len(init.split(" "))  # 8 words ("pet," is one), 9 tokens
    with torch.no_grad():
        embedded = tiny_clip.model.token_embedding(tiny_clip._tokenizer([init]))[0]
    expected_ctx = torch.zeros(16, tiny_clip.text_width)
    expected_ctx[16 - words :] = embedded[1 : 1 + words]
    torch.testing.assert_close(method.ctx.detach(), expected_ctx)
    prefix = " ".join(["X"] * (16 - words)) + " " + init
    prompts, tokens = reference_prompts(tiny_clip, method.ctx.detach(), prefix, NAMES, 16)
    with torch.no_grad():
        ref = reference_features(tiny_clip, prompts, tokens)
        torch.testing.assert_close(method.eval().text_features(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("method", "dataset", "template"),
    [
        ("prograd", "oxford_pets", "a type of pet, a photo of a {}."),
        ("prograd", "oxford_flowers", "a type of flower, a photo of a {}."),
        ("prograd", "fgvc_aircraft", "a type of aircraft, a photo of a {}."),
        ("prograd", "dtd", "a texture of {}."),
        ("prograd", "food101", "a type of food, a photo of {}."),
        ("prograd", "eurosat", "a centered satellite photo of {}."),
        ("kgcoop", "dtd", "a photo of a {}, a type of texture."),
        ("kgcoop", "oxford_pets", "a photo of a {}, a type of pet."),
        ("coop", "dtd", None),
    ],
)
def test_templates_belong_to_method_and_dataset(method: str, dataset: str, template) -> None:
    from vprompt.data.suite import get_suite

    standard = get_suite(dataset).template
    config, _ = Experiment(method).config(dataset=dataset, template=standard)
    if template is None:
        assert not hasattr(config, "template")
    else:
        assert config.template == template


# ---------------------------------------------------------------------------- item 1
def test_random_inits_follow_the_run_seed(tiny_clip) -> None:
    def build(cls, config, seed: int):
        torch.manual_seed(seed)
        return cls(tiny_clip, NAMES, config)

    for cls, config in (
        (CoOp, CoOpConfig(n_ctx=4)),
        (CoOp, CoOpConfig(n_ctx=2, class_specific=True)),
        (CoCoOp, CoCoOpConfig(ctx_init="", n_ctx=3)),
        (CoCoOp, CoCoOpConfig()),
    ):
        a, b, c = build(cls, config, 1), build(cls, config, 1), build(cls, config, 2)
        for key, value in a.prompt_state().items():
            assert torch.equal(value, b.prompt_state()[key]), (cls.__name__, key)
        assert any(
            not torch.equal(value, c.prompt_state()[key]) for key, value in a.prompt_state().items()
        ), f"{cls.__name__}: seeds 1 and 2 share one init"
    # The reference draws the random context with nn.init.normal_(std=0.02).
    torch.manual_seed(7)
    expected = torch.nn.init.normal_(torch.empty(4, tiny_clip.text_width), std=0.02)
    torch.testing.assert_close(build(CoOp, CoOpConfig(n_ctx=4), 7).ctx.detach(), expected)


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("seeded")
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("test", 2)):
        for c, name in enumerate(NAMES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 90, (36, 36, 3), dtype=np.uint8)
                img[..., c] = 230
                Image.fromarray(img).save(root / split / name / f"{i}.png")
    return root


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("coop", ["--set", "ctx_init="]),
        ("cocoop", ["--set", "ctx_init="]),
        ("linear-probe", []),
    ],
)
def test_same_seed_same_pack_through_the_cli(method, extra, colours, run_cli, tmp_path) -> None:
    """Two uninterrupted runs with one seed give the same pack bit for bit; another seed
    gives another initial prompt."""
    common = ["train", "--method", method, "--model", "clip:tiny", "--weights", "none",
              "--device", "cpu", "--data", f"folder:{colours}", *extra, "--json",
              "--set", "optim.batch_size=4", "--set", "optim.warmup_epochs=0"]  # fmt: skip
    packs = {}
    for label, seed, epochs in (("a", 1, 2), ("b", 1, 2), ("c", 1, 0), ("d", 2, 0)):
        res = run_cli(*common, "--set", f"optim.epochs={epochs}", "--seed", seed,
                      "--out", tmp_path / label)  # fmt: skip
        assert res.returncode == 0, res.stderr
        packs[label] = load_pack(tmp_path / label / "prompt.safetensors").tensors
    for key, value in packs["a"].items():
        assert torch.equal(value, packs["b"][key]), key
    # 0 epochs: the packs hold the initial prompts of seeds 1 and 2.
    assert any(not torch.equal(v, packs["d"][k]) for k, v in packs["c"].items())
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["seed"] == 1


# ---------------------------------------------------------------------------- item 5
@pytest.mark.parametrize(("n", "drop", "steps"), [(10, True, 2), (10, False, 3), (3, True, 1)])
def test_last_partial_batch_follows_dassl(tiny_clip, tmp_path, n, drop, steps) -> None:
    """Dassl drops the last partial batch when at least one full batch exists
    (``drop_last=is_train and len(data) >= batch_size``): the CoOp family's defaults do."""
    import dataclasses

    from vprompt.engine import fit
    from vprompt.methods.coop import coop_optim

    assert coop_optim().drop_last is True
    assert CoOpConfig().optim.drop_last is True

    class Few:
        classnames: ClassVar[list[str]] = list(NAMES)

        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int):
            return Image.fromarray(np.full((32, 32, 3), 40 * i % 255, np.uint8)), i % 3

    optim = dataclasses.replace(coop_optim(epochs=2, batch_size=4), drop_last=drop)
    config = CoOpConfig(n_ctx=2, augment=False, optim=optim)
    result = fit(CoOp(tiny_clip, NAMES, config), Few(), out_dir=tmp_path, progress=False)
    assert [h["step"] for h in result.history] == [steps, 2 * steps]
