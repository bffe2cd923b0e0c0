"""CoPrompt: consistency-guided prompt learning (Roy & Etemad, ICLR 2024).

MaPLe's coupled deep prompts (:mod:`vprompt.methods.maple`) plus two small residual adapters on
the features (``f + r · A(f)`` with ``A`` = Linear → ReLU → Linear → ReLU, no biases, width
E/4; r = 0.1 for images, 0.2 for text), trained with cross-entropy plus a consistency term that
keeps the prompted model close to the frozen one on *perturbed* inputs:

* text: ``1 − mean_c cos(g_c, t_c)`` where ``t_c`` is the frozen model's feature of one class
  description (an LLM-written sentence from a CuPL-style file; one description index is drawn
  per step);
* image: ``1 − mean_b cos(f_b, f⁰_b)`` where the prompted feature comes from one augmented view
  of the image and the frozen feature ``f⁰`` from a second, independently augmented view.

Both views are RandAugment(2, 10) as Dassl draws it (the reference's ``["randaugment",
"normalize"]`` transforms with ``K_TRANSFORMS: 2``), after a square resize.

Defaults follow ShuvenduRoy/CoPrompt ``configs/trainers/coprompt.yaml`` (run by
``scripts/base2new_train_coprompt.sh``): MaPLe's prompts (2 tokens from ``"a photo of a"``,
depth 9), consistency weight W = 1 (cosine), batch 4, SGD 0.0035 for 8 epochs, one constant
warm-up epoch at 1e-5. The loss is ``trainers/coprompt.py``'s ``CustomCLIP.forward``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.ImageDraw
import PIL.ImageEnhance
import PIL.ImageOps
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vprompt.errors import ConfigError
from vprompt.methods.base import Capabilities, MethodData, MethodExample, MethodOutput
from vprompt.methods.config import OptimConfig, check_fraction, check_int
from vprompt.methods.kgcoop import check_template
from vprompt.methods.maple import MaPLe, MaPLeConfig
from vprompt.methods.registry import register_method
from vprompt.methods.vl_prompts import VLPrompts, vl_optim
from vprompt.utils import jsonio

MAX_DESCRIPTIONS_BYTES = 64 << 20
"""Largest class-description file read (CuPL's ImageNet file is ~10 MB)."""
MAX_DESCRIPTIONS_PER_CLASS = 1000


# ---------------------------------------------------------------------------- RandAugment
def _shear_x(img: Image.Image, v: float) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, (1, v, 0, 0, 1, 0))


def _shear_y(img: Image.Image, v: float) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, v, 1, 0))


def _translate_x(img: Image.Image, v: float) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, v, 0, 1, 0))


def _translate_y(img: Image.Image, v: float) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, 0, 1, v))


def _solarize_add(img: Image.Image, v: float) -> Image.Image:
    shifted = np.clip(np.asarray(img).astype(np.float64) + v, 0, 255).astype(np.uint8)
    return PIL.ImageOps.solarize(Image.fromarray(shifted), 128)


def _cutout(img: Image.Image, v: float) -> Image.Image:
    """A v x v grey square at a uniformly drawn centre (Dassl's ``CutoutAbs``)."""
    w, h = img.size
    x0 = max(0.0, float(torch.rand(())) * w - v / 2.0)
    y0 = max(0.0, float(torch.rand(())) * h - v / 2.0)
    x0, y0 = int(x0), int(y0)
    box = (x0, y0, min(w, x0 + v), min(h, y0 + v))
    out = img.copy()
    PIL.ImageDraw.Draw(out).rectangle(box, (125, 123, 114))
    return out


