"""Find mode of ``vprompt serve``: ``POST /api/images/{image_id}/find`` (docs/serve-api.md), in
process, with a tiny random SAM for masks and a deterministic fake detector (``fakedet``) whose
every box and score can be written by hand; plus a smoke test of the real ``owlv2:tiny`` when
that backbone is registered.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Sequence

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

pytest.importorskip("fastapi")
from starlette.testclient import TestClient

from vprompt.backbones.detection import (
    DETECTORS,
    DetectorCapabilities,
    DetectorOutput,
    DetectorSpec,
    Exemplar,
    register_detector,
)
from vprompt.backbones.registry import FAMILIES, BackboneFamily, register_family
from vprompt.prompts.spatial import Box, ObjectPrompt, PromptSet
from vprompt.segment.outputs import decode_rle
from vprompt.serve import ServeSettings, create_app
from vprompt.serve.detection import DetectorHost

with contextlib.suppress(ImportError):  # registers owlv2: until vprompt.backbones imports it
    import vprompt.backbones.owl  # noqa: F401

# ------------------------------------------------------------------- the fake detector

FAMILY = "fakedet"
# Candidate boxes as fractions of W and H: 0 and 1 overlap (IoU 0.78), 2 and 3 stand alone.
FRACTIONS = torch.tensor(
    [[0.1, 0.1, 0.5, 0.5], [0.15, 0.1, 0.55, 0.5], [0.6, 0.6, 0.9, 0.95], [0.0, 0.7, 0.2, 1.0]]
)
# Text query i scores the four candidates BASE - 0.1 i.
BASE = torch.tensor([0.9, 0.8, 0.5, 0.15])
EXEMPLAR_SCORE, MIRROR_SCORE = 0.95, 0.7
CAPS = {
    "exact": DetectorCapabilities(text=True, exemplars=True, max_queries=8),
    "concept": DetectorCapabilities(text=True, exemplars=True, negative_exemplars=True),
    "words": DetectorCapabilities(text=True, exemplars=False),
}


def candidate_boxes(w: int, h: int) -> torch.Tensor:
    """4 x 4 float32 boxes on a W x H image (the same float32 values the fake returns)."""
    return FRACTIONS * torch.tensor([w, h, w, h], dtype=torch.float32)


def exemplar_boxes(ex: Exemplar, w: int, h: int) -> list[list[float]]:
    """The fake's two answers to one exemplar: its box scaled to W x H, and that mirrored."""
    ew, eh = ex.image.size
    x0, y0, x1, y1 = (
        torch.tensor(ex.box, dtype=torch.float32)
        * torch.tensor([w / ew, h / eh, w / ew, h / eh], dtype=torch.float32)
    ).tolist()
    return [[x0, y0, x1, y1], [w - x1, y0, w - x0, y1]]


class FakeDetector(nn.Module):
    """Text query i: the four fixed candidates scored ``BASE - 0.1 i``; exemplar k: its own
    box (scaled to this image) and its mirror image. With negative exemplars (``concept``)
    everything is label 0 and negative exemplars answer nothing."""

    def __init__(self, arch: str) -> None:
        super().__init__()
        self.name = f"{FAMILY}:{arch}"
        self.weights = "none"
        self.capabilities = CAPS[arch]
        self.dummy = nn.Parameter(torch.zeros(1))  # load_backbone freezes parameters

    def fingerprint(self) -> str:
        return self.name

    def detect(
        self,
        image: Image.Image,
        *,
        queries: Sequence[str] = (),
        exemplars: Sequence[Exemplar] = (),
    ) -> DetectorOutput:
        w, h = image.size
        concept = self.capabilities.negative_exemplars
        boxes, scores, labels = [], [], []
        for i, _ in enumerate(queries):
            boxes.append(candidate_boxes(w, h))
            scores.append(BASE - 0.1 * i)
            labels.append(torch.full((4,), i))
        for k, ex in enumerate(exemplars):
            if not ex.positive:
                continue
            boxes.append(torch.tensor(exemplar_boxes(ex, w, h), dtype=torch.float32))
            scores.append(torch.tensor([EXEMPLAR_SCORE, MIRROR_SCORE]))
            labels.append(torch.full((2,), 0 if concept else len(queries) + k))
        return DetectorOutput(
            boxes=torch.cat(boxes).reshape(-1, 4),
            scores=torch.cat(scores).float(),
            labels=torch.cat(labels).long(),
        )


