"""Load test of ``vprompt serve``: concurrent clients replaying annotation sessions over HTTP.

The script starts ``python -m vprompt serve --model M --weights W --device D --port P`` as a
subprocess (``HF_HUB_OFFLINE=1``, a free loopback port; or targets a running server with
``--url``), waits for ``GET /api/health``, warms the model up with one untimed session on an
image outside the pool, then runs ``--clients`` client threads for ``--duration`` seconds. Each
client holds one keep-alive connection (standard library ``http.client``) and replays sessions
like the web page's, back to back (``--think`` adds a pause between requests):

1. ``POST /api/images`` of a photo from ``skimage.data`` (astronaut, chelsea, coffee, rocket),
   each at full size as PNG and at 60% as JPEG: 8 distinct byte strings that every client
   draws from, so the embedding cache sees repeats (hits) as well as first uploads (misses).
   With probability ``--fresh-rate`` the upload is a random crop of random size instead,
   bytes never sent before (a guaranteed miss, and growth the cache bound has to absorb).
   Sometimes a ``GET /api/images/{id}`` follows.
2. ``POST /api/images/{id}/segment`` clicks on 1 object (60%), 2 (25%) or 3 (15%): a first
   request with one positive click per object (sometimes a box, sometimes a scribble, for a
   multi-object session all objects in one request), then 1-4 refinement clicks on one
   object at a time with a growing point list (positive and negative) and the ``logits``
   token of that object's last response as ``previous``, and for multi-object sessions a
   final request with all objects. Formats: PNG mostly, some RLE and polygons.
3. With probability ``--auto-rate``, ``POST /api/images/{id}/automatic`` on a small grid
   (``points_per_side`` 4-8, RLE); then, for 20% of sessions, ``DELETE /api/images/{id}``.

Every response is checked against docs/serve-api.md (status 201/200, sizes, one mask and
logits token per object, RLE sizes); any non-2xx status, exception or malformed response is
an error, and the script exits 1 if there is any. Reported: requests, requests/s, p50/p95/p99
latency per request kind and overall; the server's memory (``VmRSS`` of its process and its
children sampled every 0.2 s from ``/proc``, its peak, and the kernel's ``VmHWM``); and
``/api/health``'s ``cache_bytes`` polled every second and at the end against
``cache_limit_bytes``, to show the cache bound holds.

CPU, 2 shared cores (what bench/results/serve_load_cpu records)::

    .venv/bin/python bench/serve_load.py --model sam:tiny --weights none --device cpu \
        --clients 8 --duration 30 --out bench/results/serve_load_cpu

GPU (H100, a real-sized model with random weights)::

    python bench/serve_load.py --model sam:vit-base --weights none --device cuda \
        --clients 32 --duration 60 --out bench/results/serve_load_h100

Against a server that is already running (memory is sampled only with ``--server-pid``)::

    .venv/bin/python bench/serve_load.py --url http://127.0.0.1:8000 --server-pid 12345 \
        --clients 8 --duration 30 --out /tmp/serve_load
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import io
import json
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
KINDS = (
    ("upload_new", "upload, first time these bytes are sent"),
    ("upload_repeat", "upload, bytes sent before (cache hit expected)"),
    ("image_info", "GET image"),
    ("segment_first", "segment: first click, 1 object"),
    ("segment_refine", "segment: refinement click (growing points + previous)"),
    ("segment_box", "segment: with a box"),
    ("segment_scribble", "segment: with a scribble"),
    ("segment_multi", "segment: 2-3 objects in one request"),
    ("automatic", "automatic masks, small grid"),
    ("delete", "DELETE image"),
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------- images
def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    if fmt == "JPEG":
        img.convert("RGB").save(buf, format="JPEG", quality=90)
    else:
        img.save(buf, format=fmt)
    return buf.getvalue()


def _resize(arr: np.ndarray, scale: float) -> np.ndarray:
    h, w = arr.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(arr).resize(size, Image.BILINEAR))


@dataclass(frozen=True)
class Photo:
    name: str
    data: bytes
    content_type: str
    width: int
    height: int


def photo_pool() -> tuple[list[Photo], dict[str, np.ndarray]]:
    """4 real photos x (full-size PNG, 60% JPEG): the shared pool, and the source arrays."""
    import skimage.data

    arrays = {name: getattr(skimage.data, name)() for name in PHOTOS}
    pool = []
    for name, arr in arrays.items():
        h, w = arr.shape[:2]
        pool.append(Photo(f"{name} {w}x{h} png", _encode(arr, "PNG"), "image/png", w, h))
        small = _resize(arr, 0.6)
        sh, sw = small.shape[:2]
        pool.append(Photo(f"{name} {sw}x{sh} jpeg", _encode(small, "JPEG"), "image/jpeg", sw, sh))
    return pool, arrays


def fresh_photo(arrays: dict[str, np.ndarray], rng: random.Random, tag: int) -> Photo:
    """A random crop of one photo, resized to 256-640 px on its long side: new bytes."""
    name = rng.choice(sorted(arrays))
    arr = arrays[name]
    h, w = arr.shape[:2]
    ch, cw = rng.randint(h // 2, h), rng.randint(w // 2, w)
    y0, x0 = rng.randint(0, h - ch), rng.randint(0, w - cw)
    crop = np.ascontiguousarray(arr[y0 : y0 + ch, x0 : x0 + cw])
    crop = _resize(crop, rng.randint(256, 640) / max(ch, cw))
    fh, fw = crop.shape[:2]
    fmt = rng.choice(("PNG", "JPEG"))
    data = _encode(crop, fmt)
    return Photo(f"fresh {name} crop {fw}x{fh} #{tag}", data, f"image/{fmt.lower()}", fw, fh)


def warmup_photo() -> Photo:
    import skimage.data

    arr = skimage.data.camera()  # grayscale, outside the pool
    h, w = arr.shape[:2]
    return Photo(f"camera {w}x{h} png", _encode(arr, "PNG"), "image/png", w, h)


# ---------------------------------------------------------------------------- HTTP
class RequestError(Exception):
    def __init__(self, message: str, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


@dataclass
class Record:
    kind: str
    seconds: float
    status: int | None
    ok: bool
    started: float
    client: int


@dataclass
class Stats:
    records: list[Record] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    sessions: int = 0
    sessions_done: int = 0
    reconnects: int = 0
    t0: float = 0.0  # perf_counter at the start of the load
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, record: Record, error: dict[str, Any] | None = None) -> None:
        with self.lock:
            self.records.append(record)
            if error is not None:
                self.errors.append(error)


class Client:
    """One keep-alive connection; a request on a connection the server closed is retried once."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.conn: http.client.HTTPConnection | None = None
        self.reconnects = 0

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes, str]:
        for attempt in (0, 1):
            fresh = self.conn is None
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                resp = self.conn.getresponse()
                data = resp.read()
                ctype = resp.getheader("content-type", "")
                if resp.getheader("connection", "").lower() == "close":
                    self.close()
                return resp.status, data, ctype
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if fresh or attempt == 1:
                    raise
                self.reconnects += 1  # the server closed an idle keep-alive connection
            except Exception:
                self.close()
                raise
        raise AssertionError("unreachable")

    def json(
        self, method: str, path: str, payload: Any = None, expect: int = 200
    ) -> dict[str, Any]:
        body = None if payload is None else json.dumps(payload).encode()
        headers = {"content-type": "application/json"} if body is not None else {}
        status, data, _ = self.request(method, path, body, headers)
        return _decode(status, data, expect)

    def upload(self, photo: Photo, field_name: str = "file") -> dict[str, Any]:
        boundary = uuid.uuid4().hex
        ext = "png" if photo.content_type == "image/png" else "jpg"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; '
            f'filename="photo.{ext}"\r\nContent-Type: {photo.content_type}\r\n\r\n'
        ).encode()
        body = head + photo.data + f"\r\n--{boundary}--\r\n".encode()
        headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
        status, data, _ = self.request("POST", "/api/images", body, headers)
        return _decode(status, data, 201)


