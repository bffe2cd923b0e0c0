"""Training one universal adversarial patch (Brown et al. 2017, "Adversarial Patch").

The patch p (3 x s x s in [0, 1]) maximises the expected attack objective over images of the
training split and random placements t (:mod:`vprompt.attack.eot`)::

    untargeted:  max_p  E_{x,y,t} CE(f(A(p, x, t)), y)
    targeted:    min_p  E_{x,t}   CE(f(A(p, x, t)), target)

with f the frozen victim and A the paste. Each step draws one placement per image; Adam or
signed gradient steps update p, which is then clipped back to [0, 1]. Only p has
``requires_grad``: the victim's backbone and prompt are never updated (nor given gradients).
Everything random (the start patch, the data order, the placements) comes from seeded CPU
generators, so a seed gives the same patch bit for bit on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vprompt.attack.eot import MAX_AREA, PatchTransformConfig, apply_patch, sample_placements
from vprompt.attack.patch_file import MAX_PATCH_PIXELS
from vprompt.attack.victim import PixelTransform, Victim
from vprompt.data.dataset import ClassificationDataset
from vprompt.errors import ConfigError, DatasetError

PatchOptimizer = Literal["adam", "sign-sgd"]
DEFAULT_LR: dict[str, float] = {"adam": 0.05, "sign-sgd": 2 / 255}


@dataclass(frozen=True)
class PatchTrainConfig:
    """How a universal patch is learned.

    Attributes:
        transform: The placement distribution (size, shape, jitter, rotation, brightness).
        target: Targeted attack towards this class index; None: untargeted.
        optimizer: ``adam`` (Brown et al.) or ``sign-sgd`` (signed gradient steps, as PGD).
        lr: Step size; None: 0.05 for Adam, 2/255 for signed steps.
        epochs: Passes over the training split.
        batch_size: Images per step.
        seed: Seeds the start patch, the data order and the placements.
        patch_pixels: Side of the patch tensor; None: the pasted side at the largest scale on
            the victim's input, so the patch is never enlarged when pasted.
    """

    transform: PatchTransformConfig = field(default_factory=PatchTransformConfig)
    target: int | None = None
    optimizer: PatchOptimizer = "adam"
    lr: float | None = None
    epochs: int = 5
    batch_size: int = 32
    seed: int = 0
    patch_pixels: int | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "sign-sgd"):
            raise ConfigError(f"optimizer must be adam or sign-sgd, got {self.optimizer!r}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr}")
        for name, low in (("epochs", 1), ("batch_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 10**6:
                raise ConfigError(f"{name} must be an integer in [{low}, 1000000], got {value!r}")
        pixels = self.patch_pixels
        if pixels is not None and (
            isinstance(pixels, bool)
            or not isinstance(pixels, int)
            or not 1 <= pixels <= MAX_PATCH_PIXELS
        ):
            raise ConfigError(f"patch_pixels must be in [1, {MAX_PATCH_PIXELS}], got {pixels!r}")
        if self.target is not None and (
            isinstance(self.target, bool) or not isinstance(self.target, int) or self.target < 0
        ):
            raise ConfigError(f"target must be a class index >= 0, got {self.target!r}")

    @property
    def step_size(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]


@dataclass
class TrainedPatch:
    """The learned patch (3 x s x s in [0, 1], CPU) and one row of metrics per epoch."""

    patch: torch.Tensor
    history: list[dict[str, float]]


def patch_pixels_for(config: PatchTrainConfig, height: int, width: int) -> int:
    """The patch tensor's side: the config's, else the largest pasted side (clipped to the
    image) rounded up."""
    if config.patch_pixels is not None:
        return config.patch_pixels
    t = config.transform
    area = min(MAX_AREA, t.size * (1 + t.scale_jitter))
    cover = area * height * width
    side = math.sqrt(cover if t.shape == "square" else 4 * cover / math.pi)
    return max(1, min(MAX_PATCH_PIXELS, min(height, width), math.ceil(side)))


def iter_batches(
    data: ClassificationDataset,
    transform: PixelTransform,
    *,
    batch_size: int,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(B x 3 x H x W pixels on ``device``, B labels) batches: shuffled with ``generator``,
    in dataset order without; whole batches at once when the dataset keeps a pixel array."""
    from torch.utils.data import DataLoader

    from vprompt.data.batched import array_batches
    from vprompt.data.dataset import TransformedDataset

    fast = array_batches(data, transform, batch_size=batch_size, device=device, generator=generator)
    if fast is not None:
        yield from fast
        return
    loader: DataLoader[Any] = DataLoader(
        TransformedDataset(data, transform),  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=generator is not None,
        generator=generator,
        num_workers=0,
    )
    for images, labels in loader:
        yield images.to(device), labels


