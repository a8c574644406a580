"""Generation rows: create (one running per conversation, enforced by the database),
finish (the answer message and the row in one transaction), read.

The streaming core calls these; controllers read through :func:`get_generation`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from app.agents.schemas import AgentOut
from app.agents.service import get_agent
from app.auth.principal import Principal
from app.chat.conversations import MARK_LAST_MESSAGE, conversation_not_found, load_conversation, mark_last_message
from app.chat.schemas import GenerationOut
from app.db import (
    columns_of,
    insert_row,
    insert_select_sql,
    is_foreign_key_violation,
    is_unique_violation,
    on_postgres,
    row_values,
    write_transaction,
)
from app.errors import Conflict, NotFound
from app.streaming.parts import Part, decode_parts, encode_parts, text_of
from app.tables import Generation, GenerationStatus, Message, MessageRole, MessageStatus


class GenerationBusy(Conflict):
    """The conversation already has a running generation."""

    code = "generation_in_progress"

    def __init__(self, running_id: UUID | None) -> None:
        super().__init__(
            "an answer is already being generated in this conversation",
            details={"generationId": str(running_id) if running_id else None},
        )
        self.running_id = running_id


def generation_out(row: dict[str, Any]) -> GenerationOut:
    """Build the response struct from a `generation` row."""
    return GenerationOut(
        id=row["id"],
        conversation_id=row["conversation"],
        reply_to_id=row["reply_to"],
        agent_id=row["agent"],
        status=GenerationStatus(row["status"]),
        result_message_id=row["result_message"],
        token_count=row["token_count"],
        chunk_count=row["chunk_count"],
        finish_reason=row["finish_reason"],
        ttft_ms=row["ttft_ms"],
        error=row["error"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
    )


async def running_generation(conversation_id: UUID) -> dict[str, Any] | None:
    """The running generation of a conversation, if any."""
    # Written out (every subscription and stream looks it up): see app/db.py.
    rows = await Generation.raw(
        f'SELECT {columns_of(Generation)} FROM "generation" WHERE "conversation" = {{}} AND "status" = {{}} LIMIT 1',
        conversation_id,
        GenerationStatus.running.value,
    )
    return rows[0] if rows else None


def running_row(
    conversation_id: UUID,
    reply_to_id: UUID | None,
    agent_id: UUID | None,
    generation_id: UUID,
    producer: str | None = None,
) -> Generation:
    """A `running` generation (not stored yet) with the id the core reserved for it,
    produced by process `producer`."""
    return Generation(
        id=generation_id,
        conversation=conversation_id,
        reply_to=reply_to_id,
        agent=agent_id,
        status=GenerationStatus.running.value,
        started_at=datetime.now(UTC),
        producer=producer,
    )


def is_busy_violation(exc: BaseException) -> bool:
    """True when a write failed because the conversation already has a running generation
    (PostgreSQL names the partial unique index that decides it)."""
    return getattr(exc, "constraint_name", None) == "generation_one_running_per_conversation"


async def create_running(
    conversation_id: UUID,
    reply_to_id: UUID | None,
    agent_id: UUID | None,
    generation_id: UUID,
    producer: str | None = None,
) -> GenerationOut:
    """Insert a :func:`running_row`. Raises :class:`GenerationBusy` if one is running
    already (the partial unique index decides, so concurrent requests cannot both win)."""
    generation = running_row(conversation_id, reply_to_id, agent_id, generation_id, producer)
    await insert_running(generation)
    # As inserted (callers insert inside a transaction: no re-read needed to see the row).
    return generation_out(generation.to_dict())


async def insert_running(generation: Generation) -> None:
    """Insert a :func:`running_row` as it is. Raises :class:`GenerationBusy` if the
    conversation has a running generation, NotFound if the conversation is gone."""
    try:
        await insert_row(generation)
    except Exception as exc:
        if is_foreign_key_violation(exc):
            raise conversation_not_found(generation.conversation) from None
        if not is_unique_violation(exc):
            raise
        raise GenerationBusy(None) from exc


async def generation_for_message(message_id: UUID) -> GenerationOut | None:
    """The latest generation that answered (or is answering) a message."""
    row = (
        await Generation.select()
        .where(Generation.reply_to == message_id)
        .order_by(Generation.started_at, ascending=False)
        .first()
    )
    return generation_out(row) if row else None


async def agent_of(conversation: dict[str, Any]) -> AgentOut | None:
    """The agent that answers in a conversation (a `conversation` row), if it has one."""
    if conversation["agent"] is None:
        return None
    try:
        return await get_agent(conversation["company"], conversation["agent"])
    except NotFound:
        return None


async def load_generation(generation_id: UUID) -> GenerationOut | None:
    """A generation by id, unscoped (for the core)."""
    row = await Generation.select().where(Generation.id == generation_id).first()
    return generation_out(row) if row else None


async def get_generation(principal: Principal, generation_id: UUID) -> GenerationOut:
    """A generation the caller may see (through its conversation), else NotFound."""
    row = await Generation.select().where(Generation.id == generation_id).first()
    if row is not None:
        try:
            await load_conversation(principal, row["conversation"])
        except NotFound:
            row = None
    if row is None:
        raise NotFound("generation not found", details={"generationId": str(generation_id)})
    return generation_out(row)


class _AlreadyEnded(Exception):
    """Raised inside the finishing transaction to roll it back: another ending came first."""


# The end of a running generation, and only while it runs: no read of the row first.
_END_RUNNING = (
    'UPDATE "generation" SET "status" = {}, "result_message" = {}, "token_count" = {}, '
    '"chunk_count" = {}, "finish_reason" = {}, "ttft_ms" = {}, "error" = {}, "finished_at" = {} '
    'WHERE "id" = {} AND "status" = {} RETURNING "id"'
)
# PostgreSQL: the end, the answer's message and the conversation's last_message_at as one
# statement (one round trip instead of five); the message is stored only if the end was.
_END_WITH_MESSAGE = (
    f"WITH ended AS ({_END_RUNNING}), "
    f"stored AS ({insert_select_sql(Message, 'ended')}), "
    f"touched AS ({MARK_LAST_MESSAGE} AND EXISTS (SELECT 1 FROM ended)) "
    'SELECT "id" FROM ended'
)


async def finish_generation(
    generation: GenerationOut,
    status: GenerationStatus,
    *,
    parts: list[Part] | None,
    token_count: int,
    chunk_count: int,
    ttft_ms: int | None,
    finish_reason: str | None = None,
    error: str | None = None,
) -> dict[str, Any] | None:
    """End a running generation. When `parts` are given, store them as the agent's message
    (`complete` for done, `partial` otherwise; `content` is their text) atomically with the
    end. Returns that message's row, as stored.
    A generation that already ended (or is gone with its conversation) is left as it is:
    the first ending wins, and nothing is stored."""
    now = datetime.now(UTC)
    message = None
    if parts is not None:
        message = Message(
            conversation=generation.conversation_id,
            role=MessageRole.agent.value,
            author_id=generation.agent_id,
            content=text_of(parts),
            parts=encode_parts(parts),
            generation=generation.id,
            status=(MessageStatus.complete if status is GenerationStatus.done else MessageStatus.partial).value,
            created_at=now,
        )
    end = [
        status.value,
        None if message is None else message.id,
        token_count,
        chunk_count,
        finish_reason,
        ttft_ms,
        error,
        now,
        generation.id,
        GenerationStatus.running.value,
    ]
    try:
        if message is None:
            ended = await Generation.raw(_END_RUNNING, *end)
        elif on_postgres(Generation):
            ended = await Generation.raw(_END_WITH_MESSAGE, *end, *row_values(message), now, generation.conversation_id)
        else:
            async with write_transaction(Generation._meta.db):
                await insert_row(message)
                await mark_last_message(generation.conversation_id, now)
                ended = await Generation.raw(_END_RUNNING, *end)  # last: the message row exists
                if not ended:
                    raise _AlreadyEnded
    except _AlreadyEnded:
        return None
    except Exception as exc:
        if is_foreign_key_violation(exc):  # the conversation was deleted, its generations with it
            return None
        raise
    if not ended:
        return None
    return None if message is None else message.to_dict()


async def settle_interrupted_length(generation_id: UUID, chunk_count: int) -> GenerationOut | None:
    """Record how many token events an interrupted answer had, as the first reader back
    reports it (the process that knew died). Only the first report counts."""
    await Generation.update({Generation.chunk_count: chunk_count, Generation.token_count: chunk_count}).where(
        Generation.id == generation_id,
        Generation.status == GenerationStatus.interrupted.value,
        Generation.chunk_count == 0,
    )
    return await load_generation(generation_id)


async def stored_answer(message_id: UUID) -> list[Part] | None:
    """The parts an answer was stored with (its original ones, whatever later edits); an
    answer stored before parts existed is one text part."""
    row = await Message.select(Message.content, Message.parts).where(Message.id == message_id).first()
    if row is None:
        return None
    return stored_parts(row)


def stored_parts(row: dict[str, Any]) -> list[Part]:
    """A message row's parts as stored: its `parts` column, else (user messages, answers
    stored before parts existed) its `content` as one text part."""
    if row["parts"] is not None:
        return decode_parts(row["parts"])
    return [Part(kind="text", text=row["content"])] if row["content"] else []


async def interrupt_orphans() -> int:
    """Mark `running` generations that no process produces any more as `interrupted`.
    Called at startup by a process that holds every producer (the in-process broker)."""
    rows = await Generation.select(Generation.id).where(Generation.status == GenerationStatus.running.value)
    if rows:
        await Generation.update(
            {
                Generation.status: GenerationStatus.interrupted.value,
                Generation.error: "the server stopped while answering",
                Generation.finished_at: datetime.now(UTC),
            }
        ).where(Generation.status == GenerationStatus.running.value)
    return len(rows)


async def running_producers() -> list[tuple[UUID, str | None]]:
    """(generation, producer) of every running generation."""
    rows = await Generation.select(Generation.id, Generation.producer).where(
        Generation.status == GenerationStatus.running.value
    )
    return [(r["id"], r["producer"]) for r in rows]


async def interrupt(generation_id: UUID, chunk_count: int, error: str) -> bool:
    """Mark a running generation whose producer died `interrupted`, with the number of
    token events its log holds (0: unknown). False when it was no longer running."""
    async with write_transaction(Generation._meta.db):
        row = await Generation.select(Generation.status).where(Generation.id == generation_id).first()
        if row is None or row["status"] != GenerationStatus.running.value:
            return False
        await Generation.update(
            {
                Generation.status: GenerationStatus.interrupted.value,
                Generation.chunk_count: chunk_count,
                Generation.token_count: chunk_count,
                Generation.error: error,
                Generation.finished_at: datetime.now(UTC),
            }
        ).where(Generation.id == generation_id)
    return True


async def waiting_turn(conversation_id: UUID) -> UUID | None:
    """The last message if it waits for an answer: a user message, or the tool result that
    completes the results for every tool call of the last answer; and no generation has
    answered it yet."""
    last: dict[str, Any] | None = (
        await Message.select(Message.id, Message.role)
        .where(Message.conversation == conversation_id)
        .order_by(Message.created_at, Message.id, ascending=False)
        .first()
    )
    if last is None or last["role"] == MessageRole.agent.value:
        return None
    if last["role"] == MessageRole.tool.value:
        calls = await pending_tool_calls(conversation_id)
        if calls is None or calls.unanswered:
            return None
    answered = await Generation.exists().where(Generation.reply_to == last["id"])
    return None if answered else last["id"]


class ToolCalls:
    """The tool calls of a conversation's last answer and the results given so far."""

    def __init__(self, calls: dict[str, Part], results: dict[str, dict[str, Any]]) -> None:
        self.calls = calls  # complete tool_call parts by toolCallId
        self.results = results  # tool message rows by the toolCallId they answer

    @property
    def unanswered(self) -> list[str]:
        return [call_id for call_id in self.calls if call_id not in self.results]


