"""The ``torchvision`` family: every torchvision classifier, its weight enums, hf-hub and files."""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any, cast
from unittest import mock

import torch
from torch import nn

from vprompt.backbones.checkpoints import (
    download_hf_checkpoint,
    find_checkpoint,
    load_state_dict_strict,
    read_state_dict,
)
from vprompt.backbones.classifier import ClassifierBackbone, TokenLayout, class_names
from vprompt.backbones.downloads import download_advice, unreachable
from vprompt.backbones.preprocess import Interpolation, Preprocess
from vprompt.backbones.registry import (
    RANDOM_INIT,
    RANDOM_INIT_SEED,
    BackboneFamily,
    unknown_weights_error,
)
from vprompt.errors import WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's classic ImageNet recipe, for architectures without any weights of their own.
_FALLBACK_PREPROCESS = Preprocess(
    size=(224, 224), resize_size=256, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD
)
# Tiny test models: public name → (torchvision builder, builder kwargs, preprocess).
TINY_ARCHS: dict[str, tuple[str, dict[str, Any], Preprocess]] = {
    "tiny": (
        "mobilenet_v2",
        {"width_mult": 0.25},
        Preprocess(
            size=(64, 64),
            resize_size=73,
            interpolation="bilinear",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        ),
    ),
}
_DOWNLOAD_LOCK = threading.Lock()
_INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


def _models() -> Any:
    import torchvision.models

    return torchvision.models


@functools.cache
def _archs() -> tuple[str, ...]:
    tvm = _models()
    return (*TINY_ARCHS, *tvm.list_models(module=tvm))


def list_archs() -> list[str]:
    return list(_archs())


@functools.cache
def _tags(arch: str) -> tuple[str, ...]:
    if arch in TINY_ARCHS:
        return ()
    try:
        enum = _models().get_model_weights(arch)
    except (ValueError, KeyError):
        return ()
    names = tuple(w.name for w in enum)
    return (*names, "DEFAULT") if names else ()


def list_tags(arch: str) -> list[str]:
    return list(_tags(arch))


def default_weights(arch: str) -> str:
    enum = _weight_enum(arch)
    return enum.DEFAULT.name if enum is not None else RANDOM_INIT


def _weight_enum(arch: str) -> Any:
    return _models().get_model_weights(arch) if _tags(arch) else None


def build_torchvision(arch: str, weights: str, device: torch.device) -> ClassifierBackbone:
    tv_arch, kwargs, tiny_preprocess = TINY_ARCHS.get(arch, (arch, {}, None))
    enum = _weight_enum(arch)
    categories: list[str] | None = None
    if weights == RANDOM_INIT:
        model = _random_init(tv_arch, kwargs)
    elif weights.startswith("hf-hub:"):
        file = download_hf_checkpoint(weights.removeprefix("hf-hub:"))
        model = _from_file(arch, tv_arch, kwargs, file, label=weights)
        categories = _imagenet_if_1000(model)
    elif Path(weights).expanduser().exists():
        path = Path(weights).expanduser()
        file = find_checkpoint(path) if path.is_dir() else path
        model = _from_file(arch, tv_arch, kwargs, file, label=repr(str(file)))
        categories = _imagenet_if_1000(model)
    elif weights in _tags(arch):
        member = enum[weights]  # DEFAULT resolves to the concrete member
        weights = member.name
        model = _from_tag(arch, member)
        categories = list(member.meta["categories"])
    else:
        raise _unknown_source(arch, weights)
    if tiny_preprocess is not None:
        preprocess = tiny_preprocess
    elif weights in _tags(arch):
        preprocess = preprocess_from_weights(enum[weights])
    elif enum is not None:
        preprocess = preprocess_from_weights(enum.DEFAULT)
    else:
        preprocess = _FALLBACK_PREPROCESS
    backbone = ClassifierBackbone(
        model=model,
        name=f"torchvision:{arch}",
        weights=weights,
        preprocess=preprocess,
        kind="torchvision",
        source_classes=class_names(_num_classes(model), categories),
        token_layout=_token_layout(model),
    )
    return backbone.to(device)


