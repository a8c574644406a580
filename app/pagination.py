"""Opaque keyset cursors: `(timestamp, id)` of the last row of a page, as base64url JSON."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from uuid import UUID

import msgspec

from app.errors import InvalidInput, invalid_field

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(tuple[datetime, UUID])


def encode_cursor(at: datetime, row_id: UUID) -> str:
    """Cursor pointing just past the row with this sort timestamp and id."""
    return base64.urlsafe_b64encode(_encoder.encode((at, row_id))).decode().rstrip("=")


def _invalid() -> InvalidInput:
    return invalid_field("cursor", "not a cursor returned by this API", source="query", code="invalid_cursor")


def decode_cursor(cursor: str) -> tuple[datetime, UUID]:
    """Inverse of :func:`encode_cursor`; a malformed cursor is a 400 naming the parameter."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        at, row_id = _decoder.decode(raw)
    except (binascii.Error, ValueError, msgspec.DecodeError) as exc:
        raise _invalid() from exc
    if at.tzinfo is None:
        raise _invalid()
    return at, row_id
