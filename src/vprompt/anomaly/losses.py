"""Pixel losses of the trainable anomaly methods: focal and dice, as the references define them.

Both follow zqhang/AnomalyCLIP ``loss.py`` (``FocalLoss``, taken from Hsuxu/Loss_ToolBox, and
``BinaryDiceLoss``), which AdaCLIP and later CLIP anomaly methods reuse. Shapes: B images,
C classes (2: normal, abnormal), S x S pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def focal_loss(
    probs: torch.Tensor,
    target: torch.Tensor,
    *,
    gamma: float = 2.0,
    alpha: Sequence[float] | None = None,
    smooth: float = 1e-5,
) -> torch.Tensor:
    """Focal loss on class probabilities, averaged over every pixel of every image.

    Per pixel with true class ``t``: ``-a_t (1 - p_t)^γ log p_t`` where, as in the reference,
    ``p_t = Σ_c y_c p_c + smooth`` with the one-hot ``y`` clamped to
    ``[smooth / (C - 1), 1 - smooth]`` (label smoothing that also keeps the log finite).

    Args:
        probs: B x C x S x S probabilities (they are not re-normalised).
        target: B x S x S (or B x 1 x S x S) class indices in ``[0, C)``, as floats or ints.
        gamma: The focusing exponent γ (the reference's 2).
        alpha: C class weights (normalised to sum 1, as the reference does with a list);
            None weighs every class 1.
        smooth: The smoothing value (the reference's 1e-5; 0 turns it off).

    Returns:
        The scalar mean loss.
    """
    if probs.dim() < 2:
        raise ValueError(f"probs must be B x C x ..., got shape {tuple(probs.shape)}")
    if not 0.0 <= smooth <= 1.0:
        raise ValueError(f"smooth must be in [0, 1], got {smooth}")
    c = probs.shape[1]
    flat = probs.reshape(probs.shape[0], c, -1).transpose(1, 2).reshape(-1, c)  # M x C
    idx = target.reshape(-1).long()
    if idx.numel() != flat.shape[0]:
        raise ValueError(f"target {tuple(target.shape)} does not match probs {tuple(probs.shape)}")
    one_hot = torch.zeros_like(flat).scatter_(1, idx[:, None], 1.0)
    if smooth:
        one_hot = one_hot.clamp(smooth / (c - 1), 1.0 - smooth)
    pt = (one_hot * flat).sum(1) + smooth
    if alpha is None:
        weight = torch.ones_like(pt)
    else:
        if len(alpha) != c:
            raise ValueError(f"alpha needs {c} class weights, got {len(alpha)}")
        table = torch.as_tensor(list(alpha), dtype=flat.dtype, device=flat.device)
        weight = (table / table.sum())[idx]
    return (-weight * (1.0 - pt).pow(gamma) * pt.log()).mean()


def dice_loss(prob_map: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary dice loss, ``1 - mean_b (2 |p·y| + 1) / (Σp + Σy + 1)`` (smoothing 1 per image).

    Args:
        prob_map: B x S x S probabilities of one class.
        target: B x S x S masks of that class (0/1).

    Returns:
        The scalar loss.
    """
    b = target.shape[0]
    p = prob_map.reshape(b, -1)
    y = target.reshape(b, -1).to(p.dtype)
    dice = (2.0 * (p * y).sum(1) + 1.0) / (p.sum(1) + y.sum(1) + 1.0)
    return 1.0 - dice.sum() / b
