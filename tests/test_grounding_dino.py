"""``grounding-dino:`` and ``mm-grounding-dino:``: parity with transformers' own processor,
model and ``post_process_grounded_object_detection`` on tiny random weights, the caption and
its token → query map, errors, and the weight sources."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import vprompt.backbones.grounding_dino as gd
from vprompt.backbones.detection import DETECTORS, DetectorBackbone, Exemplar
from vprompt.backbones.grounding_dino_configs import (
    GROUNDING_DINO_ARCHS,
    MM_GROUNDING_DINO_ARCHS,
)
from vprompt.backbones.registry import load_backbone
from vprompt.errors import PromptError, WeightsError

QUERIES = ["a cat", "remote control", "the striped cat on the left"]


@pytest.fixture(scope="module")
def backbones() -> dict[str, gd.GroundingDinoBackbone]:
    return {
        family: load_backbone(f"{family}:tiny", "none")  # type: ignore[misc]
        for family in ("grounding-dino", "mm-grounding-dino")
    }


@pytest.fixture(scope="module")
def images() -> dict[str, Image.Image]:
    import skimage.data

    cat = Image.fromarray(skimage.data.chelsea())
    return {"landscape": cat.resize((96, 64)), "portrait": cat.resize((64, 96))}


def _library(backbone: gd.GroundingDinoBackbone, image: Image.Image, queries: list[str]):
    """transformers' own pipeline: processor → model → post-processing (every box kept)."""
    processor = backbone.processor
    inputs = processor(images=image, text=queries, return_tensors="pt")
    with torch.no_grad():
        out = backbone.model(**inputs)
    result = processor.post_process_grounded_object_detection(
        out,
        inputs["input_ids"],
        threshold=-1.0,
        text_threshold=0.25,
        target_sizes=[(image.height, image.width)],
    )[0]
    return inputs, out, result


def _expected_labels(input_ids: torch.Tensor, logits: torch.Tensor, backbone) -> torch.Tensor:
    """The query holding each box's best non-delimiter token, found by counting the "."
    tokens before it (independent of character offsets)."""
    tok = backbone.processor.tokenizer
    delimiters = torch.tensor(tok.convert_tokens_to_ids(["[CLS]", "[SEP]", "."]))
    ids = input_ids[0]
    probs = logits[0, :, : ids.shape[0]].sigmoid()
    probs[:, torch.isin(ids, delimiters)] = -1
    best = probs.argmax(dim=-1)
    dots = (ids == tok.convert_tokens_to_ids(".")).long().cumsum(0)
    return dots[best]


@pytest.mark.parametrize("family", ["grounding-dino", "mm-grounding-dino"])
@pytest.mark.parametrize("shape", ["landscape", "portrait"])
def test_candidates_match_library_post_processing(backbones, images, family, shape):
    backbone, image = backbones[family], images[shape]
    ours = backbone.detect(image, queries=QUERIES)
    inputs, out, lib = _library(backbone, image, QUERIES)
    text, _ = backbone.encode_caption(QUERIES)
    assert torch.equal(text["input_ids"], inputs["input_ids"])  # the same caption
    n = backbone.model.config.num_queries
    assert ours.boxes.shape == (n, 4)
    assert ours.scores.shape == ours.labels.shape == (n,)
    torch.testing.assert_close(ours.scores, lib["scores"], rtol=0, atol=1e-6)
    w, h = image.size
    clipped = lib["boxes"].clone()
    clipped[:, 0::2] = clipped[:, 0::2].clamp(0, w)
    clipped[:, 1::2] = clipped[:, 1::2].clamp(0, h)
    torch.testing.assert_close(ours.boxes, clipped, rtol=0, atol=1e-4)
    expected = _expected_labels(inputs["input_ids"], out.logits, backbone)
    assert torch.equal(ours.labels, expected)
    assert len(set(expected.tolist())) >= 2  # the map is exercised, not all label 0
    assert ours.masks is None


def test_caption_and_token_owners(backbones):
    backbone = backbones["grounding-dino"]
    caption, spans = gd.build_caption(["Dog", "hot dog.", "zebrafishy"])
    assert caption == "dog. hot dog. zebrafishy."
    assert [caption[s:e] for s, e in spans] == ["dog", "hot dog", "zebrafishy"]
    text, owners = backbone.encode_caption(["Dog", "hot dog.", "zebrafishy"])
    tokens = backbone.processor.tokenizer.convert_ids_to_tokens(text["input_ids"][0])
    by_query = {
        k: [t for t, o in zip(tokens, owners.tolist(), strict=True) if o == k] for k in range(3)
    }
    assert by_query[0] == ["dog"]
    assert by_query[1] == ["hot", "dog"]  # the second "dog" belongs to its own query
    assert "".join(t.removeprefix("##") for t in by_query[2]) == "zebrafishy"
    rest = [t for t, o in zip(tokens, owners.tolist(), strict=True) if o == -1]
    assert rest == ["[CLS]", ".", ".", ".", "[SEP]"]


def test_model_splits_at_the_tokenizers_delimiters(backbones):
    # The random-init tokenizer's ids differ from bert-base-uncased's hard-coded ones.
    backbone = backbones["grounding-dino"]
    tok = backbone.processor.tokenizer
    expected = tok.convert_tokens_to_ids(["[CLS]", "[SEP]", ".", "?"])
    assert backbone.model.model.special_tokens.tolist() == expected


