"""OpenAPI documentation of error responses: every route lists the errors it can give,
all in the project's error shape (Litestar would otherwise document its own)."""

from __future__ import annotations

from litestar.openapi.datastructures import ResponseSpec

from app.errors import ErrorBody

_DESCRIPTIONS = {
    400: "Malformed JSON or invalid input; `details` lists each field and why",
    401: "Missing, unknown or revoked API key",
    403: "The caller's role does not allow this",
    404: "No such resource for this caller (other tenants' rows are not found either)",
    409: "Conflicts with the current state",
    413: "Request body or a field is too large",
    429: "Too many messages from this key; retry after `Retry-After` seconds",
    503: "Not ready",
}


def errors(*statuses: int, authenticated: bool = True) -> dict[int, ResponseSpec]:
    """`responses=` for a route: the given error statuses, 400 (any request can be malformed)
    and 401 when it needs a key."""
    codes = sorted({400, *statuses, *((401,) if authenticated else ())})
    return {
        code: ResponseSpec(data_container=ErrorBody, description=_DESCRIPTIONS[code], generate_examples=False)
        for code in codes
    }
