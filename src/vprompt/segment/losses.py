"""Mask losses on per-pixel logits against {0, 1} targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft dice between sigmoid(logits) and a {0, 1} target (+1 smoothing)."""
    prob = logits.sigmoid()
    return 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)


def sigmoid_focal_loss(
    logits: torch.Tensor, target: torch.Tensor, *, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Mean focal loss (RetinaNet) of per-pixel logits against a {0, 1} target."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return (alpha_t * ce * (1 - p_t) ** gamma).mean()


def mask_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice + focal, the mask loss of PerSAM-F (and of SAM's own training)."""
    return dice_loss(logits, target) + sigmoid_focal_loss(logits, target)
