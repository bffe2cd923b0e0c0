"""Hardening a learned prompt against universal patches by adversarial training.

Adversarial training (Madry et al. 2018, "Towards Deep Learning Models Resistant to
Adversarial Attacks") trains on the worst inputs an attacker can find. Here the attacker is
a universal patch under random placements (Brown et al. 2017, "Adversarial Patch"; see
:mod:`vprompt.attack.eot`) and the defender may change only the prompt: the frozen backbone
stays bit for bit what it was. Starting from a pack's prompt, each epoch

1. **re-trains the patch against the current prompt** (the attacker adapts): ``patch_steps``
   optimizer steps on the training split, warm-started from the previous epoch's patch, with
   the objective and update of :func:`~vprompt.attack.universal.train_patch` (untargeted:
   maximise the cross-entropy). Every parameter of the method is frozen for these steps, so
   the patch's gradient never reaches the prompt;
2. **trains the prompt for one epoch** on the training split with, for every batch of clean
   images x and labels y, the usual adversarial-training mixture (Goodfellow et al. 2015's
   weighting of clean and adversarial terms)::

       loss = (1 - mix) * L(x, y) + mix * L(A(p, x, t), y)

   where L is the method's own training loss (cross-entropy plus its auxiliary terms, as
   :func:`~vprompt.engine.epoch.train_one_epoch` computes it), A pastes the patch p, held
   constant (detached), at fresh random placements t, and the update uses the method's own
   optimizer settings (``config.optim``: optimizer, peak learning rate, momentum, weight decay,
   batch size, gradient clipping, step unit) through the engine's builders.

Where the patch goes is exactly where the attack puts it (:mod:`vprompt.attack.victim`): on
the [0, 1] image at the resolution the method reads, before normalisation and before any
prompt. The prompt step runs the method in train mode (its prompt dropout is active) while
its backbone stays in eval mode (``PromptMethod.train`` keeps BatchNorm statistics and dropout
of the frozen model fixed), as the engine trains; the patch step runs in eval mode, as the
victim is attacked.

Deliberate differences from an ordinary ``fit`` epoch: the method's training augmentation
(random flips and crops of ``input_transform(True)``) is not applied, since the patch is pasted
on the geometric [0, 1] stage of ``input_transform(False)`` and the random placements already
vary every image; the schedule is the method's cosine over the hardening epochs without a
warm-up (the prompt is already trained); lifecycle hooks (``before_epoch``, ``after_epoch``)
are not called, so data-derived prompt state (label mappings, prompt averages, clusters) stays
as in the pack and only ``trainable_parameters()`` move.

Everything random is seeded: epoch ``e``'s batches are shuffled by
``torch.Generator().manual_seed(epoch_seed(seed, e))`` (the order ``fit`` uses), the global
generators (prompt dropout) are reseeded every epoch, and the start patch, the patch steps'
data order and both placement streams come from their own CPU generators, so a seed gives
the same hardened prompt bit for bit on the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vprompt.attack.eot import PatchTransformConfig, apply_patch, sample_placements
from vprompt.attack.universal import (
    PatchOptimizer,
    PatchTrainConfig,
    iter_batches,
    patch_pixels_for,
    patch_step,
)
from vprompt.attack.victim import Victim, victim_from_method
from vprompt.data.dataset import ClassificationDataset
from vprompt.engine.fit import epoch_steps
from vprompt.engine.optim import build_optimizer, flat_params, set_lr
from vprompt.engine.runtime import (
    check_classes,
    check_labels,
    derived_seed,
    epoch_seed,
    seed_everything,
)
from vprompt.engine.schedule import LRSchedule
from vprompt.errors import ConfigError, DatasetError, VPromptError
from vprompt.methods.base import Capabilities, PromptMethod
from vprompt.methods.config import OptimConfig
from vprompt.utils.precision import autocast_for

_MAX_COUNT = 10**6


@dataclass(frozen=True)
class HardenConfig:
    """How a prompt is hardened (see the module docstring for the procedure).

    Attributes:
        transform: The patch's placement distribution (area, shape, jitter, rotation).
        epochs: Hardening epochs, each one patch update and one prompt epoch.
        patch_steps: The attacker's optimizer steps per epoch (0: the patch stays as given).
        mix: Weight of the patched loss; ``1 - mix`` weighs the clean loss.
        seed: Seeds the start patch, data orders, placements and prompt dropout.
        patch_optimizer: ``adam`` (Brown et al.) or ``sign-sgd``, as in ``train_patch``.
        patch_lr: The patch's step size (None: ``train_patch``'s default).
        batch_size: Images per step, for the prompt and the patch (None: the method's
            ``optim.batch_size``).
        lr: The prompt's peak learning rate (None: the method's ``optim.lr``).
    """

    transform: PatchTransformConfig = field(default_factory=PatchTransformConfig)
    epochs: int = 3
    patch_steps: int = 20
    mix: float = 0.5
    seed: int = 0
    patch_optimizer: PatchOptimizer = "adam"
    patch_lr: float | None = None
    batch_size: int | None = None
    lr: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.transform, PatchTransformConfig):
            raise ConfigError("transform must be a PatchTransformConfig")
        for name, low in (("epochs", 1), ("patch_steps", 0)):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not low <= value <= _MAX_COUNT
            ):
                raise ConfigError(
                    f"{name} must be an integer in [{low}, {_MAX_COUNT}], got {value!r}"
                )
        mix = self.mix
        if (
            isinstance(mix, bool)
            or not isinstance(mix, int | float)
            or not math.isfinite(mix)
            or not 0 <= mix <= 1
        ):
            raise ConfigError(f"mix (the patched loss's weight) must be in [0, 1], got {mix!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        size = self.batch_size
        if size is not None and (
            isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= _MAX_COUNT
        ):
            raise ConfigError(f"batch_size must be an integer in [1, {_MAX_COUNT}], got {size!r}")
        if self.lr is not None and not (
            isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0
        ):
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr!r}")
        self.patch_config(1)  # validates the patch optimizer and step size

    def patch_config(self, batch_size: int) -> PatchTrainConfig:
        """The attacker's settings (one epoch's worth; the step budget is ``patch_steps``)."""
        return PatchTrainConfig(
            transform=self.transform,
            optimizer=self.patch_optimizer,
            lr=self.patch_lr,
            epochs=1,
            batch_size=batch_size,
            seed=self.seed,
        )


@dataclass
class HardenResult:
    """The attacker's last patch (3 x s x s in [0, 1], CPU) and one record per epoch."""

    patch: torch.Tensor
    history: list[dict[str, Any]]


