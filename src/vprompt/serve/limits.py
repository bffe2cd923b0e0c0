"""Request-body size limits, enforced before anything reads or parses the body.

A declared ``Content-Length`` over the limit is refused at once with 413 ``too_large``; a body
without one (chunked) is counted while it streams and refused as soon as it passes the limit.
Multipart uploads get the image limit plus room for the form's other fields; everything else
(JSON) gets the JSON limit.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vprompt.serve.errors import ApiError, error_body
from vprompt.utils import jsonio

FORM_OVERHEAD = 1 * 2**20  # multipart boundaries, headers and small fields next to the file


class BodyLimitMiddleware:
    """Pure ASGI middleware bounding request bodies (see the module docstring).

    Args:
        app: The wrapped application.
        max_upload_bytes: Largest uploaded file (multipart bodies may be this plus
            :data:`FORM_OVERHEAD`).
        max_json_bytes: Largest body of any other request.
    """

    def __init__(self, app: ASGIApp, *, max_upload_bytes: int, max_json_bytes: int) -> None:
        self.app = app
        self.max_upload_bytes = max_upload_bytes
        self.max_json_bytes = max_json_bytes

    def _limit(self, scope: Scope) -> tuple[int, str]:
        ctype = b""
        for key, value in scope.get("headers", ()):
            if key == b"content-type":
                ctype = value.lower()
                break
        if ctype.startswith(b"multipart/form-data"):
            return self.max_upload_bytes + FORM_OVERHEAD, "upload"
        return self.max_json_bytes, "request body"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, what = self._limit(scope)
        declared = None
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
                break
        if declared is not None and declared > limit:
            await _send_413(send, f"{what} of {declared} bytes is over the limit of {limit} bytes")
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise ApiError(413, "too_large", f"{what} is over the limit of {limit} bytes")
            return message

        await self.app(scope, counted, send)


async def _send_413(send: Send, message: str) -> None:
    body = jsonio.dumps(error_body("too_large", message)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