def test_bad_queries_and_exemplars_are_refused(backbones, images):
    backbone, image = backbones["grounding-dino"], images["landscape"]
    with pytest.raises(PromptError, match="at least one text query"):
        backbone.detect(image)
    with pytest.raises(PromptError, match="empty"):
        backbone.detect(image, queries=["cat", "  "])
    with pytest.raises(PromptError, match=r"'\.' or '\?'"):
        backbone.detect(image, queries=["st. bernard"])
    with pytest.raises(PromptError, match="no exemplars"):
        backbone.detect(image, queries=["cat"], exemplars=[Exemplar(image, (1, 1, 20, 20))])
    with pytest.raises(PromptError, match="at most 127"):
        backbone.detect(image, queries=["cat"] * 128)


def test_caption_over_the_text_limit_names_the_query(backbones, images):
    backbone, image = backbones["grounding-dino"], images["landscape"]
    tok = backbone.processor.tokenizer
    queries = [f"red car number {i}" for i in range(60)]
    # Independent count: [CLS], each query's tokens and its ".", then [SEP].
    used, first_over = 1, None
    for i, q in enumerate(queries):
        used += len(tok.tokenize(q)) + 1
        if used + 1 > 256 and first_over is None:
            first_over = i
    assert first_over is not None
    with pytest.raises(PromptError, match=f"query '{queries[first_over]}' does not fit"):
        backbone.detect(image, queries=queries)
    # Just under the limit still runs: no silent truncation either way.
    assert backbone.detect(image, queries=queries[:first_over]).scores.shape == (10,)


def test_trailing_period_changes_nothing(backbones, images):
    backbone, image = backbones["mm-grounding-dino"], images["portrait"]
    a = backbone.detect(image, queries=["a cat", "remote control"])
    b = backbone.detect(image, queries=["a cat.", "Remote control"])
    assert torch.equal(a.scores, b.scores)
    assert torch.equal(a.labels, b.labels)


def test_same_weights_twice_give_identical_outputs(backbones, images):
    again = load_backbone("grounding-dino:tiny", "none")
    assert isinstance(again, DetectorBackbone)
    assert again.fingerprint() == backbones["grounding-dino"].fingerprint()
    assert not any(p.requires_grad for p in again.parameters())
    a = again.detect(images["portrait"], queries=QUERIES)
    b = backbones["grounding-dino"].detect(images["portrait"], queries=QUERIES)
    assert torch.equal(a.boxes, b.boxes)
    assert torch.equal(a.scores, b.scores)
    assert torch.equal(a.labels, b.labels)


def test_local_folder_round_trip(backbones, images, tmp_path):
    tiny = backbones["mm-grounding-dino"]
    folder = tmp_path / "mm"
    tiny.model.save_pretrained(folder)
    tiny.processor.save_pretrained(folder)
    loaded = load_backbone("mm-grounding-dino:swin-t", str(folder))
    assert loaded.fingerprint() == tiny.fingerprint()
    a = loaded.detect(images["landscape"], queries=QUERIES)
    b = tiny.detect(images["landscape"], queries=QUERIES)
    assert torch.equal(a.boxes, b.boxes)
    assert torch.equal(a.scores, b.scores)
    assert torch.equal(a.labels, b.labels)
    with pytest.raises(WeightsError, match=r"holds a 'mm-grounding-dino' model"):
        load_backbone("grounding-dino:swin-t", str(folder))
    bare = tmp_path / "bare"
    tiny.model.save_pretrained(bare)
    with pytest.raises(WeightsError, match="save the processor"):
        load_backbone("mm-grounding-dino:swin-t", str(bare))
    with pytest.raises(WeightsError, match="test architecture"):
        load_backbone("grounding-dino:tiny", "IDEA-Research/grounding-dino-tiny")


@pytest.mark.parametrize(
    ("kind", "archs"),
    [("grounding-dino", GROUNDING_DINO_ARCHS), ("mm-grounding-dino", MM_GROUNDING_DINO_ARCHS)],
)
def test_real_architectures_build_from_configs(kind, archs):
    # On the meta device: the shapes of a --weights none build, without the seconds of init.
    sizes = {}
    for arch, spec in archs.items():
        if not spec.hub_id:
            continue
        with torch.device("meta"):
            model = gd.model_class(kind)(gd.random_config(kind, spec))
        sizes[arch] = sum(p.numel() for p in model.parameters()) / 1e6
    # Published sizes: Swin-T models about 172M parameters, Swin-B about 233M, Swin-L ~ 340M.
    for arch, millions in sizes.items():
        low, high = (
            (150, 200) if "swin-t" in arch else (200, 260) if "swin-b" in arch else (300, 400)
        )
        assert low < millions < high, (arch, millions)


def test_registered_detectors():
    spec = DETECTORS.get("grounding-dino")
    assert (spec.default_model, spec.tiny_model) == ("grounding-dino:swin-t", "grounding-dino:tiny")
    assert (spec.score_threshold, spec.nms_iou) == (0.35, 1.0)
    assert spec.capabilities.phrases
    assert not spec.capabilities.exemplars
    assert spec.capabilities.max_query_tokens == 253
    assert DETECTORS.get("mm-grounding-dino").capabilities is spec.capabilities
