"""Browser-facing protections of every request: the Host check (DNS rebinding), CSRF checks
on `/api` writes, and the security headers of every response.

A page on another site (or another port of the same host) can make the browser send the
session cookie along; only `Origin` / `Sec-Fetch-Site` tell such a request apart, and
only a JSON content type keeps a plain HTML form or a "simple" `fetch` from sending one
without asking the server first.
"""

from __future__ import annotations

from collections.abc import Awaitable
from urllib.parse import urlsplit

from litestar.datastructures import Headers, MutableScopeHeaders
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings
from app.errors import ApiError, Forbidden, InvalidInput

# Load balancers probe these, and Prometheus scrapes `/metrics`, with whatever Host they like.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOGIN_PATH = "/api/session"
# `none`: typed in the address bar or a bookmark; never another site.
SAFE_FETCH_SITES = frozenset({"same-origin", "none"})

SECURITY_HEADERS = {
    # No inline script or style anywhere: the web client is files of its own origin only.
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


class UnsupportedMediaType(ApiError):
    status = 415
    code = "unsupported_media_type"


def host_name(host: str) -> str:
    """The name part of a `Host` header: `[::1]:8000` -> `::1`, `Example.com:80` -> `example.com`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def allowed_host_names(settings: Settings) -> frozenset[str] | None:
    """The host names requests may use; None when the check is off (`*`)."""
    listed = {host_name(h) for h in settings.allowed_hosts.split(",") if h.strip()}
    if "*" in listed:
        return None
    if settings.public_url:
        listed.add(host_name(urlsplit(settings.public_url).netloc))
    else:  # development: the server is only reached from this machine
        listed |= LOOPBACK_HOSTS
    return frozenset(listed)


def origin_allowed(origin: str, host: str | None, settings: Settings) -> bool:
    """Whether a browser `Origin` is the server's own: the public URL's, the `Host` the request
    was sent to, or one of `allowed_origins`."""
    origin = origin.strip().rstrip("/").lower()
    own = {o.strip().rstrip("/").lower() for o in settings.allowed_origins.split(",") if o.strip()}
    if settings.public_url:
        public = urlsplit(settings.public_url)
        own.add(f"{public.scheme}://{public.netloc}".lower())
    if origin in own:
        return True
    return host is not None and urlsplit(origin).netloc == host.strip().lower()


def same_origin_request(headers: Headers, settings: Settings, *, allow_without_headers: bool) -> bool:
    """Whether a request was made by a page of the server's own origin.

    `Origin` decides when present, else `Sec-Fetch-Site`. A request with neither does not
    come from a current browser (only browsers can be tricked into sending one): it gets
    `allow_without_headers`.
    """
    origin = headers.get("origin")
    if origin is not None:
        return origin_allowed(origin, headers.get("host"), settings)
    site = headers.get("sec-fetch-site")
    if site is not None:
        return site.strip().lower() in SAFE_FETCH_SITES
    return allow_without_headers


def check_request(scope: Scope, settings: Settings, names: frozenset[str] | None) -> None:
    """Raise the refusal for a request that must not reach the app, if it is one (`names`:
    :func:`allowed_host_names` of `settings`)."""
    headers = Headers.from_scope(scope)
    if names is not None and host_name(headers.get("host", "")) not in names:
        raise InvalidInput(
            "this server does not answer to that Host; set CHATSTREAM_PUBLIC_URL or CHATSTREAM_ALLOWED_HOSTS",
            code="host_not_allowed",
            details={"host": headers.get("host")},
        )
    method = scope.get("method", "GET")
    if scope["type"] != ScopeType.HTTP or method not in UNSAFE_METHODS or not scope["path"].startswith("/api/"):
        return
    has_body = headers.get("content-length", "0").strip() != "0" or "transfer-encoding" in headers
    media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
    if has_body and media_type != "application/json":
        raise UnsupportedMediaType(
            "request bodies must be JSON: send 'Content-Type: application/json'",
            details={"contentType": headers.get("content-type")},
        )
    cookie_auth = "authorization" not in headers and settings.cookie_name in _cookie_names(headers)
    login = method == "POST" and scope["path"].rstrip("/") == LOGIN_PATH
    if (cookie_auth or login) and not same_origin_request(headers, settings, allow_without_headers=not cookie_auth):
        raise Forbidden(
            "cross-origin request refused: a browser may only send this from the server's own pages",
            code="origin_refused",
            details={"origin": headers.get("origin"), "secFetchSite": headers.get("sec-fetch-site")},
        )


def _cookie_names(headers: Headers) -> set[str]:
    return {part.partition("=")[0].strip() for part in headers.get("cookie", "").split(";")}


class HttpSecurityMiddleware(ASGIMiddleware):
    """Refuses foreign hosts and cross-site `/api` writes (see :func:`check_request`)."""

    scopes = (ScopeType.HTTP, ScopeType.WEBSOCKET)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.host_names = allowed_host_names(settings)  # once: settings do not change

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        if scope["path"] not in PROBE_PATHS:
            check_request(scope, self.settings, self.host_names)
        await next_app(scope, receive, send)


def with_security_headers(app: ASGIApp) -> ASGIApp:
    """Wrap an app's whole ASGI handler (error responses and unknown routes included) so that
    every HTTP response starts with the security headers it does not set itself.

    Only the response start is touched; every other message (each token of a stream) goes
    to the server's `send` as it is, with no coroutine in between (a Litestar `before_send`
    hook costs two per body chunk and per WebSocket frame)."""

    async def handle(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return

        def send_with_headers(message: Message) -> Awaitable[None]:
            if message["type"] == "http.response.start":
                headers = MutableScopeHeaders.from_message(message)
                for name, value in SECURITY_HEADERS.items():
                    if name not in headers:
                        headers[name] = value
            return send(message)

        await app(scope, receive, send_with_headers)

    return handle
