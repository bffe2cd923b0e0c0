"""``create_app(settings)``: the FastAPI application behind ``vprompt serve``.

One app serves the JSON API under ``/api`` (:mod:`vprompt.serve.routes`), the web page at
``/`` with its files under ``/static``, and the OpenAPI schema at ``/openapi.json`` (docs page
at ``/docs``). Models load when the app is created, so a bad model name or pack fails at
start-up, not on the first request.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from vprompt.serve.errors import ApiError, install_error_handlers
from vprompt.serve.limits import BodyLimitMiddleware
from vprompt.serve.routes import build_router
from vprompt.serve.security import HostOriginMiddleware
from vprompt.serve.service import Service
from vprompt.serve.settings import ServeSettings

# The page is ES modules, which browsers run only when served with a JavaScript type; some
# platforms' mimetypes tables map .js to something else.
mimetypes.add_type("text/javascript", ".js")

STATIC_DIR = Path(__file__).resolve().parent / "static"


def _version() -> str:
    from vprompt import __version__

    return __version__


def create_app(settings: ServeSettings | None = None, *, service: Service | None = None) -> FastAPI:
    """Build the server application.

    Args:
        settings: Models and limits (defaults: ``ServeSettings()``).
        service: An already-built :class:`Service` to serve instead (its settings win).

    Returns:
        The app; its :class:`Service` is ``app.state.service``.
    """
    service = service or Service(settings or ServeSettings())
    app = FastAPI(
        title="vprompt",
        version=_version(),
        description="Promptable segmentation, open-vocabulary detection, defect search and "
        "zero-shot classification with frozen models (see docs/serve-api.md).",
        # FastAPI's own /docs and /redoc load their scripts from a CDN: blank offline.
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = service
    install_error_handlers(app)
    app.add_middleware(
        BodyLimitMiddleware,
        max_upload_bytes=service.settings.max_upload_bytes,
        max_json_bytes=service.settings.max_json_bytes,
    )
    # Added last, so it runs first: a request for another host is refused before anything.
    app.add_middleware(HostOriginMiddleware, allowed_hosts=service.settings.allowed_hosts)
    app.include_router(build_router(service))

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            raise ApiError(404, "not_found", "the web page is not installed")
        return FileResponse(page, media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
    _offline_docs(app)
    return app


def _offline_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI from the ``swagger-ui-bundle`` package (Apache-2.0), served by
    this server, so the API page works on an air-gapped machine."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import HTMLResponse

    try:
        import swagger_ui_bundle
    except ImportError:  # pragma: no cover - a dependency of the serve extra
        return
    assets = Path(swagger_ui_bundle.swagger_ui_path)
    app.mount("/docs-assets", StaticFiles(directory=assets, check_dir=False), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title="vprompt API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png",
        )
