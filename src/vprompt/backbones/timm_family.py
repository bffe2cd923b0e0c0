"""The ``timm`` family: every timm model, its pretrained tags, hf-hub and local weights."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from vprompt.backbones.checkpoints import (
    find_checkpoint,
    load_state_dict_strict,
    read_state_dict,
)
from vprompt.backbones.classifier import ClassifierBackbone, TokenLayout, class_names
from vprompt.backbones.preprocess import Interpolation, Preprocess, ResizeMode
from vprompt.backbones.registry import (
    RANDOM_INIT,
    RANDOM_INIT_SEED,
    BackboneFamily,
    unknown_weights_error,
)
from vprompt.errors import WeightsError

# Tiny test models: public name → (timm arch, create_model kwargs, data-config overrides).
TINY_ARCHS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "tiny-vit": (
        "test_vit",
        {"img_size": 32, "patch_size": 8, "depth": 2},
        {"input_size": (3, 32, 32), "crop_pct": 0.875, "crop_mode": "center"},
    ),
}
_INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
_HEAD_KEYS = ("head.weight", "head.fc.weight", "fc.weight", "classifier.weight")


def _timm() -> Any:
    import timm

    return timm


@functools.cache
def _tag_index() -> dict[str, tuple[str, ...]]:
    """arch → its pretrained tags, built once (timm has ~1,800 ``arch.tag`` names)."""
    index: dict[str, list[str]] = {}
    for name in _timm().list_pretrained():
        arch, _, tag = name.partition(".")
        index.setdefault(arch, []).append(tag)
    return {arch: tuple(tags) for arch, tags in index.items()}


@functools.cache
def _archs() -> tuple[str, ...]:
    return (*TINY_ARCHS, *_timm().list_models())


def list_archs() -> list[str]:
    return list(_archs())


def list_tags(arch: str) -> list[str]:
    return list(_tag_index().get(arch, ()))


@functools.cache
def default_weights(arch: str) -> str:
    tags = _tag_index().get(arch, ())
    if not tags:
        return RANDOM_INIT
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    tag = getattr(cfg, "tag", None)
    return tag if tag in tags else tags[0]


def build_timm(arch: str, weights: str, device: torch.device) -> ClassifierBackbone:
    timm = _timm()
    timm_arch, kwargs, data_overrides = TINY_ARCHS.get(arch, (arch, {}, {}))
    if weights == RANDOM_INIT:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = timm.create_model(timm_arch, pretrained=False, **kwargs)
    elif weights.startswith("hf-hub:"):
        model = _create(f"timm:{arch}", weights, weights, pretrained=True)
        built = getattr(model, "pretrained_cfg", {}).get("architecture")
        if arch not in TINY_ARCHS and built and built != arch:
            raise WeightsError(f"{weights} holds a {built}, not a {arch}; load it as timm:{built}")
    elif Path(weights).expanduser().exists():
        model = _from_local_file(arch, timm_arch, kwargs, Path(weights).expanduser())
    elif weights in list_tags(arch):
        model = _create(f"timm:{arch}", weights, f"{arch}.{weights}", pretrained=True, **kwargs)
    else:
        raise _unknown_source(arch, weights)
    if data_overrides:
        model.pretrained_cfg = {**model.pretrained_cfg, **data_overrides}
    return _wrap(model, arch=arch, weights=weights).to(device)


def _create(label: str, weights: str, name: str, **kwargs: Any) -> nn.Module:
    try:
        return _timm().create_model(name, **kwargs)
    except Exception as exc:  # offline hub, missing files, bad checkpoints …
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        raise WeightsError(f"cannot load {label} weights {weights!r}: {first}") from exc


def _from_local_file(arch: str, timm_arch: str, kwargs: dict[str, Any], path: Path) -> nn.Module:
    file = find_checkpoint(path) if path.is_dir() else path
    state = read_state_dict(file)
    num_classes = next((int(state[k].shape[0]) for k in _HEAD_KEYS if k in state), None)
    if num_classes is not None:
        kwargs = {**kwargs, "num_classes": num_classes}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model = _timm().create_model(timm_arch, pretrained=False, **kwargs)
    load_state_dict_strict(model, state, source=f"timm:{arch} weights {str(file)!r}")
    return model


def _unknown_source(arch: str, weights: str) -> WeightsError:
    return unknown_weights_error(f"timm:{arch}", weights, list_tags(arch), max_shown=12)


def _wrap(model: nn.Module, *, arch: str, weights: str) -> ClassifierBackbone:
    from timm.models.vision_transformer import VisionTransformer

    cfg: dict[str, Any] = dict(getattr(model, "pretrained_cfg", {}))
    num_classes = int(getattr(model, "num_classes", 0) or cfg.get("num_classes", 0))
    # Random weights have no classes; any trained head of ImageNet width uses ImageNet's order.
    labels = None if weights == RANDOM_INIT else _known_labels(model, cfg, num_classes)
    layout: TokenLayout | None = "timm-vit" if isinstance(model, VisionTransformer) else None
    return ClassifierBackbone(
        model=model,
        name=f"timm:{arch}",
        weights=weights,
        preprocess=preprocess_from_cfg(cfg, model),
        kind="timm",
        source_classes=class_names(num_classes, labels),
        token_layout=layout,
    )


def preprocess_from_cfg(cfg: dict[str, Any], model: nn.Module | None = None) -> Preprocess:
    """timm's eval data config (``resolve_data_config``) as a :class:`Preprocess`.

    ``center`` crops are exact (resize the short side to ``floor(size / crop_pct)``, then crop);
    ``squash`` and ``border`` are mapped to the nearest :class:`Preprocess` mode.
    """
    from timm.data import resolve_data_config

    data = resolve_data_config({}, pretrained_cfg=cfg, model=model)
    _, h, w = data["input_size"]
    crop_pct = float(data.get("crop_pct") or 0.875)
    mode = data.get("crop_mode") or "center"
    interp = data.get("interpolation", "bicubic")
    resize_mode: ResizeMode = (
        "squash" if mode == "squash" else "longest" if mode == "border" else "shortest"
    )
    return Preprocess(
        size=(int(h), int(w)),
        mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
        std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
        interpolation=cast(Interpolation, interp) if interp in _INTERPOLATIONS else "bicubic",
        resize_mode=resize_mode,
        resize_size=math.floor(h / crop_pct) if mode == "center" and h == w else None,
    )


def _known_labels(model: nn.Module, cfg: dict[str, Any], num_classes: int) -> list[str] | None:
    names = cfg.get("label_names")
    if names:
        # A list, or an index → name dict when there are gaps; descriptions map name → text.
        ordered = [names[i] for i in sorted(names)] if isinstance(names, dict) else list(names)
        described = cfg.get("label_descriptions")
        if isinstance(described, dict):
            ordered = [described.get(n, n) for n in ordered]
        return [str(n) for n in ordered]
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(model)
    if subset is None:
        return None
    info = ImageNetInfo(subset)
    if info.num_classes() != num_classes:
        return None
    # WordNet descriptions list synonyms ("tench, Tinca tinca"); the first is the usual name.
    return [d.split(", ")[0] for d in info.label_descriptions(detailed=False)]


TIMM_FAMILY = BackboneFamily(
    name="timm",
    description="Image classifiers from timm (ViT, ConvNeXt, EfficientNet, ResNet, …)",
    list_archs=list_archs,
    list_tags=list_tags,
    default_weights=default_weights,
    build=build_timm,
    tiny=tuple(TINY_ARCHS),
)
