"""Whole batches from an in-memory pixel array: no PIL, no worker processes, resized on the device.

Two optional capabilities meet here. A dataset that keeps every image in one uint8 array of
one size (Fashion-MNIST and subsets of it) exposes ``pixel_array()``; a transform that knows a
batched twin of its per-image steps exposes ``batch(pixels, generator)``. When both are there,
:func:`array_batches` serves (images, labels) batches by cutting the array and transforming the
whole batch on the target device — the per-image PIL pipeline and its worker processes, which
bound a plain training loop's throughput on a GPU, are skipped. The batches hold the same
images in the same order as a ``DataLoader`` with the same generator, with 8-bit pixel values
within one level of the per-image path's (PIL rounds after each of its two separable passes,
the batched resize once).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vprompt.errors import DatasetError


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB") if image.mode != "RGB" else image


class ResizeToTensor:
    """RGB → bilinear resize to ``size`` x ``size`` → optional random horizontal flip →
    [0, 1] tensor → optional normalisation; per PIL image, or a uint8 batch at once.

    Called on a PIL image it runs torchvision's transforms for these steps (``transforms``
    lists them, which is also how feature caches describe it). :meth:`batch` does the same to
    a B x H x W (grey) or B x H x W x 3 uint8 tensor on any device.

    Args:
        size: Output side.
        flip: Flip each image horizontally with probability 1/2.
        mean: Per-channel mean to subtract (with ``std``), or None for [0, 1] output.
        std: Per-channel standard deviation.
    """

    def __init__(
        self,
        size: int,
        *,
        flip: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        from torchvision import transforms as T

        if (mean is None) != (std is None):
            raise ValueError("give mean and std together")
        self.size, self.flip = int(size), flip
        self.mean = None if mean is None else tuple(float(m) for m in mean)
        self.std = None if std is None else tuple(float(s) for s in std)
        steps: list[Any] = [
            T.Lambda(_to_rgb),
            T.Resize((self.size, self.size), interpolation=T.InterpolationMode.BILINEAR),
        ]
        if flip:
            steps.append(T.RandomHorizontalFlip())
        steps.append(T.ToTensor())
        if self.mean is not None:
            steps.append(T.Normalize(self.mean, self.std))
        self.transforms = steps
        self._compose = T.Compose(steps)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        out: torch.Tensor = self._compose(image)
        return out

    def __repr__(self) -> str:
        return repr(self._compose)

    def batch(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """B x H x W or B x H x W x 3 uint8 → B x 3 x size x size float on ``pixels.device``.

        Flips are drawn from ``generator`` (CPU), else from torch's global generator.
        """
        if pixels.dtype != torch.uint8 or pixels.ndim not in (3, 4):
            raise DatasetError(
                f"expected B x H x W or B x H x W x 3 uint8 pixels, got {pixels.dtype} "
                f"of shape {tuple(pixels.shape)}"
            )
        # Grey images are resized as one channel and repeated (what convert("RGB") gives).
        x = pixels.unsqueeze(1) if pixels.ndim == 3 else pixels.permute(0, 3, 1, 2)
        x = x.float()
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(
                x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True
            )
        # PIL resizes to 8-bit values; round the same way so both paths feed the same pixels.
        x = x.round_().clamp_(0, 255).div_(255)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.flip:
            flips = torch.rand(len(x), generator=generator) < 0.5
            x = torch.where(flips.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
        if self.mean is not None and self.std is not None:
            mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x.contiguous()


#: Pixel arrays up to this size are copied to a CUDA device whole, once per pass.
DEVICE_ARRAY_BYTES = 1 << 30


class ArrayBatches:
    """Iterable of (images on ``device``, labels on CPU) batches cut from a pixel array.

    Shuffled with ``generator`` exactly as ``DataLoader(shuffle=True, generator=...)``
    shuffles (one seed draw, then ``randperm``), in dataset order without one.
    """

    def __init__(
        self,
        pixels: np.ndarray,
        labels: Sequence[int],
        transform: Any,
        *,
        batch_size: int,
        device: torch.device,
        generator: torch.Generator | None = None,
    ) -> None:
        if len(pixels) != len(labels):
            raise DatasetError(f"{len(pixels)} images but {len(labels)} labels")
        array = np.ascontiguousarray(pixels)
        with warnings.catch_warnings():
            # Datasets hand out read-only arrays (a decompressed file); batches are only read
            # from them, so sharing the memory is safe and PyTorch's warning would be noise.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            self.pixels = torch.from_numpy(array)
        self.labels = torch.as_tensor(list(labels), dtype=torch.int64)
        self.transform = transform
        self.batch_size = int(batch_size)
        self.device = device
        self.generator = generator

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        flips: torch.Generator | None = None
        if self.generator is not None:
            base_seed = int(torch.empty((), dtype=torch.int64).random_(generator=self.generator))
            order = torch.randperm(n, generator=self.generator)
            flips = torch.Generator().manual_seed(base_seed)
        else:
            order = torch.arange(n)
        labels = self.labels[order]
        cuda = self.device.type == "cuda"
        if cuda:
            labels = labels.pin_memory()  # the engine's copies then queue without waiting
        if self.pixels.nbytes <= DEVICE_ARRAY_BYTES:
            # One upload per pass (nothing to copy on the CPU); batches are cut on the device.
            pixels = self.pixels.to(self.device)
            order = (order.pin_memory() if cuda else order).to(self.device, non_blocking=True)
        else:
            pixels = self.pixels
        for start in range(0, n, self.batch_size):
            batch = pixels[order[start : start + self.batch_size]]
            if batch.device != self.device:
                batch = (batch.pin_memory() if cuda else batch).to(self.device, non_blocking=True)
            yield self.transform.batch(batch, flips), labels[start : start + self.batch_size]


def pixel_array(data: Any) -> np.ndarray | None:
    """The dataset's images as one uint8 array, or None when it keeps no such array."""
    get = getattr(data, "pixel_array", None)
    if get is None:
        return None
    pixels = get()
    if pixels is None:
        return None
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim not in (3, 4) or len(pixels) != len(data):
        return None
    if pixels.ndim == 4 and pixels.shape[-1] != 3:
        return None
    return pixels


def array_batches(
    data: Any,
    transform: Any,
    *,
    batch_size: int,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> ArrayBatches | None:
    """:class:`ArrayBatches` when ``data`` has a pixel array, labels without decoding and
    ``transform`` a batched twin; None otherwise (use a per-image loader)."""
    if not callable(getattr(transform, "batch", None)) or not hasattr(data, "all_labels"):
        return None
    pixels = pixel_array(data)
    if pixels is None:
        return None
    return ArrayBatches(
        pixels,
        data.all_labels(),
        transform,
        batch_size=batch_size,
        device=device,
        generator=generator,
    )
