"""Generation events: one tagged union (`type`), the same structs on every transport.

Each event carries its generation, its conversation and `seq` (1, 2, 3 … within the
generation). A generation's events are `start`, then `token`s, then exactly one
terminal event: `done`, `cancelled` or `error`. `snapshot` replaces everything up
to its `seq` for a reader whose cursor fell out of the retained log.
"""

from __future__ import annotations

from uuid import UUID

import msgspec

from app.errors import InvalidInput


class _Event(msgspec.Struct, tag_field="type", rename="camel", kw_only=True):
    generation_id: UUID
    conversation_id: UUID
    seq: int


class Start(_Event, tag="start"):
    """The generation began answering `replyToId`."""

    reply_to_id: UUID | None = None
    agent_id: UUID | None = None


class Token(_Event, tag="token"):
    """The next piece of the answer."""

    text: str


class Snapshot(_Event, tag="snapshot"):
    """The whole answer up to `seq`, for a reader that missed events no longer retained."""

    text: str


class Done(_Event, tag="done"):
    """The answer is complete and stored as message `messageId`."""

    message_id: UUID
    token_count: int
    finish_reason: str = "stop"


class Cancelled(_Event, tag="cancelled"):
    """The answer was stopped. `messageId` is the stored partial answer, or null when discarded."""

    reason: str
    message_id: UUID | None = None


class Error(_Event, tag="error"):
    """The answer failed. Nothing is stored unless the partial policy keeps what was
    produced, as message `messageId`. `retryAfter`: seconds the agent's model server asked
    to wait before trying again (rate limited, overloaded), when it said."""

    code: str
    message: str
    message_id: UUID | None = None
    retry_after: float | None = None


GenerationEvent = Start | Token | Snapshot | Done | Cancelled | Error
TERMINAL_EVENTS = (Done, Cancelled, Error)

# One encoder and decoder for the whole process (hot path: every token of every reader).
json_encoder = msgspec.json.Encoder()
json_decoder = msgspec.json.Decoder(GenerationEvent)


def is_terminal(event: GenerationEvent) -> bool:
    """True for `done`, `cancelled` and `error`."""
    return isinstance(event, TERMINAL_EVENTS)


class Cursor(msgspec.Struct, frozen=True):
    """A reader's position: the last event it has, as `<generationId>.<seq>`."""

    generation_id: UUID
    seq: int

    def __str__(self) -> str:
        return f"{self.generation_id}.{self.seq}"

    @classmethod
    def parse(cls, value: str, field: str = "cursor", source: str = "query") -> Cursor:
        """Parse `<generationId>.<seq>`; anything else is a 400 naming `field` (found in `source`)."""
        gen, _, seq = value.strip().rpartition(".")
        try:
            cursor = cls(generation_id=UUID(gen), seq=int(seq))
        except ValueError:
            cursor = None
        if cursor is None or cursor.seq < 0:
            raise InvalidInput(
                f"{field}: not a cursor; expected <generationId>.<seq>",
                code="invalid_cursor",
                details=[{"field": field, "message": "expected <generationId>.<seq>", "source": source}],
            )
        return cursor


def cursor_of(event: GenerationEvent) -> str:
    """The cursor that points at this event."""
    return f"{event.generation_id}.{event.seq}"
