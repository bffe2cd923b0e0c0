"""``clipseg:``: probability maps against transformers' own processor + model (resized by an
independent bilinear computation), the authors' visual prompt rebuilt in numpy, connected
components by hand, errors, and the weight sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vprompt.backbones.clipseg as cs
from vprompt.backbones.detection import DETECTORS, DetectorBackbone, Exemplar
from vprompt.backbones.registry import load_backbone
from vprompt.errors import PromptError, WeightsError

QUERIES = ["a cat", "a striped cat on a red sofa"]


@pytest.fixture(scope="module")
def tiny() -> cs.ClipSegBackbone:
    return load_backbone("clipseg:tiny", "none")  # type: ignore[return-value]


@pytest.fixture(scope="module")
def images() -> dict[str, Image.Image]:
    import skimage.data

    cat = Image.fromarray(skimage.data.chelsea())
    return {"landscape": cat.resize((96, 64)), "portrait": cat.resize((64, 96))}


def _bilinear(a: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Half-pixel-centre bilinear resize of an h x w array (edges clamped), in float64."""
    in_h, in_w = a.shape

    def axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    y0, y1, fy = axis(out_h, in_h)
    x0, x1, fx = axis(out_w, in_w)
    a = a.astype(np.float64)
    top = a[y0][:, x0] * (1 - fx) + a[y0][:, x1] * fx
    bottom = a[y1][:, x0] * (1 - fx) + a[y1][:, x1] * fx
    return top * (1 - fy[:, None]) + bottom * fy[:, None]


@pytest.mark.parametrize("shape", ["landscape", "portrait"])
def test_probability_maps_match_library_logits(tiny, images, shape):
    image = images[shape]
    inputs = tiny.processor(
        text=QUERIES, images=[image] * len(QUERIES), padding="max_length", return_tensors="pt"
    )
    with torch.no_grad():
        logits = tiny.model(**inputs).logits.numpy()  # N x S x S, the library's batch forward
    w, h = image.size
    expected = 1 / (1 + np.exp(-np.stack([_bilinear(m, h, w) for m in logits])))
    ours = tiny.probability_maps(image, queries=QUERIES)
    assert ours.shape == (len(QUERIES), h, w)
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=2e-5)
    # The prompts disagree somewhere (the comparison is not between two constant maps).
    assert float((ours[0] - ours[1]).abs().max()) > 0.1


