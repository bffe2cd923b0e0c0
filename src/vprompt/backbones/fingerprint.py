"""A short, stable hash of a module's weights (how a prompt pack recognises its backbone)."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def weights_fingerprint(module: nn.Module) -> str:
    """Hash every state-dict key, shape and dtype, each tensor's float64 sum and L2 norm, and
    16 evenly spaced values per tensor.

    The sums change when any single weight changes; sampling adds position sensitivity. One
    pass over the weights keeps this well under a second for ViT-B sized models.

    Returns:
        16 lowercase hex characters.
    """
    h = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        h.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        if flat.numel() and flat.is_floating_point():
            k = min(16, flat.numel())
            idx = (torch.arange(k) * (flat.numel() - 1) // max(k - 1, 1)).to(flat.device)
            h.update(flat[idx].float().cpu().numpy().tobytes())
            sums = torch.stack(
                [flat.sum(dtype=torch.float64), torch.linalg.vector_norm(flat, dtype=torch.float64)]
            )
            h.update(sums.cpu().numpy().tobytes())
    return h.hexdigest()[:16]