# (name, operation(img, value), low, high, signed): Dassl's randaugment_list, in its order.
_OPS: tuple[tuple[str, Callable[[Image.Image, float], Image.Image], float, float, bool], ...] = (
    ("auto_contrast", lambda img, _: PIL.ImageOps.autocontrast(img), 0, 1, False),
    ("equalize", lambda img, _: PIL.ImageOps.equalize(img), 0, 1, False),
    ("invert", lambda img, _: PIL.ImageOps.invert(img), 0, 1, False),
    ("rotate", lambda img, v: img.rotate(v), 0, 30, True),
    ("posterize", lambda img, v: PIL.ImageOps.posterize(img, int(v)), 4, 8, False),
    # Dassl passes the float threshold (85.3 at m=10); PIL compares each level with it.
    ("solarize", lambda img, v: PIL.ImageOps.solarize(img, v), 0, 256, False),  # type: ignore[arg-type]
    ("solarize_add", _solarize_add, 0, 110, False),
    ("color", lambda img, v: PIL.ImageEnhance.Color(img).enhance(v), 0.1, 1.9, False),
    ("contrast", lambda img, v: PIL.ImageEnhance.Contrast(img).enhance(v), 0.1, 1.9, False),
    ("brightness", lambda img, v: PIL.ImageEnhance.Brightness(img).enhance(v), 0.1, 1.9, False),
    ("sharpness", lambda img, v: PIL.ImageEnhance.Sharpness(img).enhance(v), 0.1, 1.9, False),
    ("shear_x", _shear_x, 0.0, 0.3, True),
    ("shear_y", _shear_y, 0.0, 0.3, True),
    ("cutout", _cutout, 0, 40, False),
    ("translate_x", _translate_x, 0.0, 100, True),
    ("translate_y", _translate_y, 0.0, 100, True),
)


class DasslRandAugment:
    """RandAugment as Dassl's ``RandAugment(n, m)``: ``n`` operations drawn with replacement
    from its 16, each at magnitude ``m / 30`` of its range (rotations, shears and translations
    flip sign with probability 1/2; translations in pixels). Random draws use torch's global
    generator (seeded per image and view by the engine)."""

    def __init__(self, n: int = 2, m: int = 10) -> None:
        if not 0 <= m <= 30:
            raise ConfigError(f"RandAugment magnitude must be in [0, 30], got {m}")
        self.n, self.m = n, m

    def __call__(self, img: Image.Image) -> Image.Image:
        picks = torch.randint(len(_OPS), (self.n,)).tolist()
        for index in picks:
            _, op, low, high, signed = _OPS[index]
            value = (self.m / 30) * (high - low) + low
            if signed and float(torch.rand(())) > 0.5:
                value = -value
            img = op(img, value)
        return img


