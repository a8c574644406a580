"""Domain errors: status, code, the wire shape, and the field checks services use."""

from __future__ import annotations

import msgspec
import pytest

from app.errors import (
    ApiError,
    Conflict,
    ErrorBody,
    Forbidden,
    InvalidInput,
    NotFound,
    TooLarge,
    Unauthorized,
    check_length,
    check_text,
    invalid_field,
)


@pytest.mark.parametrize(
    ("cls", "status", "code"),
    [
        (InvalidInput, 400, "invalid_request"),
        (Unauthorized, 401, "unauthorized"),
        (Forbidden, 403, "forbidden"),
        (NotFound, 404, "not_found"),
        (Conflict, 409, "conflict"),
        (TooLarge, 413, "too_large"),
    ],
)
def test_each_error_has_its_status_and_default_code(cls: type[ApiError], status: int, code: str) -> None:
    """Every error class maps to one HTTP status and a default code."""
    exc = cls("boom")
    assert isinstance(exc, ApiError)
    assert exc.status == status
    assert exc.code == code
    assert exc.message == "boom"
    assert exc.details is None


def test_code_and_details_can_be_overridden_per_instance() -> None:
    """A specific code replaces the default on that instance only."""
    exc = Conflict("taken", code="client_message_id_conflict", details={"messageId": "x"})
    assert exc.code == "client_message_id_conflict"
    assert exc.details == {"messageId": "x"}
    assert Conflict("other").code == "conflict"


def test_body_is_the_error_shape() -> None:
    """`body()` is `{"error", "code", "details"}`, all three always present on the wire."""
    body = NotFound("conversation not found", details={"conversationId": "1"}).body()
    assert isinstance(body, ErrorBody)
    assert msgspec.json.decode(msgspec.json.encode(body)) == {
        "error": "conversation not found",
        "code": "not_found",
        "details": {"conversationId": "1"},
    }
    assert msgspec.json.decode(msgspec.json.encode(Forbidden("no").body())) == {
        "error": "no",
        "code": "forbidden",
        "details": None,
    }


def test_check_length_accepts_up_to_the_limit_and_none() -> None:
    """Exactly `limit` characters (and a missing value) pass."""
    check_length("title", "x" * 200, 200)
    check_length("title", "", 200)
    check_length("title", None, 200)


def test_check_length_counts_characters_not_bytes() -> None:
    """The limit is in characters: multi-byte characters count once."""
    check_length("content", "é" * 10, 10)
    with pytest.raises(TooLarge):
        check_length("content", "é" * 11, 10)


def test_check_length_over_the_limit_is_too_large_naming_the_field() -> None:
    """One character over is a 413 whose details name the field, the limit and the length."""
    with pytest.raises(TooLarge) as info:
        check_length("title", "x" * 201, 200)
    exc = info.value
    assert exc.status == 413
    assert exc.code == "too_large"
    assert exc.details == {"field": "title", "maxLength": 200, "length": 201}
    assert "title" in exc.message


@pytest.mark.parametrize("value", ["", " ", "   ", "\n\t", "\u3000"])
def test_check_text_rejects_empty_and_whitespace(value: str) -> None:
    """Empty or whitespace-only text is invalid input naming the field."""
    with pytest.raises(InvalidInput) as info:
        check_text("content", value)
    exc = info.value
    assert exc.status == 400
    assert exc.details == [{"field": "content", "message": "must not be blank", "source": "body"}]


@pytest.mark.parametrize("value", ["a", " a ", "\nx", None])
def test_check_text_accepts_text_and_none(value: str | None) -> None:
    """Anything with a visible character, or a missing value, passes."""
    check_text("content", value)


def test_invalid_field_builds_a_400_about_one_field() -> None:
    """`invalid_field` gives the list form of details with field, message and source."""
    exc = invalid_field("before", "not a message id", source="query", code="invalid_cursor")
    assert isinstance(exc, InvalidInput)
    assert exc.code == "invalid_cursor"
    assert exc.details == [{"field": "before", "message": "not a message id", "source": "query"}]
    assert exc.message.startswith("before")


@pytest.mark.parametrize("value", ["a\x00b", "\x00"])
def test_check_text_rejects_nul(value: str) -> None:
    """NUL cannot be stored by PostgreSQL, so both engines refuse it alike."""
    with pytest.raises(InvalidInput) as info:
        check_text("content", value)
    assert info.value.details[0]["field"] == "content"
    assert "NUL" in info.value.details[0]["message"]
