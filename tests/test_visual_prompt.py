"""Pixel prompts, label mappings, the visual-prompt method and Fashion-MNIST reading."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

import vprompt
from vprompt.data.fashion_mnist import CLASSNAMES, FashionMNIST, read_idx
from vprompt.errors import ConfigError, DatasetError, PackError
from vprompt.methods import MappingOnly, VisualPrompt
from vprompt.methods.label_mapping import LabelMapping, greedy_frequency_mapping
from vprompt.methods.pixel_prompt import PixelPrompt
from vprompt.methods.visual_prompt import VisualPromptConfig


# ---------------------------------------------------------------------------- pixel prompts
def _prompt(kind, canvas=16, inner=10, pad=3, patch=4):
    return PixelPrompt(
        kind=kind, canvas_size=canvas, inner_size=inner, pad_width=pad, patch_size=patch
    )


def test_padding_frame_surrounds_the_untouched_image():
    p = _prompt("padding", canvas=16, inner=10, pad=3)
    with torch.no_grad():
        p.prompt.fill_(2.0)
    x = torch.rand(2, 3, 10, 10)
    out = p(x)
    assert out.shape == (2, 3, 16, 16)
    assert torch.equal(out[:, :, 3:13, 3:13], x)  # inner image unchanged
    frame = out.clone()
    frame[:, :, 3:13, 3:13] = torch.sigmoid(torch.tensor(2.0))
    assert torch.allclose(frame, torch.full_like(frame, float(torch.sigmoid(torch.tensor(2.0)))))


def test_padding_on_full_size_image_overwrites_only_the_border():
    p = _prompt("padding", canvas=12, inner=12, pad=2)
    x = torch.rand(1, 3, 12, 12)
    out = p(x)
    assert torch.equal(out[:, :, 2:10, 2:10], x[:, :, 2:10, 2:10])
    assert torch.allclose(out[:, :, 0, :], torch.full((1, 3, 12), 0.5))


def test_fixed_patch_sits_top_left_and_random_patch_moves_only_in_training():
    fixed = _prompt("fixed-patch", canvas=16, inner=16, patch=4)
    x = torch.rand(1, 3, 16, 16)
    out = fixed(x)
    assert torch.allclose(out[:, :, :4, :4], torch.full((1, 3, 4, 4), 0.5))
    assert torch.equal(out[:, :, 4:, :], x[:, :, 4:, :])
    rand = _prompt("random-patch", canvas=16, inner=16, patch=4)
    rand.eval()
    assert torch.equal(rand(x), out)
    rand.train()
    torch.manual_seed(1)
    positions = {tuple((rand(x) != x).nonzero()[0, 2:].tolist()) for _ in range(10)}
    assert len(positions) > 1


def test_full_prompt_is_additive_and_none_only_places():
    full = _prompt("full", canvas=16, inner=10)
    with torch.no_grad():
        full.prompt.fill_(0.25)
    x = torch.rand(1, 3, 10, 10)
    assert torch.allclose(full(x), full.place(x) + 0.25)
    none = _prompt("none", canvas=16, inner=10)
    assert none.prompt is None
    assert torch.equal(none(x), none.place(x))
    assert none.render().shape == (3, 16, 16)


# ---------------------------------------------------------------------------- label mapping
def test_greedy_frequency_mapping_hand_computed():
    # rows: source classes, cols: target classes
    counts = torch.tensor([[5, 9, 0], [7, 1, 0], [0, 8, 2], [1, 0, 3]])
    # largest 9 → target 1 ← source 0; next 7 → target 0 ← source 1; then 3 → target 2 ← source 3
    assert greedy_frequency_mapping(counts).tolist() == [1, 0, 3]


def test_greedy_mapping_is_one_to_one_and_refuses_too_few_sources():
    counts = torch.randint(0, 50, (20, 7))
    m = greedy_frequency_mapping(counts)
    assert len(set(m.tolist())) == 7
    with pytest.raises(ConfigError, match="one-to-one"):
        greedy_frequency_mapping(torch.ones(3, 5))


def test_frequency_mapping_is_estimated_once_iterative_every_epoch():
    source = torch.eye(6) * 10  # the model predicts source i for an image "i"
    images = torch.arange(6).float().view(6, 1)
    labels = torch.tensor([2, 0, 1, 2, 0, 1])

    def logits(x):
        return source[x.view(-1).long()]

    freq = LabelMapping(kind="frequency", num_source=6, num_target=3)
    assert freq.needs_update(0)
    freq.update(logits, [(images, labels)])
    assert not freq.needs_update(1)
    out = freq(source)
    assert out.shape == (6, 3)
    assert freq.indices.tolist() == [1, 2, 0]  # each target's first source in greedy order
    it = LabelMapping(kind="iterative", num_source=6, num_target=3)
    it.update(logits, [(images, labels)])
    assert it.needs_update(5)


def test_random_and_linear_mappings():
    rnd = LabelMapping(kind="random", num_source=10, num_target=4, seed=3)
    assert len(set(rnd.indices.tolist())) == 4
    assert torch.equal(
        rnd.indices, LabelMapping(kind="random", num_source=10, num_target=4, seed=3).indices
    )
    lin = LabelMapping(kind="linear", num_source=10, num_target=4)
    assert lin(torch.randn(2, 10)).abs().sum() == 0  # zero init
    assert sum(p.numel() for p in lin.parameters()) == 44
    with pytest.raises(ConfigError, match="at least as many"):
        LabelMapping(kind="frequency", num_source=3, num_target=5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mapping.indices": torch.tensor([0, 1, 10])}, r"must lie in \[0, 10\)"),
        ({"mapping.indices": torch.tensor([-1, 1, 2])}, r"from -1 to 2"),
        ({"mapping.indices": torch.tensor([4, 4, 2])}, "repeat a source class"),
        ({"mapping.calibrated": torch.tensor(7)}, "must be 0 or 1, got 7"),
    ],
    ids=["past-the-end", "negative", "repeated", "flag"],
)
def test_stored_label_mapping_values_are_checked(change, message):
    """A pack's mapping indices select source logits: out of range they would crash (or read
    another class) at prediction time, so loading refuses them."""
    mapping = LabelMapping(kind="frequency", num_source=10, num_target=3)
    good = {"indices": torch.tensor([7, 0, 3]), "calibrated": torch.tensor(1)}
    mapping.check_state({f"mapping.{k}": v for k, v in good.items()}, "mapping.")
    stored = {**{f"mapping.{k}": v for k, v in good.items()}, **change}
    with pytest.raises(PackError, match=message):
        mapping.check_state(stored, "mapping.")


def test_visual_prompt_refuses_a_pack_with_a_mapping_out_of_range(tiny_cnn):
    method = VisualPrompt(tiny_cnn, ["a", "b"], VisualPromptConfig(mapping="frequency"))
    state = method.prompt_state()
    state["mapping.indices"] = torch.tensor([5000, 3])
    with pytest.raises(PackError, match=r"mapping.indices must lie in \[0, 1000\)"):
        method.load_prompt_state(state)


# ---------------------------------------------------------------------------- method
@pytest.fixture(scope="module")
def tiny_cnn():
    return vprompt.load_backbone("torchvision:tiny", "none")


def test_visual_prompt_resolves_backbone_defaults(tiny_cnn, tiny_clip):
    m = VisualPrompt(tiny_cnn, ["a", "b"], VisualPrompt.Config(inner_size=48))
    assert (m.config.canvas_size, m.config.inner_size, m.config.pad_width) == (64, 48, 8)
    assert m.config.mapping == "frequency"
    c = VisualPrompt(tiny_clip, ["a", "b"], VisualPrompt.Config(inner_size=None))
    assert c.config.mapping == "text"
    assert (c.config.canvas_size, c.config.pad_width) == (32, 4)  # 30/224 of the canvas
    with pytest.raises(ConfigError, match="text"):
        VisualPrompt(tiny_cnn, ["a"], VisualPrompt.Config(mapping="text"))
    with pytest.raises(ConfigError):
        VisualPrompt.Config(inner_size=300, canvas_size=224)
    with pytest.raises(ConfigError):
        VisualPrompt.Config(kind="bogus")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        MappingOnly(tiny_cnn, ["a"], MappingOnly.Config(kind="padding"))


def test_mapping_lr_scale_makes_parameter_groups(tiny_cnn):
    m = VisualPrompt(
        tiny_cnn,
        ["a", "b"],
        VisualPrompt.Config(mapping="linear", mapping_lr_scale=0.1, inner_size=48),
    )
    groups = m.trainable_parameters()
    assert [g["lr_scale"] for g in groups] == [1.0, 0.1]
    from vprompt.engine.optim import build_optimizer, set_lr

    opt = build_optimizer(groups, m.config.optim)
    set_lr(opt, 0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.05]


def test_prompted_input_is_normalized_with_the_backbone_statistics(tiny_cnn):
    m = VisualPrompt(
        tiny_cnn, ["a", "b"], VisualPrompt.Config(kind="none", mapping="random", inner_size=64)
    )
    x = torch.rand(2, 3, 64, 64)
    mean = torch.tensor(tiny_cnn.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(tiny_cnn.preprocess.std).view(1, 3, 1, 1)
    expected = tiny_cnn((x - mean) / std)[:, m.mapping.indices]
    assert torch.allclose(m(x).logits, expected)


# ---------------------------------------------------------------------------- Fashion-MNIST
def _write_idx(path, array, gz=True):
    dtype_code = {np.uint8: 0x08}[array.dtype.type]
    header = bytes([0, 0, dtype_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    if gz:
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def fake_fmnist(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n, gz in (("train", 12, True), ("t10k", 5, False)):
        suffix = ".gz" if gz else ""
        _write_idx(
            tmp_path / f"{prefix}-images-idx3-ubyte{suffix}",
            rng.integers(0, 255, (n, 28, 28), dtype=np.uint8),
            gz,
        )
        _write_idx(
            tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}",
            (np.arange(n) % 10).astype(np.uint8),
            gz,
        )
    return tmp_path


def test_fashion_mnist_reads_gz_and_raw_idx(fake_fmnist):
    train = FashionMNIST(fake_fmnist, split="train")
    test = FashionMNIST(fake_fmnist, split="test")
    assert (len(train), len(test)) == (12, 5)
    image, label = train[3]
    assert image.size == (28, 28)
    assert image.mode == "L"
    assert label == 3
    assert train.classnames == CLASSNAMES
    assert len(CLASSNAMES) == 10


def test_idx_errors_are_clear(tmp_path, fake_fmnist):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(DatasetError, match="magic"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(DatasetError, match="needs 10"):
        read_idx(short)
    with pytest.raises(DatasetError, match="not found"):
        FashionMNIST(tmp_path / "nowhere", split="train")
    with pytest.raises(DatasetError, match="train or test"):
        FashionMNIST(fake_fmnist, split="val")


@pytest.mark.real
def test_real_fashion_mnist_from_debian():
    from vprompt.data.fashion_mnist import DEBIAN_DIR

    if not (DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    train, test = FashionMNIST(DEBIAN_DIR, split="train"), FashionMNIST(DEBIAN_DIR, split="test")
    assert (len(train), len(test)) == (60000, 10000)
    assert np.bincount(test.labels).tolist() == [1000] * 10


# ---------------------------------------------------------------------------- resume
def test_interrupted_visual_prompt_run_resumes_to_the_same_prompt(tiny_cnn, tmp_path):
    """ILM re-estimates its mapping every epoch; a resumed run must still end bit-identical."""
    from PIL import Image

    from vprompt.engine import fit
    from vprompt.methods.config import apply_overrides

    class Noise:
        def __init__(self) -> None:
            self.classnames = ["a", "b", "c"]

        def __len__(self) -> int:
            return 24

        def __getitem__(self, i: int):
            pixels = np.random.default_rng(i).integers(0, 255, (20, 20, 3), dtype=np.uint8)
            return Image.fromarray(pixels), i % 3

    overrides = [
        "mapping=iterative",
        "inner_size=48",
        "optim.epochs=3",
        "optim.batch_size=8",
        "optim.lr=0.05",
    ]

    def method():
        cfg = apply_overrides(VisualPrompt.Config(), overrides)
        return VisualPrompt(tiny_cnn, Noise().classnames, cfg)

    straight = method()
    fit(straight, Noise(), out_dir=tmp_path / "a", progress=False)

    def stop_in_epoch_two(event):
        if event.kind == "step" and event.epoch == 1:
            raise KeyboardInterrupt

    interrupted = method()
    with pytest.raises(KeyboardInterrupt):
        fit(
            interrupted,
            Noise(),
            out_dir=tmp_path / "b",
            progress=False,
            callbacks=[stop_in_epoch_two],
        )
    resumed = method()
    fit(resumed, Noise(), out_dir=tmp_path / "b", progress=False)
    expected, got = straight.prompt_state(), resumed.prompt_state()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_free_pixel_range_starts_from_the_mapping_only_input_and_learns():
    p = _prompt("padding", canvas=16, inner=10, pad=3)
    free = PixelPrompt(
        kind="padding", canvas_size=16, inner_size=10, pad_width=3, patch_size=4, pixel_range="free"
    )
    x = torch.rand(2, 3, 10, 10)
    assert torch.equal(free(x), free.place(x))  # black frame: exactly the unprompted canvas
    assert not torch.equal(p(x), p.place(x))  # sigmoid starts mid-grey
    free(x).sum().backward()
    assert free.prompt.grad is not None
    assert free.prompt.grad[:, 3:13, 3:13].abs().sum() == 0  # only the frame learns
    assert free.prompt.grad[:, :3, :].abs().sum() > 0
    with pytest.raises(ConfigError, match="pixel_range"):
        VisualPrompt.Config(pixel_range="tanh")  # type: ignore[arg-type]
