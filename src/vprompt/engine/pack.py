"""Prompt packs: one ``.safetensors`` file with the prompt tensors and a JSON metadata header.

The header (safetensors ``__metadata__["vprompt"]``) records the format version, the method and
its config, the backbone name, weight source and weight fingerprint, class names in order, the
preprocessing, metrics and the vprompt version. Loading validates the file byte by byte before
handing it to safetensors and never unpickles anything.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import logging
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vprompt.backbones.preprocess import Preprocess
from vprompt.backbones.protocols import Backbone, FrozenModel
from vprompt.backbones.registry import load_backbone
from vprompt.errors import ConfigError, PackError, VPromptError, is_allocation_failure
from vprompt.methods.base import PromptMethod
from vprompt.methods.config import config_from_dict, config_to_dict
from vprompt.methods.registry import METHODS
from vprompt.utils import jsonio
from vprompt.utils.io import atomic_path

FORMAT = "vprompt-pack"
FORMAT_VERSION = 1
_META_KEY = "vprompt"
_MAX_HEADER = 64 * 1024 * 1024


@dataclass(frozen=True)
class BackboneRef:
    """Which frozen backbone a pack belongs to."""

    name: str
    weights: str
    fingerprint: str


@dataclass
class PromptPack:
    """A learned (or derived) prompt, detached from the backbone it applies to."""

    method: str
    config: dict[str, Any]
    backbone: BackboneRef
    classnames: list[str]
    preprocess: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    vprompt_version: str = ""
    created: str = ""
    source: str = field(default="", compare=False)
    """The file it was read from (not stored): error messages name it."""

    def metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "vprompt_version": self.vprompt_version or _version(),
            "created": self.created
            or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "method": self.method,
            "config": self.config,
            "backbone": {
                "name": self.backbone.name,
                "weights": self.backbone.weights,
                "fingerprint": self.backbone.fingerprint,
            },
            "classnames": list(self.classnames),
            "preprocess": self.preprocess,
            "metrics": self.metrics,
            "extra": self.extra,
        }

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


def _version() -> str:
    from vprompt import __version__

    return __version__


def pack_method(
    method: PromptMethod,
    *,
    metrics: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> PromptPack:
    """Snapshot a method's prompt tensors and provenance into a :class:`PromptPack`."""
    backbone = method.backbone
    return PromptPack(
        method=method.name,
        config=config_to_dict(method.config),
        backbone=BackboneRef(backbone.name, str(backbone.weights), backbone.fingerprint()),
        classnames=list(method.classnames),
        preprocess=backbone.preprocess.to_dict(),
        tensors={k: v.detach().cpu().contiguous() for k, v in method.prompt_state().items()},
        metrics=dict(metrics or {}),
        extra={**method.pack_notes(), **dict(extra or {})},
    )


def save_pack(
    pack_or_method: PromptPack | PromptMethod,
    path: str | os.PathLike[str],
    *,
    metrics: Mapping[str, Any] | None = None,
) -> Path:
    """Write a pack atomically; accepts a :class:`PromptPack` or a method to snapshot."""
    from safetensors.torch import save_file

    pack = (
        pack_or_method
        if isinstance(pack_or_method, PromptPack)
        else pack_method(pack_or_method, metrics=metrics)
    )
    if metrics and isinstance(pack_or_method, PromptPack):
        pack.metrics.update(metrics)
    if not pack.tensors:
        raise PackError("a prompt pack needs at least one tensor")
    header = jsonio.dumps(pack.metadata(), sort_keys=True, ensure_ascii=False)
    target = Path(path)
    with atomic_path(target) as tmp:
        save_file(dict(pack.tensors), str(tmp), metadata={_META_KEY: header})
    return target


