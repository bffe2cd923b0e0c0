"""Backbone families and the ``family:arch`` naming scheme.

A family knows which architectures it has, which weight tags each one has, and how to build a
frozen backbone from an architecture plus a weight source. Weight sources are one of:
a registered tag (``openai``), ``hf-hub:ORG/REPO``, a local file or directory, or ``none``
(deterministic random init, for tests and benchmarks).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vprompt.backbones.protocols import FrozenModel
from vprompt.errors import ConfigError, UnknownNameError, WeightsError
from vprompt.utils.registry import Registry, close_matches

RANDOM_INIT = "none"
RANDOM_INIT_SEED = 0


@dataclass(frozen=True)
class BackboneFamily:
    """One model family (``clip``, ``torchvision`` …).

    Attributes:
        name: Family prefix in ``family:arch`` names.
        description: One line for ``vprompt models``.
        list_archs: Every architecture name this family can build.
        list_tags: Registered weight tags for an architecture.
        default_weights: Tag used when the caller gives no weight source.
        build: ``(arch, weights, device) -> backbone``; ``weights`` is already validated.
        tiny: Architectures meant for tests (build in well under a second on CPU).
    """

    name: str
    description: str
    list_archs: Callable[[], list[str]]
    list_tags: Callable[[str], list[str]]
    default_weights: Callable[[str], str]
    build: Callable[[str, str, torch.device], FrozenModel]
    tiny: tuple[str, ...] = field(default=())


FAMILIES: Registry[BackboneFamily] = Registry("backbone family")


def register_family(family: BackboneFamily) -> BackboneFamily:
    return FAMILIES.register(family.name, family)


def split_name(name: str) -> tuple[BackboneFamily, str]:
    """``"clip:ViT-B-16"`` → (clip family, ``"ViT-B-16"``), with suggestions on typos."""
    if ":" not in name:
        candidates = all_model_names()
        guesses = close_matches(name, candidates)
        hint = f"; did you mean {', '.join(repr(g) for g in guesses)}?" if guesses else ""
        raise UnknownNameError(
            f"model name {name!r} must look like FAMILY:ARCH (families: "
            f"{', '.join(FAMILIES.names())}){hint}"
        )
    family_name, arch = name.split(":", 1)
    family = FAMILIES.get(family_name.lower())
    archs = family.list_archs()
    if arch not in archs:
        guesses = close_matches(arch, archs)
        hint = (
            f"; did you mean {', '.join(repr(f'{family.name}:{g}') for g in guesses)}?"
            if guesses
            else ""
        )
        raise UnknownNameError(
            f"unknown model {name!r}{hint} (`vprompt models` lists all {len(archs)} "
            f"{family.name} architectures)"
        )
    return family, arch


def unknown_weights_error(
    name: str, weights: str, tags: list[str], *, max_shown: int | None = None
) -> WeightsError:
    """The error for a weight source that is neither a tag, ``none``, hf-hub nor a path.

    Args:
        name: The ``family:arch`` name the weights were asked for.
        tags: The registered tags, searched for close matches and listed.
        max_shown: List at most this many tags (timm archs can have dozens).
    """
    guesses = close_matches(weights, tags)
    hint = f"; did you mean {', '.join(repr(g) for g in guesses)}?" if guesses else ""
    # No registered tag contains a path separator or a dot, so those mean a missing file.
    looks_like_path = any(c in weights for c in ("/", "\\", ".")) and not weights.startswith(
        "hf-hub:"
    )
    what = f"no such file or folder {weights!r}" if looks_like_path else f"unknown tag {weights!r}"
    shown = ", ".join(tags[:max_shown] if max_shown else tags)
    if max_shown and len(tags) > max_shown:
        shown += " …"
    return WeightsError(
        f"{name}: {what}{hint}; weights must be one of the tags [{shown or 'none registered'}], "
        "'none', 'hf-hub:ORG/REPO', or an existing file or folder"
    )


def all_model_names() -> list[str]:
    return [f"{f}:{a}" for f in FAMILIES.names() for a in FAMILIES.get(f).list_archs()]


def list_models(family: str | None = None) -> list[dict[str, Any]]:
    """Every registered name with its family and weight tags (what ``vprompt models`` prints).

    Args:
        family: Only this family (listing a family imports only its library).
    """
    rows = []
    for fname in [FAMILIES.get(family).name] if family else FAMILIES.names():
        fam = FAMILIES.get(fname)
        for arch in fam.list_archs():
            rows.append(
                {
                    "name": f"{fname}:{arch}",
                    "family": fname,
                    "arch": arch,
                    "tags": fam.list_tags(arch),
                    "default_weights": fam.default_weights(arch),
                    "tiny": arch in fam.tiny,
                }
            )
    return rows


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(
            f"unknown device {str(device)!r}; expected cpu, cuda, cuda:N, mps or auto"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r}: CUDA is not available on this machine")
    return dev


class RandomWeightsWarning(UserWarning):
    """A backbone was built with random weights (said once per model and process)."""


_WARNED_RANDOM: set[str] = set()


def load_backbone(
    name: str, weights: str | None = None, *, device: str | torch.device | None = "cpu"
) -> FrozenModel:
    """Build a frozen backbone by ``family:arch`` name.

    Args:
        name: Registered name, e.g. ``clip:ViT-B-16`` or ``clip:tiny``.
        weights: Tag, ``hf-hub:ORG/REPO``, local file or directory, or ``none`` for a
            deterministic random init. ``None`` picks the family's default tag.
        device: ``cpu``, ``cuda``, ``auto`` …

    Returns:
        A backbone in eval mode with every parameter frozen (``requires_grad=False``); narrow
        it with ``isinstance`` to the family's protocol (:mod:`vprompt.backbones.protocols`).
    """
    family, arch = split_name(name)
    source = family.default_weights(arch) if weights is None else str(weights)
    backbone = family.build(arch, source, resolve_device(device))
    # Tiny architectures are test models, random by definition; a real one with random
    # weights is worth one line.
    if source == RANDOM_INIT and arch not in family.tiny and name not in _WARNED_RANDOM:
        _WARNED_RANDOM.add(name)
        warnings.warn(
            RandomWeightsWarning(
                f"{name} has random weights (--weights none): its predictions are random; "
                "use it to check a pipeline, not to measure one"
            ),
            stacklevel=2,
        )
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone
