"""Contract tests over the method registry (DESIGN.md: "Methods").

Every registered method runs on each of its own ``examples()``, fed exactly what ``fit``
feeds it (the engine's :class:`~vprompt.engine.fit_data.FitData`: cached features for
``image-features`` methods, pixels otherwise). Adding a method adds no line here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vprompt
from vprompt.data.feature_cache import FeatureCache
from vprompt.engine.features import FeatureSource, takes_feature_path
from vprompt.engine.fit_data import FitData
from vprompt.engine.optim import build_optimizer, flat_params
from vprompt.engine.pack import build_from_pack, load_pack, pack_method, save_pack
from vprompt.errors import ConfigError, PackError
from vprompt.methods import (
    METHODS,
    Capabilities,
    MethodExample,
    MethodOutput,
    OptimConfig,
    PromptMethod,
    register_method,
)
from vprompt.methods.config import apply_config_mapping
from vprompt.methods.registry import contract_problems

CLASSES = ["zero", "one", "two"]
BUILT_IN = [n for n in METHODS.names() if METHODS.get(n).__module__.startswith("vprompt.")]
CASES = [
    pytest.param(name, example, id=f"{name}-{example.backbone}-{i}")
    for name in BUILT_IN
    for i, example in enumerate(METHODS.get(name).examples())
]
BACKBONES: dict[str, Any] = {}


class Pictures:
    """Six random 40 x 40 images, two per class, with identities (so features are cached)."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.classnames = list(CLASSES)
        self.items = [
            (Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)), i % 3)
            for i in range(6)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.items[index]

    def identity(self, index: int) -> str:
        return f"contract-pictures-{id(self)}-{index}"


def _backbone(name: str) -> Any:
    if name not in BACKBONES:
        BACKBONES[name] = vprompt.load_backbone(name, "none")
    return BACKBONES[name]


def _build(name: str, example: MethodExample) -> PromptMethod:
    cls = METHODS.get(name)
    config = apply_config_mapping(cls.Config(), example.config, what=f"{name} example")
    torch.manual_seed(0)
    return cls(_backbone(example.backbone), CLASSES, config)


def _fit_data(method: PromptMethod, cache: FeatureCache, train: Pictures, val: Pictures) -> FitData:
    """What fit builds: feature sources for image-feature methods, pixels otherwise."""
    device = torch.device("cpu")

    def source(data: Pictures) -> FeatureSource | None:
        if not takes_feature_path(method, data, cache):
            return None
        return FeatureSource(method, data, cache, device=device, batch_size=4, progress=False)

    return FitData(
        method,
        train,
        val,
        train_source=source(train),
        val_source=source(val),
        batch_size=4,
        device=device,
    )


def _pixels(method: PromptMethod, data: Pictures) -> torch.Tensor:
    transform = method.input_transform(False)
    return torch.stack([transform(image) for image, _ in data.items])


