"""Conversation lists in the brokers and the core: a conversation event published with its
scope (company, owner) reaches the list feeds that may show the conversation (its owner's,
its company's admins'), as the frame lists show (`list_frame`); never another member's or
another company's. Every broker test runs on the in-process broker and on the Redis one,
and the Redis ones also across two brokers (two processes). The scope memory and the
core's routing of events published without a scope are checked here too.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Collection
from datetime import UTC, datetime
from typing import Any, cast
from uuid import UUID

import msgspec
import pytest

from app.streaming.broker import Broker, FeedOverflow, InProcessBroker, ListFeed
from app.streaming.core import StreamingCore
from app.streaming.policy import StreamPolicy
from app.streaming.protocol import (
    ConversationActivity,
    ConversationCreated,
    ConversationDeleted,
    ConversationEvent,
    ConversationUpdated,
    GenerationStarted,
    ListFrame,
    MessageCreated,
    MessageEdited,
    list_frame,
)
from app.streaming.records import ConversationOut, MessageOut
from app.streaming.redis_broker import RedisBroker
from app.streaming.scopes import Scope, Scopes, known
from app.streaming.store import AnswerStore
from app.tables import MessageRole, MessageStatus
from tests.redis_support import RedisScope, eventually, redis_scope

pytestmark = pytest.mark.anyio

WAIT = 5.0
MakeBroker = Callable[[], Broker]


@pytest.fixture(params=["in-process", "redis"])
async def make_broker(request: pytest.FixtureRequest) -> AsyncIterator[MakeBroker]:
    """Brokers of the parametrized kind (Redis ones on one prefix: processes of one cluster)."""
    if request.param == "redis":
        async with redis_scope() as scope:
            yield scope.broker
        return
    brokers: list[InProcessBroker] = []

    def make() -> Broker:
        brokers.append(InProcessBroker())
        return brokers[-1]

    yield make
    for broker in brokers:
        await broker.close()


@pytest.fixture
async def redis() -> AsyncIterator[RedisScope]:
    async with redis_scope() as scope:
        yield scope


class Company:
    """Ids of one company: its id, two members and an admin (only ids: brokers know nothing else)."""

    def __init__(self) -> None:
        self.id, self.alice, self.bob, self.admin = (uuid.uuid4() for _ in range(4))

    def scope(self, owner: UUID) -> Scope:
        return Scope(self.id, owner)


def conversation(conversation_id: UUID, owner: UUID, title: str | None = None) -> ConversationOut:
    now = datetime.now(UTC)
    return ConversationOut(
        id=conversation_id,
        owner_id=owner,
        agent_id=None,
        title=title,
        last_message_at=now,
        created_at=now,
        updated_at=now,
    )


def message(conversation_id: UUID, at: datetime, role: MessageRole = MessageRole.user) -> MessageOut:
    return MessageOut(
        id=uuid.uuid4(),
        conversation_id=conversation_id,
        role=role,
        author_id=None,
        content="hi",
        edited_content=None,
        edited_at=None,
        effective_content="hi",
        client_message_id=None,
        generation_id=None,
        status=MessageStatus.complete,
        created_at=at,
    )


def life_of(c: UUID, owner: UUID) -> list[ConversationEvent]:
    """Every kind of conversation event, in the order a conversation's life has them."""
    at = datetime(2026, 12, 1, 8, 30, tzinfo=UTC)
    return [
        ConversationCreated(conversation_id=c, conversation=conversation(c, owner)),
        ConversationUpdated(conversation_id=c, conversation=conversation(c, owner, "Lisbon")),
        MessageCreated(conversation_id=c, message=message(c, at)),
        GenerationStarted(conversation_id=c, generation_id=uuid.uuid4()),
        MessageEdited(conversation_id=c, message=message(c, at)),
        MessageCreated(conversation_id=c, message=message(c, at.replace(second=5), MessageRole.agent)),
        ConversationDeleted(conversation_id=c),
    ]


def listed(events: list[ConversationEvent]) -> list[ListFrame]:
    return [frame for frame in map(list_frame, events) if frame is not None]


async def take(feed: ListFeed, count: int) -> list[ListFrame]:
    return [await asyncio.wait_for(feed.get(), WAIT) for _ in range(count)]


async def subscribed(scope: RedisScope, broker: RedisBroker) -> None:
    """Until the broker's pub/sub subscription is confirmed (a list opened before is lost at once)."""

    async def ready() -> bool:
        if not any(c["psub"] == "1" for c in await scope.clients(broker.client_name("feeds"))):
            return False
        probe = broker.open_list_feed(uuid.uuid4(), None)
        broker.close_list_feed(probe)
        return not probe.overflowed

    await eventually(ready, what="conversation feeds subscribed")


# -- what lists show -------------------------------------------------------------------------


