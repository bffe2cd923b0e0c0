"""The `vprompt serve` web page end to end: the real server in a subprocess (sam:tiny with
random weights, CPU, offline) and Debian's Chromium driven headless through Playwright.

Needs `playwright` (the `dev` extra) and `/usr/bin/chromium` (`scripts/install-assets.sh`
installs Debian's package when run as root); never `playwright install`.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve_process import CHROMIUM, chromium, running_server

pytestmark = pytest.mark.slow

if not CHROMIUM.exists():
    pytest.skip(
        f"{CHROMIUM} is missing (Debian's chromium: `sudo apt-get install chromium`, "
        "or run scripts/install-assets.sh as root)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')"
)
_NO_SERVE = "the serve extra is not installed (pip install -e '.[serve]')"
pytest.importorskip("fastapi", reason=_NO_SERVE)
pytest.importorskip("uvicorn", reason=_NO_SERVE)


# Non-transparent pixels on the mask overlay canvas (the live segmentation display).
OVERLAY_COUNT = """() => {
  const c = document.querySelector('[data-testid=overlay]');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
  return n;
}"""
IDLE = "document.querySelector('[data-testid=app]').dataset.pending === '0'"


def _post_file(url: str, name: str, data: bytes, content_type: str) -> tuple[int, dict]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        url, data=body, method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`vprompt serve` on a free loopback port (tiny random SAM and CLIP); yields its URL."""
    args = [
        "-m", "vprompt", "serve",
        "--model", "sam:tiny", "--weights", "none", "--device", "cpu",
        "--classifier", "clip:tiny", "--classifier-weights", "none",
        "--inspect-model", "torchvision:tiny", "--inspect-weights", "none", "--inspect-size", "128",
    ]  # fmt: skip
    with running_server(args, tmp_path_factory.mktemp("serve")) as base:
        yield base


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with chromium(sync_api) as launched:
        yield launched


