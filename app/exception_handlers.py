"""Turn every exception into the project's error shape; never leak a traceback."""

from __future__ import annotations

import logging
import re
from typing import Any

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from litestar.types import ExceptionHandlersMap

from app import metrics
from app.config import get_settings
from app.db import OUTAGE_RETRY_AFTER, is_outage
from app.errors import ApiError, ErrorBody
from app.rate_limit import TooManyRequests
from app.streaming.broker import BrokerUnavailable
from app.text_types import NO_NUL_PATTERN

logger = logging.getLogger("chatstream.errors")

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "body_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    503: "unavailable",
}


def _response(status: int, body: ErrorBody, headers: dict[str, str] | None = None) -> Response[ErrorBody]:
    return Response(content=body, status_code=status, media_type=MediaType.JSON, headers=headers)


# msgspec names the offending body field inside its message: "… field `x`" or "… - at `$.x`".
_FIELD_IN_MESSAGE = re.compile(r"field `([^`]+)`|at `\$\.([^`]+)`")


def _validation_details(extra: Any) -> list[dict[str, Any]]:
    """Litestar reports each failure as {"message", "key", "source"}; give clients `field` and `source`."""
    details = []
    for item in extra if isinstance(extra, list) else []:
        if not isinstance(item, dict):
            continue
        message = str(item.get("message", ""))
        field = item.get("key")
        if field in (None, "data"):  # the body as a whole: find the field in msgspec's message
            match = _FIELD_IN_MESSAGE.search(message)
            field = (match.group(1) or match.group(2)) if match else None
            message = message.split(" - at `")[0]
        if NO_NUL_PATTERN in message or "\\x00" in message:
            message = "must not contain NUL (\\u0000) characters"
        source = item.get("source")
        entry: dict[str, Any] = {"message": message, "source": getattr(source, "value", source) or "body"}
        if field:
            entry["field"] = field
        details.append(entry)
    return details


def handle_api_error(_: Request[Any, Any, Any], exc: ApiError) -> Response[ErrorBody]:
    """Errors raised on purpose by services."""
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    if isinstance(exc, TooManyRequests):
        headers = {"Retry-After": str(exc.retry_after)}
    return _response(exc.status, exc.body(), headers)


def handle_http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[ErrorBody]:
    """Litestar's own errors: routing, parsing, validation, body size, auth."""
    status = exc.status_code
    if status >= 500:
        logger.error("server error: %s", exc.detail)
        return _response(status, ErrorBody(error="internal server error", code="internal_error"))
    if isinstance(exc, ValidationException):
        if _body_missing(exc.extra):
            return _response(400, _malformed("the request has no body; a JSON object is required"))
        return _response(400, _validation_body(exc))
    code = _CODES.get(status, "http_error")
    message = exc.detail or code.replace("_", " ")
    details = None
    if status == 400 and request.method in _BODY_METHODS:
        # Litestar's plain 400 on a request with a body: the body could not be decoded.
        return _response(400, _malformed(f"the request body is not valid JSON ({message})"))
    if status == 404:
        message = "not found"
    elif status == 413:
        limit = get_settings().max_body_bytes
        message = f"the request body is too large: at most {limit} bytes"
        details = {"maxBytes": limit}
    headers = dict(exc.headers or {})
    if status == 401:
        headers.setdefault("WWW-Authenticate", "Bearer")
    return _response(status, ErrorBody(error=message, code=code, details=details), headers)


_BODY_METHODS = {"POST", "PUT", "PATCH"}


def _malformed(message: str) -> ErrorBody:
    return ErrorBody(error=message, code="malformed_json")


def _body_missing(extra: Any) -> bool:
    # An empty body reaches validation as a missing `data` kwarg, reported as the bare key.
    return isinstance(extra, list) and any(isinstance(i, dict) and i.get("message") == "'data'" for i in extra)


def handle_undecodable_body(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    """JSON that the decoder cannot even read: invalid UTF-8 or absurd nesting."""
    if isinstance(exc, RecursionError):
        return _response(400, _malformed("the request body is nested too deeply"))
    return _response(400, _malformed("the request body is not valid UTF-8 JSON"))


def _validation_body(exc: ValidationException) -> ErrorBody:
    details = _validation_details(exc.extra)
    message = "the request is not valid"
    if len(details) == 1:
        message = details[0]["message"]
        if "field" in details[0]:
            message = f"{details[0]['field']}: {message}"
    return ErrorBody(error=message, code="invalid_request", details=details or None)


def handle_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    """A bug of ours: log it with its traceback, answer without one. A database outage is not
    a bug: 503 with Retry-After (clients and load balancers retry), one log line."""
    metrics.database_error("http", exc)
    if is_outage(exc):
        logger.warning("database unavailable on %s %s: %s", request.method, request.url.path, type(exc).__name__)
        body = ErrorBody(
            error="the server cannot reach its database; retry shortly",
            code="database_unavailable",
            details={"retryAfter": OUTAGE_RETRY_AFTER},
        )
        return _response(503, body, {"Retry-After": str(OUTAGE_RETRY_AFTER)})
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _response(
        HTTP_500_INTERNAL_SERVER_ERROR,
        ErrorBody(error="internal server error", code="internal_error"),
    )


# Seconds a client is asked to wait when the broker (Redis) is down.
BROKER_RETRY_AFTER = 5


def handle_broker_unavailable(_: Request[Any, Any, Any], exc: BrokerUnavailable) -> Response[ErrorBody]:
    """Redis is down: 503 with Retry-After. Nothing was stored (the broker is called before
    the database in every path that needs both)."""
    logger.warning("broker unavailable: %s", exc)
    body = ErrorBody(
        error="the server cannot reach its message broker (Redis); retry shortly",
        code="broker_unavailable",
        details={"retryAfter": BROKER_RETRY_AFTER},
    )
    return _response(503, body, {"Retry-After": str(BROKER_RETRY_AFTER)})


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    # Raised while Litestar decodes a request body, before any of our code runs.
    UnicodeDecodeError: handle_undecodable_body,
    RecursionError: handle_undecodable_body,
    ApiError: handle_api_error,
    BrokerUnavailable: handle_broker_unavailable,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}