async def pending_tool_calls(conversation_id: UUID) -> ToolCalls | None:
    """The tool calls the last answer waits for: it ended with finish reason `tool_calls`,
    complete, and only tool results came after it (a user message after the answer leaves
    its calls behind, and so does an answer asked again, started after it). Calls the agent
    answered itself (a tool result in the same answer) wait for nothing. None when there is
    no such answer."""
    latest = (
        await Message.select()
        .where(Message.conversation == conversation_id, Message.role != MessageRole.tool.value)
        .order_by(Message.created_at, Message.id, ascending=False)
        .first()
    )
    if latest is None or latest["role"] != MessageRole.agent.value or latest["generation"] is None:
        return None
    waits = await Generation.exists().where(
        Generation.id == latest["generation"],
        Generation.status == GenerationStatus.done.value,
        Generation.finish_reason == "tool_calls",
    )
    if not waits:
        return None
    # Asked again (app/chat/messages.py answer_again): a newer answer, running or ended, replaces it.
    # Any answer started since then counts: the continuation after the calls only starts once all have results.
    if await Generation.exists().where(
        Generation.conversation == conversation_id, Generation.started_at > latest["created_at"]
    ):
        return None
    parts = stored_parts(latest)
    answered_inside = {p.tool_call_id for p in parts if p.kind == "tool_result"}
    calls = {
        part.tool_call_id: part
        for part in parts
        if part.kind == "tool_call"
        and part.state == "complete"
        and part.tool_call_id
        and part.tool_call_id not in answered_inside
    }
    answers = await Message.select().where(
        Message.conversation == conversation_id,
        Message.role == MessageRole.tool.value,
        Message.created_at >= latest["created_at"],
    )
    results: dict[str, dict[str, Any]] = {}
    for row in answers:
        for part in stored_parts(row):
            if part.tool_call_id in calls:
                results[part.tool_call_id] = row
    return ToolCalls(calls, results)
