"""Generation events: one tagged union (`type`), the same structs on every transport.

Each event carries its generation, its conversation and `seq` (1, 2, 3 … within the
generation). A generation's events are `start`, then `token`s, then exactly one
terminal event: `done`, `cancelled` or `error`. `snapshot` replaces everything up
to its `seq` for a reader whose cursor fell out of the retained log.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal
from uuid import UUID

import msgspec

from app.errors import InvalidInput
from app.streaming.parts import AnswerParts, Part

# Why an answer was cancelled (docs/protocol.md, `cancelled`).
CANCEL_REASONS = ("user", "interrupted", "disconnected", "deleted", "shutdown")
# Why an answer failed (docs/protocol.md, `error` (generation event)): the core's, then the model adapters'.
ANSWER_ERROR_CODES = (
    "adapter_failed",
    "unknown_adapter",
    "invalid_agent_config",
    "invalid_part",
    "upstream_auth",
    "upstream_not_found",
    "upstream_rate_limited",
    "upstream_unavailable",
    "upstream_rejected",
    "upstream_unreachable",
    "upstream_timeout",
    "upstream_malformed",
    "upstream_malformed_tool_call",
    "upstream_error",
    "upstream_incomplete",
    "upstream_failed",
    "api_key_missing",
    "api_key_not_allowed",
    "producer_lost",
    "broker_unavailable",
    "interrupted",
    "generation_ended",
    "storage_failed",
    "log_unavailable",
    "failed",
)


# Closed sets in the JSON Schema (`enum`), `str` in Python: a value read back from storage
# never fails to decode, and the protocol tests check that the server keeps to the sets.
CancelReason = Annotated[str, msgspec.Meta(extra_json_schema={"enum": list(CANCEL_REASONS)})]
AnswerErrorCode = Annotated[str, msgspec.Meta(extra_json_schema={"enum": list(ANSWER_ERROR_CODES)})]


class _Event(msgspec.Struct, tag_field="type", rename="camel", kw_only=True):
    generation_id: UUID
    conversation_id: UUID
    seq: int


class Start(_Event, tag="start"):
    """The generation began answering `replyToId`."""

    reply_to_id: UUID | None = None
    agent_id: UUID | None = None


class Token(_Event, tag="token"):
    """The next piece of the answer's text: it grows the last part if that is an open text
    part, else opens a new text part (text parts have no start or end event)."""

    text: Annotated[str, msgspec.Meta(min_length=1)]


class PartStart(_Event, tag="part.start"):
    """Part number `part` (its index in the answer; text parts count too) opens: reasoning,
    a tool call (`name`, `toolCallId`), a tool result or data. An open text part closes."""

    part: int
    kind: Literal["reasoning", "tool_call", "tool_result", "data"]
    name: str | None = None
    tool_call_id: str | None = None


class PartDelta(_Event, tag="part.delta"):
    """More of an open part: reasoning text, or a piece of a tool call's arguments (JSON text)."""

    part: int
    text: str


class PartEnd(_Event, tag="part.end"):
    """An open part is complete. A tool call's `value` is its parsed arguments (`invalid`,
    with `error`, when they are not a JSON object); a tool result's, its output; data's, the data."""

    part: int
    state: Literal["complete", "invalid"] = "complete"
    value: Any = None
    error: str | None = None


class Snapshot(_Event, tag="snapshot"):
    """The whole answer up to `seq`, for a reader that missed events no longer retained:
    every part so far (`streaming` while open), and `text`, its text parts concatenated."""

    text: str
    parts: list[Part] = msgspec.field(default_factory=list)


class Done(_Event, tag="done"):
    """The answer is complete and stored as message `messageId`."""

    message_id: UUID
    token_count: int
    finish_reason: str = "stop"


class Cancelled(_Event, tag="cancelled"):
    """The answer was stopped. `messageId` is the stored partial answer, or null when discarded."""

    reason: CancelReason
    message_id: UUID | None = None


class Error(_Event, tag="error"):
    """The answer failed. Nothing is stored unless the partial policy keeps what was
    produced, as message `messageId`. `retryAfter`: seconds the agent's model server asked
    to wait before trying again (rate limited, overloaded), when it said."""

    code: AnswerErrorCode
    message: str
    message_id: UUID | None = None
    retry_after: float | None = None


GenerationEvent = Start | Token | PartStart | PartDelta | PartEnd | Snapshot | Done | Cancelled | Error
TERMINAL_EVENTS = (Done, Cancelled, Error)
# The events that make the answer (what a `snapshot` stands in for).
ANSWER_EVENTS = (Token, PartStart, PartDelta, PartEnd)

# One encoder and decoder for the whole process (hot path: every token of every reader).
json_encoder = msgspec.json.Encoder()
json_decoder = msgspec.json.Decoder(GenerationEvent)


def is_terminal(event: GenerationEvent) -> bool:
    """True for `done`, `cancelled` and `error`."""
    return isinstance(event, TERMINAL_EVENTS)


def fold(answer: AnswerParts, event: GenerationEvent) -> None:
    """Apply one event to the answer's parts (events that do not change them are ignored;
    a `snapshot` replaces them). Raises ValueError for a part event that does not fit."""
    if isinstance(event, Token):
        answer.add_text(event.text)
    elif isinstance(event, PartDelta):
        answer.delta(event.part, event.text)
    elif isinstance(event, PartStart):
        answer.start(event.part, event.kind, event.name, event.tool_call_id)
    elif isinstance(event, PartEnd):
        answer.end(event.part, event.state, event.value, event.error)
    elif isinstance(event, Snapshot):
        answer.reset(event.parts)


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