def _decode(status: int, data: bytes, expect: int) -> dict[str, Any]:
    text = data[:600].decode("utf-8", "replace")
    if status != expect:
        raise RequestError(f"status {status}, expected {expect}", status, text)
    try:
        out = json.loads(data)
    except ValueError as exc:
        raise RequestError(f"response is not JSON: {exc}", status, text) from exc
    if not isinstance(out, dict):
        raise RequestError("response is not a JSON object", status, text)
    return out


# ---------------------------------------------------------------------------- checks
def _check(cond: bool, message: str, resp: dict[str, Any]) -> None:
    if not cond:
        raise RequestError(f"malformed response: {message}", 200, json.dumps(resp)[:600])


def check_mask(mask: Any, fmt: str, photo: Photo, resp: dict[str, Any]) -> None:
    if fmt == "png":
        _check(isinstance(mask, str), "png mask is not a string", resp)
        try:
            raw = base64.b64decode(mask[:24] + "=" * (-len(mask[:24]) % 4))
        except ValueError:
            raw = b""
        _check(raw.startswith(PNG_MAGIC), "png mask is not base64 PNG", resp)
    elif fmt == "rle":
        ok = isinstance(mask, dict) and list(mask.get("size", [])) == [photo.height, photo.width]
        _check(
            ok and "counts" in mask, f"RLE mask size is not [{photo.height}, {photo.width}]", resp
        )
    else:
        _check(isinstance(mask, list), "polygon mask is not a list", resp)


