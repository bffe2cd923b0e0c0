"""SegGPT: parity with transformers' own pipeline, the feature ensemble, weights, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import SegGptImageProcessor

from vprompt.backbones import load_backbone
from vprompt.backbones.seggpt import SegGptBackbone
from vprompt.errors import PromptError, UnknownNameError, WeightsError
from vprompt.segment.seggpt import InContextMask, SegGptSegmenter


@pytest.fixture(scope="module")
def tiny() -> SegGptBackbone:
    return load_backbone("seggpt:tiny", "none")


@pytest.fixture(scope="module")
def images(photos_dir: Path) -> dict[str, Image.Image]:
    """Small odd-sized copies: a landscape target, its portrait transpose, two references."""
    chelsea = Image.open(photos_dir / "chelsea.png").convert("RGB").resize((91, 60))
    return {
        "landscape": chelsea,
        "portrait": chelsea.transpose(Image.Transpose.TRANSPOSE),
        "ref-a": Image.open(photos_dir / "coffee.png").convert("RGB").resize((80, 60)),
        "ref-b": Image.open(photos_dir / "astronaut.png").convert("RGB").resize((50, 50)),
    }


def _box_mask(image: Image.Image, box: tuple[float, float, float, float]) -> np.ndarray:
    """H x W bool mask of a box given as fractions (x0, y0, x1, y1) of the image."""
    mask = np.zeros((image.height, image.width), dtype=bool)
    x0, y0, x1, y1 = box
    rows = slice(int(y0 * image.height), int(y1 * image.height))
    cols = slice(int(x0 * image.width), int(x1 * image.width))
    mask[rows, cols] = True
    return mask


def _refs(images: dict[str, Image.Image], n: int) -> tuple[list[Image.Image], list[np.ndarray]]:
    ref_images = [images["ref-a"], images["ref-b"]][:n]
    boxes = [(0.2, 0.1, 0.7, 0.8), (0.4, 0.3, 1.0, 0.9)][:n]
    return ref_images, [_box_mask(im, b) for im, b in zip(ref_images, boxes, strict=True)]


def _direct(
    backbone: SegGptBackbone,
    ref_images: list[Image.Image],
    ref_masks: list[np.ndarray],
    target: Image.Image,
    *,
    ensemble: bool,
    embedding_type: str = "instance",
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' documented pipeline: processor → model → post-processing.

    Returns:
        The H x W label map (0/1) for the target and the foreground brightness, from an
        independently built processor with the model's half size.
    """
    h, w = backbone.model.config.image_size
    processor = SegGptImageProcessor(size={"height": h // 2, "width": w})
    n = len(ref_images)
    inputs = processor(
        images=[target] * n,
        prompt_images=ref_images,
        prompt_masks=[m.astype(np.uint8) for m in ref_masks],
        num_labels=1,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = backbone.model(**inputs, feature_ensemble=ensemble, embedding_type=embedding_type)
    size = (target.height, target.width)
    labels = processor.post_process_semantic_segmentation(
        out, target_sizes=[size] * n, num_labels=1
    )[0]
    pred = out.pred_masks[:1, :, h // 2 :]
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    painted = torch.clip((pred * std + mean) * 255, 0, 255).mean(dim=1, keepdim=True)
    fg = F.interpolate(painted, size=size, mode="nearest")[0, 0] / 255
    return labels, fg


def _spy(monkeypatch: pytest.MonkeyPatch, backbone: SegGptBackbone) -> list[dict]:
    calls: list[dict] = []
    forward = backbone.model.forward

    def recording(**kwargs):
        calls.append(
            {
                "batch": kwargs["pixel_values"].shape[0],
                "feature_ensemble": kwargs.get("feature_ensemble"),
                "embedding_type": kwargs.get("embedding_type"),
            }
        )
        return forward(**kwargs)

    monkeypatch.setattr(backbone.model, "forward", recording)
    return calls


# ------------------------------------------------------------------------- parity


@pytest.mark.parametrize("orientation", ["landscape", "portrait"])
def test_one_reference_equals_transformers_pipeline(tiny, images, orientation):
    target = images[orientation]
    ref_images, ref_masks = _refs(images, 1)
    (pred,) = tiny.segment(ref_images, ref_masks, [target])
    labels, fg = _direct(tiny, ref_images, ref_masks, target, ensemble=False)
    assert pred.mask.shape == pred.foreground.shape == (target.height, target.width)
    assert pred.mask.dtype == torch.bool
    assert torch.equal(pred.mask, labels == 1)
    assert 0.05 < pred.mask.float().mean() < 0.95  # random weights still paint both classes
    torch.testing.assert_close(pred.foreground, fg)
    assert ((pred.foreground > 0.5) == pred.mask).float().mean() > 0.999


def test_two_references_take_the_feature_ensemble(tiny, images, monkeypatch):
    target = images["portrait"]
    ref_images, ref_masks = _refs(images, 2)
    with_ensemble, fg = _direct(tiny, ref_images, ref_masks, target, ensemble=True)
    without, _ = _direct(tiny, ref_images, ref_masks, target, ensemble=False)
    assert not torch.equal(with_ensemble, without)  # the flag changes the answer

    calls = _spy(monkeypatch, tiny)
    (pred,) = tiny.segment(ref_images, ref_masks, [target])
    assert calls == [{"batch": 2, "feature_ensemble": True, "embedding_type": "instance"}]
    assert torch.equal(pred.mask, with_ensemble == 1)
    torch.testing.assert_close(pred.foreground, fg)


def test_several_targets_batch_with_one_reference(tiny, images, monkeypatch):
    targets = [images["landscape"], images["portrait"], images["ref-b"]]
    ref_images, ref_masks = _refs(images, 1)
    alone = [tiny.segment(ref_images, ref_masks, [t])[0] for t in targets]
    calls = _spy(monkeypatch, tiny)
    batched = tiny.segment(ref_images, ref_masks, targets, batch_size=2)
    assert [c["batch"] for c in calls] == [2, 1]
    assert all(c["feature_ensemble"] is False for c in calls)
    for t, a, b in zip(targets, alone, batched, strict=True):
        assert b.mask.shape == (t.height, t.width)
        assert torch.equal(a.mask, b.mask)
        torch.testing.assert_close(a.foreground, b.foreground)


def test_several_targets_with_two_references_run_one_ensemble_each(tiny, images, monkeypatch):
    targets = [images["landscape"], images["portrait"]]
    ref_images, ref_masks = _refs(images, 2)
    calls = _spy(monkeypatch, tiny)
    preds = tiny.segment(ref_images, ref_masks, targets)
    assert [(c["batch"], c["feature_ensemble"]) for c in calls] == [(2, True), (2, True)]
    for t, p in zip(targets, preds, strict=True):
        labels, _ = _direct(tiny, ref_images, ref_masks, t, ensemble=True)
        assert torch.equal(p.mask, labels == 1)


def test_semantic_embedding_type_reaches_the_model(tiny, images, monkeypatch):
    target = images["landscape"]
    ref_images, ref_masks = _refs(images, 1)
    labels, _ = _direct(
        tiny, ref_images, ref_masks, target, ensemble=False, embedding_type="semantic"
    )
    calls = _spy(monkeypatch, tiny)
    (pred,) = tiny.segment(ref_images, ref_masks, [target], embedding_type="semantic")
    assert calls[0]["embedding_type"] == "semantic"
    assert torch.equal(pred.mask, labels == 1)
    with pytest.raises(PromptError, match="embedding_type"):
        tiny.segment(ref_images, ref_masks, [target], embedding_type="panoptic")  # type: ignore[arg-type]


def test_masks_as_zero_one_integers_equal_bool_masks(tiny, images):
    target = images["landscape"]
    ref_images, ref_masks = _refs(images, 1)
    (as_bool,) = tiny.segment(ref_images, ref_masks, [target])
    (as_int,) = tiny.segment(ref_images, [ref_masks[0].astype(np.int64)], [target])
    assert torch.equal(as_bool.mask, as_int.mask)


# ---------------------------------------------------------------------- segmenter


def test_personalize_results_at_original_size(tiny, images, photos_dir):
    segmenter = SegGptSegmenter(tiny)
    ref_images, ref_masks = _refs(images, 2)
    gray = images["portrait"].convert("L")
    results = segmenter.personalize(
        list(zip(ref_images, ref_masks, strict=True)),
        [images["landscape"], gray, photos_dir / "rocket.png"],
    )
    assert len(results) == 3
    rocket = Image.open(photos_dir / "rocket.png")
    sizes = [(60, 91), (91, 60), (rocket.height, rocket.width)]
    for result, size in zip(results, sizes, strict=True):
        assert isinstance(result, InContextMask)
        assert result.mask.shape == result.foreground.shape == size
        assert result.mask.dtype == np.bool_
        assert result.foreground.dtype == np.float32
        expected = result.foreground[result.mask].mean() if result.mask.any() else 0.0
        assert result.score == pytest.approx(float(expected))
        assert 0.5 <= result.score <= 1.0 or not result.mask.any()
    (direct,) = tiny.segment(ref_images, ref_masks, [images["landscape"]])
    assert np.array_equal(results[0].mask, direct.mask.numpy())
    assert segmenter.personalize(list(zip(ref_images, ref_masks, strict=True)), []) == []


def test_personalize_refuses_bad_references(tiny, images):
    segmenter = SegGptSegmenter(tiny)
    ref = images["ref-a"]
    target = [images["landscape"]]
    good = _box_mask(ref, (0.2, 0.2, 0.6, 0.6))
    with pytest.raises(PromptError, match="at least one reference"):
        segmenter.personalize([], target)
    with pytest.raises(PromptError, match="reference mask 0 is empty"):
        segmenter.personalize([(ref, np.zeros_like(good))], target)
    with pytest.raises(PromptError, match=r"reference mask 1: size 80 x 59 .* 80 x 60"):
        segmenter.personalize([(ref, good), (ref, good[:-1])], target)
    with pytest.raises(PromptError, match="H x W"):
        segmenter.personalize([(ref, np.stack([good] * 3, axis=-1))], target)
    with pytest.raises(PromptError, match="bool or 0/1"):
        segmenter.personalize([(ref, good.astype(np.uint8) * 255)], target)
    with pytest.raises(PromptError, match="2 reference images but 1 masks"):
        tiny.segment([ref, ref], [good], target)


# ------------------------------------------------------------------------ weights


def test_random_init_is_deterministic(tiny):
    again = load_backbone("seggpt:tiny", "none")
    assert again.fingerprint() == tiny.fingerprint()
    assert again.input_size == (32, 32)
    assert not any(p.requires_grad for p in again.parameters())


def test_local_weights_folder_round_trip(tiny, images, tmp_path):
    tiny.model.save_pretrained(tmp_path / "tiny")
    assert (tmp_path / "tiny" / "model.safetensors").is_file()
    loaded = load_backbone("seggpt:vit-large", str(tmp_path / "tiny"))
    assert loaded.fingerprint() == tiny.fingerprint()
    assert loaded.input_size == (32, 32)  # the processor follows the checkpoint's config
    ref_images, ref_masks = _refs(images, 1)
    a = tiny.segment(ref_images, ref_masks, [images["portrait"]])[0]
    b = loaded.segment(ref_images, ref_masks, [images["portrait"]])[0]
    assert torch.equal(a.mask, b.mask)


def test_wrong_model_type_and_bad_folders_are_refused(tiny, tmp_path):
    load_backbone("sam:tiny", "none").model.save_pretrained(tmp_path / "sam")
    with pytest.raises(WeightsError, match=r"holds a 'sam' model.*'seggpt'"):
        load_backbone("seggpt:vit-large", str(tmp_path / "sam"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match=r"config\.json"):
        load_backbone("seggpt:vit-large", str(tmp_path / "empty"))
    with pytest.raises(WeightsError, match="test architecture"):
        load_backbone("seggpt:tiny", "BAAI/seggpt-vit-large")
    with pytest.raises(WeightsError, match="no such file"):
        load_backbone("seggpt:vit-large", "./missing/weights.bin")
    with pytest.raises(UnknownNameError, match="seggpt:vit-large"):
        load_backbone("seggpt:vit-lrge", "none")


def test_checkpoint_with_missing_keys_is_refused(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "partial"
    tiny.model.save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    dropped = "decoder.decoder_pred.head.bias"
    assert dropped in state
    del state[dropped]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"missing keys.*head\.bias"):
        load_backbone("seggpt:vit-large", str(folder))
