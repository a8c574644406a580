"""The service layer called directly, on PostgreSQL and on SQLite (the `db` fixture).

Tenants are made inside each test, after `db` has pointed the tables at the
engine under test. Where an ordering rule is checked, the timestamps it sorts on
are set explicitly, so no assertion depends on the clock.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import msgspec
import pytest

from app.agents.schemas import AgentCreate, AgentUpdate
from app.agents.service import create_agent, delete_agent, get_agent, list_agents, update_agent
from app.auth.principal import Principal
from app.auth.schemas import ApiKeyCreate
from app.auth.service import authenticate, create_key, list_keys, revoke_key
from app.chat.conversations import (
    create_conversation,
    delete_conversation,
    get_conversation,
    list_conversations,
    load_agent_of,
    update_conversation,
)
from app.chat.messages import edit_message, history, list_messages, post_message
from app.chat.schemas import ConversationCreate, ConversationOut, ConversationUpdate, MessageCreate, MessageEdit
from app.demo import seed_demo_if_empty
from app.errors import Conflict, Forbidden, InvalidInput, NotFound, TooLarge
from app.streaming.core import StreamingCore
from app.tables import ApiKey, Company, Conversation, Generation, Message, Role
from tests.factories import make_tenant

pytestmark = pytest.mark.anyio


@pytest.fixture
def broker_kind() -> str:
    """Nothing here depends on the broker: the in-process one only (the core's own tests run both)."""
    return "in-process"


# A fixed moment in the past: activity set relative to it sorts before anything "now".
T0 = datetime(2020, 1, 1, 12, 0, 0, tzinfo=UTC)


# --- helpers ---------------------------------------------------------------------------------


async def new_conversation(
    principal: Principal, title: str | None = None, agent_id: UUID | None = None
) -> ConversationOut:
    return await create_conversation(principal, ConversationCreate(title=title, agent_id=agent_id))


_CORE: list[StreamingCore] = []


@pytest.fixture(autouse=True)
def _streaming_core(db: str, core: StreamingCore) -> Iterator[None]:
    """The core `post` hands to `post_message`; it depends on `db` so it shuts down first."""
    _CORE.append(core)
    yield
    _CORE.clear()


async def post(principal: Principal, conversation_id: UUID, content: str, client_id: str | None = None) -> Any:
    # Storage tests: no answer is started (tests of answers are in tests/integration/test_streaming*.py).
    data = MessageCreate(content=content, client_message_id=client_id, reply=False)
    return await post_message(principal, conversation_id, data, _CORE[0])


async def set_activity(conversation_id: UUID, at: datetime) -> None:
    """Pin a conversation's `last_message_at`, the key the list sorts on."""
    await Conversation.update({Conversation.last_message_at: at}).where(Conversation.id == conversation_id)


async def set_created(message_id: UUID, at: datetime) -> None:
    """Pin a message's `created_at`, the key message pages sort on."""
    await Message.update({Message.created_at: at}).where(Message.id == message_id)


async def all_conversation_pages(principal: Principal, limit: int) -> list[list[ConversationOut]]:
    pages = []
    cursor: str | None = None
    while True:
        page = await list_conversations(principal, cursor, limit)
        pages.append(page.items)
        if page.next_cursor is None:
            return pages
        assert len(pages) < 100, "pagination does not terminate"
        cursor = page.next_cursor


async def all_message_pages(principal: Principal, conversation_id: UUID, limit: int) -> list[list[Any]]:
    pages = []
    before: UUID | None = None
    while True:
        page = await list_messages(principal, conversation_id, before, limit)
        pages.append(page.items)
        if page.next_cursor is None:
            return pages
        assert len(pages) < 100, "pagination does not terminate"
        before = UUID(page.next_cursor)


async def message_count(conversation_id: UUID) -> int:
    return int(await Message.count().where(Message.conversation == conversation_id))


async def add_agent_message(conversation_id: UUID, content: str = "agent says hi") -> UUID:
    """An agent's answer, stored the way the streaming core stores it."""
    message = Message(
        conversation=conversation_id,
        role="agent",
        author_id=None,
        content=content,
        created_at=datetime.now(UTC),
    )
    await message.save()
    return message.id


# --- conversations ---------------------------------------------------------------------------


async def test_create_conversation_with_and_without_agent(db: str) -> None:
    """A conversation is owned by its creator, in their company, with or without an agent."""
    t = await make_tenant()
    alice = t.principals["alice"]
    plain = await new_conversation(alice)
    assert plain.owner_id == alice.user_id
    assert plain.agent_id is None
    assert plain.title is None
    with_agent = await new_conversation(alice, title="Hello", agent_id=t.agent_id)
    assert with_agent.agent_id == t.agent_id
    assert with_agent.title == "Hello"
    assert with_agent.created_at.tzinfo is not None
    row = await Conversation.select().where(Conversation.id == with_agent.id).first()
    assert row is not None
    assert row["company"] == t.company_id
    assert row["owner_id"] == alice.user_id


async def test_create_with_another_companys_agent_is_not_found(db: str) -> None:
    """An agent id from another company is NotFound, and nothing is created."""
    t = await make_tenant()
    other = await make_tenant()
    alice = t.principals["alice"]
    with pytest.raises(NotFound):
        await new_conversation(alice, title="x", agent_id=other.agent_id)
    with pytest.raises(NotFound):
        await new_conversation(alice, agent_id=uuid.uuid4())
    assert (await list_conversations(alice, None, 50)).items == []


async def test_create_validates_title(db: str) -> None:
    """A blank title is invalid input; a title over 200 characters is too large."""
    t = await make_tenant()
    alice = t.principals["alice"]
    with pytest.raises(InvalidInput):
        await new_conversation(alice, title="   ")
    with pytest.raises(TooLarge) as info:
        await new_conversation(alice, title="x" * 201)
    assert info.value.details["field"] == "title"
    assert (await new_conversation(alice, title="x" * 200)).title == "x" * 200


async def test_get_conversation(db: str) -> None:
    """`get` returns what `create` returned; an unknown id is NotFound."""
    t = await make_tenant()
    alice = t.principals["alice"]
    created = await new_conversation(alice, title="Mine", agent_id=t.agent_id)
    assert await get_conversation(alice, created.id) == created
    with pytest.raises(NotFound):
        await get_conversation(alice, uuid.uuid4())


async def test_load_agent_of_scopes_the_conversation_like_get(db: str) -> None:
    """The agent of a conversation the caller may see, None without one; NotFound for a
    conversation of another member or company, or none at all."""
    t = await make_tenant()
    other = await make_tenant()
    alice, bob = t.principals["alice"], t.principals["bob"]
    with_agent = await new_conversation(alice, agent_id=t.agent_id)
    agent = await load_agent_of(alice, with_agent.id)
    assert agent == await get_agent(t.company_id, t.agent_id)
    assert await load_agent_of(alice, (await new_conversation(alice)).id) is None
    for caller, conversation_id in (
        (bob, with_agent.id),
        (other.principals["alice"], with_agent.id),
        (alice, uuid.uuid4()),
    ):
        with pytest.raises(NotFound):
            await load_agent_of(caller, conversation_id)


async def test_list_is_newest_activity_first_and_a_new_message_moves_to_top(db: str) -> None:
    """The list is ordered by latest activity; posting to an older conversation brings it to the top."""
    t = await make_tenant()
    alice = t.principals["alice"]
    c1, c2, c3 = [await new_conversation(alice, title=f"c{i}") for i in (1, 2, 3)]
    for i, c in enumerate((c1, c2, c3)):
        await set_activity(c.id, T0 + timedelta(minutes=i))
    listed = (await list_conversations(alice, None, 50)).items
    assert [c.id for c in listed] == [c3.id, c2.id, c1.id]

    posted, _ = await post(alice, c1.id, "bump")
    listed = (await list_conversations(alice, None, 50)).items
    assert [c.id for c in listed] == [c1.id, c3.id, c2.id]
    assert listed[0].last_message_at == posted.message.created_at


async def test_list_cursor_pagination_covers_every_conversation_once(db: str) -> None:
    """7 conversations, limit 3: pages of 3, 3, 1 in order, each conversation once, last cursor null."""
    t = await make_tenant()
    alice = t.principals["alice"]
    ids = []
    for i in range(7):
        c = await new_conversation(alice, title=f"c{i}")
        # Whole seconds and fractions mixed: both must compare correctly on each engine.
        await set_activity(c.id, T0 + timedelta(seconds=i, microseconds=(i % 2) * 250_000))
        ids.append(c.id)
    pages = await all_conversation_pages(alice, 3)
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [c.id for p in pages for c in p] == list(reversed(ids))


async def test_list_last_page_exactly_full_has_no_cursor(db: str) -> None:
    """When the conversations fill the last page exactly, its `nextCursor` is null (no empty page)."""
    t = await make_tenant()
    alice = t.principals["alice"]
    for i in range(6):
        c = await new_conversation(alice)
        await set_activity(c.id, T0 + timedelta(seconds=i))
    pages = await all_conversation_pages(alice, 3)
    assert [len(p) for p in pages] == [3, 3]


async def test_list_with_no_conversations_is_empty(db: str) -> None:
    """A user without conversations gets one empty page and no cursor."""
    t = await make_tenant()
    page = await list_conversations(t.principals["bob"], None, 50)
    assert page.items == []
    assert page.next_cursor is None


async def test_conversations_created_in_a_tight_loop_paginate_without_gaps(db: str) -> None:
    """Conversations created back to back (some possibly in the same microsecond) still page
    through every conversation exactly once, in the same order as one big page."""
    t = await make_tenant()
    alice = t.principals["alice"]
    created = await asyncio.gather(*(new_conversation(alice, title=f"c{i}") for i in range(10)))
    created += [await new_conversation(alice) for _ in range(5)]
    pages = await all_conversation_pages(alice, 4)
    paged = [c.id for p in pages for c in p]
    assert sorted(paged) == sorted(c.id for c in created)
    assert len(paged) == len(set(paged)) == 15
    everything = (await list_conversations(alice, None, 100)).items
    assert paged == [c.id for c in everything]
    keys = [(c.last_message_at, c.id) for c in everything]
    assert keys == sorted(keys, reverse=True)


async def test_conversations_with_identical_activity_paginate_by_id(db: str) -> None:
    """Ties on `last_message_at` are broken by id: every conversation appears once across pages."""
    t = await make_tenant()
    alice = t.principals["alice"]
    ids = [(await new_conversation(alice)).id for _ in range(8)]
    for cid in ids:
        await set_activity(cid, T0)  # same instant, whole second
    pages = await all_conversation_pages(alice, 3)
    assert [len(p) for p in pages] == [3, 3, 2]
    assert [c.id for p in pages for c in p] == sorted(ids, reverse=True)


async def test_list_with_garbage_cursor_is_invalid_cursor(db: str) -> None:
    """A cursor this API did not make is InvalidInput `invalid_cursor`, not a database error."""
    t = await make_tenant()
    with pytest.raises(InvalidInput) as info:
        await list_conversations(t.principals["alice"], "not-a-cursor", 10)
    assert info.value.code == "invalid_cursor"


async def test_patch_changes_only_the_fields_sent(db: str) -> None:
    """PATCH: title alone, agentId alone, both together; the other field keeps its value."""
    t = await make_tenant()
    alice = t.principals["alice"]
    admin = t.principals["admin"]
    agent2 = await create_agent(t.company_id, AgentCreate(name="Second"))
    agent3 = await create_agent(t.company_id, AgentCreate(name="Third"))
    c = await new_conversation(alice, title="Start", agent_id=t.agent_id)

    out = await update_conversation(alice, c.id, ConversationUpdate(title="Renamed"))
    assert (out.title, out.agent_id) == ("Renamed", t.agent_id)

    out = await update_conversation(alice, c.id, ConversationUpdate(agent_id=agent2.id))
    assert (out.title, out.agent_id) == ("Renamed", agent2.id)

    out = await update_conversation(alice, c.id, ConversationUpdate(title="Both", agent_id=agent3.id))
    assert (out.title, out.agent_id) == ("Both", agent3.id)

    assert await get_conversation(admin, c.id) == out
    assert out.created_at == c.created_at
    assert out.owner_id == alice.user_id
    assert out.updated_at >= c.updated_at


async def test_patch_null_clears_each_field_independently(db: str) -> None:
    """`null` clears a field; the field not sent stays."""
    t = await make_tenant()
    alice = t.principals["alice"]
    c = await new_conversation(alice, title="Keep me", agent_id=t.agent_id)

    out = await update_conversation(alice, c.id, ConversationUpdate(agent_id=None))
    assert (out.title, out.agent_id) == ("Keep me", None)

    out = await update_conversation(alice, c.id, ConversationUpdate(agent_id=t.agent_id))
    out = await update_conversation(alice, c.id, ConversationUpdate(title=None))
    assert (out.title, out.agent_id) == (None, t.agent_id)

    out = await update_conversation(alice, c.id, ConversationUpdate(title="Again", agent_id=None))
    out = await update_conversation(alice, c.id, ConversationUpdate(title=None, agent_id=None))
    assert (out.title, out.agent_id) == (None, None)


async def test_patch_with_nothing_changes_nothing(db: str) -> None:
    """An empty PATCH leaves every field as it was."""
    t = await make_tenant()
    alice = t.principals["alice"]
    c = await new_conversation(alice, title="Same", agent_id=t.agent_id)
    update = msgspec.json.decode(b"{}", type=ConversationUpdate)
    assert update.title is msgspec.UNSET
    assert update.agent_id is msgspec.UNSET
    out = await update_conversation(alice, c.id, update)
    assert out == c
    assert await get_conversation(alice, c.id) == c


async def test_patch_decoded_from_json_distinguishes_null_from_absent(db: str) -> None:
    """The wire form: `{"title": null}` clears the title, `{}` keeps it."""
    t = await make_tenant()
    alice = t.principals["alice"]
    c = await new_conversation(alice, title="T", agent_id=t.agent_id)
    out = await update_conversation(alice, c.id, msgspec.json.decode(b'{"title": null}', type=ConversationUpdate))
    assert (out.title, out.agent_id) == (None, t.agent_id)
    raw = b'{"agentId": null, "title": "U"}'
    out = await update_conversation(alice, c.id, msgspec.json.decode(raw, type=ConversationUpdate))
    assert (out.title, out.agent_id) == ("U", None)


async def test_patch_rejects_bad_values_and_keeps_the_row(db: str) -> None:
    """Blank title, over-long title and another company's agent are refused; nothing changes."""
    t = await make_tenant()
    other = await make_tenant()
    alice = t.principals["alice"]
    c = await new_conversation(alice, title="Orig", agent_id=t.agent_id)
    with pytest.raises(InvalidInput):
        await update_conversation(alice, c.id, ConversationUpdate(title=" "))
    with pytest.raises(TooLarge) as info:
        await update_conversation(alice, c.id, ConversationUpdate(title="y" * 201))
    assert info.value.details["field"] == "title"
    with pytest.raises(NotFound):
        await update_conversation(alice, c.id, ConversationUpdate(title="New", agent_id=other.agent_id))
    assert await get_conversation(alice, c.id) == c


async def test_delete_conversation_cascades_to_messages(db: str) -> None:
    """Deleting a conversation removes its messages and generations; other conversations' messages stay."""
    t = await make_tenant()
    alice = t.principals["alice"]
    c = await new_conversation(alice)
    keep = await new_conversation(alice)
    for i in range(3):
        posted, _ = await post(alice, c.id, f"m{i}", client_id=f"id-{i}")
    answer_id = await add_agent_message(c.id)
    # A finished answer pointing at both messages, as the streaming core records it.
    generation = Generation(
        conversation=c.id, reply_to=posted.message.id, result_message=answer_id, status="done", agent=t.agent_id
    )
    await generation.save()
    await post(alice, keep.id, "stays")
    assert await message_count(c.id) == 4

    await delete_conversation(alice, c.id)
    assert await message_count(c.id) == 0
    assert await Generation.count().where(Generation.conversation == c.id) == 0
    assert await Conversation.count().where(Conversation.id == c.id) == 0
    assert await message_count(keep.id) == 1
    with pytest.raises(NotFound):
        await get_conversation(alice, c.id)
    with pytest.raises(NotFound):
        await delete_conversation(alice, c.id)


# --- tenancy ---------------------------------------------------------------------------------


async def test_member_cannot_reach_another_members_conversation(db: str) -> None:
    """alice cannot see, list, change, delete or write to bob's conversation: it is NotFound."""
    t = await make_tenant()
    alice, bob = t.principals["alice"], t.principals["bob"]
    c = await new_conversation(bob, title="Bob's")
    posted, _ = await post(bob, c.id, "private")
    mid = posted.message.id
    c = await get_conversation(bob, c.id)

    with pytest.raises(NotFound):
        await get_conversation(alice, c.id)
    assert (await list_conversations(alice, None, 50)).items == []
    with pytest.raises(NotFound):
        await update_conversation(alice, c.id, ConversationUpdate(title="mine now"))
    with pytest.raises(NotFound):
        await delete_conversation(alice, c.id)
    with pytest.raises(NotFound):
        await post(alice, c.id, "hi")
    with pytest.raises(NotFound):
        await list_messages(alice, c.id, None, 50)
    with pytest.raises(NotFound):
        await history(alice, c.id)
    with pytest.raises(NotFound):
        await edit_message(alice, c.id, mid, MessageEdit(content="hacked"))

    # Nothing was changed by the attempts.
    assert await get_conversation(bob, c.id) == c
    assert [m.effective_content for m in (await list_messages(bob, c.id, None, 50)).items] == ["private"]


async def test_admin_sees_every_conversation_of_the_company(db: str) -> None:
    """The company's admin lists, reads and changes members' conversations."""
    t = await make_tenant()
    admin, alice, bob = t.principals["admin"], t.principals["alice"], t.principals["bob"]
    ca = await new_conversation(alice)
    cb = await new_conversation(bob)
    cm = await new_conversation(admin)
    listed = {c.id for c in (await list_conversations(admin, None, 50)).items}
    assert listed == {ca.id, cb.id, cm.id}
    assert {c.id for c in (await list_conversations(alice, None, 50)).items} == {ca.id}
    assert await get_conversation(admin, cb.id) == cb
    out = await update_conversation(admin, cb.id, ConversationUpdate(title="by admin"))
    assert out.title == "by admin"
    assert out.owner_id == bob.user_id
    await delete_conversation(admin, ca.id)
    with pytest.raises(NotFound):
        await get_conversation(alice, ca.id)


async def test_another_companys_admin_sees_nothing(db: str) -> None:
    """Another company's admin gets NotFound for everything of this company and lists none of it."""
    t = await make_tenant()
    other = await make_tenant()
    alice = t.principals["alice"]
    outsider = other.principals["admin"]
    c = await new_conversation(alice, title="ours", agent_id=t.agent_id)
    posted, _ = await post(alice, c.id, "secret")
    c = await get_conversation(alice, c.id)

    assert (await list_conversations(outsider, None, 50)).items == []
    with pytest.raises(NotFound):
        await get_conversation(outsider, c.id)
    with pytest.raises(NotFound):
        await update_conversation(outsider, c.id, ConversationUpdate(title=None))
    with pytest.raises(NotFound):
        await delete_conversation(outsider, c.id)
    with pytest.raises(NotFound):
        await post(outsider, c.id, "hi")
    with pytest.raises(NotFound):
        await list_messages(outsider, c.id, None, 50)
    with pytest.raises(NotFound):
        await history(outsider, c.id)
    with pytest.raises(NotFound):
        await edit_message(outsider, c.id, posted.message.id, MessageEdit(content="x"))
    with pytest.raises(NotFound):
        await get_agent(other.company_id, t.agent_id)
    assert await get_conversation(alice, c.id) == c


# --- messages --------------------------------------------------------------------------------


async def test_post_message_stores_a_user_message(db: str) -> None:
    """A post returns the stored message and created=True."""
    t = await make_tenant()
    alice = t.principals["alice"]
    c = await new_conversation(alice, agent_id=t.agent_id)
    posted, created = await post(alice, c.id, "hello", client_id="c-1")
    assert created is True
    m = posted.message
    assert m.conversation_id == c.id
    assert m.role == "user"
    assert m.author_id == alice.user_id
    assert m.content == m.effective_content == "hello"
    assert m.edited_content is None and m.edited_at is None
    assert m.client_message_id == "c-1"
    assert m.status == "complete"
    assert await message_count(c.id) == 1


async def test_same_client_message_id_is_idempotent(db: str) -> None:
    """The same clientMessageId again gives back the first message, created=False, one row stored."""
    t = await make_tenant()
    alice = t.principals["alice"]
    c = await new_conversation(alice)
    first, created1 = await post(alice, c.id, "hello", client_id="retry-me")
    again, created2 = await post(alice, c.id, "hello", client_id="retry-me")
    assert (created1, created2) == (True, False)
    assert again.message.id == first.message.id
    assert again.message == first.message
    assert await message_count(c.id) == 1


async def test_posts_without_client_message_id_are_never_merged(db: str) -> None:
    """Without a clientMessageId, identical posts are separate messages."""
    t = await make_tenant()
    alice = t.principals["alice"]
    c = await new_conversation(alice)
    a, _ = await post(alice, c.id, "same")
    b, created = await post(alice, c.id, "same")
    assert created is True
    assert a.message.id != b.message.id
    assert await message_count(c.id) == 2


async def test_same_client_message_id_with_different_content_conflicts(db: str) -> None:
    """Reusing a clientMessageId for other content is a Conflict `client_message_id_conflict`."""
    t = await make_tenant()
    alice = t.principals["alice"]
    c = await new_conversation(alice)
    first, _ = await post(alice, c.id, "hello", client_id="dup")
    with pytest.raises(Conflict) as info:
        await post(alice, c.id, "something else", client_id="dup")
    assert info.value.status == 409
    assert info.value.code == "client_message_id_conflict"
    assert info.value.details["messageId"] == str(first.message.id)
    assert await message_count(c.id) == 1


async def test_same_client_message_id_by_another_author_conflicts(db: str) -> None:
    """An admin reusing alice's clientMessageId in her conversation does not get her message back."""
    t = await make_tenant()
    alice, admin = t.principals["alice"], t.principals["admin"]
    c = await new_conversation(alice)
    await post(alice, c.id, "hello", client_id="dup")
    with pytest.raises(Conflict) as info:
        await post(admin, c.id, "hello", client_id="dup")
    assert info.value.code == "client_message_id_conflict"
    assert await message_count(c.id) == 1


async def test_same_client_message_id_in_two_conversations_is_allowed(db: str) -> None:
    """clientMessageId is unique per conversation only."""
    t = await make_tenant()
    alice = t.principals["alice"]
    c1 = await new_conversation(alice)
    c2 = await new_conversation(alice)
    a, created_a = await post(alice, c1.id, "hello", client_id="shared")
    b, created_b = await post(alice, c2.id, "hello", client_id="shared")
    assert created_a and created_b
    assert a.message.id != b.message.id
    assert await message_count(c1.id) == await message_count(c2.id) == 1


async def test_concurrent_posts_with_one_client_message_id_store_one_row(db: str) -> None:
    """Ten simultaneous retries store exactly one message; every caller gets its id."""
    t = await make_tenant()
    alice = t.principals["alice"]
    c = await new_conversation(alice)
    results = await asyncio.gather(*(post(alice, c.id, "hello", client_id="race") for _ in range(10)))
    ids = {posted.message.id for posted, _ in results}
    assert len(ids) == 1
    assert sum(1 for _, created in results if created) == 1
    assert await message_count(c.id) == 1


async def test_insert_losing_the_race_returns_the_stored_message(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the pre-check misses a row another request just stored, the unique index catches the
    duplicate insert and the caller gets the stored message (created=False), nothing added."""
    t = await make_tenant()
    alice = t.principals["alice"]
    c = await new_conversation(alice)
    winner, _ = await post(alice, c.id, "hello", client_id="raced")
    await set_activity(c.id, T0)
    calls = _stale_first_lookup(monkeypatch)

    loser, created = await post(alice, c.id, "hello", client_id="raced")
    assert len(calls) == 2  # the stale check, then the lookup after the unique violation
    assert created is False
    assert loser.message.id == winner.message.id
    assert await message_count(c.id) == 1
    assert (await get_conversation(alice, c.id)).last_message_at == T0  # rolled back with the insert

    with pytest.raises(Conflict) as info:
        await post(alice, c.id, "different", client_id="raced")
    assert info.value.code == "client_message_id_conflict"
    assert await message_count(c.id) == 1


def _stale_first_lookup(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make the next clientMessageId lookup of `post_message` miss, as if it ran just before a
    concurrent insert; later lookups are real. Returns the list of looked-up ids."""
    import app.chat.messages as messages

    real = messages.by_client_id
    calls: list[str] = []

    async def lookup(conversation_id: UUID, client_message_id: str) -> dict[str, Any] | None:
        calls.append(client_message_id)
        if len(calls) == 1:
            return None
        return await real(conversation_id, client_message_id)

    monkeypatch.setattr(messages, "by_client_id", lookup)
    return calls


async def test_concurrent_posts_with_different_client_ids_all_stored(db: str) -> None:
    """Simultaneous posts with distinct clientMessageIds are all stored."""
    t = await make_tenant()
    alice = t.principals["alice"]
    c = await new_conversation(alice)
    results = await asyncio.gather(*(post(alice, c.id, f"m{i}", client_id=f"id-{i}") for i in range(8)))
    assert all(created for _, created in results)
    assert len({posted.message.id for posted, _ in results}) == 8
    assert await message_count(c.id) == 8


async def test_posting_updates_last_message_at(db: str) -> None:
    """A new message sets the conversation's `last_message_at` to the message's time."""
    t = await make_tenant()
    alice = t.principals["alice"]
    c = await new_conversation(alice)
    await set_activity(c.id, T0)
    posted, _ = await post(alice, c.id, "hi")
    after = await get_conversation(alice, c.id)
    assert after.last_message_at == posted.message.created_at
    assert after.last_message_at > T0


async def test_replayed_post_does_not_touch_last_message_at(db: str) -> None:
    """A retry (same clientMessageId) stores nothing, so the activity time stays."""
    t = await make_tenant()
    alice = t.principals["alice"]
    c = await new_conversation(alice)
    await post(alice, c.id, "hi", client_id="once")
    await set_activity(c.id, T0)
    await post(alice, c.id, "hi", client_id="once")
    assert (await get_conversation(alice, c.id)).last_message_at == T0


async def test_message_pages_are_chronological_and_cover_everything(db: str) -> None:
    """12 messages, limit 5: pages (newest first) of 5, 5, 2, each chronological inside,
    together every message exactly once; `before` walks back in time."""
    t = await make_tenant()
    alice = t.principals["alice"]
    c = await new_conversation(alice)
    ids = []
    for i in range(12):
        posted, _ = await post(alice, c.id, f"m{i}")
        await set_created(posted.message.id, T0 + timedelta(seconds=i, microseconds=(i % 3) * 100_000))
        ids.append(posted.message.id)

    pages = await all_message_pages(alice, c.id, 5)
    assert [len(p) for p in pages] == [5, 5, 2]
    assert [m.id for m in pages[0]] == ids[7:]
    assert [m.id for m in pages[1]] == ids[2:7]
    assert [m.id for m in pages[2]] == ids[:2]
    assert [m.id for p in reversed(pages) for m in p] == ids
    assert [m.content for m in pages[0]] == [f"m{i}" for i in range(7, 12)]

    latest = await list_messages(alice, c.id, None, 50)
    assert [m.id for m in latest.items] == ids
    assert latest.next_cursor is None


async def test_message_pages_with_identical_timestamps_cover_everything(db: str) -> None:
    """Messages in the same instant are still paged without duplicates or gaps (ties broken by id)."""
    t = await make_tenant()
    alice = t.principals["alice"]
    c = await new_conversation(alice)
    ids = []
    for i in range(9):
        posted, _ = await post(alice, c.id, f"m{i}")
        await set_created(posted.message.id, T0)
        ids.append(posted.message.id)
    pages = await all_message_pages(alice, c.id, 4)
    assert [len(p) for p in pages] == [4, 4, 1]
    assert [m.id for p in reversed(pages) for m in p] == sorted(ids)


async def test_messages_posted_back_to_back_page_like_one_big_page(db: str) -> None:
    """Without pinned times, small pages still equal the single full page, in order."""
    t = await make_tenant()
    alice = t.principals["alice"]
    c = await new_conversation(alice)
    posted = [(await post(alice, c.id, f"m{i}"))[0].message.id for i in range(11)]
    pages = await all_message_pages(alice, c.id, 3)
    paged = [m.id for p in reversed(pages) for m in p]
    full = [m.id for m in (await list_messages(alice, c.id, None, 100)).items]
    assert paged == full
    assert sorted(paged) == sorted(posted)
    assert len(set(paged)) == 11


async def test_before_the_oldest_message_is_an_empty_last_page(db: str) -> None:
    """`before` = the oldest message gives no items and no further cursor."""
    t = await make_tenant()
    alice = t.principals["alice"]
    c = await new_conversation(alice)
    first, _ = await post(alice, c.id, "first")
    await set_created(first.message.id, T0)
    await post(alice, c.id, "second")
    page = await list_messages(alice, c.id, first.message.id, 10)
    assert page.items == []
    assert page.next_cursor is None


async def test_before_from_another_conversation_is_invalid_cursor(db: str) -> None:
    """`before` must be a message of this conversation; anything else is InvalidInput `invalid_cursor`."""
    t = await make_tenant()
    alice = t.principals["alice"]
    c1 = await new_conversation(alice)
    c2 = await new_conversation(alice)
    await post(alice, c1.id, "here")
    elsewhere, _ = await post(alice, c2.id, "there")
    with pytest.raises(InvalidInput) as info:
        await list_messages(alice, c1.id, elsewhere.message.id, 10)
    assert info.value.code == "invalid_cursor"
    assert info.value.details[0]["field"] == "before"
    with pytest.raises(InvalidInput) as info:
        await list_messages(alice, c1.id, uuid.uuid4(), 10)
    assert info.value.code == "invalid_cursor"


async def test_edit_sets_edited_fields_and_keeps_content(db: str) -> None:
    """An edit stores `edited_content`/`edited_at`; the original `content` is kept."""
    t = await make_tenant()
    alice = t.principals["alice"]
    c = await new_conversation(alice)
    posted, _ = await post(alice, c.id, "original")
    mid = posted.message.id
    out = await edit_message(alice, c.id, mid, MessageEdit(content="fixed"))
    assert out.content == "original"
    assert out.edited_content == "fixed"
    assert out.effective_content == "fixed"
    assert out.edited_at is not None
    assert out.created_at == posted.message.created_at
    row = await Message.select().where(Message.id == mid).first()
    assert row is not None
    assert (row["content"], row["edited_content"]) == ("original", "fixed")
    listed = (await list_messages(alice, c.id, None, 10)).items
    assert [(m.content, m.effective_content) for m in listed] == [("original", "fixed")]

    again = await edit_message(alice, c.id, mid, MessageEdit(content="fixed twice"))
    assert (again.content, again.edited_content) == ("original", "fixed twice")
    assert await message_count(c.id) == 1


async def test_edit_of_unknown_message_is_not_found(db: str) -> None:
    """Editing an id that is not a message of this conversation is NotFound."""
    t = await make_tenant()
    alice = t.principals["alice"]
    c1 = await new_conversation(alice)
    c2 = await new_conversation(alice)
    other, _ = await post(alice, c2.id, "in c2")
    with pytest.raises(NotFound):
        await edit_message(alice, c1.id, uuid.uuid4(), MessageEdit(content="x"))
    with pytest.raises(NotFound):
        await edit_message(alice, c1.id, other.message.id, MessageEdit(content="x"))
    row = await Message.select().where(Message.id == other.message.id).first()
    assert row is not None
    assert row["edited_content"] is None


async def test_history_uses_effective_content_in_order(db: str) -> None:
    """History is every message in order with effectiveContent = edited ?? content."""
    t = await make_tenant()
    alice = t.principals["alice"]
    c = await new_conversation(alice, agent_id=t.agent_id)
    m1, _ = await post(alice, c.id, "first")
    await set_created(m1.message.id, T0)
    agent_mid = await add_agent_message(c.id, "answer")
    await set_created(agent_mid, T0 + timedelta(seconds=1))
    m3, _ = await post(alice, c.id, "third")
    await set_created(m3.message.id, T0 + timedelta(seconds=2))
    await edit_message(alice, c.id, m1.message.id, MessageEdit(content="first, edited"))

    items = await history(alice, c.id)
    assert [(h.id, h.role, h.effective_content) for h in items] == [
        (m1.message.id, "user", "first, edited"),
        (agent_mid, "agent", "answer"),
        (m3.message.id, "user", "third"),
    ]
    assert [h.created_at for h in items] == [T0, T0 + timedelta(seconds=1), T0 + timedelta(seconds=2)]


async def test_history_of_empty_conversation_is_empty(db: str) -> None:
    """A conversation without messages has an empty history."""
    t = await make_tenant()
    alice = t.principals["alice"]
    c = await new_conversation(alice)
    assert await history(alice, c.id) == []


async def test_edit_authorization(db: str) -> None:
    """Author may edit; admin may edit anyone's; a member may not edit an agent's message
    nor another author's user message (Forbidden)."""
    t = await make_tenant()
    alice, admin = t.principals["alice"], t.principals["admin"]
    c = await new_conversation(alice, agent_id=t.agent_id)
    own, _ = await post(alice, c.id, "mine")
    by_admin, _ = await post(admin, c.id, "admin wrote this")
    agent_mid = await add_agent_message(c.id, "agent wrote this")

    assert (await edit_message(alice, c.id, own.message.id, MessageEdit(content="mine 2"))).edited_content == "mine 2"
    out = await edit_message(admin, c.id, own.message.id, MessageEdit(content="admin fixed"))
    assert out.edited_content == "admin fixed"
    out = await edit_message(admin, c.id, agent_mid, MessageEdit(content="agent fixed"))
    assert out.edited_content == "agent fixed"

    with pytest.raises(Forbidden) as info:
        await edit_message(alice, c.id, agent_mid, MessageEdit(content="nope"))
    assert info.value.status == 403
    with pytest.raises(Forbidden):
        await edit_message(alice, c.id, by_admin.message.id, MessageEdit(content="nope"))

    rows = {r["id"]: r for r in await Message.select().where(Message.conversation == c.id)}
    assert rows[agent_mid]["edited_content"] == "agent fixed"
    assert rows[by_admin.message.id]["edited_content"] is None


async def test_content_over_50000_chars_is_too_large(db: str) -> None:
    """Message content over 50,000 characters is TooLarge naming `content`; exactly 50,000 is fine."""
    t = await make_tenant()
    alice = t.principals["alice"]
    c = await new_conversation(alice)
    with pytest.raises(TooLarge) as info:
        await post(alice, c.id, "x" * 50_001)
    assert info.value.status == 413
    assert info.value.details["field"] == "content"
    assert await message_count(c.id) == 0

    posted, _ = await post(alice, c.id, "é" * 50_000)
    assert len(posted.message.content) == 50_000
    with pytest.raises(TooLarge) as info:
        await edit_message(alice, c.id, posted.message.id, MessageEdit(content="y" * 50_001))
    assert info.value.details["field"] == "content"
    row = await Message.select().where(Message.id == posted.message.id).first()
    assert row is not None
    assert row["edited_content"] is None


@pytest.mark.parametrize("blank", ["", " ", "\n\t  "])
async def test_blank_content_is_invalid(db: str, blank: str) -> None:
    """Empty or whitespace-only content is InvalidInput naming `content`, for posts and edits."""
    t = await make_tenant()
    alice = t.principals["alice"]
    c = await new_conversation(alice)
    with pytest.raises(InvalidInput) as info:
        await post(alice, c.id, blank)
    assert info.value.details[0]["field"] == "content"
    assert await message_count(c.id) == 0
    posted, _ = await post(alice, c.id, "ok")
    with pytest.raises(InvalidInput):
        await edit_message(alice, c.id, posted.message.id, MessageEdit(content=blank))


NUL_INPUTS: dict[str, Callable[[Principal, UUID, UUID], Awaitable[Any]]] = {
    "content": lambda p, cid, _mid: post(p, cid, "a\x00b"),
    "clientMessageId": lambda p, cid, _mid: post(p, cid, "fine", client_id="x\x00y"),
    "edit": lambda p, cid, mid: edit_message(p, cid, mid, MessageEdit(content="e\x00")),
    "title": lambda p, cid, _mid: update_conversation(p, cid, ConversationUpdate(title="t\x00")),
    "new title": lambda p, _cid, _mid: new_conversation(p, title="n\x00"),
}


@pytest.mark.parametrize("case", list(NUL_INPUTS))
async def test_nul_character_in_text_is_refused_cleanly_or_stored(db: str, case: str) -> None:
    """Text containing U+0000 (valid JSON: "\\u0000") is either refused as InvalidInput or stored
    verbatim; it must never surface as a database error (PostgreSQL text cannot hold NUL)."""
    t = await make_tenant()
    alice = t.principals["alice"]
    c = await new_conversation(alice, title="before")
    posted, _ = await post(alice, c.id, "ok")
    try:
        result = await NUL_INPUTS[case](alice, c.id, posted.message.id)
    except InvalidInput:
        assert await message_count(c.id) == 1
        assert (await get_conversation(alice, c.id)).title == "before"
        return
    text = msgspec.json.encode(result).decode()
    assert "\\u0000" in text  # stored and given back as sent


# --- agents ----------------------------------------------------------------------------------


async def test_agent_create_list_get(db: str) -> None:
    """A created agent is listed and readable in its company only."""
    t = await make_tenant()
    other = await make_tenant()
    agent = await create_agent(t.company_id, AgentCreate(name="Helper", config={"pace": 0.5}))
    assert (agent.name, agent.adapter, agent.config) == ("Helper", "echo", {"pace": 0.5})
    assert await get_agent(t.company_id, agent.id) == agent
    assert {a.id for a in await list_agents(t.company_id)} == {t.agent_id, agent.id}
    assert agent.id not in {a.id for a in await list_agents(other.company_id)}
    with pytest.raises(NotFound):
        await get_agent(other.company_id, agent.id)


async def test_agent_update_changes_only_fields_sent(db: str) -> None:
    """Update: name alone keeps config; config alone keeps name; nothing sent changes nothing."""
    t = await make_tenant()
    agent = await create_agent(t.company_id, AgentCreate(name="A", config={"pace": 1}))
    out = await update_agent(t.company_id, agent.id, AgentUpdate(name="B"))
    assert (out.name, out.adapter, out.config) == ("B", "echo", {"pace": 1})
    out = await update_agent(t.company_id, agent.id, AgentUpdate(config={"pace": 2}))
    assert (out.name, out.adapter, out.config) == ("B", "echo", {"pace": 2})
    out = await update_agent(t.company_id, agent.id, AgentUpdate(config={}))
    assert out.config == {}
    unchanged = await update_agent(t.company_id, agent.id, AgentUpdate())
    assert unchanged == out
    assert out.created_at == agent.created_at


async def test_agent_of_another_company_cannot_be_changed(db: str) -> None:
    """Update and delete of another company's agent are NotFound and leave it alone."""
    t = await make_tenant()
    other = await make_tenant()
    with pytest.raises(NotFound):
        await update_agent(other.company_id, t.agent_id, AgentUpdate(name="stolen"))
    with pytest.raises(NotFound):
        await delete_agent(other.company_id, t.agent_id)
    assert (await get_agent(t.company_id, t.agent_id)).name == "Echo"


async def test_deleting_an_agent_keeps_its_conversations_without_agent(db: str) -> None:
    """Deleting an agent leaves its conversations (messages, generations) in place with agent None."""
    t = await make_tenant()
    alice = t.principals["alice"]
    agent = await create_agent(t.company_id, AgentCreate(name="Doomed"))
    c = await new_conversation(alice, title="with agent", agent_id=agent.id)
    other_c = await new_conversation(alice, agent_id=t.agent_id)
    posted, _ = await post(alice, c.id, "hello")
    generation = Generation(conversation=c.id, reply_to=posted.message.id, agent=agent.id, status="done")
    await generation.save()

    await delete_agent(t.company_id, agent.id)
    kept = await Generation.select(Generation.agent).where(Generation.id == generation.id).first()
    assert kept == {"agent": None}
    with pytest.raises(NotFound):
        await get_agent(t.company_id, agent.id)
    assert agent.id not in {a.id for a in await list_agents(t.company_id)}
    after = await get_conversation(alice, c.id)
    assert after.agent_id is None
    assert after.title == "with agent"
    assert await message_count(c.id) == 1
    assert (await get_conversation(alice, other_c.id)).agent_id == t.agent_id


# --- auth ------------------------------------------------------------------------------------


async def test_create_key_stores_only_the_hash(db: str) -> None:
    """The token starts with `cs_`; the row holds its sha256 and never the token itself."""
    t = await make_tenant()
    created = await create_key(t.company_id, ApiKeyCreate(name="ci", role=Role.member))
    token = created.token
    assert token.startswith("cs_")
    assert created.prefix == token[:10]
    row = await ApiKey.select().where(ApiKey.id == created.id).first()
    assert row is not None
    assert row["token_hash"] == hashlib.sha256(token.encode()).hexdigest()
    for column, value in row.items():
        assert token not in str(value), f"column {column} holds the token"
    listed = [k for k in await list_keys(t.company_id) if k.id == created.id]
    assert len(listed) == 1
    assert token not in msgspec.json.encode(listed[0]).decode()


async def test_authenticate_gives_the_keys_principal(db: str) -> None:
    """A valid token authenticates as its user, company and role; a garbage token does not."""
    t = await make_tenant()
    user_id = uuid.uuid4()
    created = await create_key(t.company_id, ApiKeyCreate(name="admin 2", role=Role.admin, user_id=user_id))
    principal = await authenticate(created.token)
    assert principal is not None
    assert (principal.key_id, principal.user_id, principal.company_id) == (created.id, user_id, t.company_id)
    assert principal.role is Role.admin and principal.is_admin
    assert await authenticate("cs_not-a-real-token") is None
    assert await authenticate("") is None
    assert await authenticate(created.token + "x") is None


async def test_authenticate_sets_last_used_at(db: str) -> None:
    """A fresh key has no `last_used_at`; authenticating with it sets one."""
    t = await make_tenant()
    created = await create_key(t.company_id, ApiKeyCreate(name="fresh"))
    assert created.last_used_at is None
    assert await authenticate(created.token) is not None
    row = await ApiKey.select(ApiKey.last_used_at).where(ApiKey.id == created.id).first()
    assert row is not None
    assert row["last_used_at"] is not None
    assert row["last_used_at"] >= created.created_at


async def test_revoked_key_no_longer_authenticates(db: str) -> None:
    """After revoke, authenticate returns None; revoking twice is fine and keeps the first time."""
    t = await make_tenant()
    created = await create_key(t.company_id, ApiKeyCreate(name="short-lived"))
    assert await authenticate(created.token) is not None
    await revoke_key(t.company_id, created.id)
    assert await authenticate(created.token) is None
    first = await ApiKey.select(ApiKey.revoked_at).where(ApiKey.id == created.id).first()
    assert first is not None and first["revoked_at"] is not None
    await revoke_key(t.company_id, created.id)
    second = await ApiKey.select(ApiKey.revoked_at).where(ApiKey.id == created.id).first()
    assert second == first
    assert await authenticate(created.token) is None
    listed = {k.id: k for k in await list_keys(t.company_id)}
    assert listed[created.id].revoked_at == first["revoked_at"]
    # Other keys of the company are unaffected.
    assert await authenticate(t.tokens["alice"]) is not None


async def test_revoking_another_companys_key_is_not_found(db: str) -> None:
    """A company cannot revoke (or see) another company's key."""
    t = await make_tenant()
    other = await make_tenant()
    victim = await create_key(t.company_id, ApiKeyCreate(name="victim"))
    with pytest.raises(NotFound):
        await revoke_key(other.company_id, victim.id)
    with pytest.raises(NotFound):
        await revoke_key(t.company_id, uuid.uuid4())
    assert await authenticate(victim.token) is not None
    assert victim.id not in {k.id for k in await list_keys(other.company_id)}


# --- demo ------------------------------------------------------------------------------------


async def test_seed_demo_only_on_an_empty_database(db: str) -> None:
    """On an empty database the demo company, echo agent and member key are made, once.
    The shared PostgreSQL test database is never empty, so there it must seed nothing."""
    if db == "postgres":
        await make_tenant()  # whatever ran before, the database now has a company
        before = await Company.count()
        assert await seed_demo_if_empty() is None
        assert await Company.count() == before
        return

    assert await Company.count() == 0
    seed = await seed_demo_if_empty()
    assert seed is not None
    company_id = UUID(seed.company_id)
    companies = await Company.select(Company.id, Company.name)
    assert [(r["id"], r["name"]) for r in companies] == [(company_id, "Demo")]
    agents = await list_agents(company_id)
    assert [(str(a.id), a.adapter) for a in agents] == [(seed.agent_id, "echo")]
    principal = await authenticate(seed.member_token)
    assert principal is not None
    assert principal.company_id == company_id
    assert principal.role is Role.member
    # The seeded key works end to end: a member can talk to the echo agent.
    c = await new_conversation(principal, agent_id=UUID(seed.agent_id))
    assert (await post(principal, c.id, "hi"))[1] is True

    assert await seed_demo_if_empty() is None
    assert await Company.count() == 1
    assert len(await list_keys(company_id)) == 1