def test_list_frames_are_creation_change_deletion_and_activity() -> None:
    c, owner = uuid.uuid4(), uuid.uuid4()
    created, updated, first, started, edited, answer, deleted = life_of(c, owner)
    assert list_frame(created) is created
    assert list_frame(updated) is updated
    assert list_frame(deleted) is deleted
    assert isinstance(first, MessageCreated) and isinstance(answer, MessageCreated)
    assert list_frame(first) == ConversationActivity(conversation_id=c, last_message_at=first.message.created_at)
    assert list_frame(answer) == ConversationActivity(conversation_id=c, last_message_at=answer.message.created_at)
    assert list_frame(started) is None and list_frame(edited) is None


# -- brokers ---------------------------------------------------------------------------------


async def test_a_list_shows_its_owners_conversations_and_an_admins_every_one_of_the_company(
    make_broker: MakeBroker,
) -> None:
    acme, globex = Company(), Company()
    broker = make_broker()
    alice = broker.open_list_feed(acme.id, acme.alice)
    bob = broker.open_list_feed(acme.id, acme.bob)
    admin = broker.open_list_feed(acme.id, None)
    other = broker.open_list_feed(globex.id, None)
    other_alice = broker.open_list_feed(globex.id, acme.alice)  # the same user id, in another company
    c = uuid.uuid4()
    life = life_of(c, acme.alice)
    for event in life:
        await broker.publish(event, acme.scope(acme.alice))
    assert await take(alice, 5) == listed(life)
    assert await take(admin, 5) == listed(life)
    # The others got nothing: the next thing each of them gets is an event of their own.
    bobs = ConversationDeleted(conversation_id=uuid.uuid4())
    await broker.publish(bobs, acme.scope(acme.bob))
    assert await take(bob, 1) == [bobs]
    globexs = ConversationDeleted(conversation_id=uuid.uuid4())
    await broker.publish(globexs, globex.scope(acme.alice))
    assert await take(other, 1) == [globexs]
    assert await take(other_alice, 1) == [globexs]
    # The admin's list has bob's, and the admin's own conversation once.
    admins = ConversationDeleted(conversation_id=uuid.uuid4())
    await broker.publish(admins, acme.scope(acme.admin))
    assert await take(admin, 2) == [bobs, admins]
    alices = ConversationDeleted(conversation_id=uuid.uuid4())
    await broker.publish(alices, acme.scope(acme.alice))
    assert await take(alice, 1) == [alices]  # nothing of bob's, the admin's or globex's before it


async def test_a_conversation_feed_gets_no_creation_and_an_event_without_scope_reaches_no_list(
    make_broker: MakeBroker,
) -> None:
    acme = Company()
    broker = make_broker()
    c = uuid.uuid4()
    feed = broker.open_feed(c)
    alice = broker.open_list_feed(acme.id, acme.alice)
    created, updated, *_ = life_of(c, acme.alice)
    await broker.publish(created, acme.scope(acme.alice))
    await broker.publish(updated)  # no scope: the conversation's subscribers only
    assert await asyncio.wait_for(feed.get(), WAIT) == msgspec.structs.replace(updated, conversation_seq=2)
    assert await take(alice, 1) == [created]  # a list's frames carry no conversationSeq
    barrier = ConversationDeleted(conversation_id=c)
    await broker.publish(barrier, acme.scope(acme.alice))
    assert await take(alice, 1) == [barrier]
    assert await asyncio.wait_for(feed.get(), WAIT) == msgspec.structs.replace(barrier, conversation_seq=3)


async def test_a_closed_list_gets_nothing_and_others_of_the_same_owner_go_on(make_broker: MakeBroker) -> None:
    acme = Company()
    broker = make_broker()
    first = broker.open_list_feed(acme.id, acme.alice)
    second = broker.open_list_feed(acme.id, acme.alice)
    broker.close_list_feed(first)
    broker.close_list_feed(first)  # twice: no harm
    event = ConversationDeleted(conversation_id=uuid.uuid4())
    await broker.publish(event, acme.scope(acme.alice))
    assert await take(second, 1) == [event]
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(first.get(), 0.05)


async def test_a_list_that_fills_up_overflows() -> None:
    acme = Company()
    broker = InProcessBroker()
    feed = broker.open_list_feed(acme.id, None)
    for _ in range(300):
        await broker.publish(ConversationDeleted(conversation_id=uuid.uuid4()), acme.scope(acme.bob))
    with pytest.raises(FeedOverflow):
        await feed.get()


async def test_a_list_in_one_process_shows_what_another_publishes(redis: RedisScope) -> None:
    acme, globex = Company(), Company()
    a, b = redis.broker(), redis.broker()
    alice_b = b.open_list_feed(acme.id, acme.alice)
    bob_b = b.open_list_feed(acme.id, acme.bob)
    admin_b = b.open_list_feed(acme.id, None)
    other_b = b.open_list_feed(globex.id, None)
    alice_a = a.open_list_feed(acme.id, acme.alice)
    await subscribed(redis, b)
    c = uuid.uuid4()
    life = life_of(c, acme.alice)
    for event in life:
        await a.publish(event, acme.scope(acme.alice))
    assert await take(alice_b, 5) == listed(life)
    assert await take(admin_b, 5) == listed(life)
    assert await take(alice_a, 5) == listed(life)  # the publisher's own lists: at once, and once
    for feed, company, owner in ((bob_b, acme, acme.bob), (other_b, globex, globex.alice)):
        mine = ConversationDeleted(conversation_id=uuid.uuid4())
        await a.publish(mine, company.scope(owner))
        assert await take(feed, 1) == [mine]
    mine = ConversationDeleted(conversation_id=uuid.uuid4())
    await b.publish(mine, acme.scope(acme.alice))
    assert await take(alice_a, 1) == [mine]  # not life's events again from pub/sub


