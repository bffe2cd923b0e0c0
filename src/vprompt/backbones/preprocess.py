"""Preprocessing that travels with a backbone's weights (never with experiment configs)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from PIL import Image

from vprompt.errors import ConfigError

ResizeMode = Literal["shortest", "longest", "squash"]
Interpolation = Literal["bicubic", "bilinear", "nearest"]


@dataclass(frozen=True)
class Preprocess:
    """How a PIL image becomes the 3 x H x W tensor a backbone expects.

    Attributes:
        size: Final (height, width) fed to the model.
        mean: Per-channel mean subtracted after scaling to [0, 1].
        std: Per-channel std divided by.
        interpolation: Resampling filter for resizing.
        resize_mode: ``shortest`` resizes the short side then centre-crops, ``longest`` fits the
            long side then pads, ``squash`` resizes to ``size`` ignoring aspect ratio.
        resize_size: Short-side size before the centre crop (torchvision's 256 → 224 recipe);
            ``None`` resizes straight to ``size``.
        fill_color: Padding value for ``longest``.
    """

    size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    interpolation: Interpolation = "bicubic"
    resize_mode: ResizeMode = "shortest"
    resize_size: int | None = None
    fill_color: int = 0

    def __post_init__(self) -> None:
        if not _ints(self.size, 2) or min(self.size) <= 0:
            raise ConfigError(f"preprocess size must be (height, width) > 0, got {self.size!r}")
        if not (_floats(self.mean, 3) and _floats(self.std, 3)) or min(self.std) <= 0:
            raise ConfigError(f"preprocess mean/std must have 3 numbers each, std > 0: {self}")
        if self.resize_size is not None and not (
            _ints((self.resize_size,), 1) and self.resize_size > 0
        ):
            raise ConfigError(f"preprocess resize_size must be an int > 0: {self.resize_size!r}")
        if not _ints((self.fill_color,), 1):
            raise ConfigError(f"preprocess fill_color must be an int, got {self.fill_color!r}")
        if self.interpolation not in ("bicubic", "bilinear", "nearest"):
            raise ConfigError(f"unknown interpolation {self.interpolation!r}")
        if self.resize_mode not in ("shortest", "longest", "squash"):
            raise ConfigError(f"unknown resize_mode {self.resize_mode!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["size"] = list(self.size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocess:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(
                f"unknown preprocess keys {sorted(unknown)}; expected {sorted(known)}"
            )
        kw = dict(data)
        # Only reshape well-typed values here; __post_init__ rejects everything else by name.
        size = kw.get("size", (224, 224))
        if isinstance(size, int):
            kw["size"] = (size, size)
        elif isinstance(size, list | tuple):
            kw["size"] = tuple(size)
        for key in ("mean", "std"):
            value = kw.get(key)
            if isinstance(value, int | float):
                kw[key] = (float(value),) * 3
            elif isinstance(value, list | tuple):
                kw[key] = tuple(float(v) if _is_number(v) else v for v in value)
        return cls(**kw)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _ints(values: object, n: int) -> bool:
    return (
        isinstance(values, tuple)
        and len(values) == n
        and all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    )


def _floats(values: object, n: int) -> bool:
    return isinstance(values, tuple) and len(values) == n and all(map(_is_number, values))


def build_eval_transform(pre: Preprocess) -> Callable[[Image.Image], torch.Tensor]:
    """Deterministic PIL → tensor transform for ``pre`` (torchvision ops, no augmentation)."""
    from torchvision import transforms as T

    interp = {
        "bicubic": T.InterpolationMode.BICUBIC,
        "bilinear": T.InterpolationMode.BILINEAR,
        "nearest": T.InterpolationMode.NEAREST,
    }[pre.interpolation]
    h, w = pre.size
    steps: list[Callable[[Any], Any]] = []
    if pre.resize_mode == "squash":
        steps.append(T.Resize((h, w), interpolation=interp))
    elif pre.resize_mode == "longest":
        steps.append(_FitLongest((h, w), interp))
        steps.append(_CenterCropOrPad((h, w), pre.fill_color))
    else:
        short = pre.resize_size if pre.resize_size is not None else (h if h == w else None)
        resize = T.Resize(short, interpolation=interp) if short else _FitShortest((h, w), interp)
        steps.append(resize)
        steps.append(T.CenterCrop((h, w)))
    steps += [
        lambda im: im.convert("RGB") if im.mode != "RGB" else im,
        T.ToTensor(),
        T.Normalize(mean=pre.mean, std=pre.std),
    ]
    return T.Compose(steps)


class _FitShortest:
    """Resize so the image covers (h, w) while keeping aspect ratio."""

    def __init__(self, size: tuple[int, int], interp: Any) -> None:
        self.size, self.interp = size, interp

    def __call__(self, img: Image.Image) -> Image.Image:
        from torchvision.transforms import functional as F

        w, h = img.size
        ratio = min(h / self.size[0], w / self.size[1])
        return F.resize(img, [round(h / ratio), round(w / ratio)], interpolation=self.interp)


class _FitLongest:
    """Resize so the image fits inside (h, w) while keeping aspect ratio."""

    def __init__(self, size: tuple[int, int], interp: Any) -> None:
        self.size, self.interp = size, interp

    def __call__(self, img: Image.Image) -> Image.Image:
        from torchvision.transforms import functional as F

        w, h = img.size
        ratio = max(h / self.size[0], w / self.size[1])
        return F.resize(img, [round(h / ratio), round(w / ratio)], interpolation=self.interp)


class _CenterCropOrPad:
    def __init__(self, size: tuple[int, int], fill: int) -> None:
        self.size, self.fill = size, fill

    def __call__(self, img: Image.Image) -> Image.Image:
        from torchvision.transforms import functional as F

        w, h = img.size
        ch, cw = self.size
        if cw > w or ch > h:
            pad = [
                (cw - w) // 2 if cw > w else 0,
                (ch - h) // 2 if ch > h else 0,
                (cw - w + 1) // 2 if cw > w else 0,
                (ch - h + 1) // 2 if ch > h else 0,
            ]
            img = F.pad(img, pad, fill=self.fill)
        return F.center_crop(img, [ch, cw])
