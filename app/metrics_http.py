"""`GET /metrics` and the counting of HTTP requests (the metrics themselves: app/metrics.py).

`/metrics` is not under `/api`: no API key opens it, and it is not in the OpenAPI document.
`CHATSTREAM_METRICS=off` leaves the route out (404); `CHATSTREAM_METRICS_TOKEN` has it
answer only `Authorization: Bearer <token>` (else 401 in the error shape).
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable
from typing import Any

from litestar import Request, Response, get
from litestar.enums import ScopeType
from litestar.handlers import HTTPRouteHandler
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from app import metrics
from app.errors import Unauthorized

METRICS_PATH = "/metrics"
# Methods counted by name; any other is `other` (a client may send any word as a method).
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def metrics_route(token: str | None) -> HTTPRouteHandler:
    """`GET /metrics`; with `token`, only for `Authorization: Bearer <token>` (else 401)."""
    expected = f"Bearer {token}".encode() if token else None

    @get(METRICS_PATH, include_in_schema=False, sync_to_thread=False, name="metrics")
    def metrics_endpoint(request: Request[Any, Any, Any]) -> Response[bytes]:
        if expected is not None:
            sent = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(sent, expected):
                raise Unauthorized("metrics need 'Authorization: Bearer <CHATSTREAM_METRICS_TOKEN>'")
        body = metrics.exposition()
        return Response(body, media_type=CONTENT_TYPE_PLAIN_0_0_4, headers={"Cache-Control": "no-store"})

    return metrics_endpoint


def counting_http_requests(app: ASGIApp) -> ASGIApp:
    """Wrap Litestar's whole handler (its error responses and 404s too): count each HTTP request
    by method, route template (never the raw path: a bounded set of labels) and status, and time
    it to the end of its response. Only the response start is looked at."""

    async def handle(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        def send_watching_status(message: Message) -> Awaitable[None]:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            return send(message)

        try:
            await app(scope, receive, send_watching_status)
        finally:
            if status:  # else the client left before any answer
                sent: str = scope.get("method", "")
                method = sent if sent in _METHODS else "other"
                # Litestar's router sets the template of the route it matched.
                route = scope.get("path_template") or "unmatched"
                metrics.http_request(method, route, status, time.perf_counter() - started)

    return handle