async def test_the_scope_travels_in_the_channel_name_whose_last_part_is_the_conversation(redis: RedisScope) -> None:
    """What a process made before lists existed reads: the conversation id after the last `:`."""
    acme = Company()
    broker = redis.broker()
    c = uuid.uuid4()
    feed = broker.open_feed(c)
    await subscribed(redis, broker)
    pubsub = redis.redis.pubsub()
    await pubsub.psubscribe(f"{redis.prefix}conv:*")
    try:
        other = redis.broker()
        await other.publish(ConversationDeleted(conversation_id=c), acme.scope(acme.alice))
        while True:
            got: dict[str, Any] | None = await pubsub.get_message(timeout=WAIT)
            assert got is not None
            if got["type"] == "pmessage":
                break
        channel = got["channel"].decode()
        assert channel == f"{redis.prefix}conv:{acme.id}:{acme.alice}:{c}"
        assert channel.rpartition(":")[2] == str(c)
    finally:
        await pubsub.aclose()
    assert await asyncio.wait_for(feed.get(), WAIT) == ConversationDeleted(conversation_id=c, conversation_seq=1)


async def test_a_lost_subscription_loses_the_lists_too(redis: RedisScope) -> None:
    acme = Company()
    a, b = redis.broker(), redis.broker()
    feed = b.open_list_feed(acme.id, None)
    await subscribed(redis, b)
    assert await redis.kill_clients(b.client_name("feeds")) == 1
    with pytest.raises(FeedOverflow):
        await asyncio.wait_for(feed.get(), WAIT)
    b.close_list_feed(feed)
    await subscribed(redis, b)
    fresh = b.open_list_feed(acme.id, None)
    event = ConversationDeleted(conversation_id=uuid.uuid4())
    await a.publish(event, acme.scope(acme.alice))
    assert await take(fresh, 1) == [event]


# -- the scope memory ------------------------------------------------------------------------


def test_scopes_keep_the_most_recently_told() -> None:
    scopes = Scopes(size=2)
    company, owner = uuid.uuid4(), uuid.uuid4()
    first, second, third = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    scopes.remember(first, company, owner)
    scopes.remember(second, company, owner)
    scopes.remember(first, company, owner)  # told again: now the most recent
    scopes.remember(third, company, owner)
    assert scopes.get(second) is None
    assert scopes.get(first) == scopes.get(third) == Scope(company, owner)
    scopes.forget(first)
    assert scopes.get(first) is None and len(scopes) == 1


# -- the core --------------------------------------------------------------------------------


class ScopeStore:
    """The one store method publishing uses: whose a conversation is (the database's answer)."""

    def __init__(self, scopes: dict[UUID, Scope]) -> None:
        self.scopes = scopes
        self.asked: list[UUID] = []

    async def conversation_scope(self, conversation_id: UUID) -> Scope | None:
        self.asked.append(conversation_id)
        return self.scopes.get(conversation_id)

    async def invalid_credentials(self, held: Collection[Any]) -> set[Any]:
        return set()


async def test_the_core_routes_what_it_publishes_without_a_scope() -> None:
    """A message published without a scope (the agent's answer, a user message) reaches the
    lists: its scope from what the process was told, else from the store, asked once."""
    acme = Company()
    told, untold, gone = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    store = ScopeStore({untold: acme.scope(acme.bob)})
    core = StreamingCore(InProcessBroker(), StreamPolicy(), store=cast(AnswerStore, store), adapters={})
    known.remember(told, acme.id, acme.alice)
    admin = core.open_list_feed(acme.id, None)
    at = datetime.now(UTC)
    try:
        for c in (told, untold, untold, gone):
            await core.publish(MessageCreated(conversation_id=c, message=message(c, at)))
        await core.publish(GenerationStarted(conversation_id=untold, generation_id=uuid.uuid4()))
        await core.publish(MessageEdited(conversation_id=gone, message=message(gone, at)))
        barrier = ConversationDeleted(conversation_id=uuid.uuid4())
        await core.publish(barrier, acme.scope(acme.alice))
        activity = [ConversationActivity(conversation_id=c, last_message_at=at) for c in (told, untold, untold)]
        assert await take(admin, 4) == [*activity, barrier]
        # Asked once for the untold conversation (then remembered) and once for the gone one;
        # never for events lists do not show.
        assert store.asked == [untold, gone]
        assert known.get(untold) == acme.scope(acme.bob)
    finally:
        core.close_list_feed(admin)
        for c in (told, untold):
            known.forget(c)
        await core.shutdown()
