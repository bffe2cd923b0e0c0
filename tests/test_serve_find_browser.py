"""The web page's find tools end to end: `vprompt serve` in a subprocess (sam:tiny with random
weights, CPU, offline, and the deterministic fake detector of tests/test_serve_find.py) and
Debian's Chromium driven headless through Playwright, as in tests/test_serve_browser.py.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from serve_process import CHROMIUM, REPO, chromium, running_server

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

IDLE = "document.querySelector('[data-testid=app]').dataset.pending === '0'"
W, H = 192, 128
# The server process registers the fake detector, then runs the real CLI.
SERVE = (
    "import sys; sys.path.insert(0, sys.argv[1]); import test_serve_find as t; "
    "t.register_fake_detector(); from vprompt.cli import main; main(sys.argv[2:])"
)
# Drawn (non-transparent) pixels on the prompt canvas, where find.js draws its boxes.
PROMPT_PIXELS = """() => {
  const c = document.querySelector('[data-testid=canvas]');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
  return n;
}"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`vprompt serve --detector fakedet --detector-masks` on a free loopback port."""
    args = [
        "-c", SERVE, str(REPO / "tests"), "serve",
        "--model", "sam:tiny", "--weights", "none", "--device", "cpu",
        "--detector", "fakedet", "--detector-masks",
    ]  # fmt: skip
    with running_server(args, tmp_path_factory.mktemp("serve-find")) as base:
        yield base


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium(sync_api) as launched:
        yield launched


@pytest.fixture
def page(browser: Any, server: str, tmp_path: Path) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 820})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page_errors: list[str] = []
    page.on("pageerror", lambda err: page_errors.append(str(err)))
    page.goto(server + "/")
    page.wait_for_function("window.vprompt !== undefined")
    # The panel shows once /api/models has named the detector.
    page.wait_for_selector("[data-testid=find-panel]", state="visible")
    path = tmp_path / "noise.png"
    pixels = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    page.set_input_files("[data-testid=file-input]", str(path))
    page.wait_for_function("window.vprompt.imageId !== null")
    page.wait_for_function(IDLE)
    yield page
    context.close()
    assert not page_errors, f"JavaScript errors on the page: {page_errors}"


def _screenshot(page: Any, tmp_path: Path, name: str) -> None:
    """Full-page screenshot into tmp_path, and $VPROMPT_ARTIFACTS when set."""
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    artifacts = os.environ.get("VPROMPT_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(artifacts) / name)


def _found(page: Any) -> dict[str, Any]:
    page.wait_for_function(f"{IDLE} && window.vprompt.find() && window.vprompt.find().detections")
    assert page.locator("[role=alert]").is_hidden()
    return dict(page.evaluate("window.vprompt.find()"))


def _candidates() -> list[list[float]]:
    """The fake detector's four boxes on a W x H image, as the API rounds them."""
    from test_serve_find import candidate_boxes

    return [[round(float(v), 2) for v in b] for b in candidate_boxes(W, H)]


def test_words_find_boxes_with_masks_that_become_objects(page: Any, tmp_path: Path) -> None:
    assert page.evaluate(PROMPT_PIXELS) == 0
    assert "Detector: fakedet:exact (none)." in page.inner_text("#model-info")
    page.fill("[data-testid=find-queries]", "mug,  cup ")
    page.press("[data-testid=find-queries]", "Enter")
    found = _found(page)
    c = _candidates()
    assert found["queries"] == ["mug", "cup"]
    # The fake's scores: query i gives 0.9 - 0.1 i, 0.8 - 0.1 i, ...; NMS drops box 1.
    assert [(d["query"], d["box"], d["mask"]) for d in found["detections"]] == [
        ("mug", c[0], True),
        ("cup", c[0], True),
        ("mug", c[2], True),
        ("cup", c[2], True),
    ]
    assert [d["score"] for d in found["detections"]] == pytest.approx([0.9, 0.8, 0.5, 0.4])
    assert page.evaluate(PROMPT_PIXELS) > 0  # boxes, tags and masks drawn
    rows = page.locator("[data-testid=find-results] li")
    assert rows.count() == 4
    assert rows.nth(0).inner_text().strip() == "mug — 0.90"
    _screenshot(page, tmp_path, "serve_find_words.png")

    # Into objects, labelled by query, with the returned masks (one undo step).
    page.click("[data-testid=find-to-objects]")
    page.wait_for_function(f"{IDLE} && window.vprompt.objects().length === 4")
    objects = page.evaluate("window.vprompt.objects()")
    assert [o["labelName"] for o in objects] == ["mug", "cup", "mug", "cup"]
    assert all(o["area"] > 0 for o in objects)
    assert {"mug", "cup"} <= {label["name"] for label in page.evaluate("window.vprompt.labels()")}
    assert page.evaluate("window.vprompt.find().detections") is None
    page.click("[data-testid=undo]")
    assert len(page.evaluate("window.vprompt.objects()")) == 1


def test_an_example_box_finds_similar_objects(
    page: Any, browser: Any, server: str, tmp_path: Path
) -> None:
    box = page.locator("[data-testid=canvas]").bounding_box()
    assert box is not None
    page.locator("[data-testid=canvas]").focus()
    page.keyboard.press("g")
    assert page.get_attribute("[data-testid=tool-example]", "aria-pressed") == "true"
    x0, y0 = box["x"] + box["width"] * 0.1, box["y"] + box["height"] * 0.2
    x1, y1 = box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.6
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x1, y1, steps=5)
    page.mouse.up()
    page.wait_for_function("window.vprompt.find() && window.vprompt.find().examples.length === 1")
    example = page.evaluate("window.vprompt.find().examples[0]")
    assert example["positive"] is True
    ex0, ey0, ex1, ey1 = example["box"]
    tolerance = 2 * W / box["width"]
    assert [ex0, ey0, ex1, ey1] == pytest.approx(
        [W * 0.1, H * 0.2, W * 0.3, H * 0.6], abs=tolerance
    )
    assert page.evaluate("window.vprompt.prompts()") == [{}]  # an example, not a prompt

    page.click("[data-testid=find-examples]")
    found = _found(page)
    assert found["queries"] == ["exemplar 1"]
    # The fake answers an example with its own box and that box mirrored left-right.
    boxes = [d["box"] for d in found["detections"]]
    assert boxes[0] == pytest.approx([ex0, ey0, ex1, ey1], abs=0.01)
    assert boxes[1] == pytest.approx([W - ex1, ey0, W - ex0, ey1], abs=0.01)
    assert [d["score"] for d in found["detections"]] == pytest.approx([0.95, 0.7])
    assert page.locator("[data-testid=find-results] li").count() == 2
    assert "exemplar 1 — 0.95" in page.inner_text("[data-testid=find-results]")
    _screenshot(page, tmp_path, "serve_find_examples.png")

    # Without a detector in /api/models the find tools stay hidden (and G picks no tool).
    context = browser.new_context(viewport={"width": 1280, "height": 820})
    bare = context.new_page()
    models = page.evaluate("fetch('api/models').then((r) => r.json())")
    del models["detector"]
    bare.route(
        "**/api/models",
        lambda route: route.fulfill(
            status=200, content_type="application/json", body=json.dumps(models)
        ),
    )
    bare.goto(server + "/")
    bare.wait_for_function("document.querySelector('#model-info').textContent.includes('Packs')")
    assert bare.locator("[data-testid=find-panel]").is_hidden()
    assert "Detector" not in bare.inner_text("#model-info")
    context.close()