def _gaussian_blur_np(x: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """cv2.GaussianBlur's separable kernel with its default border (reflect-101)."""
    t = np.arange(size) - size // 2
    k = np.exp(-(t**2) / (2 * sigma**2))
    k /= k.sum()
    r = size // 2
    padded = np.pad(x, ((0, 0), (r, r), (r, r)), mode="reflect")
    rows = sum(k[i] * padded[:, i : i + x.shape[1], :] for i in range(size))
    return sum(k[i] * rows[:, :, i : i + x.shape[2]] for i in range(size))


def _reference_prompt(pixels: np.ndarray, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """The authors' crop_blur_highlight352 on a box mask, step by step in numpy."""
    _, side, _ = pixels.shape
    mask = np.zeros((side, side))
    mask[r0:r1, c0:c1] = 1
    out = pixels * mask + 0.1 * _gaussian_blur_np(pixels, 15, 3.0) * (1 - mask)
    h, w = r1 - r0, c1 - c0
    top, bottom = int(max(0, r0 - 0.1 * h)), int(min(side, r1 + 0.1 * h))
    left, right = int(max(0, c0 - 0.1 * w)), int(min(side, c1 + 0.1 * w))
    crop = out[:, top:bottom, left:right]
    ch, cw = crop.shape[1:]
    if ch > cw:
        a = (ch - cw) // 2
        crop = np.pad(crop, ((0, 0), (0, 0), (a, ch - cw - a)))
    elif cw > ch:
        a = (cw - ch) // 2
        crop = np.pad(crop, ((0, 0), (a, cw - ch - a), (0, 0)))
    n = crop.shape[1]
    idx = np.minimum(np.floor(np.arange(side) * np.float32(n / side)).astype(int), n - 1)
    return crop[:, idx][:, :, idx]


def test_visual_prompt_follows_the_authors_recipe(tiny, images):
    image = images["landscape"]  # 96 x 64 squashed to 64 x 64
    box = (30.0, 8.0, 78.0, 40.0)
    region = cs.box_in_square(box, image.size, 64)
    assert region == (8, 40, 20, 52)  # rows 8*64/64.., columns 30*64/96=20 .. 78*64/96=52
    pixels = tiny.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
    ours = cs.visual_prompt(pixels, region)
    expected = _reference_prompt(pixels.double().numpy(), *region)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-5)
    # The exemplar's conditional path is the library's: same logits as passing the prompt in.
    with torch.no_grad():
        lib = tiny.model(pixel_values=pixels[None], conditional_pixel_values=ours[None]).logits
    mine = tiny.logits(image, exemplars=[Exemplar(image, box)])
    torch.testing.assert_close(mine, lib.reshape(mine.shape), rtol=0, atol=1e-4)


def test_map_instances_by_hand():
    probs = torch.zeros(2, 6, 8)
    probs[0, 1:3, 1:4] = 0.9  # a 2 x 3 block
    probs[0, 3, 4] = 0.5  # touches the block diagonally: the same 8-connected region
    probs[0, 5, 7] = 0.7  # a separate pixel
    probs[0, 0, 7] = 0.3  # exactly the threshold: background
    probs[1, 2:6, 0:2] = 0.4
    out = cs.map_instances(probs, threshold=0.3)
    assert out.labels.tolist() == [0, 0, 1]
    block_mean = (6 * 0.9 + 0.5) / 7
    np.testing.assert_allclose(out.scores.numpy(), [block_mean, 0.7, 0.4], rtol=1e-6)
    assert out.boxes.tolist() == [[1, 1, 5, 4], [7, 5, 8, 6], [0, 2, 2, 6]]
    assert out.masks is not None
    expected = np.zeros((3, 6, 8), dtype=bool)
    expected[0, 1:3, 1:4] = True
    expected[0, 3, 4] = True
    expected[1, 5, 7] = True
    expected[2, 2:6, 0:2] = True
    assert np.array_equal(out.masks.numpy(), expected)
    capped = cs.map_instances(probs, threshold=0.3, max_per_query=1)
    assert capped.labels.tolist() == [0, 1]
    empty = cs.map_instances(torch.zeros(1, 4, 5), threshold=0.3)
    assert empty.boxes.shape == (0, 4)
    assert empty.masks is not None
    assert empty.masks.shape == (0, 4, 5)


def test_detect_turns_maps_into_regions(tiny, images):
    image = images["portrait"]
    ex = Exemplar(images["landscape"], (30, 8, 78, 40))
    maps = tiny.probability_maps(image, queries=QUERIES, exemplars=[ex])
    out = tiny.detect(image, queries=QUERIES, exemplars=[ex])
    assert maps.shape == (3, 96, 64)
    assert set(out.labels.tolist()) <= {0, 1, 2}
    assert len(out.scores) > 0
    assert out.masks is not None
    for box, score, label, mask in zip(out.boxes, out.scores, out.labels, out.masks, strict=True):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        inside = maps[int(label)][mask]
        assert bool((inside > tiny.mask_threshold).all())
        assert float(score) == pytest.approx(float(inside.double().mean()), abs=1e-6)
    # Every foreground pixel of every map belongs to exactly one region of its label.
    for label in range(3):
        covered = out.masks[out.labels == label].sum(dim=0)
        assert torch.equal(covered, (maps[label] > tiny.mask_threshold).long())


def test_bad_prompts_are_refused(tiny, images):
    image = images["landscape"]
    with pytest.raises(PromptError, match="at least one text query or exemplar"):
        tiny.detect(image)
    with pytest.raises(PromptError, match="empty"):
        tiny.detect(image, queries=[" "])
    with pytest.raises(PromptError, match="reads at most 75"):
        tiny.detect(image, queries=["a," * 80])  # 160 characters, 160 tokens
    with pytest.raises(PromptError, match="exemplar 0 is negative"):
        tiny.detect(image, exemplars=[Exemplar(image, (1, 1, 9, 9), positive=False)])
    with pytest.raises(PromptError, match="reaches outside"):
        Exemplar(image, (1, 1, 97, 9))


def test_same_weights_twice_and_local_folder(tiny, images, tmp_path):
    again = load_backbone("clipseg:tiny", "none")
    assert isinstance(again, DetectorBackbone)
    assert again.fingerprint() == tiny.fingerprint()
    image = images["landscape"]
    a = again.probability_maps(image, queries=QUERIES)
    assert torch.equal(a, tiny.probability_maps(image, queries=QUERIES))
    folder = tmp_path / "clipseg"
    tiny.model.save_pretrained(folder)
    tiny.processor.save_pretrained(folder)
    loaded = load_backbone("clipseg:rd64-refined", str(folder))
    assert loaded.fingerprint() == tiny.fingerprint()
    assert torch.equal(loaded.probability_maps(image, queries=QUERIES), a)
    b, c = loaded.detect(image, queries=QUERIES), tiny.detect(image, queries=QUERIES)
    assert torch.equal(b.boxes, c.boxes)
    assert torch.equal(b.scores, c.scores)
    with pytest.raises(WeightsError, match="test architecture"):
        load_backbone("clipseg:tiny", "CIDAS/clipseg-rd64-refined")
    bare = tmp_path / "bare"
    tiny.model.save_pretrained(bare)
    with pytest.raises(WeightsError, match="save the processor"):
        load_backbone("clipseg:rd16", str(bare))


def test_real_architectures_build_from_configs():
    import transformers as tf

    for arch, spec in cs.ARCHS.items():
        if not spec.hub_id:
            continue
        with torch.device("meta"):
            model = tf.CLIPSegForImageSegmentation(tf.CLIPSegConfig(**spec.config))
        millions = sum(p.numel() for p in model.parameters()) / 1e6
        assert 149 < millions < 152, (arch, millions)  # CLIP ViT-B/16 + a ~1M decoder
        assert model.config.use_complex_transposed_convolution == ("refined" in arch)
        assert model.config.reduce_dim == (16 if arch == "rd16" else 64)


def test_registered_detector():
    spec = DETECTORS.get("clipseg")
    assert spec.default_model == "clipseg:rd64-refined"
    assert (spec.score_threshold, spec.nms_iou) == (0.3, 1.0)
    assert spec.capabilities.exemplars
    assert spec.capabilities.masks
    assert not spec.capabilities.negative_exemplars
    assert spec.capabilities.max_query_tokens == 75
