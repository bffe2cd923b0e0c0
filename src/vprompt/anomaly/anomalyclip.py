"""AnomalyCLIP: object-agnostic prompt learning for zero-shot anomaly detection
(Zhou et al., ICLR 2024).

Two learned text prompts, ``"[X]₁ … [X]ₘ object."`` (normal) and ``"[X]₁ … [X]ₘ damaged
object."`` (abnormal), whose m context tokens are learned separately, plus deep text prompts
of t tokens that replace positions ``1 … t`` entering text blocks ``1 … depth - 1`` (the
reference's compound prompts). They never name the inspected object, so one training run on an
auxiliary dataset (VisA, or MVTec AD) scores any other object zero-shot.

Images go through the frozen vision tower with V-V attention (DPAM) in its last blocks
(:mod:`vprompt.backbones.clip_anomaly`): the global feature is the original path's class token,
the dense features are the V-V path's patch tokens of the chosen blocks. With τ = 0.07:

* image score: ``softmax(⟨g, t⟩ / τ)[abnormal]`` of the normalised global feature g;
* map: per chosen block, ``softmax(⟨p, t⟩ / τ)`` of every normalised patch feature p, resized
  bilinearly to S x S; ``(P_abnormal + 1 - P_normal) / 2`` summed over the blocks, then a
  Gaussian of σ = 4 px (scipy ``gaussian_filter``);
* training loss: cross-entropy of the image logits, plus ``λ Σ_blocks (focal + dice(P_abn, y)
  + dice(P_norm, 1 - y))`` with λ = 4.

Defaults follow zqhang/AnomalyCLIP (``train.sh`` / ``test.sh`` and ``train.py`` at 45ed4dd):
ViT-L/14@336 at 518 px, m = 12, depth 9, t = 4, DPAM in the last 19 blocks (``DPAM_layer =
20``), dense features of block 24 only (``--features_list 24`` since the April 2025 fix;
before it, the four maps of blocks 6/12/18/24 were all block 24's, which λ = 4 now stands for),
Adam (lr 0.001, betas (0.5, 0.999)) at a constant rate, batch 8, 15 epochs. Parameters are
drawn in the reference's order (normal context, abnormal context, deep prompts; N(0, 0.02²)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vprompt.anomaly.base import (
    AnomalyCapabilities,
    AnomalyExample,
    AnomalyMethod,
    AnomalyOutput,
    register_anomaly_method,
)
from vprompt.anomaly.losses import dice_loss, focal_loss
from vprompt.anomaly.patch_features import smooth
from vprompt.backbones import clip_anomaly
from vprompt.errors import ConfigError
from vprompt.methods.config import OptimConfig, check_fraction, check_int

MAX_TOKENS = 64
MAX_BLOCKS = 1024
# The reference's prompt templates: the object word never changes (object-agnostic).
NORMAL_TEXT = "object."
ABNORMAL_TEXT = "damaged object."


def _reference_optim() -> OptimConfig:
    return OptimConfig(optimizer="adam", lr=0.001, betas=(0.5, 0.999), epochs=15, batch_size=8)


@dataclass(frozen=True)
class AnomalyCLIPConfig:
    """AnomalyCLIP's settings (reference flag names in parentheses).

    Attributes:
        n_ctx: m, learned context tokens of each of the two prompts (``--n_ctx``).
        depth: Text blocks with learned tokens: the context enters block 0, deep prompts
            blocks ``1 … depth - 1`` (``--depth``; 1: no deep prompts).
        t_n_ctx: t, the deep prompt tokens per block, replacing positions ``1 … t``
            (``--t_n_ctx``; at most ``n_ctx``, so they replace context tokens only).
        init_std: Standard deviation of the N(0, σ²) initial prompts.
        dpam_start: The first vision block (0-based) with the V-V path; the tower's block
            count leaves DPAM off (``DPAM_layer = 20`` on 24 blocks: the last 19, from 5).
        feature_layers: 0-based vision blocks whose V-V patch tokens give maps
            (``--features_list 24``: block 23).
        image_size: S, the side the model sees (positional embeddings resized bilinearly);
            None: the backbone's own (``--image_size``).
        temperature: τ dividing every cosine similarity (the reference's fixed 0.07).
        local_weight: λ on the pixel losses (``lam``).
        sigma: σ in pixels of the Gaussian smoothing the test maps (``--sigma``; 0: none).
        focal_gamma: γ of the focal loss.
        global_norm: Apply the tower's final norm to the class token before projecting it.
            The reference projects the raw class token (False).
        optim: Optimizer settings (the anomaly trainer uses a constant rate).
    """

    n_ctx: int = 12
    depth: int = 9
    t_n_ctx: int = 4
    init_std: float = 0.02
    dpam_start: int = 5
    feature_layers: tuple[int, ...] = (23,)
    image_size: int | None = 518
    temperature: float = 0.07
    local_weight: float = 4.0
    sigma: float = 4.0
    focal_gamma: float = 2.0
    global_norm: bool = False
    optim: OptimConfig = field(default_factory=_reference_optim)

    def __post_init__(self) -> None:
        check_int(self.n_ctx, "n_ctx", 1, MAX_TOKENS)
        check_int(self.depth, "depth", 1, MAX_TOKENS)
        check_int(self.t_n_ctx, "t_n_ctx", 1, self.n_ctx)
        check_fraction(self.init_std, "init_std")
        check_int(self.dpam_start, "dpam_start", 0, MAX_BLOCKS)
        layers = self.feature_layers
        if not isinstance(layers, tuple | list) or not layers:
            raise ConfigError(
                f"feature_layers must be a non-empty list of block indices, got {layers!r}"
            )
        for i in layers:
            check_int(i, "feature_layers entries", 0, MAX_BLOCKS - 1)
        if len(set(layers)) != len(layers):
            raise ConfigError(f"feature_layers must not repeat a block, got {list(layers)}")
        object.__setattr__(self, "feature_layers", tuple(layers))
        if self.image_size is not None:
            check_int(self.image_size, "image_size", 8, 4096)
        if check_fraction(self.temperature, "temperature") <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature!r}")
        check_fraction(self.local_weight, "local_weight")
        check_fraction(self.sigma, "sigma")
        check_fraction(self.focal_gamma, "focal_gamma")
        if not isinstance(self.global_norm, bool):
            raise ConfigError(f"global_norm must be true or false, got {self.global_norm!r}")
        if not isinstance(self.optim, OptimConfig):
            raise ConfigError("optim must be an OptimConfig")


@register_anomaly_method("anomalyclip")
class AnomalyCLIP(AnomalyMethod):
    """Object-agnostic learned text prompts against V-V attention features.

    Learned tensors (the pack): ``ctx_normal`` and ``ctx_abnormal`` (m x W each),
    ``deep.{k}`` (t x W, entering text block k + 1).
    """

    Config = AnomalyCLIPConfig
    capabilities = AnomalyCapabilities(family="clip", zero_shot=True, trains=True)
    default_model = "clip:ViT-L-14-336"
    tiny_model = "clip:tiny"

    prompt_embeddings: torch.Tensor
    eot: torch.Tensor

    def __init__(
        self, backbone: Any, config: AnomalyCLIPConfig | None = None, *, object_name: str = "object"
    ) -> None:
        super().__init__(backbone, config, object_name=object_name)
        cfg: AnomalyCLIPConfig = self.config
        self._check_backbone(cfg)
        width = int(backbone.text_width)
        # The reference's draw order: normal context, abnormal context, then the deep prompts.
        self.ctx_normal = nn.Parameter(torch.empty(cfg.n_ctx, width))
        self.ctx_abnormal = nn.Parameter(torch.empty(cfg.n_ctx, width))
        self.deep = nn.ParameterList(
            nn.Parameter(torch.empty(cfg.t_n_ctx, width)) for _ in range(cfg.depth - 1)
        )
        for p in (self.ctx_normal, self.ctx_abnormal, *self.deep):
            nn.init.normal_(p, std=cfg.init_std)
        device = backbone.logit_scale.device
        tokens = backbone.tokenize([self.prompt_text(normal) for normal in (True, False)])
        eot = backbone.eot_index(tokens)
        if backbone.truncatable:
            # Causal tower: tokens after the pooled one cannot change its feature.
            tokens = tokens[:, : int(eot.max()) + 1]
        if not bool((tokens[:, 1 : 1 + cfg.n_ctx] == tokens[0, 1]).all()):
            raise ConfigError(f"{backbone.name}: its tokenizer does not give one token per 'X'")
        with torch.no_grad():
            embeddings = backbone.embed_tokens(tokens).float()  # 2 x L x W
        # Frozen word embeddings, rebuilt from the backbone: not part of the learned state.
        self.register_buffer("prompt_embeddings", embeddings, persistent=False)
        self.register_buffer("eot", eot, persistent=False)
        self.to(device)

    def prompt_text(self, normal: bool) -> str:
        """The prompt string whose ``X`` tokens the learned context replaces."""
        words = " ".join(["X"] * self.config.n_ctx)
        return f"{words} {NORMAL_TEXT if normal else ABNORMAL_TEXT}"

    def _check_backbone(self, cfg: AnomalyCLIPConfig) -> None:
        b = self.backbone
        if not getattr(b, "is_vit", False) or not getattr(b, "text_layers", 0):
            raise ConfigError(f"{self.name} needs a ViT CLIP with a text tower, got {b.name}")
        if cfg.depth > b.text_layers:
            raise ConfigError(
                f"{self.name}: depth {cfg.depth} exceeds the {b.text_layers} text blocks of "
                f"{b.name}"
            )
        blocks = clip_anomaly.vision_blocks(b)
        if cfg.dpam_start > blocks:
            raise ConfigError(
                f"{self.name}: dpam_start {cfg.dpam_start} exceeds the {blocks} vision blocks "
                f"of {b.name} (set it to {blocks} to turn DPAM off)"
            )
        if max(cfg.feature_layers) >= blocks:
            raise ConfigError(
                f"{self.name}: feature_layers {list(cfg.feature_layers)} must be blocks 0-"
                f"{blocks - 1} of {b.name}"
            )
        patch = clip_anomaly.patch_size(b)
        if self.frame.size % patch:
            raise ConfigError(
                f"{self.name}: image_size {self.frame.size} must be a multiple of {b.name}'s "
                f"patch size {patch}"
            )

    @classmethod
    def examples(cls) -> list[AnomalyExample]:
        # Lists and numbers only: the contract tests pass these as `key=value` strings.
        tiny = {"depth": 2, "dpam_start": 1, "feature_layers": [1], "image_size": 32}
        return [
            AnomalyExample(cls.tiny_model, tiny),
            AnomalyExample(
                cls.tiny_model,
                {
                    **tiny,
                    "n_ctx": 3,
                    "t_n_ctx": 2,
                    "dpam_start": 0,
                    "feature_layers": [0, 1],
                    "image_size": 48,
                    "sigma": 1.0,
                },
            ),
        ]

    # ------------------------------------------------------------------ features
    def text_features(self) -> torch.Tensor:
        """2 x E normalised text features: row 0 normal, row 1 abnormal."""
        m = self.config.n_ctx
        emb = self.prompt_embeddings
        ctx = torch.stack([self.ctx_normal, self.ctx_abnormal])  # 2 x m x W
        prompts = torch.cat([emb[:, :1], ctx.to(emb.dtype), emb[:, 1 + m :]], dim=1)
        feats = self.backbone.encode_text_embeddings(
            prompts, self.eot, deep=list(self.deep), deep_start=1
        ).float()
        return F.normalize(feats, dim=-1)

    def image_features(self, pixels: torch.Tensor) -> clip_anomaly.DualPathFeatures:
        """Normalised global (B x E) and patch (B x N x E per block) features, no gradient:
        the vision tower learns nothing."""
        cfg: AnomalyCLIPConfig = self.config
        if pixels.dim() != 4 or pixels.shape[1] != 3 or pixels.shape[2] != pixels.shape[3]:
            raise ConfigError(
                f"{self.name}: pixels must be B x 3 x S x S, got {tuple(pixels.shape)}"
            )
        with torch.no_grad():
            out = clip_anomaly.dual_path_features(
                self.backbone,
                pixels,
                dpam_start=cfg.dpam_start,
                layers=cfg.feature_layers,
                global_norm=cfg.global_norm,
            )
        out.image = F.normalize(out.image.float(), dim=-1)
        out.patches = [F.normalize(p.float(), dim=-1) for p in out.patches]
        return out

    def probability_maps(
        self, feats: clip_anomaly.DualPathFeatures, text: torch.Tensor, size: int
    ) -> list[torch.Tensor]:
        """One B x 2 x S x S map of (normal, abnormal) probabilities per feature block."""
        maps = []
        for patches in feats.patches:
            probs = (patches @ text.T / self.config.temperature).softmax(-1)  # B x N x 2
            grid = probs.reshape(probs.shape[0], feats.grid, feats.grid, 2).permute(0, 3, 1, 2)
            maps.append(
                F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
            )
        return maps

    # ------------------------------------------------------------------ contract
    def score(self, pixels: torch.Tensor) -> AnomalyOutput:
        text = self.text_features()
        feats = self.image_features(pixels)
        logits = feats.image @ text.T / self.config.temperature  # B x 2
        image_scores = logits.softmax(-1)[:, 1]
        maps = sum(
            (p[:, 1] + 1.0 - p[:, 0]) / 2.0
            for p in self.probability_maps(feats, text, pixels.shape[-1])
        )
        assert isinstance(maps, torch.Tensor)
        return AnomalyOutput(image_scores=image_scores, maps=smooth(maps, self.config.sigma))

    def training_loss(
        self, pixels: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Image cross-entropy, and λ-weighted focal and dice (both channels) of every block."""
        cfg: AnomalyCLIPConfig = self.config
        text = self.text_features()
        feats = self.image_features(pixels)
        if masks.dim() == 4:
            masks = masks[:, 0]
        gt = (masks > 0.5).to(text.dtype)  # the reference binarises at 0.5
        logits = feats.image @ text.T / cfg.temperature
        image_ce = F.cross_entropy(logits, labels.long().to(logits.device))
        focal = text.new_zeros(())
        dice = text.new_zeros(())
        for probs in self.probability_maps(feats, text, pixels.shape[-1]):
            focal = focal + focal_loss(probs, gt, gamma=cfg.focal_gamma)
            dice = dice + dice_loss(probs[:, 1], gt) + dice_loss(probs[:, 0], 1.0 - gt)
        return {
            "image_ce": image_ce,
            "focal": cfg.local_weight * focal,
            "dice": cfg.local_weight * dice,
        }


__all__ = ["AnomalyCLIP", "AnomalyCLIPConfig"]
