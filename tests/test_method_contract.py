"""Contract tests over every registered trainable method (DESIGN.md: "Methods")."""

from __future__ import annotations

import pytest
import torch

import vprompt
from vprompt.engine.optim import flat_params
from vprompt.engine.pack import build_from_pack, load_pack, pack_method, save_pack
from vprompt.methods import METHODS

CLASSES = ["zero", "one", "two"]
# (method, backbone, config overrides): every trainable method needs at least one case here.
CASES = [
    (
        "visual-prompt",
        "torchvision:tiny",
        ["kind=padding", "mapping=frequency", "canvas_size=64", "inner_size=48"],
    ),
    (
        "visual-prompt",
        "torchvision:tiny",
        ["kind=fixed-patch", "mapping=linear", "canvas_size=64", "inner_size=64"],
    ),
    (
        "visual-prompt",
        "torchvision:tiny",
        ["kind=random-patch", "mapping=random", "canvas_size=64", "inner_size=64"],
    ),
    (
        "visual-prompt",
        "torchvision:tiny",
        ["kind=full", "mapping=iterative", "canvas_size=64", "inner_size=40"],
    ),
    ("visual-prompt", "clip:tiny", ["kind=padding", "inner_size=24"]),
    (
        "visual-prompt",
        "torchvision:tiny",
        ["kind=padding", "pixel_range=free", "mapping=linear", "inner_size=48"],
    ),
    ("mapping-only", "torchvision:tiny", ["mapping=linear", "canvas_size=64", "inner_size=64"]),
    ("linear-probe", "torchvision:tiny", []),
    ("linear-probe", "clip:tiny", []),
    ("full-finetune", "torchvision:tiny", []),
    ("coop", "clip:tiny", ["n_ctx=4"]),
    ("coop", "clip:tiny", ["ctx_init=a photo of a", "class_token_position=middle"]),
    ("coop", "clip:tiny", ["class_specific=true", "n_ctx=2", "class_token_position=front"]),
    ("kgcoop", "clip:tiny", ["n_ctx=4"]),
    ("kgcoop", "clip:tiny", ["ctx_init=", "n_ctx=2", "class_specific=true"]),
    ("prograd", "clip:tiny", ["n_ctx=8"]),
    (
        "prograd",
        "clip:tiny",
        ["init_from_template=false", "n_ctx=4", "class_token_position=middle"],
    ),
    ("cocoop", "clip:tiny", []),
    ("cocoop", "clip:tiny", ["ctx_init=", "n_ctx=3", "prompt_batch=5"]),
    ("vpt", "timm:tiny-vit", ["num_tokens=4"]),
    ("vpt", "timm:tiny-vit", ["num_tokens=3", "deep=true"]),
    ("vpt", "clip:tiny", ["num_tokens=4"]),
    ("vpt", "clip:tiny", ["num_tokens=3", "deep=true"]),
]
BACKBONES: dict[str, object] = {}


def _backbone(name: str):
    if name not in BACKBONES:
        BACKBONES[name] = vprompt.load_backbone(name, "none")
    return BACKBONES[name]


def _build(method_name: str, backbone_name: str, overrides: list[str]):
    from vprompt.methods.base import apply_overrides

    cls = METHODS.get(method_name)
    config = apply_overrides(cls.Config(), overrides)
    return cls(_backbone(backbone_name), CLASSES, config)


def _batch(method, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    transform = method.input_transform(False)
    images = [
        Image.fromarray((torch.rand(40, 40, 3, generator=gen) * 255).byte().numpy())
        for _ in range(n)
    ]
    return torch.stack([transform(im) for im in images]), torch.arange(n) % len(CLASSES)


def _calibrate(method, images, labels) -> None:
    method.before_epoch(0, lambda: iter([(images, labels)]))


def test_every_trainable_method_has_a_contract_case():
    trainable = {
        name
        for name in METHODS.names()
        if hasattr(METHODS.get(name), "trainable_parameters")
        and METHODS.get(name).__module__.startswith("vprompt.")
    }
    assert trainable <= {case[0] for case in CASES}, trainable - {case[0] for case in CASES}


@pytest.mark.parametrize(
    ("method_name", "backbone_name", "overrides"),
    CASES,
    ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(CASES)],
)
def test_method_contract(method_name, backbone_name, overrides, tmp_path):
    method = _build(method_name, backbone_name, overrides)
    backbone = method.backbone
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    images, labels = _batch(method)
    _calibrate(method, images, labels)

    # Only the method's own tensors are trainable; none of them belongs to the backbone.
    params = flat_params(method.trainable_parameters())
    backbone_ids = {id(p) for p in backbone.parameters()}
    assert all(id(p) not in backbone_ids for p in params)
    assert all(not p.requires_grad for p in backbone.parameters())

    method.train()
    assert not backbone.training, "methods must keep the frozen backbone in eval mode"
    out = method(images)
    assert out.logits.shape == (len(images), len(CLASSES))
    loss = torch.nn.functional.cross_entropy(out.logits, labels) + sum(out.aux_loss.values())
    loss.backward()
    assert params, f"{method_name} has nothing to train"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), (
        "no gradient reached the prompt"
    )
    assert all(p.grad is None for p in backbone.parameters())
    torch.optim.SGD(params, lr=0.1).step()

    # The frozen backbone is bit-identical after an optimizer step (BatchNorm stats included).
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    # Pack round trip reproduces outputs exactly and holds only prompt tensors.
    method.eval()
    with torch.no_grad():
        expected = method(images).logits
    path = save_pack(method, tmp_path / "p.safetensors")
    pack = load_pack(path)
    assert set(pack.tensors) == set(method.prompt_state())
    backbone_keys = set(backbone.state_dict())
    assert not (set(pack.tensors) & backbone_keys)
    if METHODS.get(method_name).is_prompt_method:
        n_backbone = sum(p.numel() for p in backbone.parameters())
        assert pack.num_parameters() < n_backbone
    rebuilt = build_from_pack(pack, backbone=backbone)
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(images).logits, expected)
    assert pack_method(rebuilt).tensors.keys() == pack.tensors.keys()


@pytest.mark.parametrize(
    ("method_name", "backbone_name", "overrides"),
    [c for c in CASES if METHODS.get(c[0]).__dict__.get("input_kind") == "image-features"],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_image_feature_method_contract(method_name, backbone_name, overrides):
    """A method that may be trained on cached features computes exactly that on pixels."""
    from vprompt.methods.base import ImageFeatureMethod, uses_image_features

    method = _build(method_name, backbone_name, overrides)
    assert uses_image_features(method)
    assert isinstance(method, ImageFeatureMethod)
    assert isinstance(method.feature_kind, str)
    assert method.feature_kind
    assert method.feature_views >= 1
    images, labels = _batch(method)
    _calibrate(method, images, labels)
    method.eval()
    feats = method.encode_images(images)
    assert feats.ndim == 2
    assert feats.shape[0] == len(images)
    assert not feats.requires_grad
    assert torch.equal(method.encode_images(images), feats)  # deterministic
    with torch.no_grad():
        assert torch.equal(method.forward_features(feats).logits, method(images).logits)
    method.train()
    out = method.forward_features(feats)
    out.logits.sum().backward()
    assert any(p.grad is not None for p in flat_params(method.trainable_parameters()))
