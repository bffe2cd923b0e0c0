"""DiffTPT: test-time prompt tuning with diffusion-generated views (Feng et al., ICCV 2023).

TPT (``vprompt.methods.tpt``) with a second source of views: besides the original and its
``views`` random crops (AugMix-ed outside the ImageNet family), every test image gets
``generated`` variations from a Stable Diffusion *image-variation* pipeline (the reference's
``lambdalabs/sd-image-variations-diffusers``, revision ``v2.0``, guidance 3, the pipeline's
default 50 steps, its safety checker off). Before the entropy step, the views are filtered by
their cosine similarity to the original: the reference (``difftpt_utils.py``,
``select_confident_samples_cosine``) ranks *every* view but the original — crops and generated
images alike — by the cosine similarity of its class logits (with the starting context) to the
original's, keeps the top ``cosine_selection`` fraction (0.8) and prepends the original; TPT's
confidence selection then keeps the ``selection`` fraction (0.3) of those with the lowest
entropy, and ``steps`` (4) AdamW steps minimise the entropy of their averaged prediction with the
selection fixed after the first step. The context is reset for every image, as in TPT.

Defaults follow chunmeifeng/DiffTPT ``scripts/do_tpt_difftpt.sh`` (``--b 64 --selection_cosine
0.8 --selection_selfentro 0.3 --lr 5e-3 --tta_steps 4``), ``tpt_classification.py`` (64 crops
besides the original in ``difftpt`` mode) and ``difftpt_utils.py`` (``batch_size - 1`` = 63
generated views, each resized + centre-cropped + normalised as the original), and
``image_generator_R.py`` (the pipeline input: the image as a tensor resized to the image
encoder's size, bicubic without antialiasing, normalised with CLIP's mean and std).

Differences from the reference code: the generated views are made on the fly, inside
:meth:`DiffTPT.input_transform`, from noise drawn with a generator seeded by the image's bytes
and ``seed`` (the reference generates them once offline, unseeded, and stores them as image
files, so they also pass through that file format's compression); ``cosine_on="features"``
offers the paper's wording (cosine of CLIP image features) instead of the code's logits; the
views are scored in float32 (the reference under autocast). The pipeline is never downloaded
unless ``allow_download`` is true: ``pipeline`` names a local folder or a model already in the
Hugging Face cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from vprompt.errors import ConfigError
from vprompt.methods.base import MethodExample
from vprompt.methods.config import check_fraction, check_int
from vprompt.methods.registry import register_method
from vprompt.methods.tpt import MAX_VIEWS, TPT, TPTConfig, TPTViews

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
COSINE_ON = ("logits", "features")
INSTALL_HINT = "pip install 'vprompt[diffusion]'"


@dataclass(frozen=True)
class DiffTPTConfig(TPTConfig):
    """DiffTPT's settings: TPT's (with DiffTPT's defaults) and the diffusion views'.

    Attributes:
        views: Standard augmented views besides the original (64 in DiffTPT's ``difftpt`` mode).
        selection: Fraction of the cosine-filtered views kept by confidence
            (``selection_selfentro`` 0.3).
        steps: Entropy-minimisation steps per image (``tta_steps`` 4).
        generated: Diffusion-generated views per image (63); 0: no pipeline is loaded.
        pipeline: The diffusers image-variation pipeline: a local folder or a Hugging Face id
            already in the local cache.
        revision: The hub revision (``v2.0`` in the reference); ignored for a local folder.
        allow_download: Let diffusers download ``pipeline`` (off: local files only).
        diffusion_steps: Denoising steps per generated view (the pipeline's default 50).
        guidance: Classifier-free guidance scale (3).
        generated_size: Height and width of the generated images (0: the pipeline's default,
            512 for the reference's); a multiple of 8.
        generation_batch: Generated views per pipeline call (memory only; with the seeded
            noise drawn call after call, changing it changes the views).
        cosine_selection: Fraction of the views besides the original kept by cosine
            similarity to the original (``selection_cosine`` 0.8).
        cosine_on: What the similarity compares: ``logits`` (the reference code: class logits
            with the starting context) or ``features`` (CLIP image features).
    """

    views: int = 64
    selection: float = 0.3
    steps: int = 4
    generated: int = 63
    pipeline: str = "lambdalabs/sd-image-variations-diffusers"
    revision: str = "v2.0"
    allow_download: bool = False
    diffusion_steps: int = 50
    guidance: float = 3.0
    generated_size: int = 0
    generation_batch: int = 8
    cosine_selection: float = 0.8
    cosine_on: str = "logits"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.generated, "generated", 0, MAX_VIEWS)
        check_int(self.diffusion_steps, "diffusion_steps", 1, 1000)
        check_int(self.generated_size, "generated_size", 0, 2048)
        if self.generated_size % 8:
            raise ConfigError(
                f"generated_size must be 0 or a multiple of 8, got {self.generated_size!r}"
            )
        check_int(self.generation_batch, "generation_batch", 1, MAX_VIEWS)
        check_fraction(self.guidance, "guidance")
        if not 0 < check_fraction(self.cosine_selection, "cosine_selection") <= 1:
            raise ConfigError(f"cosine_selection must be in (0, 1], got {self.cosine_selection!r}")
        if self.cosine_on not in COSINE_ON:
            raise ConfigError(f"cosine_on must be one of {COSINE_ON}, got {self.cosine_on!r}")
        for name in ("pipeline", "revision"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string, got {getattr(self, name)!r}")
        if not isinstance(self.allow_download, bool):
            raise ConfigError(f"allow_download must be true or false, got {self.allow_download!r}")
        if self.generated > 0 and not self.pipeline:
            raise ConfigError("difftpt needs pipeline=DIR-or-ID to generate views (or generated=0)")


def load_variation_pipeline(name: str, revision: str = "", allow_download: bool = False) -> Any:
    """The Stable Diffusion image-variation pipeline ``name`` (safety checker off, as the
    reference), from local files unless ``allow_download``; a one-line ConfigError otherwise."""
    try:
        from diffusers import StableDiffusionImageVariationPipeline
    except ImportError:
        raise ConfigError(
            f"difftpt generates views with diffusers, which is not installed: {INSTALL_HINT} "
            "(or set generated=0)"
        ) from None
    local = Path(name).expanduser().is_dir()
    options: dict[str, Any] = {
        "safety_checker": None,
        "requires_safety_checker": False,
        "local_files_only": not allow_download,
    }
    if revision and not local:
        options["revision"] = revision
    try:
        pipe = StableDiffusionImageVariationPipeline.from_pretrained(
            str(Path(name).expanduser()) if local else name, **options
        )
    except Exception as exc:  # diffusers raises OSError, ValueError, EnvironmentError …
        where = "the folder" if local else "the local Hugging Face cache"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"difftpt: cannot load the image-variation pipeline {name!r} from {where} "
            f"({reason}); set pipeline=DIR to a saved pipeline, or allow_download=true to fetch it"
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cosine_keep(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices into the N views of ``scores`` (N x K, the original first): the original, then
    the ``int((N - 1) · fraction)`` others (at least one) most cosine-similar to it, most
    similar first."""
    first = torch.zeros(1, dtype=torch.long, device=scores.device)
    if scores.shape[0] < 2:
        return first
    similarity = F.cosine_similarity(scores[:1].float(), scores[1:].float(), dim=1)
    keep = max(1, int(similarity.shape[0] * fraction))
    return torch.cat([first, torch.argsort(similarity, descending=True)[:keep] + 1])


class DiffTPTViews:
    """PIL image → (1 + ``views`` + ``generated``) x 3 x H x W: TPT's views, then the
    generated variations, each preprocessed as the original."""

    def __init__(
        self, views: TPTViews, generate: Callable[[Image.Image], list[Image.Image]] | None
    ) -> None:
        self.views, self.generate = views, generate

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = img.convert("RGB") if img.mode != "RGB" else img
        base = self.views(img)
        if self.generate is None:
            return base
        made = [self.views.original(variation) for variation in self.generate(img)]
        return torch.cat([base, torch.stack(made).to(base.dtype)])


@register_method("difftpt")
class DiffTPT(TPT):
    """TPT on the original, its crops and diffusion variations, filtered by cosine similarity
    to the original before the confidence selection.

    Inputs at evaluation are B x (1 + views + generated) x 3 x H x W (:meth:`input_transform`);
    a plain B x 3 x H x W batch is classified with the starting context. The pack holds the
    starting context ``ctx`` only.
    """

    Config = DiffTPTConfig

    def __init__(
        self, backbone: Any, classnames: Sequence[str], config: DiffTPTConfig | None = None
    ) -> None:
        super().__init__(backbone, classnames, config)
        cfg = self.config
        self._pipe: Any = None
        if cfg.generated > 0:
            self._pipe = load_variation_pipeline(cfg.pipeline, cfg.revision, cfg.allow_download)

    @classmethod
    def examples(cls) -> list[MethodExample]:
        # No pipeline in the contract tests: tests/test_difftpt.py builds a tiny one.
        return [
            MethodExample("clip:tiny", {"views": 7, "generated": 0, "selection": 0.5, "steps": 1}),
            MethodExample(
                "clip:tiny",
                {"ctx_init": "", "n_ctx": 3, "views": 3, "generated": 0, "cosine_on": "features"},
            ),
        ]

    # ------------------------------------------------------------------ the generated views
    def noise_generator(self, img: Image.Image) -> torch.Generator:
        """The generator of ``img``'s diffusion noise: seeded by its bytes and ``seed``,
        apart from the stream of its crops."""
        cfg = self.config
        gen = TPTViews(self.backbone, 0, False, cfg.seed).generator(img)
        return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (), generator=gen)))

    def pipeline_input(self, img: Image.Image) -> torch.Tensor:
        """1 x 3 x S x S: the image as the reference feeds the pipeline (bicubic resize to the
        image encoder's size without antialiasing, CLIP-normalised)."""
        from torchvision import transforms as T

        size = int(self._pipe.image_encoder.config.image_size)
        prepare = T.Compose([
            T.ToTensor(),
            T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC, antialias=False),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ])  # fmt: skip
        return prepare(img.convert("RGB"))[None]

    def generate(self, img: Image.Image) -> list[Image.Image]:
        """``generated`` image variations of ``img`` (deterministic per image and seed)."""
        cfg = self.config
        pipe = self._pipe
        pipe.to(self.ctx.device)
        image = self.pipeline_input(img)
        gen = self.noise_generator(img)
        size = cfg.generated_size or None
        made: list[Image.Image] = []
        while len(made) < cfg.generated:
            count = min(cfg.generation_batch, cfg.generated - len(made))
            out = pipe(image, height=size, width=size, num_inference_steps=cfg.diffusion_steps,
                       guidance_scale=cfg.guidance, num_images_per_prompt=count,
                       generator=gen, output_type="pil")  # fmt: skip
            made.extend(out.images)
        return made

    def input_transform(self, train: bool) -> Callable[[Image.Image], torch.Tensor]:
        cfg = self.config
        views = TPTViews(self.backbone, cfg.views, cfg.augmix, cfg.seed)
        return DiffTPTViews(views, self.generate if self._pipe is not None else None)

    # ------------------------------------------------------------------ the filter, then TPT
    def filter_views(self, image: torch.Tensor) -> torch.Tensor:
        """Indices of the views kept by cosine similarity to the original (first), from their
        N x D unit features, scored with the starting context."""
        cfg = self.config
        with torch.no_grad():
            scores = image if cfg.cosine_on == "features" else self.logits(
                image, self.text_features())  # fmt: skip
        return cosine_keep(scores, cfg.cosine_selection)

    def tune(self, views: torch.Tensor) -> torch.Tensor:
        """All views of one image → the context after TPT's tuning on the filtered views
        (each view goes through the image tower once)."""
        image = self.encode_views(views)
        return self.tune_features(image[self.filter_views(image)])
