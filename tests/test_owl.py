"""OWLv2 and OWL-ViT detector backbones against transformers' own processor + model pipeline."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import vprompt.backbones.owl as owl
from vprompt.backbones.detection import DETECTORS, DetectorBackbone, Exemplar, detector_spec
from vprompt.backbones.owl_configs import ARCHS, OwlKind
from vprompt.backbones.registry import load_backbone
from vprompt.detect.result import DetectionFilter, Detections, box_iou
from vprompt.errors import PromptError, UnknownNameError, WeightsError

KINDS = ("owlv2", "owlvit")
SIZES = ((96, 64), (64, 96))  # W x H, both orientations
QUERIES = ["a cat", "a photo of a dog", "remote control"]


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _model(backbone: owl.OwlBackbone) -> Any:
    """The wrapped transformers model (typed loosely: its methods are the library's)."""
    return backbone.model


def _owl(name: str, weights: str = "none") -> owl.OwlBackbone:
    backbone = load_backbone(name, weights)
    assert isinstance(backbone, owl.OwlBackbone)
    return backbone


@pytest.fixture(scope="module")
def tiny() -> dict[str, owl.OwlBackbone]:
    return {kind: _owl(f"{kind}:tiny") for kind in KINDS}


def _library_sizes(kind: OwlKind, w: int, h: int) -> list[tuple[int, int]]:
    """target_sizes for the library's post-processing: OWLv2's boxes are fractions of the
    padded square, so its target is the square's side both ways."""
    side = max(w, h)
    return [(side, side)] if kind == "owlv2" else [(h, w)]


def _clip(boxes: torch.Tensor, w: int, h: int) -> torch.Tensor:
    out = boxes.clone()
    out[:, 0::2] = out[:, 0::2].clamp(0, w)
    out[:, 1::2] = out[:, 1::2].clamp(0, h)
    return out


def _sorted(boxes: Any, scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    b, s, lab = (np.asarray(torch.as_tensor(x).detach().cpu()) for x in (boxes, scores, labels))
    order = np.lexsort((lab, -s))
    return b[order], s[order], lab[order]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", SIZES)
def test_text_detection_equals_the_library_pipeline(
    tiny: dict[str, owl.OwlBackbone], kind: OwlKind, size: tuple[int, int]
) -> None:
    backbone = tiny[kind]
    w, h = size
    image = _image(w, h)
    proc, model = backbone.processor, _model(backbone)
    inputs = proc(text=[QUERIES], images=image, return_tensors="pt")
    with torch.no_grad():
        lib = model(**inputs)
    ours = backbone.detect(image, queries=QUERIES)
    n = lib.pred_boxes.shape[1]
    assert ours.boxes.shape == (n, 4)
    assert ours.scores.shape == ours.labels.shape == (n,)

    # Every candidate, in the model's order: threshold below any sigmoid.
    every = proc.post_process_grounded_object_detection(
        lib, threshold=-1.0, target_sizes=_library_sizes(kind, w, h)
    )[0]
    torch.testing.assert_close(ours.boxes, _clip(every["boxes"], w, h), atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.scores, every["scores"], atol=1e-6, rtol=0)
    assert torch.equal(ours.labels, every["labels"])
    assert float(ours.boxes[:, 0::2].max()) <= w
    assert float(ours.boxes[:, 1::2].max()) <= h
    assert len(set(ours.labels.tolist())) > 1  # the comparison covers several labels

    # Thresholding our output reproduces the library's thresholded result.
    threshold = float(ours.scores.median()) + 1e-4
    kept = proc.post_process_grounded_object_detection(
        lib, threshold=threshold, target_sizes=_library_sizes(kind, w, h)
    )[0]
    dets = Detections.from_output(ours, queries=QUERIES, image_size=(w, h)).filtered(
        DetectionFilter(score_threshold=threshold, nms_iou=1.0, top_k=0)
    )
    assert 0 < len(dets) < n
    lb, ls, ll = _sorted(_clip(kept["boxes"], w, h), kept["scores"], kept["labels"])
    db, ds, dl = _sorted(dets.boxes, dets.scores, dets.labels)
    np.testing.assert_allclose(db, lb, atol=1e-4)
    np.testing.assert_allclose(ds, ls, atol=1e-6)
    np.testing.assert_array_equal(dl, ll)


@pytest.mark.parametrize("size", SIZES)
def test_owlv2_pads_bottom_right_and_boxes_map_back_to_the_image(
    tiny: dict[str, owl.OwlBackbone], size: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    backbone = tiny["owlv2"]
    w, h = size
    white = Image.new("RGB", (w, h), (255, 255, 255))
    pixels = backbone.processor(images=white, return_tensors="pt")["pixel_values"][0, 0]
    side = pixels.shape[-1]
    inside_h, inside_w = int(side * h / max(w, h)), int(side * w / max(w, h))
    # The image sits top-left; the padding (below or right of it) differs from white.
    assert torch.allclose(pixels[: inside_h - 1, : inside_w - 1], pixels[0, 0])
    pad = pixels[-1, -1]
    assert not torch.isclose(pad, pixels[0, 0])
    assert torch.allclose(pixels[inside_h + 2 :, :], pad) if h < w else True
    assert torch.allclose(pixels[:, inside_w + 2 :], pad) if w < h else True

    # A predicted box covering exactly the image region of the padded square maps to the
    # image's bounds; one reaching into the padding is clipped to them.
    s = float(max(w, h))
    region = torch.tensor([w / s / 2, h / s / 2, w / s, h / s])
    beyond = torch.tensor([0.5, 0.5, 1.0, 1.0])
    model = _model(backbone)
    predictor = model.box_predictor

    def fake(features: torch.Tensor, feature_map: torch.Tensor) -> torch.Tensor:
        boxes = predictor(features, feature_map)
        boxes[0, 0], boxes[0, 1] = region, beyond
        return boxes

    monkeypatch.setattr(model, "box_predictor", fake)
    backbone.clear_cache()
    boxes = backbone.embed(_image(w, h)).pixel_boxes
    backbone.clear_cache()
    torch.testing.assert_close(boxes[0], torch.tensor([0.0, 0.0, w, h]), atol=1e-4, rtol=0)
    torch.testing.assert_close(boxes[1], torch.tensor([0.0, 0.0, w, h]), atol=1e-4, rtol=0)


def test_owlvit_stretches_and_boxes_scale_per_axis(
    tiny: dict[str, owl.OwlBackbone], monkeypatch: pytest.MonkeyPatch
) -> None:
    backbone = tiny["owlvit"]
    w, h = 96, 64
    model = _model(backbone)
    predictor = model.box_predictor

    def fake(features: torch.Tensor, feature_map: torch.Tensor) -> torch.Tensor:
        boxes = predictor(features, feature_map)
        boxes[0, 0] = torch.tensor([0.5, 0.5, 1.0, 1.0])
        boxes[0, 1] = torch.tensor([0.25, 0.75, 0.5, 0.5])
        return boxes

    monkeypatch.setattr(model, "box_predictor", fake)
    backbone.clear_cache()
    boxes = backbone.embed(_image(w, h)).pixel_boxes
    backbone.clear_cache()
    torch.testing.assert_close(boxes[0], torch.tensor([0.0, 0.0, 96.0, 64.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(boxes[1], torch.tensor([0.0, 32.0, 48.0, 64.0]), atol=1e-4, rtol=0)


def _alphas(scores: np.ndarray) -> np.ndarray:
    """transformers' display rescaling in post_process_image_guided_detection."""
    top = scores.max() + 1e-6
    return np.clip((scores - top * 0.1) / (top * 0.9), 0.0, 1.0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", SIZES)
def test_whole_reference_exemplar_equals_library_image_guided_detection(
    tiny: dict[str, owl.OwlBackbone], kind: OwlKind, size: tuple[int, int]
) -> None:
    """An exemplar box covering the whole reference image is transformers' OWL-ViT
    image-guided path. OWLv2's own image_guided_detection takes the top-objectness box
    instead, so for it the library's OWL-ViT query rule is run on the OWLv2 model (a square
    reference, where the whole image is the unit box of the padded frame too)."""
    import transformers as tf

    backbone = tiny[kind]
    model, proc = _model(backbone), backbone.processor
    w, h = size
    target = _image(w, h, seed=1)
    reference = _image(64, 64, seed=2) if kind == "owlv2" else _image(h, w, seed=2)
    rw, rh = reference.size
    inputs = proc(images=target, query_images=reference, return_tensors="pt")
    rule = functools.partial(tf.OwlViTForObjectDetection.embed_image_query, model)
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        if kind == "owlv2":
            mp.setattr(model, "embed_image_query", rule)
        lib = model.image_guided_detection(**inputs)
    ours = backbone.detect(target, exemplars=[Exemplar(reference, (0, 0, rw, rh))])

    # Raw candidates: one per predicted box, the exemplar's label 0.
    from transformers.image_transforms import center_to_corners_format

    scale = torch.tensor(_library_sizes(kind, w, h)[0][::-1] * 2, dtype=torch.float32)
    lib_corners = torch.as_tensor(center_to_corners_format(lib.target_pred_boxes[0]))
    lib_boxes = _clip(lib_corners * scale, w, h)
    torch.testing.assert_close(ours.boxes, lib_boxes, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.scores, torch.sigmoid(lib.logits[0, :, 0]), atol=1e-6, rtol=0)
    assert not ours.labels.any()

    # Post-processing: NMS at 0.3 then the display rescaling. The library suppresses on its
    # unclipped boxes, ours on clipped ones, so it gets the clipped boxes back in its format.
    norm = lib_boxes / scale
    clipped = torch.stack(
        [
            (norm[:, 0] + norm[:, 2]) / 2,
            (norm[:, 1] + norm[:, 3]) / 2,
            *(norm[:, 2:] - norm[:, :2]).T,
        ]
    ).T
    lib.target_pred_boxes = clipped[None]
    post = proc.post_process_image_guided_detection(
        lib,
        threshold=0.0,
        nms_threshold=owl.IMAGE_GUIDED_NMS_IOU,
        target_sizes=torch.tensor(_library_sizes(kind, w, h)),
    )[0]
    dets = Detections.from_output(ours, queries=["exemplar 0"], image_size=(w, h)).filtered(
        DetectionFilter(score_threshold=0.0, nms_iou=owl.IMAGE_GUIDED_NMS_IOU, top_k=0)
    )
    assert 1 < len(dets) < ours.scores.numel()  # NMS removed some, kept several
    alphas = _alphas(dets.scores)
    shown = alphas > 0
    lb, ls, _ = _sorted(post["boxes"], post["scores"], np.zeros(len(post["scores"])))
    db, ds, _ = _sorted(dets.boxes[shown], alphas[shown], np.zeros(int(shown.sum())))
    np.testing.assert_allclose(ds, ls, atol=1e-5)
    np.testing.assert_allclose(db, lb, atol=1e-4)


def _hand_selection(box_px, size, pads, pred_boxes, class_embeds):  # type: ignore[no-untyped-def]
    """The scenic notebook's rule written out in numpy."""
    w, h = size
    scale = np.array([max(w, h)] * 4 if pads else [w, h, w, h], np.float64)
    query = np.asarray(box_px, np.float64) / scale
    p = pred_boxes.double().numpy()
    pred = np.stack(
        [
            p[:, 0] - p[:, 2] / 2,
            p[:, 1] - p[:, 3] / 2,
            p[:, 0] + p[:, 2] / 2,
            p[:, 1] + p[:, 3] / 2,
        ],
        1,
    )
    ious = box_iou(query[None], pred)[0]
    candidates = np.flatnonzero(ious >= ious.max() * 0.8)
    emb = class_embeds.double().numpy()
    sims = emb[candidates] @ emb.mean(axis=0)
    return int(candidates[np.argmin(sims)]), candidates, ious


@pytest.mark.parametrize("kind", KINDS)
def test_exemplar_box_picks_the_most_atypical_of_the_best_overlaps(
    tiny: dict[str, owl.OwlBackbone], kind: OwlKind
) -> None:
    backbone = tiny[kind]
    reference = _image(64, 96, seed=3)
    ref = backbone.embed(reference)
    several = differs = 0
    boxes = [
        (float(x0), float(y0), float(min(x0 + bw, 64)), float(min(y0 + bh, 96)))
        for x0 in (0, 12, 24, 40)
        for y0 in (0, 20, 40, 60)
        for bw, bh in ((16, 24), (40, 30), (64, 96))
    ]
    for box in boxes:
        expected, candidates, ious = _hand_selection(
            box, reference.size, backbone.pads_to_square, ref.boxes, ref.class_embeds
        )
        if ious.max() == 0:
            with pytest.raises(PromptError, match="overlaps it"):
                backbone.exemplar_query(Exemplar(reference, box), ref)
            continue
        embedding, index = backbone.exemplar_query(Exemplar(reference, box), ref)
        assert index == expected, box
        assert torch.equal(embedding, ref.class_embeds[expected])
        several += int(candidates.size >= 2)
        differs += int(index != int(np.argmax(ious)))
    # The rule chose among several boxes, and not always the best-overlapping one.
    assert several
    assert differs


@pytest.mark.parametrize("kind", KINDS)
def test_exemplar_on_the_target_finds_its_own_box_first(kind: OwlKind) -> None:
    """With the class head's per-box shift and scale zeroed, a box's logit is the cosine
    between its class embedding and the query, so the exemplar's own box scores highest."""
    backbone = _owl(f"{kind}:tiny")
    head = _model(backbone).class_head
    with torch.no_grad():
        for layer in (head.logit_shift, head.logit_scale):
            layer.weight.zero_()
            layer.bias.zero_()
    image = _image(96, 64, seed=4)
    emb = backbone.embed(image)
    area = (emb.pixel_boxes[:, 2:] - emb.pixel_boxes[:, :2]).prod(dim=1)
    x0, y0, x1, y1 = (float(v) for v in emb.pixel_boxes[int(area.argmax())])
    box = (x0, y0, x1, y1)
    _, chosen = backbone.exemplar_query(Exemplar(image, box))
    out = backbone.detect(emb, queries=["a cat"], exemplars=[Exemplar(image, box)])
    mine = out.scores * (out.labels == 1)
    assert int(mine.argmax()) == chosen
    assert box_iou(out.boxes[chosen].numpy(), np.array(box))[0, 0] > 0


def test_exemplars_and_text_mix_with_labels_in_order(tiny: dict[str, owl.OwlBackbone]) -> None:
    backbone = tiny["owlv2"]
    image, other = _image(96, 64, seed=5), _image(64, 96, seed=6)
    exemplars = [Exemplar(image, (10, 10, 60, 50)), Exemplar(other, (5, 5, 50, 80))]
    out = backbone.detect(image, queries=QUERIES[:2], exemplars=exemplars)
    text = backbone.detect(image, queries=QUERIES[:2])
    q = torch.stack([backbone.exemplar_query(ex)[0] for ex in exemplars])
    emb = backbone.embed(image)
    logits, _ = _model(backbone).class_predictor(
        emb.features[None], torch.cat([backbone.encode_queries(QUERIES[:2]), q])[None]
    )
    best = logits[0].max(-1)
    assert torch.equal(out.labels, best.indices)
    torch.testing.assert_close(out.scores, torch.sigmoid(best.values), atol=1e-6, rtol=0)
    assert set(out.labels.tolist()) <= {0, 1, 2, 3}
    assert out.labels.max() >= 2
    # Text-only scores are never above the mixed ones (the max runs over more queries).
    assert bool((out.scores >= text.scores - 1e-6).all())


def test_an_embedding_scores_many_query_sets_without_the_vision_tower(
    tiny: dict[str, owl.OwlBackbone], monkeypatch: pytest.MonkeyPatch
) -> None:
    backbone = tiny["owlvit"]
    image = _image(64, 96, seed=7)
    backbone.clear_cache()
    direct = backbone.detect(image, queries=QUERIES)
    calls: list[int] = []
    embedder = _model(backbone).image_embedder

    def counted(**kwargs: Any) -> Any:
        calls.append(1)
        return embedder(**kwargs)

    monkeypatch.setattr(backbone.model, "image_embedder", counted)
    emb = backbone.embed(image.copy())  # same pixels, another object: the cached embedding
    again = backbone.detect(emb, queries=QUERIES)
    backbone.detect(emb, queries=["a cat"], exemplars=[Exemplar(image, (0, 0, 40, 40))])
    backbone.detect(image, queries=["a dog"])
    assert calls == []  # neither the embedding, the exemplar nor a new query set reran it
    assert torch.equal(direct.scores, again.scores)
    assert torch.equal(direct.boxes, again.boxes)
    backbone.clear_cache()
    backbone.detect(image, queries=["a dog"])
    assert calls == [1]


@pytest.mark.parametrize("kind", KINDS)
def test_query_errors_are_one_line(tiny: dict[str, owl.OwlBackbone], kind: OwlKind) -> None:
    backbone = tiny[kind]
    image = _image(96, 64)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"queries": ["cat", "   "]}, "empty"),
        ({"queries": ["cat " * 15]}, "at most 16"),
        ({}, "nothing to look for"),
        ({"exemplars": [Exemplar(image, (0, 0, 10, 10), positive=False)]}, "negative"),
    ]
    for kwargs, words in cases:
        with pytest.raises(PromptError, match=words) as err:
            backbone.detect(image, **kwargs)
        assert "\n" not in str(err.value)
    assert backbone.detect(image, queries=["cat " * 14]).scores.numel() == 16  # 14 + 2 fit
    with pytest.raises(PromptError, match="outside the 96x64 image"):
        Exemplar(image, (50, 10, 120, 30))


def test_an_exemplar_no_predicted_box_overlaps_is_refused(tiny: dict[str, owl.OwlBackbone]) -> None:
    backbone = tiny["owlv2"]
    image = _image(96, 64)
    box = (0.0, 0.0, 2.0, 2.0)
    emb = backbone.embed(image)
    assert box_iou(np.array(box), emb.pixel_boxes.numpy()).max() == 0  # precondition
    with pytest.raises(PromptError, match=r"exemplar box \(0,0,2,2\).*overlaps") as err:
        backbone.detect(emb, exemplars=[Exemplar(image, box)])
    assert "\n" not in str(err.value)


def test_weight_source_errors(tmp_path: Path, tiny: dict[str, owl.OwlBackbone]) -> None:
    with pytest.raises(WeightsError, match="test architecture"):
        load_backbone("owlv2:tiny", "google/owlv2-base-patch16")
    with pytest.raises(WeightsError, match=r"no config\.json"):
        load_backbone("owlv2:base-patch16", str(tmp_path))
    _model(tiny["owlvit"]).save_pretrained(tmp_path / "model-only")
    with pytest.raises(WeightsError, match=r"preprocessor_config\.json") as err:
        load_backbone("owlvit:base-patch32", str(tmp_path / "model-only"))
    assert "\n" not in str(err.value)
    _model(tiny["owlvit"]).save_pretrained(tmp_path / "vit")
    tiny["owlvit"].processor.save_pretrained(tmp_path / "vit")
    with pytest.raises(WeightsError, match=r"'owlvit'.*'owlv2'"):
        load_backbone("owlv2:base-patch16", str(tmp_path / "vit"))
    # A processor that hands the model anything but the whole image at its input size.
    owl.random_processor("owlvit", 32).save_pretrained(tmp_path / "vit")
    with pytest.raises(WeightsError, match="resizes images to 32x32, but owlvit:base-patch32"):
        load_backbone("owlvit:base-patch32", str(tmp_path / "vit"))
    cropping = owl.random_processor("owlvit", 64)
    cropping.image_processor.do_center_crop = True
    cropping.image_processor.crop_size = {"height": 48, "width": 48}
    cropping.save_pretrained(tmp_path / "vit")
    with pytest.raises(WeightsError, match="center-crops"):
        load_backbone("owlvit:base-patch32", str(tmp_path / "vit"))
    with pytest.raises(UnknownNameError):
        load_backbone("owlv2:base-patch99", "none")


@pytest.mark.parametrize("kind", KINDS)
def test_same_weights_twice_and_a_saved_folder_give_identical_outputs(
    tmp_path: Path, tiny: dict[str, owl.OwlBackbone], kind: OwlKind
) -> None:
    first = tiny[kind]
    second = _owl(f"{kind}:tiny")
    image = _image(96, 64, seed=8)
    ex = [Exemplar(image, (10, 5, 70, 50))]
    a = first.detect(image, queries=QUERIES, exemplars=ex)
    b = second.detect(image, queries=QUERIES, exemplars=ex)
    assert first.fingerprint() == second.fingerprint()
    for x, y in ((a.boxes, b.boxes), (a.scores, b.scores), (a.labels, b.labels)):
        assert torch.equal(x, y)

    _model(first).save_pretrained(tmp_path)
    first.processor.save_pretrained(tmp_path)
    real = next(arch for arch in ARCHS[kind] if arch != "tiny")  # a real name, the folder's weights
    loaded = _owl(f"{kind}:{real}", str(tmp_path))
    assert loaded.weights == str(tmp_path)
    assert loaded.fingerprint() == first.fingerprint()
    c = loaded.detect(image, queries=QUERIES, exemplars=ex)
    for x, y in ((a.boxes, c.boxes), (a.scores, c.scores), (a.labels, c.labels)):
        assert torch.equal(x, y)


def test_registration_and_real_sizes_build_from_config() -> None:
    families: tuple[tuple[OwlKind, str, set[str]], ...] = (
        ("owlv2", "owlv2:base-patch16-ensemble", {"base-patch16", "large-patch14-ensemble"}),
        ("owlvit", "owlvit:base-patch32", {"base-patch16", "large-patch14"}),
    )
    for kind, default, archs in families:
        spec = detector_spec(f"{kind}:tiny")
        assert spec is DETECTORS.get(kind)
        assert (spec.default_model, spec.tiny_model) == (default, f"{kind}:tiny")
        assert spec.score_threshold == 0.1
        assert spec.capabilities.max_query_tokens == 16
        assert spec.capabilities.exemplars
        assert archs <= set(owl.CATALOGUES[kind].list_archs())
    assert isinstance(load_backbone("owlvit:tiny", "none"), DetectorBackbone)
    # Real architectures: the configs build the published shapes (on the meta device, so
    # no memory and no download); parameter counts of the released checkpoints.
    expected: dict[tuple[OwlKind, str], tuple[float, int]] = {
        ("owlv2", "base-patch16-ensemble"): (155.0e6, 60),
        ("owlv2", "large-patch14"): (437.6e6, 72),
        ("owlvit", "base-patch32"): (153.2e6, 24),
        ("owlvit", "large-patch14"): (433.9e6, 60),
    }
    for (kind, arch), (params, grid) in expected.items():
        model_cls, config_cls, _, _ = owl._classes(kind)
        with torch.device("meta"):
            model = model_cls(config_cls(**ARCHS[kind][arch].config))
        count = sum(p.numel() for p in model.parameters())
        assert abs(count - params) / params < 0.01
        assert model.num_patches_height == grid
