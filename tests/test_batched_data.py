"""Batches cut from in-memory pixel arrays: same images, same order, same pixels as the
per-image PIL path, and the engine trains to the same prompt through either."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import vprompt
from vprompt.data.batched import ArrayBatches, ResizeToTensor, array_batches, pixel_array
from vprompt.data.dataset import Subset, TransformedDataset
from vprompt.engine import fit
from vprompt.engine.runtime import make_loader
from vprompt.errors import DatasetError
from vprompt.methods import LinearProbe, VisualPrompt
from vprompt.methods.config import apply_overrides

CPU = torch.device("cpu")


class ArrayData:
    """Images held as one uint8 array, like Fashion-MNIST."""

    def __init__(self, pixels: np.ndarray, classes: int = 3) -> None:
        self.images = pixels
        self.labels = np.arange(len(pixels)) % classes
        self.classnames = [f"c{i}" for i in range(classes)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[i]), int(self.labels[i])

    def all_labels(self) -> list[int]:
        return self.labels.tolist()

    def pixel_array(self) -> np.ndarray:
        return self.images


class PerImageOnly:
    """The same data without the array (forces the DataLoader path)."""

    def __init__(self, base: ArrayData) -> None:
        self.base, self.classnames = base, base.classnames

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return self.base[i]


def _grey(n: int = 10, side: int = 28, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side), dtype=np.uint8)


def _per_image(tf: ResizeToTensor, pixels: np.ndarray) -> torch.Tensor:
    return torch.stack([tf(Image.fromarray(p)) for p in pixels])


@pytest.mark.parametrize(
    ("shape", "size", "norm"),
    [
        ((6, 28, 28), 48, False),  # grey, upsampled (the Fashion-MNIST case)
        ((6, 28, 28), 20, False),  # grey, downsampled (antialiased, as PIL)
        ((6, 17, 23, 3), 32, True),  # RGB, non-square, normalised
        ((6, 40, 40, 3), 40, False),  # no resize
    ],
)
def test_batch_matches_the_per_image_pil_path(shape, size, norm):
    pixels = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    stats = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)} if norm else {}
    tf = ResizeToTensor(size, **stats)
    expected = _per_image(tf, pixels)
    got = tf.batch(torch.from_numpy(pixels))
    assert got.shape == expected.shape == (6, 3, size, size)
    scale = 1 / 255 / (0.224 if norm else 1.0)
    diff = (got - expected).abs()
    # PIL rounds to 8 bits after each of its two separable passes; we round once, so a pixel
    # may land one 8-bit level away, never more.
    assert float(diff.max()) <= scale * 1.0001
    assert float(diff.mean()) < 0.3 * scale


def test_per_image_call_is_torchvisions_own_pipeline():
    from torchvision import transforms as T

    image = Image.fromarray(_grey(1)[0])
    reference = T.Compose(
        [
            T.Lambda(lambda im: im.convert("RGB")),
            T.Resize((36, 36), interpolation=T.InterpolationMode.BILINEAR),
            T.ToTensor(),
            T.Normalize((0.5, 0.4, 0.3), (0.2, 0.3, 0.4)),
        ]
    )
    tf = ResizeToTensor(36, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
    assert torch.equal(tf(image), reference(image))
    assert "Resize(size=(36, 36)" in repr(tf)


def test_batch_flips_are_random_per_image_and_reproducible():
    pixels = torch.from_numpy(_grey(64))
    plain = ResizeToTensor(28)(Image.fromarray(pixels[0].numpy()))
    assert plain.shape == (3, 28, 28)
    tf = ResizeToTensor(28, flip=True)
    out = tf.batch(pixels, torch.Generator().manual_seed(3))
    again = tf.batch(pixels, torch.Generator().manual_seed(3))
    assert torch.equal(out, again)
    base = ResizeToTensor(28).batch(pixels)
    flipped = [bool(torch.equal(o, b.flip(-1))) for o, b in zip(out, base, strict=True)]
    kept = [bool(torch.equal(o, b)) for o, b in zip(out, base, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 16 < sum(flipped) < 48


def test_batch_refuses_what_is_not_uint8_images():
    tf = ResizeToTensor(8)
    with pytest.raises(DatasetError, match="uint8"):
        tf.batch(torch.zeros(2, 8, 8))
    with pytest.raises(DatasetError, match="uint8"):
        tf.batch(torch.zeros(8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="together"):
        ResizeToTensor(8, mean=(0.5,))


def test_array_batches_follow_the_dataloader_order_for_the_same_generator():
    data = ArrayData(_grey(23))
    tf = ResizeToTensor(32)
    reference = DataLoader(
        TransformedDataset(data, tf),
        batch_size=5,
        shuffle=True,
        generator=torch.Generator().manual_seed(11),
    )
    fast = make_loader(
        data, tf, batch_size=5, device=CPU, generator=torch.Generator().manual_seed(11)
    )
    assert isinstance(fast, ArrayBatches)
    assert len(fast) == len(reference) == 5
    pairs = list(zip(fast, reference, strict=True))
    for (x, y), (rx, ry) in pairs:
        assert torch.equal(y, ry)
        assert float((x - rx).abs().max()) <= 1 / 255 + 1e-6
    labels = torch.cat([y for _, y in fast])
    assert sorted(labels.tolist()) == sorted(data.all_labels())
    # Without a generator: dataset order.
    ordered = torch.cat([y for _, y in make_loader(data, tf, batch_size=4, device=CPU)])
    assert ordered.tolist() == data.all_labels()


def test_the_fast_path_needs_both_an_array_and_a_batchable_transform():
    data = ArrayData(_grey(6))
    tf = ResizeToTensor(16)
    assert isinstance(make_loader(data, tf, batch_size=2, device=CPU), ArrayBatches)
    assert isinstance(make_loader(PerImageOnly(data), tf, batch_size=2, device=CPU), DataLoader)
    plain = ResizeToTensor(16)._compose  # same steps, no batched twin
    assert isinstance(make_loader(data, plain, batch_size=2, device=CPU), DataLoader)
    # Arrays that are not uint8 images of the dataset's length are not used.
    odd = ArrayData(_grey(6))
    odd.images = odd.images.astype(np.float32)
    assert pixel_array(odd) is None
    assert array_batches(odd, tf, batch_size=2, device=CPU) is None


def test_subsets_and_fashion_mnist_expose_their_rows(tmp_path):
    from test_visual_prompt import _write_idx
    from vprompt.data.fashion_mnist import FashionMNIST

    images = _grey(12, seed=4)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", (np.arange(12) % 10).astype(np.uint8))
    fm = FashionMNIST(tmp_path, split="train")
    assert np.array_equal(pixel_array(fm), images)
    sub = Subset(fm, [7, 2, 9])
    assert np.array_equal(pixel_array(sub), images[[7, 2, 9]])
    assert pixel_array(Subset(PerImageOnly(ArrayData(images)), [1])) is None
    batches = list(make_loader(sub, ResizeToTensor(28), batch_size=8, device=CPU))
    ((x, y),) = batches
    assert y.tolist() == [7, 2, 9]
    assert torch.equal(x[1, 0], torch.from_numpy(images[2]).float() / 255)


@pytest.fixture(scope="module")
def tiny_cnn():
    return vprompt.load_backbone("torchvision:tiny", "none")


def _train(method, data, out):
    fit(method, data, out_dir=out, progress=False)
    return method.prompt_state()


@pytest.mark.parametrize("name", ["visual-prompt", "linear-probe"])
def test_engine_trains_to_the_same_prompt_through_either_path(tiny_cnn, tmp_path, name):
    # Images already at the target size: both paths feed identical pixels in the same order,
    # so any difference would come from the engine, not from resampling.
    data = ArrayData(_grey(40, side=24, seed=5))
    if name == "visual-prompt":
        sets = ["inner_size=24", "canvas_size=32", "mapping=linear", "augment=false"]
        cls = VisualPrompt
    else:
        sets = ["image_size=24"]
        cls = LinearProbe
    sets += ["optim.epochs=2", "optim.batch_size=8"]

    def method():
        torch.manual_seed(0)  # the same initial head for both
        return cls(tiny_cnn, data.classnames, apply_overrides(cls.Config(), sets))

    fast = _train(method(), data, tmp_path / "fast")
    slow = _train(method(), PerImageOnly(data), tmp_path / "slow")
    assert fast.keys() == slow.keys()
    for key in fast:
        torch.testing.assert_close(fast[key], slow[key], rtol=1e-5, atol=1e-6)


def test_interrupted_run_on_the_array_path_resumes_bit_identical(tiny_cnn, tmp_path):
    """Flips on the array path come from the epoch's generator, so a resume repeats them."""
    data = ArrayData(_grey(24, side=20, seed=6))
    sets = ["inner_size=24", "canvas_size=32", "optim.epochs=3", "optim.batch_size=8"]

    def method():
        return VisualPrompt(tiny_cnn, data.classnames, apply_overrides(VisualPrompt.Config(), sets))

    straight = _train(method(), data, tmp_path / "a")

    def stop_in_epoch_two(event):
        if event.kind == "step" and event.epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(method(), data, out_dir=tmp_path / "b", progress=False, callbacks=[stop_in_epoch_two])
    resumed = _train(method(), data, tmp_path / "b")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_arrays_too_big_for_the_device_are_cut_on_the_host(monkeypatch):
    """Both placements of the array give the same batches."""
    from vprompt.data import batched

    data = ArrayData(_grey(13))
    tf = ResizeToTensor(20, flip=True)

    def batches():
        loader = make_loader(
            data, tf, batch_size=4, device=CPU, generator=torch.Generator().manual_seed(2)
        )
        return [(x.clone(), y.clone()) for x, y in loader]

    resident = batches()
    monkeypatch.setattr(batched, "DEVICE_ARRAY_BYTES", 0)
    per_batch = batches()
    assert len(resident) == len(per_batch) == 4
    for (x, y), (x2, y2) in zip(resident, per_batch, strict=True):
        assert torch.equal(x, x2)
        assert torch.equal(y, y2)


def test_read_only_arrays_batch_without_a_warning():
    """Datasets hand out read-only arrays (Fashion-MNIST's decompressed file): no PyTorch
    "not writable" warning on every run, and the array is never written."""
    import warnings

    pixels = _grey(6)
    pixels.flags.writeable = False
    data = ArrayData(pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batches = list(make_loader(data, ResizeToTensor(16), batch_size=4, device=CPU))
    assert sum(len(y) for _, y in batches) == 6
    assert not pixels.flags.writeable