def check_image(resp: dict[str, Any], photo: Photo) -> None:
    _check(resp.get("width") == photo.width, f"width != {photo.width}", resp)
    _check(resp.get("height") == photo.height, f"height != {photo.height}", resp)


def check_segment(resp: dict[str, Any], photo: Photo, n: int, fmt: str) -> list[str]:
    check_image(resp, photo)
    objs = resp.get("objects")
    _check(isinstance(objs, list) and len(objs) == n, f"not {n} objects", resp)
    tokens = []
    for o in objs:
        for key in ("score", "area", "bbox", "mask", "logits"):
            _check(key in o, f"object without {key!r}", resp)
        check_mask(o["mask"], fmt, photo, resp)
        _check(isinstance(o["logits"], str) and bool(o["logits"]), "no logits token", resp)
        tokens.append(o["logits"])
    return tokens


# ---------------------------------------------------------------------------- sessions
def _point(rng: random.Random, photo: Photo, cx: float, cy: float, spread: float) -> list[float]:
    x = min(max(rng.gauss(cx, spread), 0.0), photo.width - 1.0)
    y = min(max(rng.gauss(cy, spread), 0.0), photo.height - 1.0)
    return [round(x, 1), round(y, 1)]


class Session:
    """One user's annotation of one image: an upload, clicks on 1-3 objects, maybe automatic."""

    def __init__(
        self,
        client: Client,
        stats: Stats,
        cid: int,
        rng: random.Random,
        deadline: float,
        think: float,
        auto_rate: float,
    ) -> None:
        self.client, self.stats, self.cid, self.rng = client, stats, cid, rng
        self.deadline, self.think, self.auto_rate = deadline, think, auto_rate

    def timed(self, kind: str, what: str, fn: Any) -> Any:
        """Run one request; record it; on failure record the error and end the session."""
        started = time.perf_counter()
        try:
            out = fn()
        except Exception as exc:
            seconds = time.perf_counter() - started
            status = exc.status if isinstance(exc, RequestError) else None
            body = exc.body if isinstance(exc, RequestError) else ""
            err = {
                "kind": kind,
                "request": what[:600],
                "status": status,
                "error": f"{type(exc).__name__}: {exc}"[:300],
                "response": body,
                "at_s": round(started - self.stats.t0, 3),
            }
            self.stats.add(Record(kind, seconds, status, False, started, self.cid), err)
            raise
        self.stats.add(Record(kind, time.perf_counter() - started, 200, True, started, self.cid))
        if self.think:
            time.sleep(self.rng.uniform(0.5, 1.5) * self.think)
        return out

    def live(self) -> bool:
        return time.perf_counter() < self.deadline

    def run(self, photo: Photo, first_time: bool) -> None:
        rng, c = self.rng, self.client
        kind = "upload_new" if first_time else "upload_repeat"

        def upload() -> dict[str, Any]:
            resp = c.upload(photo)
            check_image(resp, photo)
            _check(isinstance(resp.get("image_id"), str), "no image_id", resp)
            return resp

        image_id = self.timed(kind, f"POST /api/images ({photo.name})", upload)["image_id"]
        base = f"/api/images/{image_id}"
        if self.live() and rng.random() < 0.2:
            self.timed(
                "image_info",
                f"GET {base}",
                lambda: check_image(c.json("GET", base), photo),
            )
        n_obj = rng.choices((1, 2, 3), weights=(60, 25, 15))[0]
        spread = 0.05 * min(photo.width, photo.height)
        centers = [
            (rng.uniform(0.15, 0.85) * photo.width, rng.uniform(0.15, 0.85) * photo.height)
            for _ in range(n_obj)
        ]
        objects: list[dict[str, Any]] = []
        extra = "plain"
        for cx, cy in centers:
            obj: dict[str, Any] = {"points": [[*_point(rng, photo, cx, cy, spread / 4), 1]]}
            r = rng.random()
            if r < 0.2:
                half_w = rng.uniform(0.05, 0.25) * photo.width
                half_h = rng.uniform(0.05, 0.25) * photo.height
                box = [
                    max(0.0, cx - half_w),
                    max(0.0, cy - half_h),
                    min(photo.width - 1.0, cx + half_w),
                    min(photo.height - 1.0, cy + half_h),
                ]
                obj["box"] = [round(v, 1) for v in box]
                if rng.random() < 0.5:
                    del obj["points"]  # a box alone
                extra = "box"
            elif r < 0.3:
                stroke = [_point(rng, photo, cx, cy, spread) for _ in range(rng.randint(2, 6))]
                obj["scribbles"] = [{"points": stroke, "positive": True, "width": 5}]
                if extra == "plain":
                    extra = "scribble"
            objects.append(obj)
        if not self.live():
            return
        first_kind = (
            "segment_multi"
            if n_obj > 1
            else {"plain": "segment_first"}.get(extra, f"segment_{extra}")
        )
        tokens = self.segment(base, photo, objects, first_kind)
        for _ in range(rng.randint(1, 4)):
            if not self.live():
                return
            i = rng.randrange(n_obj)
            obj = objects[i]
            cx, cy = centers[i]
            positive = rng.random() < 0.65
            pt = _point(rng, photo, cx, cy, spread if positive else 3 * spread)
            obj.setdefault("points", []).append([*pt, int(positive)])
            obj["previous"] = tokens[i]
            tokens[i] = self.segment(base, photo, [obj], "segment_refine")[0]
        if n_obj > 1 and self.live():
            for obj, token in zip(objects, tokens, strict=True):
                obj["previous"] = token
            tokens = self.segment(base, photo, objects, "segment_multi")
        if self.live() and rng.random() < self.auto_rate:
            payload = {"points_per_side": rng.choice((4, 6, 8)), "format": "rle"}

            def automatic() -> None:
                resp = c.json("POST", f"{base}/automatic", payload)
                check_image(resp, photo)
                objs = resp.get("objects")
                _check(isinstance(objs, list), "no objects list", resp)
                for o in objs:
                    _check("point" in o and "mask" in o, "object without point/mask", resp)
                    check_mask(o["mask"], "rle", photo, resp)

            self.timed("automatic", f"POST {base}/automatic {json.dumps(payload)}", automatic)
        if self.live() and rng.random() < 0.2:  # "clear": the page forgets the image

            def delete() -> None:
                status, data, _ = c.request("DELETE", base)
                if status != 204:
                    raise RequestError(
                        f"status {status}, expected 204", status, data[:600].decode()
                    )

            self.timed("delete", f"DELETE {base}", delete)

    def segment(
        self, base: str, photo: Photo, objects: list[dict[str, Any]], kind: str
    ) -> list[str]:
        rng = self.rng
        fmt = rng.choices(("png", "rle", "polygon"), weights=(70, 20, 10))[0]
        payload: dict[str, Any] = {"objects": objects, "format": fmt}
        payload["multimask"] = rng.choices(("auto", True, False), weights=(80, 10, 10))[0]
        if rng.random() < 0.1:
            del payload["multimask"]  # the default
        what = f"POST {base}/segment {json.dumps(payload)}"

        def call() -> list[str]:
            resp = self.client.json("POST", f"{base}/segment", payload)
            return check_segment(resp, photo, len(objects), fmt)

        return self.timed(kind, what, call)


