"""Zero-shot classification with text prompts (CLIP; template ensembles; CuPL descriptions)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vprompt.backbones.protocols import ImageTextBackbone
from vprompt.errors import ConfigError, PackError
from vprompt.methods.base import Capabilities, MethodExample, MethodOutput, PromptMethod
from vprompt.methods.clip_common import (
    CLIP_IMAGE_FEATURES,
    clip_logits,
    require_image_text,
    unit_image_features,
)
from vprompt.methods.registry import register_method
from vprompt.prompts.text import (
    build_class_prompts,
    load_class_list,
    load_descriptions,
    resolve_templates,
)


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
class ZeroShotClassifier(PromptMethod):
    """Classify images by similarity to text-prompt class embeddings.

    Class embeddings are computed once, in batches, when the classifier is built.

    Args:
        backbone: A frozen image-text backbone (``load_backbone("clip:…")``).
        classnames: Class names, or a comma-separated string of them.
        config: Build from a config's ``templates`` (how protocols build it); not together
            with ``templates`` / ``descriptions``.
        templates: Template set name, template file, a single template, or a list (see
            :func:`vprompt.prompts.resolve_templates`). Defaults to ``"a photo of a {}."``
            unless only descriptions are given.
        descriptions: CuPL-style ``{class: [sentences]}`` mapping or JSON file.
        batch_size: Sentences per text-encoder forward.
        class_embeddings: C x D embeddings to use instead of encoding any prompt (a pack's);
            ``config`` then records how they were made.
    """

    Config = ZeroShotConfig
    # Images enter only through frozen embeddings, so evaluation may read cached features.
    capabilities = Capabilities(
        inputs="image-features",
        trains=False,
        uses_training_data=False,
        retargets=True,
        template_field="templates",
    )
    feature_kind = CLIP_IMAGE_FEATURES
    class_embeddings: torch.Tensor  # C x D, unit norm (buffer)

    def __init__(
        self,
        backbone: ImageTextBackbone,
        classnames: Sequence[str] | str,
        config: ZeroShotConfig | None = None,
        *,
        templates: str | Sequence[str | Callable[[str], str]] | None = None,
        descriptions: str | Path | Mapping[str, Sequence[str]] | None = None,
        batch_size: int = 256,
        class_embeddings: torch.Tensor | None = None,
    ) -> None:
        names = load_class_list(classnames)
        clip = require_image_text(backbone, "zeroshot")
        if config is not None and (templates is not None or descriptions is not None):
            raise ConfigError("give a zero-shot config or templates / descriptions, not both")
        if class_embeddings is None:
            if config is not None:
                if config.descriptions:
                    raise ConfigError(
                        "a zero-shot config with descriptions=true cannot be rebuilt from the "
                        "config alone; pass descriptions= to ZeroShotClassifier"
                    )
                templates = list(config.templates)
            desc = load_descriptions(descriptions, names) if descriptions is not None else None
            temps = resolve_templates(templates) if (templates or desc is None) else ()
            config = ZeroShotConfig(templates=temps, descriptions=desc is not None)
            prompts = build_class_prompts(names, temps, desc)
            class_embeddings = encode_class_prompts(clip, prompts, batch_size=batch_size)
        super().__init__(clip, names, config)
        self.register_buffer("class_embeddings", class_embeddings.float(), persistent=False)
        self.to(clip.logit_scale.device)

    @classmethod
    def examples(cls) -> list[MethodExample]:
        return [MethodExample("clip:tiny", {"templates": ["a photo of a {}.", "art of the {}."]})]

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
        shape = (len(list(classnames)), int(backbone.embed_dim))
        method = cls(backbone, classnames, config, class_embeddings=torch.zeros(shape))
        method.load_prompt_state(tensors)
        return method

    def retarget(
        self,
        classnames: Sequence[str],
        *,
        templates: Sequence[str] | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> ZeroShotClassifier:
        """The same classifier for other class names (new classes, another dataset).

        Args:
            templates: Templates for the new classes (e.g. the target dataset's); default: the
                ones this classifier was built with.
            settings: Unused: zero-shot declares no ``target_settings``.
        """
        temps = tuple(templates) if templates is not None else self.config.templates
        if not temps:
            raise ConfigError("retargeting a description-only classifier needs templates")
        config = ZeroShotConfig(templates=temps, descriptions=False)
        return type(self)(self.backbone, list(classnames), config).train(self.training)

    def prompt_tensors(self) -> dict[str, torch.Tensor]:
        # A buffer, not persistent state: rebuilt from prompts unless a pack supplies it.
        return {"class_embeddings": self.class_embeddings}

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W preprocessed pixels → B x D unit-norm image embeddings (frozen)."""
        return unit_image_features(self.backbone, pixels)

    def forward_features(self, features: torch.Tensor) -> MethodOutput:
        """B x D unit-norm image embeddings → B x C logits."""
        return MethodOutput(logits=clip_logits(self.backbone, features, self.class_embeddings))

    def extra_repr(self) -> str:
        return f"backbone={self.backbone.name}, classes={len(self.classnames)}"