@pytest.fixture
def page(browser, server: str) -> Iterator[object]:
    context = browser.new_context(viewport={"width": 1280, "height": 820}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    page_errors: list[str] = []
    page.on("pageerror", lambda err: page_errors.append(str(err)))
    page.goto(server + "/")
    page.wait_for_function("window.vprompt !== undefined")
    yield page
    context.close()
    assert not page_errors, f"JavaScript errors on the page: {page_errors}"


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real photo (scikit-image's coffee cup, 600 x 400)."""
    import skimage.data

    path = tmp_path_factory.mktemp("photo") / "coffee.png"
    Image.fromarray(skimage.data.coffee()).save(path)
    return path


def _open(page, path: Path) -> tuple[int, int]:
    page.set_input_files("[data-testid=file-input]", str(path))
    page.wait_for_function("window.vprompt.imageId !== null")
    page.wait_for_function(IDLE)
    return tuple(page.evaluate("window.vprompt.imageSize"))


def _canvas_box(page) -> dict[str, float]:
    box = page.locator("[data-testid=canvas]").bounding_box()
    assert box is not None
    assert box["width"] > 100
    assert box["height"] > 100
    return box


def _overlay(page) -> int:
    return int(page.evaluate(OVERLAY_COUNT))


def _wait_overlay(page, more_than: int) -> int:
    page.wait_for_function(f"{IDLE} && ({OVERLAY_COUNT})() > {more_than}")
    return _overlay(page)


def _alert_text(page) -> str:
    alert = page.locator("[role=alert]")
    return alert.inner_text() if alert.is_visible() else ""


def _screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    artifacts = os.environ.get("VPROMPT_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(artifacts) / name)
    return path


def test_click_undo_redo_box_and_exports(page, photo: Path, tmp_path: Path):
    from vprompt.segment.outputs import decode_rle

    width, height = _open(page, photo)
    assert (width, height) == Image.open(photo).size
    assert "sam:tiny" in page.locator("#model-info").inner_text()
    box = _canvas_box(page)
    # Fit to the viewport, aspect ratio kept.
    assert box["width"] / box["height"] == pytest.approx(width / height, rel=0.01)
    assert _overlay(page) == 0

    # Positive click in the middle -> a mask overlay; the point lands in image pixels.
    page.click("[data-testid=tool-positive]")
    page.locator("[data-testid=canvas]").click(
        position={"x": box["width"] * 0.5, "y": box["height"] * 0.5}
    )
    first = _wait_overlay(page, 0)
    prompts = page.evaluate("window.vprompt.prompts()")
    x, y, label = prompts[0]["points"][0]
    assert label == 1
    assert x == pytest.approx(width / 2, abs=width / box["width"] + 0.01)
    assert y == pytest.approx(height / 2, abs=height / box["height"] + 0.01)
    assert not _alert_text(page)

    # Undo removes the mask, redo brings the same one back.
    page.click("[data-testid=undo]")
    assert _overlay(page) == 0
    assert page.evaluate("window.vprompt.prompts()")[0] == {}
    page.click("[data-testid=redo]")
    assert _wait_overlay(page, 0) == first

    # A second object from a box drag.
    page.click("[data-testid=new-object]")
    page.click("[data-testid=tool-box]")
    assert page.get_attribute("[data-testid=tool-box]", "aria-pressed") == "true"
    x0, y0 = box["x"] + box["width"] * 0.05, box["y"] + box["height"] * 0.08
    x1, y1 = box["x"] + box["width"] * 0.35, box["y"] + box["height"] * 0.45
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move((x0 + x1) / 2, (y0 + y1) / 2, steps=4)
    page.mouse.move(x1, y1, steps=4)
    page.mouse.up()
    page.wait_for_function(IDLE)
    page.wait_for_function(
        "window.vprompt.prompts().length === 2 && window.vprompt.prompts()[1].box"
    )
    drawn = page.evaluate("window.vprompt.prompts()")[1]["box"]
    expected = [width * 0.05, height * 0.08, width * 0.35, height * 0.45]
    assert drawn == pytest.approx(expected, abs=2 * width / box["width"])
    page.wait_for_function(IDLE)
    assert not _alert_text(page)
    assert page.locator("[data-testid=object-list] li").count() == 2
    _wait_overlay(page, 0)

    _screenshot(page, tmp_path, "serve_page.png")

    # Label-image PNG download: the image's size, labels 0 (background), 1 and 2.
    page.select_option("[data-testid=export-kind]", "labels")
    with page.expect_download() as download:
        page.click("[data-testid=export-png]")
    labels_path = tmp_path / "labels.png"
    download.value.save_as(labels_path)
    labels_img = Image.open(labels_path)
    assert labels_img.size == (width, height)
    labels = np.asarray(labels_img)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2}
    assert (labels == 1).any()

    # The active object's mask as a 0/255 PNG.
    page.select_option("[data-testid=export-kind]", "active")
    with page.expect_download() as download:
        page.click("[data-testid=export-png]")
    active_path = tmp_path / "active.png"
    download.value.save_as(active_path)
    active = np.asarray(Image.open(active_path))
    assert active.shape == (height, width)
    assert set(np.unique(active).tolist()) <= {0, 255}

    # COCO JSON (keyboard: Shift+E) with RLE that decodes to what the PNGs hold.
    page.locator("[data-testid=canvas]").focus()
    with page.expect_download() as download:
        page.keyboard.press("Shift+E")
    coco = json.loads(Path(download.value.path()).read_text())
    assert coco["images"][0]["width"] == width
    assert coco["images"][0]["height"] == height
    anns = {a["vprompt_label"]: a for a in coco["annotations"]}
    assert 1 in anns
    one = decode_rle(anns[1]["segmentation"])
    assert one.shape == (height, width)
    assert anns[1]["area"] == int(one.sum()) > 0
    # Object 1 may be partly covered by object 2 in the label image, never the reverse.
    assert ((labels == 1) <= one).all()
    if 2 in anns:
        two = decode_rle(anns[2]["segmentation"])
        np.testing.assert_array_equal(two, labels == 2)
        np.testing.assert_array_equal(two, active == 255)

    # One image open: YOLO-seg and Pascal VOC are single files (the ZIP is for several).
    with page.expect_download() as download:
        page.click("[data-testid=export-yolo]")
    assert download.value.suggested_filename == "coffee.txt"
    lines = Path(download.value.path()).read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["0"] * len(coco["annotations"])
    with page.expect_download() as download:
        page.click("[data-testid=export-voc]")
    assert download.value.suggested_filename == "coffee.xml"
    assert Path(download.value.path()).read_text().count("<object>") == len(coco["annotations"])


def test_keyboard_tools_clear_and_scribble(page, photo: Path):
    _open(page, photo)
    box = _canvas_box(page)
    canvas = page.locator("[data-testid=canvas]")
    canvas.focus()
    for key, name in (("b", "box"), ("s", "scribble"), ("n", "negative"), ("p", "positive")):
        page.keyboard.press(key)
        assert page.get_attribute(f"[data-testid=tool-{name}]", "aria-pressed") == "true"

    # A freehand positive scribble.
    page.keyboard.press("s")
    sx, sy = box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.6
    page.mouse.move(sx, sy)
    page.mouse.down()
    for k in range(1, 9):
        page.mouse.move(sx + k * 12, sy - k * 6)
    page.mouse.up()
    count = _wait_overlay(page, 0)
    scribble = page.evaluate("window.vprompt.prompts()")[0]["scribbles"][0]
    assert scribble["positive"] is True
    assert len(scribble["points"]) >= 2

    # Delete clears, Ctrl+Z restores, Ctrl+Y / Ctrl+Shift+Z redo the clear.
    canvas.focus()
    page.keyboard.press("Delete")
    assert _overlay(page) == 0
    page.keyboard.press("Control+z")
    assert _wait_overlay(page, 0) == count
    page.keyboard.press("Control+y")
    assert _overlay(page) == 0
    page.keyboard.press("Control+z")
    page.keyboard.press("Control+Shift+Z")
    assert _overlay(page) == 0

    # Refinement: a negative click on the scribbled object sends all its prompts plus the
    # `previous` logits token of its last mask.
    page.keyboard.press("Control+z")
    assert _overlay(page) == count
    page.keyboard.press("n")
    with page.expect_request(lambda r: r.url.endswith("/segment")) as request:
        canvas.click(position={"x": box["width"] * 0.9, "y": box["height"] * 0.1})
    sent = request.value.post_data_json
    assert sent["format"] == "png"
    (obj,) = sent["objects"]
    assert obj["previous"]
    assert obj["scribbles"][0]["positive"] is True
    assert obj["points"][0][2] == 0
    page.wait_for_function(IDLE)
    assert not _alert_text(page)
    assert _overlay(page) > 0

    # "o" makes a new object; buttons work from the keyboard (Enter on a focused button).
    page.keyboard.press("o")
    assert page.locator("[data-testid=object-list] li").count() == 2
    page.focus("[data-testid=undo]")
    page.keyboard.press("Enter")
    assert page.locator("[data-testid=object-list] li").count() == 1
    assert not _alert_text(page)


def test_api_error_is_shown_to_the_user(page, server: str, tmp_path: Path):
    text_file = tmp_path / "notes.png"  # the server sniffs content, not names
    text_file.write_text("this is not an image\n")
    status, body = _post_file(
        f"{server}/api/images", text_file.name, text_file.read_bytes(), "image/png"
    )
    assert status == 415
    message = body["error"]["message"]

    page.set_input_files("[data-testid=file-input]", str(text_file))
    alert = page.locator("[role=alert]")
    alert.wait_for(state="visible")
    assert message in alert.inner_text()
    assert page.evaluate("window.vprompt.imageId") is None


def test_drop_everything_and_classify(page, tmp_path: Path):
    import skimage.data

    path = tmp_path / "chelsea.png"
    Image.fromarray(skimage.data.chelsea()).save(path)
    # Drag and drop: a real File in a DataTransfer, dropped on the stage.
    page.evaluate(
        """async ([b64, name]) => {
          const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
          const dt = new DataTransfer();
          dt.items.add(new File([bytes], name, {type: "image/png"}));
          const stage = document.querySelector("[data-testid=stage]");
          for (const type of ["dragenter", "dragover", "drop"]) {
            const init = {dataTransfer: dt, bubbles: true, cancelable: true};
            stage.dispatchEvent(new DragEvent(type, init));
          }
        }""",
        [base64.b64encode(path.read_bytes()).decode(), path.name],
    )
    page.wait_for_function("window.vprompt.imageId !== null")
    page.wait_for_function(IDLE)
    assert page.evaluate("window.vprompt.imageSize") == list(Image.open(path).size)

    # "Everything" on a coarse grid; the tiny random model needs the thresholds off.
    page.fill("[data-testid=points-per-side]", "4")
    page.fill("[data-testid=pred-iou-thresh]", "0")
    page.fill("[data-testid=stability-thresh]", "0")
    page.click("[data-testid=automatic]")
    page.wait_for_function(IDLE)
    assert not _alert_text(page)
    n_objects = page.locator("[data-testid=object-list] li").count()
    assert n_objects >= 1
    assert _overlay(page) > 0
    assert "Everything" in page.inner_text("[data-testid=status]")
    page.click("[data-testid=undo]")
    assert _overlay(page) == 0
    assert page.locator("[data-testid=object-list] li").count() == 1

    # Zero-shot classification of the current image with the server's CLIP.
    page.fill("[data-testid=classify-classes]", "cat, coffee cup, dog")
    page.click("[data-testid=classify]")
    page.wait_for_function(
        "document.querySelectorAll('[data-testid=classify-results] li').length > 0"
    )
    assert not _alert_text(page)
    labels = [
        t.split(" — ")[0]
        for t in page.locator("[data-testid=classify-results] li").all_inner_texts()
    ]
    assert sorted(labels) == ["cat", "coffee cup", "dog"]
    assert "zero-shot" in page.inner_text("[data-testid=classify-source]")


def _segment_point(page, action) -> list[float]:
    """The first point of the last object in the /segment request that `action` causes."""
    with page.expect_request(lambda r: r.url.endswith("/segment")) as request:
        action()
    page.wait_for_function(IDLE)
    return request.value.post_data_json["objects"][-1]["points"][0]


def _set_range(page, testid: str, value: float) -> None:
    page.evaluate(
        """([id, v]) => {
          const input = document.querySelector(`[data-testid=${id}]`);
          input.value = String(v);
          input.dispatchEvent(new Event("input", {bubbles: true}));
        }""",
        [testid, value],
    )


def test_labelling_labels_candidates_look_brush_toolbar_and_zoom(page, photo: Path, tmp_path: Path):
    from vprompt.segment.outputs import decode_rle

    # The toolbar fits a 1280 px window on one line, every button in view.
    page.set_viewport_size({"width": 1280, "height": 800})
    toolbar = page.locator("header.toolbar")
    fits = toolbar.evaluate("t => [t.scrollWidth, t.clientWidth]")
    assert fits[0] <= fits[1], fits
    bar = toolbar.bounding_box()
    assert bar is not None
    assert bar["height"] < 60  # one row
    for button in toolbar.locator("button, label.button").all():
        assert button.is_visible()
        b = button.bounding_box()
        assert b is not None
        assert bar["x"] <= b["x"] <= b["x"] + b["width"] <= bar["x"] + bar["width"]
    assert page.locator("[data-testid=classify-panel]").is_visible()  # a classifier is loaded

    width, height = _open(page, photo)
    box = _canvas_box(page)

    # Labels: rename the default one, add one (it becomes active; the empty object takes it).
    page.fill("[data-testid=label-name-1]", "table")
    page.press("[data-testid=label-name-1]", "Enter")
    page.fill("[data-testid=new-label]", "cup")
    page.click("[data-testid=add-label]")
    assert page.evaluate("window.vprompt.labels()") == [
        {"id": 1, "name": "table", "active": False},
        {"id": 2, "name": "cup", "active": True},
    ]
    page.locator("[data-testid=canvas]").click(
        position={"x": box["width"] * 0.5, "y": box["height"] * 0.5}
    )
    _wait_overlay(page, 0)
    (obj,) = page.evaluate("window.vprompt.objects()")
    assert (obj["label"], obj["labelName"]) == (2, "cup")
    assert page.inner_text("[data-testid=object-label-1]") == "cup"

    # A lone click has SAM's three candidates; hovering one previews it, clicking chooses it.
    assert len(obj["candidates"]) == 3
    assert page.locator("[data-testid=candidate-list] button").count() == 3
    shown = _overlay(page)
    other = max(
        (k for k in range(3) if k != obj["choice"]),
        key=lambda k: abs(obj["candidates"][k] - obj["area"]),
    )
    assert obj["candidates"][other] != obj["area"]
    page.hover(f"[data-testid=candidate-{other}]")
    previewed = _overlay(page)
    assert previewed != shown
    page.hover("#objects-title")
    assert _overlay(page) == shown
    page.click(f"[data-testid=candidate-{other}]")
    page.hover("#objects-title")
    (obj,) = page.evaluate("window.vprompt.objects()")
    assert obj["choice"] == other
    assert obj["area"] == obj["candidates"][other]
    assert _overlay(page) == previewed
    assert page.get_attribute(f"[data-testid=candidate-{other}]", "aria-pressed") == "true"

    # Opacity 0 and hiding take the object off the overlay; both come back.
    _set_range(page, "object-opacity-1", 0)
    assert _overlay(page) == 0
    _set_range(page, "object-opacity-1", 1)
    assert _overlay(page) == previewed
    page.click("[data-testid=object-hide-1]")
    assert page.get_attribute("[data-testid=object-hide-1]", "aria-pressed") == "true"
    assert _overlay(page) == 0
    page.click("[data-testid=object-hide-1]")
    assert _overlay(page) == previewed

    # Brush and eraser correct the mask (one undo step each): paint a stroke low on the
    # image, erase one across the clicked middle.
    def stroke(tool: str, fy: float, fx0: float, fx1: float) -> None:
        page.click(f"[data-testid=tool-{tool}]")
        y = box["y"] + box["height"] * fy
        page.mouse.move(box["x"] + box["width"] * fx0, y)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * fx1, y, steps=5)
        page.mouse.up()

    page.fill("[data-testid=brush-width]", "12")
    steps = page.evaluate("window.vprompt.historyLength")
    areas = [obj["area"]]
    stroke("paint", 0.9, 0.1, 0.3)
    areas.append(page.evaluate("window.vprompt.objects()")[0]["area"])
    stroke("erase", 0.5, 0.4, 0.6)
    assert page.evaluate("window.vprompt.historyLength") == steps + 2
    (obj,) = page.evaluate("window.vprompt.objects()")
    areas.append(obj["area"])
    assert areas[0] <= areas[1]
    assert areas[2] <= areas[1]
    assert areas[0] != areas[1] or areas[1] != areas[2]
    assert obj["candidates"] == []  # a hand-corrected mask has no candidates
    page.click("[data-testid=tool-positive]")

    # Key 1 picks "table" for a new box object; then object 2 is relabelled from its row.
    canvas = page.locator("[data-testid=canvas]")
    canvas.focus()
    page.keyboard.press("o")
    page.keyboard.press("1")
    page.keyboard.press("b")
    x0, y0 = box["x"] + box["width"] * 0.05, box["y"] + box["height"] * 0.08
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x0 + box["width"] * 0.3, y0 + box["height"] * 0.35, steps=4)
    page.mouse.up()
    page.wait_for_function(IDLE)
    page.wait_for_function("window.vprompt.objects().length === 2")
    assert [o["label"] for o in page.evaluate("window.vprompt.objects()")] == [2, 1]
    _screenshot(page, tmp_path, "serve_labelling.png")

    with page.expect_download() as download:
        page.click("[data-testid=export-coco]")
    coco = json.loads(Path(download.value.path()).read_text())
    assert coco["categories"] == [
        {"id": 1, "name": "table", "supercategory": "object"},
        {"id": 2, "name": "cup", "supercategory": "object"},
    ]
    by_object = {a["vprompt_object"]: a for a in coco["annotations"]}
    assert by_object[1]["category_id"] == 2
    assert by_object[1]["area"] == obj["area"]
    corrected = decode_rle(by_object[1]["segmentation"])
    assert corrected[int(height * 0.9), int(width * 0.2)]  # painted
    assert not corrected[int(height * 0.5), int(width * 0.5)]  # erased
    assert not corrected[int(height * 0.5), int(width * 0.5) - 3 : int(width * 0.5) + 4].any()
    if 2 in by_object:
        assert by_object[2]["category_id"] == 1
    page.select_option("[data-testid=object-label-select-2]", "2")
    assert [o["label"] for o in page.evaluate("window.vprompt.objects()")] == [2, 2]

    # Zoom and pan: clicks still land on the right image pixels.
    page.keyboard.press("p")
    stage = page.locator("[data-testid=stage]").bounding_box()
    assert stage is not None
    cx, cy = stage["x"] + stage["width"] / 2, stage["y"] + stage["height"] / 2
    page.click("[data-testid=zoom-in]")
    page.click("[data-testid=zoom-in]")
    assert page.evaluate("window.vprompt.zoom") == pytest.approx(1.5625)
    zoomed = _canvas_box(page)
    scale = zoomed["width"] / width  # CSS px per image px
    assert scale == pytest.approx(1.5625 * box["width"] / width, rel=0.01)
    page.click("[data-testid=new-object]")
    tol = 1.5 / scale + 0.5
    x, y, _ = _segment_point(page, lambda: page.mouse.click(cx, cy))
    assert (x, y) == pytest.approx((width / 2, height / 2), abs=tol)
    # Middle-button drag pans by (60, 40) screen px.
    page.mouse.move(cx, cy)
    page.mouse.down(button="middle")
    page.mouse.move(cx + 30, cy + 20, steps=2)
    page.mouse.move(cx + 60, cy + 40, steps=2)
    page.mouse.up(button="middle")
    page.click("[data-testid=new-object]")
    x, y, _ = _segment_point(page, lambda: page.mouse.click(cx, cy))
    assert (x, y) == pytest.approx((width / 2 - 60 / scale, height / 2 - 40 / scale), abs=tol)
    # The wheel zooms about the pointer: the image point under it stays put.
    qx, qy = cx - 80, cy + 50
    before = _canvas_box(page)
    expected = (
        (qx - before["x"]) / before["width"] * width,
        (qy - before["y"]) / before["height"] * height,
    )
    page.mouse.move(qx, qy)
    page.mouse.wheel(0, -300)
    page.wait_for_function("window.vprompt.zoom > 1.6")
    page.click("[data-testid=new-object]")
    x, y, _ = _segment_point(page, lambda: page.mouse.click(qx, qy))
    scale = _canvas_box(page)["width"] / width
    assert (x, y) == pytest.approx(expected, abs=1.5 / scale + 0.5)
    page.click("[data-testid=zoom-fit]")
    assert page.evaluate("window.vprompt.zoom") == 1
    assert not _alert_text(page)


