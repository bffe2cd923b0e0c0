"""Anomaly packs: a fitted memory bank or learned anomaly prompts, in one safetensors file.

The JSON header (``__metadata__["vprompt"]``) records ``format: vprompt-anomaly-pack``, the
method and its config, the backbone (name, weight source, fingerprint), the object name, the
input frame and metrics; the tensors are the method's :meth:`~AnomalyMethod.state`. Reading
checks the framing before safetensors sees the file and never unpickles; loading into a
method checks every tensor's name, shape, dtype and finiteness (:meth:`AnomalyMethod.load_state`).
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vprompt.anomaly.base import ANOMALY_METHODS, AnomalyMethod, InputFrame
from vprompt.engine.pack import BackboneRef, matching_backbone
from vprompt.errors import ConfigError, PackError
from vprompt.methods.config import config_from_dict, config_to_dict
from vprompt.utils import jsonio
from vprompt.utils.io import atomic_path
from vprompt.utils.tensor_file import META_KEY, read_artifact_header

FORMAT = "vprompt-anomaly-pack"
FORMAT_VERSION = 1


@dataclass
class AnomalyPack:
    """A fitted / learned anomaly method, detached from its backbone."""

    method: str
    config: dict[str, Any]
    backbone: BackboneRef
    object_name: str
    frame: InputFrame
    tensors: dict[str, torch.Tensor]
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    source: str = field(default="", compare=False)

    def metadata(self) -> dict[str, Any]:
        from vprompt import __version__

        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "vprompt_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "method": self.method,
            "config": self.config,
            "backbone": {
                "name": self.backbone.name,
                "weights": self.backbone.weights,
                "fingerprint": self.backbone.fingerprint,
            },
            "object_name": self.object_name,
            "frame": self.frame.to_dict(),
            "metrics": self.metrics,
            "extra": self.extra,
        }


def pack_anomaly_method(
    method: AnomalyMethod,
    *,
    metrics: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> AnomalyPack:
    """Snapshot a fitted / trained method."""
    method.require_fitted()
    b = method.backbone
    return AnomalyPack(
        method=method.name,
        config=config_to_dict(method.config),
        backbone=BackboneRef(b.name, str(b.weights), b.fingerprint()),
        object_name=method.object_name,
        frame=method.frame,
        tensors=method.state(),
        metrics=dict(metrics or {}),
        extra=dict(extra or {}),
    )


def save_anomaly_pack(pack: AnomalyPack, path: str | os.PathLike[str]) -> Path:
    """Write ``pack`` atomically (a crash or a full disk leaves no partial file)."""
    from safetensors.torch import save_file

    if not pack.tensors:
        raise PackError("an anomaly pack needs at least one tensor")
    header = jsonio.dumps(pack.metadata(), sort_keys=True, ensure_ascii=False)
    target = Path(path)
    with atomic_path(target) as tmp:
        save_file(
            {k: v.contiguous() for k, v in pack.tensors.items()},
            str(tmp),
            metadata={META_KEY: header},
        )
    return target


def read_anomaly_pack(path: str | os.PathLike[str]) -> AnomalyPack:
    """Read and validate an anomaly pack (every problem is one :class:`PackError` line)."""
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise PackError(f"{p}: no such anomaly pack")
    info = read_artifact_header(
        p,
        p.stat().st_size,
        kind="anomaly pack",
        fmt=FORMAT,
        max_version=FORMAT_VERSION,
        error=PackError,
    )
    try:
        tensors = load_file(str(p), device="cpu")
    except Exception as exc:  # safetensors' own error types
        raise PackError(f"{p}: cannot read tensors ({exc})") from None

    def need(key: str, kind: type, where: Mapping[str, Any] = info) -> Any:
        value = where.get(key)
        if not isinstance(value, kind):
            raise PackError(f"{p}: anomaly pack metadata lacks or mangles field {key!r}")
        return value

    method = need("method", str)
    if method not in ANOMALY_METHODS:
        raise PackError(
            f"{p}: made by anomaly method {method!r}, which this vprompt does not know "
            f"(known: {', '.join(ANOMALY_METHODS.names())})"
        )
    bb = need("backbone", dict)
    return AnomalyPack(
        method=method,
        config=need("config", dict),
        backbone=BackboneRef(
            need("name", str, bb), need("weights", str, bb), need("fingerprint", str, bb)
        ),
        object_name=need("object_name", str),
        frame=InputFrame.from_dict(need("frame", dict), what=str(p)),
        tensors=dict(tensors),
        metrics=dict(info.get("metrics") or {}),
        extra=dict(info.get("extra") or {}),
        source=str(p),
    )


def method_from_pack(
    pack: AnomalyPack,
    *,
    backbone: Any = None,
    weights: str | None = None,
    device: str | torch.device | None = "cpu",
    allow_download: bool = False,
) -> AnomalyMethod:
    """Rebuild the pack's method on its frozen backbone and load its tensors.

    Raises:
        PackError: The backbone differs from the pack's (name or weights fingerprint), its
            weights are not on this machine, or the tensors do not fit the method.
    """
    where = pack.source or "anomaly pack"
    try:
        backbone = matching_backbone(
            pack.backbone,
            where,
            backbone=backbone,
            weights=weights,
            device=device,
            allow_download=allow_download,
        )
    except PackError as exc:
        message = str(exc)
        raise PackError(message if message.startswith(where) else f"{where}: {message}") from None
    cls = ANOMALY_METHODS.get(pack.method)
    try:
        config = config_from_dict(cls.Config, pack.config)
        method = cls(backbone, config, object_name=pack.object_name)
    except ConfigError as exc:
        raise PackError(f"{where}: the pack's {pack.method} config is invalid: {exc}") from None
    method.load_state(pack.tensors, source=where)
    if method.frame != pack.frame:
        raise PackError(f"{where}: the pack's input frame differs from what its config gives")
    return method.to(device) if device is not None else method
