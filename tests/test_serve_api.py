"""The HTTP API of ``vprompt serve`` (docs/serve-api.md), in process, with tiny random models."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from starlette.testclient import TestClient

from vprompt.errors import ConfigError
from vprompt.segment.outputs import decode_rle, encode_rle_compressed, polygons_to_mask
from vprompt.serve import ServeSettings, create_app, parse_pack_specs
from vprompt.serve.store import ImageStore

W, H = 80, 60
KIB = 1024


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width x height`` but holds (almost) no pixel data."""
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    idat = png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
    return b"\x89PNG\r\n\x1a\n" + ihdr + idat + png_chunk(b"IEND", b"")


def encode(img: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    import skimage.data

    return Image.fromarray(skimage.data.astronaut()).resize((W, H))


@pytest.fixture(scope="module")
def photo_png(photo: Image.Image) -> bytes:
    return encode(photo)


@pytest.fixture(scope="module")
def pack_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vprompt import load_backbone
    from vprompt.engine.pack import save_pack
    from vprompt.methods.zeroshot import ZeroShotClassifier

    path = tmp_path_factory.mktemp("packs") / "flowers.safetensors"
    save_pack(ZeroShotClassifier(load_backbone("clip:tiny", "none"), ["daisy", "rose"]), path)
    return path


@pytest.fixture(scope="module")
def client(pack_path: Path):
    settings = ServeSettings(
        model="sam:tiny",
        weights="none",
        device="cpu",
        classifier="clip:tiny",
        classifier_weights="none",
        packs={"flowers": pack_path},
        max_upload_bytes=256 * KIB,
        max_json_bytes=1024 * KIB,
        max_pixels=1_000_000,
    )
    with TestClient(create_app(settings), base_url="http://localhost") as c:
        yield c


@pytest.fixture(scope="module")
def small_client():
    """No classifier, one image kept, a short wait for the model."""
    settings = ServeSettings(
        model="sam:tiny", weights="none", device="cpu", max_images=1, request_timeout_s=0.3
    )
    with TestClient(create_app(settings), base_url="http://localhost") as c:
        yield c


def upload(client: TestClient, data: bytes, name: str = "x.png") -> dict:
    r = client.post("/api/images", files={"file": (name, data, "application/octet-stream")})
    assert r.status_code == 201, r.text
    return r.json()


@pytest.fixture(scope="module")
def image_id(client: TestClient, photo_png: bytes) -> str:
    return upload(client, photo_png)["image_id"]


def error(r, status: int, code: str) -> str:  # type: ignore[no-untyped-def]
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    return body["error"]["message"]


def segment(client: TestClient, image_id: str, objects: list, **extra: object):  # type: ignore[no-untyped-def]
    return client.post(f"/api/images/{image_id}/segment", json={"objects": objects, **extra})


def png_mask(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))) > 127


# ------------------------------------------------------------------------- basic endpoints


def test_health_models_and_openapi(client: TestClient, image_id: str) -> None:
    health = client.get("/api/health").json()
    assert health["status"] == "ok"
    assert health["images"] >= 1
    assert 0 < health["cache_bytes"] <= health["cache_limit_bytes"]
    models = client.get("/api/models").json()
    assert models == {
        "segmenter": {
            "name": "sam:tiny",
            "weights": "none",
            "kinds": ["points", "box", "scribble", "mask"],
        },
        "classifier": {"name": "clip:tiny", "weights": "none"},
        "packs": ["flowers"],
        # Named at start-up, loaded by the first /api/find-similar (tests/test_serve_inspect.py).
        "inspector": {"name": "torchvision:mobilenet_v2", "weights": "default", "loaded": False},
    }
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("health", "models", "images", "images/{image_id}", "classify", "find-similar"):
        assert f"/api/{path}" in paths, path
    for path in ("segment", "automatic"):
        assert f"/api/images/{{image_id}}/{path}" in paths, path
    assert client.get("/docs").status_code == 200


