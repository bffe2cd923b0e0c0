"""`vprompt serve` in a subprocess on a free loopback port, and headless Chromium: what the
browser test files share (tests/test_serve_browser.py, tests/test_serve_find_browser.py)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
STARTUP_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def running_server(python_args: Sequence[str], workdir: Path) -> Iterator[str]:
    """Start ``python PYTHON_ARGS --host 127.0.0.1 --port N`` (offline, CPU, caches in
    ``workdir``), wait until ``/api/health`` says ok, yield its URL, stop it afterwards.

    Fails the test with the server log's tail when it exits or is not healthy in time.
    """
    port = free_port()
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONUNBUFFERED="1",
        VPROMPT_CACHE=str(workdir / "cache"),
    )
    log_path = workdir / "server.log"
    cmd = [sys.executable, *python_args, "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                log_tail = log_path.read_text()[-4000:]
                pytest.fail(f"`vprompt serve` exited with {proc.returncode}:\n{log_tail}")
            try:
                if get_json(f"{base}/api/health", timeout=2).get("status") == "ok":
                    break
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"`vprompt serve` not healthy after {STARTUP_TIMEOUT_S:.0f}s:\n"
                    f"{log_path.read_text()[-4000:]}"
                )
            time.sleep(0.25)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@contextlib.contextmanager
def chromium(sync_api: Any) -> Iterator[Any]:
    """Debian's Chromium, headless, through Playwright (never `playwright install`)."""
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield browser
        finally:
            browser.close()
