"""Read learned context vectors as words: the nearest vocabulary tokens (CoOp, Sec. 4.4).

A learned context vector lives in the token-embedding space of the frozen text encoder, so the
vocabulary tokens closest to it (Euclidean distance, as the CoOp paper measures) hint at what
it encodes. The learned vectors need not be near any word; large distances say so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vprompt.errors import ConfigError, WeightsError

_ROWS_PER_CHUNK = 256  # bounds the distance matrix (rows x vocabulary) for class-specific ctx
_SPARE = 16  # extra candidates re-ranked by exact distance


@dataclass(frozen=True)
class NearestWord:
    """One vocabulary token near a context vector."""

    token_id: int
    word: str
    distance: float


@dataclass(frozen=True)
class ContextWords:
    """The nearest tokens of one context vector.

    Attributes:
        position: 0-based index of the vector within its context (M positions).
        group: Which context it belongs to: the class index of a class-specific (C x M x W)
            context, None for a shared (M x W) one.
        nearest: The ``k`` nearest tokens, closest first.
    """

    position: int
    group: int | None
    nearest: list[NearestWord]

    def to_dict(self, groups: Sequence[str] | None = None) -> dict[str, Any]:
        name = None
        if self.group is not None and groups is not None and self.group < len(groups):
            name = groups[self.group]
        return {
            "position": self.position,
            "group": self.group,
            "class": name,
            "nearest": [
                {"token_id": w.token_id, "word": w.word, "distance": w.distance}
                for w in self.nearest
            ],
        }


def nearest_words(backbone: Any, ctx: torch.Tensor, k: int = 5) -> list[ContextWords]:
    """The ``k`` vocabulary tokens nearest (Euclidean) to each context vector.

    Args:
        backbone: A CLIP backbone with ``token_embedding_table()`` and ``decode_token(id)``.
        ctx: M x W (shared) or G x M x W (one context per class, or per image) vectors of the
            text encoder's token width W.
        k: Tokens per vector.

    Returns:
        One entry per vector, in order (group by group, position by position).

    Raises:
        ConfigError: ``ctx`` is not 2-D or 3-D, or its width differs from the vocabulary's.
        WeightsError: The backbone exposes no token-embedding table or decoder.
    """
    if not hasattr(backbone, "token_embedding_table") or not hasattr(backbone, "decode_token"):
        raise WeightsError(
            f"{getattr(backbone, 'name', type(backbone).__name__)} exposes no token vocabulary "
            "(a CLIP backbone is needed to read context vectors as words)"
        )
    if ctx.dim() not in (2, 3):
        raise ConfigError(f"context must be M x W or G x M x W, got shape {tuple(ctx.shape)}")
    table = backbone.token_embedding_table().float()  # V x W
    if ctx.shape[-1] != table.shape[1]:
        raise ConfigError(
            f"context width {ctx.shape[-1]} differs from the token width {table.shape[1]} of "
            f"{getattr(backbone, 'name', 'the backbone')}"
        )
    groups = ctx.shape[0] if ctx.dim() == 3 else None
    rows = ctx.detach().reshape(-1, ctx.shape[-1]).float().to(table.device)  # N x W
    m = ctx.shape[-2]
    k = max(1, min(int(k), table.shape[0]))
    dists, ids = [], []
    spare = min(table.shape[0], k + _SPARE)
    with torch.no_grad():
        for start in range(0, rows.shape[0], _ROWS_PER_CHUNK):
            part = rows[start : start + _ROWS_PER_CHUNK]  # n x W
            # The fast matrix-product distances pick candidates; exact differences rank them
            # (the product form loses ~1e-4 to cancellation, enough to reorder near ties).
            rough = torch.cdist(part, table).topk(spare, dim=1, largest=False).indices  # n x S
            exact = (part[:, None, :] - table[rough]).norm(dim=-1)  # n x S
            top = exact.topk(k, dim=1, largest=False)
            dists.append(top.values.cpu())
            ids.append(rough.gather(1, top.indices).cpu())
    all_d, all_i = torch.cat(dists), torch.cat(ids)
    words: dict[int, str] = {}
    out = []
    for row in range(rows.shape[0]):
        nearest = []
        for dist, tid in zip(all_d[row].tolist(), all_i[row].tolist(), strict=True):
            if tid not in words:
                words[tid] = backbone.decode_token(tid)
            nearest.append(NearestWord(int(tid), words[tid], float(dist)))
        out.append(ContextWords(row % m, None if groups is None else row // m, nearest))
    return out
