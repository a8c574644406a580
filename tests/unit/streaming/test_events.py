"""Event structs: one tagged union, camelCase on the wire, cursors."""

from __future__ import annotations

import uuid

import msgspec
import pytest

from app.errors import InvalidInput
from app.streaming.events import (
    Cancelled,
    Cursor,
    Done,
    Error,
    GenerationEvent,
    Snapshot,
    Start,
    Token,
    cursor_of,
    is_terminal,
    json_decoder,
    json_encoder,
)

G, C, M = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
IDS = {"generation_id": G, "conversation_id": C}
EVENTS: list[GenerationEvent] = [
    Start(**IDS, seq=1, reply_to_id=M),
    Token(**IDS, seq=2, text="hi"),
    Snapshot(**IDS, seq=2, text="hi"),
    Done(**IDS, seq=3, message_id=M, token_count=1),
    Cancelled(**IDS, seq=3, reason="user", message_id=None),
    Error(**IDS, seq=3, code="adapter_failed", message="boom"),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_round_trip_with_type_tag_and_camel_case(event: GenerationEvent) -> None:
    raw = json_encoder.encode(event)
    data = msgspec.json.decode(raw)
    assert data["type"] == type(event).__struct_config__.tag
    assert data["generationId"] == str(G) and data["conversationId"] == str(C) and data["seq"] == event.seq
    assert all("_" not in key for key in data)
    assert json_decoder.decode(raw) == event


def test_terminal_events() -> None:
    assert [is_terminal(e) for e in EVENTS] == [False, False, False, True, True, True]


def test_cursor_round_trip() -> None:
    event = EVENTS[1]
    assert cursor_of(event) == f"{G}.2"
    assert Cursor.parse(cursor_of(event)) == Cursor(generation_id=G, seq=2)
    assert str(Cursor(generation_id=G, seq=7)) == f"{G}.7"


# Ids without the random uuid: every collection of the suite (each test worker's) names them alike.
@pytest.mark.parametrize(
    "raw",
    ["", "x", f"{G}", f"{G}.", f"{G}.x", f"{G}.-1", "nope.3", f"{G}.1.2"],
    ids=lambda raw: raw.replace(str(G), "<gen>") or "<empty>",
)
def test_bad_cursor_is_invalid_input_naming_the_field(raw: str) -> None:
    with pytest.raises(InvalidInput) as info:
        Cursor.parse(raw, "Last-Event-ID")
    assert info.value.code == "invalid_cursor"
    assert info.value.details[0]["field"] == "Last-Event-ID"
