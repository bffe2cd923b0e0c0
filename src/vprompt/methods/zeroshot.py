"""Zero-shot classification with text prompts (CLIP; template ensembles; CuPL descriptions)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from vprompt.backbones.protocols import ImageTextBackbone
from vprompt.data.images import load_image
from vprompt.errors import ConfigError, PackError
from vprompt.methods.base import (
    InputKind,
    MethodOutput,
    Prediction,
    register_method,
    topk_predictions,
)
from vprompt.prompts.text import (
    build_class_prompts,
    load_class_list,
    load_descriptions,
    resolve_templates,
)

ImageInput = Image.Image | str | Path


@torch.no_grad()
def encode_class_prompts(
    backbone: ImageTextBackbone,
    prompts: Sequence[Sequence[str]],
    *,
    batch_size: int = 256,
    progress: bool | None = None,
) -> torch.Tensor:
    """Average the normalized embeddings of each class's prompts.

    Args:
        prompts: Per class, the sentences to embed.
        batch_size: Sentences per text-encoder forward.
        progress: Show a progress bar (``None``: only for large jobs on a terminal).

    Returns:
        C x D unit-norm class embeddings (float32).
    """
    flat = [p for ps in prompts for p in ps]
    owner = torch.tensor([c for c, ps in enumerate(prompts) for _ in ps])
    device = backbone.logit_scale.device
    sums: torch.Tensor | None = None
    show = progress if progress is not None else (len(flat) > 4 * batch_size and None)
    bar = tqdm(
        total=len(flat), desc="class embeddings", unit="prompt", disable=show is False, leave=False
    )
    for start in range(0, len(flat), batch_size):
        tokens = backbone.tokenize(flat[start : start + batch_size])
        feats = F.normalize(backbone.encode_text(tokens).float(), dim=-1)
        if sums is None:
            sums = torch.zeros(len(prompts), feats.shape[1], device=feats.device)
        sums.index_add_(0, owner[start : start + batch_size].to(feats.device), feats)
        bar.update(len(tokens))
    bar.close()
    assert sums is not None
    return F.normalize(sums, dim=-1).to(device)


@dataclass(frozen=True)
class ZeroShotConfig:
    """How the class embeddings were made (stored in the pack for provenance).

    Attributes:
        templates: Format strings filled with each class name; empty when only descriptions
            were used.
        descriptions: Whether per-class description sentences were averaged in (CuPL).
    """

    templates: tuple[str, ...] = ("a photo of a {}.",)
    descriptions: bool = False

    def __post_init__(self) -> None:
        if not self.templates and not self.descriptions:
            raise ConfigError("zero-shot needs templates, descriptions, or both")
        for t in self.templates:
            if t.count("{}") != 1:
                raise ConfigError(f"template {t!r} must contain exactly one '{{}}'")


@register_method("zeroshot")
class ZeroShotClassifier(nn.Module):
    """Classify images by similarity to text-prompt class embeddings.

    Class embeddings are computed once, in batches, when the classifier is built.

    Args:
        backbone: A frozen image-text backbone (``load_backbone("clip:…")``).
        classnames: Class names, or a comma-separated string of them.
        templates: Template set name, template file, a single template, or a list (see
            :func:`vprompt.prompts.resolve_templates`). Defaults to ``"a photo of a {}."``
            unless only descriptions are given.
        descriptions: CuPL-style ``{class: [sentences]}`` mapping or JSON file.
        batch_size: Sentences per text-encoder forward.
    """

    name = "zeroshot"
    Config = ZeroShotConfig
    # Images enter only through frozen embeddings, so evaluation may read cached features.
    input_kind: ClassVar[InputKind] = "image-features"
    feature_kind = "clip-image-embedding-l2"
    feature_views = 1
    class_embeddings: torch.Tensor  # C x D, unit norm (buffer)

    def __init__(
        self,
        backbone: ImageTextBackbone,
        classnames: Sequence[str] | str,
        *,
        templates: str | Sequence[str | Callable[[str], str]] | None = None,
        descriptions: str | Path | Mapping[str, Sequence[str]] | None = None,
        batch_size: int = 256,
        _class_embeddings: torch.Tensor | None = None,
        _config: ZeroShotConfig | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.classnames = load_class_list(classnames)
        if _class_embeddings is not None and _config is not None:
            self.config = _config
            embeddings = _class_embeddings
        else:
            desc = (
                load_descriptions(descriptions, self.classnames)
                if descriptions is not None
                else None
            )
            temps = resolve_templates(templates) if (templates or desc is None) else ()
            self.config = ZeroShotConfig(templates=temps, descriptions=desc is not None)
            prompts = build_class_prompts(self.classnames, temps, desc)
            embeddings = encode_class_prompts(backbone, prompts, batch_size=batch_size)
        if embeddings.shape != (len(self.classnames), backbone.embed_dim):
            raise PackError(
                f"class embeddings have shape {tuple(embeddings.shape)}, expected "
                f"({len(self.classnames)}, {backbone.embed_dim}) for {backbone.name}"
            )
        self.register_buffer("class_embeddings", embeddings.float(), persistent=False)

    @classmethod
    def from_state(
        cls,
        backbone: ImageTextBackbone,
        classnames: Sequence[str],
        config: ZeroShotConfig,
        tensors: Mapping[str, torch.Tensor],
    ) -> ZeroShotClassifier:
        if set(tensors) != {"class_embeddings"}:
            raise PackError(
                f"zeroshot pack must hold exactly 'class_embeddings', found {sorted(tensors)}"
            )
        device = backbone.logit_scale.device
        return cls(
            backbone,
            list(classnames),
            _class_embeddings=tensors["class_embeddings"].to(device),
            _config=config,
        )

    @classmethod
    def from_config(
        cls, backbone: ImageTextBackbone, classnames: Sequence[str], config: ZeroShotConfig
    ) -> ZeroShotClassifier:
        """Build from a config's templates (protocol runs; descriptions need a file, not a
        config, so a description-based classifier is built with ``descriptions=`` instead)."""
        if config.descriptions:
            raise ConfigError(
                "a zero-shot config with descriptions=true cannot be rebuilt from the config "
                "alone; pass descriptions= to ZeroShotClassifier"
            )
        return cls(backbone, list(classnames), templates=list(config.templates))

    def retarget(
        self, classnames: Sequence[str], *, templates: Sequence[str] | None = None
    ) -> ZeroShotClassifier:
        """The same classifier for other class names (new classes, another dataset).

        Args:
            templates: Templates for the new classes (e.g. the target dataset's); default: the
                ones this classifier was built with.
        """
        temps = list(templates) if templates is not None else list(self.config.templates)
        if not temps:
            raise ConfigError("retargeting a description-only classifier needs templates")
        return type(self)(self.backbone, list(classnames), templates=temps)

    def prompt_state(self) -> dict[str, torch.Tensor]:
        return {"class_embeddings": self.class_embeddings.detach().float().cpu().contiguous()}

    def input_transform(self, train: bool) -> Callable[[Image.Image], torch.Tensor]:
        """The backbone's own preprocessing (nothing is trained, so no augmentation)."""
        return self.backbone.transform

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W preprocessed pixels → B x D unit-norm image embeddings (frozen)."""
        with torch.no_grad():
            return F.normalize(self.backbone.encode_image(pixels).float(), dim=-1)

    def forward_features(self, features: torch.Tensor) -> MethodOutput:
        """B x D unit-norm image embeddings → B x C logits."""
        scale = self.backbone.logit_scale.float()
        return MethodOutput(logits=scale * features.float() @ self.class_embeddings.T)

    def forward(self, images: torch.Tensor) -> MethodOutput:
        """B x 3 x H x W preprocessed pixels → B x C logits."""
        return self.forward_features(self.encode_images(images))

    @torch.no_grad()
    def predict_proba(self, images: Sequence[ImageInput] | torch.Tensor) -> torch.Tensor:
        """Images (PIL, paths, or a preprocessed B x 3 x H x W tensor) → B x C probabilities."""
        if not isinstance(images, torch.Tensor):
            pils = [im if isinstance(im, Image.Image) else load_image(im) for im in images]
            images = torch.stack([self.backbone.transform(im) for im in pils])
        images = images.to(self.class_embeddings.device)
        return self.forward(images).logits.softmax(dim=-1)

    def predict(
        self, images: Sequence[ImageInput] | torch.Tensor, top_k: int = 5
    ) -> list[list[Prediction]]:
        """Top-k labels per image with softmax probabilities, highest first."""
        return topk_predictions(self.predict_proba(images), self.classnames, top_k)

    def extra_repr(self) -> str:
        return f"backbone={self.backbone.name}, classes={len(self.classnames)}"
