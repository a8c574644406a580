"""Request and response bodies of the conversation and message routes."""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

import msgspec

from app.streaming.policy import BusyPolicy, PartialPolicy
from app.streaming.records import ConversationOut, GenerationOut, HistoryItem, MessageOut
from app.text_types import ClientMessageId, Text, ToolCallId


class ConversationCreate(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    title: Text | None = None
    agent_id: UUID | None = None


class ConversationUpdate(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    """Only the fields sent change; `null` clears a field."""

    title: Text | msgspec.UnsetType | None = msgspec.UNSET
    agent_id: UUID | msgspec.UnsetType | None = msgspec.UNSET


class ConversationPage(msgspec.Struct, rename="camel"):
    """Conversations, newest activity first; pass `nextCursor` as `cursor` for the next page (null: no more)."""

    items: list[ConversationOut]
    next_cursor: str | None = None


class MessageCreate(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    """A user message. `clientMessageId` makes retries safe; `reply: false` asks for no answer.
    `ifBusy`, `partial` and `disconnectGrace` override the server's streaming policy for this answer."""

    content: Text
    client_message_id: ClientMessageId | None = None
    reply: bool = True
    if_busy: BusyPolicy | None = None
    partial: PartialPolicy | None = None
    disconnect_grace: Annotated[float, msgspec.Meta(ge=0, le=3600)] | None = None


class AnswerAgain(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    """Asking the agent again for a message (the body may be left out). `ifBusy`, `partial`
    and `disconnectGrace` override the server's streaming policy for the new answer, as for a post."""

    if_busy: BusyPolicy | None = None
    partial: PartialPolicy | None = None
    disconnect_grace: Annotated[float, msgspec.Meta(ge=0, le=3600)] | None = None


class ToolResultCreate(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    """A client's result for a tool call of the agent's last answer: `output` (any JSON), or
    `error` when the tool failed. Posting the same result again is safe (one result per call)."""

    tool_call_id: ToolCallId
    output: Any = msgspec.UNSET
    error: Text | None = None


class MessageEdit(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    content: Text


class MessagePage(msgspec.Struct, rename="camel"):
    """Messages in chronological order; pass `nextCursor` as `before` for the older page (null: no more)."""

    items: list[MessageOut]
    next_cursor: str | None = None


class MessagePosted(msgspec.Struct, rename="camel"):
    """The stored user message and the answer it started (null when none was started)."""

    message: MessageOut
    generation: GenerationOut | None = None


__all__ = [
    "AnswerAgain",
    "ConversationCreate",
    "ConversationOut",
    "ConversationPage",
    "ConversationUpdate",
    "GenerationOut",
    "HistoryItem",
    "MessageCreate",
    "MessageEdit",
    "MessageOut",
    "MessagePage",
    "MessagePosted",
    "ToolResultCreate",
]
