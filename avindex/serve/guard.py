"""Who may ask: a loopback server answers only requests addressed to a loopback name (so a web
page elsewhere cannot reach it through DNS rebinding), and with a token set every API, media,
metrics and docs request must carry it: `Authorization: Bearer TOKEN`, the `avindex_token`
cookie (set when the page is opened as /?token=TOKEN, so <video> and <img> elements send it) or
a `?token=TOKEN` query parameter."""

from __future__ import annotations

import hmac
import ipaddress

from starlette.datastructures import Headers, QueryParams
from starlette.requests import cookie_parser
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from avindex.config import ServeConfig
from avindex.errors import AvindexError

TOKEN_COOKIE = "avindex_token"
TOKEN_PARAM = "token"
# The page and its files hold no data, and health is for probes: these need no token.
OPEN_PATHS = frozenset({"/", "/api/health", "/favicon.ico"})
OPEN_PREFIX = "/static/"


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1), with or without brackets."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def bind_warning(cfg: ServeConfig) -> str | None:
    """None on loopback; else the warning to print (AvindexError when no token protects it)."""
    if is_loopback(cfg.host):
        return None
    if not cfg.token:
        raise AvindexError(
            f"--host {cfg.host}: other machines could search the store and read its videos; "
            "pass --token SECRET (or set AVINDEX_SERVE_TOKEN), or serve on 127.0.0.1"
        )
    return (
        f"warning: serving on {cfg.host}:{cfg.port}, reachable from other machines; every API "
        "and media request needs the token, and traffic is plain HTTP (put TLS in front)"
    )


def _host_name(header: str) -> str:
    """The name part of a Host header ('[::1]:8000' -> '::1', 'a.b:80' -> 'a.b')."""
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def too_large(limit: int) -> str:
    """The one line of a 413 for an upload over `limit` bytes."""
    return f"upload too large: requests are limited to {limit} bytes (--max-upload-bytes)"


def token_matches(token: str, presented: str | None) -> bool:
    """Constant-time comparison of a presented token with the server's."""
    return presented is not None and hmac.compare_digest(token.encode(), presented.encode())


def presented_tokens(scope: Scope) -> list[str]:
    """Tokens a request carries: bearer header, cookie, query parameter."""
    headers = Headers(scope=scope)
    found = []
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value:
        found.append(value.strip())
    cookie = cookie_parser(headers.get("cookie", "")).get(TOKEN_COOKIE)
    if cookie:
        found.append(cookie)
    param = QueryParams(scope.get("query_string", b"")).get(TOKEN_PARAM)
    if param:
        found.append(param)
    return found


class GuardMiddleware:
    """Refuses requests to a loopback server under a foreign Host, bodies over the upload limit
    and requests without the token."""

    def __init__(self, app: ASGIApp, token: str | None, loopback_only: bool, max_body: int) -> None:
        """Wrap `app`; `token` None means no token is needed; `max_body` bounds a request's
        declared Content-Length (the upload route also counts the bytes as they stream in)."""
        self.app = app
        self.token = token
        self.loopback_only = loopback_only
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer 400/401/413 as JSON, or pass the request on."""
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                status, message, headers = refusal
                await JSONResponse({"error": message}, status, headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> tuple[int, str, dict[str, str]] | None:
        if self.loopback_only:
            host = Headers(scope=scope).get("host", "")
            if not is_loopback(_host_name(host)):
                return 400, f"host {host!r}: this server answers only on a loopback address", {}
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return 413, too_large(self.max_body), {}
        path = scope["path"]
        if self.token is None or path in OPEN_PATHS or path.startswith(OPEN_PREFIX):
            return None
        if any(token_matches(self.token, t) for t in presented_tokens(scope)):
            return None
        return (
            401,
            "this server needs its token: open /?token=TOKEN, or send 'Authorization: Bearer "
            "TOKEN' or ?token=TOKEN",
            {"WWW-Authenticate": "Bearer"},
        )
