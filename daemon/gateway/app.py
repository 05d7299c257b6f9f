"""The gateway's ASGI app: routes, errors as JSON, limits, CORS, the dashboard's files."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from daemon import __version__
from daemon.gateway import openai_api, rest, ws
from daemon.gateway.errors import ApiError, error_body
from daemon.gateway.limits import BodyLimit, BodyTooLarge
from daemon.gateway.ports import Ports

log = logging.getLogger(__name__)

STATIC: Final = Path(__file__).resolve().parent / "static"
# The dashboard's pages: scripts and styles only from the gateway itself; nothing
# a model or an event says can run (the page renders text with textContent).
CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "media-src 'self' blob:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'none'"
)
PAGE_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def create_app(ports: Ports) -> Any:
    """The ASGI application (FastAPI inside the body-size limit)."""
    cfg = ports.cfg
    app = FastAPI(
        title="M-TOR gateway",
        version=__version__,
        summary="The realm over HTTP: OpenAI-compatible API, REST, WebSocket, dashboard.",
        docs_url=None,  # FastAPI's pages load from a CDN; /docs is local (below)
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.ports = ports
    app.include_router(openai_api.router)
    app.include_router(rest.router)
    app.include_router(ws.router)
    _errors(app)
    _pages(app, cfg.docs)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    if cfg.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cfg.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return BodyLimit(app, max_body=cfg.max_body_bytes, max_upload=cfg.max_upload_bytes)


def _errors(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    async def invalid(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid')}" if where else "invalid request"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more)"
        return JSONResponse(
            error_body(400, "bad_request", message[:1000], where or None), status_code=400
        )

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        return JSONResponse(
            error_body(exc.status_code, code, str(exc.detail)), status_code=exc.status_code
        )

    async def too_large(request: Request, exc: Exception) -> Response:
        return JSONResponse(error_body(413, "too_large", "request body too large"), 413)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.error(  # the handler of an exception: with its traceback
            "gateway: %s %s failed", request.method, request.url.path, exc_info=exc
        )
        return JSONResponse(
            error_body(500, "internal", f"internal error: {type(exc).__name__}"), 500
        )

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(BodyTooLarge, too_large)
    app.add_exception_handler(Exception, unexpected)


def _pages(app: FastAPI, docs: bool) -> None:
    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    if docs:

        @app.get("/docs", include_in_schema=False)
        async def docs_page() -> Response:
            return FileResponse(STATIC / "docs.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        description=(
            "Every route needs `Authorization: Bearer <API token>` (a realm user's token: "
            "`mtor admin user-add`, or the login token `mtor up` prints). Errors are "
            '`{"error": {"message", "type", "code", "param"}}`. See docs/gateway.md.'
        ),
        routes=app.routes,
    )
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
    schema["security"] = [{"bearer": []}]
    app.openapi_schema = schema
    return schema