def register_fake_detector() -> None:
    """Register ``fakedet:{exact,concept,words}`` once per process."""
    if FAMILY in FAMILIES:
        return
    register_family(
        BackboneFamily(
            name=FAMILY,
            description="deterministic fake detector (serve tests only)",
            list_archs=lambda: sorted(CAPS),
            list_tags=lambda arch: [],
            default_weights=lambda arch: "none",
            build=lambda arch, weights, device: FakeDetector(arch).to(device),
            tiny=tuple(sorted(CAPS)),
        )
    )
    register_detector(
        DetectorSpec(
            family=FAMILY,
            description="fake detector for the serve tests",
            capabilities=CAPS["exact"],
            default_model=f"{FAMILY}:exact",
            tiny_model=f"{FAMILY}:exact",
            score_threshold=0.2,
            nms_iou=0.5,
        )
    )


# ------------------------------------------------------------------------------ fixtures

W, H = 96, 64  # the target: wider than tall
RW, RH = 48, 72  # the reference image of the exemplars: taller than wide


def noise(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


SETTINGS = dict(model="sam:tiny", weights="none", device="cpu", max_objects=4, max_queries=3)


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    register_fake_detector()
    settings = ServeSettings(**SETTINGS, detector="fakedet", detector_masks=True)  # type: ignore[arg-type]
    with TestClient(create_app(settings), base_url="http://localhost") as c:
        yield c


def upload(client: TestClient, img: Image.Image) -> str:
    r = client.post("/api/images", files={"file": ("x.png", png(img), "image/png")})
    assert r.status_code == 201, r.text
    return str(r.json()["image_id"])


@pytest.fixture(scope="module")
def ids(client: TestClient) -> dict[str, str]:
    return {"target": upload(client, noise(W, H, 0)), "ref": upload(client, noise(RW, RH, 1))}


def find(client: TestClient, image_id: str, **body: object):  # type: ignore[no-untyped-def]
    return client.post(f"/api/images/{image_id}/find", json=body)


def ok(r) -> dict:  # type: ignore[no-untyped-def]
    assert r.status_code == 200, r.text
    return dict(r.json())


def error(r, status: int, code: str) -> str:  # type: ignore[no-untyped-def]
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    return str(body["error"]["message"])


def host(client: TestClient, arch: str, *, masks: bool = True) -> DetectorHost:
    service = client.app.state.service  # type: ignore[attr-defined]
    return DetectorHost(
        model=f"{FAMILY}:{arch}",
        weights="none",
        device="cpu",
        segmenter=service.segmenter if masks else None,
        max_pixels=service.settings.max_pixels,
        max_queries=3,
        max_exemplars=16,
        max_masks=4,
    )


def boxes_of(body: dict) -> list[list[float]]:
    return [d["box"] for d in body["detections"]]


def rounded(box: Sequence[float] | torch.Tensor) -> list[float]:
    return [round(float(v), 2) for v in list(box)]


# ---------------------------------------------------------------------------------- tests


def test_models_report_the_detector_and_openapi_documents_find(client: TestClient) -> None:
    info = client.get("/api/models").json()["detector"]
    assert info == {
        "name": "fakedet:exact",
        "weights": "none",
        "description": "fake detector for the serve tests",
        "capabilities": {
            "text": True,
            "exemplars": True,
            "negative_exemplars": False,
            "masks": True,  # from the server's segmenter (--detector-masks)
        },
        "score_threshold": 0.2,
        "nms_iou": 0.5,
        "max_queries": 3,  # the server's limit, under the model's 8
        "max_exemplars": 16,
    }
    schema = client.get("/openapi.json").json()
    post = schema["paths"]["/api/images/{image_id}/find"]["post"]
    ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/FindRequest")
    assert {"queries", "exemplars", "score_threshold", "nms_iou", "top_k", "masks"} <= set(
        schema["components"]["schemas"]["FindRequest"]["properties"]
    )
    assert "409" in post["responses"]
    assert "detections" in schema["components"]["schemas"]["FindResponse"]["properties"]


def test_text_queries_with_the_detectors_defaults(client: TestClient, ids: dict[str, str]) -> None:
    body = ok(find(client, ids["target"], queries=["  a red   mug "]))
    c = candidate_boxes(W, H)
    # Threshold 0.2 drops candidate 3 (0.15); NMS at 0.5 drops 1 under 0 (IoU 0.78).
    assert body["queries"] == ["a red mug"]
    assert body["image"] == {"image_id": ids["target"], "width": W, "height": H}
    assert boxes_of(body) == [rounded(c[0]), rounded(c[2])]
    assert [d["score"] for d in body["detections"]] == pytest.approx([0.9, 0.5])
    assert [(d["label"], d["query"]) for d in body["detections"]] == [(0, "a red mug")] * 2
    x0, y0, x1, y1 = c[2].tolist()
    assert body["detections"][1]["area"] == pytest.approx((x1 - x0) * (y1 - y0), abs=0.05)
    assert all("mask" not in d for d in body["detections"])


def test_threshold_nms_top_k_and_class_agnostic(client: TestClient, ids: dict[str, str]) -> None:
    target = ids["target"]
    two = ["mug", "cup"]  # "cup" scores 0.1 lower: [0.8, 0.7, 0.4, 0.05]
    body = ok(find(client, target, queries=two))
    assert [(d["query"], d["score"]) for d in body["detections"]] == [
        ("mug", pytest.approx(0.9)),
        ("cup", pytest.approx(0.8)),
        ("mug", pytest.approx(0.5)),
        ("cup", pytest.approx(0.4)),
    ]
    agnostic = ok(find(client, target, queries=two, class_agnostic=True))
    assert [d["score"] for d in agnostic["detections"]] == pytest.approx([0.9, 0.5])
    high = ok(find(client, target, queries=two, score_threshold=0.6))
    assert [d["score"] for d in high["detections"]] == pytest.approx([0.9, 0.8])
    top = ok(find(client, target, queries=two, top_k=3))
    assert [d["score"] for d in top["detections"]] == pytest.approx([0.9, 0.8, 0.5])
    no_nms = ok(find(client, target, queries=["mug"], nms_iou=1.0, score_threshold=0.0))
    assert [d["score"] for d in no_nms["detections"]] == pytest.approx([0.9, 0.8, 0.5, 0.15])
    assert boxes_of(no_nms) == [rounded(b) for b in candidate_boxes(W, H)]


def test_exemplars_on_another_image_and_on_this_one(
    client: TestClient, ids: dict[str, str]
) -> None:
    ref_box = [6.0, 9.0, 30.0, 45.0]
    body = ok(
        find(
            client,
            ids["target"],
            exemplars=[{"image_id": ids["ref"], "box": ref_box}],
        )
    )
    ex = Exemplar(image=noise(RW, RH, 1), box=(6.0, 9.0, 30.0, 45.0))
    scaled, mirror = exemplar_boxes(ex, W, H)
    assert body["queries"] == ["exemplar 1"]
    assert boxes_of(body) == [rounded(scaled), rounded(mirror)]
    assert [d["score"] for d in body["detections"]] == pytest.approx([0.95, 0.7])
    # Text and an example box on the target itself: the exemplar's label comes after the text.
    both = ok(
        find(
            client,
            ids["target"],
            queries=["mug"],
            exemplars=[{"image_id": ids["target"], "box": [60, 8, 90, 40], "positive": True}],
        )
    )
    assert both["queries"] == ["mug", "exemplar 1"]
    assert [(d["label"], d["box"]) for d in both["detections"][:2]] == [
        (1, [60.0, 8.0, 90.0, 40.0]),
        (0, rounded(candidate_boxes(W, H)[0])),
    ]


def test_masks_come_from_the_servers_segmenter_and_its_cache(
    client: TestClient, ids: dict[str, str]
) -> None:
    service = client.app.state.service  # type: ignore[attr-defined]
    misses = service.segmenter.cache.stats.misses
    body = ok(find(client, ids["target"], queries=["mug", "cup"], masks=True))
    # Masks cap top-k at the server's max_objects (4).
    assert len(body["detections"]) == 4
    assert service.segmenter.cache.stats.misses == misses  # the upload's embedding was reused
    # Independently: the same boxes as box prompts through the segmenter itself.
    c = candidate_boxes(W, H).double()
    expected_boxes = [c[0], c[0], c[2], c[2]]
    prompts = PromptSet(
        [ObjectPrompt(boxes=[Box(*b.tolist())]) for b in expected_boxes], image_size=(W, H)
    )
    seg = service.segmenter.segment(noise(W, H, 0), prompts, multimask=False)
    for i, det in enumerate(body["detections"]):
        assert det["mask"]["size"] == [H, W]
        assert isinstance(det["mask"]["counts"], str)  # compressed RLE
        mask = decode_rle(det["mask"])
        np.testing.assert_array_equal(mask, seg.masks[i, 0])
        assert det["area"] == int(mask.sum())
    png_body = ok(find(client, ids["target"], queries=["mug"], masks=True, format="png"))
    assert all(isinstance(d["mask"], str) for d in png_body["detections"])


def test_validation_errors_name_the_field(client: TestClient, ids: dict[str, str]) -> None:
    target, ref = ids["target"], ids["ref"]
    msg = error(find(client, "nope", queries=["mug"]), 404, "image_not_found")
    assert "nope" in msg
    msg = error(
        find(client, target, exemplars=[{"image_id": "gone", "box": [0, 0, 4, 4]}]),
        404,
        "image_not_found",
    )
    assert msg.startswith("exemplars[0].image_id: no image 'gone'")
    msg = error(find(client, target), 422, "invalid_prompt")
    assert msg.startswith("queries: nothing to find")
    assert error(find(client, target, queries=[]), 422, "invalid_prompt") == msg
    msg = error(find(client, target, queries=["mug", "   "]), 422, "invalid_prompt")
    assert msg.startswith("queries[1]: query '   ' is empty")
    msg = error(find(client, target, queries=["x" * 300]), 422, "invalid_prompt")
    assert msg.startswith("queries[0]:")
    assert "300 characters" in msg
    msg = error(find(client, target, queries=["a", "b", "c", "d"]), 422, "too_much_work")
    assert msg == "queries: 4 given; this server takes at most 3 per request"
    # Outside the 48 x 72 reference image (not the 96 x 64 target).
    msg = error(
        find(client, target, exemplars=[{"image_id": ref, "box": [10, 10, 60, 30]}]),
        422,
        "invalid_prompt",
    )
    assert msg.startswith("exemplars[0].box: exemplar box (10,10,60,30) reaches outside the 48x72")
    msg = error(
        find(client, target, exemplars=[{"image_id": ref, "box": [10, 10, 5, 30]}]),
        422,
        "invalid_prompt",
    )
    assert msg.startswith("exemplars[0].box:")
    msg = error(
        find(client, target, exemplars=[{"image_id": ref, "box": [1, 1, 5, 5], "positive": False}]),
        422,
        "invalid_prompt",
    )
    assert msg.startswith("exemplars[0].positive: fakedet:exact takes no negative examples")
    msg = error(find(client, target, queries=["mug"], score_threshold=1.5), 422, "invalid_request")
    assert msg.startswith("score_threshold:")
    msg = error(find(client, target, queries=["mug"], top_k=0), 422, "invalid_request")
    assert msg.startswith("top_k:")
    msg = error(find(client, target, queries="mug"), 422, "invalid_request")
    assert msg.startswith("queries:")
    msg = error(find(client, target, queries=["mug"], masks=True, top_k=5), 422, "too_much_work")
    assert msg == "top_k: 5 with masks; this server makes at most 4 masks per request"


def test_what_the_detector_cannot_take(
    client: TestClient, ids: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    service = client.app.state.service  # type: ignore[attr-defined]
    target = ids["target"]
    box = {"image_id": target, "box": [60, 8, 90, 40]}
    monkeypatch.setattr(service, "detector", host(client, "words", masks=False))
    msg = error(find(client, target, exemplars=[box]), 422, "invalid_prompt")
    assert msg == "exemplars: fakedet:words takes no example boxes (text queries only)"
    msg = error(find(client, target, queries=["mug"], masks=True), 422, "invalid_request")
    assert msg.startswith("masks: fakedet:words makes no masks on this server")
    caps = client.get("/api/models").json()["detector"]["capabilities"]
    assert caps == {"text": True, "exemplars": False, "negative_exemplars": False, "masks": False}

    # SAM 3-like: exemplars (positive and negative) refine one concept, label 0.
    monkeypatch.setattr(service, "detector", host(client, "concept"))
    negative = {**box, "box": [4, 4, 20, 20], "positive": False}
    body = ok(find(client, target, queries=["mug"], exemplars=[box, negative]))
    assert body["queries"] == ["mug"]
    assert {d["label"] for d in body["detections"]} == {0}
    assert [60.0, 8.0, 90.0, 40.0] in boxes_of(body)
    msg = error(
        find(client, target, queries=["mug", "cup"], exemplars=[box]), 422, "invalid_prompt"
    )
    assert msg.startswith("exemplars: fakedet:concept: exemplars refine one concept")

    monkeypatch.setattr(service, "detector", None)
    msg = error(find(client, target, queries=["mug"]), 409, "no_detector")
    assert "--detector" in msg
    assert "fakedet:" in msg
    assert "detector" not in client.get("/api/models").json()


def test_settings_and_cli_refuse_bad_detector_options() -> None:
    from click.testing import CliRunner

    from vprompt.cli import main
    from vprompt.errors import ConfigError, UnknownNameError

    with pytest.raises(ConfigError, match="detector_masks: needs a detector"):
        ServeSettings(**SETTINGS, detector_masks=True)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_queries"):
        ServeSettings(**SETTINGS | {"max_queries": 0})  # type: ignore[arg-type]
    register_fake_detector()
    with pytest.raises(UnknownNameError, match="fakedet:"):
        DetectorHost(
            model="sam:tiny",
            weights="none",
            device="cpu",
            segmenter=None,
            max_pixels=10_000,
            max_queries=3,
            max_exemplars=3,
            max_masks=3,
        )
    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0
    assert "--detector-masks" in result.output
    assert "--max-queries" in result.output


@pytest.mark.skipif(
    "owlv2" not in DETECTORS, reason="owlv2 is not registered (src/vprompt/backbones/owl.py)"
)
def test_owlv2_tiny_finds_from_words_and_examples() -> None:
    settings = ServeSettings(
        **SETTINGS | {"max_objects": 8},  # type: ignore[arg-type]
        detector="owlv2:tiny",
        detector_weights="none",
        detector_masks=True,
    )
    with TestClient(create_app(settings), base_url="http://localhost") as c:
        info = c.get("/api/models").json()["detector"]
        assert info["name"] == "owlv2:tiny"
        assert info["capabilities"]["text"]
        assert info["capabilities"]["exemplars"]
        image_id = upload(c, noise(W, H, 0))
        body = ok(
            find(
                c,
                image_id,
                queries=["a cat"],
                exemplars=[{"image_id": image_id, "box": [2, 2, 94, 62]}],
                score_threshold=0.0,
                top_k=3,
                masks=True,
            )
        )
        assert body["queries"] == ["a cat", "exemplar 1"]
        dets = body["detections"]
        assert len(dets) == 3
        assert [d["score"] for d in dets] == sorted((d["score"] for d in dets), reverse=True)
        for d in dets:
            x0, y0, x1, y1 = d["box"]
            assert 0 <= x0 <= x1 <= W
            assert 0 <= y0 <= y1 <= H
            assert decode_rle(d["mask"]).shape == (H, W)
