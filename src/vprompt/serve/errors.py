"""Every error the API answers, as ``{"error": {"code": ..., "message": ...}}``.

Handlers cover our own :class:`ApiError`, vprompt's input errors, FastAPI's request validation
(422 ``invalid_request``), Starlette's HTTP errors (404 for unknown routes, 405 …) and anything
unexpected (500 ``internal``, logged with its traceback but never shown to the client).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vprompt.errors import ConfigError, PromptError

log = logging.getLogger("vprompt.serve")

_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media",
    422: "invalid_request",
    503: "busy",
}


class ApiError(StarletteHTTPException):
    """An error with its status and the contract's machine-readable code.

    It derives from Starlette's HTTPException so FastAPI re-raises it untouched when it
    happens while the request body is read (the body-size limit).
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status_code=status, detail=message)
        self.code = code
        self.message = message


def error_body(code: str, message: str) -> dict[str, Any]:
    """The JSON body of every error response."""
    return {"error": {"code": code, "message": message}}


def error_response(status: int, code: str, message: str) -> JSONResponse:
    """A JSON error response."""
    return JSONResponse(error_body(code, message), status_code=status)


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status_code, exc.code, exc.message)


async def _prompt_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(422, "invalid_prompt", str(exc))


async def _config_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(422, "invalid_request", str(exc))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(422, "invalid_request", _describe_validation(exc))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    code = _HTTP_CODES.get(status, "error")
    if status == 404:
        message = f"no such route: {request.method} {request.url.path}"
    elif status == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return JSONResponse(error_body(code, message), status_code=status, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal", "internal server error (see the server log)")


def install_error_handlers(app: FastAPI) -> None:
    """Register every handler on ``app`` (the most specific class wins)."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(PromptError, _prompt_error)
    app.add_exception_handler(ConfigError, _config_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