def test_web_page_and_static_files(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    error(client.get("/static/no-such-file.js"), 404, "not_found")


def test_upload_get_delete(client: TestClient, photo_png: bytes) -> None:
    service = client.app.state.service  # type: ignore[attr-defined]
    first = upload(client, photo_png)
    assert (first["width"], first["height"]) == (W, H)
    encodes = service.segmenter.encodes
    second = upload(client, photo_png)  # same bytes: the embedding comes from the cache
    assert service.segmenter.encodes == encodes
    assert second["image_id"] != first["image_id"]
    assert client.get(f"/api/images/{first['image_id']}").json() == first
    assert client.delete(f"/api/images/{first['image_id']}").status_code == 204
    error(client.get(f"/api/images/{first['image_id']}"), 404, "image_not_found")
    error(client.delete(f"/api/images/{first['image_id']}"), 404, "image_not_found")


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "BMP", "GIF", "TIFF"])
def test_every_supported_format_uploads(client: TestClient, photo: Image.Image, fmt: str) -> None:
    info = upload(client, encode(photo, fmt), name="no-extension")
    assert (info["width"], info["height"]) == (W, H)


def test_exif_orientation_is_applied(client: TestClient, photo: Image.Image) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    info = upload(client, encode(photo, "JPEG", exif=exif.tobytes()))
    assert (info["width"], info["height"]) == (H, W)


# ------------------------------------------------------------------------------ segmenting


def test_objects_come_back_in_order_and_equal_single_requests(
    client: TestClient, image_id: str
) -> None:
    first = segment(client, image_id, [{"box": [5, 5, 40, 30]}]).json()["objects"][0]
    box_mask = png_mask(first["mask"])
    objects = [
        {"points": [[20, 15, 1]]},
        {"box": [30, 10, 70, 50]},
        {"scribbles": [{"points": [[10, 40], [30, 50]], "positive": True, "width": 4}]},
        {"points": [[50, 30, 1], [60, 40, 0]], "box": [40, 20, 79, 59]},
        {"mask": encode_rle_compressed(box_mask)},
        {"points": [[5, 5, 1]]},
    ]
    r = segment(client, image_id, objects, format="rle")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["image_id"], body["width"], body["height"]) == (image_id, W, H)
    assert len(body["objects"]) == len(objects)
    for obj, got in zip(objects, body["objects"], strict=True):
        alone = segment(client, image_id, [obj], format="rle").json()["objects"][0]
        assert got["mask"] == alone["mask"]
        assert got["score"] == pytest.approx(alone["score"], abs=1e-5)
        mask = decode_rle(got["mask"])
        assert got["area"] == int(mask.sum())
        assert set(got) == {"score", "stability", "area", "bbox", "mask", "logits"}


def test_formats_decode_to_the_same_mask(client: TestClient, image_id: str) -> None:
    obj = [{"box": [10, 10, 60, 50]}]
    masks = {
        form: segment(client, image_id, obj, format=form).json()["objects"][0]
        for form in ("png", "rle", "polygon")
    }
    png = png_mask(masks["png"]["mask"])
    assert png.shape == (H, W)
    assert np.array_equal(decode_rle(masks["rle"]["mask"]), png)
    poly = polygons_to_mask(masks["polygon"]["mask"], (W, H))
    inter, union = (poly & png).sum(), (poly | png).sum()
    assert union > 0
    assert inter / union > 0.9
    x, y, w, h = masks["png"]["bbox"]
    assert masks["png"]["area"] == int(png.sum())
    if png.any():
        rows, cols = np.flatnonzero(png.any(1)), np.flatnonzero(png.any(0))
        assert (x, y, w, h) == (cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1)


def test_refinement_with_the_logits_token_changes_the_result(
    client: TestClient, image_id: str
) -> None:
    first = segment(client, image_id, [{"points": [[40, 30, 1]]}], format="rle").json()
    token = first["objects"][0]["logits"]
    clicks = [[40, 30, 1], [20, 20, 0]]
    plain = segment(client, image_id, [{"points": clicks}], format="rle").json()["objects"][0]
    refined = segment(
        client, image_id, [{"points": clicks, "previous": token}], format="rle"
    ).json()["objects"][0]
    assert (plain["mask"], plain["score"]) != (refined["mask"], refined["score"])
    assert refined["logits"] != token
    again = segment(client, image_id, [{"points": clicks, "previous": token}], format="rle")
    assert again.json()["objects"][0]["mask"] == refined["mask"]  # tokens stay usable
    r = segment(client, image_id, [{"points": clicks, "previous": "nope"}])
    assert "unknown or expired" in error(r, 422, "invalid_prompt")


