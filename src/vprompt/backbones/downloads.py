"""Loading weights from this machine only, with every download refused.

A shared prompt pack names the weights it was made with (``openai``, ``hf-hub:ORG/REPO``, a
torchvision tag …). Opening a pack must not fetch what a stranger's file names: vprompt loads
a pack's weights under :func:`no_downloads` unless the user named the weights themselves or
allowed the download. Within it the Hugging Face hub runs in offline mode (only its local
cache answers) and ``urlopen`` (torch.hub's and open_clip's downloads) refuses every URL, so
weights already on this machine load as usual and anything else fails before a byte is
fetched.

The switch is process-wide while it is on (model loading is not thread-safe anyway): do not
load weights from other threads meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

from vprompt.errors import WeightsError

_lock = threading.Lock()


class DownloadRefused(WeightsError):
    """A download was attempted while downloads were off."""


@contextlib.contextmanager
def no_downloads() -> Iterator[list[str]]:
    """Within: weights load only from this machine (files, the hub and torch caches).

    Yields:
        The URLs whose download was refused (filled as they are attempted).
    """
    import huggingface_hub.constants as hub
    import torch.hub

    refused: list[str] = []

    def refuse(url: Any, *args: Any, **kwargs: Any) -> Any:
        text = getattr(url, "full_url", url)
        refused.append(str(text))
        raise DownloadRefused(f"download of {text} refused (downloads are off)")

    with _lock:
        saved = (hub.HF_HUB_OFFLINE, urllib.request.urlopen, torch.hub.urlopen)
        hub.HF_HUB_OFFLINE = True
        urllib.request.urlopen = refuse
        torch.hub.urlopen = refuse
        try:
            yield refused
        finally:
            hub.HF_HUB_OFFLINE, urllib.request.urlopen, torch.hub.urlopen = saved


_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def probe_hub(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub's endpoint does not answer a TCP connection within
    ``timeout`` seconds, or None when it does (or when a proxy is configured: then only the
    HTTP client can tell)."""
    import huggingface_hub.constants as hub

    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return None
    url = urllib.parse.urlparse(str(hub.ENDPOINT))
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host}:{port} does not answer: {exc.strerror or exc}"


@contextlib.contextmanager
def offline_unless_reachable(needed: bool = True) -> Iterator[str | None]:
    """Within: when a hub download is ``needed`` and the hub does not answer
    (:func:`probe_hub`), the hub runs offline (its cache only), so the download fails at
    once instead of after huggingface_hub's retries (about 25 s for one file).

    Yields:
        Why the hub is unreachable, or None (reachable, not needed, or already offline).
    """
    import huggingface_hub.constants as hub

    reason = probe_hub() if needed and not hub.HF_HUB_OFFLINE else None
    if reason is None:
        yield None
        return
    with _lock:
        saved = hub.HF_HUB_OFFLINE
        hub.HF_HUB_OFFLINE = True
        try:
            yield reason
        finally:
            hub.HF_HUB_OFFLINE = saved


_OFFLINE_WORDS = (
    "offline",
    "local cache",
    "disk cache",
    "cached files",
    "couldn't connect",
    "outgoing traffic has been disabled",
)


def needed_a_download(exc: BaseException) -> bool:
    """Whether a load that failed under :func:`no_downloads` failed for want of a download:
    a refused URL, or the hub's offline answer, anywhere in the exception's chain (loaders
    wrap them in their own errors)."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen: BaseException | None = exc
    hops = 0
    while seen is not None and hops < 20:
        if isinstance(seen, DownloadRefused | LocalEntryNotFoundError | OfflineModeIsEnabled):
            return True
        if any(word in str(seen).lower() for word in _OFFLINE_WORDS):
            return True
        seen, hops = seen.__cause__ or seen.__context__, hops + 1
    return False


def unreachable(exc: BaseException) -> bool:
    """Whether a load failed because a download could not happen: refused (:func:`no_downloads`),
    the hub offline or without the file in its cache, or no network (name resolution,
    connection, timeout) anywhere in the exception's chain."""
    import socket
    import urllib.error

    if needed_a_download(exc):
        return True
    seen: BaseException | None = exc
    hops = 0
    network = (urllib.error.URLError, ConnectionError, TimeoutError, socket.gaierror)
    while seen is not None and hops < 20:
        if isinstance(seen, network):
            return True
        seen, hops = seen.__cause__ or seen.__context__, hops + 1
    return False


def download_advice(what: str, source: str, fetch: str, put: str) -> WeightsError:
    """One line for weights this machine cannot download: what failed, where from, and the
    three ways on (a local file, the cache, random weights)."""
    return WeightsError(
        f"cannot download {what} ({source}): this machine cannot reach it. Fetch {fetch} on a "
        f"machine that can and pass --weights PATH, or put it in {put}; --weights none runs "
        "the same pipeline with random weights"
    )
