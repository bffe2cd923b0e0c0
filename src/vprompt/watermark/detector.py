"""The frozen model plus key detector: reading pixels, embedding the mark, scoring images.

The detector reads an image as the frozen model does, except for the geometry: the whole image
is resized ("squashed") to the model's H x W instead of resized and centre-cropped, so that a
mark embedded at any image size lines up with the key again (a crop would cut the mark's
border and shift the rest). Then ``(x - mean) / std`` with the backbone's own statistics, the
frozen pooled features, standardised with the clean training images' statistics, and the head:
one logit "watermarked".

Embedding resizes δ to the image (bilinear; a convex combination of δ's values, so the
resized mark still satisfies |δ| ≤ eps), adds it in [0, 1] pixel space, clips and rounds to
8 bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vprompt.errors import ConfigError
from vprompt.watermark.key_file import WatermarkKey, WatermarkKeyError, head_shapes


class FrozenFeatures(nn.Module):
    """A frozen backbone as normalised B x 3 x H x W pixels → B x F pooled features:
    a classifier's penultimate features, or a CLIP-like model's image embedding."""

    def __init__(self, backbone: Any) -> None:
        super().__init__()
        from vprompt.backbones.classifier import ClassifierBackbone
        from vprompt.backbones.protocols import ImageTextBackbone

        if isinstance(backbone, ClassifierBackbone):
            self.kind = "classifier"
        elif isinstance(backbone, ImageTextBackbone):
            self.kind = "image-text"
        else:
            name = getattr(backbone, "name", type(backbone).__name__)
            raise ConfigError(
                f"{name} is neither a classifier nor an image-text model; watermark keys read "
                "pooled image features"
            )
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()

    def train(self, mode: bool = True) -> FrozenFeatures:
        """Always eval: the backbone's BatchNorm statistics and dropout never change."""
        return super().train(False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = (
            self.backbone.features(pixels)
            if self.kind == "classifier"
            else self.backbone.encode_image(pixels)
        )
        return out.float()


def pixel_spec(backbone: Any) -> dict[str, Any]:
    """The detector's input: ``size`` [H, W], ``mean`` and ``std`` from the backbone's
    preprocessing."""
    pre = backbone.preprocess
    return {"size": list(pre.size), "mean": list(pre.mean), "std": list(pre.std)}


def backbone_record(backbone: Any) -> dict[str, str]:
    """``name``, ``weights`` and ``fingerprint`` of a frozen backbone, as a key stores them."""
    return {
        "name": str(backbone.name),
        "weights": str(backbone.weights),
        "fingerprint": str(backbone.fingerprint()),
    }


def check_backbone(key: WatermarkKey, backbone: Any, where: str) -> None:
    """Refuse a backbone the key was not trained on (name, then weights fingerprint)."""
    want = key.backbone
    if backbone.name != want["name"]:
        raise WatermarkKeyError(
            f"{where}: this key was trained for {want['name']}, not {backbone.name}"
        )
    have = backbone.fingerprint()
    if have != want["fingerprint"]:
        raise WatermarkKeyError(
            f"{where}: this key was trained for {want['name']} with weights {want['weights']} "
            f"(fingerprint {want['fingerprint']}), but these weights ({backbone.weights}) have "
            f"fingerprint {have}"
        )


def make_head(feature_dim: int, hidden: int) -> nn.Sequential:
    """F → 1 logit: Linear, or Linear–ReLU–Linear when ``hidden`` > 0."""
    if hidden:
        return nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
    return nn.Sequential(nn.Linear(feature_dim, 1))


class KeyDetector(nn.Module):
    """Frozen features → standardisation → head → logit.

    Args:
        features: Normalised pixels → B x F (frozen; never trained here).
        size: (H, W) input size.
        mean: Per-channel normalisation mean of the backbone.
        std: Per-channel normalisation std.
        feature_dim: F.
        hidden: Hidden width of the head; 0 for linear.
    """

    mean: torch.Tensor
    std: torch.Tensor
    feature_mean: torch.Tensor
    feature_std: torch.Tensor

    def __init__(
        self,
        *,
        features: nn.Module,
        size: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        feature_dim: int,
        hidden: int,
    ) -> None:
        super().__init__()
        self.features = features
        self.size = (int(size[0]), int(size[1]))
        self.hidden = hidden
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std)).view(1, 3, 1, 1))
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))
        self.head = make_head(feature_dim, hidden)

    def raw_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W in [0, 1] → B x F frozen features (not standardised)."""
        out: torch.Tensor = self.features((pixels - self.mean) / self.std)
        return out

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W in [0, 1] → B logits "watermarked"."""
        z = (self.raw_features(pixels) - self.feature_mean) / self.feature_std
        logits: torch.Tensor = self.head(z)
        return logits.squeeze(1)

    def head_tensors(self) -> dict[str, torch.Tensor]:
        """The learned tensors a key stores (standardisation and head), on the CPU."""
        out = {"feature_mean": self.feature_mean, "feature_std": self.feature_std}
        out.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        return {k: v.detach().float().cpu().clone() for k, v in out.items()}

    def load_head(self, tensors: dict[str, torch.Tensor]) -> None:
        expected = head_shapes(int(self.feature_mean.shape[0]), self.hidden)
        if {k: tuple(v.shape) for k, v in tensors.items()} != expected:
            raise WatermarkKeyError(
                f"the key's head does not fit this backbone's {self.feature_mean.shape[0]} features"
            )
        with torch.no_grad():
            self.feature_mean.copy_(tensors["feature_mean"])
            self.feature_std.copy_(tensors["feature_std"])
        self.head.load_state_dict(
            {k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")},
            strict=True,
        )


def feature_dim_of(features: nn.Module, size: Sequence[int], device: torch.device) -> int:
    """F, read off one forward pass of a blank image."""
    with torch.no_grad():
        out = features(torch.zeros(1, 3, int(size[0]), int(size[1]), device=device))
    return int(out.shape[-1])


def detector_for(key: WatermarkKey, backbone: Any, device: torch.device, where: str) -> KeyDetector:
    """The key's detector on ``backbone`` (refused when the key was made for another one)."""
    check_backbone(key, backbone, where)
    features = FrozenFeatures(backbone)
    size = key.pixels["size"]
    dim = feature_dim_of(features, size, device)
    if dim != key.feature_dim:
        raise WatermarkKeyError(
            f"{where}: the key's head reads {key.feature_dim} features, {backbone.name} gives {dim}"
        )
    detector = KeyDetector(
        features=features,
        size=size,
        mean=key.pixels["mean"],
        std=key.pixels["std"],
        feature_dim=dim,
        hidden=key.hidden,
    ).to(device)
    detector.load_head(key.head)
    return detector.eval()


def pixel_reader(size: Sequence[int]) -> Any:
    """PIL image → 3 x H x W in [0, 1], squashed to ``size`` (bilinear), with a batched twin
    for in-memory pixel arrays when the size is square."""
    from torchvision import transforms as T

    from vprompt.data.batched import ResizeToTensor

    h, w = int(size[0]), int(size[1])
    if h == w:
        return ResizeToTensor(h)
    return T.Compose(
        [
            T.Lambda(lambda im: im.convert("RGB")),
            T.Resize((h, w), interpolation=T.InterpolationMode.BILINEAR),
            T.ToTensor(),
        ]
    )


def resize_delta(delta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """3 x h x w → 3 x ``height`` x ``width`` (bilinear; antialiased when shrinking).

    Every output value is a convex combination of δ's values, so |output| ≤ max |δ|."""
    if tuple(delta.shape[-2:]) == (height, width):
        return delta
    shrink = height < delta.shape[-2] or width < delta.shape[-1]
    out = F.interpolate(
        delta[None], size=(height, width), mode="bilinear", align_corners=False, antialias=shrink
    )
    return out[0]


def embed_pixels(pixels: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W (or 3 x H x W) in [0, 1] → the watermarked pixels, rounded to 8 bits."""
    d = resize_delta(delta.to(pixels.device), int(pixels.shape[-2]), int(pixels.shape[-1]))
    return ((pixels + d).clamp(0, 1) * 255).round() / 255


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → 3 x H x W in [0, 1]."""
    import numpy as np

    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """3 x H x W in [0, 1] → RGB PIL image (rounded to 8 bits)."""
    array = (pixels.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).contiguous().numpy(), mode="RGB")


def embed_image(image: Image.Image, delta: torch.Tensor) -> Image.Image:
    """An RGB image with the mark added at its own size (save it losslessly, e.g. PNG)."""
    return to_pil(embed_pixels(to_tensor(image), delta))


@torch.no_grad()
def score_pixels(detector: KeyDetector, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """B x 3 x H x W in [0, 1] at the detector's size → B logits (CPU)."""
    device = detector.mean.device
    out = [
        detector(pixels[i : i + batch_size].to(device)).cpu()
        for i in range(0, len(pixels), batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0)
