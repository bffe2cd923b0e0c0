"""Bayes-PFL: Bayesian prompt flow learning for zero-shot anomaly detection (Qu et al., CVPR 2025).

The text prompt of an object is ``[SOS] ctx_1..ctx_P state_1..state_Q <object> . [EOS]``, one
per entry of a bank of ``n_prompts`` learned prompts, each in a normal and an abnormal version
(their own state vectors, shared context). Bayes-PFL makes it a distribution: a bias drawn from
an image-specific flow (:class:`~vprompt.anomaly.flows.ImageFlow`, conditioned on the image's
class-token feature) is added to every context vector, and one drawn from an image-agnostic
flow (:class:`~vprompt.anomaly.flows.StateFlow`, one for normal, one for abnormal) to every
state vector. Training draws one sample (reparameterised); scoring draws ``test_samples``
samples from a generator seeded with ``seed`` and averages the resulting probabilities.

Image scores compare a linear map of each text embedding with the global image feature; maps
compare the patch tokens of ``feature_layers`` (projected per layer, L2-normalised) with text
embeddings refined by residual cross-modal attention (RCA) over those patches. The loss is the
reference's sum: cross-entropy on one random prompt pair's image logits, focal + dice on its
maps at every layer, 0.01 x the three flows' KL terms and the prompts' orthogonality loss.
Shapes: B images, S the input side, N patches, V vision width, W text width, E joint width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from vprompt.anomaly.base import (
    AnomalyCapabilities,
    AnomalyExample,
    AnomalyMethod,
    AnomalyOutput,
    register_anomaly_method,
)
from vprompt.anomaly.flows import GaussianEncoder, ImageFlow, StateFlow, flow_kl, init_linear
from vprompt.anomaly.patch_features import smooth
from vprompt.errors import ConfigError
from vprompt.methods.config import OptimConfig, check_fraction, check_int

_REFERENCE_OPTIM = OptimConfig(
    optimizer="adam",
    lr=1e-4,
    betas=(0.5, 0.999),
    epochs=30,
    batch_size=32,
    warmup_epochs=3.0,
    step_unit="iteration",
)
# Reference dataset names → the words its prompts use.
_NAMES = {
    **{f"macaroni{i}": "macaroni" for i in (1, 2)},
    **{f"pcb{i}": "printed circuit board" for i in (1, 2, 3, 4)},
    **{"pipe_fryum": "pipe fryum", "chewinggum": "chewing gum", "metal_nut": "metal nut"},
}
_INIT_TEMPERATURE = math.log(1 / 0.07)


@dataclass(frozen=True)
class BayesPFLConfig:
    """Bayes-PFL settings (defaults: the reference's train.sh / test.sh).

    Attributes:
        n_ctx: Learned context vectors per prompt (P, ``--prompt_context_len 5``).
        n_state: Learned state vectors per prompt (Q, ``--prompt_state_len 5``).
        n_prompts: Prompts in the bank (``--prompt_num 3``).
        flow_steps: Planar flow steps of each distribution (K, ``--num_flows 10``).
        test_samples: Monte-Carlo samples when scoring (R, test.sh's ``--sample_num 10``).
        image_size: Input side (``--image_size 518``; the position embeddings are resized).
        feature_layers: 0-based vision blocks whose patch tokens make maps (6 12 18 24 1-based).
        kl_weight: Weight of each flow's KL term (the reference's 0.01).
        rca_heads: Attention heads of the residual cross-modal attention (4).
        sigma: Gaussian smoothing of the maps in pixels (the reference's test metric, 8).
        seed: Seeds the scoring samples (test.sh's ``--seed 333``).
        prompt_lr_scale: Rate of prompts and flow parameters over ``optim.lr`` (1e-3 / 1e-4).
        temperature_lr_scale: Rate of the two temperatures over ``optim.lr`` (1e-2 / 1e-4).
        optim: Adam, betas (0.5, 0.999), 1e-4 (the linear layers' rate), 30 epochs, batch 32,
            cosine schedule with 10% linear warm-up per iteration.
    """

    n_ctx: int = 5
    n_state: int = 5
    n_prompts: int = 3
    flow_steps: int = 10
    test_samples: int = 10
    image_size: int = 518
    feature_layers: tuple[int, ...] = (5, 11, 17, 23)
    kl_weight: float = 0.01
    rca_heads: int = 4
    sigma: float = 8.0
    seed: int = 333
    prompt_lr_scale: float = 10.0
    temperature_lr_scale: float = 100.0
    optim: OptimConfig = _REFERENCE_OPTIM

    def __post_init__(self) -> None:
        check_int(self.n_ctx, "n_ctx", 1, 32)
        check_int(self.n_state, "n_state", 1, 32)
        check_int(self.n_prompts, "n_prompts", 1, 32)
        check_int(self.flow_steps, "flow_steps", 0, 64)
        check_int(self.test_samples, "test_samples", 1, 256)
        check_int(self.image_size, "image_size", 8, 2048)
        check_int(self.rca_heads, "rca_heads", 1, 64)
        check_int(self.seed, "seed", 0, 2**63 - 1)
        layers = tuple(self.feature_layers)
        if not layers or len(layers) > 48 or len(set(layers)) != len(layers):
            raise ConfigError(f"feature_layers must be 1-48 distinct blocks, got {layers!r}")
        for layer in layers:
            check_int(layer, "feature_layers entries", 0, 255)
        object.__setattr__(self, "feature_layers", layers)
        check_fraction(self.kl_weight, "kl_weight")
        if check_fraction(self.sigma, "sigma") > 64:
            raise ConfigError(f"sigma must be at most 64 pixels, got {self.sigma}")
        if check_fraction(self.prompt_lr_scale, "prompt_lr_scale") <= 0:
            raise ConfigError(f"prompt_lr_scale must be > 0, got {self.prompt_lr_scale}")
        if check_fraction(self.temperature_lr_scale, "temperature_lr_scale") <= 0:
            raise ConfigError(f"temperature_lr_scale must be > 0, got {self.temperature_lr_scale}")
        if not isinstance(self.optim, OptimConfig):
            raise ConfigError("optim must be an OptimConfig")


@dataclass
class TrainingDraw:
    """The randomness of one training step (so a loss can be recomputed exactly).

    Attributes:
        eps_context: B x W standard normal draws of the image-specific flow.
        eps_normal: 1 x W draws of the normal image-agnostic flow.
        eps_abnormal: 1 x W draws of the abnormal one.
        prompt: The bank entry whose normal / abnormal pair is trained this step.
    """

    eps_context: torch.Tensor
    eps_normal: torch.Tensor
    eps_abnormal: torch.Tensor
    prompt: int


class ResidualCrossAttention(nn.Module):
    """RCA: text embeddings attend over one layer's projected patch tokens, plus a residual.

    Per layer l: ``F_s = norm(P_l patches)``; queries ``Q t`` split into heads, keys = values =
    ``F_s``; ``t' = norm(softmax(q k^T / sqrt(E)) v + t)`` (the reference scales by the full
    width, not the head width).
    """

    def __init__(self, *, vision_width: int, embed_dim: int, heads: int, layers: int) -> None:
        super().__init__()
        if embed_dim % heads:
            raise ConfigError(f"rca_heads {heads} must divide the joint width {embed_dim}")
        self.heads = heads
        self.query = nn.Linear(embed_dim, embed_dim)  # the reference's 1x1 Conv1d
        self.patch_proj = nn.ModuleList(
            nn.Linear(vision_width, embed_dim, bias=False) for _ in range(layers)
        )

    def forward(
        self, text: torch.Tensor, patches: torch.Tensor, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """B x T x E text, B x N x V patches → refined text (B x T x E), patches (B x N x E)."""
        fs = F.normalize(self.patch_proj[layer](patches), dim=-1)
        b, t, e = text.shape
        n, h = fs.shape[1], self.heads
        q = self.query(text).view(b, t, h, e // h)
        kv = fs.view(b, n, h, e // h)
        attn = (torch.einsum("bthc,bnhc->bhtn", q, kv) * e**-0.5).softmax(dim=-1)
        out = torch.einsum("bhtn,bnhc->bthc", attn, kv).reshape(b, t, e)
        return F.normalize(out + text, dim=-1), fs


def focal_loss(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The reference's focal loss (gamma 2): foreground and background pixels averaged apart,
    then added. probs B x 2 x S x S (softmaxed), target B x S x S in {0, 1}."""
    pt = torch.where(target > 0, probs[:, 1], probs[:, 0])
    loss = -((1 - pt) ** 2) * torch.log(pt + 1e-8)
    fg = (target > 0).to(loss.dtype)
    bg = 1.0 - fg
    return (loss * fg).sum() / (fg.sum() + 1e-8) + (loss * bg).sum() / (bg.sum() + 1e-8)


def dice_loss(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The reference's dice loss: the abnormal channel only, over the whole batch at once."""
    inter = (probs[:, 1] * target).sum()
    return 1 - (2 * inter + 1e-5) / (probs[:, 1].sum() + target.sum() + 1e-5)


def orthogonal_loss(text: torch.Tensor, n_prompts: int) -> torch.Tensor:
    """Mean squared off-diagonal cosine among the normal prompts, plus among the abnormal ones.
    text: B x 2n x E."""
    total = text.new_zeros(())
    for part in (text[:, :n_prompts], text[:, n_prompts:]):
        unit = F.normalize(part, dim=-1)
        cos2 = torch.einsum("blc,bkc->blk", unit, unit) ** 2
        eye = torch.eye(part.shape[1], device=text.device, dtype=text.dtype)
        total = total + (cos2 * (1 - eye)).mean()
    return total


@register_anomaly_method("bayes-pfl")
class BayesPFL(AnomalyMethod):
    """Bayes-PFL on a frozen CLIP ViT (the learned state is everything outside ``backbone``)."""

    Config = BayesPFLConfig
    capabilities = AnomalyCapabilities(
        family="clip", zero_shot=True, trains=True, uses_object_name=True
    )
    default_model = "clip:ViT-L-14-336"
    tiny_model = "clip:tiny"
    lr_schedule = "warmup-cosine"

    def __init__(self, backbone: Any, config: Any = None, *, object_name: str = "object") -> None:
        super().__init__(backbone, config, object_name=object_name)
        cfg: BayesPFLConfig = self.config
        blocks = len(backbone.vision_blocks)
        if max(cfg.feature_layers) >= blocks:
            raise ConfigError(
                f"feature_layers {cfg.feature_layers}: {backbone.name} has {blocks} vision blocks"
            )
        text_w, embed, vis = backbone.text_width, backbone.embed_dim, backbone.vision_width
        self.ctx = nn.Parameter(torch.empty(cfg.n_prompts, cfg.n_ctx, text_w))
        self.state_normal = nn.Parameter(torch.empty(cfg.n_prompts, cfg.n_state, text_w))
        self.state_abnormal = nn.Parameter(torch.empty(cfg.n_prompts, cfg.n_state, text_w))
        nn.init.trunc_normal_(self.ctx, mean=0.0, std=0.02)
        nn.init.trunc_normal_(self.state_normal, mean=0.5, std=0.02)
        nn.init.trunc_normal_(self.state_abnormal, mean=-0.5, std=0.02)
        self.temperature_pixel = nn.Parameter(torch.tensor(_INIT_TEMPERATURE))
        self.temperature_image = nn.Parameter(torch.tensor(_INIT_TEMPERATURE))
        hidden = max(vis // 2, 1)
        self.context_flow = ImageFlow(
            d_in=embed, d_hidden=hidden, d_out=text_w, steps=cfg.flow_steps
        )
        # One encoder for both image-agnostic flows, as in the reference.
        self.state_encoder = GaussianEncoder(embed, hidden, text_w)
        self.normal_flow = StateFlow(d_in=embed, d_out=text_w, steps=cfg.flow_steps)
        self.abnormal_flow = StateFlow(d_in=embed, d_out=text_w, steps=cfg.flow_steps)
        self.rca = ResidualCrossAttention(
            vision_width=vis, embed_dim=embed, heads=cfg.rca_heads, layers=len(cfg.feature_layers)
        )
        self.class_mapping = nn.Linear(embed, embed)
        init_linear(self.context_flow)
        init_linear(self.state_encoder)
        init_linear(self.class_mapping)
        init_linear(self.rca.patch_proj)  # the query keeps Conv1d's default init, as there
        self._prompt_cache: tuple[str, torch.Tensor, int] | None = None

    @classmethod
    def examples(cls) -> list[AnomalyExample]:
        tiny = {
            "image_size": 32,
            "feature_layers": [0, 1],
            "n_ctx": 2,
            "n_state": 2,
            "n_prompts": 2,
            "flow_steps": 2,
            "test_samples": 2,
            "sigma": 1.0,
        }
        return [AnomalyExample(cls.tiny_model, tiny)]

    def parameter_groups(self) -> list[Any]:
        """The reference's learning-rate groups as ``{"params", "lr_scale"}`` (scales over
        ``optim.lr``): prompts and image-agnostic / amortised flow parameters, temperatures,
        and the rest (encoders, RCA, class mapping) at ``optim.lr``."""
        cfg: BayesPFLConfig = self.config
        fast, temps, rest = [], [], []
        for name, p in self.named_parameters():
            if name.startswith("backbone."):
                continue
            if name.startswith("temperature"):
                temps.append(p)
            elif name.startswith(("ctx", "state_", "normal_flow", "abnormal_flow")) or (
                name.startswith("context_flow.amor")
            ):
                fast.append(p)
            else:
                rest.append(p)
        return [
            {"params": fast, "lr_scale": cfg.prompt_lr_scale},
            {"params": temps, "lr_scale": cfg.temperature_lr_scale},
            {"params": rest, "lr_scale": 1.0},
        ]

    # ------------------------------------------------------------------ image side
    def image_features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """B x 3 x S x S → global features (B x E) and each feature layer's patch tokens
        (B x N x V, straight from the block, before any norm)."""
        bb = self.backbone
        x = _vision_tokens(bb, pixels)
        prefix = int(bb.num_prefix_tokens)
        wanted = self.config.feature_layers
        found: dict[int, torch.Tensor] = {}
        for i, block in enumerate(bb.vision_blocks):
            x = block(x)
            if i in wanted:
                found[i] = x[:, prefix:]
        return bb.pool_vision_tokens(x), [found[i] for i in wanted]

    # ------------------------------------------------------------------ text side
    def _prompt(self) -> tuple[torch.Tensor, int]:
        """Token embeddings of ``X <object>`` (1 x L x W) and its end-token position."""
        name = f"{self.object_name}@{self.ctx.device}"  # moving the method re-embeds
        if self._prompt_cache is None or self._prompt_cache[0] != name:
            words = _NAMES.get(self.object_name, self.object_name).lower()
            with torch.no_grad():
                tokens = self.backbone.tokenize([f"X {words}"])
                emb = self.backbone.embed_tokens(tokens)
                eot = int(self.backbone.eot_index(tokens)[0])
            self._prompt_cache = (name, emb, eot)
        return self._prompt_cache[1], self._prompt_cache[2]

    def text_embeddings(
        self, z_ctx: torch.Tensor, z_normal: torch.Tensor, z_abnormal: torch.Tensor
    ) -> torch.Tensor:
        """Normalised prompt embeddings for M bias rows.

        Args:
            z_ctx: M x W biases added to every context vector.
            z_normal: M x W (or 1 x W) biases added to the normal state vectors.
            z_abnormal: M x W (or 1 x W) biases added to the abnormal state vectors.

        Returns:
            M x 2n x E: the n normal prompts, then the n abnormal ones.
        """
        emb, eot = self._prompt()
        cfg: BayesPFLConfig = self.config
        m, n = z_ctx.shape[0], cfg.n_prompts
        ctx = self.ctx[None] + z_ctx[:, None, None]  # M x n x P x W
        normal = self.state_normal[None] + z_normal[:, None, None].expand(m, -1, -1, -1)
        abnormal = self.state_abnormal[None] + z_abnormal[:, None, None].expand(m, -1, -1, -1)
        learned = torch.cat(
            [torch.cat([ctx, normal], dim=2), torch.cat([ctx, abnormal], dim=2)], dim=1
        )  # M x 2n x (P + Q) x W
        k = learned.shape[2]
        length = min(eot + k, self.backbone.context_length)
        if not self.backbone.truncatable:
            length = self.backbone.context_length
        # "X" (position 1) is replaced by the learned vectors; the end token moves with them.
        rest = emb[0, 2 : 2 + length - 1 - k]
        total = m * 2 * n
        seq = torch.cat(
            [
                emb[0, :1].expand(total, 1, -1),
                learned.reshape(total, k, -1).to(emb.dtype),
                rest.expand(total, -1, -1),
            ],
            dim=1,
        )
        eot_new = torch.full((total,), min(eot + k - 1, length - 1), device=seq.device)
        feats = self.backbone.encode_text_embeddings(seq, eot_new)
        return F.normalize(feats.float(), dim=-1).view(m, 2 * n, -1)

    # ------------------------------------------------------------------ heads
    def _logits(
        self, text: torch.Tensor, global_feat: torch.Tensor, patches: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """B x T x E text → image logits (B x T) and per-layer maps (B x T x S x S)."""
        mapped = F.normalize(self.class_mapping(text), dim=-1)
        img = F.normalize(global_feat.float(), dim=-1)
        logits = self.temperature_image.exp() * (mapped @ img.unsqueeze(2)).squeeze(2)
        side, maps = self.config.image_size, []
        for layer, tokens in enumerate(patches):
            refined, dense = self.rca(text, tokens.float(), layer)
            m = self.temperature_pixel.exp() * dense @ refined.transpose(1, 2)  # B x N x T
            b, n, t = m.shape
            g = math.isqrt(n)
            grid = m.transpose(1, 2).reshape(b, t, g, g)
            maps.append(F.interpolate(grid, size=side, mode="bilinear", align_corners=True))
        return logits, maps

    # ------------------------------------------------------------------ training
    def draw_training(self, batch: int, device: torch.device) -> TrainingDraw:
        """One training step's randomness from the global generator (as the reference)."""
        width = self.ctx.shape[-1]
        return TrainingDraw(
            eps_context=torch.randn(batch, width, device=device),
            eps_normal=torch.randn(1, width, device=device),
            eps_abnormal=torch.randn(1, width, device=device),
            prompt=int(torch.randint(0, self.config.n_prompts, (1,))),
        )

    def training_loss(
        self, pixels: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        draw = self.draw_training(pixels.shape[0], pixels.device)
        return self.loss_terms(pixels, labels, masks, draw)

    def loss_terms(
        self, pixels: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, draw: TrainingDraw
    ) -> dict[str, torch.Tensor]:
        """The reference's loss terms for one batch and one draw (their sum is back-propagated).

        Args:
            pixels: B x 3 x S x S; labels: B (0 normal, 1 anomalous); masks: B x S x S.
            draw: The step's samples and chosen prompt pair.
        """
        cfg: BayesPFLConfig = self.config
        b = pixels.shape[0]
        with torch.no_grad():
            global_feat, patches = self.image_features(pixels)
        g = global_feat.float()
        z0, zk, logdet, mean, var = self.context_flow(g, draw.eps_context)
        kl_ctx = flow_kl(z0, zk, mean, var, logdet, b)
        state_terms, state_z = [], []
        for flow, eps in (
            (self.normal_flow, draw.eps_normal),
            (self.abnormal_flow, draw.eps_abnormal),
        ):
            s0, sk, s_logdet, s_mean, s_var = flow(self.state_encoder, eps)
            # The reference divides the single-sample state KL by the image batch size too.
            state_terms.append(flow_kl(s0, sk, s_mean, s_var, s_logdet, b))
            state_z.append(sk)
        text = self.text_embeddings(zk, state_z[0], state_z[1])  # B x 2n x E
        logits, maps = self._logits(text, g, patches)
        pair = [draw.prompt, draw.prompt + cfg.n_prompts]
        target = (masks > 0.5).to(logits.dtype)
        focal = logits.new_zeros(())
        dice = logits.new_zeros(())
        for layer_map in maps:
            probs = layer_map[:, pair].softmax(dim=1)
            focal = focal + focal_loss(probs, target)
            dice = dice + dice_loss(probs, target)
        return {
            "class": F.cross_entropy(logits[:, pair], labels.long()),
            "focal": focal,
            "dice": dice,
            "kl_context": cfg.kl_weight * kl_ctx,
            "kl_normal": cfg.kl_weight * state_terms[0],
            "kl_abnormal": cfg.kl_weight * state_terms[1],
            "orthogonal": orthogonal_loss(text, cfg.n_prompts),
        }

    # ------------------------------------------------------------------ scoring
    def scoring_draws(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The R x W draws (context, normal, abnormal) from a CPU generator seeded with
        ``seed``: the same pack gives the same samples on any device and batch."""
        gen = torch.Generator().manual_seed(self.config.seed)
        shape = (self.config.test_samples, self.ctx.shape[-1])
        normal = torch.randn(shape, generator=gen)
        abnormal = torch.randn(shape, generator=gen)
        context = torch.randn(shape, generator=gen)
        return context, normal, abnormal

    @torch.no_grad()
    def score(self, pixels: torch.Tensor) -> AnomalyOutput:
        cfg: BayesPFLConfig = self.config
        device = pixels.device
        eps_ctx, eps_n, eps_a = (e.to(device) for e in self.scoring_draws())
        global_feat, patches = self.image_features(pixels)
        g = global_feat.float()
        b, r, n = g.shape[0], cfg.test_samples, cfg.n_prompts
        # Every image uses the same R draws, so its scores do not depend on its batch.
        _, zk, _, _, _ = self.context_flow(g, eps_ctx[:, None].expand(r, b, -1))  # R x B x W
        _, zn, _, _, _ = self.normal_flow(self.state_encoder, eps_n)  # R x W
        _, za, _, _, _ = self.abnormal_flow(self.state_encoder, eps_a)
        rows = zk.transpose(0, 1).reshape(b * r, -1)
        text = self.text_embeddings(rows, zn.repeat(b, 1), za.repeat(b, 1))  # BR x 2n x E
        text = text.view(b, r, 2, n, -1).permute(0, 2, 1, 3, 4).reshape(b, 2 * r * n, -1)
        logits, maps = self._logits(text, g, patches)
        half = r * n
        pairs = torch.stack([logits[:, :half], logits[:, half:]], dim=-1).softmax(dim=-1)
        image_scores = pairs[..., 1].mean(dim=1)
        total = torch.zeros(b, cfg.image_size, cfg.image_size, device=device)
        for layer_map in maps:
            stacked = torch.stack([layer_map[:, :half], layer_map[:, half:]], dim=-1)
            total = total + stacked.softmax(dim=-1)[..., 1].mean(dim=1)
        return AnomalyOutput(image_scores=image_scores, maps=smooth(total / len(maps), cfg.sigma))


def _vision_tokens(backbone: Any, pixels: torch.Tensor) -> torch.Tensor:
    """What enters the first vision block, at any input side: the position embeddings of the
    patch grid are resized bicubically (antialiased) when the side is not the backbone's own,
    as the reference resizes them to run ViT-L-14-336 at 518 pixels."""
    if pixels.shape[-1] == int(backbone.preprocess.size[0]):
        return backbone.vision_tokens(pixels)
    visual = getattr(backbone, "model", None)
    visual = getattr(visual, "visual", None)
    needed = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "patch_dropout")
    if visual is None or not all(hasattr(visual, a) for a in needed):
        raise ConfigError(
            f"{backbone.name}: image_size {pixels.shape[-1]} differs from its own "
            f"{backbone.preprocess.size[0]} and its tower cannot resize position embeddings"
        )
    x = visual.conv1(pixels)  # B x V x g x g
    grid = x.shape[-1]
    x = x.flatten(2).transpose(1, 2)
    pos = visual.positional_embedding
    old = math.isqrt(pos.shape[0] - 1)
    img_pos = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    img_pos = F.interpolate(
        img_pos, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False
    )
    new_pos = torch.cat([pos[:1].float(), img_pos.permute(0, 2, 3, 1).reshape(grid * grid, -1)])
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
    x = torch.cat([cls, x], dim=1) + new_pos.to(x.dtype)
    return visual.ln_pre(visual.patch_dropout(x))


__all__ = [
    "BayesPFL",
    "BayesPFLConfig",
    "TrainingDraw",
    "dice_loss",
    "focal_loss",
    "orthogonal_loss",
]
