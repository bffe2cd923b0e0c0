"""ATPrompt: textual prompts anchored by attribute words (Li et al., ICCV 2025).

CoOp learns one block of context vectors before the class name. ATPrompt puts frozen attribute
words (``color``, ``shape`` …) into the prompt and learns a block of vectors before each of
them, so the class prompt reads::

    [SOS] [A_1]…[A_n] color [A_1]…[A_n] shape [V_1]…[V_m] CLASSNAME . [EOT]

Only the ``[A]`` blocks (one per attribute) and the ``[V]`` block are learned; every other
token is the frozen token embedding of the text. Training is CoOp's cross-entropy. Everything
before the class name is the same for every class, so the text tower runs it once per call
(:func:`~vprompt.methods.text_context.encode_prompts`' shared-prefix path).

The attributes come from the config. With ``attributes=[]`` the method picks them itself in
``setup`` by the reference's differentiable search (:func:`search_attributes`): one prompt of
this form per non-empty group of the ``candidates`` is learned on the training data while
softmax weights over the groups learn on the validation data; the group with the largest weight
after the last epoch anchors the prompt. The choice is prompt state (``selected``, with the
groups' final weights in ``search_scores``), so packs, checkpoints and retargeted prompts keep
it.

Defaults follow zhengli97/ATPrompt: ``scripts/coop/atprompt_base2new_train.sh`` (``NCTX=2`` for
the class context and every attribute block, ``EPO=100``, ``CSC=False``, ``CTP=end``) on
``configs/trainers/CoOp/vit_b16.yaml`` (SGD lr 0.002, batch 32, one constant warm-up epoch at
1e-5, cosine), random initialisation (``trainers/coop_atp.py``: N(0, 0.02²) context, N(0, 0.01²)
attribute blocks; the phrase initialisation there is disabled), the per-dataset attributes of
``train.py`` (``choose_attribute_for_atprompt``) and the search of
``trainers/attributecompute.py`` run by ``scripts/attribute_compute/main.sh`` (4 tokens per
block, 40 epochs, Adam lr 0.02 with betas (0.5, 0.999) on the group weights).

Deliberate differences from the reference code:

- An attribute of several tokens stays whole (``playfulness`` is ``play`` + ``fulness``); the
  reference splices one token per attribute, so on Oxford Pets its prompt keeps ``play`` and
  loses ``fulness`` and ``energy`` (the slices after it shift by one).
- The search enumerates every group up to ``search_max_group`` in a fixed order; the committed
  ``attributecompute.py`` shuffles them and keeps only groups of three or more (``if r>2``),
  although its published results are groups of one to three.
- The group weights step on the validation set batch after batch (on the reshuffled training
  set when there is none); the reference reuses the first validation batch at every step.
- Moved to other classes or datasets, the prompt keeps the attributes it learned with; the
  reference's cross-dataset evaluation swaps in the target dataset's attribute words.
- One shared class context with the class name at the end only (the scripts' ``CSC=False``,
  ``CTP=end``; the reference's other positions are commented out); fp32 prompts under the
  run's autocast instead of fp16.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vprompt.backbones.protocols import ImageTextBackbone
from vprompt.errors import ConfigError, PackError
from vprompt.methods.base import (
    Capabilities,
    MethodData,
    MethodExample,
    MethodOutput,
    PromptMethod,
)
from vprompt.methods.clip_common import (
    CLIP_IMAGE_FEATURES,
    clip_input_transform,
    clip_logits,
    require_image_text,
    unit_image_features,
)
from vprompt.methods.config import OptimConfig, check_int
from vprompt.methods.coop import coop_optim
from vprompt.methods.registry import register_method
from vprompt.methods.text_context import PLACEHOLDER, PromptAssembler, encode_prompts, init_context

MAX_ATTRIBUTES = 8
"""At most this many attributes or search candidates (2⁸ - 1 = 255 groups to search)."""
MAX_TOKENS = 75  # a block can fill at most the text context between SOS and EOT
MAX_EPOCHS = 1000
MAX_VIEWS = 1000
MAX_CLASS_CHUNK = 100_000
ALPHA_BETAS = (0.5, 0.999)  # trainers/attributecompute.py: Adam on the group weights


def _positive(value: object, name: str) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(float(value)) or not float(value) > 0:  # type: ignore[arg-type]
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")


def _words(value: object, name: str) -> tuple[str, ...]:
    """A tuple of distinct, non-empty attribute words (at most ``MAX_ATTRIBUTES``)."""
    if isinstance(value, str) or not isinstance(value, tuple | list):
        raise ConfigError(f"{name} must be a list of words (e.g. [color, shape]), got {value!r}")
    words = tuple(value)
    for word in words:
        if not isinstance(word, str) or not word.strip() or word != word.strip():
            raise ConfigError(
                f"{name}: every attribute must be a non-empty word without surrounding "
                f"spaces, got {word!r}"
            )
    lowered = [w.lower() for w in words]
    if len(set(lowered)) != len(lowered):
        raise ConfigError(f"{name} holds a word twice: {list(words)}")
    if len(words) > MAX_ATTRIBUTES:
        raise ConfigError(f"{name}: at most {MAX_ATTRIBUTES} words, got {len(words)}")
    return words


@dataclass(frozen=True)
class ATPromptConfig:
    """ATPrompt's settings (CoOp+ATPrompt, base-to-novel defaults of the reference).

    Attributes:
        attributes: The attribute words anchoring the prompt, in prompt order (``train.py``
            per dataset; a run on a benchmark dataset takes the reference's, see
            ``reference_settings``; the default is ImageNet's). Empty: search them among
            ``candidates`` in ``setup``.
        candidates: The attribute bases the search picks a group from (the five per dataset
            the reference got from GPT-4o, ``scripts/attribute_compute/main.sh``; the default
            is ImageNet's, whose search gave the default ``attributes``); read only when
            ``attributes`` is empty.
        n_ctx: m, learned tokens before the class name (``NCTX=2``; the ``ctx_init`` phrase's
            word count overrides it).
        n_attr_ctx: n, learned tokens before each attribute word (``N_ATT1..3 = NCTX = 2``).
        ctx_init: Start the class context from this phrase's embeddings, as CoOp does; empty
            (the reference, where the phrase branch is disabled) for N(0, ``init_std``²).
        init_std: Standard deviation of the random class context (0.02).
        attr_init_std: Standard deviation of the random attribute blocks (0.01).
        augment: Random resized crop and flip for training (``vit_b16.yaml``).
        feature_views: With a feature cache and ``augment``, augmented views encoded per
            training image (epoch e trains on view e mod N), as CoOp.
        class_chunk: Classes per text-encoder call, with activation checkpointing; None runs
            all classes at once.
        search_epochs: Epochs of the attribute search (``OPTIM.MAX_EPOCH 40``).
        search_n_ctx: Learned tokens of every block of every searched prompt (``NCTX=4``).
        search_max_group: Largest group searched (None: all sizes, 2^K - 1 groups; the
            reference's ``Attribute_Search.md`` suggests 3 to save time).
        search_lr: Adam learning rate of the group weights (0.02).
        optim: The prompt's optimizer (Dassl's CoOp schedule, batch 32, 100 epochs); the search
            trains its prompts with the same settings over ``search_epochs``.
    """

    attributes: tuple[str, ...] = ("color", "shape")
    candidates: tuple[str, ...] = ("color", "size", "shape", "habitat", "behavior")
    n_ctx: int = 2
    n_attr_ctx: int = 2
    ctx_init: str = ""
    init_std: float = 0.02
    attr_init_std: float = 0.01
    augment: bool = True
    feature_views: int = 10
    class_chunk: int | None = None
    search_epochs: int = 40
    search_n_ctx: int = 4
    search_max_group: int | None = None
    search_lr: float = 0.02
    optim: OptimConfig = field(default_factory=lambda: coop_optim(epochs=100, batch_size=32))

    def __post_init__(self) -> None:
        object.__setattr__(self, "attributes", _words(self.attributes, "attributes"))
        object.__setattr__(self, "candidates", _words(self.candidates, "candidates"))
        if not self.attributes and not self.candidates:
            raise ConfigError(
                "atprompt needs attribute words (attributes=[color, shape]) or, to search "
                "them, candidates=[…] with attributes=[]"
            )
        check_int(self.n_ctx, "n_ctx", 1, MAX_TOKENS)
        check_int(self.n_attr_ctx, "n_attr_ctx", 1, MAX_TOKENS)
        if not isinstance(self.ctx_init, str):
            raise ConfigError(f"ctx_init must be a phrase or empty, got {self.ctx_init!r}")
        _positive(self.init_std, "init_std")
        _positive(self.attr_init_std, "attr_init_std")
        if not isinstance(self.augment, bool):
            raise ConfigError(f"augment must be true or false, got {self.augment!r}")
        check_int(self.feature_views, "feature_views", 1, MAX_VIEWS)
        if self.class_chunk is not None:
            check_int(self.class_chunk, "class_chunk", 1, MAX_CLASS_CHUNK)
        check_int(self.search_epochs, "search_epochs", 1, MAX_EPOCHS)
        check_int(self.search_n_ctx, "search_n_ctx", 1, MAX_TOKENS)
        if self.search_max_group is not None:
            check_int(self.search_max_group, "search_max_group", 1, MAX_ATTRIBUTES)
        _positive(self.search_lr, "search_lr")

    @property
    def searches(self) -> bool:
        """Whether ``setup`` searches the attributes (``attributes`` is empty)."""
        return not self.attributes

    @property
    def words(self) -> tuple[str, ...]:
        """The words the prompt has slots for: the attributes, or the search's candidates."""
        return self.attributes or self.candidates


# ---------------------------------------------------------------------------- the prompt
def anchored_text(words: Sequence[str], n_attr_ctx: int, ctx_text: str) -> str:
    """The text before the class name when the class prompts are tokenized: ``"X X color X X
    shape "`` followed by ``ctx_text`` (the class context's placeholders or init phrase); the
    ``X`` mark the positions of the learned blocks."""
    blocks = [" ".join([PLACEHOLDER] * n_attr_ctx) + f" {word}" for word in words]
    return " ".join([*blocks, ctx_text])


def anchored_context(
    blocks: Sequence[torch.Tensor], words: Sequence[torch.Tensor], ctx: torch.Tensor
) -> torch.Tensor:
    """The M x W token embeddings between SOS and the class name: each learned block followed
    by its attribute word's frozen embeddings, then the class context."""
    parts: list[torch.Tensor] = []
    for block, word in zip(blocks, words, strict=True):
        parts += [block, word.to(block.dtype)]
    parts.append(ctx.to(blocks[0].dtype) if blocks else ctx)
    return torch.cat(parts)


def word_embeddings(backbone: ImageTextBackbone, words: Sequence[str]) -> list[torch.Tensor]:
    """Each word's frozen token embeddings (its tokens between SOS and EOT), float32."""
    tokens = backbone.tokenize(list(words))
    counts = [int(n) - 1 for n in backbone.eot_index(tokens)]
    with torch.no_grad():
        emb = backbone.embed_tokens(tokens).float()
    out = []
    for word, row, n in zip(words, emb, counts, strict=True):
        if n < 1:
            raise ConfigError(f"attribute {word!r} tokenizes to nothing")
        out.append(row[1 : 1 + n].clone())
    return out


def _blocks(n: int, count: int, width: int, std: float) -> list[torch.Tensor]:
    """``count`` blocks of n x W vectors drawn N(0, std²) one after the other (as the
    reference's ``ctx_att1``, ``ctx_att2`` … are)."""
    return [nn.init.normal_(torch.empty(n, width), std=std) for _ in range(count)]


# ---------------------------------------------------------------------------- the search
def attribute_groups(count: int, max_group: int | None = None) -> list[tuple[int, ...]]:
    """Every non-empty group of ``count`` candidates (indices in candidate order), smallest
    groups first, up to ``max_group`` members."""
    top = count if max_group is None else min(max_group, count)
    return [g for r in range(1, top + 1) for g in itertools.combinations(range(count), r)]


class AttributeSearch(nn.Module):
    """The search's model: one anchored prompt per group of candidates, its class scores mixed
    by the softmax of one weight per group (``trainers/attributecompute.py``).

    ``logits = Σ_g softmax(alpha)_g · logit_scale · image @ text_gᵀ``. The weights are drawn
    U(0, 1) first, then, group by group, the class context N(0, ``init_std``²) and one block per
    member N(0, ``attr_init_std``²), all of ``n_ctx`` tokens.
    """

    anchors: torch.Tensor  # the candidates' frozen word embeddings, one after the other
    backbone: ImageTextBackbone

    def __init__(
        self,
        backbone: ImageTextBackbone,
        classnames: Sequence[str],
        candidates: Sequence[str],
        *,
        n_ctx: int,
        max_group: int | None = None,
        init_std: float = 0.02,
        attr_init_std: float = 0.01,
        class_chunk: int | None = None,
    ) -> None:
        super().__init__()
        object.__setattr__(self, "backbone", backbone)  # not a submodule: never moved or trained
        self.chunk = class_chunk
        self.candidates = tuple(candidates)
        self.groups = attribute_groups(len(self.candidates), max_group)
        words = word_embeddings(backbone, self.candidates)
        width = int(backbone.text_width)
        self.alpha = nn.Parameter(torch.rand(len(self.groups)))
        self.ctx = nn.ParameterList()
        self.attr_ctx = nn.ParameterList()
        self.assemblers = nn.ModuleList()
        self.register_buffer("anchors", torch.cat(words), persistent=False)
        self._spans = list(itertools.accumulate([0, *(int(w.shape[0]) for w in words)]))
        placeholders = " ".join([PLACEHOLDER] * n_ctx)
        for group in self.groups:
            self.ctx.append(nn.Parameter(_blocks(n_ctx, 1, width, init_std)[0]))
            self.attr_ctx.append(
                nn.Parameter(torch.stack(_blocks(n_ctx, len(group), width, attr_init_std)))
            )
            members = [self.candidates[i] for i in group]
            fixed = sum(n_ctx + int(words[i].shape[0]) for i in group)
            self.assemblers.append(
                PromptAssembler(
                    backbone,
                    classnames,
                    n_ctx=fixed + n_ctx,
                    prompt_prefix=anchored_text(members, n_ctx, placeholders),
                )
            )

    def weights(self) -> torch.Tensor:
        """G softmax weights of the groups."""
        return F.softmax(self.alpha.float(), dim=0)

    def prompt_parameters(self) -> list[nn.Parameter]:
        return [*self.ctx, *self.attr_ctx]

    def text_features(self, g: int) -> torch.Tensor:
        """C x D unit-norm class text features of group ``g``'s prompt."""
        spans = [(self._spans[i], self._spans[i + 1]) for i in self.groups[g]]
        words = [self.anchors[a:b] for a, b in spans]
        context = anchored_context(list(self.attr_ctx[g].unbind(0)), words, self.ctx[g])
        assembler = self.assemblers[g]
        assert isinstance(assembler, PromptAssembler)
        return encode_prompts(
            self.backbone,
            assembler,
            context,
            chunk=self.chunk,
            checkpointed=self.chunk is not None,
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """B x D unit image features → B x C mixed logits."""
        weights = self.weights()
        logits = features.new_zeros(())
        for g in range(len(self.groups)):
            text = self.text_features(g)
            logits = logits + weights[g] * clip_logits(self.backbone, features, text)
        return logits

    def best(self) -> tuple[int, ...]:
        """The group with the largest weight (candidate indices)."""
        return self.groups[int(self.weights().argmax())]


def _epoch_lr(optim: OptimConfig, epoch: int, epochs: int) -> float:
    """Dassl's epoch-stepped rate: warm-up epochs, then ``lr (1 + cos(π (e - W) / E)) / 2``."""
    warm = math.ceil(optim.warmup_epochs)
    if epoch < warm:
        start = 0.0 if optim.warmup_lr is None else float(optim.warmup_lr)
        if optim.warmup_type == "constant":
            return start
        return start + (optim.lr - start) * epoch / warm
    return 0.5 * optim.lr * (1.0 + math.cos(math.pi * (epoch - warm) / max(epochs, 1)))


def _prompt_optimizer(params: list[nn.Parameter], optim: OptimConfig) -> torch.optim.Optimizer:
    if optim.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay
        )
    kind = torch.optim.Adam if optim.optimizer == "adam" else torch.optim.AdamW
    return kind(
        params, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay
    )


def _gather(batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    xs, ys = zip(*batches, strict=True)
    return torch.cat(xs), torch.cat(ys)


def _batches(n: int, size: int, order: torch.Tensor) -> list[torch.Tensor]:
    """Index batches of ``order``, the last partial one dropped when a full one exists."""
    stop = (n // size) * size if n >= size else n
    return [order[i : min(i + size, stop)] for i in range(0, stop, size)]


def search_attributes(
    backbone: ImageTextBackbone,
    classnames: Sequence[str],
    candidates: Sequence[str],
    data: MethodData,
    config: ATPromptConfig,
) -> AttributeSearch:
    """The reference's differentiable attribute search, on ``data``'s image features.

    Every epoch (the augmented view ``e mod views`` when the run has views) the training
    features are shuffled into batches of ``optim.batch_size``. Each step first trains every
    group's prompt on the training batch (cross-entropy of the mixed logits; ``optim``'s
    optimizer at Dassl's epoch-stepped rate over ``search_epochs``), then the group weights on
    the next validation batch (Adam, ``search_lr``, betas (0.5, 0.999), no weight decay),
    cycling through the validation set (the training set, reshuffled, when there is none).

    Returns:
        The trained search model: ``best()`` is the chosen group, ``weights()`` the scores.
    """
    device = backbone.logit_scale.device
    model = AttributeSearch(
        backbone,
        classnames,
        candidates,
        n_ctx=config.search_n_ctx,
        max_group=config.search_max_group,
        init_std=config.init_std,
        attr_init_std=config.attr_init_std,
        class_chunk=config.class_chunk,
    ).to(device)
    params = model.prompt_parameters()
    prompt_opt = _prompt_optimizer(params, config.optim)
    alpha_opt = torch.optim.Adam(
        [model.alpha], lr=config.search_lr, betas=ALPHA_BETAS, weight_decay=0.0
    )
    size = config.optim.batch_size
    held_out = _gather(data.val()) if data.has_val else None
    queue: list[tuple[torch.Tensor, torch.Tensor]] = []

    def next_val(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The next held-out batch: the validation set in order, over and over (or the
        training set ``x``, ``y`` reshuffled when there is none)."""
        if not queue:
            if held_out is not None:
                x, y = held_out
                order = torch.arange(len(y))
            else:
                order = torch.randperm(len(y))
            order = order.to(y.device)
            queue.extend((x[i], y[i]) for i in order.split(size))
        return queue.pop(0)

    model.train()
    for epoch in range(config.search_epochs):
        lr = _epoch_lr(config.optim, epoch, config.search_epochs)
        for group in prompt_opt.param_groups:
            group["lr"] = lr
        view = epoch % data.views if data.views else None
        x, y = _gather(data.train(view))
        order = torch.randperm(len(y)).to(y.device)
        for idx in _batches(len(y), size, order):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            grads = torch.autograd.grad(loss, params)
            prompt_opt.zero_grad(set_to_none=True)
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            prompt_opt.step()
            xv, yv = next_val(x, y)
            (grad,) = torch.autograd.grad(F.cross_entropy(model(xv), yv), [model.alpha])
            alpha_opt.zero_grad(set_to_none=True)
            model.alpha.grad = grad
            alpha_opt.step()
    return model.eval()


# ---------------------------------------------------------------------------- the method
_BASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # dataset: (searched attributes, train.py; attribute bases, scripts/attribute_compute/main.sh)
    "imagenet": (("color", "shape"), ("color", "size", "shape", "habitat", "behavior")),
    "caltech101": (("shape", "size"), ("shape", "color", "material", "function", "size")),
    "oxford_pets": (
        ("playfulness", "energy"),
        ("loyalty", "affection", "playfulness", "energy", "intelligence"),
    ),
    "stanford_cars": (("luxury",), ("design", "engine", "performance", "luxury", "color")),
    "oxford_flowers": (
        ("color", "habitat", "growth"),
        ("color", "flower", "habitat", "growth", "season"),
    ),
    "food101": (
        ("flavor", "preparation"),
        ("flavor", "texture", "origin", "ingredients", "preparation"),
    ),
    "fgvc_aircraft": (
        ("design", "range"),
        ("design", "capacity", "range", "engines", "liveries"),
    ),
    "sun397": (
        ("function",),
        ("architecture", "environment", "structure", "design", "function"),
    ),
    "dtd": (
        ("pattern", "color", "design"),
        ("pattern", "texture", "color", "design", "structure"),
    ),
    "eurosat": (
        ("habitat",),
        ("habitat", "foliage", "infrastructure", "terrain", "watercourse"),
    ),
    "ucf101": (
        ("precision",),
        ("precision", "coordination", "technique", "strength", "control"),
    ),
}
for _variant in ("imagenet_a", "imagenet_r", "imagenet_sketch", "imagenetv2"):
    _BASES[_variant] = _BASES["imagenet"]  # train.py gives the ImageNet variants its attributes


@register_method("atprompt")
class ATPrompt(PromptMethod):
    """Attribute-anchored prompts: CoOp's cross-entropy on ``[A] attr … [A] attr [V] CLASS.``

    Learned tensors (the pack): ``ctx`` (m x W, the class context) and ``attr_ctx`` (K x n x W,
    the block before each of the K attribute words; in search mode one per candidate, used
    when the candidate is ``selected``). Search mode adds ``selected`` (K, 0/1 per candidate)
    and ``search_scores`` (the groups' final softmax weights, zero before the search).
    """

    Config = ATPromptConfig
    capabilities = Capabilities(inputs="image-features", retargets=True)
    feature_kind = CLIP_IMAGE_FEATURES
    reference_settings: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        name: {"attributes": list(attrs), "candidates": list(bases)}
        for name, (attrs, bases) in _BASES.items()
    }
    state_hint = "(n_ctx, n_attr_ctx and the number of attributes or candidates must match)"
    anchors: torch.Tensor  # (sum of the words' token counts) x W, frozen, rebuilt from the config
    selected: torch.Tensor  # K (search mode)
    search_scores: torch.Tensor  # G (search mode)

    def __init__(
        self,
        backbone: ImageTextBackbone,
        classnames: Sequence[str],
        config: ATPromptConfig | None = None,
    ) -> None:
        super().__init__(backbone, classnames, config)
        clip = require_image_text(backbone, "atprompt")
        cfg: ATPromptConfig = self.config
        names = cfg.words
        embedded = word_embeddings(clip, names)
        self._lens = [int(w.shape[0]) for w in embedded]
        start = init_context(clip, n_ctx=cfg.n_ctx, init=cfg.ctx_init, std=cfg.init_std)
        self.config = dataclasses.replace(cfg, n_ctx=start.n_ctx)
        self._ctx_text = start.prompt_prefix
        width = int(clip.text_width)
        self.ctx = nn.Parameter(start.vectors.float())
        self.attr_ctx = nn.Parameter(
            torch.stack(_blocks(cfg.n_attr_ctx, len(names), width, cfg.attr_init_std))
        )
        self.register_buffer("anchors", torch.cat(embedded), persistent=False)
        if cfg.searches:
            groups = attribute_groups(len(names), cfg.search_max_group)
            self.register_buffer("selected", torch.ones(len(names), dtype=torch.long))
            self.register_buffer("search_scores", torch.zeros(len(groups)))
        self._active: tuple[int, ...] = ()
        self._cache: tuple[tuple[Any, ...], torch.Tensor] | None = None
        self._arrange(tuple(range(len(names))))
        self.to(clip.logit_scale.device)

    @classmethod
    def examples(cls) -> list[MethodExample]:
        return [
            MethodExample("clip:tiny", {"attributes": ["color", "shape"]}),
            MethodExample(
                "clip:tiny",
                {"attributes": ["playfulness"], "n_ctx": 3, "n_attr_ctx": 1, "class_chunk": 2},
            ),
            MethodExample(
                "clip:tiny",
                {
                    "attributes": [],
                    "candidates": ["red", "round", "small"],
                    "search_epochs": 1,
                    "search_n_ctx": 1,
                },
            ),
        ]

    # ------------------------------------------------------------------ the layout
    @property
    def attributes(self) -> tuple[str, ...]:
        """The attribute words in the prompt, in order."""
        return tuple(self.config.words[i] for i in self._active)

    def _arrange(self, active: tuple[int, ...]) -> None:
        """Build the class prompts around the words ``active`` (indices into the slots)."""
        if active == self._active:
            return
        cfg = self.config
        text = anchored_text([cfg.words[i] for i in active], cfg.n_attr_ctx, self._ctx_text)
        fixed = sum(cfg.n_attr_ctx + self._lens[i] for i in active)
        self.assembler = PromptAssembler(
            self.backbone, self.classnames, n_ctx=fixed + cfg.n_ctx, prompt_prefix=text
        ).to(self.ctx.device)
        self._active, self._cache = active, None

    def _word(self, i: int) -> torch.Tensor:
        start = sum(self._lens[:i])
        return self.anchors[start : start + self._lens[i]]

    def context(self) -> torch.Tensor:
        """The M x W embeddings between SOS and the class name (learned blocks, frozen
        attribute words, class context)."""
        blocks = [self.attr_ctx[i] for i in self._active]
        return anchored_context(blocks, [self._word(i) for i in self._active], self.ctx)

    # ------------------------------------------------------------------ forward
    def text_features(self) -> torch.Tensor:
        """C x D unit-norm class text features (computed once per prompt value outside
        training)."""
        if self.training or torch.is_grad_enabled():
            return self._encode()
        params = (self.ctx, self.attr_ctx)
        key = (*((t._version, t.data_ptr(), str(t.device)) for t in params), self._active)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._encode())
        return self._cache[1]

    def _encode(self) -> torch.Tensor:
        chunk = self.config.class_chunk
        return encode_prompts(
            self.backbone, self.assembler, self.context(), chunk=chunk, checkpointed=bool(chunk)
        )

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W pixels → B x D unit-norm image features (frozen)."""
        return unit_image_features(self.backbone, pixels)

    def forward_features(self, features: torch.Tensor) -> MethodOutput:
        """B x D unit-norm image features → B x C logits."""
        return MethodOutput(logits=clip_logits(self.backbone, features, self.text_features()))

    def input_transform(self, train: bool) -> Callable[[Image.Image], torch.Tensor]:
        return clip_input_transform(self.backbone, train and self.config.augment)

    # ------------------------------------------------------------------ the search
    def setup(self, data: MethodData) -> None:
        """Search mode: pick the attribute group (:func:`search_attributes`) and anchor the
        prompt with it; the learned prompt keeps its own initialisation."""
        if not self.config.searches:
            return
        result = search_attributes(
            self.backbone, self.classnames, self.config.candidates, data, self.config
        )
        chosen = set(result.best())
        with torch.no_grad():
            mask = [int(i in chosen) for i in range(len(self.config.candidates))]
            self.selected.copy_(torch.tensor(mask, dtype=torch.long))
            self.search_scores.copy_(result.weights().detach().to(self.search_scores))
        self._arrange(tuple(sorted(chosen)))

    def check_prompt_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if not self.config.searches:
            return
        values = tensors["selected"]
        picked = int((values == 1).sum())
        if not bool(((values == 0) | (values == 1)).all()) or picked == 0:
            raise PackError(
                "atprompt tensor 'selected' must hold 0 or 1 per candidate, with at least one 1"
            )
        top = self.config.search_max_group
        if top is not None and picked > top:
            raise PackError(
                f"atprompt tensor 'selected' picks {picked} candidates, more than "
                f"search_max_group={top}"
            )

    def load_prompt_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Load the prompt and, in search mode, arrange it around the stored choice."""
        super().load_prompt_state(tensors)
        self._cache = None
        if self.config.searches:
            flags = self.selected.tolist()
            self._arrange(tuple(i for i, flag in enumerate(flags) if flag))

    def extra_repr(self) -> str:
        return (
            f"backbone={self.backbone.name}, classes={len(self.classnames)}, "
            f"attributes={list(self.attributes)}, n_ctx={self.config.n_ctx}, "
            f"n_attr_ctx={self.config.n_attr_ctx}"
        )
