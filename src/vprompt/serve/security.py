"""Who may talk to the server: the host names it serves, and no cross-origin writes.

A server on a developer's machine is reachable from any web page the developer opens: a page
on ``attacker.example`` can make its own name resolve to 127.0.0.1 (DNS rebinding) and then
read the API as same-origin, or simply post forms to it. Two checks stop that, before any
route runs:

- **Host**: the request's ``Host`` header must name one of the served host names
  (:func:`default_allowed_hosts`, or ``--allowed-host``); otherwise 400 ``bad_host``.
- **Origin**: a request that changes something (any method but GET, HEAD and OPTIONS) sent by
  a browser from another origin (an ``Origin`` header that is not this server, ``null``, or
  ``Sec-Fetch-Site: cross-site``) answers 403 ``cross_origin``. Clients that are not browsers
  send no ``Origin`` and are not affected.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from vprompt.serve.errors import error_response
from vprompt.serve.settings import LOOPBACK_NAMES

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def host_name(host_header: str) -> str:
    """The name in a ``Host`` header, without its port (``[::1]:8000`` → ``::1``)."""
    text = host_header.strip().lower()
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    if text.count(":") == 1:
        return text.split(":", 1)[0]
    return text


def default_allowed_hosts(bind_host: str) -> tuple[str, ...]:
    """The names a server bound to ``bind_host`` is reached by: the loopback names, the bound
    name itself, and for a wildcard bind (``0.0.0.0``, ``::``) this machine's host name and
    addresses. Anything else (a public DNS name, a proxy's name) is added with
    ``--allowed-host``."""
    names = set(LOOPBACK_NAMES)
    bound = bind_host.strip().lower().strip("[]")
    if bound:
        names.add(bound)
    if _is_wildcard(bound):
        names.discard(bound)
        hostname = socket.gethostname().lower()
        names.update({hostname, socket.getfqdn().lower()})
        with contextlib.suppress(OSError):
            names.update(a.lower() for a in socket.gethostbyname_ex(hostname)[2])
    return tuple(sorted(n for n in names if n))


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


class HostOriginMiddleware:
    """Pure ASGI middleware applying the checks in the module docstring.

    Args:
        app: The wrapped application.
        allowed_hosts: Host names (no ports) the server answers to; ``*`` allows any.
    """

    def __init__(self, app: ASGIApp, *, allowed_hosts: Iterable[str]) -> None:
        self.app = app
        self.allowed = frozenset(h.strip().lower().strip("[]") for h in allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        name = host_name(host)
        if "*" not in self.allowed and name not in self.allowed:
            shown = name or "(none)"
            response = error_response(
                400,
                "bad_host",
                f"host {shown!r} is not served here (served: {', '.join(sorted(self.allowed))}); "
                f"start vprompt serve with --allowed-host {shown} to serve it",
            )
            await response(scope, receive, send)
            return
        if scope.get("method", "GET") not in _SAFE_METHODS and _cross_origin(headers, host):
            response = error_response(
                403,
                "cross_origin",
                "requests that change something are not accepted from another web origin",
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _cross_origin(headers: Headers, host: str) -> bool:
    if headers.get("sec-fetch-site", "").lower() == "cross-site":
        return True
    origin = headers.get("origin")
    if origin is None:
        return False  # not a browser's cross-origin request (curl, scripts, same-origin GET)
    if origin.strip().lower() == "null":
        return True  # sandboxed frames, file:// pages
    return urlsplit(origin.strip()).netloc.lower() != host.strip().lower()
