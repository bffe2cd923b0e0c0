"""Dense (per-location) features of any frozen backbone: the seam anomaly scoring and defect
search use.

* CNNs (torchvision / timm classifiers, ResNet CLIP towers): the outputs of named modules,
  caught with forward hooks. By default the *stage outputs at strides 8 and 16* — PatchCore's
  ``layer2`` / ``layer3`` on a ResNet — found by :func:`default_layers`: among the modules
  one level below the model (and the children of a top-level ``nn.Sequential`` trunk such as
  MobileNetV2's ``features``), the last one in execution order whose output is at that stride.
* ViTs (anything with token access: timm / torchvision ViTs, CLIP ViT towers): the patch
  tokens after chosen blocks, laid out on their grid; by default after the blocks at half and
  three quarters of the depth (``block.5`` and ``block.8`` of a 12-block ViT, 0-based).

Layer names are ``block.K`` (0-based) for ViTs and module paths (``layer2``,
``features.6``) for CNNs. Shapes: B images, C channels, h x w the feature grid.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vprompt.errors import ConfigError

DEFAULT_STRIDES = (8, 16)
_BLOCK = re.compile(r"^block\.(\d+)$")


def is_token_model(backbone: Any) -> bool:
    """Whether ``backbone`` gives ViT tokens (dense features come from blocks)."""
    return bool(getattr(backbone, "is_vit", False))


def _module_root(backbone: Any) -> nn.Module:
    """The CNN whose modules the layer names refer to."""
    model = getattr(backbone, "model", None)
    if model is None:
        raise ConfigError(f"{backbone.name}: no dense features (not a classifier or CLIP model)")
    visual = getattr(model, "visual", None)
    return visual if isinstance(visual, nn.Module) else model


def _input_side(backbone: Any) -> int:
    return int(backbone.preprocess.size[0])


def available_layers(backbone: Any) -> list[tuple[str, int, int]]:
    """(name, channels, stride) of every layer :func:`dense_features` accepts by default rule.

    For ViTs: every block (stride = the patch size). For CNNs: the candidate stage modules.
    """
    if is_token_model(backbone):
        side = _input_side(backbone)
        grid = _vit_grid(backbone, side)
        stride = side // grid
        width = int(backbone.vision_width)
        return [(f"block.{i}", width, stride) for i in range(len(backbone.vision_blocks))]
    return list(_cnn_stages(backbone))


def default_layers(backbone: Any) -> list[str]:
    """The layers patch scoring uses unless told otherwise (see the module docstring)."""
    if is_token_model(backbone):
        depth = len(backbone.vision_blocks)
        picks = sorted({max(0, depth // 2 - 1), max(0, (3 * depth) // 4 - 1)})
        return [f"block.{i}" for i in picks]
    stages = _cnn_stages(backbone)
    out = []
    for stride in DEFAULT_STRIDES:
        at = [name for name, _, s in stages if s == stride]
        if at:
            out.append(at[-1])
    if not out:
        raise ConfigError(
            f"{backbone.name}: found no stage at stride 8 or 16; name the layers to use "
            f"(candidates: {', '.join(n for n, _, _ in stages[:20])})"
        )
    return out


def check_layers(backbone: Any, layers: Sequence[str]) -> list[str]:
    """``layers`` validated against the backbone (one line naming a wrong one)."""
    names = [str(x) for x in layers]
    if not names:
        raise ConfigError("dense features need at least one layer")
    if is_token_model(backbone):
        depth = len(backbone.vision_blocks)
        for name in names:
            m = _BLOCK.match(name)
            if not m or int(m.group(1)) >= depth:
                raise ConfigError(
                    f"{backbone.name}: layer {name!r} is not a block (block.0 … block.{depth - 1})"
                )
        return names
    modules = dict(_module_root(backbone).named_modules())
    for name in names:
        if name not in modules or not name:
            raise ConfigError(
                f"{backbone.name}: no module {name!r} (stage candidates: "
                f"{', '.join(n for n, _, _ in _cnn_stages(backbone)[:20])})"
            )
    return names


def dense_features(
    backbone: Any, pixels: torch.Tensor, layers: Sequence[str]
) -> list[torch.Tensor]:
    """B x 3 x S x S normalised pixels → one B x C x h x w map per layer, in ``layers`` order."""
    if is_token_model(backbone):
        return _vit_features(backbone, pixels, layers)
    root = _module_root(backbone)
    modules = dict(root.named_modules())
    caught: dict[str, torch.Tensor] = {}
    handles = []
    for name in layers:
        handles.append(
            modules[name].register_forward_hook(functools.partial(_catch, caught=caught, name=name))
        )
    try:
        _run_to_last(backbone, root, pixels, caught, set(layers))
    finally:
        for h in handles:
            h.remove()
    return [caught[name].contiguous() for name in layers]


class _Enough(Exception):
    """Raised by a hook once every wanted layer has been seen, to skip the rest of the net."""


def _catch(
    _m: nn.Module, _inp: Any, out: Any, *, caught: dict[str, torch.Tensor], name: str
) -> None:
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        raise ConfigError(f"layer {name!r} does not output a B x C x h x w map")
    caught[name] = out


def _run_to_last(
    backbone: Any,
    root: nn.Module,
    pixels: torch.Tensor,
    caught: dict[str, torch.Tensor],
    want: set[str],
) -> None:
    def stop(*_: Any) -> None:
        if want <= caught.keys():
            raise _Enough

    handle = root.register_forward_hook(stop)
    leaf_handles = [m.register_forward_hook(stop) for n, m in root.named_modules() if n in want]
    try:
        x = pixels
        if getattr(backbone, "channels_last", False):
            x = x.contiguous(memory_format=torch.channels_last)
        root(x)
    except _Enough:
        pass
    finally:
        handle.remove()
        for h in leaf_handles:
            h.remove()


def _vit_grid(backbone: Any, side: int) -> int:
    with torch.no_grad():
        dummy = torch.zeros(1, 3, side, side, device=_device(backbone))
        n = backbone.vision_tokens(dummy).shape[1] - int(backbone.num_prefix_tokens)
    grid = math.isqrt(n)
    if grid * grid != n:
        raise ConfigError(f"{backbone.name}: {n} patch tokens do not form a square grid")
    return grid


def _vit_features(backbone: Any, pixels: torch.Tensor, layers: Sequence[str]) -> list[torch.Tensor]:
    wanted = {int(_BLOCK.match(n).group(1)): n for n in layers}  # type: ignore[union-attr]
    prefix = int(backbone.num_prefix_tokens)
    x = backbone.vision_tokens(pixels)
    out: dict[str, torch.Tensor] = {}
    last = max(wanted)
    for i, block in enumerate(backbone.vision_blocks):
        x = block(x)
        if i in wanted:
            out[wanted[i]] = tokens_to_grid(x[:, prefix:])
        if i == last:
            break
    return [out[n] for n in layers]


def tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
    """B x N x D patch tokens (N a square) → B x D x g x g."""
    b, n, d = tokens.shape
    g = math.isqrt(n)
    if g * g != n:
        raise ConfigError(f"{n} patch tokens do not form a square grid")
    return tokens.transpose(1, 2).reshape(b, d, g, g)


def _device(backbone: Any) -> torch.device:
    return next((p.device for p in backbone.parameters()), torch.device("cpu"))


def _cnn_stages(backbone: Any) -> list[tuple[str, int, int]]:
    """(name, channels, stride) of the stage candidates, in execution order (cached per model)."""
    root = _module_root(backbone)
    cached = getattr(root, "_vprompt_dense_stages", None)
    if cached is not None:
        return list(cached)
    candidates: dict[str, nn.Module] = {}
    for name, child in root.named_children():
        candidates[name] = child
        if isinstance(child, nn.Sequential):
            for sub, grand in child.named_children():
                candidates[f"{name}.{sub}"] = grand
    side = _input_side(backbone)
    order: list[tuple[str, int, int]] = []
    handles = []

    def record(name: str, _m: nn.Module, _i: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[-1] > 0:
            stride = side // int(out.shape[-1])
            if side % int(out.shape[-1]) == 0:
                order.append((name, int(out.shape[1]), stride))

    for name, mod in candidates.items():
        handles.append(mod.register_forward_hook(functools.partial(record, name)))
    try:
        with torch.no_grad():
            x = torch.zeros(1, 3, side, side, device=_device(backbone))
            root(x)
    finally:
        for h in handles:
            h.remove()
    root._vprompt_dense_stages = tuple(order)  # type: ignore[assignment]
    return order