def test_classify_panel_hidden_without_a_classifier(browser, server: str):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    body = json.dumps(
        {"segmenter": {"name": "sam:tiny", "weights": "none", "kinds": []},
         "classifier": None, "packs": []}
    )  # fmt: skip
    page.route("**/api/models", lambda route: route.fulfill(
        status=200, content_type="application/json", body=body))  # fmt: skip
    page.goto(server + "/")
    page.wait_for_function("document.querySelector('#model-info').textContent.includes('none')")
    assert not page.locator("[data-testid=classify-panel]").is_visible()
    context.close()


def _zip_download(page, testid: str) -> dict[str, str]:
    import io
    import zipfile

    with page.expect_download() as download:
        page.click(f"[data-testid={testid}]")
    data = Path(download.value.path()).read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        return {name: archive.read(name).decode() for name in archive.namelist()}


def _yolo_polygons(text: str) -> list[tuple[int, np.ndarray]]:
    out = []
    for line in text.splitlines():
        cls, *coords = line.split()
        xy = np.array([float(v) for v in coords]).reshape(-1, 2)
        assert len(xy) >= 3
        assert ((xy >= 0) & (xy <= 1)).all()
        out.append((int(cls), xy))
    return out


def _drop_files(page, paths: list[Path]) -> None:
    page.evaluate(
        """async (files) => {
          const dt = new DataTransfer();
          for (const [b64, name] of files) {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            dt.items.add(new File([bytes], name, {type: "image/png"}));
          }
          const stage = document.querySelector("[data-testid=stage]");
          for (const type of ["dragenter", "dragover", "drop"]) {
            const init = {dataTransfer: dt, bubbles: true, cancelable: true};
            stage.dispatchEvent(new DragEvent(type, init));
          }
        }""",
        [[base64.b64encode(p.read_bytes()).decode(), p.name] for p in paths],
    )