def check_capabilities(name: str, caps: Capabilities) -> None:
    """Refuse a method with no prompt to harden, from what it declares.

    Raises:
        ConfigError: A training-free method (zero-shot, Tip-Adapter …), one that trains a copy
            of the backbone instead of a prompt, one that learns without labels, or one that
            shapes its own gradient (its ``backward`` cannot take the mixed loss).
    """
    if not caps.trains:
        raise ConfigError(
            f"{name} does not train a prompt (it is training-free), so there is nothing to "
            "harden; harden a pack of a method that trains (visual-prompt, vpt, coop …)"
        )
    if not caps.is_prompt_method:
        raise ConfigError(f"{name} trains a copy of the backbone, not a prompt; nothing to harden")
    if not caps.uses_labels:
        raise ConfigError(
            f"{name} learns without labels, and adversarial training needs labelled images"
        )
    if caps.custom_backward:
        raise ConfigError(
            f"{name} shapes its own gradient (custom backward), which cannot take the mixed "
            "clean + patched loss of hardening"
        )


def check_hardenable(method: PromptMethod) -> OptimConfig:
    """The method's optimizer settings, after :func:`check_capabilities`.

    Raises:
        ConfigError: What :func:`check_capabilities` refuses, or a config without ``optim``.
    """
    check_capabilities(method.name, method.capabilities)
    optim = getattr(method.config, "optim", None)
    if not isinstance(optim, OptimConfig):
        raise ConfigError(f"{method.name}: config.optim must be an OptimConfig")
    return optim


def hardening_optim(optim: OptimConfig, config: HardenConfig) -> OptimConfig:
    """The method's optimizer settings for ``config.epochs`` epochs without warm-up (and the
    config's batch size and peak rate when it sets them)."""
    return dataclasses.replace(
        optim,
        epochs=config.epochs,
        warmup_epochs=0.0,
        lr=float(config.lr) if config.lr is not None else optim.lr,
        batch_size=config.batch_size or optim.batch_size,
    )


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Within: no parameter of ``module`` requires grad; each one's flag is restored after."""
    saved = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def attacked_view(method: PromptMethod) -> Victim:
    """The method as a :class:`Victim` (pixel stage, normalisation) without freezing its prompt
    for good: the victim's constructor freezes every parameter, this restores the flags."""
    with frozen(method):
        return victim_from_method(method, {"hardening": True})


def _normalised(victim: Victim, pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - victim.mean) / victim.std if victim.normalises else pixels