def _validate_layout(path: Path, blob_size: int, head: bytes) -> dict[str, Any]:
    """Check the safetensors framing ourselves to give precise errors."""
    if blob_size < 8:
        raise PackError(f"{path}: not a prompt pack (only {blob_size} bytes; too short)")
    # A valid header length can start with these bytes too (e.g. 128 + 256k), so the pickle
    # signature only explains a file whose safetensors framing is far off.
    pickled = PackError(
        f"{path}: this is a pickle/torch.save file, not a safetensors prompt pack; "
        "vprompt never unpickles files"
    )
    looks_pickled = head[:2] == b"PK" or head[:1] == b"\x80"
    (n,) = struct.unpack("<Q", head[:8])
    if n == 0 or n > _MAX_HEADER or n > blob_size - 8:
        if looks_pickled and n > _MAX_HEADER:
            raise pickled
        raise PackError(
            f"{path}: not a safetensors prompt pack (header length {n} does not fit a "
            f"{blob_size}-byte file; truncated or a different format)"
        )
    with path.open("rb") as fh:
        fh.seek(8)
        raw = fh.read(n)
    try:
        header = jsonio.loads(raw, what=f"{path} header")
    except jsonio.JSONInputError as exc:
        if looks_pickled:
            raise pickled from None
        raise PackError(
            f"{path}: not a safetensors prompt pack (header is not JSON: {exc.reason})"
        ) from None
    if not isinstance(header, dict):
        raise PackError(f"{path}: not a safetensors prompt pack (header is not an object)")
    data_len = blob_size - 8 - n
    end = 0
    for key, entry in header.items():
        if key != "__metadata__":
            end = max(end, _tensor_entry_end(path, key, entry))
    if end > data_len:
        raise PackError(
            f"{path}: truncated prompt pack: tensors need {end} bytes of data, file has {data_len}"
        )
    meta = header.get("__metadata__", {})
    odd = (
        [f"a {type(meta).__name__}"]
        if not isinstance(meta, dict)
        else [f"{k!r}: a {type(v).__name__}" for k, v in meta.items() if not isinstance(v, str)]
    )
    if odd:
        raise PackError(
            f"{path}: malformed safetensors header: __metadata__ must map names to strings, "
            f"got {odd[0]}"
        )
    if _META_KEY not in meta:
        raise PackError(
            f"{path}: a safetensors file, but not a vprompt prompt pack (no '{_META_KEY}' metadata)"
        )
    try:
        info = jsonio.loads(meta[_META_KEY], what=f"{path} prompt pack metadata")
    except jsonio.JSONInputError as exc:
        raise PackError(str(exc)) from None
    if not isinstance(info, dict):
        raise PackError(f"{path}: prompt pack metadata must be a JSON object")
    return info


def _tensor_entry_end(path: Path, key: str, entry: Any) -> int:
    """A safetensors tensor entry's end offset, after checking the entry's shape."""
    bad = PackError(
        f"{path}: malformed tensor entry {key!r} in header (expected dtype, a shape of "
        "non-negative integers and two integer data_offsets)"
    )
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        raise bad
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(_count(d) for d in shape):
        raise bad
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_count(o) for o in offsets):
        raise bad
    if offsets[0] > offsets[1]:
        raise bad
    return int(offsets[1])


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def load_pack(path: str | os.PathLike[str]) -> PromptPack:
    """Read and validate a pack. Never unpickles; every problem is a :class:`PackError`.

    ``path`` is a file or ``hf-hub:ORG/REPO[@REVISION]``: a pack on the Hugging Face hub,
    downloaded to the hub's cache first (:mod:`vprompt.engine.hub`), then read the same way.
    """
    from safetensors.torch import load_file

    from vprompt.engine.hub import is_hub_spec, resolve_hub_spec

    p = resolve_hub_spec(path) if is_hub_spec(path) else Path(path)
    if not p.is_file():
        raise PackError(f"{p}: no such prompt pack")
    size = p.stat().st_size
    with p.open("rb") as fh:
        head = fh.read(8)
    info = _validate_layout(p, size, head)
    if info.get("format") != FORMAT:
        raise PackError(f"{p}: unknown pack format {info.get('format')!r}, expected {FORMAT!r}")
    version = info.get("format_version")
    if not isinstance(version, int) or version < 1 or version > FORMAT_VERSION:
        raise PackError(
            f"{p}: pack format version {version!r} is not supported by vprompt {_version()} "
            f"(supports 1..{FORMAT_VERSION}); upgrade vprompt to read it"
        )
    try:
        tensors = load_file(str(p), device="cpu")
    except Exception as exc:  # safetensors' own error types
        raise PackError(f"{p}: cannot read tensors ({exc})") from None
    for key, value in sorted(tensors.items()):
        if value.dtype.is_floating_point and not bool(torch.isfinite(value).all()):
            raise PackError(f"{p}: tensor {key!r} holds NaN or infinite values")
    fields = _metadata_fields(p, info)
    pack = PromptPack(**fields, tensors=dict(tensors), format_version=version, source=str(p))
    if pack.method not in METHODS:
        raise PackError(
            f"{p}: pack was made by method {pack.method!r}, which this vprompt does not know "
            f"(known: {', '.join(METHODS.names())})"
        )
    return pack


