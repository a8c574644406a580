"""The WebSocket protocol: client frames, server frames and conversation events.

Frames are msgspec structs in tagged unions (`type`), encoded as JSON text frames or,
with subprotocol `chatstream.msgpack`, as MessagePack binary frames — same structs,
same field names. Generation events (`start`, `token`, … see events.py) are sent as
they are. `ref` is a string the client may put on any frame; the `ack`, `error` or
`pong` answering it carries it back.
"""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

import msgspec

from app.streaming.events import GenerationEvent
from app.streaming.policy import BusyPolicy, PartialPolicy
from app.streaming.records import ConversationOut, GenerationOut, MessageOut, Timestamp
from app.text_types import ClientMessageId, Text, ToolCallId

Ref = Annotated[str, msgspec.Meta(max_length=64)]


class _ClientFrame(msgspec.Struct, tag_field="type", rename="camel", kw_only=True, forbid_unknown_fields=True):
    ref: Ref | None = None


class Subscribe(_ClientFrame, tag="subscribe"):
    """Follow a conversation: its answers (from `after`, a cursor, when resuming) and its
    changes (those after `since`, the `conversationSeq` of the last conversation event the client has)."""

    conversation_id: UUID
    after: str | None = None
    since: Annotated[int, msgspec.Meta(ge=0)] | None = None


class Unsubscribe(_ClientFrame, tag="unsubscribe"):
    conversation_id: UUID


class Send(_ClientFrame, tag="send"):
    """Post a user message (idempotent by `clientMessageId`); the answer starts if the
    conversation has an agent. `ifBusy`, `partial`, `disconnectGrace`: as in the HTTP POST."""

    conversation_id: UUID
    content: Text
    client_message_id: ClientMessageId
    reply: bool = True
    if_busy: BusyPolicy | None = None
    partial: PartialPolicy | None = None
    disconnect_grace: Annotated[float, msgspec.Meta(ge=0, le=3600)] | None = None


class ToolResult(_ClientFrame, tag="tool_result"):
    """Answer a tool call of the agent's last answer with `output` (any JSON), or `error` when
    the tool failed; as `POST /api/conversations/{id}/tool-results`. Acked with the result
    message and the agent's next answer (once every call of the answer has its result)."""

    conversation_id: UUID
    tool_call_id: ToolCallId
    output: Any = msgspec.UNSET
    error: Text | None = None


class Cancel(_ClientFrame, tag="cancel"):
    """Stop an answer (idempotent)."""

    generation_id: UUID


class Ping(_ClientFrame, tag="ping"):
    """Application-level ping; answered by `pong` (protocol pings are handled by the server too)."""


class SubscribeConversations(_ClientFrame, tag="subscribe_conversations"):
    """Follow the conversation list: every conversation the socket's key may list (a member's
    own, every one of the company for an admin) as it is created, changed, deleted or gets a
    new message. Idempotent."""


class UnsubscribeConversations(_ClientFrame, tag="unsubscribe_conversations"):
    """Stop following the conversation list (acked also when not following it)."""


class Refresh(_ClientFrame, tag="refresh"):
    """Go on with a new access token (`POST /api/tokens`) on a socket opened with one, before
    the old one expires: same key, session, company and role. Acked; the socket's expiry moves
    to the new token's."""

    token: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]


ClientFrame = (
    Subscribe
    | Unsubscribe
    | Send
    | ToolResult
    | Cancel
    | Ping
    | SubscribeConversations
    | UnsubscribeConversations
    | Refresh
)


# The codes of the server `error` frame (docs/protocol.md, Error codes): a closed set in the
# JSON Schema, `str` in Python (a service's ApiError code passes through as it is).
FRAME_ERROR_CODES = (
    "frame_too_large",
    "rate_limited",
    "malformed_frame",
    "unknown_type",
    "invalid_frame",
    "too_many_subscriptions",
    "not_found",
    "invalid_cursor",
    "invalid_request",
    "too_large",
    "tool_call_not_found",
    "tool_call_answered",
    "generation_in_progress",
    "too_many_answers",
    "admin_required",
    "too_many_sockets",
    "client_message_id_conflict",
    "internal_error",
    "too_slow",
    "broker_unavailable",
    "credentials_revoked",
    "server_restarting",
    "database_unavailable",
    "invalid_token",
    "token_expired",
)
FrameErrorCode = Annotated[str, msgspec.Meta(extra_json_schema={"enum": list(FRAME_ERROR_CODES)})]


class _ServerFrame(msgspec.Struct, tag_field="type", rename="camel", kw_only=True, omit_defaults=True):
    pass


class Ack(_ServerFrame, tag="ack"):
    """A client frame was done. Carries what it produced: the conversation (subscribe,
    unsubscribe), the message, its answer and whether it was new (send), the answer (cancel)."""

    ref: str | None = None
    conversation_id: UUID | None = None
    # subscribe: the conversation's latest `conversationSeq` (its cursor, for a later `since`).
    conversation_seq: int | None = None
    message: MessageOut | None = None
    generation: GenerationOut | None = None
    created: bool | None = None


class ErrorFrame(_ServerFrame, tag="error"):
    """A client frame could not be done (or the connection is about to close). Unlike a
    generation's `error` event, it has no `generationId`."""

    code: FrameErrorCode
    message: str
    ref: str | None = None
    details: object = None