def preprocess_from_weights(member: Any) -> Preprocess:
    """A torchvision weight enum member's ``transforms()`` as a :class:`Preprocess`."""
    t = member.transforms()
    crop = int(t.crop_size[0])
    interp = str(getattr(t.interpolation, "value", t.interpolation))
    return Preprocess(
        size=(crop, crop),
        resize_size=int(t.resize_size[0]),
        interpolation=cast(Interpolation, interp) if interp in _INTERPOLATIONS else "bilinear",
        mean=tuple(float(v) for v in t.mean),  # type: ignore[arg-type]
        std=tuple(float(v) for v in t.std),  # type: ignore[arg-type]
    )


def _random_init(tv_arch: str, kwargs: dict[str, Any]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return _models().get_model(tv_arch, weights=None, **kwargs)


def _from_tag(arch: str, member: Any) -> nn.Module:
    from torchvision.models import _api

    def safe_load(url: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        kwargs["weights_only"] = True
        return torch.hub.load_state_dict_from_url(url, *args, **kwargs)

    # torchvision's builders read their checkpoints with torch.load(weights_only=False); swap
    # in a tensors-only load for the length of this build (the builders also adapt the model
    # to the weights — class count, Inception's input transform — so we keep using them).
    try:
        with _DOWNLOAD_LOCK, mock.patch.object(_api, "load_state_dict_from_url", safe_load):
            return _models().get_model(arch, weights=member)
    except Exception as exc:  # offline and not cached, corrupt file, refused pickle …
        if unreachable(exc):
            cache = Path(torch.hub.get_dir()) / "checkpoints"
            raise download_advice(
                f"torchvision:{arch} weights {member.name!r}",
                member.url,
                f"{member.url.rsplit('/', 1)[-1]} from that address",
                f"{cache}/",
            ) from exc
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        raise WeightsError(
            f"cannot load torchvision:{arch} weights {member.name!r} ({member.url}): {first}"
        ) from exc


def _from_file(
    arch: str, tv_arch: str, kwargs: dict[str, Any], file: Path, *, label: str
) -> nn.Module:
    state = read_state_dict(file)
    model = _random_init(tv_arch, kwargs)
    head_key = _head_weight_key(model)
    if head_key in state and state[head_key].shape[0] != model.state_dict()[head_key].shape[0]:
        # A fine-tuned checkpoint: rebuild with its class count so the strict load can fit.
        model = _random_init(tv_arch, {**kwargs, "num_classes": int(state[head_key].shape[0])})
    load_state_dict_strict(model, state, source=f"torchvision:{arch} weights {label}")
    return model


def _head_weight_key(model: nn.Module) -> str:
    last = ""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = f"{name}.weight"
    return last


def _num_classes(model: nn.Module) -> int:
    declared = getattr(model, "num_classes", None)
    if isinstance(declared, int):
        return declared  # SqueezeNet: its classifier is a convolution
    key = _head_weight_key(model)
    return int(model.state_dict()[key].shape[0])


def _imagenet_if_1000(model: nn.Module) -> list[str] | None:
    # A torchvision architecture with a 1000-way head follows ImageNet-1k's class order.
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return list(_IMAGENET_CATEGORIES) if _num_classes(model) == 1000 else None


def _token_layout(model: nn.Module) -> TokenLayout | None:
    from torchvision.models.vision_transformer import VisionTransformer

    return "torchvision-vit" if isinstance(model, VisionTransformer) else None


def _unknown_source(arch: str, weights: str) -> WeightsError:
    return unknown_weights_error(f"torchvision:{arch}", weights, list_tags(arch))


TORCHVISION_FAMILY = BackboneFamily(
    name="torchvision",
    description="Image classifiers from torchvision (ResNet, MobileNet, EfficientNet, ViT, …)",
    list_archs=list_archs,
    list_tags=list_tags,
    default_weights=default_weights,
    build=build_torchvision,
    tiny=tuple(TINY_ARCHS),
)
