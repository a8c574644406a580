"""Opaque keyset cursors: round trip, and a clean 400 for anything else."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest

from app.errors import InvalidInput
from app.pagination import decode_cursor, encode_cursor


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "at",
    [
        datetime(2024, 5, 17, 10, 30, 0, 123456, tzinfo=UTC),
        datetime(2024, 5, 17, 10, 30, 0, 1, tzinfo=UTC),
        datetime(2024, 5, 17, 10, 30, 0, 0, tzinfo=UTC),
        datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ],
)
def test_round_trip_keeps_microseconds(at: datetime) -> None:
    """decode(encode(t, id)) gives back exactly t (to the microsecond) and id."""
    row_id = uuid.uuid4()
    assert decode_cursor(encode_cursor(at, row_id)) == (at, row_id)
    assert decode_cursor(encode_cursor(at, row_id))[0].microsecond == at.microsecond


def test_round_trip_keeps_the_instant_and_timezone() -> None:
    """A non-UTC timestamp comes back as the same instant, still timezone-aware."""
    at = datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    row_id = uuid.uuid4()
    decoded_at, decoded_id = decode_cursor(encode_cursor(at, row_id))
    assert decoded_id == row_id
    assert decoded_at == at
    assert decoded_at.tzinfo is not None
    assert decoded_at.utcoffset() == at.utcoffset()


def test_cursor_is_url_safe_and_unpadded() -> None:
    """The cursor can go in a query string as is."""
    for _ in range(50):
        cursor = encode_cursor(datetime.now(UTC), uuid.uuid4())
        assert "=" not in cursor
        assert "+" not in cursor
        assert "/" not in cursor


def test_pages_serialise_next_cursor_in_camel_case() -> None:
    """A page's `next_cursor` is `nextCursor` on the wire, null when there is no next page."""
    import msgspec

    from app.chat.schemas import ConversationPage, MessagePage

    assert msgspec.json.decode(msgspec.json.encode(ConversationPage(items=[]))) == {"items": [], "nextCursor": None}
    assert msgspec.json.decode(msgspec.json.encode(MessagePage(items=[], next_cursor="abc"))) == {
        "items": [],
        "nextCursor": "abc",
    }


GOOD_ID = "6f1c2f4e-8f5e-4c5b-9a39-0d3f0d3c1a11"


@pytest.mark.parametrize(
    "cursor",
    [
        pytest.param("!!!", id="not-base64-alphabet"),
        pytest.param("a", id="bad-padding"),
        pytest.param("é", id="non-ascii"),
        pytest.param("", id="empty"),
        pytest.param(_b64(b"hello"), id="base64-of-non-json"),
        pytest.param(_b64(b"\xff\xfe\x00"), id="base64-of-binary"),
        pytest.param(_b64(b'{"at": "2024-01-01T00:00:00Z"}'), id="json-object"),
        pytest.param(_b64(b"[1, 2]"), id="json-wrong-types"),
        pytest.param(_b64(b'["2024-01-01T00:00:00Z"]'), id="json-too-short"),
        pytest.param(_b64(f'["2024-01-01T00:00:00Z", "{GOOD_ID}", 3]'.encode()), id="json-too-long"),
        pytest.param(_b64(b'["2024-01-01T00:00:00Z", "not-a-uuid"]'), id="bad-uuid"),
        pytest.param(_b64(f'["yesterday", "{GOOD_ID}"]'.encode()), id="bad-datetime"),
        pytest.param(_b64(f'["2024-01-01T00:00:00", "{GOOD_ID}"]'.encode()), id="naive-datetime"),
        pytest.param(_b64(b"null"), id="json-null"),
    ],
)
def test_garbage_cursor_is_invalid_cursor(cursor: str) -> None:
    """Anything that is not a cursor this API made is a 400 `invalid_cursor`, never a crash."""
    with pytest.raises(InvalidInput) as info:
        decode_cursor(cursor)
    assert info.value.status == 400
    assert info.value.code == "invalid_cursor"


def test_well_formed_utc_cursor_made_by_hand_is_accepted() -> None:
    """A cursor is plain base64url JSON; one with an explicit offset decodes."""
    at, row_id = decode_cursor(_b64(f'["2024-01-01T00:00:00Z", "{GOOD_ID}"]'.encode()))
    assert at == datetime(2024, 1, 1, tzinfo=UTC)
    assert row_id == uuid.UUID(GOOD_ID)


def test_invalid_cursor_details_use_the_list_form_of_other_400s() -> None:
    """A bad cursor names the `cursor` query parameter in the same list form as every other 400
    (`invalid_field`), e.g. a bad `before` on the message list."""
    with pytest.raises(InvalidInput) as info:
        decode_cursor("!!!")
    details = info.value.details
    assert isinstance(details, list), details
    assert [(d["field"], d["source"]) for d in details] == [("cursor", "query")]
    assert all(d["message"] for d in details)
