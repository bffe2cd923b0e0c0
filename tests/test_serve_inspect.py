"""Inspect mode of ``vprompt serve``: ``POST /api/find-similar`` (docs/serve-api.md), in process,
with a tiny random SAM and a tiny random torchvision CNN as the defect-search backbone."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from starlette.testclient import TestClient

from vprompt.segment.outputs import decode_rle, encode_rle_compressed
from vprompt.serve import ServeSettings, create_app

W, H = 128, 96
BLOB = 32
EXAMPLE_AT = (12, 12)  # top-left corner of the planted blob in the example
TARGET_AT = (80, 50)  # ... and in the target


def planted(seed: int, at: tuple[int, int] | None) -> Image.Image:
    """Grey noise with a magenta square at ``at``: a random-init CNN still sees the colour."""
    rng = np.random.default_rng(seed)
    pixels = (128 + rng.normal(0, 8, (H, W, 3))).clip(0, 255)
    if at is not None:
        x, y = at
        pixels[y : y + BLOB, x : x + BLOB] = (230, 30, 200)
    return Image.fromarray(pixels.astype(np.uint8))


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    settings = ServeSettings(
        model="sam:tiny",
        weights="none",
        device="cpu",
        inspect_model="torchvision:tiny",
        inspect_weights="none",
        inspect_image_size=128,
        max_inspect_targets=3,
    )
    with TestClient(create_app(settings), base_url="http://localhost") as c:
        yield c


def upload(client: TestClient, img: Image.Image) -> str:
    r = client.post("/api/images", files={"file": ("x.png", png(img), "image/png")})
    assert r.status_code == 201, r.text
    return str(r.json()["image_id"])


@pytest.fixture(scope="module")
def ids(client: TestClient) -> dict[str, str]:
    return {
        "example": upload(client, planted(0, EXAMPLE_AT)),
        "target": upload(client, planted(1, TARGET_AT)),
        "plain": upload(client, planted(2, None)),
    }


def example_box() -> list[float]:
    x, y = EXAMPLE_AT
    return [x, y, x + BLOB, y + BLOB]


def find(client: TestClient, **body: object):  # type: ignore[no-untyped-def]
    return client.post("/api/find-similar", json=body)


def error(r, status: int, code: str) -> str:  # type: ignore[no-untyped-def]
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    return str(body["error"]["message"])


def iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def test_the_marked_blob_is_found_where_it_was_planted(
    client: TestClient, ids: dict[str, str]
) -> None:
    r = find(
        client,
        image_id=ids["example"],
        boxes=[example_box()],
        targets=[ids["plain"], ids["target"]],
        top_k=5,
        threshold=0.1,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["targets"] == [ids["plain"], ids["target"]]
    regions = body["regions"]
    assert regions, body
    assert [g["score"] for g in regions] == sorted((g["score"] for g in regions), reverse=True)
    top = regions[0]
    assert top["image_id"] == ids["target"]
    x, y = TARGET_AT
    blob = [x, y, x + BLOB, y + BLOB]
    # Arbitrary regions fail here: the blob is 8% of the image; the found box must lie on it
    # (within a few pixels) and cover a good part of it.
    x0, y0, x1, y1 = top["box"]
    assert x - 6 <= x0 < x1 <= x + BLOB + 6, top["box"]
    assert y - 6 <= y0 < y1 <= y + BLOB + 6, top["box"]
    assert iou(top["box"], [float(v) for v in blob]) > 0.25, top["box"]
    mask = decode_rle(top["mask"])
    assert mask.shape == (H, W)
    assert mask.sum() == top["area"]
    inside = mask[y : y + BLOB, x : x + BLOB].sum()
    assert inside / mask.sum() > 0.6
    # Heat maps: one per target, in order, small, hottest over the blob.
    maps = body["heatmaps"]
    assert [m["image_id"] for m in maps] == body["targets"]
    for m in maps:
        assert max(m["width"], m["height"]) <= 64
        assert m["png"].startswith("data:image/png;base64,")
        assert m["min"] <= m["max"]
    raw = base64.b64decode(maps[1]["png"].split(",", 1)[1])
    heat = np.asarray(Image.open(io.BytesIO(raw)))
    assert heat.shape == (maps[1]["height"], maps[1]["width"])
    sy, sx = np.unravel_index(int(heat.argmax()), heat.shape)
    fx, fy = sx * W / heat.shape[1], sy * H / heat.shape[0]
    assert x - 4 <= fx <= x + BLOB + 4, (fx, fy)
    assert y - 4 <= fy <= y + BLOB + 4, (fx, fy)


def test_default_targets_mask_region_and_formats(client: TestClient, ids: dict[str, str]) -> None:
    box = example_box()
    mask = np.zeros((H, W), dtype=bool)
    mask[int(box[1]) : int(box[3]), int(box[0]) : int(box[2])] = True
    r = find(
        client,
        image_id=ids["example"],
        mask=encode_rle_compressed(mask),
        threshold=0.1,
        format="png",
        heatmaps=False,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert ids["example"] not in body["targets"]
    assert {ids["target"], ids["plain"]} <= set(body["targets"])
    assert body["heatmaps"] == []
    top = body["regions"][0]
    assert top["image_id"] == ids["target"]
    found = np.asarray(Image.open(io.BytesIO(base64.b64decode(top["mask"])))) > 127
    assert found.sum() == top["area"]
    # A painted stroke through the blob marks it too.
    stroke = {"points": [[16, 28], [40, 28]], "width": 20}
    r = find(client, image_id=ids["example"], scribbles=[stroke], targets=[ids["target"]])
    assert r.status_code == 200, r.text
    models = client.get("/api/models").json()
    assert models["inspector"] == {"name": "torchvision:tiny", "weights": "none", "loaded": True}
    assert "/api/find-similar" in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize(
    ("change", "status", "code", "needle"),
    [
        ({"image_id": "nope"}, 404, "image_not_found", "image_id: no image 'nope'"),
        ({"targets": ["nope"]}, 404, "image_not_found", "targets[0]: no image 'nope'"),
        ({"boxes": [[0, 0, 500, 20]]}, 422, "invalid_prompt", "boxes[0]: box 0,0,500,20"),
        ({"boxes": [[30, 10, 20, 40]]}, 422, "invalid_prompt", "boxes[0]"),
        ({"boxes": []}, 422, "invalid_prompt", "the marked region is empty"),
        ({"boxes": [], "scribbles": [{"points": [[1, 1]], "width": -3}]}, 422,
         "invalid_prompt", "scribbles[0]: scribble: width"),
        ({"boxes": [], "mask": {"size": [10, 10], "counts": "0"}}, 422, "invalid_prompt",
         "mask: RLE has size [10, 10]"),
        ({"top_k": 0}, 422, "invalid_request", "top_k"),
        ({"top_k": "many"}, 422, "invalid_request", "top_k"),
        ({"threshold": 7}, 422, "invalid_request", "threshold"),
        ({"targets": []}, 422, "invalid_request", "targets: empty"),
        ({"targets": ["a", "a"]}, 422, "invalid_request", "targets[1]: 'a' is given twice"),
        ({"targets": ["a", "b", "c", "d"]}, 422, "too_much_work", "at most 3 per request"),
    ],
)  # fmt: skip
def test_bad_requests_name_the_field(
    client: TestClient, ids: dict[str, str], change: dict, status: int, code: str, needle: str
) -> None:
    body = {"image_id": ids["example"], "boxes": [example_box()], **change}
    message = error(find(client, **body), status, code)
    assert needle in message, message
    assert "\n" not in message


def test_nothing_else_to_search(ids: dict[str, str]) -> None:
    settings = ServeSettings(
        model="sam:tiny", weights="none", device="cpu",
        inspect_model="torchvision:tiny", inspect_weights="none",
    )  # fmt: skip
    with TestClient(create_app(settings), base_url="http://localhost") as c:
        only = upload(c, planted(0, EXAMPLE_AT))
        message = error(find(c, image_id=only, boxes=[example_box()]), 422, "invalid_request")
        assert message.startswith("targets: no other uploaded image")
        # The backbone is named at start-up but only loaded by a search.
        assert c.get("/api/models").json()["inspector"]["loaded"] is False


def test_an_unknown_inspect_model_fails_at_start_up() -> None:
    from vprompt.errors import UnknownNameError

    settings = ServeSettings(
        model="sam:tiny", weights="none", device="cpu", inspect_model="torchvision:no-such-net"
    )
    with pytest.raises(UnknownNameError, match="torchvision:no-such-net"):
        create_app(settings)


@pytest.mark.parametrize(
    ("field", "value"),
    [("inspect_image_size", 8), ("inspect_image_size", 5000), ("max_inspect_targets", 0)],
)
def test_inspect_settings_are_validated(field: str, value: int) -> None:
    from vprompt.errors import ConfigError

    with pytest.raises(ConfigError, match=field):
        ServeSettings(**{field: value})  # type: ignore[arg-type]
