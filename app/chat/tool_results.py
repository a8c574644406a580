"""Tool results: a client answers a tool call of the agent's last answer; once every call
of that answer has its result, the agent continues (a new answer with the results in its history).

A result is a message with role `tool`, one `tool_result` part, and clientMessageId
`tool:<toolCallId>`: the database keeps one result per call, so a retry finds the first.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

import msgspec

from app.auth.principal import Principal
from app.chat.conversations import conversation_not_found, load_conversation, mark_last_message
from app.chat.generations import generation_for_message, pending_tool_calls
from app.chat.messages import TOOL_RESULT_ID_PREFIX, by_client_id, message_out
from app.chat.schemas import MessagePosted, ToolResultCreate
from app.db import is_foreign_key_violation, is_unique_violation
from app.errors import Conflict, NotFound, check_length, check_text, invalid_field
from app.limits import MAX_CONTENT_CHARS
from app.streaming.parts import Part, encode_parts
from app.streaming.protocol import MessageCreated
from app.tables import Message, MessageRole

if TYPE_CHECKING:
    from app.streaming.core import StreamingCore


async def post_tool_result(
    principal: Principal, conversation_id: UUID, data: ToolResultCreate, core: StreamingCore
) -> tuple[MessagePosted, bool]:
    """Store the result of a pending tool call and, when it was the last one the answer
    waited for, start the agent's next answer. Returns the result message, that answer
    (null while other calls wait) and whether the result was new (a retry returns the first)."""
    await core.quotas.messages.check(principal.key_id)
    conversation = await load_conversation(principal, conversation_id)
    check_text("toolCallId", data.tool_call_id)
    if (data.output is msgspec.UNSET) == (data.error is None):
        raise invalid_field("output", "give the tool's `output`, or `error` when it failed (not both)")
    content = data.error if data.error is not None else msgspec.json.encode(data.output).decode()
    check_length("output" if data.error is None else "error", content, MAX_CONTENT_CHARS)
    output: Any = None if data.output is msgspec.UNSET else data.output
    client_id = f"{TOOL_RESULT_ID_PREFIX}{data.tool_call_id}"
    answered = await by_client_id(conversation_id, client_id)
    if answered is not None:
        return await _replay(answered, output, data.error, conversation, principal, core), False
    calls = await pending_tool_calls(conversation_id)
    call = calls.calls.get(data.tool_call_id) if calls is not None else None
    if call is None:
        raise NotFound(
            "no tool call with this id waits for a result in the conversation's last answer",
            code="tool_call_not_found",
            details={"toolCallId": data.tool_call_id},
        )
    part = Part(kind="tool_result", name=call.name, tool_call_id=data.tool_call_id, value=output, error=data.error)
    now = datetime.now(UTC)
    message = Message(
        conversation=conversation_id,
        role=MessageRole.tool.value,
        author_id=principal.user_id,
        content=content,
        client_message_id=client_id,
        parts=encode_parts([part]),
        created_at=now,
    )
    try:
        await message.save()
    except Exception as exc:
        if is_foreign_key_violation(exc):
            raise conversation_not_found(conversation_id) from None
        if not is_unique_violation(exc):
            raise
        # A concurrent post of the same result won: the first one stands.
        first = await by_client_id(conversation_id, client_id)
        if first is None:
            raise
        return await _replay(first, output, data.error, conversation, principal, core), False
    await mark_last_message(conversation_id, now)
    row = await Message.select().where(Message.id == message.id).first()
    if row is None:  # deleted with its conversation right after the insert
        raise conversation_not_found(conversation_id)
    stored = message_out(row)
    await core.publish(MessageCreated(conversation_id=conversation_id, message=stored))
    generation = await core.answer_unanswered(conversation, principal)
    return MessagePosted(message=stored, generation=generation), True


async def _replay(
    row: dict[str, Any],
    output: Any,
    error: str | None,
    conversation: dict[str, Any],
    principal: Principal,
    core: StreamingCore,
) -> MessagePosted:
    """The first result for a call, if this one is the same; a different one is a conflict."""
    stored = message_out(row)
    first = stored.parts[0] if stored.parts else None
    if first is None or first.kind != "tool_result" or (first.value, first.error) != (output, error):
        raise Conflict(
            "this tool call already has a different result",
            code="tool_call_answered",
            details={
                "toolCallId": row["client_message_id"].removeprefix(TOOL_RESULT_ID_PREFIX),
                "messageId": str(row["id"]),
            },
        )
    # An answer a limit refused to start the first time starts now (if the turn still waits).
    generation = await generation_for_message(row["id"]) or await core.answer_unanswered(conversation, principal)
    return MessagePosted(message=stored, generation=generation)
