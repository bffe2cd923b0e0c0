"""What every frozen ``transformers`` backbone shares: the wrapped model, its name and weight
source, its device, and a weight fingerprint computed once."""

from __future__ import annotations

import torch
from torch import nn

from vprompt.backbones.fingerprint import weights_fingerprint


class HFBackbone(nn.Module):
    """Base of the transformers-backed backbones (SAM, SegGPT, the detectors).

    Attributes:
        model: The transformers model (frozen by ``load_backbone``).
        name: ``family:arch``.
        weights: The weight source it was built from.
    """

    def __init__(self, *, model: nn.Module, name: str, weights: str) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.weights = weights
        self._fingerprint: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def fingerprint(self) -> str:
        """A hash of the weights (what packs and caches are keyed by)."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model)
        return self._fingerprint