class TwoViews:
    """PIL image → 2 x 3 x H x W: two independent draws of ``transform``."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.stack([self.transform(img), self.transform(img)])


def coprompt_train_transform(backbone: Any) -> Callable[[Image.Image], torch.Tensor]:
    """Dassl's train transform for ``["randaugment", "normalize"]``: resize to the input size
    (square, bicubic), RandAugment(2, 10), to tensor, normalise."""
    from torchvision import transforms as T

    pre = backbone.preprocess
    size = (pre.size, pre.size) if isinstance(pre.size, int) else tuple(pre.size)
    return T.Compose(
        [
            T.Lambda(lambda im: im.convert("RGB") if im.mode != "RGB" else im),
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            DasslRandAugment(2, 10),
            T.ToTensor(),
            T.Normalize(pre.mean, pre.std),
        ]
    )


# ---------------------------------------------------------------------------- descriptions
def read_descriptions(path: str | Path, classnames: Sequence[str]) -> list[list[str]]:
    """Each class's descriptions from a CuPL-style JSON file ``{"class name": ["…", …]}``.

    A class is looked up by its name, then with underscores as spaces (as the reference does).

    Raises:
        ConfigError: The file is missing, too large, not such a mapping, or lacks a class.
    """
    where = str(path)
    file = Path(path).expanduser()
    try:
        size = file.stat().st_size
        if size > MAX_DESCRIPTIONS_BYTES:
            raise ConfigError(
                f"{where}: {size} bytes, more than the {MAX_DESCRIPTIONS_BYTES} a class "
                "description file may hold"
            )
        data = jsonio.loads(file.read_bytes(), what=where)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read the class descriptions ({exc.strerror})") from None
    except jsonio.JSONInputError as exc:
        raise ConfigError(str(exc)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object mapping class names to lists of text")
    found: list[list[str]] = []
    for name in classnames:
        entry = data.get(name, data.get(name.replace("_", " ")))
        if entry is None:
            raise ConfigError(f"{where}: no descriptions for class {name!r}")
        ok = isinstance(entry, list) and 0 < len(entry) <= MAX_DESCRIPTIONS_PER_CLASS
        if not ok or not all(isinstance(t, str) and t.strip() for t in entry):
            raise ConfigError(
                f"{where}: class {name!r} must map to 1 to {MAX_DESCRIPTIONS_PER_CLASS} "
                "non-empty strings"
            )
        found.append([t.strip() for t in entry])
    return found


def description_features(backbone: Any, descriptions: Sequence[Sequence[str]]) -> torch.Tensor:
    """N x C x E unit frozen text features, N the most descriptions of any class; class c's
    row n is its description ``n mod count_c`` (every row of a class with N is its own)."""
    most = max(len(d) for d in descriptions)
    rows = []
    with torch.no_grad():
        for texts in descriptions:
            feats = F.normalize(
                backbone.encode_text(backbone.tokenize(list(texts))).float(), dim=-1
            )
            rows.append(feats[torch.arange(most) % len(texts)])
    return torch.stack(rows, dim=1)


# ---------------------------------------------------------------------------- the method
class Adapter(nn.Module):
    """CoPrompt's feature adapter: Linear(E, E/r) → ReLU → Linear(E/r, E) → ReLU, no biases."""

    def __init__(self, width: int, reduction: int = 4) -> None:
        super().__init__()
        self.down = nn.Linear(width, width // reduction, bias=False)
        self.up = nn.Linear(width // reduction, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.up(F.relu(self.down(x))))


@dataclass(frozen=True)
class CoPromptConfig(MaPLeConfig):
    """CoPrompt's settings; the prompt fields are :class:`~vprompt.methods.maple.MaPLeConfig`'s.

    Attributes:
        descriptions: A CuPL-style JSON file of class descriptions (``--descriptions``); empty:
            ``template`` filled with the class name is each class's one description.
        template: The fallback description template (each benchmark dataset's own in
            protocols).
        consistency_weight: W, the weight of the two consistency terms (``TRAINER.W``).
        image_adapter_ratio: r of the image adapter's residual (0.1).
        text_adapter_ratio: r of the text adapter's residual (0.2).
        adapter_reduction: The adapters' hidden width is E / this (4).
        optim: Batch 4, SGD 0.0035, 8 epochs.
    """

    descriptions: str = ""
    template: str = "a photo of a {}."
    consistency_weight: float = 1.0
    image_adapter_ratio: float = 0.1
    text_adapter_ratio: float = 0.2
    adapter_reduction: int = 4
    optim: OptimConfig = field(default_factory=lambda: vl_optim(lr=0.0035, epochs=8))

    def __post_init__(self) -> None:
        super().__post_init__()
        check_template(self.template, "coprompt")
        check_fraction(self.consistency_weight, "consistency_weight")
        for name in ("image_adapter_ratio", "text_adapter_ratio"):
            if not 0 <= check_fraction(getattr(self, name), name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        check_int(self.adapter_reduction, "adapter_reduction", 1, 1024)
        if not isinstance(self.descriptions, str):
            raise ConfigError(f"descriptions must be a file path, got {self.descriptions!r}")


@register_method("coprompt")
class CoPrompt(MaPLe):
    """MaPLe's prompts with feature adapters and consistency to the frozen model.

    Training inputs are B x 2 x 3 x H x W (two augmented views, :meth:`input_transform`);
    evaluation inputs are B x 3 x H x W. In training the consistency terms come back as
    ``aux_loss["consistency_text"]`` and ``aux_loss["consistency_image"]``.

    Learned tensors (the pack): MaPLe's, plus ``image_adapter.*`` and ``text_adapter.*``.
    """

    Config = CoPromptConfig
    capabilities = Capabilities(inputs="images", retargets=True, template_field="template")

    def __init__(
        self, backbone: Any, classnames: Sequence[str], config: CoPromptConfig | None = None
    ) -> None:
        super().__init__(backbone, classnames, config)
        width = int(self.clip.embed_dim)
        if width // self.config.adapter_reduction < 1:
            raise ConfigError(
                f"adapter_reduction {self.config.adapter_reduction} leaves no hidden width for "
                f"{self.clip.name}'s {width}-d features"
            )
        # Created after the prompt learner, image adapter first, as the reference builds them.
        self.image_adapter = Adapter(width, self.config.adapter_reduction)
        self.text_adapter = Adapter(width, self.config.adapter_reduction)
        self._descriptions: torch.Tensor | None = None
        self.to(self.clip.logit_scale.device)

    @classmethod
    def examples(cls) -> list[MethodExample]:
        return [MethodExample("clip:tiny", {"depth": 2})]

    # ------------------------------------------------------------------ features
    def adapt_image(self, features: torch.Tensor) -> torch.Tensor:
        r = self.config.image_adapter_ratio
        return r * self.image_adapter(features) + (1 - r) * features

    def adapt_text(self, features: torch.Tensor) -> torch.Tensor:
        r = self.config.text_adapter_ratio
        return r * self.text_adapter(features) + (1 - r) * features

    def description_table(self) -> torch.Tensor:
        """N x C x E unit frozen features of the class descriptions (built on first use)."""
        if self._descriptions is None:
            if self.config.descriptions:
                texts = read_descriptions(self.config.descriptions, self.classnames)
            else:
                names = [n.replace("_", " ") for n in self.classnames]
                texts = [[self.config.template.format(n)] for n in names]
            self._descriptions = description_features(self.clip, texts)
        return self._descriptions.to(self.ctx.device)

    # ------------------------------------------------------------------ contract
    def setup(self, data: MethodData) -> None:
        """Read the description file before training starts (a bad file fails at once)."""
        self.description_table()

    def input_transform(self, train: bool) -> Callable[[Image.Image], torch.Tensor]:
        if train and self.config.augment:
            return TwoViews(coprompt_train_transform(self.backbone))
        return self.backbone.transform

    def forward(self, images: torch.Tensor) -> MethodOutput:
        """B x 3 x H x W images (B x 2 x 3 x H x W in training: the prompted view and the
        frozen model's view) → B x C logits (+ the consistency terms in training)."""
        if not self.training:
            if images.dim() == 5:
                images = images[:, 0]
            return super().forward(images)
        prompted, perturbed = (images[:, 0], images[:, 1]) if images.dim() == 5 else (images,) * 2
        prompts = self.prompts()
        text = self.text_features_from(prompts)
        image = self.image_features_from(prompted, prompts)
        logits = self.logits(image, text)
        return MethodOutput(
            logits=logits, aux_loss=self.consistency(prompts, text, image, perturbed)
        )

    def consistency(
        self, prompts: VLPrompts, text: torch.Tensor, image: torch.Tensor, perturbed: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """W · (1 − mean cos) between prompted and frozen text and image features."""
        table = self.description_table()
        row = table[int(torch.randint(table.shape[0], ()))]  # one description index per step
        with torch.no_grad():
            frozen = F.normalize(self.clip.encode_image(perturbed).float(), dim=-1)
        w = self.config.consistency_weight
        text_term = 1.0 - F.cosine_similarity(text, row, dim=1, eps=1e-7).mean()
        image_term = 1.0 - F.cosine_similarity(image, frozen, dim=1, eps=1e-7).mean()
        return {"consistency_text": w * text_term, "consistency_image": w * image_term}
