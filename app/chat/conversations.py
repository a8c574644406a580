"""Conversations: create, read, list, change and delete, scoped to the caller.

Scoping rule, applied by :func:`load_conversation` and the list query: a
conversation belongs to one company; an admin reaches all of its company's
conversations, a member only those they own. Anything else is "not found".

Conversation lists over the WebSocket (`subscribe_conversations`) follow the same rule:
every change here is published with the conversation's scope (company and owner), and
every check of the rule (:func:`_visible`) tells the process's scope memory
(app/streaming/scopes.py), so that the core can route the messages it publishes
without asking the database.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from functools import cache
from typing import TYPE_CHECKING, Any
from uuid import UUID

import msgspec

from app.agents.schemas import AgentOut
from app.agents.service import agent_out, get_agent
from app.auth.principal import Principal
from app.chat.schemas import ConversationCreate, ConversationOut, ConversationPage, ConversationUpdate
from app.db import columns_of
from app.errors import NotFound, check_length, check_text
from app.limits import MAX_TITLE_CHARS
from app.pagination import decode_cursor, encode_cursor
from app.streaming import scopes
from app.streaming.broker import BrokerUnavailable
from app.streaming.protocol import ConversationCreated, ConversationDeleted, ConversationUpdated
from app.tables import Agent, Conversation

logger = logging.getLogger(__name__)

if TYPE_CHECKING:  # the core imports the chat services; only the type is needed here
    from app.streaming.core import StreamingCore


def _scoped(principal: Principal, query: Any) -> Any:
    query = query.where(Conversation.company == principal.company_id)
    if not principal.is_admin:
        query = query.where(Conversation.owner_id == principal.user_id)
    return query


def conversation_out(row: dict[str, Any]) -> ConversationOut:
    """Build the response struct from a `conversation` row."""
    return ConversationOut(
        id=row["id"],
        owner_id=row["owner_id"],
        agent_id=row["agent"],
        title=row["title"],
        last_message_at=row["last_message_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def conversation_not_found(conversation_id: UUID) -> NotFound:
    """The 404 for a conversation the caller cannot see, or that is gone."""
    return NotFound("conversation not found", details={"conversationId": str(conversation_id)})


async def _visible(principal: Principal, conversation_id: UUID, select: str) -> dict[str, Any]:
    """The row of `select` (`SELECT … FROM "conversation" c …`, no WHERE) for the conversation
    if the caller may see it, else NotFound: the scoping of :func:`_scoped`, written out
    (every request about a conversation runs it)."""
    sql = select + ' WHERE c."id" = {} AND c."company" = {}'
    args: list[Any] = [conversation_id, principal.company_id]
    if not principal.is_admin:
        sql += ' AND c."owner_id" = {}'
        args.append(principal.user_id)
    rows = await Conversation.raw(sql, *args)
    if not rows:
        raise conversation_not_found(conversation_id)
    row: dict[str, Any] = rows[0]
    # Whose it is, for the conversation lists: a member's own; an admin's, when `select` has c."owner_id".
    owner = row.get("owner_id") if principal.is_admin else principal.user_id
    if owner is not None:
        scopes.known.remember(conversation_id, principal.company_id, owner)
    return row


async def load_conversation(principal: Principal, conversation_id: UUID) -> dict[str, Any]:
    """The conversation row if the caller may see it, else NotFound."""
    return await _visible(principal, conversation_id, f'SELECT {columns_of(Conversation)} FROM "conversation" c')


async def conversation_scope(conversation_id: UUID) -> scopes.Scope | None:
    """Whose the conversation is (its company and owner), unscoped; None when it does not exist."""
    rows = await Conversation.raw('SELECT "company","owner_id" FROM "conversation" WHERE "id" = {}', conversation_id)
    return scopes.Scope(rows[0]["company"], rows[0]["owner_id"]) if rows else None


@cache
def _agent_sql() -> str:
    # LEFT JOIN: a visible conversation without an agent is one row of nulls, an invisible one none.
    # The conversation's owner too (the agent has no such column): see _visible.
    agent = ",".join(f'a."{c._meta.db_column_name}"' for c in Agent._meta.columns)
    join = 'LEFT JOIN "agent" a ON a."id" = c."agent" AND a."company" = c."company"'
    return f'SELECT {agent},c."owner_id" FROM "conversation" c {join}'


async def load_agent_of(principal: Principal, conversation_id: UUID) -> AgentOut | None:
    """The agent of a conversation the caller may see (None when it has none), else NotFound
    as :func:`load_conversation`: one statement for what every posted message needs."""
    row = await _visible(principal, conversation_id, _agent_sql())
    return agent_out(row) if row["id"] is not None else None


# Its arguments: the time, the conversation id. Also a part of the one-statement start and
# end of an answer on PostgreSQL (app/chat/messages.py, app/chat/generations.py).
MARK_LAST_MESSAGE = 'UPDATE "conversation" SET "last_message_at" = {} WHERE "id" = {}'


async def mark_last_message(conversation_id: UUID, at: datetime) -> None:
    """Move the conversation up the list: a message was stored in it at `at`."""
    await Conversation.raw(MARK_LAST_MESSAGE, at, conversation_id)


def _check_title(title: str | None) -> None:
    check_text("title", title)
    check_length("title", title, MAX_TITLE_CHARS)


async def create_conversation(
    principal: Principal, data: ConversationCreate, core: StreamingCore | None = None
) -> ConversationOut:
    """Start a conversation owned by the caller, optionally with one of the company's agents.
    Conversation lists that may show it are told."""
    _check_title(data.title)
    if data.agent_id is not None:
        await get_agent(principal.company_id, data.agent_id)
    conversation = Conversation(
        company=principal.company_id,
        owner_id=principal.user_id,
        agent=data.agent_id,
        title=data.title,
    )
    await conversation.save()
    created = await get_conversation(principal, conversation.id)
    if core is not None:
        scope = scopes.Scope(principal.company_id, principal.user_id)
        try:
            await core.publish(ConversationCreated(conversation_id=created.id, conversation=created), scope)
        except BrokerUnavailable:
            # It is stored: a 503 now would make a retry store it twice. Lists see it on their next read.
            logger.warning("conversation %s: created, but the broker is unreachable: lists were not told", created.id)
    return created


async def get_conversation(principal: Principal, conversation_id: UUID) -> ConversationOut:
    """One conversation the caller may see."""
    return conversation_out(await load_conversation(principal, conversation_id))


async def list_conversations(principal: Principal, cursor: str | None, limit: int) -> ConversationPage:
    """Newest activity first. Keyset-paginated on (last_message_at, id), so pages stay
    stable while new conversations appear at the top."""
    query = _scoped(principal, Conversation.select())
    if cursor:
        at, after_id = decode_cursor(cursor)
        query = query.where(
            (Conversation.last_message_at < at) | ((Conversation.last_message_at == at) & (Conversation.id < after_id))
        )
    rows = await query.order_by(Conversation.last_message_at, Conversation.id, ascending=False).limit(limit + 1).run()
    items = [conversation_out(r) for r in rows[:limit]]
    next_cursor = encode_cursor(items[-1].last_message_at, items[-1].id) if len(rows) > limit else None
    return ConversationPage(items=items, next_cursor=next_cursor)


async def update_conversation(
    principal: Principal, conversation_id: UUID, data: ConversationUpdate, core: StreamingCore | None = None
) -> ConversationOut:
    """Change only the fields that were sent; `null` clears. Subscribers and conversation
    lists are told."""
    await load_conversation(principal, conversation_id)
    values: dict[Any, Any] = {}
    if data.title is not msgspec.UNSET:
        _check_title(data.title)
        values[Conversation.title] = data.title
    if data.agent_id is not msgspec.UNSET:
        if data.agent_id is not None:
            await get_agent(principal.company_id, data.agent_id)
        values[Conversation.agent] = data.agent_id
    if values:
        values[Conversation.updated_at] = datetime.now(UTC)
        await Conversation.update(values).where(Conversation.id == conversation_id)
    updated = await get_conversation(principal, conversation_id)
    if values and core is not None:
        scope = scopes.Scope(principal.company_id, updated.owner_id)
        await core.publish(ConversationUpdated(conversation_id=conversation_id, conversation=updated), scope)
    return updated


async def delete_conversation(principal: Principal, conversation_id: UUID, core: StreamingCore | None = None) -> None:
    """Delete a conversation; its messages and generations go with it (ON DELETE CASCADE).
    A running answer is cancelled first, and subscribers and conversation lists are told."""
    row = await load_conversation(principal, conversation_id)
    if core is not None:
        await core.cancel_conversation(conversation_id, "deleted")
    await Conversation.delete().where(Conversation.id == conversation_id)
    scopes.known.forget(conversation_id)
    if core is not None:
        scope = scopes.Scope(row["company"], row["owner_id"])
        await core.publish(ConversationDeleted(conversation_id=conversation_id), scope)
