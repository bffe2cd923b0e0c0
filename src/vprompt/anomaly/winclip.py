"""``winclip``: zero- and few-shot anomaly classification and segmentation with CLIP's state
prompts and window features (WinCLIP / WinCLIP+, Jeong et al. CVPR 2023).

Zero-shot, two text embeddings describe the object as normal or anomalous: each averages the
unit embeddings of a compositional prompt ensemble (state words × templates, naming the
object). An embedding's anomaly score is the anomalous class's softmax probability over its
temperature-scaled cosine similarities to the two. The image score comes from the image
embedding; the map from k x k windows of patches (stride 1, for each k in ``scales``), each
encoded by running the class token and only that window's patch tokens through the ViT.
A patch takes the harmonic mean of the scores of the windows that cover it, and the scales'
maps are fused with the image score (broadcast over the grid) by a harmonic mean.

WinCLIP+ (after :meth:`WinClip.fit_normal` on k normal images) keeps the references' window
embeddings at each scale and their full-image patch tokens. A test window or patch scores
``(1 - max cosine similarity) / 2`` against the references of its scale; window scores are
harmonically aggregated onto patches, the scales' maps averaged, and the result averaged
with the zero-shot map; the image score averages the zero-shot image score with the
few-shot map's maximum. The math follows anomalib's ``WinClipModel`` (the authors released no
code), including its average of the prompts' raw embeddings (``normalize_prompts=True``
averages unit embeddings instead, CLIP's usual ensembling), except in one place: the
full-image patch tokens are compared in the joint space (final norm + projection, the
backbone's ``project_vision_tokens``) where anomalib uses the normed, unprojected tokens
open_clip returns.

Shapes: B images, S the input side, g x g the patch grid (N = g², P prefix tokens), D the
token width, E the joint embedding size, W_k the windows at scale k.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vprompt.anomaly.base import (
    AnomalyCapabilities,
    AnomalyExample,
    AnomalyMethod,
    AnomalyOutput,
    register_anomaly_method,
)
from vprompt.anomaly.patch_features import upsample_grid
from vprompt.errors import ConfigError
from vprompt.methods.config import check_int

# The compositional prompt ensemble (the paper's supplementary; anomalib's prompting.py).
NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ANOMALOUS_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = (
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    # Listed twice in the reference; kept so the average weights it as the reference does.
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)


def prompt_ensemble(object_name: str) -> tuple[list[str], list[str]]:
    """The normal and anomalous prompts naming ``object_name`` (states × templates)."""

    def fill(states: tuple[str, ...]) -> list[str]:
        return [t.format(s.format(object_name)) for s in states for t in TEMPLATES]

    return fill(NORMAL_STATES), fill(ANOMALOUS_STATES)


def window_indices(grid: int, size: int) -> torch.Tensor:
    """W x size² patch indices of every size x size window on a grid x grid patch grid.

    Windows slide with stride 1, ordered row-major by their top-left patch; the patches of a
    window are row-major too (anomalib's ``make_masks``, transposed).
    """
    ids = torch.arange(grid * grid).reshape(grid, grid)
    win = ids.unfold(0, size, 1).unfold(1, size, 1)  # n x n x size x size
    return win.reshape(-1, size * size)


def harmonic_aggregation(scores: torch.Tensor, windows: torch.Tensor, patches: int) -> torch.Tensor:
    """Each patch's harmonic mean of the scores of the windows covering it.

    Args:
        scores: B x W window scores (>= 0).
        windows: W x K patch indices of each window.
        patches: N, the number of patches.

    Returns:
        B x N; a zero window score makes its patches 0, as in the reference.
    """
    flat = windows.reshape(-1).to(scores.device)
    inverse = (1.0 / scores).repeat_interleave(windows.shape[1], dim=1)  # B x (W * K)
    # index_add instead of a 0/1 cover matmul: 0 x inf would turn into NaN there.
    total = scores.new_zeros(scores.shape[0], patches).index_add(1, flat, inverse)
    count = torch.bincount(flat, minlength=patches).to(scores.dtype)
    return (count / total).nan_to_num(nan=0.0, posinf=0.0)


def state_scores(embeddings: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """... x E embeddings, 2 x E state embeddings → ... anomalous-state probabilities."""
    sims = F.normalize(embeddings.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T
    return (sims / temperature).softmax(dim=-1)[..., 1]


def association_scores(embeddings: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """B x M x E embeddings, R x E references → B x M ``(1 - max cosine) / 2`` (paper eq. 4)."""
    sims = F.normalize(embeddings.float(), dim=-1) @ F.normalize(references.float(), dim=-1).T
    return (1.0 - sims.amax(dim=-1)) / 2.0


@dataclass(frozen=True)
class WinClipConfig:
    """WinCLIP's settings (defaults: the paper and anomalib's ``WinClipModel``).

    Attributes:
        scales: Window sides in patches (anomalib's ``scales=(2, 3)``: small and mid scale).
        image_size: S (the paper and anomalib: 240 on ViT-B-16-plus-240); None: the
            backbone's own input side. The positional embeddings fix the grid, so it must be
            the side the backbone was built for.
        temperature: Divides the cosine similarities before the two-state softmax
            (anomalib's ``TEMPERATURE = 0.07``, CLIP's initial value); None: the backbone's
            learned logit scale instead.
        normalize_prompts: Average the prompts' unit embeddings (CLIP's usual ensembling);
            False (anomalib's): average the raw embeddings.
        window_batch: Most window sequences per ViT forward (bounds memory; no effect on
            scores).
    """

    scales: tuple[int, ...] = (2, 3)
    image_size: int | None = None
    temperature: float | None = 0.07
    normalize_prompts: bool = False
    window_batch: int = 4096

    def __post_init__(self) -> None:
        if isinstance(self.scales, int | str | bytes) or not isinstance(self.scales, Iterable):
            raise ConfigError(f"scales must be a list of window sides, got {self.scales!r}")
        scales = tuple(self.scales)
        object.__setattr__(self, "scales", scales)
        if not 1 <= len(scales) <= 8 or len(set(scales)) != len(scales):
            raise ConfigError(f"scales must be 1-8 distinct window sides, got {scales!r}")
        for k in scales:
            check_int(k, "each of scales", 1, 64)
        if self.image_size is not None:
            check_int(self.image_size, "image_size", 8, 4096)
        t = self.temperature
        if t is not None and (
            isinstance(t, bool) or not isinstance(t, int | float) or not 1e-4 <= t <= 100
        ):
            raise ConfigError(f"temperature must be a number in [0.0001, 100] or null, got {t!r}")
        if not isinstance(self.normalize_prompts, bool):
            raise ConfigError(
                f"normalize_prompts must be true or false, got {self.normalize_prompts!r}"
            )
        check_int(self.window_batch, "window_batch", 1, 1 << 20)


@dataclass
class _Features:
    """What one pass over B images gives: B x E image, B x N x E patch and, per scale,
    B x W_k x E window embeddings."""

    image: torch.Tensor
    patches: torch.Tensor
    windows: list[torch.Tensor]


@register_anomaly_method("winclip")
class WinClip(AnomalyMethod):
    """CLIP state prompts on multi-scale windows (zero-shot), plus normal references' window
    and patch embeddings (WinCLIP+, few-shot)."""

    Config = WinClipConfig
    capabilities = AnomalyCapabilities(
        family="clip", zero_shot=True, few_shot=True, uses_object_name=True
    )
    default_model = "clip:ViT-B-16-plus-240"
    tiny_model = "clip:tiny"
    data_shaped_state = ("ref_patches", "ref_windows")

    ref_patches: torch.Tensor
    ref_windows: torch.Tensor

    def __init__(
        self, backbone: Any, config: WinClipConfig | None = None, *, object_name: str = "object"
    ) -> None:
        super().__init__(backbone, config, object_name=object_name)
        cfg: WinClipConfig = self.config
        name = getattr(backbone, "name", type(backbone).__name__)
        if not all(hasattr(backbone, a) for a in ("tokenize", "encode_text", "logit_scale")):
            raise ConfigError(f"winclip needs a CLIP-like backbone (clip:…), not {name}")
        if not getattr(backbone, "is_vit", False):
            raise ConfigError(f"winclip needs a ViT CLIP (window tokens), {name} is not a ViT")
        self.grid = self._grid(name)
        too_big = [k for k in cfg.scales if k > self.grid]
        if too_big:
            raise ConfigError(
                f"winclip: scales {too_big} exceed {name}'s {self.grid} x {self.grid} patch grid"
            )
        self.windows = [window_indices(self.grid, k) for k in cfg.scales]
        self._text_cache: dict[tuple[str, str, torch.device], torch.Tensor] = {}
        dim = int(backbone.embed_dim)
        # Flattened over references: R_p = K * N patch rows; R_w = K * sum(W_k) window rows,
        # scale by scale, each scale's block image by image.
        self.register_buffer("ref_patches", torch.zeros(0, dim))
        self.register_buffer("ref_windows", torch.zeros(0, dim))
        self.to(self._device())

    @classmethod
    def examples(cls) -> list[AnomalyExample]:
        # The tiny ViT has a 4 x 4 grid; the second case covers scale 1 and the full grid.
        # Overrides travel as `key=value` YAML strings, hence a list rather than a tuple.
        return [
            AnomalyExample(cls.tiny_model),
            AnomalyExample(cls.tiny_model, {"scales": [1, 4], "temperature": 0.01}),
        ]

    # ------------------------------------------------------------------ text
    def text_embeddings(self) -> torch.Tensor:
        """2 x E: the normal and anomalous prompt ensembles' mean (unit) embeddings, cached per
        object name, so :meth:`set_object_name` takes effect on the next score."""
        device = self._device()
        key = (self.object_name, str(self.backbone.name), device)
        cached = self._text_cache.get(key)
        if cached is None:
            with torch.no_grad():
                states = []
                for prompts in prompt_ensemble(self.object_name):
                    feats = self.backbone.encode_text(self.backbone.tokenize(prompts)).float()
                    if self.config.normalize_prompts:
                        feats = F.normalize(feats, dim=-1)
                    states.append(feats.mean(dim=0))
                cached = torch.stack(states)
            self._text_cache[key] = cached
        return cached

    @property
    def temperature(self) -> float:
        """The softmax temperature (the config's, else 1 / the backbone's logit scale)."""
        t = self.config.temperature
        return float(t) if t is not None else 1.0 / float(self.backbone.logit_scale)

    # ------------------------------------------------------------------ vision
    def encode(self, pixels: torch.Tensor) -> _Features:
        """B x 3 x S x S → image, full-image patch and window embeddings (one shared stem)."""
        bb = self.backbone
        prefix = int(bb.num_prefix_tokens)
        tokens = bb.vision_tokens(pixels)  # B x (P + N) x D
        if tokens.shape[1] != prefix + self.grid**2:
            raise ConfigError(
                f"winclip: expected {self.config.image_size or 'native'}-pixel inputs "
                f"({self.grid} x {self.grid} patches), got {tuple(pixels.shape[-2:])}"
            )
        x = tokens
        for block in bb.vision_blocks:
            x = block(x)
        image = bb.pool_vision_tokens(x)
        patches = bb.project_vision_tokens(x)[:, prefix:]
        windows = [self._window_embeddings(tokens, idx, prefix) for idx in self.windows]
        return _Features(image=image, patches=patches, windows=windows)

    def _window_embeddings(
        self, tokens: torch.Tensor, windows: torch.Tensor, prefix: int
    ) -> torch.Tensor:
        """B x (P + N) x D block-0 tokens, W x K windows → B x W x E window embeddings.

        Dropping the other patches' tokens equals masking them out of attention; the tokens
        keep the positional embeddings of the full image, and the per-token pre-norm already
        applied commutes with the selection.
        """
        b, _, d = tokens.shape
        keep = torch.cat(
            [torch.arange(prefix).expand(windows.shape[0], -1), windows + prefix], dim=1
        ).to(tokens.device)  # W x (P + K)
        seqs = tokens[:, keep].reshape(-1, keep.shape[1], d)  # (B * W) x (P + K) x D
        out = []
        for start in range(0, seqs.shape[0], self.config.window_batch):
            x = seqs[start : start + self.config.window_batch]
            for block in self.backbone.vision_blocks:
                x = block(x)
            out.append(self.backbone.pool_vision_tokens(x))
        return torch.cat(out).reshape(b, windows.shape[0], -1)

    # ------------------------------------------------------------------ few-shot
    def fit_normal(self, batches: Iterable[torch.Tensor]) -> None:
        """Keep the window (per scale) and patch embeddings of normal references (B x 3 x S x S
        batches), replacing any earlier ones."""
        patches: list[torch.Tensor] = []
        windows: list[list[torch.Tensor]] = [[] for _ in self.windows]
        with torch.no_grad():
            for pixels in batches:
                feats = self.encode(pixels.to(self._device()))
                patches.append(feats.patches.reshape(-1, feats.patches.shape[-1]).float())
                for keep, emb in zip(windows, feats.windows, strict=True):
                    keep.append(emb.reshape(-1, emb.shape[-1]).float())
        if not patches:
            raise ConfigError("winclip needs at least one normal reference image for few-shot")
        self.ref_patches = torch.cat(patches)
        self.ref_windows = torch.cat([torch.cat(w) for w in windows])
        self.fitted = True

    @property
    def shots(self) -> int:
        """k, the number of normal reference images kept (0: zero-shot)."""
        return int(self.ref_patches.shape[0]) // self.grid**2

    def _reference_windows(self) -> list[torch.Tensor]:
        """Split ``ref_windows`` back into one (k * W_s) x E block per scale."""
        k = self.shots
        sizes = [k * w.shape[0] for w in self.windows]
        if k * self.grid**2 != self.ref_patches.shape[0] or sum(sizes) != self.ref_windows.shape[0]:
            raise ConfigError(
                f"winclip: the references ({self.ref_patches.shape[0]} patch and "
                f"{self.ref_windows.shape[0]} window rows) do not fit a {self.grid} x "
                f"{self.grid} grid at scales {self.config.scales}; fit them again"
            )
        return list(torch.split(self.ref_windows, sizes))

    # ------------------------------------------------------------------ scoring
    def zero_shot_scores(self, feats: _Features) -> tuple[torch.Tensor, torch.Tensor]:
        """B image scores and B x g x g zero-shot map (harmonic fusion of the image score and
        each scale's harmonically aggregated window scores)."""
        text = self.text_embeddings()
        n = self.grid**2
        image = state_scores(feats.image, text, self.temperature)  # B
        maps = [image[:, None].expand(-1, n)]
        for emb, idx in zip(feats.windows, self.windows, strict=True):
            maps.append(harmonic_aggregation(state_scores(emb, text, self.temperature), idx, n))
        fused = len(maps) / (1.0 / torch.stack(maps)).sum(dim=0)
        return image, fused.reshape(-1, self.grid, self.grid)

    def few_shot_map(self, feats: _Features) -> torch.Tensor:
        """B x g x g: the mean over the patch scale and every window scale of the distances
        to the nearest reference embedding of the same scale."""
        n = self.grid**2
        maps = [association_scores(feats.patches, self.ref_patches)]
        for emb, refs, idx in zip(
            feats.windows, self._reference_windows(), self.windows, strict=True
        ):
            maps.append(harmonic_aggregation(association_scores(emb, refs), idx, n))
        return torch.stack(maps).mean(dim=0).reshape(-1, self.grid, self.grid)

    def score(self, pixels: torch.Tensor) -> AnomalyOutput:
        """B x 3 x S x S normalised pixels → B image scores and B x S x S maps."""
        with torch.no_grad():
            feats = self.encode(pixels)
            image, grid = self.zero_shot_scores(feats)
            # Any reference row means few-shot: a malformed set then fails loudly, not silently.
            if self.ref_patches.shape[0] or self.ref_windows.shape[0]:
                few = self.few_shot_map(feats)
                grid = (grid + few) / 2
                image = (image + few.flatten(1).amax(dim=1)) / 2
            maps = upsample_grid(grid, pixels.shape[-1])
        return AnomalyOutput(image_scores=image, maps=maps)

    # ------------------------------------------------------------------ internals
    def _device(self) -> torch.device:
        return next((p.device for p in self.backbone.parameters()), torch.device("cpu"))

    def _grid(self, name: str) -> int:
        side = self.frame.size
        try:
            with torch.no_grad():
                dummy = torch.zeros(1, 3, side, side, device=self._device())
                n = self.backbone.vision_tokens(dummy).shape[1] - int(
                    self.backbone.num_prefix_tokens
                )
        except RuntimeError as exc:
            native = self.backbone.preprocess.size[0]
            raise ConfigError(
                f"winclip: {name} cannot take {side}-pixel inputs (its native side is {native}): "
                f"{str(exc).splitlines()[0]}"
            ) from None
        grid = math.isqrt(n)
        if grid * grid != n:
            raise ConfigError(f"winclip: {name}'s {n} patch tokens do not form a square grid")
        return grid
