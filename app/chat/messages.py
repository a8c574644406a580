"""Messages: post (idempotent by clientMessageId), answer again, list, edit, and the
history an agent is given. Access always goes through the conversation's scoping."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

from app.agents.schemas import AgentOut
from app.auth.principal import Principal
from app.chat.conversations import (
    MARK_LAST_MESSAGE,
    conversation_not_found,
    load_agent_of,
    load_conversation,
)
from app.chat.generations import (
    GenerationBusy,
    generation_for_message,
    generation_out,
    insert_running,
    is_busy_violation,
    running_generation,
    running_row,
    stored_parts,
)
from app.chat.schemas import (
    AnswerAgain,
    GenerationOut,
    HistoryItem,
    MessageCreate,
    MessageEdit,
    MessageOut,
    MessagePage,
    MessagePosted,
)
from app.chat.titles import title_if_untitled
from app.db import (
    columns_of,
    insert_row,
    insert_sql,
    is_foreign_key_violation,
    is_unique_violation,
    on_postgres,
    row_values,
    write_transaction,
)
from app.errors import (
    Conflict,
    Forbidden,
    NotFound,
    check_length,
    check_text,
    invalid_field,
)
from app.limits import MAX_CONTENT_CHARS
from app.rate_limit import TooManyRequests
from app.streaming.parts import Part
from app.streaming.policy import StreamPolicy
from app.streaming.protocol import ConversationEvent, ConversationUpdated, MessageCreated, MessageEdited
from app.tables import Generation, GenerationStatus, Message, MessageRole, MessageStatus

if TYPE_CHECKING:  # the core imports this module (history); only the type is needed here
    from app.streaming.core import StreamingCore

logger = logging.getLogger("chatstream.chat")

# clientMessageId of a tool result: `tool:<toolCallId>` (the database keeps one per call).
TOOL_RESULT_ID_PREFIX = "tool:"


def message_out(row: dict[str, Any]) -> MessageOut:
    """Build the response struct from a `message` row."""
    return MessageOut(
        id=row["id"],
        conversation_id=row["conversation"],
        role=MessageRole(row["role"]),
        author_id=row["author_id"],
        content=row["content"],
        edited_content=row["edited_content"],
        edited_at=row["edited_at"],
        effective_content=effective_content(row),
        client_message_id=row["client_message_id"],
        generation_id=row["generation"],
        status=MessageStatus(row["status"]),
        created_at=row["created_at"],
        parts=stored_parts(row),
    )


def effective_content(row: dict[str, Any]) -> str:
    """What the message says now: the edit if there is one, else the original."""
    edited: str | None = row["edited_content"]
    return edited if edited is not None else row["content"]


def _check_content(content: str) -> None:
    check_text("content", content)
    check_length("content", content, MAX_CONTENT_CHARS)


async def by_client_id(conversation_id: UUID, client_message_id: str) -> dict[str, Any] | None:
    """The conversation's message with this clientMessageId (a user message, or a tool result's `tool:<id>`)."""
    # Written out (every message with a clientMessageId looks it up): see app/db.py.
    rows = await Message.raw(
        f'SELECT {columns_of(Message)} FROM "message" '
        'WHERE "conversation" = {} AND "client_message_id" = {} LIMIT 1',
        conversation_id,
        client_message_id,
    )
    return rows[0] if rows else None


async def _replay(row: dict[str, Any], principal: Principal, data: MessageCreate) -> MessagePosted:
    # A retry must be the same request; anything else reusing the id is a client bug worth surfacing.
    if row["content"] != data.content or row["author_id"] != principal.user_id:
        raise Conflict(
            "clientMessageId was already used for a different message in this conversation",
            code="client_message_id_conflict",
            details={"clientMessageId": data.client_message_id, "messageId": str(row["id"])},
        )
    return MessagePosted(message=message_out(row), generation=await generation_for_message(row["id"]))


async def post_message(
    principal: Principal, conversation_id: UUID, data: MessageCreate, core: StreamingCore
) -> tuple[MessagePosted, bool]:
    """Store a user message and, when the conversation has an agent and `reply` is true,
    start its answer. Returns the result and whether it was new: a repeated
    `clientMessageId` gives back the first message (and its answer) and stores nothing.

    The message and the `running` generation row are inserted atomically, so a
    busy conversation (policy `reject`) refuses the message with 409 and stores nothing;
    so does a key over its message rate or its running answers (429).
    A conversation without a title is named after the message (app/chat/titles.py)."""
    await core.quotas.messages.check(principal.key_id)
    _check_grace(principal, data.disconnect_grace, core.policy.disconnect_grace)
    agent = await load_agent_of(principal, conversation_id)  # 404 unless the caller may see the conversation
    _check_content(data.content)
    check_text("clientMessageId", data.client_message_id)
    if data.client_message_id is not None and data.client_message_id.startswith(TOOL_RESULT_ID_PREFIX):
        raise invalid_field("clientMessageId", f"{TOOL_RESULT_ID_PREFIX!r} starts the ids of tool results")
    if data.client_message_id is not None:
        existing = await by_client_id(conversation_id, data.client_message_id)
        if existing is not None:
            return await _replay(existing, principal, data), False
    policy = core.policy_for(if_busy=data.if_busy, partial=data.partial, disconnect_grace=data.disconnect_grace)
    if not data.reply:  # stored without an answer
        agent = None
    if agent is not None:
        await _interrupt_if_asked(core, conversation_id, policy)
    now = datetime.now(UTC)
    message = Message(
        conversation=conversation_id,
        role=MessageRole.user.value,
        author_id=principal.user_id,
        content=data.content,
        client_message_id=data.client_message_id,
        created_at=now,
    )
    generation = None
    try:
        if agent is None:
            untitled = await _store_post(message, None, None)
        else:
            generation, untitled = await _start_answer(
                core, principal, conversation_id, message.id, agent, partial(_store_post, message)
            )
    except GenerationBusy:
        existing = None
        if data.client_message_id is not None:  # a concurrent retry's twin started the answer
            existing = await by_client_id(conversation_id, data.client_message_id)
        if existing is not None:
            return await _replay(existing, principal, data), False
        raise await _busy(conversation_id) from None
    except Exception as exc:
        if is_foreign_key_violation(exc):  # the conversation was deleted meanwhile
            raise conversation_not_found(conversation_id) from None
        # Two concurrent retries: the loser finds the winner's row.
        if data.client_message_id is None or not is_unique_violation(exc):
            raise
        existing = await by_client_id(conversation_id, data.client_message_id)
        if existing is None:
            raise
        return await _replay(existing, principal, data), False
    # As inserted (no re-read: a conversation deleted since then ends the answer on its own).
    posted = MessagePosted(message=message_out(message.to_dict()), generation=generation)
    await _launch_answer(
        core, generation, agent, policy, MessageCreated(conversation_id=conversation_id, message=posted.message)
    )
    if untitled:  # after the launch: naming the conversation does not delay the answer
        await _name_conversation(core, conversation_id, data.content)
    return posted, True


async def answer_again(
    principal: Principal, conversation_id: UUID, message_id: UUID, data: AnswerAgain, core: StreamingCore
) -> MessagePosted:
    """Ask the agent again for the conversation's last user message: a new answer whose
    `replyToId` is that message, started as a post starts one (same busy policy, same
    quotas; it counts as a message towards the key's rate). The earlier answers stay
    stored; the history shows only the newest answer to a message (:func:`load_history`).
    Returns the user message (as it reads now) and the new answer."""
    await core.quotas.messages.check(principal.key_id)
    _check_grace(principal, data.disconnect_grace, core.policy.disconnect_grace)
    agent = await load_agent_of(principal, conversation_id)  # 404 unless the caller may see the conversation
    row = await _with_last_user_message(conversation_id, message_id)
    if row is None:
        raise NotFound("message not found", details={"messageId": str(message_id)})
    last = row["last_user_message"]
    last = None if last is None else UUID(str(last))  # SQLite gives a computed column's UUID as text
    if last != row["id"]:  # an earlier user message, or not a user message at all
        raise Conflict(
            "only the conversation's last user message can be answered again",
            code="not_last_user_message",
            details={"messageId": str(message_id), "lastUserMessageId": str(last) if last else None},
        )
    if agent is None:
        raise no_agent(conversation_id)
    policy = core.policy_for(if_busy=data.if_busy, partial=data.partial, disconnect_grace=data.disconnect_grace)
    await _interrupt_if_asked(core, conversation_id, policy)
    try:
        generation, _ = await _start_answer(core, principal, conversation_id, message_id, agent, _store_running)
    except GenerationBusy:
        raise await _busy(conversation_id) from None
    await _launch_answer(core, generation, agent, policy)
    return MessagePosted(message=message_out(row), generation=generation)


def no_agent(conversation_id: UUID) -> Conflict:
    """The 409 for asking an answer of a conversation that has no agent."""
    return Conflict(
        "this conversation has no agent to answer",
        code="no_agent",
        details={"conversationId": str(conversation_id)},
    )


# The message asked about (in its conversation), and the id of the conversation's latest user
# message (the index on (conversation, created_at) finds it). Arguments: `user`, message, conversation.
_WITH_LAST_USER_MESSAGE = (
    f"SELECT {columns_of(Message)}, "
    '(SELECT l."id" FROM "message" l WHERE l."conversation" = m."conversation" AND l."role" = {} '
    'ORDER BY l."created_at" DESC, l."id" DESC LIMIT 1) AS "last_user_message" '
    'FROM "message" m WHERE m."id" = {} AND m."conversation" = {}'
)


async def _with_last_user_message(conversation_id: UUID, message_id: UUID) -> dict[str, Any] | None:
    """The conversation's message `message_id`, with `last_user_message`: the id of the
    conversation's latest user message. None when the conversation has no such message."""
    rows = await Message.raw(_WITH_LAST_USER_MESSAGE, MessageRole.user.value, message_id, conversation_id)
    return rows[0] if rows else None


async def _name_conversation(core: StreamingCore, conversation_id: UUID, content: str) -> None:
    """Title an untitled conversation after its first message and tell its subscribers. The
    message is stored and its answer started whatever happens here: a failure is logged, and
    the conversation, still untitled, is named after the next message."""
    try:
        named = await title_if_untitled(conversation_id, content)
        if named is not None:
            await core.publish(ConversationUpdated(conversation_id=conversation_id, conversation=named))
    except Exception:  # the post itself succeeded: the title waits for the next message
        logger.warning("conversation %s: could not set its title", conversation_id, exc_info=True)


async def _interrupt_if_asked(core: StreamingCore, conversation_id: UUID, policy: StreamPolicy) -> None:
    """Policy `interrupt`: cancel the conversation's running answer (if any) and wait for its end."""
    if policy.if_busy == "interrupt":
        running = await running_generation(conversation_id)
        if running is not None:
            await core.cancel(running["id"], "interrupted")


async def _busy(conversation_id: UUID) -> GenerationBusy:
    """The 409 for a conversation found busy, naming its running answer (None if it just ended)."""
    running = await running_generation(conversation_id)
    return GenerationBusy(running["id"] if running else None)


# Counts a starting answer against the key's running answers (raising 429): given to a store
# function when that is still to be done, after its insert, in the same transaction.
Admit = Callable[[], None]
Stored = TypeVar("Stored")


async def _start_answer(
    core: StreamingCore,
    principal: Principal,
    conversation_id: UUID,
    reply_to_id: UUID,
    agent: AgentOut,
    store: Callable[[Generation, Admit | None], Awaitable[Stored]],
) -> tuple[GenerationOut, Stored]:
    """Reserve an answer to `reply_to_id` and have `store` write its `running` row (and what
    goes with it), counted against the caller's running answers. Returns the answer and what
    `store` returned. Raises :class:`GenerationBusy` when the conversation has a running answer
    (409), `TooManyRequests` past the caller's running answers (429); the reservation is
    given back then. Start it with :func:`_launch_answer`."""
    async with core.one_start_at_a_time(conversation_id):
        reserved = await core.reserve(conversation_id)
        started = None
        try:
            answer = running_row(conversation_id, reply_to_id, agent.id, reserved, core.broker.node)
            # Counted up front only where the store is one statement (PostgreSQL); on SQLite after
            # the insert, inside its transaction.
            early = on_postgres(Message) and _counted(core, reserved, principal)
            admit = None if early else partial(core.count_answer, reserved, principal)
            stored = await store(answer, admit)
            started = generation_out(answer.to_dict())  # as inserted: committed
        finally:
            if started is None:
                await core.release(reserved)
    return started, stored


async def _launch_answer(
    core: StreamingCore,
    generation: GenerationOut | None,
    agent: AgentOut | None,
    policy: StreamPolicy,
    *announce: ConversationEvent,
) -> None:
    """Tell subscribers what was stored (`announce`), then start producing the answer, if
    one was started; if that fails, the answer gives back its place in the answer quota."""
    launched = False
    try:
        for event in announce:
            await core.publish(event)
        if generation is not None and agent is not None:
            await core.launch(generation, agent.adapter, agent.config, policy)
            launched = True
    finally:
        if generation is not None and not launched:
            await core.release(generation.id)


def _counted(core: StreamingCore, generation_id: UUID, principal: Principal) -> bool:
    """Count the answer against the key's running answers now, if it has room. False when it
    has not: the caller then stores in a transaction that counts after the insert, so that
    a busy conversation is still told 409 rather than 429."""
    try:
        core.count_answer(generation_id, principal)
    except TooManyRequests:
        return False
    return True


async def _store_post(message: Message, answer: Generation | None, admit: Admit | None) -> bool:
    """Store a user message (and its answer's `running` row): one statement on PostgreSQL
    when the answer is counted already, else one transaction that counts it last. Returns
    whether the conversation has no title (read back from the write: no round trip more)."""
    if on_postgres(Message) and admit is None:
        return await _insert_at_once(message, answer)
    async with write_transaction(Message._meta.db):
        await insert_row(message)
        touched = await Message.raw(_MARK_LAST_MESSAGE_UNTITLED, message.created_at, message.conversation)
        if answer is not None:
            await insert_running(answer)
        if admit is not None:
            admit()
    return _untitled(touched)


async def _store_running(answer: Generation, admit: Admit | None) -> None:
    """Store an answer's `running` row alone (an answer asked again), counted last if not yet."""
    if admit is None:
        await insert_running(answer)
        return
    async with write_transaction(Generation._meta.db):
        await insert_running(answer)
        admit()


# The conversation's last_message_at moves to the message's time, and the statement gives its
# title: a conversation without one is then named after the message. (Not `"title" IS NULL`:
# SQLite 3.40 answered 0 for a null title in RETURNING.)
_MARK_LAST_MESSAGE_UNTITLED = f'{MARK_LAST_MESSAGE} RETURNING "title"'
# PostgreSQL: the message, (when the agent answers) the running generation and the
# conversation's last_message_at as one statement: one round trip instead of five, atomic
# as the transaction it replaces.
_MESSAGE_AT_ONCE = f"WITH stored AS ({insert_sql(Message)}) {_MARK_LAST_MESSAGE_UNTITLED}"
_MESSAGE_AND_ANSWER_AT_ONCE = (
    f"WITH stored AS ({insert_sql(Message)}), started AS ({insert_sql(Generation)}) {_MARK_LAST_MESSAGE_UNTITLED}"
)


async def _insert_at_once(message: Message, running: Generation | None) -> bool:
    """Store a user message (and its answer's running row) in one statement, on PostgreSQL.
    Returns whether the conversation has no title. Raises :class:`GenerationBusy` when the
    conversation has a running answer already."""
    touch = [message.created_at, message.conversation]
    try:
        if running is None:
            touched = await Message.raw(_MESSAGE_AT_ONCE, *row_values(message), *touch)
        else:
            touched = await Message.raw(_MESSAGE_AND_ANSWER_AT_ONCE, *row_values(message), *row_values(running), *touch)
    except Exception as exc:
        if is_busy_violation(exc):
            raise GenerationBusy(None) from exc
        raise
    message._exists_in_db = True
    return _untitled(touched)


def _untitled(touched: list[dict[str, Any]]) -> bool:
    """Whether the conversation :data:`_MARK_LAST_MESSAGE_UNTITLED` touched has no title (False: gone)."""
    return bool(touched) and touched[0]["title"] is None


def _check_grace(principal: Principal, asked: float | None, server_default: float) -> None:
    """A member may shorten the disconnect grace, not lengthen it: an answer kept running
    for nobody holds a model connection (admins may ask up to the schema's maximum)."""
    if asked is not None and asked > server_default and not principal.is_admin:
        raise Forbidden(
            f"disconnectGrace above the server's {server_default:g} s needs an admin key",
            code="admin_required",
            details={"field": "disconnectGrace", "max": server_default},
        )


async def list_messages(principal: Principal, conversation_id: UUID, before: UUID | None, limit: int) -> MessagePage:
    """A chronological page: the `limit` messages just before `before` (or the latest ones).
    `nextCursor` is the id to pass as `before` for the page of older messages."""
    await load_conversation(principal, conversation_id)
    query = Message.select().where(Message.conversation == conversation_id)
    if before is not None:
        anchor = (
            await Message.select(Message.created_at)
            .where(Message.id == before, Message.conversation == conversation_id)
            .first()
        )
        if anchor is None:
            raise invalid_field(
                "before", "not the id of a message of this conversation", source="query", code="invalid_cursor"
            )
        at = anchor["created_at"]
        query = query.where((Message.created_at < at) | ((Message.created_at == at) & (Message.id < before)))
    rows = await query.order_by(Message.created_at, Message.id, ascending=False).limit(limit + 1).run()
    items = [message_out(r) for r in reversed(rows[:limit])]
    next_cursor = str(items[0].id) if len(rows) > limit else None
    return MessagePage(items=items, next_cursor=next_cursor)


async def edit_message(
    principal: Principal,
    conversation_id: UUID,
    message_id: UUID,
    data: MessageEdit,
    core: StreamingCore | None = None,
) -> MessageOut:
    """Set `editedContent`/`editedAt`, keeping the original `content`.
    A user message may be edited by its author or an admin; an agent message by an admin only."""
    await load_conversation(principal, conversation_id)
    row = await Message.select().where(Message.id == message_id, Message.conversation == conversation_id).first()
    if row is None:
        raise NotFound("message not found", details={"messageId": str(message_id)})
    if row["role"] == MessageRole.tool.value:
        why = "a tool result cannot be edited; it is what the tool returned"
        raise invalid_field("messageId", why, source="path", code="not_editable")
    if not principal.is_admin:
        if row["role"] == MessageRole.agent.value:
            raise Forbidden("only an admin can edit an agent's message", code="forbidden")
        if row["author_id"] != principal.user_id:
            raise Forbidden("only the author or an admin can edit this message", code="forbidden")
    _check_content(data.content)
    await Message.update(
        {
            Message.edited_content: data.content,
            Message.edited_at: datetime.now(UTC),
        }
    ).where(Message.id == message_id)
    updated = await Message.select().where(Message.id == message_id).first()
    if updated is None:  # deleted (with its conversation) since the check above
        raise NotFound("message not found", details={"messageId": str(message_id)})
    edited = message_out(updated)
    if core is not None:
        await core.publish(MessageEdited(conversation_id=conversation_id, message=edited))
    return edited


# Every message of a conversation in order, except the answers asked again for: when a user
# message has several answers (generations replying to it that are running or stored a
# message), only the newest stays, with what follows it in that turn (its tool rounds);
# the older ones and theirs are left out. A turn is a user message and what follows it up
# to the next one. Arguments: `user`, the conversation, `running`, the conversation, `user`, `user`.
_HISTORY = """
WITH m AS (
    SELECT "id", "role", "content", "edited_content", "created_at", "parts",
           COUNT(CASE WHEN "role" = {} THEN 1 END) OVER (ORDER BY "created_at", "id") AS "turn"
    FROM "message" WHERE "conversation" = {}
), answers AS (
    SELECT "reply_to", "result_message",
           ROW_NUMBER() OVER (PARTITION BY "reply_to" ORDER BY "started_at" DESC, "id" DESC) AS "nth",
           COUNT(*) OVER (PARTITION BY "reply_to") AS "count"
    FROM "generation"
    WHERE ("status" = {} OR "result_message" IS NOT NULL) AND "conversation" = {} AND "reply_to" IS NOT NULL
), newest AS (
    SELECT u."turn", a."created_at", a."id"
    FROM m u
    JOIN answers g ON g."reply_to" = u."id" AND g."nth" = 1 AND g."count" > 1
    LEFT JOIN m a ON a."id" = g."result_message"
    WHERE u."role" = {}
)
SELECT m."id", m."role", m."content", m."edited_content", m."created_at", m."parts"
FROM m LEFT JOIN newest n ON n."turn" = m."turn"
WHERE n."turn" IS NULL OR m."role" = {} OR (m."created_at", m."id") >= (n."created_at", n."id")
ORDER BY m."created_at", m."id"
"""


async def load_history(conversation_id: UUID) -> list[HistoryItem]:
    """The agent's context: the conversation's messages in order, with effective content,
    showing one answer per user message (the newest; see :data:`_HISTORY`). An answer still
    running hides the older ones already: the agent asked again does not see them."""
    user = MessageRole.user.value
    rows = await Message.raw(
        _HISTORY, user, conversation_id, GenerationStatus.running.value, conversation_id, user, user
    )
    return [
        HistoryItem(
            id=r["id"],
            role=MessageRole(r["role"]),
            effective_content=effective_content(r),
            created_at=r["created_at"],
            parts=history_parts(r),
        )
        for r in rows
    ]


def history_parts(row: dict[str, Any]) -> list[Part]:
    """A turn's parts as the agent is given them: as stored, except that an edit replaces
    the text (the other parts first, then the edited text as one text part)."""
    parts = stored_parts(row)
    if row["edited_content"] is None:
        return parts
    return [p for p in parts if p.kind != "text"] + [Part(kind="text", text=row["edited_content"])]


async def history(principal: Principal, conversation_id: UUID) -> list[HistoryItem]:
    """The history of a conversation the caller may see."""
    await load_conversation(principal, conversation_id)
    return await load_history(conversation_id)