def test_multimask_auto_means_three_candidates_for_a_lone_click(
    client: TestClient, image_id: str
) -> None:
    def run(objects: list, choice: object) -> list:
        r = segment(client, image_id, objects, multimask=choice, format="rle")
        return [(o["mask"]["counts"], o["score"]) for o in r.json()["objects"]]

    click, box = {"points": [[30, 30, 1]]}, {"box": [1, 1, 40, 30]}
    assert run([click], "auto") == run([click], True) != run([click], False)
    assert run([box], "auto") == run([box], False) != run([box], True)
    assert run([click, box], "auto") == [*run([click], True), *run([box], False)]


def test_automatic(client: TestClient, image_id: str) -> None:
    body = {"points_per_side": 4, "pred_iou_thresh": 0, "stability_score_thresh": 0}
    r = client.post(f"/api/images/{image_id}/automatic", json=body)
    assert r.status_code == 200, r.text
    objects = r.json()["objects"]
    assert objects
    assert set(objects[0]) == {"score", "stability", "area", "bbox", "mask", "point"}
    for obj in objects:
        assert decode_rle(obj["mask"]).sum() == obj["area"] > 0
    r = client.post(f"/api/images/{image_id}/automatic", json={**body, "format": "png"})
    assert isinstance(r.json()["objects"][0]["mask"], str)
    r = client.post(f"/api/images/{image_id}/automatic", json={"points_per_side": 0})
    error(r, 422, "invalid_request")
    error(client.post("/api/images/nope/automatic", json={}), 404, "image_not_found")


# ---------------------------------------------------------------------------- classifying