@pytest.mark.parametrize(("name", "example"), CASES)
def test_method_contract(name: str, example: MethodExample, tmp_path) -> None:
    method = _build(name, example)
    caps = method.capabilities
    backbone = method.backbone
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    train, val = Pictures(1), Pictures(2)
    data = _fit_data(method, FeatureCache(tmp_path / "cache"), train, val)

    # The lifecycle as fit runs it: set-up and the first epoch's hook, in eval mode.
    method.eval()
    method.setup(data)
    method.before_epoch(0, data)
    assert not backbone.training, "methods must keep the frozen backbone in eval mode"

    params = flat_params(method.trainable_parameters())
    backbone_ids = {id(p) for p in backbone.parameters()}
    assert all(id(p) not in backbone_ids for p in params)
    assert all(not p.requires_grad for p in backbone.parameters())
    if caps.trains and method.config.optim.epochs > 0:
        assert params, f"{name} declares trains=True but has nothing to train"
        method.train()
        assert not backbone.training, "methods must keep the frozen backbone in eval mode"
        inputs, labels = next(iter(data.train(0 if data.views else None)))
        forward = method.forward_features if caps.inputs == "image-features" else method
        out = forward(inputs)
        assert out.logits.shape == (len(labels), len(CLASSES))
        if caps.uses_labels:
            loss = F.cross_entropy(out.logits.float(), labels)
        else:  # learns without labels: its own terms are the whole loss, as in the engine
            assert out.aux_loss, f"{name} learns without labels but returns no loss term"
            loss = out.logits.new_zeros(())
        for term in out.aux_loss.values():
            loss = loss + term
        if caps.custom_backward:
            method.backward(loss, out, labels)
        else:
            loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), (
            "no gradient reached the prompt"
        )
        assert all(p.grad is None for p in backbone.parameters())
        build_optimizer(method.trainable_parameters(), method.config.optim).step()
    else:
        assert not caps.custom_backward
    method.eval()
    method.finish(data)

    # The frozen backbone is bit-identical afterwards (BatchNorm statistics included).
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    images = _pixels(method, val)
    with torch.no_grad():
        expected = method(images).logits
    assert expected.shape == (len(images), len(CLASSES))
    if caps.inputs == "image-features":
        # What is trained and evaluated on cached features is exactly what runs on pixels.
        feats = method.encode_images(images)
        assert feats.ndim == 2
        assert not feats.requires_grad
        assert torch.equal(method.encode_images(images), feats)
        with torch.no_grad():
            assert torch.equal(method.forward_features(feats).logits, expected)

    # Pack round trip reproduces outputs exactly and holds only prompt tensors.
    path = save_pack(method, tmp_path / "p.safetensors")
    pack = load_pack(path)
    assert set(pack.tensors) == set(method.prompt_state())
    assert not (set(pack.tensors) & {f"backbone.{k}" for k in backbone.state_dict()})
    if caps.is_prompt_method:
        assert pack.num_parameters() < sum(p.numel() for p in backbone.parameters())
    rebuilt = build_from_pack(pack, backbone=backbone)
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(images).logits, expected)
    assert pack_method(rebuilt).tensors.keys() == pack.tensors.keys()
    for key, value in pack.tensors.items():  # a NaN anywhere in the state is refused
        if value.dtype.is_floating_point and value.numel():
            poisoned = value.clone().reshape(-1)
            poisoned[-1] = float("nan")
            with pytest.raises(PackError, match=f"'{key}' holds NaN"):
                rebuilt.load_prompt_state({**pack.tensors, key: poisoned.reshape(value.shape)})

    # Declared retargeting gives the same kind of method for other classes.
    if caps.retargets and not getattr(method.config, "class_specific", False):
        moved = method.retarget(["ant", "bee"], templates=None)
        assert moved.classnames == ["ant", "bee"]
        with torch.no_grad():
            assert moved(images).logits.shape == (len(images), 2)


def _integer_fields(config: Any, prefix: str = "") -> list[str]:
    """Dotted names of a config's integer (or unset) fields, sections included."""
    names = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            names += _integer_fields(value, f"{prefix}{f.name}.")
        elif value is None or (isinstance(value, int) and not isinstance(value, bool)):
            names.append(prefix + f.name)
    return names


@pytest.mark.parametrize(("name", "example"), CASES)
def test_hostile_sizes_in_a_config_are_refused_before_anything_is_allocated(
    name: str, example: MethodExample
) -> None:
    """A pack or --set can put any number in any field: 10⁹ or -1 must be a ConfigError
    or build a small prompt, never an allocation failure or another crash."""
    cls = METHODS.get(name)
    base = apply_config_mapping(cls.Config(), example.config)
    for dotted in _integer_fields(base):
        for value in (10**9, -1):
            *sections, last = dotted.split(".")
            override: dict[str, Any] = {last: value}
            for section in reversed(sections):
                override = {section: override}
            try:
                config = apply_config_mapping(base, override)
                method = cls(_backbone(example.backbone), CLASSES, config)
            except ConfigError:
                continue
            size = sum(t.numel() for t in method.prompt_state().values())
            assert size < 10**7, f"{dotted}={value} built a {size}-element prompt"