class Pong(_ServerFrame, tag="pong"):
    ref: str | None = None


class HelloLimits(msgspec.Struct, rename="camel"):
    """This socket's limits (docs/protocol.md, Limits): frame size in bytes, conversations
    followed, frames per minute (per API key), messages posted per minute (per API key)."""

    max_frame_bytes: int
    max_subscriptions: int
    frames_per_minute: int
    messages_per_minute: int


class Hello(_ServerFrame, tag="hello"):
    """The first frame of every accepted socket: the protocol version, the server's protocol
    ping interval and timeout (seconds), the limits, and the server's `disconnectGrace`
    (seconds an answer keeps going after its last reader left), for the client's timers."""

    protocol_version: str
    ping_interval: float
    ping_timeout: float
    limits: HelloLimits
    disconnect_grace: float


class TokenExpiring(_ServerFrame, tag="token_expiring"):
    """The access token of this socket expires at `expiresAt` (in `expiresIn` seconds): send
    `refresh` with a new one before then, or the socket is closed (4401, `token_expired`)."""

    expires_at: Timestamp
    expires_in: float


# `conversationSeq` of the conversation events: their number in the conversation (1, 2, 3 …, in
# the order they happened), the conversation cursor a client resubscribes with (`subscribe.since`);
# not the `seq` of generation events, which numbers one answer's events.
# Stamped by the broker when the event is published; 0 (omitted) on list frames made from them.
ConversationSeq = Annotated[int, msgspec.Meta(ge=0)]


class MessageCreated(_ServerFrame, tag="message.created"):
    conversation_id: UUID
    message: MessageOut
    conversation_seq: ConversationSeq = 0


class MessageEdited(_ServerFrame, tag="message.edited"):
    conversation_id: UUID
    message: MessageOut
    conversation_seq: ConversationSeq = 0


class ConversationUpdated(_ServerFrame, tag="conversation.updated"):
    conversation_id: UUID
    conversation: ConversationOut
    conversation_seq: ConversationSeq = 0


class ConversationDeleted(_ServerFrame, tag="conversation.deleted"):
    """The conversation is gone; its subscription ends."""

    conversation_id: UUID
    conversation_seq: ConversationSeq = 0


class ConversationCreated(_ServerFrame, tag="conversation.created"):
    """A new conversation (to conversation list subscribers only)."""

    conversation_id: UUID
    conversation: ConversationOut
    conversation_seq: ConversationSeq = 0


class GenerationStarted(_ServerFrame, tag="generation.started"):
    """An answer began in the conversation (its events follow, from `start`): subscribers
    follow it; a client back from offline learns of it when the conversation is replayed."""

    conversation_id: UUID
    generation_id: UUID
    conversation_seq: ConversationSeq = 0


class ConversationReset(_ServerFrame, tag="conversation.reset"):
    """The events after the `since` of a `subscribe` are no longer kept (or `since` is from
    before a server restart): reload the conversation over HTTP, then go on from `conversationSeq`."""

    conversation_id: UUID
    conversation_seq: ConversationSeq


class ConversationActivity(_ServerFrame, tag="conversation.activity"):
    """A message was stored in the conversation at `lastMessageAt`, its new latest activity
    (to conversation list subscribers only; the conversation's subscribers get the message)."""

    conversation_id: UUID
    last_message_at: Timestamp


# What services publish on a conversation's channel.
ConversationEvent = (
    MessageCreated | MessageEdited | ConversationUpdated | ConversationDeleted | ConversationCreated | GenerationStarted
)
# What a conversation list subscriber receives (made from conversation events by `list_frame`).
ListFrame = ConversationCreated | ConversationUpdated | ConversationDeleted | ConversationActivity
# Everything the server sends.
ServerFrame = (
    Hello
    | Ack
    | ErrorFrame
    | Pong
    | TokenExpiring
    | MessageCreated
    | MessageEdited
    | ConversationUpdated
    | ConversationDeleted
    | ConversationCreated
    | ConversationActivity
    | GenerationStarted
    | ConversationReset
)
OutgoingFrame = ServerFrame | GenerationEvent

MSGPACK_SUBPROTOCOL = "chatstream.msgpack"
# The protocol's version (docs/asyncapi.json): the major part changes only with a change old clients cannot follow.
PROTOCOL_VERSION = "1.0.0"


def list_frame(event: ConversationEvent) -> ListFrame | None:
    """What a conversation list subscriber gets of a conversation event: creation, changes and
    deletion as they are, a new message as `conversation.activity`; nothing of edits and answers."""
    if isinstance(event, MessageCreated):
        return ConversationActivity(conversation_id=event.conversation_id, last_message_at=event.message.created_at)
    if isinstance(event, ConversationCreated | ConversationUpdated | ConversationDeleted):
        return (
            msgspec.structs.replace(event, conversation_seq=0) if event.conversation_seq else event
        )  # no cursor in a list
    return None


json_client_decoder = msgspec.json.Decoder(ClientFrame)
msgpack_client_decoder = msgspec.msgpack.Decoder(ClientFrame)
msgpack_encoder = msgspec.msgpack.Encoder()
