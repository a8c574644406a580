"""The Redis broker as several processes see it: two brokers on one prefix stand in for two
server processes. Also what Redis adds: bounded memory and key expiry, connections that do
not grow with readers, and outages (connections killed, Redis unreachable, Redis back).
The broker contract itself (both brokers) is in tests/unit/streaming/test_broker.py.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator

import msgspec
import pytest

from app.streaming import redis_broker
from app.streaming.broker import BrokerUnavailable, FeedOverflow
from app.streaming.events import Done, Start, Token
from app.streaming.protocol import ConversationDeleted, GenerationStarted
from app.streaming.redis_broker import ORPHAN_TTL, RedisBroker
from tests.redis_support import RedisScope, TcpProxy, eventually, redis_scope

pytestmark = pytest.mark.anyio


@pytest.fixture
async def scope() -> AsyncIterator[RedisScope]:
    async with redis_scope() as redis:
        yield redis


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    tcp = TcpProxy()
    await tcp.start()
    yield tcp
    await tcp.stop()


def new_ids() -> tuple[uuid.UUID, uuid.UUID, uuid.UUID]:
    return uuid.uuid4(), uuid.uuid4(), uuid.uuid4()


async def waiting(broker: RedisBroker, g: uuid.UUID, count: int) -> None:
    async def ready() -> bool:
        return broker.waiting(g) == count

    await eventually(ready, what=f"{count} reads waiting")


async def subscribed(scope: RedisScope, broker: RedisBroker) -> None:
    """Until the broker's pub/sub connection has its pattern subscription, and the broker knows it
    (a feed opened before it has seen Redis confirm the subscription is lost at once)."""

    async def ready() -> bool:
        if not any(c["psub"] == "1" for c in await scope.clients(broker.client_name("feeds"))):
            return False
        probe = broker.open_feed(uuid.uuid4())
        broker.close_feed(probe)
        return not probe.overflowed

    await eventually(ready, what="conversation feeds subscribed")


async def test_a_reader_in_one_process_follows_a_generation_produced_in_another(scope: RedisScope) -> None:
    g, c, m = new_ids()
    producer, reader = scope.broker(), scope.broker()
    await producer.open_log(g, c)
    waiter = asyncio.create_task(reader.read(g, 0, None))
    await waiting(reader, g, 1)
    await producer.append(Start(generation_id=g, conversation_id=c, seq=1))
    assert [e.seq for e in await asyncio.wait_for(waiter, 5) or []] == [1]
    for seq in range(2, 5):
        await producer.append(Token(generation_id=g, conversation_id=c, seq=seq, text=f"w{seq}"))
    await producer.append(Done(generation_id=g, conversation_id=c, seq=5, message_id=m, token_count=3))
    await producer.close_log(g)
    # After the end, from any process: the rest (in the batches the reading loop brought them, which
    # it may not have read to the end yet), then nothing to wait for.
    got = [1]
    while got[-1] != 5:
        got += [e.seq for e in await asyncio.wait_for(reader.read(g, got[-1], None), 5) or []]
    assert got == [1, 2, 3, 4, 5]
    assert await reader.read(g, 5, None) == []
    assert await reader.last_seq(g) == 5


async def test_the_same_seq_from_two_processes_is_refused_by_redis(scope: RedisScope) -> None:
    g, c, _ = new_ids()
    first, second = scope.broker(), scope.broker()
    await first.open_log(g, c)
    await first.append(Start(generation_id=g, conversation_id=c, seq=1))
    with pytest.raises(ValueError, match="does not follow"):
        await second.append(Start(generation_id=g, conversation_id=c, seq=1))
    assert await scope.redis.xlen(f"{scope.prefix}gen:{{{g}}}:log") == 1


async def test_reader_counts_are_shared_and_a_closed_process_counts_its_readers_out(scope: RedisScope) -> None:
    g, c, _ = new_ids()
    a, b = scope.broker(), scope.broker()
    await a.open_log(g, c)
    assert await a.add_reader(g) == 1
    assert await b.add_reader(g) == 2
    assert await b.add_reader(g) == 3
    assert await a.readers(g) == await b.readers(g) == 3
    assert await a.remove_reader(g) == 2
    assert await a.remove_reader(g) == 2  # a's own count does not go below 0, b's stay
    await b.close()  # b's process stops: its readers are gone
    assert await a.readers(g) == 0


def numbered(event: GenerationStarted, seq: int) -> GenerationStarted:
    return msgspec.structs.replace(event, conversation_seq=seq)


async def test_a_feed_in_one_process_receives_events_published_in_another(scope: RedisScope) -> None:
    g, c, _ = new_ids()
    a, b = scope.broker(), scope.broker()
    feed_b = b.open_feed(c)
    feed_a = a.open_feed(c)
    await subscribed(scope, b)
    await subscribed(scope, a)
    # Numbered in the conversation, one count for every process.
    started = GenerationStarted(conversation_id=c, generation_id=g)
    deleted = ConversationDeleted(conversation_id=c, conversation_seq=2)
    await a.publish(started)
    assert await asyncio.wait_for(feed_b.get(), 5) == numbered(started, 1)
    await b.publish(msgspec.structs.replace(deleted, conversation_seq=0))
    assert await asyncio.wait_for(feed_a.get(), 5) == numbered(started, 1)
    assert await asyncio.wait_for(feed_a.get(), 5) == deleted
    assert await asyncio.wait_for(feed_b.get(), 5) == deleted
    # Each feed got each event once: a publisher's own feeds are served at once, not again from pub/sub.
    await a.publish(started)
    assert await asyncio.wait_for(feed_b.get(), 5) == numbered(started, 3)
    assert await asyncio.wait_for(feed_a.get(), 5) == numbered(started, 3)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(feed_a.get(), 0.1)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(feed_b.get(), 0.1)


async def test_memory_is_bounded_while_open_and_nothing_remains_after_the_ttl(scope: RedisScope) -> None:
    g, c, m = new_ids()
    broker = scope.broker(retain=10, log_ttl=0.3)
    await broker.open_log(g, c)
    await broker.append(Start(generation_id=g, conversation_id=c, seq=1))
    for seq in range(2, 202):
        await broker.append(Token(generation_id=g, conversation_id=c, seq=seq, text="x"))
    log = f"{scope.prefix}gen:{{{g}}}:log"
    assert await scope.redis.xlen(log) == 10
    # While open, no key of the generation lives forever (its producer could die): a long ttl, pushed back by appends.
    keys = await scope.keys(str(g))
    assert len(keys) == 3
    for key in keys:
        assert 0 < await scope.redis.pttl(key) <= ORPHAN_TTL * 1000
    await broker.add_reader(g)
    await broker.append(Done(generation_id=g, conversation_id=c, seq=202, message_id=m, token_count=200))
    await broker.close_log(g)
    assert await scope.redis.xlen(log) == 10

    async def gone() -> bool:
        return await scope.keys(str(g)) == []

    await eventually(gone, what="every key of the ended generation expired")


async def test_a_thousand_waiting_readers_hold_a_fixed_handful_of_connections(scope: RedisScope) -> None:
    g, c, _ = new_ids()
    broker = scope.broker(pool_size=2)
    await broker.open_log(g, c)
    readers = [asyncio.create_task(broker.read(g, 0, None)) for _ in range(1000)]
    await waiting(broker, g, 1000)

    async def reading() -> bool:  # the reading loop opens its connection in its own time
        return bool(await scope.clients(broker.client_name("reader")))

    await eventually(reading, what="the reading loop connected")
    connections = await scope.clients(broker.id)
    # The command pool (2) and the reading loop (1); the feeds' connection opens with the first feed.
    assert len(connections) <= 4, [x["name"] for x in connections]
    assert len([x for x in connections if x["name"] == broker.client_name("reader")]) == 1
    await broker.append(Start(generation_id=g, conversation_id=c, seq=1))
    results = await asyncio.wait_for(asyncio.gather(*readers), 10)
    assert all([e.seq for e in r or []] == [1] for r in results)
    assert len(await scope.clients(broker.id)) <= 4


async def test_a_reader_that_leaves_while_waiting_leaves_nothing_behind(scope: RedisScope) -> None:
    """Readers cancelled while they wait (their clients left) are forgotten at once; the next
    append still wakes the reader that stayed, and the append keys go with the closed log."""
    g, c, m = new_ids()
    producer, reader = scope.broker(), scope.broker()
    await producer.open_log(g, c)
    leaving = [asyncio.create_task(reader.read(g, 0, None)) for _ in range(3)]
    staying = asyncio.create_task(reader.read(g, 0, None))
    await waiting(reader, g, 4)
    for task in leaving:
        task.cancel()
    await asyncio.gather(*leaving, return_exceptions=True)
    assert reader.waiting(g) == 1 and len(reader._watches[g].wakeup) == 1
    await producer.append(Start(generation_id=g, conversation_id=c, seq=1))
    assert [e.seq for e in await asyncio.wait_for(staying, 10) or []] == [1]
    await producer.append(Done(generation_id=g, conversation_id=c, seq=2, message_id=m, token_count=0))
    await producer.close_log(g)
    assert g not in producer._append_keys


async def test_a_thousand_readers_arriving_at_once_share_a_few_round_trips(scope: RedisScope) -> None:
    # On a busy event loop, a pooled connection and a round trip per command made commands wait
    # seconds for a connection (reported as Redis being down): the commands of a turn share one.
    g, c, _ = new_ids()
    broker = scope.broker(pool_size=2)
    await broker.open_log(g, c)
    await broker.append(Start(generation_id=g, conversation_id=c, seq=1))
    before = broker.round_trips
    totals = await asyncio.gather(*(broker.add_reader(g) for _ in range(1000)))
    assert sorted(totals) == list(range(1, 1001))
    reads = await asyncio.gather(*(broker.read(g, 0, 0) for _ in range(1000)))
    assert all([e.seq for e in r or []] == [1] for r in reads)
    assert broker.round_trips - before <= 4
    assert await broker.readers(g) == 1000


async def test_a_refused_command_fails_only_its_caller_in_a_shared_pipeline(scope: RedisScope) -> None:
    g, c, _ = new_ids()
    h = uuid.uuid4()
    broker = scope.broker()
    await asyncio.gather(broker.open_log(g, c), broker.open_log(h, c))
    results = await asyncio.gather(
        broker.append(Start(generation_id=g, conversation_id=c, seq=1)),
        broker.append(Start(generation_id=h, conversation_id=c, seq=2)),  # seq 1 is missing
        broker.append(Start(generation_id=uuid.uuid4(), conversation_id=c, seq=1)),  # no such log
        broker.last_seq(g),
        return_exceptions=True,
    )
    assert results[0] is None
    assert isinstance(results[1], ValueError)
    assert isinstance(results[2], KeyError)
    # Not failed by the others' errors. 1 unless a test in another worker flushed Redis's scripts
    # meanwhile (test_scripts_redis_lost_…): then the append ran again after it, and it read 0.
    assert results[3] in (0, 1)
    assert await broker.last_seq(g) == 1


async def test_scripts_redis_lost_are_loaded_again_and_their_commands_run_once(scope: RedisScope) -> None:
    g, c, _ = new_ids()
    broker = scope.broker()
    await broker.open_log(g, c)
    await broker.append(Start(generation_id=g, conversation_id=c, seq=1))
    await scope.redis.script_flush()  # as after a restart of Redis
    await asyncio.gather(
        broker.append(Token(generation_id=g, conversation_id=c, seq=2, text="a")),
        broker.add_reader(g),
        broker.last_seq(g),
    )
    assert await broker.last_seq(g) == 2
    assert await broker.readers(g) == 1
    assert [e.seq for e in await broker.read(g, 0, 0) or []] == [1, 2]


async def test_an_append_whose_caller_is_cancelled_settles_first(scope: RedisScope) -> None:
    # The producer's terminal event takes the seq after the log's last one: it must be able to
    # tell whether an append it was cancelled in landed.
    g, c, _ = new_ids()
    broker = scope.broker()
    await broker.open_log(g, c)
    append = asyncio.create_task(broker.append(Start(generation_id=g, conversation_id=c, seq=1)))
    await asyncio.sleep(0)  # queued for the next pipeline
    append.cancel()
    with pytest.raises(asyncio.CancelledError):
        await append
    assert await broker.last_seq(g) == 1


async def test_a_killed_reading_connection_is_reopened_and_waiting_reads_miss_nothing(scope: RedisScope) -> None:
    g, c, _ = new_ids()
    producer, reader = scope.broker(), scope.broker()
    await producer.open_log(g, c)
    waiter = asyncio.create_task(reader.read(g, 0, None))
    await waiting(reader, g, 1)

    async def reading() -> bool:
        return bool(await scope.clients(reader.client_name("reader")))

    await eventually(reading, what="the reading loop connected")
    assert await scope.kill_clients(reader.client_name("reader")) == 1
    await producer.append(Start(generation_id=g, conversation_id=c, seq=1))
    assert [e.seq for e in await asyncio.wait_for(waiter, 5) or []] == [1]
    await eventually(reading, what="the reading loop reconnected")


async def test_a_killed_feeds_connection_loses_open_feeds_then_resubscribes(scope: RedisScope) -> None:
    g, c, _ = new_ids()
    a, b = scope.broker(), scope.broker()
    feed = b.open_feed(c)
    await subscribed(scope, b)
    assert await scope.kill_clients(b.client_name("feeds")) == 1
    # The feed may have missed events while the subscription was gone: its subscriber must start over.
    with pytest.raises(FeedOverflow):
        await asyncio.wait_for(feed.get(), 5)
    b.close_feed(feed)
    await subscribed(scope, b)
    fresh = b.open_feed(c)
    await a.publish(GenerationStarted(conversation_id=c, generation_id=g))
    got = await asyncio.wait_for(fresh.get(), 5)
    assert got == GenerationStarted(conversation_id=c, generation_id=g, conversation_seq=got.conversation_seq) != 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_calls_raise_broker_unavailable_promptly_when_nothing_listens(scope: RedisScope) -> None:
    g, c, _ = new_ids()
    broker = scope.broker(f"redis://127.0.0.1:{free_port()}")
    calls = [
        broker.ping(),
        broker.open_log(g, c),
        broker.append(Start(generation_id=g, conversation_id=c, seq=1)),
        broker.read(g, 0, None),
        broker.last_seq(g),
        broker.add_reader(g),
        broker.remove_reader(g),
        broker.readers(g),
        broker.close_log(g),
        broker.discard_log(g),
        broker.publish(ConversationDeleted(conversation_id=c)),
    ]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            await asyncio.wait_for(call, 5)
        assert time.monotonic() - started < 3
    feed = broker.open_feed(c)
    with pytest.raises(FeedOverflow):
        await asyncio.wait_for(feed.get(), 5)


async def test_an_outage_ends_waiting_reads_and_the_broker_works_again_once_redis_is_back(
    scope: RedisScope, proxy: TcpProxy
) -> None:
    g, c, _ = new_ids()
    producer = scope.broker()  # another process, which keeps its Redis
    broker = scope.broker(proxy.url)  # this one reaches Redis through the proxy
    await producer.open_log(g, c)
    feed = broker.open_feed(c)
    await subscribed(scope, broker)
    readers = [asyncio.create_task(broker.read(g, 0, None)) for _ in range(3)]
    await waiting(broker, g, 3)

    await proxy.stop()  # Redis is down, as far as `broker` can tell
    for reader in readers:
        with pytest.raises(BrokerUnavailable):
            await asyncio.wait_for(reader, 10)
    with pytest.raises(FeedOverflow):
        await asyncio.wait_for(feed.get(), 10)
    with pytest.raises(BrokerUnavailable):
        await asyncio.wait_for(broker.last_seq(g), 5)
    lost = broker.open_feed(c)  # opened during the outage: it cannot know what it misses
    with pytest.raises(FeedOverflow):
        await asyncio.wait_for(lost.get(), 5)
    broker.close_feed(feed)
    broker.close_feed(lost)

    await proxy.start()  # Redis is back: the same broker, its loops reconnected

    async def up() -> bool:
        try:
            await broker.ping()
        except BrokerUnavailable:
            return False
        return True

    await eventually(up, what="the broker reaches Redis again")
    waiter = asyncio.create_task(broker.read(g, 0, None))
    await waiting(broker, g, 1)
    await producer.append(Start(generation_id=g, conversation_id=c, seq=1))
    assert [e.seq for e in await asyncio.wait_for(waiter, 10) or []] == [1]
    await subscribed(scope, broker)
    fresh = broker.open_feed(c)
    await producer.publish(ConversationDeleted(conversation_id=c))
    assert await asyncio.wait_for(fresh.get(), 10) == ConversationDeleted(conversation_id=c, conversation_seq=1)


async def test_a_reader_waiting_on_a_log_that_expires_unseen_is_told_it_is_gone(
    scope: RedisScope, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An XREAD on a stream key that no longer exists blocks until the key is made again, that
    is for ever: a reader whose log expired between two XREADs (`log_ttl=0` under load) once
    waited for ever. After a whole block with nothing read, the waiters look at their logs."""
    monkeypatch.setattr(redis_broker, "BLOCK_MS", 200)  # a short block keeps the test short
    monkeypatch.setattr(redis_broker, "_XREAD", (b"XREAD", b"BLOCK", b"200", b"STREAMS"))
    broker = scope.broker()
    g, c, _ = new_ids()
    await broker.open_log(g, c)
    await broker.append(Start(generation_id=g, conversation_id=c, seq=1))
    await broker.append(Token(generation_id=g, conversation_id=c, seq=2, text="one"))
    waiting = asyncio.ensure_future(broker.read(g, 2, None))

    async def reader_waits() -> bool:
        return broker.waiting(g) == 1

    await eventually(reader_waits, what="the reader waits on the log")
    await scope.redis.unlink(*await scope.keys(str(g)))  # gone without a terminal event
    assert await asyncio.wait_for(waiting, 5) is None
