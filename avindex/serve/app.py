"""The ASGI app of `avindex serve`: API routes, the page at /, self-hosted API docs, JSON errors
for everything a client can get wrong, the token/host guard and metrics; and the uvicorn runner."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import swagger_ui
import uvicorn
from fastapi import FastAPI, Request
from fastapi import HTTPException as FastAPIHTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from avindex.config import ServeConfig
from avindex.errors import AvindexError
from avindex.serve.api import build_router
from avindex.serve.guard import (
    TOKEN_COOKIE,
    TOKEN_PARAM,
    GuardMiddleware,
    bind_warning,
    is_loopback,
    token_matches,
    too_large,
)
from avindex.serve.metrics import MetricsMiddleware
from avindex.serve.state import ServeState

PAGE_DIR = Path(__file__).parent / "static"
DOCS_DIR = Path(swagger_ui.__file__).parent / "static"  # Swagger UI, so /docs needs no CDN
log = logging.getLogger("avindex.serve")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status, headers)


def _validation_message(exc: RequestValidationError) -> str:
    """The first invalid parameter as one line, e.g. 'k: Input should be less than ... 100'."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
    return f"{where or 'request'}: {first.get('msg', 'invalid')}"


def _add_error_handlers(app: FastAPI, cfg: ServeConfig) -> None:
    """Every error is JSON {"error": one line}; nothing a client sends yields a traceback."""

    async def http_error(request: Request, exc: HTTPException) -> Response:
        # The framework's body limit (a Starlette HTTPException, ours are FastAPI's) says only
        # "Content Too Large": name the limit.
        framework_413 = exc.status_code == 413 and not isinstance(exc, FastAPIHTTPException)
        message = too_large(cfg.max_upload_bytes) if framework_413 else str(exc.detail)
        return _error(exc.status_code, message, getattr(exc, "headers", None))

    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        return _error(422, _validation_message(exc))

    async def user_error(request: Request, exc: AvindexError) -> Response:
        return _error(422, str(exc))

    async def internal(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return _error(500, "internal error; the server log has the details")

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(AvindexError, user_error)
    app.add_exception_handler(Exception, internal)


def create_app(state: ServeState) -> FastAPI:
    """The app answering from an opened store."""
    cfg = state.cfg
    app = FastAPI(
        title="avindex",
        summary="Cross-modal audio-visual search over one indexed store.",
        version="1",
        docs_url=None,
        redoc_url=None,
    )
    _add_error_handlers(app, cfg)
    app.include_router(build_router(state))
    app.mount("/static/docs", StaticFiles(directory=DOCS_DIR), name="docs-static")
    app.mount("/static", StaticFiles(directory=PAGE_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def page(request: Request) -> Response:
        """The search page; /?token=TOKEN stores the token in a cookie for the page's media."""
        token = request.query_params.get(TOKEN_PARAM)
        if cfg.token and token is not None:
            if not token_matches(cfg.token, token):
                return _error(401, "wrong token")
            # Redirect so the token leaves the address bar; the cookie carries it from now on.
            response = RedirectResponse("/", 303)
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
            return response
        return FileResponse(PAGE_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        """Swagger UI over /openapi.json, served from the package (no CDN)."""
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="avindex API",
            swagger_js_url="/static/docs/swagger-ui-bundle.js",
            swagger_css_url="/static/docs/swagger-ui.css",
            swagger_favicon_url="/static/favicon.svg",
        )

    app.add_middleware(
        GuardMiddleware,
        token=cfg.token,
        loopback_only=is_loopback(cfg.host),
        max_body=cfg.max_upload_bytes,
    )
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)  # outermost: counts refusals
    return app


def check_config(cfg: ServeConfig) -> None:
    """Raise AvindexError for settings the server cannot run with."""
    if not 1 <= cfg.port <= 65535:
        raise AvindexError(f"--port {cfg.port}: expected 1..65535")
    if not 1 <= cfg.k <= cfg.max_k:
        raise AvindexError(f"--k {cfg.k}: expected 1..{cfg.max_k} (--max-k)")
    if cfg.max_upload_bytes < 1 or not cfg.max_upload_seconds > 0:
        raise AvindexError("--max-upload-bytes and --max-upload-seconds must be positive")


def serve(store_dir: str | os.PathLike, cfg: ServeConfig, model: str | None = None) -> None:
    """Open the store, load its model and indexes, then answer on cfg.host:cfg.port until ^C."""
    check_config(cfg)
    warning = bind_warning(cfg)
    if warning:
        print(warning, flush=True)
    state = ServeState(store_dir, cfg, model)
    print(
        f"avindex serve: {state.store.num_clips} clips of {len(state.catalog)} videos ready; "
        f"open http://{cfg.host}:{cfg.port}/",
        flush=True,
    )
    uvicorn.run(create_app(state), host=cfg.host, port=cfg.port, log_level="info")
