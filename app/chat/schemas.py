"""Request and response bodies of the conversation and message routes."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated
from uuid import UUID

import msgspec

from app.streaming.policy import BusyPolicy, PartialPolicy
from app.tables import GenerationStatus, MessageRole, MessageStatus
from app.text_types import ClientMessageId, Text


class ConversationCreate(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    title: Text | None = None
    agent_id: UUID | None = None


class ConversationUpdate(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    """Only the fields sent change; `null` clears a field."""

    title: Text | msgspec.UnsetType | None = msgspec.UNSET
    agent_id: UUID | msgspec.UnsetType | None = msgspec.UNSET


class ConversationOut(msgspec.Struct, rename="camel"):
    id: UUID
    owner_id: UUID
    agent_id: UUID | None
    title: str | None
    last_message_at: datetime
    created_at: datetime
    updated_at: datetime


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


class MessageEdit(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    content: Text


class MessageOut(msgspec.Struct, rename="camel"):
    id: UUID
    conversation_id: UUID
    role: MessageRole
    author_id: UUID | None
    content: str
    edited_content: str | None
    edited_at: datetime | None
    effective_content: str
    client_message_id: str | None
    generation_id: UUID | None
    status: MessageStatus
    created_at: datetime


class MessagePage(msgspec.Struct, rename="camel"):
    """Messages in chronological order; pass `nextCursor` as `before` for the older page (null: no more)."""

    items: list[MessageOut]
    next_cursor: str | None = None


class GenerationOut(msgspec.Struct, rename="camel"):
    """One agent answer: its state and metrics."""

    id: UUID
    conversation_id: UUID
    reply_to_id: UUID | None
    agent_id: UUID | None
    status: GenerationStatus
    result_message_id: UUID | None
    # Tokens as the model counted them (its usage report), else the pieces streamed.
    token_count: int
    # `token` events sent; the terminal event's seq is chunkCount + 2.
    chunk_count: int
    finish_reason: str | None
    ttft_ms: int | None
    error: str | None
    started_at: datetime
    finished_at: datetime | None


class MessagePosted(msgspec.Struct, rename="camel"):
    """The stored user message and the answer it started (null when none was started)."""

    message: MessageOut
    generation: GenerationOut | None = None


class HistoryItem(msgspec.Struct, rename="camel"):
    """One turn exactly as the agent's adapter is given it."""

    id: UUID
    role: MessageRole
    effective_content: str
    created_at: datetime