def adapt_patch(
    victim: Victim,
    train: ClassificationDataset,
    patch: torch.Tensor,
    config: PatchTrainConfig,
    *,
    steps: int,
    order: torch.Generator,
    placements: torch.Generator,
) -> tuple[torch.Tensor, dict[str, float | None]]:
    """Step (1): ``steps`` updates of ``patch`` against the frozen ``victim`` on ``train``.

    The objective and update are :func:`~vprompt.attack.universal.train_patch`'s (untargeted
    cross-entropy ascent; Adam or signed steps; clipped to [0, 1]), warm-started from
    ``patch`` instead of noise; passes over ``train`` repeat, shuffled by ``order``, until the
    budget is spent. Every parameter of the victim is frozen meanwhile.

    Returns:
        The new patch (CPU) and the steps' mean objective and fraction of images fooled
        (None when ``steps`` is 0).
    """
    if steps == 0:
        return patch.detach().cpu().clone(), {"patch_objective": None, "patch_fooled": None}
    device = victim.device
    p = patch.detach().clone().to(device).requires_grad_(True)
    adam = torch.optim.Adam([p], lr=config.step_size) if config.optimizer == "adam" else None
    total, fooled, seen, done = 0.0, 0, 0, 0
    with frozen(victim):
        victim.eval()
        while done < steps:
            batches = iter_batches(
                train, victim.pixel_transform, batch_size=config.batch_size, device=device,
                generator=order,
            )  # fmt: skip
            for images, labels in batches:
                if done >= steps:
                    break
                labels = labels.to(device)
                b = len(images)
                loss, hit = patch_step(
                    victim, p, images, labels, config, adam, placements, target=None
                )
                total += float(loss) * b
                fooled += int(hit.sum())
                seen += b
                done += 1
    stats: dict[str, float | None] = {
        "patch_objective": total / seen,
        "patch_fooled": fooled / seen,
    }
    return p.detach().cpu(), stats


