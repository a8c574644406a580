"""A request id for every HTTP request and WebSocket, and one log line for each.

The id comes from the client's `X-Request-ID` when it is a sane one (see
:func:`app.logs.valid_request_id`), else it is made here; it is returned in the `X-Request-ID`
response header (HTTP responses, SSE streams, WebSocket handshakes) and held in a context
variable for the whole request, so every line logged on its behalf, and by the answers it
starts, carries it.

The line (logger `chatstream.access`, written when the response or the socket ends): method,
route (the path template, e.g. `/api/conversations/{conversation_id}`) and path, status,
duration, client address, company id when the caller was authenticated. Never the query
string, a header or a body: credentials and content stay out of the log. It replaces
uvicorn's access line (turned off by `chatstream serve`, app/server.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import Any, cast

from litestar.datastructures import MutableScopeHeaders
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from app.logs import log_fields, new_request_id, request_id_var, valid_request_id

logger = logging.getLogger("chatstream.access")

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID_HEADER_BYTES = REQUEST_ID_HEADER.encode()
# Longer paths (only unknown ones can be) are cut in the log line.
PATH_LOGGED_CHARS = 300


def request_id_of(scope: Scope) -> str:
    """The client's `X-Request-ID` when it is a sane one, else a new id."""
    for name, value in scope.get("headers", ()):
        if name == _REQUEST_ID_HEADER_BYTES:
            return valid_request_id(value) or new_request_id()
    return new_request_id()


def with_request_log(app: ASGIApp) -> ASGIApp:
    """Wrap an app's whole ASGI handler (error responses and unknown routes included): give
    each request its id (context variable, response header) and log one line when it ends.
    Only the response start (the handshake for a WebSocket) is touched; every other message
    goes to the server's `send` as it is."""

    async def handle(scope: Scope, receive: Receive, send: Send) -> None:
        # HTTP or WebSocket: Litestar gives its lifespan events to its router, not to this handler.
        request_id = request_id_of(scope)
        raw_id = request_id.encode()
        status: int | None = None

        def send_with_id(message: Message) -> Awaitable[None]:
            nonlocal status
            kind = message["type"]
            if kind in ("http.response.start", "websocket.http.response.start"):
                status = cast("dict[str, Any]", message)["status"]
                MutableScopeHeaders.from_message(message)[REQUEST_ID_HEADER] = request_id
            elif kind == "websocket.accept":
                status = 101
                accept = cast("dict[str, Any]", message)
                accept["headers"] = [*(accept.get("headers") or ()), (_REQUEST_ID_HEADER_BYTES, raw_id)]
            elif kind == "websocket.close" and status is None:
                status = 403  # closed before the handshake: the server refuses the upgrade
            return send(message)

        token = request_id_var.set(request_id)
        started = time.perf_counter()
        try:
            await app(scope, receive, send_with_id)
        except BaseException:
            if status is None:
                status = 500
            raise
        finally:
            log_request(scope, status, time.perf_counter() - started)
            request_id_var.reset(token)

    return handle


def log_request(scope: Scope, status: int | None, seconds: float) -> None:
    """The request's one line (see the module docstring)."""
    websocket = scope["type"] == ScopeType.WEBSOCKET
    method = "WEBSOCKET" if websocket else scope.get("method", "")
    path = scope.get("path", "")[:PATH_LOGGED_CHARS]  # ASGI keeps the query string apart
    route = scope.get("path_template")
    user: Any = scope.get("user")
    company_id = getattr(user, "company_id", None)
    client = scope.get("client")
    duration_ms = round(seconds * 1000, 1)
    shown = "-" if status is None else status
    logger.log(
        logging.WARNING if status is not None and status >= 500 else logging.INFO,
        "%s %s %s %.0f ms (request %s%s)",
        method,
        path,
        shown,
        duration_ms,
        request_id_var.get(),
        f", company {company_id}" if company_id else "",
        extra=log_fields(
            event="request",
            method=method,
            route=route,
            path=path,
            status=status,
            durationMs=duration_ms,
            companyId=str(company_id) if company_id else None,
            client=client[0] if client else None,
        ),
    )