def _metadata_fields(path: Path, info: dict[str, Any]) -> dict[str, Any]:
    """The pack's metadata fields, each checked for its JSON type (never coerced)."""

    def field(key: str, kind: type, default: Any = None, where: Any = info) -> Any:
        if key not in where:
            if default is not None:
                return default
            raise PackError(f"{path}: prompt pack metadata lacks or mangles field {key!r}")
        value = where[key]
        if not isinstance(value, kind):
            raise PackError(
                f"{path}: prompt pack metadata lacks or mangles field {key!r}: expected a "
                f"{_JSON_KIND[kind]}, got {type(value).__name__}"
            )
        return value

    bb = field("backbone", dict)
    classnames = field("classnames", list)
    if not classnames or not all(isinstance(c, str) and c.strip() for c in classnames):
        raise PackError(
            f"{path}: prompt pack metadata lacks or mangles field 'classnames': expected a "
            "non-empty list of non-empty strings"
        )
    return {
        "method": field("method", str),
        "config": field("config", dict),
        "backbone": BackboneRef(
            field("name", str, where=bb),
            field("weights", str, where=bb),
            field("fingerprint", str, where=bb),
        ),
        "classnames": list(classnames),
        "preprocess": field("preprocess", dict),
        "metrics": field("metrics", dict, {}),
        "extra": field("extra", dict, {}),
        "vprompt_version": field("vprompt_version", str, ""),
        "created": field("created", str, ""),
    }


_JSON_KIND: dict[type, str] = {dict: "JSON object", list: "JSON list", str: "string"}


def pack_backbone(
    ref: BackboneRef,
    where: str,
    weights: str | None,
    device: str | torch.device | None,
    allow_download: bool,
) -> FrozenModel:
    """The backbone an artifact (``where``: its file, for messages) names. A weight source it
    names that is neither ``none`` nor a path on this machine (a tag, a hub repo) loads only
    from this machine's caches unless ``weights`` or ``allow_download`` say otherwise."""
    from vprompt.backbones.downloads import needed_a_download, no_downloads

    name, named = ref.name, ref.weights
    local = named == "none" or Path(named).expanduser().exists()
    if weights is not None or allow_download or local:
        try:
            return load_backbone(name, weights or named, device=device)
        except VPromptError as exc:
            raise PackError(f"{where}: cannot load the pack's backbone: {exc}") from exc
    try:
        # Quiet: loaders announce the download they are about to try (and log its failure).
        with no_downloads(), _quiet():
            return load_backbone(name, named, device=device)
    except Exception as exc:  # the hub's offline errors come in many types
        if not needed_a_download(exc):
            if isinstance(exc, VPromptError):
                raise PackError(f"{where}: cannot load the pack's backbone: {exc}") from exc
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first = first if len(first) <= 240 else first[:239] + "…"
        raise PackError(
            f"{where}: the pack names {name} weights {named!r}, which are not on this machine "
            f"({first}); vprompt never downloads what a pack names: pass --weights "
            f"{named} (or a local copy) or --allow-download to fetch them"
        ) from None