def client_loop(
    cid: int,
    host: str,
    port: int,
    args: argparse.Namespace,
    pool: list[Photo],
    arrays: dict[str, np.ndarray],
    sent: set[bytes],
    sent_lock: threading.Lock,
    stats: Stats,
    start_at: float,
    deadline: float,
) -> None:
    rng = random.Random(args.seed * 1000 + cid)
    client = Client(host, port, args.timeout)
    n = 0
    while time.perf_counter() < start_at:
        time.sleep(0.001)
    try:
        while time.perf_counter() < deadline:
            if rng.random() < args.fresh_rate:
                photo = fresh_photo(arrays, rng, cid * 100000 + n)
            else:
                photo = rng.choice(pool)
            with sent_lock:
                first_time = photo.data not in sent
                sent.add(photo.data)
            n += 1
            with stats.lock:
                stats.sessions += 1
            session = Session(client, stats, cid, rng, deadline, args.think, args.auto_rate)
            try:
                session.run(photo, first_time)
            except Exception:
                client.close()  # a fresh connection for the next session
                continue
            with stats.lock:
                stats.sessions_done += 1
    finally:
        with stats.lock:
            stats.reconnects += client.reconnects
        client.close()


# ---------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        children: list[int] = []
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    children += [int(c) for c in fh.read().split()]
        except OSError:
            pass
        out += children
        todo += children
    return out


