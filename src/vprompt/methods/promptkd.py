"""PromptKD: unsupervised prompt distillation (Li et al., CVPR 2024).

A large prompted CLIP teacher (the paper: ViT-L/14 trained with PromptSRC) labels unlabelled
images softly; a student CLIP learns deep *vision* prompts plus a projector (1x1 conv → BN →
ReLU → 1x1 conv from the student's embedding size to the teacher's) so that its image features,
scored against the teacher's class text features, match the teacher's logits:

    L = kd_weight · T² · KL(softmax(z_teacher / T) ‖ softmax(z_student / T)) / (B · C)

with ``z_student = s · norm(P(f_student)) · t_teacherᵀ``. No labels are used (the engine adds
no cross-entropy). The teacher's class text features are computed once and stored in the pack,
so the student needs neither the teacher nor a text tower at inference.

Defaults follow zhengli97/PromptKD ``configs/trainers/PromptKD/vit_b16_c2_ep20_batch8_4+4ctx.yaml``
(run by ``scripts/promptkd/base2new_train.sh``): 4 vision tokens at depth 9, temperature 1,
batch 8, SGD 0.005 for 20 epochs, one constant warm-up epoch at 1e-5; KD weight 1000 (200 on
FGVC-Aircraft, Flowers102 and DTD, per the script; preset ``promptkd/base-to-novel``). The
loss is ``trainers/promptkd.py``'s ``forward_backward``; the projector is its
``Feature_Trans_Module_two_layer`` (1x1 convolutions on a 1 x 1 map are linear layers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vprompt.errors import ConfigError
from vprompt.methods.base import (
    Capabilities,
    MethodData,
    MethodExample,
    MethodOutput,
    PromptMethod,
)
from vprompt.methods.clip_common import clip_input_transform
from vprompt.methods.config import OptimConfig, check_fraction, check_int
from vprompt.methods.kgcoop import check_template
from vprompt.methods.registry import register_method
from vprompt.methods.vl_prompts import (
    MAX_DEPTH,
    MAX_PROMPT_TOKENS,
    check_depths,
    normal_prompts,
    require_deep_prompts,
    vl_optim,
)

MAX_TEACHER_DIM = 16384


@dataclass(frozen=True)
class PromptKDConfig:
    """PromptKD's settings.

    Attributes:
        teacher_model: The teacher backbone (``clip:ViT-L-14`` in the paper).
        teacher_weights: Its weights (a tag, file or folder; default: the model's default).
        teacher_pack: A prompt pack trained on the teacher (e.g. ``promptsrc`` on ViT-L/14);
            empty: the teacher is zero-shot CLIP with ``template``.
        teacher_dim: The teacher's joint embedding size E_t (768 for ViT-L/14): the
            projector's output and the stored text features' width (checked against the
            teacher when training starts).
        template: The zero-shot teacher's template (without ``teacher_pack``).
        n_ctx_vision: Student vision prompt tokens per layer.
        vision_depth: Student vision blocks 0 … J - 1 that get prompts (≥ 1).
        temperature: T of the distillation.
        kd_weight: Weight of the distillation loss.
        init_std: Standard deviation of the vision prompts' initialisation.
        augment: Random resized crop and flip, as the reference config.
        optim: Optimizer and schedule.
    """

    teacher_model: str = "clip:ViT-L-14"
    teacher_weights: str = ""
    teacher_pack: str = ""
    teacher_dim: int = 768
    template: str = "a photo of a {}."
    n_ctx_vision: int = 4
    vision_depth: int = 9
    temperature: float = 1.0
    kd_weight: float = 1.0
    init_std: float = 0.02
    augment: bool = True
    optim: OptimConfig = field(default_factory=lambda: vl_optim(lr=0.005, epochs=20, batch_size=8))

    def __post_init__(self) -> None:
        if not isinstance(self.teacher_model, str) or ":" not in self.teacher_model:
            raise ConfigError(f"teacher_model must be FAMILY:ARCH, got {self.teacher_model!r}")
        for name in ("teacher_weights", "teacher_pack"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string, got {getattr(self, name)!r}")
        check_int(self.teacher_dim, "teacher_dim", 1, MAX_TEACHER_DIM)
        check_template(self.template, "promptkd")
        check_int(self.n_ctx_vision, "n_ctx_vision", 1, MAX_PROMPT_TOKENS)
        check_int(self.vision_depth, "vision_depth", 1, MAX_DEPTH)
        if not check_fraction(self.temperature, "temperature") > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature!r}")
        check_fraction(self.kd_weight, "kd_weight")
        check_fraction(self.init_std, "init_std")


class Projector(nn.Module):
    """PromptKD's ``Feature_Trans_Module_two_layer``: Linear(E_s, E_t) → BatchNorm → ReLU →
    Linear(E_t, E_t) (its 1x1 convolutions on a 1 x 1 map)."""

    def __init__(self, width_in: int, width_out: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width_in, width_out)
        self.bn = nn.BatchNorm1d(width_out)
        self.fc2 = nn.Linear(width_out, width_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.bn(self.fc1(x))))


@register_method("promptkd")
class PromptKD(PromptMethod):
    """Student vision prompts and projector distilled from a prompted teacher, without labels.

    Learned tensors (the pack): ``vision.{k}`` (n x D), ``projector.*`` (with the batch-norm
    statistics) and ``teacher_text`` (C x E_t, the teacher's unit class text features).
    """

    Config = PromptKDConfig
    capabilities = Capabilities(inputs="images", retargets=True, uses_labels=False)
    state_hint = "(vision tokens, depth, teacher_dim and classes must match)"
    teacher_text: torch.Tensor

    def __init__(
        self, backbone: Any, classnames: Sequence[str], config: PromptKDConfig | None = None
    ) -> None:
        super().__init__(backbone, classnames, config)
        cfg = self.config
        clip = require_deep_prompts(backbone, self.name)
        check_depths(clip, self.name, text=0, vision=cfg.vision_depth)
        width = int(clip.vision_width)
        self.vision = normal_prompts(cfg.vision_depth, cfg.n_ctx_vision, width, cfg.init_std)
        self.projector = Projector(int(clip.embed_dim), cfg.teacher_dim)
        self.register_buffer("teacher_text", torch.zeros(len(self.classnames), cfg.teacher_dim))
        # The teacher is never part of the prompt's state (not a registered submodule).
        object.__setattr__(self, "_teacher", None)
        self.to(clip.logit_scale.device)

    @classmethod
    def examples(cls) -> list[MethodExample]:
        return [
            MethodExample(
                "clip:tiny",
                {
                    "teacher_model": "clip:tiny",
                    "teacher_weights": "none",
                    "teacher_dim": 32,
                    "vision_depth": 2,
                    "optim": {"batch_size": 4},
                },
            )
        ]

    # ------------------------------------------------------------------ the teacher
    def teacher(self) -> Any:
        """The teacher (loaded on first use: only training needs it): a method whose
        ``text_features()`` and logits score the student's classes."""
        if self.__dict__["_teacher"] is None:
            teacher = build_teacher(self.config, self.classnames, self.teacher_text.device)
            # Kept outside the module tree: never in packs, checkpoints or trainable parameters.
            object.__setattr__(self, "_teacher", teacher)
            text = teacher_text_features(teacher)
            if text.shape[1] != self.config.teacher_dim:
                raise ConfigError(
                    f"promptkd: the teacher {self.config.teacher_model} has {text.shape[1]}-d "
                    f"features; set teacher_dim={text.shape[1]}"
                )
            with torch.no_grad():
                self.teacher_text.copy_(F.normalize(text, dim=-1))
        return self.__dict__["_teacher"]

    def setup(self, data: MethodData) -> None:
        """Load the teacher and store its class text features before training starts."""
        self.teacher()

    # ------------------------------------------------------------------ forward
    def student_features(self, images: torch.Tensor) -> torch.Tensor:
        """B x E_t unit projected student image features."""
        feats = self.backbone.encode_image_prompted(images, list(self.vision)).float()
        return F.normalize(self.projector(feats), dim=-1)

    def forward(self, images: torch.Tensor) -> MethodOutput:
        """B x 3 x H x W → B x C student logits (+ ``aux_loss["kd"]`` in training)."""
        scale = self.backbone.logit_scale.float()
        logits = scale * self.student_features(images) @ self.teacher_text.T
        if not self.training:
            return MethodOutput(logits=logits)
        teacher = self.teacher()
        with torch.no_grad():
            teacher.eval()
            target = teacher(teacher_pixels(teacher, images, self.backbone)).logits.float()
        return MethodOutput(logits=logits, aux_loss={"kd": self.distillation(logits, target)})

    def distillation(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """kd_weight · T² · KL(teacher ‖ student) summed over the B x C logits, / (B · C)."""
        t = self.config.temperature
        kl = F.kl_div(
            F.log_softmax(student / t, dim=1), F.softmax(teacher / t, dim=1), reduction="sum"
        )
        return self.config.kd_weight * kl * (t * t) / student.numel()

    # ------------------------------------------------------------------ contract
    def input_transform(self, train: bool) -> Any:
        return clip_input_transform(self.backbone, train and self.config.augment)

    def retarget(
        self,
        classnames: Sequence[str],
        *,
        templates: Sequence[str] | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> Any:
        """The student for other classes: rows of the stored teacher features when it has
        them (base-to-novel), else the teacher scores the new classes (it must be available)."""
        names = list(classnames)
        config = dataclasses.replace(self.config, **settings) if settings else self.config
        other = type(self)(self.backbone, names, config)
        state = self.prompt_state()
        if all(n in self.classnames for n in names):
            rows = [self.classnames.index(n) for n in names]
            state["teacher_text"] = state["teacher_text"][rows]
            other.load_prompt_state(state)
        else:
            state["teacher_text"] = other.teacher_text.detach().cpu()
            other.load_prompt_state(state)
            other.teacher()  # fills teacher_text for the new classes
        return other.train(self.training)


def build_teacher(config: PromptKDConfig, classnames: Sequence[str], device: torch.device) -> Any:
    """The frozen teacher for ``classnames``: the pack's method on the teacher model, or
    zero-shot CLIP with the template."""
    from vprompt.backbones import load_backbone
    from vprompt.methods.zeroshot import ZeroShotClassifier, ZeroShotConfig

    weights = config.teacher_weights or None
    backbone = load_backbone(config.teacher_model, weights, device=device)
    if config.teacher_pack:
        from vprompt.engine.pack import build_from_pack, load_pack

        method = build_from_pack(load_pack(config.teacher_pack), backbone=backbone)
        if list(method.classnames) != list(classnames):
            method = method.retarget(list(classnames))
    else:
        clip = require_deep_prompts(backbone, "promptkd's teacher")
        names = [n.replace("_", " ") for n in classnames]  # as the prompt learners read them
        method = ZeroShotClassifier(clip, names, ZeroShotConfig(templates=(config.template,)))
    return method.to(device).eval()


def teacher_text_features(teacher: Any) -> torch.Tensor:
    """C x E_t class text features the teacher scores images with.

    Raises:
        ConfigError: The teacher's method has no class text features (not a CLIP text-prompt
            method).
    """
    from vprompt.methods.zeroshot import ZeroShotClassifier

    if isinstance(teacher, ZeroShotClassifier):
        return teacher.class_embeddings.detach().float()
    text_features = getattr(teacher, "text_features", None)
    if not callable(text_features):
        raise ConfigError(
            f"promptkd: the teacher's method {teacher.name} has no class text features to "
            "score the student with (use a CLIP text-prompt method such as promptsrc)"
        )
    with torch.no_grad():
        return torch.as_tensor(text_features()).detach().float()


def teacher_pixels(teacher: Any, images: torch.Tensor, student: Any) -> torch.Tensor:
    """The student's preprocessed images as the teacher expects them: resized (bicubic) when
    the input sizes differ; normalisation must agree."""
    mine, theirs = student.preprocess, teacher.backbone.preprocess
    if tuple(mine.mean) != tuple(theirs.mean) or tuple(mine.std) != tuple(theirs.std):
        raise ConfigError(
            "promptkd: teacher and student normalise pixels differently; pick a teacher of the "
            "same family"
        )
    size = (theirs.size, theirs.size) if isinstance(theirs.size, int) else tuple(theirs.size)
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode="bicubic", align_corners=False)
