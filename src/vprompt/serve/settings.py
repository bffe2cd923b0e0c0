"""What one ``vprompt serve`` process is started with: models, packs and every limit."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vprompt.errors import ConfigError

MiB = 2**20
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
"""The host names a server on this machine's loopback interface is reached by."""
PACK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"serve setting {name}: expected an int >= 1, got {value!r}")


def _positive_float(name: str, value: object) -> None:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(float(value)) or float(value) <= 0:  # type: ignore[arg-type]
        raise ConfigError(f"serve setting {name}: expected a finite number > 0, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ServeSettings:
    """Configuration of one server.

    Args:
        model: Promptable segmenter as ``sam:ARCH``.
        weights: Its weight source (None: the architecture's default).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        precision: Segmenter precision: ``auto`` (bf16 on CUDA), ``bf16`` or ``fp32``.
        classifier: CLIP-like backbone for zero-shot ``/api/classify`` (None: no zero-shot).
        classifier_weights: Its weight source.
        packs: Prompt packs the server may apply, ``{name: path}``; clients refer to them by
            name and never send paths.
        max_upload_bytes: Largest uploaded image file.
        max_json_bytes: Largest JSON request body.
        max_pixels: Largest image (width x height), checked from the header before decoding.
        cache_bytes: Memory bound of the image-embedding cache.
        max_images: Images kept at once; the least recently used one is dropped first.
        max_store_bytes: Memory bound of the kept images (decoded pixels plus refinement
            logits); the least recently used images are dropped first.
        image_ttl_s: An image unused for this long is dropped.
        request_timeout_s: Longest wait for the model before a request answers 503 busy.
        logits_per_image: Refinement ``logits`` tokens kept per image (oldest dropped first);
            at least ``max_objects``, so every token of one response stays usable.
        max_objects: Objects in one segment request.
        max_classes: Class names in one zero-shot classify request.
        zeroshot_cache: Zero-shot class lists whose text embeddings are kept.
        allowed_hosts: Host names clients may reach the server by (the ``Host`` header);
            ``*`` allows any (:mod:`vprompt.serve.security`).
        max_concurrent_decodes: Uploads decoded at once (each holds its decoded pixels).
        max_automatic_prompts: Point prompts one ``/automatic`` request may cost (all crops).
        max_automatic_crops: Image crops one ``/automatic`` request may encode.
        allow_pack_downloads: Let packs download the weights they name when those are not
            on this machine (off: a pack's weights load from local files and caches only).
        inspect_model: Frozen backbone of ``/api/find-similar`` (any CNN or ViT), loaded on
            the first inspect request and kept.
        inspect_weights: Its weight source (None: the architecture's default).
        inspect_image_size: Side of the frame the defect search embeds images at (None: the
            backbone's own input size).
        max_inspect_targets: Target images one ``/api/find-similar`` request may search.
        runtime: What decodes segment prompts: ``torch``, or ``onnx`` (onnxruntime on CPU;
            the image encoder stays in PyTorch).
        onnx_decoder: The ``.onnx`` decoder for ``runtime="onnx"`` (None: exported into
            ``$VPROMPT_CACHE/onnx`` on first use).
        detector: Open-vocabulary detector of ``/api/images/{id}/find`` (a registered
            detector, ``family:arch`` or a bare family), loaded at start-up; None: no find.
        detector_weights: Its weight source (None: the architecture's default).
        detector_masks: Turn found boxes into masks with the server's segmenter (sharing its
            embedding cache).
        max_queries: Text queries in one find request.
        max_exemplars: Example boxes in one find request.
    """

    model: str = "sam:vit-base"
    weights: str | None = None
    device: str = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    classifier: str | None = None
    classifier_weights: str | None = None
    packs: Mapping[str, str | Path] = field(default_factory=dict)
    max_upload_bytes: int = 20 * MiB
    max_json_bytes: int = 8 * MiB
    max_pixels: int = 40_000_000
    cache_bytes: int = 512 * MiB
    max_images: int = 64
    max_store_bytes: int = 1024 * MiB
    image_ttl_s: float = 3600.0
    request_timeout_s: float = 30.0
    logits_per_image: int = 64
    max_objects: int = 32
    max_classes: int = 1000
    zeroshot_cache: int = 16
    allowed_hosts: tuple[str, ...] = LOOPBACK_NAMES
    max_concurrent_decodes: int = 2
    max_automatic_prompts: int = 4096
    max_automatic_crops: int = 5
    allow_pack_downloads: bool = False
    inspect_model: str = "torchvision:mobilenet_v2"
    inspect_weights: str | None = None
    inspect_image_size: int | None = None
    max_inspect_targets: int = 32
    runtime: Literal["torch", "onnx"] = "torch"
    onnx_decoder: str | None = None
    detector: str | None = None
    detector_weights: str | None = None
    detector_masks: bool = False
    max_queries: int = 16
    max_exemplars: int = 16

    def __post_init__(self) -> None:
        for name in (
            "max_upload_bytes",
            "max_json_bytes",
            "max_pixels",
            "cache_bytes",
            "max_images",
            "max_store_bytes",
            "logits_per_image",
            "max_objects",
            "max_classes",
            "zeroshot_cache",
            "max_concurrent_decodes",
            "max_automatic_prompts",
            "max_automatic_crops",
            "max_inspect_targets",
            "max_queries",
            "max_exemplars",
        ):
            _positive_int(name, getattr(self, name))
        if self.runtime not in ("torch", "onnx"):
            raise ConfigError(
                f"serve setting runtime: expected torch or onnx, got {self.runtime!r}"
            )
        if self.detector_masks and self.detector is None:
            raise ConfigError("serve setting detector_masks: needs a detector (--detector MODEL)")
        hosts = tuple(self.allowed_hosts)
        if not hosts or not all(isinstance(h, str) and h.strip() for h in hosts):
            raise ConfigError(
                f"serve setting allowed_hosts: expected host names, got {self.allowed_hosts!r}"
            )
        object.__setattr__(self, "allowed_hosts", hosts)
        _positive_float("image_ttl_s", self.image_ttl_s)
        _positive_float("request_timeout_s", self.request_timeout_s)
        if self.logits_per_image < self.max_objects:
            raise ConfigError(
                f"serve setting logits_per_image ({self.logits_per_image}) must be at least "
                f"max_objects ({self.max_objects}), or one response's tokens would expire at once"
            )
        if self.inspect_image_size is not None and not (
            isinstance(self.inspect_image_size, int) and 32 <= self.inspect_image_size <= 1024
        ):
            raise ConfigError(
                "serve setting inspect_image_size: expected None or an int from 32 to 1024, "
                f"got {self.inspect_image_size!r}"
            )
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(
                f"serve setting precision: expected auto, bf16 or fp32, got {self.precision!r}"
            )
        for name in self.packs:
            if not isinstance(name, str) or not PACK_NAME.match(name):
                raise ConfigError(
                    f"pack name {name!r}: expected letters, digits, '_', '-' or '.' "
                    "(at most 64, starting with a letter or digit)"
                )
        object.__setattr__(self, "packs", {k: Path(v) for k, v in self.packs.items()})


def parse_pack_specs(specs: tuple[str, ...] | list[str]) -> dict[str, Path]:
    """``NAME=PATH`` strings (the CLI's ``--pack``) → ``{name: path}``; duplicates refused."""
    packs: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise ConfigError(f"--pack {spec!r}: expected NAME=PATH")
        if name in packs:
            raise ConfigError(f"--pack {spec!r}: the name {name!r} is given twice")
        packs[name] = Path(path).expanduser()
    return packs
