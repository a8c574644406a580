"""Domain errors and the one error shape every 4xx/5xx response uses.

Services raise these; they know nothing about HTTP beyond a status number, so
the WebSocket channel can reuse the same codes later.
"""

from __future__ import annotations

from typing import Any

import msgspec


class ErrorBody(msgspec.Struct):
    """`{"error": str, "code": str, "details": …}` — the shape of every error response."""

    error: str
    code: str
    details: Any = None


class ApiError(Exception):
    """Base of the errors a client can cause. `status` is the HTTP status it maps to."""

    status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details

    def body(self) -> ErrorBody:
        """The error as the wire shape."""
        return ErrorBody(error=self.message, code=self.code, details=self.details)


class InvalidInput(ApiError):
    status = 400
    code = "invalid_request"


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class Forbidden(ApiError):
    status = 403
    code = "forbidden"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class Conflict(ApiError):
    status = 409
    code = "conflict"


class TooLarge(ApiError):
    status = 413
    code = "too_large"


def check_length(field: str, value: str | None, limit: int) -> None:
    """Raise :class:`TooLarge` naming `field` when `value` is longer than `limit` characters."""
    if value is not None and len(value) > limit:
        raise TooLarge(
            f"{field} is too long: {len(value)} characters, at most {limit} allowed",
            details={"field": field, "maxLength": limit, "length": len(value)},
        )


def invalid_field(field: str, message: str, *, source: str = "body", code: str = "invalid_request") -> InvalidInput:
    """A 400 about one field, with `details` in the same list form as schema validation errors."""
    return InvalidInput(
        f"{field}: {message}", code=code, details=[{"field": field, "message": message, "source": source}]
    )


def check_text(field: str, value: str | None, *, blank_ok: bool = False) -> None:
    """Raise :class:`InvalidInput` naming `field` when `value` is blank (empty or only
    whitespace) or holds a NUL character, which PostgreSQL text cannot store."""
    if value is None:
        return
    if not blank_ok and not value.strip():
        raise invalid_field(field, "must not be blank")
    if "\x00" in value:
        raise invalid_field(field, "must not contain NUL (\\u0000) characters")