class MemorySampler(threading.Thread):
    """VmRSS of the server process and its descendants every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, float]] = []  # (time, MiB)
        self.max_children = 0
        self.stop_event = threading.Event()
        self.t0 = time.perf_counter()

    def sample(self) -> float | None:
        total, seen = 0, False
        children = _descendants(self.pid)
        self.max_children = max(self.max_children, len(children))
        for p in [self.pid, *children]:
            kib = _proc_kib(p, "VmRSS")
            if kib is not None:
                total += kib
                seen = seen or p == self.pid
        return total / 1024 if seen else None

    def run(self) -> None:
        while not self.stop_event.is_set():
            mib = self.sample()
            if mib is not None:
                self.samples.append((time.perf_counter(), mib))
            self.stop_event.wait(self.interval)

    def peak(self, since: float = 0.0, until: float = float("inf")) -> float | None:
        vals = [m for t, m in self.samples if since <= t <= until]
        return max(vals) if vals else None

    def hwm_mib(self) -> float | None:
        kib = _proc_kib(self.pid, "VmHWM")
        return None if kib is None else kib / 1024


class HealthPoller(threading.Thread):
    """``GET /api/health`` every ``interval`` seconds on its own connection (not in the stats)."""

    def __init__(self, host: str, port: int, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.client = Client(host, port, 30.0)
        self.interval = interval
        self.samples: list[tuple[float, dict[str, Any]]] = []
        self.failures = 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.samples.append((time.perf_counter(), self.client.json("GET", "/api/health")))
            except Exception:
                self.failures += 1
            self.stop_event.wait(self.interval)
        self.client.close()


def serve_help() -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "vprompt", "serve", "--help"],
        capture_output=True,
        text=True,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    return proc.stdout + proc.stderr


def start_server(
    args: argparse.Namespace, port: int, log: int
) -> tuple[subprocess.Popen[bytes], list[str], list[str]]:
    help_text = serve_help()
    cmd = [sys.executable, "-m", "vprompt", "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--model", args.model, "--weights", args.weights, "--device", args.device]
    notes = []
    for flag, value in (("--max-images", args.max_images), ("--cache-mb", args.cache_mb)):
        if value is None:
            continue
        if flag in help_text:
            cmd += [flag, str(value)]
        else:
            notes.append(f"`vprompt serve` has no {flag} option; not passed")
    for extra in args.server_arg:
        cmd += shlex.split(extra)
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    return proc, cmd, notes


def wait_health(host: str, port: int, proc: subprocess.Popen[bytes] | None, timeout: float) -> dict:
    deadline = time.perf_counter() + timeout
    last = ""
    while time.perf_counter() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} while starting")
        client = Client(host, port, 5.0)
        try:
            return client.json("GET", "/api/health")
        except Exception as exc:
            last = f"{type(exc).__name__}: {exc}"
        finally:
            client.close()
        time.sleep(0.25)
    raise RuntimeError(f"/api/health did not answer within {timeout:.0f} s ({last})")


def stop_server(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
    try:
        return proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


def warm_up(host: str, port: int, timeout: float) -> float:
    """One untimed session on an image outside the pool: model load, first-call costs."""
    photo = warmup_photo()
    client = Client(host, port, timeout)
    started = time.perf_counter()
    try:
        resp = client.upload(photo)
        base = f"/api/images/{resp['image_id']}"
        payload = {"objects": [{"points": [[256, 256, 1]]}], "format": "png"}
        seg = client.json("POST", f"{base}/segment", payload)
        token = check_segment(seg, photo, 1, "png")[0]
        payload = {"objects": [{"points": [[256, 256, 1], [100, 100, 0]], "previous": token}]}
        client.json("POST", f"{base}/segment", payload)
        client.json("POST", f"{base}/automatic", {"points_per_side": 4, "format": "rle"})
        with contextlib.suppress(Exception):  # leave the pool's cache state to the run
            client.request("DELETE", base)
    finally:
        client.close()
    return time.perf_counter() - started


# ---------------------------------------------------------------------------- report
def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {
        "count": len(ms),
        "p50_ms": float(p50),
        "p95_ms": float(p95),
        "p99_ms": float(p99),
        "mean_ms": float(ms.mean()),
        "max_ms": float(ms.max()),
    }


def summarize(stats: Stats, t_start: float, t_end: float) -> dict[str, Any]:
    by_kind: dict[str, list[float]] = defaultdict(list)
    for r in stats.records:
        by_kind[r.kind].append(r.seconds)
    wall = max([t_end, *(r.started + r.seconds for r in stats.records)]) - t_start
    per_kind = {
        kind: percentiles(by_kind[kind]) | {"per_s": len(by_kind[kind]) / wall}
        for kind, _ in KINDS
        if by_kind[kind]
    }
    every = [r.seconds for r in stats.records]
    statuses = Counter(str(r.status) for r in stats.records)
    return {
        "wall_seconds": wall,
        "requests": len(stats.records),
        "requests_per_s": len(stats.records) / wall if wall > 0 else 0.0,
        "errors": len(stats.errors),
        "sessions_started": stats.sessions,
        "sessions_completed": stats.sessions_done,
        "reconnects": stats.reconnects,
        "statuses": dict(statuses),
        "overall": percentiles(every) if every else None,
        "per_kind": per_kind,
        "per_client_requests": dict(sorted(Counter(r.client for r in stats.records).items())),
    }


def _fmt(v: float | None, spec: str = ".0f", unit: str = "") -> str:
    return "–" if v is None else f"{v:{spec}}{unit}"


def render(info: dict[str, Any]) -> str:
    a, s, mem = info["args"], info["summary"], info["memory"]
    health = info["health_end"] or {}
    target = f"`{shlex.join(info['server_command'])}`" if info["server_command"] else f"{a['url']}"
    lines = [
        f"# `vprompt serve` under load: {a['clients']} clients, {a['duration']:g} s "
        f"({info['device_name']})",
        "",
        f"`{info['command']}`",
        "",
        f"Server: {target}"
        + (
            f" ({info['server_started_s']:.1f} s to answer /api/health)"
            if info["server_command"]
            else ""
        )
        + f"; {info['models'].get('segmenter', {}).get('name', '?')} "
        f"({info['models'].get('segmenter', {}).get('weights', '?')}) on {a['device']}, "
        f"torch {info['torch']}, {info['cpus']} CPUs. Warm-up session (untimed) "
        f"{info['warmup_s']:.1f} s.",
        "",
        f"**{s['requests']} requests in {s['wall_seconds']:.1f} s = {s['requests_per_s']:.1f} "
        f"requests/s; {s['errors']} errors**; {s['sessions_started']} sessions started, "
        f"{s['sessions_completed']} completed (those open at the deadline stop issuing "
        f"requests); {s['reconnects']} keep-alive reconnects. Statuses: "
        + ", ".join(f"{k}: {v}" for k, v in sorted(s["statuses"].items()))
        + ".",
        "",
        "| request kind | count | per s | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    labels = dict(KINDS)
    for kind, p in s["per_kind"].items():
        lines.append(
            f"| {labels[kind]} | {p['count']} | {p['per_s']:.2f} | {p['p50_ms']:.0f} | "
            f"{p['p95_ms']:.0f} | {p['p99_ms']:.0f} | {p['max_ms']:.0f} |"
        )
    if s["overall"]:
        o = s["overall"]
        lines.append(
            f"| **all** | {o['count']} | {s['requests_per_s']:.2f} | {o['p50_ms']:.0f} | "
            f"{o['p95_ms']:.0f} | {o['p99_ms']:.0f} | {o['max_ms']:.0f} |"
        )
    limit = health.get("cache_limit_bytes")
    mib = 1024 * 1024
    lines += [
        "",
        "## Server memory and cache",
        "",
    ]
    if mem["sampled"]:
        lines += [
            f"RSS of the server process{' and its children' if mem['children'] else ''}, sampled "
            f"every 0.2 s: {_fmt(mem['idle_mib'], '.0f', ' MiB')} idle after start-up and "
            f"warm-up, **peak {_fmt(mem['peak_load_mib'], '.0f', ' MiB')} during the load**, "
            f"{_fmt(mem['end_mib'], '.0f', ' MiB')} at the end; the kernel's high-water mark "
            f"(VmHWM, start-up included) {_fmt(mem['vmhwm_mib'], '.0f', ' MiB')}.",
            "",
        ]
    else:
        lines += ["Server memory not sampled (no process id: pass --server-pid with --url).", ""]
    if health:
        lines.append(
            f"`/api/health` at the end: {health.get('images')} images, cache_bytes "
            f"{health.get('cache_bytes', 0) / mib:.1f} MiB of cache_limit_bytes "
            f"{_fmt(None if limit is None else limit / mib, '.0f', ' MiB')}; largest cache_bytes "
            f"seen while polling every second: {info['cache_bytes_max'] / mib:.1f} MiB "
            f"({'within' if info['cache_bound_holds'] else 'OVER'} the limit)."
        )
    lines += [
        "",
        f"Image pool: {len(info['pool'])} byte strings shared by all clients ("
        + ", ".join(p["name"] for p in info["pool"])
        + f"); {info['fresh_uploads']} fresh random crops (never-seen bytes, --fresh-rate "
        f"{a['fresh_rate']}). Uploads of bytes sent before are cache hits unless evicted.",
    ]
    if info.get("notes"):
        lines += ["", *[f"Note: {n}" for n in info["notes"]]]
    if info["errors"]:
        lines += ["", "## Errors (first 10)", ""]
        for e in info["errors"][:10]:
            lines.append(
                f"- {e['kind']}: {e['error']} — request `{e['request'][:300]}` — response "
                f"`{e['response'][:300]}`"
            )
    if info["args"]["device"] == "cpu":
        lines += [
            "",
            "On shared CPU cores, throughput and tail latencies vary by up to 2x between runs "
            "(other work competes for the cores); the error count and the memory and cache "
            "bounds are the stable figures.",
        ]
    lines += [
        "",
        "Each client thread holds one keep-alive connection and replays sessions back to back "
        "(upload, clicks on 1-3 objects with growing point lists and `previous` logits tokens, "
        "sometimes a box or scribble, sometimes automatic masks on a 4-8 point grid), so the "
        "latencies include queueing behind the other clients: with N clients on one model, "
        "a request waits for the ones ahead of it. The client threads share the machine with "
        "the server.",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="sam:tiny")
    ap.add_argument("--weights", default="none")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=30.0, help="Seconds of load")
    ap.add_argument("--max-images", type=int, default=None, help="Passed to the server if known")
    ap.add_argument("--cache-mb", type=int, default=None, help="Passed to the server if known")
    ap.add_argument(
        "--server-arg", action="append", default=[], help="Extra `vprompt serve` arguments"
    )
    ap.add_argument("--url", default=None, help="Target a running server instead of starting one")
    ap.add_argument("--server-pid", type=int, default=None, help="With --url: sample its memory")
    ap.add_argument("--think", type=float, default=0.0, help="Mean pause between requests (s)")
    ap.add_argument("--fresh-rate", type=float, default=0.1, help="Share of never-seen uploads")
    ap.add_argument(
        "--auto-rate", type=float, default=0.15, help="Share of sessions with automatic"
    )
    ap.add_argument("--timeout", type=float, default=120.0, help="Per-request client timeout (s)")
    ap.add_argument("--startup-timeout", type=float, default=600.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/results/serve_load"))
    ap.add_argument("--render", type=Path, default=None, help="Re-render a results.json only")
    args = ap.parse_args()
    if args.render is not None:
        text = render(json.loads(args.render.read_text()))
        args.render.with_name("results.md").write_text(text)
        print(text)
        return 0

    pool, arrays = photo_pool()
    proc = None
    server_cmd: list[str] = []
    notes: list[str] = []
    log_name = ""  # the started server's output, kept if anything fails
    started = time.perf_counter()
    if args.url:
        parts = urlsplit(args.url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        pid = args.server_pid
        if args.max_images is not None or args.cache_mb is not None:
            notes.append("--max-images / --cache-mb ignored with --url")
    else:
        host, port = "127.0.0.1", free_port()
        log_fd, log_name = tempfile.mkstemp(prefix="vprompt-serve-", suffix=".log")
        proc, server_cmd, notes = start_server(args, port, log_fd)
        os.close(log_fd)  # the server holds its own copy
        pid = proc.pid
    sampler = MemorySampler(pid) if pid else None
    if sampler:
        sampler.start()
    exit_code = 0
    try:
        health0 = wait_health(host, port, proc, args.startup_timeout)
        server_started = time.perf_counter() - started
        print(f"server up after {server_started:.1f} s: {health0}", flush=True)
        models = Client(host, port, 30).json("GET", "/api/models")
        warm = warm_up(host, port, args.timeout)
        print(f"warm-up session {warm:.1f} s", flush=True)
        time.sleep(0.5)
        idle = sampler.sample() if sampler else None

        stats = Stats()
        sent: set[bytes] = set()
        sent_lock = threading.Lock()
        poller = HealthPoller(host, port)
        poller.start()
        t_start = time.perf_counter() + 0.1
        stats.t0 = t_start
        deadline = t_start + args.duration
        threads = [
            threading.Thread(
                target=client_loop,
                args=(i, host, port, args, pool, arrays, sent, sent_lock, stats, t_start, deadline),
                daemon=True,
            )
            for i in range(args.clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        t_end = time.perf_counter()
        poller.stop_event.set()
        poller.join()
        try:
            health_end = Client(host, port, 30).json("GET", "/api/health")
        except Exception as exc:  # the server died: still write what the clients saw
            health_end = {}
            notes.append(f"/api/health failed after the load: {type(exc).__name__}: {exc}")
        end_rss = sampler.sample() if sampler else None
    except BaseException:
        if proc is not None:
            stop_server(proc)
            tail = Path(log_name).read_text(errors="replace")[-4000:]
            print(f"--- server log tail ({log_name}) ---\n{tail}", file=sys.stderr)
        raise
    finally:
        if sampler:
            sampler.stop_event.set()
            sampler.join()
    hwm = sampler.hwm_mib() if sampler else None
    rc = stop_server(proc) if proc is not None else None

    summary = summarize(stats, t_start, t_end)
    pool_bytes = {p.data for p in pool}
    cache_samples = [h.get("cache_bytes", 0) for _, h in poller.samples] + [
        health_end.get("cache_bytes", 0)
    ]
    limit = health_end.get("cache_limit_bytes")
    info: dict[str, Any] = {
        "command": shlex.join(
            [".venv/bin/python" if args.device == "cpu" else "python", *sys.argv]
        ),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "server_command": [Path(server_cmd[0]).name, *server_cmd[1:]] if server_cmd else [],
        "server_exit_code": rc,
        "server_started_s": server_started,
        "warmup_s": warm,
        "device_name": platform.processor() or platform.machine() or "cpu",
        "cpus": os.cpu_count(),
        "torch": _torch_version(),
        "models": models,
        "health_start": health0,
        "health_end": health_end,
        "cache_bytes_max": max(cache_samples),
        "cache_bound_holds": limit is None or max(cache_samples) <= limit,
        "health_timeline": [[round(t - t_start, 2), h] for t, h in poller.samples],
        "health_poll_failures": poller.failures,
        "pool": [
            {"name": p.name, "bytes": len(p.data), "width": p.width, "height": p.height}
            for p in pool
        ],
        "distinct_uploads": len(sent),
        "fresh_uploads": len(sent - pool_bytes),
        "summary": summary,
        "memory": {
            "sampled": sampler is not None,
            "children": sampler.max_children if sampler else 0,
            "idle_mib": idle,
            "peak_load_mib": sampler.peak(t_start, t_end) if sampler else None,
            "peak_mib": sampler.peak() if sampler else None,
            "end_mib": end_rss,
            "vmhwm_mib": hwm,
            "rss_timeline": [
                [round(t - t_start, 2), round(m, 1)]
                for t, m in (sampler.samples if sampler else [])
            ],
        },
        "errors": stats.errors,
        "notes": notes,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(info, indent=1) + "\n")
    text = render(info)
    (args.out / "results.md").write_text(text)
    print(text)
    if stats.errors:
        exit_code = 1
        if proc is not None:
            print(f"server log: {log_name}", file=sys.stderr)
    elif log_name:
        with contextlib.suppress(OSError):
            os.unlink(log_name)
    return exit_code


def _torch_version() -> str:
    try:
        import torch

        return str(torch.__version__)
    except ImportError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
