"""Every registered detector keeps the detector contract on its tiny model: the declared
capabilities are the ones it has, boxes are in the original image's pixels, scores in [0, 1],
labels count the queries then the exemplars, masks match the image, same input same output,
and the Finder post-processes it like any other."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vprompt.backbones  # noqa: F401  (registers every family)
from vprompt.backbones.detection import DETECTORS, DetectorBackbone, DetectorOutput, Exemplar
from vprompt.backbones.registry import load_backbone, split_name
from vprompt.detect import DetectionFilter, Finder
from vprompt.errors import PromptError

NAMES = [n for n in DETECTORS.names() if not n.startswith(("fake", "fakedet"))]
_BUILT: dict[str, DetectorBackbone] = {}


def _detector(name: str) -> DetectorBackbone:
    if name not in _BUILT:
        spec = DETECTORS.get(name)
        backbone = load_backbone(spec.tiny_model, "none", device="cpu")
        assert isinstance(backbone, DetectorBackbone)
        _BUILT[name] = backbone
    return _BUILT[name]


def _image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8))


def test_the_six_detector_families_are_registered() -> None:
    assert set(NAMES) >= {
        "owlv2",
        "owlvit",
        "grounding-dino",
        "mm-grounding-dino",
        "clipseg",
        "sam3",
    }


@pytest.mark.parametrize("name", NAMES)
def test_spec_names_real_architectures(name: str) -> None:
    spec = DETECTORS.get(name)
    for model in (spec.default_model, spec.tiny_model):
        family, arch = split_name(model)
        assert family.name == name
        assert arch in family.tiny if model == spec.tiny_model else arch not in family.tiny
    assert 0 <= spec.score_threshold <= 1
    assert 0 < spec.nms_iou <= 1


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [(96, 64), (64, 96)])
def test_detect_keeps_the_contract(name: str, size: tuple[int, int]) -> None:
    detector = _detector(name)
    spec = DETECTORS.get(name)
    caps = detector.capabilities
    assert caps == spec.capabilities
    w, h = size
    image = _image(w, h, seed=w)
    queries = ["a cat", "a red mug"] if caps.text else []
    exemplars = [Exemplar(image, (5.0, 6.0, 40.0, 50.0))] if caps.exemplars else []
    if caps.negative_exemplars:
        queries = queries[:1]
    out = detector.detect(image, queries=queries, exemplars=exemplars)
    assert isinstance(out, DetectorOutput)
    n = out.scores.shape[0]
    assert out.boxes.shape == (n, 4)
    assert out.labels.shape == (n,)
    boxes = out.boxes.float()
    assert torch.all(boxes[:, 0] >= 0)
    assert torch.all(boxes[:, 2] <= w)
    assert torch.all(boxes[:, 1] >= 0)
    assert torch.all(boxes[:, 3] <= h)
    assert torch.all(boxes[:, 0] <= boxes[:, 2])
    assert torch.all(boxes[:, 1] <= boxes[:, 3])
    assert torch.all((out.scores >= 0) & (out.scores <= 1))
    n_labels = len(queries) + (
        len(exemplars) if not caps.negative_exemplars else int(not queries and bool(exemplars))
    )
    assert n_labels > 0
    if n:
        assert int(out.labels.min()) >= 0
        assert int(out.labels.max()) < n_labels
    if caps.masks:
        assert out.masks is not None
        assert out.masks.shape == (n, h, w)
        assert out.masks.dtype == torch.bool
    else:
        assert out.masks is None
    again = detector.detect(image, queries=queries, exemplars=exemplars)
    assert torch.equal(out.scores, again.scores)
    assert torch.equal(out.boxes, again.boxes)


@pytest.mark.parametrize("name", NAMES)
def test_undeclared_inputs_are_refused(name: str) -> None:
    detector = _detector(name)
    caps = detector.capabilities
    image = _image(64, 48, seed=1)
    if not caps.exemplars:
        with pytest.raises(PromptError):
            detector.detect(image, queries=["a cat"], exemplars=[Exemplar(image, (1, 1, 20, 20))])
    if not caps.negative_exemplars and caps.exemplars:
        negative = Exemplar(image, (1, 1, 20, 20), positive=False)
        with pytest.raises(PromptError):
            detector.detect(image, exemplars=[negative])
    with pytest.raises(PromptError):
        detector.detect(image, queries=["   "] if caps.text else [])


@pytest.mark.parametrize("name", NAMES)
def test_finder_filters_every_detector_alike(name: str) -> None:
    spec = DETECTORS.get(name)
    finder = Finder(detector=_detector(name), spec=spec)
    image = _image(80, 60, seed=5)
    query = ["a cat"] if spec.capabilities.text else []
    examples = [] if query else [Exemplar(image, (5, 5, 40, 40))]
    everything = finder.find(
        image, queries=query, exemplars=examples, filter=DetectionFilter(0.0, 1.0, top_k=0)
    )
    top = finder.find(
        image, queries=query, exemplars=examples, filter=DetectionFilter(0.0, 1.0, top_k=3)
    )
    assert len(top) == min(3, len(everything))
    np.testing.assert_array_equal(top.scores, everything.scores[: len(top)])
    assert np.all(np.diff(everything.scores) <= 0)
    default = finder.find(image, queries=query, exemplars=examples)
    assert np.all(default.scores >= spec.score_threshold)
