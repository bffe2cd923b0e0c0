"""``patch-memory``: few-shot anomaly detection on any frozen backbone's patch features
(PatchCore, Roth et al. CVPR 2022), so a frozen ImageNet CNN inspects with no text at all.

The normal references' locally aggregated patch features (:mod:`~vprompt.anomaly.patch_features`)
form a memory bank, thinned by approximate greedy coreset subsampling; a test patch's score is
its squared distance to the nearest bank entry (the reference's faiss ``IndexFlatL2`` with
k = 1), the image score the largest patch score, and the map the patch scores resized
bilinearly to S x S and smoothed by a Gaussian of sigma 4 (the reference's
``RescaleSegmentor``). Defaults are the reference's MVTec command: ``layer2`` + ``layer3``
(stride-8 and stride-16 stages; :func:`~vprompt.backbones.dense.default_layers` finds them on
any CNN), 3 x 3 neighbourhoods, 1024 / 1024 dimensions, 10% coreset, resize 256 → crop 224.

Memory stays bounded for any number of references: the features wait in a buffer of at most
``max_rows`` rows; when it would overflow, the buffer is coreset-reduced by the same fraction
and filling continues (with everything fitting at once, which covers the papers' few-shot and
full-shot MVTec settings at the default, this is exactly the reference's single coreset).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from vprompt.anomaly.base import (
    AnomalyCapabilities,
    AnomalyExample,
    AnomalyMethod,
    AnomalyOutput,
    register_anomaly_method,
)
from vprompt.anomaly.patch_features import (
    greedy_coreset,
    nearest_distances,
    patch_embeddings,
    smooth,
    upsample_grid,
)
from vprompt.backbones.dense import check_layers, default_layers
from vprompt.errors import ConfigError
from vprompt.methods.config import check_int

MAX_DIM = 8192
MAX_BANK_ROWS = 1 << 22


@dataclass(frozen=True)
class PatchMemoryConfig:
    """PatchCore's settings (defaults: the reference's MVTec run, ``run_patchcore.py``).

    Attributes:
        layers: Layers whose features are used (module paths on CNNs, ``block.K`` on ViTs);
            empty: the stride-8 and stride-16 stages (``layer2``, ``layer3`` on ResNets).
        patch_size: Neighbourhood side of the local aggregation (``--patchsize 3``).
        pretrain_dim: Per-layer pooled width (``--pretrain_embed_dimension 1024``).
        target_dim: Final width D (``--target_embed_dimension 1024``).
        coreset: Fraction of the patch features kept in the bank (``-p 0.1``); 1 keeps all.
        start_points: Random rows the approximate greedy coreset starts from (10).
        projection_dim: Width of the coreset's random projection (128).
        num_nn: Nearest neighbours averaged into a patch score (``--anomaly_scorer_num_nn 1``).
        sigma: Gaussian smoothing of the S x S map, in pixels (the reference's 4).
        image_size: S, the crop side (``--imagesize 224``); None: the backbone's own input.
        resize: The side before the centre crop (``--resize 256``); None: no crop.
        max_rows: Most feature rows held while fitting (bounds memory for large k).
        seed: Seeds the coreset's projection and start points.
    """

    layers: tuple[str, ...] = ()
    patch_size: int = 3
    pretrain_dim: int = 1024
    target_dim: int = 1024
    coreset: float = 0.1
    start_points: int = 10
    projection_dim: int = 128
    num_nn: int = 1
    sigma: float = 4.0
    image_size: int | None = 224
    resize: int | None = 256
    max_rows: int = 1 << 19
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(str(x) for x in self.layers))
        check_int(self.patch_size, "patch_size", 1, 15)
        if self.patch_size % 2 == 0:
            raise ConfigError(
                f"patch_size must be odd (a centred neighbourhood): {self.patch_size}"
            )
        check_int(self.pretrain_dim, "pretrain_dim", 1, MAX_DIM)
        check_int(self.target_dim, "target_dim", 1, MAX_DIM)
        check_int(self.start_points, "start_points", 1, 10_000)
        check_int(self.projection_dim, "projection_dim", 1, MAX_DIM)
        check_int(self.num_nn, "num_nn", 1, 100)
        check_int(self.max_rows, "max_rows", 16, MAX_BANK_ROWS)
        check_int(self.seed, "seed", 0, 2**63 - 1)
        if not (isinstance(self.coreset, (int, float)) and 0 < self.coreset <= 1):
            raise ConfigError(f"coreset must be a fraction in (0, 1]: {self.coreset!r}")
        if not (isinstance(self.sigma, (int, float)) and 0 <= self.sigma <= 64):
            raise ConfigError(f"sigma must be in [0, 64] pixels: {self.sigma!r}")
        for name in ("image_size", "resize"):
            value = getattr(self, name)
            if value is not None:
                check_int(value, name, 8, 4096)
        if self.image_size and self.resize and self.resize < self.image_size:
            raise ConfigError(f"resize ({self.resize}) must be >= image_size ({self.image_size})")


@register_anomaly_method("patch-memory")
class PatchMemory(AnomalyMethod):
    """A memory bank of normal patch features; anomaly = distance to the nearest one."""

    Config = PatchMemoryConfig
    capabilities = AnomalyCapabilities(family="any", few_shot=True)
    default_model = "torchvision:wide_resnet50_2"
    tiny_model = "torchvision:tiny"
    data_shaped_state = ("bank",)

    bank: torch.Tensor

    def __init__(
        self, backbone: Any, config: PatchMemoryConfig | None = None, *, object_name: str = "object"
    ) -> None:
        super().__init__(backbone, config, object_name=object_name)
        cfg: PatchMemoryConfig = self.config
        self.layers = check_layers(backbone, cfg.layers or default_layers(backbone))
        self.register_buffer("bank", torch.zeros(0, cfg.target_dim))

    @classmethod
    def examples(cls) -> list[AnomalyExample]:
        small = {"pretrain_dim": 32, "target_dim": 16, "image_size": 64, "resize": 72}
        return [AnomalyExample(cls.tiny_model, small)]

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x S x S → B x h x w x D patch features."""
        cfg: PatchMemoryConfig = self.config
        with torch.no_grad():
            return patch_embeddings(
                self.backbone,
                pixels,
                self.layers,
                patch_size=cfg.patch_size,
                pretrain_dim=cfg.pretrain_dim,
                target_dim=cfg.target_dim,
            )

    def fit_normal(self, batches: Iterable[torch.Tensor]) -> None:
        """Build the bank from normal images (B x 3 x S x S batches), replacing any old one."""
        cfg: PatchMemoryConfig = self.config
        gen = torch.Generator().manual_seed(cfg.seed)
        buffer: list[torch.Tensor] = []
        rows = 0
        seen = 0
        self.peak_rows = 0
        for pixels in batches:
            feats = self.embed(pixels).reshape(-1, cfg.target_dim)
            seen += feats.shape[0]
            if rows + feats.shape[0] > cfg.max_rows and rows:
                merged = self._thin(torch.cat(buffer), gen)
                buffer, rows = [merged], merged.shape[0]
            buffer.append(feats)
            rows += feats.shape[0]
            self.peak_rows = max(self.peak_rows, rows)
        if not seen:
            raise ConfigError("patch-memory needs at least one normal reference image")
        bank = self._thin(torch.cat(buffer), gen)
        self.bank = bank.contiguous()
        self.fitted = True

    def _thin(self, feats: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        cfg: PatchMemoryConfig = self.config
        if cfg.coreset >= 1:
            return feats
        count = max(1, int(feats.shape[0] * cfg.coreset))
        idx = greedy_coreset(
            feats,
            count,
            generator=gen,
            start_points=cfg.start_points,
            projection_dim=cfg.projection_dim,
        )
        return feats[idx.to(feats.device)]

    def patch_scores(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x S x S → B x h x w patch scores (mean squared distance to the nearest)."""
        self.require_fitted()
        cfg: PatchMemoryConfig = self.config
        feats = self.embed(pixels)
        b, h, w, d = feats.shape
        dist = nearest_distances(feats.reshape(-1, d), self.bank, cfg.num_nn)
        return dist.mean(dim=1).reshape(b, h, w)

    def score(self, pixels: torch.Tensor) -> AnomalyOutput:
        cfg: PatchMemoryConfig = self.config
        with torch.no_grad():
            grid = self.patch_scores(pixels)
            image_scores = grid.flatten(1).max(dim=1).values
            maps = smooth(upsample_grid(grid, pixels.shape[-1]), cfg.sigma)
        return AnomalyOutput(image_scores=image_scores, maps=maps)