def matching_backbone(
    ref: BackboneRef,
    where: str,
    *,
    backbone: FrozenModel | None,
    weights: str | None,
    device: str | torch.device | None,
    allow_download: bool,
) -> FrozenModel:
    """``backbone`` (loaded by :func:`pack_backbone` when None), refused unless its name and
    weights fingerprint are the ones ``ref`` records.

    Raises:
        PackError: Another model, other weights, or weights not on this machine.
    """
    if backbone is None:
        backbone = pack_backbone(ref, where, weights, device, allow_download)
    if backbone.name != ref.name:
        raise PackError(f"pack was made for backbone {ref.name!r}, got {backbone.name!r}")
    fp = backbone.fingerprint()
    if fp != ref.fingerprint and not _legacy_match(backbone, ref.fingerprint):
        raise PackError(
            f"backbone weights do not match the pack: pack was made with "
            f"{ref.name} weights {ref.weights!r} (fingerprint "
            f"{ref.fingerprint}), these weights {backbone.weights!r} have "
            f"fingerprint {fp}"
        )
    return backbone


def _legacy_match(backbone: FrozenModel, fingerprint: str) -> bool:
    """Whether ``fingerprint`` is the backbone's in the form packs carried before the
    order-independent fingerprint (so older packs keep loading on their weights)."""
    from vprompt.backbones.fingerprint import legacy_weights_fingerprint

    model = getattr(backbone, "model", None)
    return isinstance(model, torch.nn.Module) and legacy_weights_fingerprint(model) == fingerprint


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Within: nothing reaches stdout, stderr or the log (below CRITICAL)."""
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def check_classnames(pack: PromptPack, classnames: Sequence[str]) -> None:
    """Refuse a class list that differs from the pack's (order matters for label indices)."""
    given = list(classnames)
    if given == pack.classnames:
        return
    missing = [c for c in pack.classnames if c not in given]
    extra = [c for c in given if c not in pack.classnames]
    detail = []
    if missing:
        detail.append(f"missing {missing[:10]}")
    if extra:
        detail.append(f"not in pack {extra[:10]}")
    if not detail and len(given) != len(pack.classnames):
        detail.append(f"{len(given)} names given, with duplicates")
    if not detail:
        detail.append("same names in a different order")
    raise PackError(
        f"class list does not match the pack's {len(pack.classnames)} classes: {'; '.join(detail)}"
    )


def build_from_pack(
    pack: PromptPack,
    *,
    backbone: FrozenModel | None = None,
    weights: str | None = None,
    device: str | torch.device | None = "cpu",
    allow_download: bool = False,
) -> PromptMethod:
    """Rebuild the method a pack came from, on its frozen backbone.

    Args:
        backbone: An already-built backbone to reuse; otherwise one is loaded by the pack's name
            and ``weights`` (default: the pack's weight source).
        weights: The weights to use (e.g. a local copy of a hub tag, or the pack's own tag to
            let it download): named by the caller, they load as any weights do.
        allow_download: Let the pack's own weight source download when it is not on this
            machine. Without it (and without ``weights``) a pack names weights but never
            fetches them: only files and caches already here are read.

    Raises:
        PackError: The pack's weights are not on this machine (and neither ``weights`` nor
            ``allow_download`` was given), or the backbone's name, weights fingerprint or
            preprocessing differ from the pack's.
    """
    backbone = matching_backbone(
        pack.backbone,
        pack.source or "prompt pack",
        backbone=backbone,
        weights=weights,
        device=device,
        allow_download=allow_download,
    )
    if not isinstance(backbone, Backbone):
        raise PackError(
            f"the pack's backbone {pack.backbone.name} is not a classifier or image-text model "
            "(prompt packs apply to those)"
        )
    if Preprocess.from_dict(pack.preprocess) != backbone.preprocess:
        raise PackError(
            f"backbone preprocessing {backbone.preprocess.to_dict()} differs from the pack's "
            f"{pack.preprocess}"
        )
    cls = METHODS.get(pack.method)
    where = pack.source or "prompt pack"
    try:
        config = config_from_dict(cls.Config, pack.config)
    except ConfigError as exc:
        raise PackError(f"{where}: the pack's {pack.method} config is invalid: {exc}") from None
    try:
        return cls.from_state(backbone, pack.classnames, config, pack.tensors)
    except (PackError, ConfigError) as exc:
        raise PackError(f"{where}: {exc}") from None
    except (MemoryError, RuntimeError) as exc:  # a config or class list beyond this machine
        if not is_allocation_failure(exc):
            raise
        raise PackError(
            f"{where}: building its {pack.method} prompt for {len(pack.classnames)} classes "
            f"with config {pack.config} needs more memory than is available"
        ) from None
