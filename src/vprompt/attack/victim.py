"""The model under attack: [0, 1] pixels at the model's input size → class logits, frozen.

Where the patch goes. A method's ``input_transform(False)`` turns a PIL image into what its
``forward`` takes, in one of two forms:

* pixels in [0, 1] (visual-prompt: ``ResizeToTensor`` without mean/std; the method adds its
  pixel prompt and normalises inside ``forward``);
* normalised pixels (zeroshot, CoOp, VPT …: the backbone's ``Compose([...resize/crop...,
  ToTensor(), Normalize(mean, std)])``; DAM-VP: ``ResizeToTensor`` with mean/std).

Either way the transform is a geometric part (resize, crop, to [0, 1]) followed by an optional
per-channel normalisation. :func:`split_input_transform` separates the two by inspecting the
transform (never the method's name), so a :class:`Victim` reads images through the geometric
part only and runs ``(x - mean) / std`` then the method itself in ``forward``. The patch is
therefore pasted on the image a person would see, at the resolution the method reads, and every
prompt (a visual prompt's frame, VPT's tokens, CoOp's context) is applied after it, exactly as
at inference.

The victim is frozen: every parameter of the backbone and of the prompt has
``requires_grad=False`` and the module stays in eval mode, so only the patch (or the per-image
perturbation) receives gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from vprompt.errors import ConfigError

PixelTransform = Callable[[Image.Image], torch.Tensor]


def split_input_transform(
    transform: Any,
) -> tuple[PixelTransform, tuple[float, ...] | None, tuple[float, ...] | None]:
    """A method's input transform as (PIL → [0, 1] pixels, mean, std); mean and std are None
    when the transform already stops at [0, 1] pixels.

    Raises:
        ConfigError: The transform is neither a ``ResizeToTensor`` nor a torchvision
            ``Compose`` ending in ``ToTensor`` or ``Normalize`` (e.g. several views per image).
    """
    from torchvision import transforms as T

    from vprompt.data.batched import ResizeToTensor

    if isinstance(transform, ResizeToTensor):
        return ResizeToTensor(transform.size), transform.mean, transform.std
    if isinstance(transform, T.Compose) and transform.transforms:
        steps = list(transform.transforms)
        last = steps[-1]
        if isinstance(last, T.Normalize):
            mean = tuple(float(v) for v in torch.as_tensor(last.mean).flatten().tolist())
            std = tuple(float(v) for v in torch.as_tensor(last.std).flatten().tolist())
            return T.Compose(steps[:-1]), mean, std
        if isinstance(last, T.ToTensor):
            return transform, None, None
    raise ConfigError(
        f"cannot find the [0, 1] pixel stage of the input transform {transform!r}: expected "
        "ResizeToTensor or a Compose ending in ToTensor/Normalize"
    )


class Victim(nn.Module):
    """A frozen classifier of [0, 1] pixels.

    Args:
        model: Normalised B x 3 x H x W pixels → B x C logits (a tensor, or an output with
            ``logits``).
        classnames: The C classes, in label order.
        pixel_transform: PIL image → 3 x H x W in [0, 1] at the model's input size.
        mean: Per-channel mean subtracted before ``model`` (None: ``model`` takes [0, 1]).
        std: Per-channel std divided by.
        description: Where the victim came from (model, weights, pack), for reports and files.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        *,
        model: nn.Module,
        classnames: Sequence[str],
        pixel_transform: PixelTransform,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        description: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if (mean is None) != (std is None):
            raise ValueError("give mean and std together")
        self.model = model
        self.classnames = list(classnames)
        self.pixel_transform = pixel_transform
        self.normalises = mean is not None
        self.register_buffer("mean", torch.tensor(mean or (0.0, 0.0, 0.0)).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std or (1.0, 1.0, 1.0)).view(1, -1, 1, 1))
        self.description = dict(description or {})
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.eval()
        device = next(self.model.parameters(), self.mean).device
        self.mean, self.std = self.mean.to(device), self.std.to(device)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def train(self, mode: bool = True) -> Victim:
        """Always eval: a victim's BatchNorm statistics and dropout never change."""
        return super().train(False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W pixels in [0, 1] → B x C float logits."""
        x = (pixels - self.mean) / self.std if self.normalises else pixels
        out = self.model(x)
        logits: torch.Tensor = out.logits if hasattr(out, "logits") else out
        if pixels.requires_grad and torch.is_grad_enabled() and not logits.requires_grad:
            what = self.description.get("method") or self.description.get("model") or "the model"
            raise ConfigError(
                f"{what} computes its outputs without gradients with respect to the image, "
                "so it cannot be attacked with gradients"
            )
        return logits.float()


class _SourceLogits(nn.Module):
    """A classifier's own logits restricted to (and ordered as) some of its source classes."""

    index: torch.Tensor

    def __init__(self, backbone: nn.Module, index: Sequence[int]) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("index", torch.tensor(list(index), dtype=torch.long))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.backbone(pixels)
        return logits[:, self.index.to(logits.device)]


def victim_from_method(method: Any, description: dict[str, Any] | None = None) -> Victim:
    """A prompt method (a pack's, or zero-shot) as a victim: its ``input_transform(False)``
    split into the pixel stage and normalisation, its ``forward`` as the model."""
    pixel, mean, std = split_input_transform(method.input_transform(False))
    return Victim(
        model=method,
        classnames=method.classnames,
        pixel_transform=pixel,
        mean=mean,
        std=std,
        description={"method": method.name, **(description or {})},
    )


def victim_from_backbone(
    backbone: Any, classnames: Sequence[str], description: dict[str, Any] | None = None
) -> Victim:
    """A frozen model with no prompt as a victim for ``classnames``.

    A CLIP-like model classifies zero-shot (``"a photo of a {}."``); a classifier uses its own
    head, restricted to the source classes named like ``classnames`` (so accuracy is over the
    data's classes).

    Raises:
        ConfigError: A classifier that does not know some of the classes.
    """
    from vprompt.backbones.protocols import ImageTextBackbone

    if isinstance(backbone, ImageTextBackbone):
        from vprompt.methods.zeroshot import ZeroShotClassifier

        method = ZeroShotClassifier(backbone, list(classnames))
        return victim_from_method(method, description)
    source = getattr(backbone, "source_classes", None)
    if source is None:
        raise ConfigError(f"{backbone.name} is not a classifier or image-text model")
    lowered = {str(c).lower(): i for i, c in enumerate(source)}
    missing = [c for c in classnames if c.lower() not in lowered]
    if missing:
        shown = ", ".join(repr(c) for c in missing[:5])
        raise ConfigError(
            f"{backbone.name} classifies its own {len(source)} classes and does not know "
            f"{shown}{' …' if len(missing) > 5 else ''}; attack a prompt pack trained for "
            "this data instead (--pack)"
        )
    pixel, mean, std = split_input_transform(backbone.transform)
    return Victim(
        model=_SourceLogits(backbone, [lowered[c.lower()] for c in classnames]),
        classnames=classnames,
        pixel_transform=pixel,
        mean=mean,
        std=std,
        description={"method": None, **(description or {})},
    )


def input_size(victim: Victim, probe: Image.Image | None = None) -> tuple[int, int]:
    """(H, W) of the victim's pixel input, read off one transformed image."""
    image = probe if probe is not None else Image.new("RGB", (32, 32))
    out = victim.pixel_transform(image)
    return int(out.shape[-2]), int(out.shape[-1])