def test_image_queue_session_save_restore_yolo_and_voc(page, tmp_path: Path):
    import xml.etree.ElementTree as ET

    from vprompt.segment.outputs import decode_rle

    # Three small generated images and one file the server refuses, opened together.
    rng = np.random.default_rng(0)
    paths = []
    for k, name in enumerate(("a.png", "b.png", "c.png")):
        pixels = rng.integers(0, 60, (64, 96, 3), dtype=np.uint8)
        pixels[16:48, 20 + 10 * k : 60 + 10 * k] = (200, 120 + 40 * k, 40)
        Image.fromarray(pixels).save(tmp_path / name)
        paths.append(tmp_path / name)
    broken = tmp_path / "broken.png"
    broken.write_text("not an image\n")
    chosen = [str(paths[0]), str(broken), *map(str, paths[1:])]
    page.set_input_files("[data-testid=file-input]", chosen)
    page.wait_for_function(f"window.vprompt.queue.length === 3 && {IDLE}")
    assert page.evaluate("window.vprompt.queue") == {
        "index": 0, "length": 3, "names": ["a.png", "b.png", "c.png"],
    }  # fmt: skip
    assert "broken.png" in _alert_text(page)  # its error is shown, the queue goes on
    position = page.locator("[data-testid=queue-position]")
    assert position.inner_text() == "1 / 3"
    assert page.is_disabled("[data-testid=prev-image]")
    W, H = 96, 64

    # Image a: one click object (label "object"); image b: a "dog" painted with the brush.
    box = _canvas_box(page)
    middle = {"x": box["width"] * 0.5, "y": box["height"] * 0.5}
    page.locator("[data-testid=canvas]").click(position=middle)
    _wait_overlay(page, 0)
    a_objects = page.evaluate("window.vprompt.objects()")
    assert len(a_objects) == 1
    assert a_objects[0]["area"] > 0
    page.fill("[data-testid=new-label]", "dog")
    page.click("[data-testid=add-label]")
    page.locator("[data-testid=canvas]").focus()
    page.keyboard.press(".")
    assert position.inner_text() == "2 / 3"
    assert page.evaluate("window.vprompt.queue.index") == 1
    assert _overlay(page) == 0
    assert [o["area"] for o in page.evaluate("window.vprompt.objects()")] == [0]
    page.fill("[data-testid=brush-width]", "6")
    page.click("[data-testid=tool-paint]")
    box = _canvas_box(page)
    y = box["y"] + box["height"] * 0.5
    page.mouse.move(box["x"] + box["width"] * 0.25, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, y, steps=4)
    page.mouse.up()
    (b_object,) = page.evaluate("window.vprompt.objects()")
    assert b_object["area"] > 0
    assert (b_object["label"], b_object["labelName"]) == (2, "dog")
    page.click("[data-testid=tool-positive]")

    # Back and forth: each image keeps its objects (and undo history).
    page.locator("[data-testid=canvas]").focus()
    page.keyboard.press(",")
    assert position.inner_text() == "1 / 3"
    assert page.evaluate("window.vprompt.objects()") == a_objects
    assert _overlay(page) > 0
    page.click("[data-testid=next-image]")
    page.click("[data-testid=next-image]")
    assert position.inner_text() == "3 / 3"
    assert page.is_disabled("[data-testid=next-image]")
    assert [o["area"] for o in page.evaluate("window.vprompt.objects()")] == [0]
    page.click("[data-testid=prev-image]")
    assert page.evaluate("window.vprompt.objects()") == [b_object]
    assert page.evaluate("window.vprompt.historyLength") == 2  # the empty start + the stroke

    # The session as one COCO file: every image, both masks, the label list.
    with page.expect_download() as download:
        page.click("[data-testid=save-session]")
    session_path = tmp_path / download.value.suggested_filename
    download.value.save_as(session_path)
    session = json.loads(session_path.read_text())
    assert [(i["id"], i["file_name"], i["width"], i["height"]) for i in session["images"]] == [
        (1, "a.png", W, H), (2, "b.png", W, H), (3, "c.png", W, H),
    ]  # fmt: skip
    assert [(c["id"], c["name"]) for c in session["categories"]] == [(1, "object"), (2, "dog")]
    anns = {a["image_id"]: a for a in session["annotations"]}
    assert sorted(anns) == [1, 2]
    assert len(session["annotations"]) == 2
    assert (anns[1]["category_id"], anns[2]["category_id"]) == (1, 2)
    for ann, obj in ((anns[1], a_objects[0]), (anns[2], b_object)):
        mask = decode_rle(ann["segmentation"])
        assert mask.shape == (H, W)
        assert ann["area"] == int(mask.sum()) == obj["area"]
        ys, xs = np.nonzero(mask)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]

    # YOLO-seg: one .txt per image in a ZIP, class = position in the label list, polygons in
    # [0, 1]; the painted stroke is one component, so its outline spans exactly its bbox.
    yolo = _zip_download(page, "export-yolo")
    assert sorted(yolo) == ["a.txt", "b.txt", "c.txt", "classes.txt"]
    assert yolo["classes.txt"].split() == ["object", "dog"]
    assert yolo["c.txt"] == ""
    ((cls_b, poly_b),) = _yolo_polygons(yolo["b.txt"])
    assert cls_b == 1
    x, y0, w, h = anns[2]["bbox"]
    np.testing.assert_allclose(
        [poly_b[:, 0].min(), poly_b[:, 1].min(), poly_b[:, 0].max(), poly_b[:, 1].max()],
        [x / W, y0 / H, (x + w) / W, (y0 + h) / H], atol=1e-5,
    )  # fmt: skip
    ((cls_a, poly_a),) = _yolo_polygons(yolo["a.txt"])
    assert cls_a == 0
    x, y0, w, h = anns[1]["bbox"]  # the largest component lies inside the mask's bbox
    assert poly_a[:, 0].min() >= x / W - 1e-5
    assert poly_a[:, 0].max() <= (x + w) / W + 1e-5
    assert poly_a[:, 1].min() >= y0 / H - 1e-5
    assert poly_a[:, 1].max() <= (y0 + h) / H + 1e-5

    # Pascal VOC: one XML per image, 1-based inclusive boxes.
    voc = _zip_download(page, "export-voc")
    assert sorted(voc) == ["a.xml", "b.xml", "c.xml"]
    for name, image_id in (("a.xml", 1), ("b.xml", 2), ("c.xml", 3)):
        root = ET.fromstring(voc[name])
        assert root.findtext("filename") == name.replace(".xml", ".png")
        assert (int(root.findtext("size/width")), int(root.findtext("size/height"))) == (W, H)
        objects = root.findall("object")
        if image_id == 3:
            assert objects == []
            continue
        (obj,) = objects
        assert obj.findtext("name") == ("object" if image_id == 1 else "dog")
        x, y0, w, h = anns[image_id]["bbox"]
        bndbox = [int(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
        assert bndbox == [x + 1, y0 + 1, x + w, y0 + h]

    # A file that is not COCO: a clear message, nothing changes.
    bogus = tmp_path / "bogus.json"
    bogus.write_text(json.dumps({"images": 3}))
    page.set_input_files("[data-testid=restore-input]", str(bogus))
    page.wait_for_function("document.querySelector('[data-testid=alert]').hidden === false")
    assert "bogus.json" in _alert_text(page)
    assert "Nothing was changed" in _alert_text(page)
    assert page.evaluate("window.vprompt.objects()") == [b_object]

    # A fresh page: drop the three images, restore the session; objects and labels come back.
    page.reload()
    page.wait_for_function("window.vprompt !== undefined")
    _drop_files(page, paths)
    page.wait_for_function(f"window.vprompt.queue.length === 3 && {IDLE}")
    assert [o["area"] for o in page.evaluate("window.vprompt.objects()")] == [0]
    page.set_input_files("[data-testid=restore-input]", str(session_path))
    page.wait_for_function("window.vprompt.labels().length === 2")
    assert not _alert_text(page)
    assert [(lab["id"], lab["name"]) for lab in page.evaluate("window.vprompt.labels()")] == [
        (1, "object"), (2, "dog"),
    ]  # fmt: skip
    (restored_a,) = page.evaluate("window.vprompt.objects()")
    assert (restored_a["area"], restored_a["label"]) == (a_objects[0]["area"], 1)
    assert _overlay(page) > 0
    page.click("[data-testid=next-image]")
    (restored_b,) = page.evaluate("window.vprompt.objects()")
    assert restored_b["area"] == b_object["area"]
    assert (restored_b["label"], restored_b["labelName"]) == (2, "dog")
    # Restored masks are mask prompts: a click refines the object on the server.
    with page.expect_request(lambda r: r.url.endswith("/segment")) as request:
        page.locator("[data-testid=canvas]").click(
            position={"x": box["width"] * 0.4, "y": box["height"] * 0.5}
        )
    page.wait_for_function(IDLE)
    (sent,) = request.value.post_data_json["objects"]
    assert decode_rle(sent["mask"]).sum() == b_object["area"]
    assert sent["points"][0][2] == 1
    assert not _alert_text(page)
    page.keyboard.press("Control+z")
    assert page.evaluate("window.vprompt.objects()")[0]["area"] == b_object["area"]


def test_inspect_marks_a_defect_and_finds_it_in_the_other_image(page, tmp_path: Path):
    """Two images with the same magenta blob (grey noise around it): mark it on the first,
    find similar, and the region is drawn on the second image's thumbnail, on the blob."""
    rng = np.random.default_rng(0)
    w, h, side = 128, 96, 32
    paths = []
    for name, (bx, by) in (("example.png", (12, 12)), ("target.png", (80, 50))):
        pixels = (128 + rng.normal(0, 8, (h, w, 3))).clip(0, 255)
        pixels[by : by + side, bx : bx + side] = (230, 30, 200)
        paths.append(tmp_path / name)
        Image.fromarray(pixels.astype(np.uint8)).save(paths[-1])
    page.set_input_files("[data-testid=file-input]", [str(p) for p in paths])
    page.wait_for_function("window.vprompt.queue.length === 2")
    page.wait_for_function(IDLE)
    assert page.evaluate("window.vprompt.queue.index") == 0

    page.click("[data-testid=tool-inspect]")
    assert page.get_attribute("[data-testid=tool-inspect]", "aria-pressed") == "true"
    box = _canvas_box(page)
    k = box["width"] / w  # screen px per image px
    x0, y0 = box["x"] + 10 * k, box["y"] + 10 * k
    x1, y1 = box["x"] + 46 * k, box["y"] + 46 * k
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x1, y1, steps=5)
    page.mouse.up()
    # A mark is not a prompt: no object, no segment request.
    assert page.evaluate("window.vprompt.prompts()") in ([], [{}])
    assert page.is_enabled("[data-testid=clear-marks]")

    page.fill("[data-testid=inspect-threshold]", "0.1")
    page.click("[data-testid=find-similar]")
    page.wait_for_function("window.vprompt.inspect() !== null")
    page.wait_for_function(IDLE)
    assert not _alert_text(page)
    found = page.evaluate("window.vprompt.inspect()")
    assert found["example"] == "example.png"
    top = found["regions"][0]
    assert top["name"] == "target.png"
    bx0, by0, bx1, by1 = top["box"]
    assert 74 <= bx0 < bx1 <= 118, top["box"]
    assert 44 <= by0 < by1 <= 88, top["box"]
    assert "target.png" in page.inner_text("[data-testid=inspect-results]")
    thumb = page.locator("[data-testid=inspect-thumb]")
    assert thumb.count() == 1
    assert int(thumb.get_attribute("data-regions") or 0) >= 1
    # The region's orange overlay is on the thumbnail, over the blob.
    orange = page.evaluate(
        """([cx, cy]) => {
          const c = document.querySelector('[data-testid=inspect-thumb]');
          const s = c.width / 128;
          const ctx = c.getContext('2d');
          const d = ctx.getImageData(Math.round(cx * s), Math.round(cy * s), 1, 1).data;
          return [d[0], d[1], d[2]];
        }""",
        [(bx0 + bx1) / 2, (by0 + by1) / 2],
    )
    assert orange[1] > 60, orange  # magenta (230, 30, 200) blended with orange gains green
    page.check("[data-testid=inspect-heatmap]")
    page.wait_for_function(IDLE)
    _screenshot(page, tmp_path, "inspect.png")

    # Clicking the result opens the target image.
    page.click("[data-testid=inspect-results] button")
    page.wait_for_function("window.vprompt.queue.index === 1")
