"""A short, stable hash of a module's weights (how a prompt pack recognises its backbone)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import nn

_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def weights_fingerprint(module: nn.Module) -> str:
    """Hash every state-dict key, shape and dtype, 16 evenly spaced values per tensor, and the
    sums of each floating-point tensor's bit patterns over blocks of 4096 values.

    Integer addition is exact and associative, so the block sums do not depend on how a
    reduction splits the work — the thread count, CPU or GPU — where float sums do. Any change
    of a single weight changes its block's sum. One pass over the weights.

    Returns:
        16 lowercase hex characters.
    """
    return _fingerprint(module, _checksums)


def legacy_weights_fingerprint(module: nn.Module) -> str:
    """The fingerprint vprompt wrote into packs before 0.1.0's order-independent one: float64
    sums and L2 norms, which vary with the reduction's thread count. Only read to recognise
    the backbone of an older pack."""
    return _fingerprint(module, _float_sums)


def _fingerprint(module: nn.Module, sums: Callable[[torch.Tensor], bytes]) -> str:
    """Keys, shapes, dtypes, 16 samples and ``sums(flat)`` of every floating-point tensor."""
    h = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        h.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        if flat.numel() and flat.is_floating_point():
            h.update(_samples(flat))
            h.update(sums(flat))
    return h.hexdigest()[:16]


def _checksums(flat: torch.Tensor, block: int = 4096) -> bytes:
    """Per-block sums of the bit patterns in int64: exact, so independent of how the
    reduction is split, and position-sensitive at block granularity."""
    bits = flat.contiguous().view(_INT_VIEW[flat.element_size()])
    full = bits.numel() // block * block
    parts = [bits[:full].view(-1, block).sum(dim=1, dtype=torch.int64)] if full else []
    if full < bits.numel():
        parts.append(bits[full:].sum(dtype=torch.int64).reshape(1))
    return bytes(torch.cat(parts).cpu().numpy().tobytes())


def _float_sums(flat: torch.Tensor) -> bytes:
    """The float64 sum and L2 norm (the earlier fingerprint's, thread-count dependent)."""
    sums = torch.stack(
        [flat.sum(dtype=torch.float64), torch.linalg.vector_norm(flat, dtype=torch.float64)]
    )
    return bytes(sums.cpu().numpy().tobytes())


def _samples(flat: torch.Tensor) -> bytes:
    k = min(16, flat.numel())
    idx = (torch.arange(k) * (flat.numel() - 1) // max(k - 1, 1)).to(flat.device)
    return bytes(flat[idx].float().cpu().numpy().tobytes())
