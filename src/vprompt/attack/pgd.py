"""Per-image attacks for evaluation: projected gradient descent (Madry et al. 2018).

Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks" (ICLR 2018):
maximise the loss over an allowed set S around x by ``x_{t+1} = Π_S(x_t + α sign(∇_x L))``,
from ``x_0 = x`` or a uniform random start in S.

* :func:`linf_pgd`: S = the L∞ ball of radius ε around x, intersected with [0, 1].
* :func:`patch_pgd`: S = images equal to x outside a fixed patch region, with any values in
  [0, 1] inside it (a per-image patch at a given location; Brown et al. 2017's threat model
  optimised for each image instead of universally).

Untargeted attacks ascend the cross-entropy of the true label; targeted ones descend the
cross-entropy of the target class. The loss is summed over the batch, so each image's
gradient is its own. Both run on the victim in eval mode and touch only the images.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from vprompt.attack.eot import PatchShape, region_mask
from vprompt.errors import ConfigError
from vprompt.utils.registry import Registry

Attack = Callable[..., torch.Tensor]
ATTACKS: Registry[Attack] = Registry("attack")


def _objective(logits: torch.Tensor, labels: torch.Tensor, target: int | None) -> torch.Tensor:
    """The quantity every step ascends: CE of the true labels, or minus CE of the target."""
    if target is None:
        return F.cross_entropy(logits, labels, reduction="sum")
    wanted = torch.full_like(labels, int(target))
    return -F.cross_entropy(logits, wanted, reduction="sum")


def _gradient(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    labels: torch.Tensor,
    target: int | None,
) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        objective = _objective(model(x), labels, target)
        (grad,) = torch.autograd.grad(objective, x)
    return grad


def _check_steps(steps: int, step_size: float) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"steps must be an integer >= 0, got {steps!r}")
    if not step_size > 0:
        raise ConfigError(f"step_size must be > 0, got {step_size}")


def linf_pgd(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    random_start: bool = True,
    target: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """L∞ PGD: the adversarial images within ``eps`` of ``images`` (and within [0, 1]).

    Args:
        model: [0, 1] pixels → logits (a :class:`~vprompt.attack.victim.Victim`).
        images: B x 3 x H x W in [0, 1].
        labels: B true labels.
        eps: L∞ radius in pixel units (8/255 is the common CIFAR/ImageNet budget).
        step_size: α, the size of each signed step.
        steps: Number of steps.
        random_start: Start from a uniform point of the ball (drawn on the CPU from
            ``generator``), as Madry et al. do.
        target: Make the model predict this class instead of merely a wrong one.

    Returns:
        B x 3 x H x W adversarial images (detached).
    """
    _check_steps(steps, step_size)
    if not eps >= 0:
        raise ConfigError(f"eps must be >= 0, got {eps}")
    x = images.detach()
    lower, upper = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    adv = x.clone()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        adv = torch.minimum(torch.maximum(x + eps * (2 * noise - 1), lower), upper)
    for _ in range(steps):
        grad = _gradient(model, adv, labels, target)
        adv = torch.minimum(torch.maximum(adv + step_size * grad.sign(), lower), upper)
    return adv.detach()


def patch_pgd(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    top: int,
    left: int,
    side: int,
    step_size: float,
    steps: int,
    shape: PatchShape = "square",
    random_start: bool = True,
    target: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PGD restricted to a patch region: each image gets its own patch at (top, left).

    Args:
        model: [0, 1] pixels → logits.
        images: B x 3 x H x W in [0, 1].
        labels: B true labels.
        top: Row of the region's top edge, in pixels.
        left: Column of its left edge.
        side: Region side in pixels (a circle's diameter).
        step_size: α, in pixel units.
        steps: Number of steps.
        shape: The region: the square, or its inscribed disc.
        random_start: Start the region from uniform noise (else from the image's own pixels).
        target: Make the model predict this class.

    Returns:
        B x 3 x H x W images, equal to ``images`` outside the region.
    """
    _check_steps(steps, step_size)
    x = images.detach()
    h, w = x.shape[-2:]
    mask = region_mask(h, w, top=top, left=left, side=side, shape=shape, device=x.device)
    mask = mask.to(x.dtype)
    inside = x.clone()
    if random_start:
        inside = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)

    def paste(values: torch.Tensor) -> torch.Tensor:
        return x * (1 - mask) + values * mask

    for _ in range(steps):
        grad = _gradient(model, paste(inside), labels, target)
        inside = (inside + step_size * grad.sign()).clamp(0, 1)
    return paste(inside).detach()


ATTACKS.register("linf-pgd", linf_pgd)
ATTACKS.register("patch-pgd", patch_pgd)


def run_attack(
    name: str, model: Any, images: torch.Tensor, labels: torch.Tensor, **kwargs: Any
) -> torch.Tensor:
    """The registered per-image attack ``name`` (``linf-pgd``, ``patch-pgd``) on a batch."""
    return ATTACKS.get(name)(model, images, labels, **kwargs)