def attack_objective(
    logits: torch.Tensor, labels: torch.Tensor, target: int | None
) -> torch.Tensor:
    """The mean loss a step *minimises*: minus CE of the labels (untargeted), or CE of the
    target (targeted)."""
    if target is None:
        return -F.cross_entropy(logits, labels)
    return F.cross_entropy(logits, torch.full_like(labels, target))


def patch_step(
    victim: Victim,
    patch: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: PatchTrainConfig,
    adam: torch.optim.Optimizer | None,
    placements: torch.Generator,
    *,
    target: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One update of the leaf ``patch`` on a batch: the patch pasted at EOT placements drawn
    from ``placements``, the attack objective, an ``adam`` step (or a signed step of
    ``config.step_size``), then clipped to [0, 1].

    Returns:
        The objective (detached) and, per image, whether the attack hit (untargeted: a wrong
        prediction; targeted: the target).
    """
    b, _, h, w = images.shape
    where = sample_placements(
        b, h, w, config.transform, patch_pixels=int(patch.shape[-1]), generator=placements
    ).to(images.device)
    logits = victim(apply_patch(images, patch, where, config.transform.shape))
    loss = attack_objective(logits, labels, target)
    if adam is not None:
        adam.zero_grad(set_to_none=True)
        loss.backward()
        adam.step()
    else:
        (grad,) = torch.autograd.grad(loss, patch)
        with torch.no_grad():
            patch -= config.step_size * grad.sign()
    with torch.no_grad():
        patch.clamp_(0, 1)
        pred = logits.argmax(dim=1)
        hit = pred != labels if target is None else pred == target
    return loss.detach(), hit


def train_patch(
    victim: Victim,
    train: ClassificationDataset,
    config: PatchTrainConfig,
    *,
    progress: bool | None = None,
) -> TrainedPatch:
    """Learn a universal patch against ``victim`` on the training split ``train``.

    Returns:
        The patch and, per epoch, the mean objective and the fraction of patched training
        images the victim got wrong (untargeted) or called the target (targeted).
    """
    if len(train) == 0:
        raise DatasetError("the training split is empty: a universal patch needs images")
    if config.target is not None and config.target >= len(victim.classnames):
        raise ConfigError(
            f"target class {config.target} is out of range for {len(victim.classnames)} classes"
        )
    device = victim.device
    first = victim.pixel_transform(train[0][0])
    h, w = int(first.shape[-2]), int(first.shape[-1])
    s = patch_pixels_for(config, h, w)
    placements = torch.Generator().manual_seed(config.seed)
    order = torch.Generator().manual_seed(config.seed + 1)
    patch = torch.rand(3, s, s, generator=placements).to(device).requires_grad_(True)
    adam = torch.optim.Adam([patch], lr=config.step_size) if config.optimizer == "adam" else None
    steps_per_epoch = -(-len(train) // config.batch_size)
    history: list[dict[str, float]] = []
    bar = tqdm(
        total=config.epochs * steps_per_epoch,
        desc="patch",
        unit="step",
        leave=False,
        disable=True if progress is False else None,
    )
    for epoch in range(config.epochs):
        total, fooled, seen = 0.0, 0, 0
        batches = iter_batches(
            train, victim.pixel_transform, batch_size=config.batch_size, device=device,
            generator=order,
        )  # fmt: skip
        for images, labels in batches:
            labels = labels.to(device)
            loss, hit = patch_step(
                victim, patch, images, labels, config, adam, placements, target=config.target
            )
            total += float(loss) * len(images)
            fooled += int(hit.sum())
            seen += len(images)
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.3f}")
        history.append(
            {"epoch": float(epoch + 1), "objective": total / seen, "train_fooled": fooled / seen}
        )
    bar.close()
    return TrainedPatch(patch=patch.detach().cpu(), history=history)


def describe_config(config: PatchTrainConfig) -> dict[str, Any]:
    """The training settings as JSON-ready values (for the patch file)."""
    return {
        "optimizer": config.optimizer,
        "lr": config.step_size,
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "seed": config.seed,
        "patch_pixels": config.patch_pixels,
    }
