"""Output label mapping from a frozen classifier's source classes to the task's classes.

- ``random``: a fixed random one-to-one map (seeded).
- ``frequency`` (FLM, Chen et al. 2023 "Understanding and Improving Visual Prompting"): once,
  before training, count how often each source label is the prediction for images of each
  target class, then greedily take the largest count, assign that source → target pair and
  remove both, until every target class has a source label.
- ``iterative`` (ILM-VP): the same greedy frequency assignment, recomputed before every epoch with
  the current prompt.
- ``linear`` (AutoVP's FullyMap): a learned linear layer over all source logits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import torch
from torch import nn

from vprompt.errors import ConfigError, PackError

MappingKind = Literal["random", "frequency", "iterative", "linear"]


def greedy_frequency_mapping(counts: torch.Tensor) -> torch.Tensor:
    """K x C count matrix (source x target) → C source indices, one-to-one, greedy by count.

    Ties break towards the lower flat index (source-major), so the result is deterministic.
    """
    k, c = counts.shape
    if k < c:
        raise ConfigError(f"cannot map {c} target classes one-to-one onto {k} source classes")
    work = counts.double().clone()
    mapping = torch.full((c,), -1, dtype=torch.long)
    for _ in range(c):
        flat = int(torch.argmax(work))
        s, t = divmod(flat, c)
        mapping[t] = s
        work[s, :] = -1
        work[:, t] = -1
    return mapping


class LabelMapping(nn.Module):
    """B x K source logits → B x C target logits."""

    indices: torch.Tensor  # C source indices (buffer)
    calibrated: torch.Tensor  # 0-d flag (buffer)

    def __init__(
        self, *, kind: MappingKind, num_source: int, num_target: int, seed: int = 0
    ) -> None:
        super().__init__()
        if num_source < num_target and kind != "linear":
            raise ConfigError(
                f"{kind} label mapping needs at least as many source classes ({num_source}) as "
                f"target classes ({num_target}); use mapping=linear"
            )
        self.kind = kind
        self.num_source, self.num_target = num_source, num_target
        self.linear: nn.Linear | None = None
        if kind == "linear":
            self.linear = nn.Linear(num_source, num_target)
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)
        gen = torch.Generator().manual_seed(seed)
        initial = torch.randperm(num_source, generator=gen)[:num_target]
        self.register_buffer("indices", initial.clone())
        # 0 until a frequency mapping was computed (kept in packs/checkpoints so resumes skip it).
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.long))

    def check_state(self, tensors: Mapping[str, torch.Tensor], prefix: str) -> None:
        """Refuse stored ``indices`` / ``calibrated`` values this mapping cannot use.

        Raises:
            PackError: An index outside ``[0, num_source)``, a repeated index (the map is
                one-to-one, except for ``linear``, which ignores them), or a flag not 0 or 1.
        """
        indices = tensors[f"{prefix}indices"]
        if indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise PackError(f"{prefix}indices must be integers, got {indices.dtype}")
        low, high = (int(indices.min()), int(indices.max())) if indices.numel() else (0, 0)
        if low < 0 or high >= self.num_source:
            raise PackError(
                f"{prefix}indices must lie in [0, {self.num_source}) (the backbone's "
                f"{self.num_source} source classes), got values from {low} to {high}"
            )
        if self.kind != "linear" and int(indices.unique().numel()) != int(indices.numel()):
            raise PackError(f"{prefix}indices repeat a source class (expected a one-to-one map)")
        flag = int(tensors[f"{prefix}calibrated"].reshape(-1)[0])
        if flag not in (0, 1):
            raise PackError(f"{prefix}calibrated must be 0 or 1, got {flag}")

    def forward(self, source_logits: torch.Tensor) -> torch.Tensor:
        if self.linear is not None:
            return self.linear(source_logits.float())
        return source_logits[:, self.indices]

    def needs_update(self, epoch: int) -> bool:
        if self.kind == "iterative":
            return True
        return self.kind == "frequency" and int(self.calibrated) == 0

    @torch.no_grad()
    def update(
        self,
        source_logits_fn: Callable[[torch.Tensor], torch.Tensor],
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
        *,
        max_samples: int | None = None,
    ) -> None:
        """Recompute the frequency mapping from (images, labels) batches."""
        counts = torch.zeros(self.num_source, self.num_target, dtype=torch.long)
        seen = 0
        for images, labels in batches:
            if max_samples is not None and seen >= max_samples:
                break
            if max_samples is not None:
                images, labels = images[: max_samples - seen], labels[: max_samples - seen]
            pred = source_logits_fn(images).argmax(dim=1).cpu()
            counts.index_put_((pred, labels.cpu().long()), torch.ones_like(pred), accumulate=True)
            seen += len(labels)
        self.indices.copy_(greedy_frequency_mapping(counts).to(self.indices.device))
        self.calibrated.fill_(1)