def test_every_built_in_method_has_examples() -> None:
    assert BUILT_IN
    assert {c.values[0] for c in CASES} == set(BUILT_IN)


def test_every_registered_method_passes_the_registration_check() -> None:
    for name in METHODS.names():
        assert contract_problems(METHODS.get(name)) == [], name


@dataclass(frozen=True)
class _Cfg:
    scale: float = 1.0
    optim: OptimConfig = field(default_factory=OptimConfig)


class _Complete(PromptMethod):
    Config = _Cfg
    capabilities = Capabilities(inputs="images")

    def __init__(self, backbone: Any, classnames: Any, config: Any = None) -> None:
        super().__init__(backbone, classnames, config)
        self.bias = torch.nn.Parameter(torch.zeros(len(self.classnames)))

    @classmethod
    def examples(cls) -> list[MethodExample]:
        return [MethodExample("clip:tiny")]

    def forward(self, images: torch.Tensor) -> MethodOutput:
        return MethodOutput(logits=self.bias.expand(len(images), -1))


def _variant(**members: Any) -> type:
    return type("Broken", (_Complete,), members)


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"Config": None}, "needs a dataclass `Config`"),
        ({"Config": type("Loose", (), {})}, "needs a dataclass `Config`"),
        ({"capabilities": None}, "capabilities = Capabilities"),
        ({"Config": dataclass(frozen=True)(type("NoOptim", (), {}))}, "optim: OptimConfig"),
        (
            {"capabilities": Capabilities(inputs="image-features")},
            "needs encode_images, forward_features, feature_kind",
        ),
        ({"capabilities": Capabilities(custom_backward=True)}, r"needs backward\("),
        ({"backward": lambda self, loss, output, labels: None}, "declare custom_backward"),
        ({"capabilities": Capabilities(template_field="template")}, "not a field"),
        ({"target_settings": frozenset({"nope"})}, r"target_settings \['nope'\] are not fields"),
        ({"target_settings": frozenset({"optim"})}, "target_settings needs retargets=True"),
        ({"examples": classmethod(lambda cls: [])}, "at least one MethodExample"),
    ],
)
def test_registration_refuses_an_incomplete_method(members: dict, message: str) -> None:
    assert contract_problems(_Complete) == []
    broken = _variant(**members)
    with pytest.raises(TypeError, match=message):
        register_method("contract-broken")(broken)
    assert "contract-broken" not in METHODS


def test_registration_names_every_problem_at_once() -> None:
    class Bare(PromptMethod):
        pass

    problems = contract_problems(Bare)
    text = "; ".join(problems)
    for piece in ("Config", "capabilities"):
        assert piece in text
    assert contract_problems(int)[0].startswith("must subclass vprompt.methods.base.PromptMethod")


def test_forward_without_declaring_features_is_refused() -> None:
    class NoForward(PromptMethod):
        Config = _Cfg
        capabilities = Capabilities(inputs="images")
        examples: ClassVar[Any] = classmethod(lambda cls: [MethodExample("clip:tiny")])

    assert any("forward(images)" in p for p in contract_problems(NoForward))


def test_capabilities_refuse_contradictions() -> None:
    with pytest.raises(TypeError, match="uses training data"):
        Capabilities(trains=True, uses_training_data=False)
    with pytest.raises(TypeError, match="custom_backward needs trains"):
        Capabilities(trains=False, custom_backward=True)
    with pytest.raises(TypeError, match="uses_labels=False describes a method's training data"):
        Capabilities(trains=False, uses_training_data=False, uses_labels=False)
    with pytest.raises(TypeError, match="inputs"):
        Capabilities(inputs="pixels")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="multi_dataset needs"):
        Capabilities(inputs="image-features", multi_dataset=True)
