"""TPT: test-time prompt tuning (Shu et al., NeurIPS 2022).

For every test image on its own: make N augmented views, score them with the current text
context, keep the ``selection`` fraction with the lowest prediction entropy, take ``steps``
AdamW steps on the context that minimise the entropy of their *averaged* prediction, predict the
original view, then **reset** the context (and the optimizer) for the next image. Nothing is
trained beforehand: the context starts from a phrase (``"a photo of a"``) or from a CoOp-family
pack (``init_pack``). All views of one image go through the image tower as one batch, and the
class prompts through the text tower with the shared-prefix path.

The views (``TPTViews``) are the reference's: the original resized and centre-cropped, plus
``views`` random-resized crops with flips of the original image (bilinear, scale 0.08-1); on
datasets outside the ImageNet family each crop is AugMix-ed (severity 1, width 3, depth 1-3,
the reference's nine operations). They are drawn from a generator seeded by the image's bytes
and the config's ``seed``, so an image gets the same views wherever and with whatever it is
evaluated, and one image's result never depends on another's.

Defaults follow azshue/TPT ``tpt_classification.py`` and ``scripts/test_tpt.sh``: batch of 64
(the original + 63 views), ``selection_p`` 0.1, one step, AdamW lr 5e-3 (torch's default weight
decay 0.01), context from ``a_photo_of_a`` (4 words).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn

from vprompt.errors import ConfigError
from vprompt.methods.base import Capabilities, MethodExample, MethodOutput, PromptMethod
from vprompt.methods.clip_common import require_image_text
from vprompt.methods.config import check_fraction, check_int
from vprompt.methods.registry import register_method
from vprompt.methods.text_context import PromptAssembler, encode_prompts, init_context

MAX_VIEWS = 1024


# ---------------------------------------------------------------------------- AugMix (severity 1)
def _level(gen: torch.Generator) -> float:
    return 0.1 + 0.9 * float(torch.rand((), generator=gen))  # uniform(0.1, severity=1)


def _int_param(level: float, maxval: float) -> int:
    return int(level * maxval / 10)


def _flip(gen: torch.Generator) -> bool:
    return float(torch.rand((), generator=gen)) > 0.5


def _signed(value: float, gen: torch.Generator) -> float:
    return -value if _flip(gen) else value


def _affine(img: Image.Image, coeffs: tuple[float, ...]) -> Image.Image:
    # The reference writes into a 224 x 224 frame, the size of its views; vprompt's views have
    # the backbone's input size, so the frame is the view's own (the same at 224).
    return img.transform(img.size, Image.Transform.AFFINE, coeffs,
                         resample=Image.Resampling.BILINEAR)  # fmt: skip


_AUGMIX_OPS: tuple[Callable[[Image.Image, torch.Generator], Image.Image], ...] = (
    lambda img, g: ImageOps.autocontrast(img),
    lambda img, g: ImageOps.equalize(img),
    lambda img, g: ImageOps.posterize(img, 4 - _int_param(_level(g), 4)),
    lambda img, g: img.rotate(
        _signed(_int_param(_level(g), 30), g), resample=Image.Resampling.BILINEAR
    ),
    lambda img, g: ImageOps.solarize(img, 256 - _int_param(_level(g), 256)),
    lambda img, g: _affine(img, (1, _signed(_level(g) * 0.3 / 10, g), 0, 0, 1, 0)),
    lambda img, g: _affine(img, (1, 0, 0, _signed(_level(g) * 0.3 / 10, g), 1, 0)),
    lambda img, g: _affine(
        img, (1, 0, _signed(_int_param(_level(g), img.size[0] / 3), g), 0, 1, 0)
    ),
    lambda img, g: _affine(
        img, (1, 0, 0, 0, 1, _signed(_int_param(_level(g), img.size[1] / 3), g))
    ),
)
"""The reference's ``augmentations``: autocontrast, equalize, posterize, rotate, solarize,
shear x / y, translate x / y (``data/augmix_ops.py``)."""


def _dirichlet3(gen: torch.Generator) -> torch.Tensor:
    draws = -torch.log(torch.rand(3, generator=gen).clamp_min(1e-12))
    return draws / draws.sum()


# ---------------------------------------------------------------------------- the views
class TPTViews:
    """PIL image → (1 + ``views``) x 3 x H x W: the original (resize + centre crop) and
    ``views`` random-resized crops with flips, AugMix-ed when ``augmix``.

    Args:
        backbone: The CLIP backbone (its preprocessing gives size, mean and std).
        views: Augmented views (63 in the reference).
        augmix: AugMix each view (the reference does outside the ImageNet family).
        seed: Mixed into each image's generator seed.
    """

    def __init__(self, backbone: Any, views: int, augmix: bool, seed: int) -> None:
        from torchvision import transforms as T

        pre = backbone.preprocess
        size = (pre.size, pre.size) if isinstance(pre.size, int) else tuple(pre.size)
        self.size, self.views, self.augmix, self.seed = size, views, augmix, seed
        self.original = backbone.transform
        self.to_tensor = T.Compose([T.ToTensor(), T.Normalize(pre.mean, pre.std)])

    def generator(self, img: Image.Image) -> torch.Generator:
        """A generator seeded by the image's pixels and ``seed``."""
        digest = hashlib.blake2b(img.tobytes(), digest_size=8, key=str(self.seed).encode())
        digest.update(repr((img.mode, img.size)).encode())
        return torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") >> 1)

    def crop(self, img: Image.Image, gen: torch.Generator) -> Image.Image:
        """RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, bilinear) + horizontal flip."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        width, height = img.size
        area = width * height
        log_ratio = (math.log(3 / 4), math.log(4 / 3))
        box = None
        for _ in range(10):
            target = area * (0.08 + 0.92 * float(torch.rand((), generator=gen)))
            ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * float(
                torch.rand((), generator=gen)))  # fmt: skip
            w = round(math.sqrt(target * ratio))
            h = round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                i = int(torch.randint(0, height - h + 1, (), generator=gen))
                j = int(torch.randint(0, width - w + 1, (), generator=gen))
                box = (i, j, h, w)
                break
        if box is None:  # torchvision's fallback: the centre, clamped to the allowed ratios
            in_ratio = width / height
            if in_ratio < 3 / 4:
                w, h = width, round(width / (3 / 4))
            elif in_ratio > 4 / 3:
                h, w = height, round(height * (4 / 3))
            else:
                w, h = width, height
            box = ((height - h) // 2, (width - w) // 2, h, w)
        out = TF.resized_crop(img, *box, list(self.size), InterpolationMode.BILINEAR)
        return TF.hflip(out) if float(torch.rand((), generator=gen)) < 0.5 else out

    def view(self, img: Image.Image, gen: torch.Generator) -> torch.Tensor:
        """One augmented view (``augmix`` in the reference's ``data/datautils.py``)."""
        base = self.crop(img, gen)
        processed = self.to_tensor(base)
        if not self.augmix:
            return processed
        weights = _dirichlet3(gen)
        mixing = float(torch.rand((), generator=gen))  # Beta(1, 1)
        mix = torch.zeros_like(processed)
        for k in range(3):
            chain = base.copy()
            for _ in range(int(torch.randint(1, 4, (), generator=gen))):
                op = _AUGMIX_OPS[int(torch.randint(len(_AUGMIX_OPS), (), generator=gen))]
                chain = op(chain, gen)
            mix += weights[k] * self.to_tensor(chain)
        return mixing * processed + (1 - mixing) * mix

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = img.convert("RGB") if img.mode != "RGB" else img
        gen = self.generator(img)
        views = [self.original(img)] + [self.view(img, gen) for _ in range(self.views)]
        return torch.stack(views)


# ---------------------------------------------------------------------------- the method
def select_confident(logits: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the ``int(V · fraction)`` views with the lowest prediction entropy (at
    least one)."""
    entropy = -(logits.softmax(dim=1) * logits.log_softmax(dim=1)).sum(dim=1)
    keep = max(1, int(logits.shape[0] * fraction))
    return torch.argsort(entropy, descending=False)[:keep]


def average_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the views' averaged class probabilities (computed in log space)."""
    log_probs = logits.log_softmax(dim=1)
    mean = torch.logsumexp(log_probs, dim=0) - math.log(logits.shape[0])
    mean = mean.clamp_min(torch.finfo(mean.dtype).min)
    return -(mean * mean.exp()).sum()


@dataclass(frozen=True)
class TPTConfig:
    """TPT's settings.

    Attributes:
        ctx_init: Phrase the context starts from (its word count is the number of context
            tokens, as in CoOp); empty: ``n_ctx`` N(0, 0.02²) vectors drawn with ``seed``.
        n_ctx: Context tokens without a phrase.
        init_pack: A CoOp-family pack (``coop``, ``kgcoop``, ``prograd`` … with a shared
            ``ctx``) whose learned context is the start instead (``vprompt eval --method tpt
            --pack PACK``).
        views: Augmented views per image besides the original (63).
        selection: Fraction of the 1 + ``views`` views kept by confidence (0.1).
        steps: Entropy-minimisation steps per image (1).
        lr: AdamW learning rate (5e-3).
        weight_decay: AdamW weight decay (torch's default 0.01, which the reference keeps).
        augmix: AugMix the views (the reference: yes outside the ImageNet family).
        seed: Seed of the random context and of every image's views.
    """

    ctx_init: str = "a photo of a"
    n_ctx: int = 4
    init_pack: str = ""
    views: int = 63
    selection: float = 0.1
    steps: int = 1
    lr: float = 5e-3
    weight_decay: float = 0.01
    augmix: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_int(self.n_ctx, "n_ctx", 1, 75)
        check_int(self.views, "views", 0, MAX_VIEWS)
        check_int(self.steps, "steps", 0, 1000)
        check_int(self.seed, "seed", 0, 2**63 - 1)
        if not 0 < check_fraction(self.selection, "selection") <= 1:
            raise ConfigError(f"selection must be in (0, 1], got {self.selection!r}")
        if not check_fraction(self.lr, "lr") > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr!r}")
        check_fraction(self.weight_decay, "weight_decay")
        for name in ("ctx_init", "init_pack"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string, got {getattr(self, name)!r}")
        if not isinstance(self.augmix, bool):
            raise ConfigError(f"augmix must be true or false, got {self.augmix!r}")


_IMAGENET_FAMILY = ("imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")


@register_method("tpt")
class TPT(PromptMethod):
    """Test-time prompt tuning: every test image tunes its own copy of the context.

    Inputs at evaluation are B x (1 + views) x 3 x H x W (:meth:`input_transform`); a plain
    B x 3 x H x W batch is classified with the starting context (no tuning). The pack holds the
    starting context ``ctx`` only: test-time updates never outlive their image.
    """

    Config = TPTConfig
    capabilities = Capabilities(
        inputs="images", trains=False, uses_training_data=False, retargets=True
    )
    # The reference sets AugMix by the *test* set: a retargeted TPT follows its target.
    target_settings: ClassVar[frozenset[str]] = frozenset({"augmix"})
    reference_settings: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        name: {"augmix": False} for name in _IMAGENET_FAMILY
    }
    state_hint = "(the context length must match)"
    max_eval_batch = 1  # each image is 1 + views images, tuned on its own

    def __init__(
        self, backbone: Any, classnames: Sequence[str], config: TPTConfig | None = None
    ) -> None:
        super().__init__(backbone, classnames, config)
        clip = require_image_text(backbone, "tpt")
        cfg = self.config
        start = self._start(clip, cfg)
        self.ctx = nn.Parameter(start.vectors.float(), requires_grad=False)
        self.assembler = PromptAssembler(
            clip, self.classnames, n_ctx=start.n_ctx, prompt_prefix=start.prompt_prefix
        )
        self.to(clip.logit_scale.device)

    @staticmethod
    def _start(clip: Any, cfg: TPTConfig) -> Any:
        if cfg.init_pack:
            from vprompt.engine.pack import load_pack
            from vprompt.methods.text_context import PLACEHOLDER, ContextInit

            pack = load_pack(cfg.init_pack)
            ctx = pack.tensors.get("ctx")
            if ctx is None or ctx.dim() != 2 or ctx.shape[1] != int(clip.text_width):
                raise ConfigError(
                    f"{cfg.init_pack}: a {pack.method} pack has no shared text context of width "
                    f"{clip.text_width} to start TPT from (use a coop, kgcoop or prograd pack "
                    "with class_specific=false)"
                )
            if pack.backbone.fingerprint != clip.fingerprint():
                raise ConfigError(
                    f"{cfg.init_pack}: learned on {pack.backbone.name} weights "
                    f"{pack.backbone.weights!r}, not on these {clip.name} weights"
                )
            prefix = str(pack.config.get("ctx_init") or "").replace("_", " ")
            m = int(ctx.shape[0])
            phrase = (
                prefix if prefix and len(prefix.split(" ")) == m else " ".join([PLACEHOLDER] * m)
            )
            return ContextInit(ctx.float().clone(), phrase)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            return init_context(clip, n_ctx=cfg.n_ctx, init=cfg.ctx_init, std=0.02)

    @classmethod
    def examples(cls) -> list[MethodExample]:
        return [
            MethodExample("clip:tiny", {"views": 7, "selection": 0.5, "augmix": True}),
            MethodExample("clip:tiny", {"ctx_init": "", "n_ctx": 3, "views": 3, "steps": 2}),
        ]

    # ------------------------------------------------------------------ pieces
    def input_transform(self, train: bool) -> Callable[[Image.Image], torch.Tensor]:
        cfg = self.config
        return TPTViews(self.backbone, cfg.views, cfg.augmix, cfg.seed)

    def text_features(self, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """C x D unit class features of ``ctx`` (the starting context by default)."""
        return encode_prompts(self.backbone, self.assembler, self.ctx if ctx is None else ctx)

    def logits(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.backbone.logit_scale.float() * image @ text.T

    def encode_views(self, views: torch.Tensor) -> torch.Tensor:
        """N x 3 x H x W views → N x D unit image features (frozen)."""
        with torch.no_grad():
            return F.normalize(self.backbone.encode_image(views).float(), dim=-1)

    def tune(self, views: torch.Tensor) -> torch.Tensor:
        """(1 + V) x 3 x H x W views of one image → the context after test-time tuning."""
        return self.tune_features(self.encode_views(views))

    def tune_features(self, image: torch.Tensor) -> torch.Tensor:
        """N x D unit features of one image's views → the context after test-time tuning."""
        cfg = self.config
        ctx = self.ctx.detach().clone().requires_grad_(True)  # reset for every image
        optimizer = torch.optim.AdamW([ctx], lr=cfg.lr, weight_decay=cfg.weight_decay)
        selected = None
        for _ in range(cfg.steps):
            with torch.enable_grad():
                logits = self.logits(image, self.text_features(ctx))
                if selected is None:
                    selected = select_confident(logits.detach(), cfg.selection)
                loss = average_entropy(logits[selected])
                optimizer.zero_grad()
                loss.backward()
            optimizer.step()
        return ctx.detach()

    def forward(self, images: torch.Tensor) -> MethodOutput:
        """B x (1 + V) x 3 x H x W → B x C logits of each original view after tuning on its
        own views (B x 3 x H x W: the starting context's logits)."""
        if images.dim() == 4:
            image = F.normalize(self.backbone.encode_image(images).float(), dim=-1)
            return MethodOutput(logits=self.logits(image, self.text_features()))
        rows = []
        for views in images:
            ctx = self.tune(views) if self.config.steps > 0 else self.ctx
            with torch.no_grad():
                image = F.normalize(self.backbone.encode_image(views[:1]).float(), dim=-1)
                rows.append(self.logits(image, self.text_features(ctx)))
        return MethodOutput(logits=torch.cat(rows))