def test_classify_zero_shot_and_pack(client: TestClient, photo_png: bytes) -> None:
    files = {"file": ("p.png", photo_png, "image/png")}

    def post(**data: str):  # type: ignore[no-untyped-def]
        return client.post("/api/classify", files=files, data=data)

    r = client.post("/api/classify", files=files, data={"classes": "cat, dog, bird", "top_k": "2"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["source"] == "zero-shot"
    assert len(body["predictions"]) == 2
    assert {p["label"] for p in body["predictions"]} <= {"cat", "dog", "bird"}
    r = client.post("/api/classify", files=files, data={"pack": "flowers"})
    assert r.json()["source"] == "pack:flowers"
    assert sorted(p["label"] for p in r.json()["predictions"]) == ["daisy", "rose"]
    assert sum(p["score"] for p in r.json()["predictions"]) == pytest.approx(1, abs=1e-4)
    assert "flowers" in error(post(pack="/etc/passwd"), 404, "pack_not_found")
    error(post(), 422, "invalid_request")
    error(post(classes="a,b", pack="flowers"), 422, "invalid_request")
    error(post(classes="a,a"), 422, "invalid_prompt")
    error(post(classes="a,b", top_k="0"), 422, "invalid_request")
    text = {"file": ("x", b"hello", "text/plain")}
    error(
        client.post("/api/classify", files=text, data={"classes": "a,b"}), 415, "unsupported_media"
    )


def test_classify_without_a_classifier(small_client: TestClient, photo_png: bytes) -> None:
    files = {"file": ("p.png", photo_png, "image/png")}
    r = small_client.post("/api/classify", files=files, data={"classes": "a,b"})
    assert "--classifier" in error(r, 422, "invalid_request")
    assert small_client.get("/api/models").json()["classifier"] is None


# --------------------------------------------------------------------------------- errors


def test_bad_uploads(client: TestClient, photo_png: bytes) -> None:
    def post(data: bytes):  # type: ignore[no-untyped-def]
        return client.post("/api/images", files={"file": ("a.png", data, "image/png")})

    error(post(b"%PDF-1.4 not an image at all"), 415, "unsupported_media")
    error(post(b""), 415, "unsupported_media")
    error(post(photo_png[: len(photo_png) // 2]), 400, "bad_image")
    error(post(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40), 400, "bad_image")
    msg = error(post(png_header_only(30000, 30000)), 413, "too_large")
    assert "pixels" in msg
    error(post(png_header_only(1001, 1000)), 413, "too_large")
    big = bytes(300 * KIB)  # over the 256 KiB upload limit, under the multipart allowance
    error(post(b"\x89PNG\r\n\x1a\n" + big), 413, "too_large")
    error(post(b"\x89PNG\r\n\x1a\n" + bytes(2 * 1024 * KIB)), 413, "too_large")  # Content-Length
    error(client.post("/api/images", data={"not_file": "x"}), 422, "invalid_request")
    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
    parts = iter([head, b"\x89PNG\r\n\x1a\n" + bytes(2 * 1024 * KIB), b"\r\n--b--\r\n"])
    ctype = {"content-type": "multipart/form-data; boundary=b"}  # streamed: no Content-Length
    error(client.post("/api/images", content=parts, headers=ctype), 413, "too_large")


def test_an_image_too_elongated_for_the_model_is_a_bad_image(client: TestClient) -> None:
    """SAM resizes the long side to its frame: a 5000 x 1 strip keeps no short side."""
    for size in ((5000, 1), (1, 5000)):
        r = client.post(
            "/api/images",
            files={"file": ("strip.png", encode(Image.new("RGB", size)), "image/png")},
        )
        msg = error(r, 400, "bad_image")
        assert msg.startswith("strip.png: image of")
        assert "too elongated" in msg
    ok = encode(Image.new("RGB", (512, 1)))  # 256 x 0.5 rounds up to one row: fine
    assert upload(client, ok)["width"] == 512


def test_huge_json_is_refused(client: TestClient, image_id: str) -> None:
    huge = json.dumps({"objects": [{"points": [[1, 1, 1]] * 200_000}]}).encode()
    assert len(huge) > 1024 * KIB
    url = f"/api/images/{image_id}/segment"
    headers = {"content-type": "application/json"}
    error(client.post(url, content=huge, headers=headers), 413, "too_large")

    def chunks():  # type: ignore[no-untyped-def]
        for start in range(0, len(huge), 64 * KIB):  # no Content-Length: counted as it streams
            yield huge[start : start + 64 * KIB]

    error(client.post(url, content=chunks(), headers=headers), 413, "too_large")


@pytest.mark.parametrize(
    ("obj", "needle"),
    [
        ({"points": [[float("nan"), 10, 1]]}, "finite"),
        ({"points": [[10, float("inf"), 1]]}, "finite"),
        ({"points": [[-1, 10, 1]]}, "outside"),
        ({"points": [[10, H + 0.5, 1]]}, "outside"),
        ({"points": [[10, 10, 2]]}, "label"),
        ({"box": [50, 10, 20, 40]}, "inverted"),
        ({"box": [0, 0, W + 10, 10]}, "outside"),
        ({"box": [float("nan"), 0, 10, 10]}, "finite"),
        ({}, "empty"),
        ({"scribbles": [{"points": [], "positive": True}]}, "scribble"),
        ({"scribbles": [{"points": [[1, 1]], "width": -3}]}, "width"),
        ({"mask": {"size": [H + 1, W], "counts": "0"}}, "size"),
        ({"mask": {"size": [H, W], "counts": [5, 5]}}, "RLE"),
    ],
)
def test_invalid_prompts(client: TestClient, image_id: str, obj: dict, needle: str) -> None:
    # json.dumps writes NaN / Infinity, which Python's parser (and the server's) accepts.
    r = client.post(
        f"/api/images/{image_id}/segment",
        content=json.dumps({"objects": [obj]}).encode(),
        headers={"content-type": "application/json"},
    )
    assert needle in error(r, 422, "invalid_prompt")


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "invalid_request"),
        (b'{"objects": [{"points": "abc"}]}', "invalid_request"),
        (b'{"objects": [{"box": [1, 2, 3]}]}', "invalid_request"),
        (b'{"objects": [{"box": [1, 1, 5, 5]}], "format": "jpeg"}', "invalid_request"),
        (b'{"objects": [{"box": [1, 1, 5, 5]}], "multimask": "maybe"}', "invalid_request"),
        (b'{"objects": []}', "invalid_prompt"),
        (json.dumps({"objects": [{"box": [1, 1, 5, 5]}] * 33}).encode(), "invalid_prompt"),
    ],
)
def test_invalid_requests(client: TestClient, image_id: str, body: bytes, code: str) -> None:
    headers = {"content-type": "application/json"}
    r = client.post(f"/api/images/{image_id}/segment", content=body, headers=headers)
    error(r, 422, code)


def test_unknown_things(client: TestClient) -> None:
    error(segment(client, "no-such-image", [{"box": [1, 1, 5, 5]}]), 404, "image_not_found")
    error(client.get("/api/nothing-here"), 404, "not_found")
    error(client.put("/api/health"), 405, "method_not_allowed")


def test_evicted_and_expired_images(small_client: TestClient, photo_png: bytes) -> None:
    first = upload(small_client, photo_png)["image_id"]
    second = upload(small_client, photo_png)["image_id"]  # capacity 1: evicts the first
    r = small_client.get(f"/api/images/{first}")
    assert "unknown or expired" in error(r, 404, "image_not_found")
    assert small_client.get(f"/api/images/{second}").status_code == 200


def test_store_expires_idle_images_and_bounds_tokens(photo: Image.Image) -> None:
    now = [0.0]
    store = ImageStore(
        max_images=8, max_bytes=2**30, ttl_s=10, logits_per_image=2, clock=lambda: now[0]
    )
    kept = store.add(photo, "k1")
    idle = store.add(photo, "k2")
    now[0] = 6.0
    store.get(kept.image_id)  # a use restarts its clock
    now[0] = 12.0
    assert store.get(kept.image_id) is kept
    with pytest.raises(Exception, match="unknown or expired") as info:
        store.get(idle.image_id)
    assert getattr(info.value, "code", None) == "image_not_found"
    assert len(store) == 1
    tokens = [
        store.remember_logits(kept.image_id, np.full((4, 4), i, np.float32)) for i in range(3)
    ]
    assert store.logits(kept.image_id, tokens[0]) is None  # only the 2 newest are kept
    assert store.logits(kept.image_id, tokens[2])[0, 0] == 2
    assert store.nbytes == W * H * 3 + 2 * 16 * 4
    store.delete(kept.image_id)
    assert store.nbytes == 0
    assert len(store) == 0


def test_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="max_images"):
        ServeSettings(max_images=0)
    with pytest.raises(ConfigError, match="logits_per_image"):
        ServeSettings(logits_per_image=4, max_objects=8)
    with pytest.raises(ConfigError, match="pack name"):
        ServeSettings(packs={"../x": "p.safetensors"})
    with pytest.raises(ConfigError, match="NAME=PATH"):
        parse_pack_specs(["no-equals-sign"])
    assert parse_pack_specs(["a=x.safetensors"]) == {"a": Path("x.safetensors")}


def test_busy_and_internal_errors(small_client: TestClient, photo_png: bytes) -> None:
    service = small_client.app.state.service  # type: ignore[attr-defined]
    image = upload(small_client, photo_png)["image_id"]
    real, started, release = service.segment, threading.Event(), threading.Event()

    def held(*args):  # type: ignore[no-untyped-def]
        started.set()
        release.wait(30)  # holds the model until the second request has given up
        return real(*args)

    def broken(*args):  # type: ignore[no-untyped-def]
        raise RuntimeError("/secret/path/model.bin is broken")

    box = [{"box": [1, 1, 9, 9]}]
    try:
        service.segment = held
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(segment, small_client, image, box)
            assert started.wait(30)
            assert "busy" in error(segment(small_client, image, box), 503, "busy")
            release.set()
            assert first.result().status_code == 200
        service.segment = broken
        with TestClient(
            small_client.app, raise_server_exceptions=False, base_url="http://localhost"
        ) as c:
            r = segment(c, image, box)
        assert "secret" not in error(r, 500, "internal")
        assert "/secret" not in r.text
    finally:
        release.set()
        service.segment = real


def test_concurrent_requests_all_succeed(
    client: TestClient, image_id: str, photo_png: bytes
) -> None:
    files = {"file": ("a.png", photo_png, "image/png")}

    def work(i: int) -> int:
        if i % 4 == 3:
            return client.post("/api/images", files=files).status_code
        obj = {"points": [[5 + i * 3, 5 + i * 2, 1]]}
        return segment(client, image_id, [obj], format="rle").status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = list(pool.map(work, range(16)))
    assert all(code in (200, 201) for code in codes), codes


# ------------------------------------------------------------------------------ real CLI


@pytest.mark.slow
def test_cli_serves_health(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    env["VPROMPT_CACHE"] = str(tmp_path)
    cmd = [sys.executable, "-m", "vprompt", "serve", "--model", "sam:tiny", "--weights", "none"]
    cmd += ["--device", "cpu", "--port", str(port), "--log-level", "warning"]
    cmd += ["--allowed-host", "labeller.lab"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        body = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                    body = json.loads(r.read())
                    break
            except OSError:
                time.sleep(0.3)
        assert body is not None, proc.stderr.read() if proc.poll() is not None else "no answer"
        assert body["status"] == "ok"
        assert body["images"] == 0
        url = f"http://127.0.0.1:{port}/api/health"
        served = urllib.request.Request(url, headers={"Host": "labeller.lab:80"})
        with urllib.request.urlopen(served, timeout=5) as r:
            assert r.status == 200
        foreign = urllib.request.Request(url, headers={"Host": "attacker.example"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(foreign, timeout=5)
        assert refused.value.code == 400
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/" in out


# ---------------------------------------------------------------------------- hardening


def test_only_the_served_host_names_are_answered(client: TestClient, photo_png: bytes) -> None:
    """DNS rebinding: a page whose name resolves to 127.0.0.1 sends its own Host header."""
    for host in ("attacker.example", "attacker.example:8000", "", "127.0.0.2"):
        r = client.get("/api/health", headers={"host": host})
        msg = error(r, 400, "bad_host")
        assert "--allowed-host" in msg
    for host in ("localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000"):
        assert client.get("/api/health", headers={"host": host}).status_code == 200
    settings = ServeSettings(model="sam:tiny", weights="none", device="cpu",
                             allowed_hosts=("localhost", "vprompt.lab"))  # fmt: skip
    with TestClient(create_app(settings), base_url="http://vprompt.lab") as c:
        assert c.get("/api/health").status_code == 200
    with TestClient(create_app(settings), base_url="http://other.lab") as c:
        error(c.get("/api/health"), 400, "bad_host")


def test_cross_origin_writes_are_refused(client: TestClient, photo_png: bytes) -> None:
    files = {"file": ("p.png", photo_png, "image/png")}
    for headers in (
        {"origin": "http://attacker.example"},
        {"origin": "http://localhost:9999"},  # another port is another origin
        {"origin": "null"},
        {"sec-fetch-site": "cross-site"},
    ):
        r = client.post("/api/images", files=files, headers=headers)
        assert "another web origin" in error(r, 403, "cross_origin")
    assert client.post(
        "/api/images", files=files, headers={"origin": "http://localhost"}
    ).is_success
    assert client.post("/api/images", files=files).is_success  # no Origin: not a browser
    r = client.get("/api/health", headers={"origin": "http://attacker.example"})
    assert r.status_code == 200  # reading is what the Host check guards


def test_default_allowed_hosts_follow_the_bound_address() -> None:
    import socket

    from vprompt.serve.security import default_allowed_hosts, host_name

    assert set(default_allowed_hosts("127.0.0.1")) == {"localhost", "127.0.0.1", "::1"}
    assert "192.168.1.7" in default_allowed_hosts("192.168.1.7")
    wildcard = default_allowed_hosts("0.0.0.0")
    assert socket.gethostname().lower() in wildcard
    assert "0.0.0.0" not in wildcard
    assert host_name("[::1]:8000") == "::1"
    assert host_name("LocalHost:80") == "localhost"


def test_sixteen_bit_images_are_converted_band_by_band() -> None:
    """A 16-bit scan becomes 8 bits without a float64 copy of the whole image (an upload of a
    36-megapixel 16-bit PNG used to cost 8 bytes per pixel more than its pixels)."""
    import tracemalloc

    from vprompt.data.images import to_rgb

    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, (2000, 2000), dtype=np.uint16)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    tracemalloc.start()
    try:
        rgb = to_rgb(img)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    expected = np.round(values.astype(np.float64) / 257.0).astype(np.uint8)
    assert np.array_equal(np.asarray(rgb)[..., 0], expected)
    assert peak < 24 * 2**20, peak  # float64 copies alone would be 64 MiB


def test_concurrent_decodes_are_bounded(photo_png: bytes, monkeypatch) -> None:
    from vprompt.serve import routes

    settings = ServeSettings(model="sam:tiny", weights="none", device="cpu",
                             max_concurrent_decodes=2)  # fmt: skip
    active, peak, lock = [0], [0], threading.Lock()
    real = routes.decode_upload

    def slow(data, **kwargs):  # type: ignore[no-untyped-def]
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        try:
            return real(data, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(routes, "decode_upload", slow)
    files = {"file": ("a.png", photo_png, "image/png")}
    with (
        TestClient(create_app(settings), base_url="http://localhost") as c,
        ThreadPoolExecutor(max_workers=6) as pool,
    ):
        codes = list(pool.map(lambda _: c.post("/api/images", files=files).status_code, range(6)))
    assert codes == [201] * 6
    assert peak[0] == 2


def test_automatic_work_is_bounded_per_request(client: TestClient, image_id: str) -> None:
    from vprompt.segment.automatic import AutomaticMaskConfig

    assert AutomaticMaskConfig(points_per_side=32).work() == (1024, 1)
    assert AutomaticMaskConfig(points_per_side=32, crop_n_layers=1).work() == (5120, 5)
    heavy = {"points_per_side": 128, "crop_n_layers": 3}
    started = time.perf_counter()
    msg = error(client.post(f"/api/images/{image_id}/automatic", json=heavy), 422, "too_much_work")
    assert time.perf_counter() - started < 5  # refused before any model work
    assert "1392640 point prompts over 85 crop(s)" in msg
    assert "allows 4096 prompts and 5 crops" in msg


def test_automatic_work_stops_when_the_client_goes_away(client: TestClient, image_id: str) -> None:
    """An ASGI client that disconnects right after its request: the generator stops at its
    next batch and the model is free again at once."""
    import anyio

    app = client.app
    service = app.state.service  # type: ignore[attr-defined]
    batches = []
    real_decode = service.segmenter.decode

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        batches.append(1)
        time.sleep(0.05)
        return real_decode(*args, **kwargs)

    body = json.dumps({"points_per_side": 64, "pred_iou_thresh": 0}).encode()
    scope = {
        "type": "http", "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": f"/api/images/{image_id}/automatic", "raw_path": b"", "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 1), "server": ("localhost", 80),
        "headers": [(b"host", b"localhost"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
    }  # fmt: skip
    sent = []

    async def scenario() -> None:
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        hang_up = time.perf_counter() + 0.3  # the client leaves while the masks are computed

        async def receive() -> dict:
            if messages:
                return messages.pop(0)
            if time.perf_counter() < hang_up:
                await anyio.sleep(60)  # nothing to receive yet (a poll cancels this wait)
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        await app(scope, receive, send)

    service.segmenter.decode = counting
    try:
        started = time.perf_counter()
        anyio.run(scenario)
        elapsed = time.perf_counter() - started
    finally:
        service.segmenter.decode = real_decode
    assert len(batches) < 64  # 64 x 64 points in batches of 64 would be 64 batches
    assert elapsed < 3.0
    assert sent[0]["status"] == 499
    assert service.runner._thread_lock.acquire(timeout=1)  # the model is free
    service.runner._thread_lock.release()


def test_the_api_docs_page_works_offline(small_client) -> None:
    """/docs is Swagger UI from files this server serves (no CDN), so it renders on an
    air-gapped machine; FastAPI's CDN pages are off."""
    page = small_client.get("/docs")
    assert page.status_code == 200
    html = page.text
    assert "/docs-assets/swagger-ui-bundle.js" in html
    assert "/docs-assets/swagger-ui.css" in html
    for remote in ("cdn.", "http://", "https://"):
        assert remote not in html
    for asset, kind in (("swagger-ui-bundle.js", "javascript"), ("swagger-ui.css", "css")):
        res = small_client.get(f"/docs-assets/{asset}")
        assert res.status_code == 200
        assert kind in res.headers["content-type"]
        assert len(res.content) > 100_000
    assert small_client.get("/openapi.json").json()["info"]["title"] == "vprompt"
    assert small_client.get("/redoc").status_code == 404


def test_candidates_return_every_mask_with_the_best_first_class(
    client: TestClient, image_id: str
) -> None:
    click, box = {"points": [[30, 30, 1]]}, {"box": [1, 1, 40, 30]}
    plain = segment(client, image_id, [click, box], format="rle").json()["objects"]
    assert all("candidates" not in o for o in plain)
    r = segment(client, image_id, [click, box], format="rle", candidates=True)
    assert r.status_code == 200, r.text
    one, two = r.json()["objects"]
    assert len(one["candidates"]) == 3
    assert len(two["candidates"]) == 1
    for got, want in zip((one, two), plain, strict=True):
        # The object's own fields are its best candidate's, and equal the plain answer's.
        best = got["candidates"][got["best"]]
        assert got["score"] == best["score"] == max(c["score"] for c in got["candidates"])
        assert got["mask"] == best["mask"] == want["mask"]
        assert {c["logits"] for c in got["candidates"]} != {want["logits"]}
    # Any candidate's token refines.
    token = one["candidates"][0]["logits"]
    r = segment(client, image_id, [{**click, "previous": token}], candidates=True)
    assert r.status_code == 200, r.text
