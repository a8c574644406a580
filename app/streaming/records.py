"""The records the streaming core and its transports carry: messages, conversations,
generations and history turns. The REST routes return the same structs (app.chat.schemas
re-exports them), so a message looks the same in a response and in a WebSocket frame.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated
from uuid import UUID

import msgspec

from app.streaming.parts import Part
from app.tables import GenerationStatus, MessageRole, MessageStatus

# Every time the server sends carries its offset (RFC 3339; the schemas say `date-time`).
Timestamp = Annotated[datetime, msgspec.Meta(tz=True)]


class ConversationOut(msgspec.Struct, rename="camel"):
    id: UUID
    owner_id: UUID
    agent_id: UUID | None
    title: str | None
    last_message_at: Timestamp
    created_at: Timestamp
    updated_at: Timestamp


class MessageOut(msgspec.Struct, rename="camel"):
    id: UUID
    conversation_id: UUID
    role: MessageRole
    author_id: UUID | None
    content: str
    edited_content: str | None
    edited_at: Timestamp | None
    effective_content: str
    client_message_id: str | None
    generation_id: UUID | None
    status: MessageStatus
    created_at: Timestamp
    # The answer's parts (an agent or tool message); a user message: one text part.
    parts: list[Part] = msgspec.field(default_factory=list)


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
    started_at: Timestamp
    finished_at: Timestamp | None


class HistoryItem(msgspec.Struct, rename="camel"):
    """One turn exactly as the agent's adapter is given it."""

    id: UUID
    role: MessageRole
    effective_content: str
    created_at: Timestamp
    # The turn as parts: a user message one text part; an agent message its stored parts
    # (edited: its other parts, then the edited text); a tool message its tool_result part.
    parts: list[Part] = msgspec.field(default_factory=list)