def _method_loss(
    method: PromptMethod, victim: Victim, pixels: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's training loss of one batch of [0, 1] pixels: cross-entropy plus the
    method's auxiliary terms; and the B x C logits."""
    with autocast_for(pixels.device):
        out = method(_normalised(victim, pixels))
    logits = out.logits.float()
    loss = F.cross_entropy(logits, labels)
    for term in out.aux_loss.values():
        loss = loss + term.float()
    return loss, logits


def harden_epoch(
    method: PromptMethod,
    victim: Victim,
    train: ClassificationDataset,
    patch: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    schedule: LRSchedule,
    *,
    params: Sequence[nn.Parameter],
    optim: OptimConfig,
    epoch: int,
    start_step: int,
    steps: int,
    mix: float,
    transform: PatchTransformConfig,
    seed: int,
    placements: torch.Generator,
) -> dict[str, Any]:
    """Step (2): one epoch of prompt updates on mixed clean / patched batches.

    ``patch`` is a constant here (detached): the prompt's update never changes it. A term whose
    weight is 0 is not computed, so ``mix=0`` is exactly the engine's ordinary epoch on the
    same batches (and ``mix=1`` trains on patched images only).

    Returns:
        The epoch's record: ``step`` after it, ``lr`` of the last step, and the mean clean /
        patched loss and accuracy on the training batches (None for a term not computed).
    """
    device = victim.device
    constant = patch.detach().to(device)
    s = int(constant.shape[-1])
    num_classes = len(method.classnames)
    seed_everything(derived_seed(seed, f"harden-epoch-{epoch}"))  # prompt dropout
    order = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    sums = {"clean_loss": 0.0, "clean_acc": 0.0, "patched_loss": 0.0, "patched_acc": 0.0}
    seen, step, lr = 0, start_step, schedule(start_step)
    method.train()  # the prompt's mode; PromptMethod.train keeps the backbone in eval mode
    batches = iter_batches(
        train, victim.pixel_transform, batch_size=optim.batch_size, device=device,
        generator=order,
    )  # fmt: skip
    for index, (images, labels) in enumerate(batches):
        if index >= steps:
            break
        check_labels(labels, num_classes, "training")
        labels = labels.to(device)
        lr = schedule(step)
        set_lr(optimizer, lr)
        terms: list[tuple[str, float, torch.Tensor]] = []
        if mix < 1:
            clean_loss, clean_logits = _method_loss(method, victim, images, labels)
            terms.append(("clean", 1 - mix, clean_loss))
            sums["clean_acc"] += float((clean_logits.detach().argmax(1) == labels).sum())
        if mix > 0:
            b, _, h, w = images.shape
            where = sample_placements(b, h, w, transform, patch_pixels=s, generator=placements).to(
                device
            )
            patched = apply_patch(images, constant, where, transform.shape)
            patched_loss, patched_logits = _method_loss(method, victim, patched, labels)
            terms.append(("patched", mix, patched_loss))
            sums["patched_acc"] += float((patched_logits.detach().argmax(1) == labels).sum())
        # A lone term keeps its own value (no multiplication by 1.0), as in ordinary training.
        loss = terms[0][2] if len(terms) == 1 else sum(w * t for _, w, t in terms)
        assert isinstance(loss, torch.Tensor)
        if not bool(torch.isfinite(loss.detach())):
            raise VPromptError(
                f"the hardening loss became {float(loss)} at epoch {epoch}, step {step}; "
                "lower the learning rate (--lr)"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
        optimizer.step()
        for name, _, term in terms:
            sums[f"{name}_loss"] += float(term.detach()) * len(labels)
        seen += len(labels)
        step += 1
    method.eval()
    record: dict[str, Any] = {"step": step, "lr": lr}
    for name, weight_on in (("clean", mix < 1), ("patched", mix > 0)):
        for what in ("loss", "acc"):
            key = f"{name}_{what}"
            record[key] = sums[key] / max(seen, 1) if weight_on else None
    return record


def harden(
    method: PromptMethod,
    train: ClassificationDataset,
    config: HardenConfig,
    *,
    init_patch: torch.Tensor | None = None,
    progress: bool | None = None,
) -> HardenResult:
    """Adversarially train ``method``'s prompt in place against a universal patch that adapts
    to it every epoch (the module docstring gives the procedure); only ``train`` is read.

    Args:
        method: A method that trains a prompt (see :func:`check_hardenable`), on its device.
        train: The training split.
        config: The hardening settings.
        init_patch: The attacker's start (3 x s x s in [0, 1]), e.g. a patch trained from
            scratch against the original prompt; None: seeded uniform noise of the side
            ``train_patch`` would use.

    Returns:
        The attacker's last patch and, per epoch, the patch step's and the prompt epoch's
        records.

    Raises:
        ConfigError: A method with no prompt to harden, classes that differ from the data's,
            or an ``init_patch`` that is not 3 x s x s in [0, 1].
        DatasetError: An empty training split.
    """
    optim = hardening_optim(check_hardenable(method), config)
    if len(train) == 0:
        raise DatasetError("the training split is empty: hardening needs images")
    check_classes(method, train, "training")
    groups = method.trainable_parameters()  # before the victim's freezing hides them
    params = flat_params(groups)
    optimizer = build_optimizer(groups, optim)
    n_steps = epoch_steps(len(train), optim)
    schedule = LRSchedule.from_config(optim, steps_per_epoch=n_steps)
    victim = attacked_view(method)
    patch_cfg = config.patch_config(optim.batch_size)
    first = victim.pixel_transform(train[0][0])
    patch = _start_patch(init_patch, patch_cfg, config.seed, first.shape[-2], first.shape[-1])
    patch_order = torch.Generator().manual_seed(derived_seed(config.seed, "harden-patch-order"))
    patch_where = torch.Generator().manual_seed(derived_seed(config.seed, "harden-patch-where"))
    prompt_where = torch.Generator().manual_seed(derived_seed(config.seed, "harden-prompt-where"))
    history: list[dict[str, Any]] = []
    bar = tqdm(
        total=config.epochs, desc="harden", unit="epoch", leave=False,
        disable=True if progress is False else None,
    )  # fmt: skip
    try:
        for epoch in range(config.epochs):
            patch, patch_stats = adapt_patch(
                victim, train, patch, patch_cfg, steps=config.patch_steps, order=patch_order,
                placements=patch_where,
            )  # fmt: skip
            record = harden_epoch(
                method, victim, train, patch, optimizer, schedule, params=params, optim=optim,
                epoch=epoch, start_step=epoch * n_steps, steps=n_steps, mix=config.mix,
                transform=config.transform, seed=config.seed,
                placements=prompt_where,
            )  # fmt: skip
            history.append({"epoch": epoch + 1, **patch_stats, **record})
            bar.update(1)
    finally:
        bar.close()
        method.eval()
    return HardenResult(patch=patch, history=history)


def _start_patch(
    init: torch.Tensor | None, config: PatchTrainConfig, seed: int, height: int, width: int
) -> torch.Tensor:
    if init is None:
        s = patch_pixels_for(config, int(height), int(width))
        return torch.rand(3, s, s, generator=torch.Generator().manual_seed(seed))
    shape = tuple(init.shape)
    if len(shape) != 3 or shape[0] != 3 or shape[1] != shape[2] or not init.is_floating_point():
        raise ConfigError(f"init_patch must be a float 3 x s x s tensor, got {list(shape)}")
    if not bool(torch.isfinite(init).all()) or float(init.min()) < 0 or float(init.max()) > 1:
        raise ConfigError("init_patch must hold finite pixel values in [0, 1]")
    return init.detach().float().cpu().clone()
