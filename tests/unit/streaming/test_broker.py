"""The broker contract: logs by generation, snapshots, reader counts, expiry of ended logs and
conversation feeds, the same for every broker. Each test runs against the in-process broker
and the Redis one (which needs the test Redis; see tests/redis_support.py). What only the
Redis broker has (several processes, connections, outages) is in tests/integration/test_redis_broker.py.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest

from app.streaming.broker import Broker, FeedOverflow, InProcessBroker
from app.streaming.events import Done, GenerationEvent, PartDelta, PartEnd, PartStart, Snapshot, Start, Token
from app.streaming.log import GenerationLog
from app.streaming.parts import Part
from app.streaming.protocol import ConversationDeleted, GenerationStarted
from tests.redis_support import eventually, redis_scope

pytestmark = pytest.mark.anyio

MakeBroker = Callable[..., Broker]


@pytest.fixture(params=["in-process", "redis"])
async def make_broker(request: pytest.FixtureRequest) -> AsyncIterator[MakeBroker]:
    """Makes brokers of the parametrized kind: `make_broker(retain=…, log_ttl=…)`; all closed after the test."""
    if request.param == "redis":
        async with redis_scope() as scope:
            yield scope.broker
        return
    brokers: list[InProcessBroker] = []

    def make(**options: Any) -> Broker:
        brokers.append(InProcessBroker(**options))
        return brokers[-1]

    yield make
    for broker in brokers:
        await broker.close()


@pytest.fixture
def ids() -> tuple[uuid.UUID, uuid.UUID, uuid.UUID]:
    """A fresh (generation, conversation, message) for each test: Redis keys are shared by processes."""
    return uuid.uuid4(), uuid.uuid4(), uuid.uuid4()


def start(g: uuid.UUID, c: uuid.UUID) -> Start:
    return Start(generation_id=g, conversation_id=c, seq=1)


def token(g: uuid.UUID, c: uuid.UUID, seq: int, text: str) -> Token:
    return Token(generation_id=g, conversation_id=c, seq=seq, text=text)


def done(g: uuid.UUID, c: uuid.UUID, m: uuid.UUID, seq: int, tokens: int) -> Done:
    return Done(generation_id=g, conversation_id=c, seq=seq, message_id=m, token_count=tokens)


async def fill(broker: Broker, g: uuid.UUID, c: uuid.UUID, words: list[str]) -> None:
    await broker.open_log(g, c)
    await broker.append(start(g, c))
    for i, word in enumerate(words):
        await broker.append(token(g, c, i + 2, word))


def seqs(events: list[GenerationEvent] | None) -> list[int]:
    assert events is not None
    return [e.seq for e in events]


async def test_name_and_ping(make_broker: MakeBroker) -> None:
    broker = make_broker()
    assert broker.name in {"in-process", "redis"}
    await broker.ping()


async def test_append_read_and_unknown_log(make_broker: MakeBroker, ids: tuple[uuid.UUID, ...]) -> None:
    g, c, _ = ids
    broker = make_broker()
    assert await broker.read(g, 0, 0) is None
    assert await broker.last_seq(g) is None
    await broker.open_log(g, c)
    assert await broker.last_seq(g) == 0
    assert await broker.read(g, 0, 0) == []
    await broker.append(start(g, c))
    assert await broker.read(g, 0, 0) == [start(g, c)]
    assert await broker.last_seq(g) == 1


async def test_read_gives_every_later_event_once(make_broker: MakeBroker, ids: tuple[uuid.UUID, ...]) -> None:
    g, c, m = ids
    broker = make_broker()
    await fill(broker, g, c, ["a", " b", " c"])
    await broker.append(done(g, c, m, 5, 3))
    assert seqs(await broker.read(g, 0, 0)) == [1, 2, 3, 4, 5]
    assert seqs(await broker.read(g, 3, 0)) == [4, 5]
    events = await broker.read(g, 1, None)
    assert events is not None and [e.text for e in events if isinstance(e, Token)] == ["a", " b", " c"]
    # The reader has the whole ended log: nothing to wait for, even without a time limit.
    assert await broker.read(g, 5, None) == []


async def test_seq_must_follow_and_nothing_after_the_end(make_broker: MakeBroker, ids: tuple[uuid.UUID, ...]) -> None:
    g, c, m = ids
    broker = make_broker()
    await fill(broker, g, c, ["a"])
    with pytest.raises(ValueError, match="does not follow"):
        await broker.append(token(g, c, 2, "again"))  # a duplicate
    with pytest.raises(ValueError, match="does not follow"):
        await broker.append(token(g, c, 4, "skipped one"))
    assert seqs(await broker.read(g, 0, 0)) == [1, 2]
    await broker.append(done(g, c, m, 3, 1))
    with pytest.raises(RuntimeError):
        await broker.append(token(g, c, 4, "late"))


async def test_reader_older_than_the_window_gets_a_snapshot(
    make_broker: MakeBroker, ids: tuple[uuid.UUID, ...]
) -> None:
    g, c, m = ids
    broker = make_broker(retain=5)
    words = [f" w{i}" for i in range(20)]
    await fill(broker, g, c, words)
    events = await broker.read(g, 3, 0)
    assert events is not None and len(events) == 1
    text = "".join(words)
    parts = [Part(kind="text", state="streaming", text=text)]
    assert events[0] == Snapshot(generation_id=g, conversation_id=c, seq=21, text=text, parts=parts)
    await broker.append(done(g, c, m, 22, 20))
    events = await broker.read(g, 3, 0)
    assert events is not None
    assert isinstance(events[0], Snapshot) and events[0].seq == 21 and isinstance(events[1], Done)
    # A reader inside the window is not given a snapshot.
    assert seqs(await broker.read(g, 19, 0)) == [20, 21, 22]


async def test_waiting_read_wakes_on_append_and_times_out_when_idle(
    make_broker: MakeBroker, ids: tuple[uuid.UUID, ...]
) -> None:
    g, c, _ = ids
    broker = make_broker()
    await broker.open_log(g, c)
    assert await broker.read(g, 0, 0.05) == []
    waiters = [asyncio.create_task(broker.read(g, 0, None)) for _ in range(20)]
    await broker.append(start(g, c))
    await broker.append(token(g, c, 2, "a"))
    results = await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert all(seqs(r) in ([1], [1, 2]) for r in results)
    # A read gives what the reading loop brought so far (Redis: maybe only seq 1); the next, the rest.
    got = seqs(await broker.read(g, 0, 0))
    if got == [1]:
        got += seqs(await broker.read(g, 1, 5))
    assert got == [1, 2]


async def test_idle_reads_share_one_timer_and_a_patient_read_waits_through_it(
    make_broker: MakeBroker, ids: tuple[uuid.UUID, ...]
) -> None:
    """Many readers waiting with a `max_wait` (they share one timer: the in-process log's, or the
    Redis watch's) each get [] when nothing comes; a reader with no `max_wait` keeps waiting
    through their wake-up and gets the next event."""
    g, c, _ = ids
    broker = make_broker()
    await broker.open_log(g, c)
    await broker.append(start(g, c))
    patient = asyncio.create_task(broker.read(g, 1, None))
    idle = [asyncio.create_task(broker.read(g, 1, 0.05)) for _ in range(20)]
    assert await asyncio.wait_for(asyncio.gather(*idle), 5) == [[]] * 20
    assert not patient.done()
    await broker.append(token(g, c, 2, "a"))
    assert seqs(await asyncio.wait_for(patient, 5)) == [2]


async def test_a_cursor_ahead_of_the_log_waits_for_its_next_event(
    make_broker: MakeBroker, ids: tuple[uuid.UUID, ...]
) -> None:
    g, c, _ = ids
    broker = make_broker()
    await fill(broker, g, c, ["a"])
    waiter = asyncio.create_task(broker.read(g, 3, None))
    await broker.append(token(g, c, 3, "b"))
    await broker.append(token(g, c, 4, "c"))
    assert seqs(await asyncio.wait_for(waiter, 5)) == [4]


async def test_reader_counts(make_broker: MakeBroker, ids: tuple[uuid.UUID, ...]) -> None:
    g, c, _ = ids
    broker = make_broker()
    await broker.open_log(g, c)
    assert await broker.add_reader(g) == 1
    assert await broker.add_reader(g) == 2
    assert await broker.readers(g) == 2
    assert await broker.remove_reader(g) == 1
    assert await broker.remove_reader(g) == 0
    assert await broker.readers(g) == 0
    assert await broker.remove_reader(g) == 0  # never negative
    assert await broker.add_reader(g) == 1


async def test_ended_log_is_kept_then_expires_after_ttl(make_broker: MakeBroker, ids: tuple[uuid.UUID, ...]) -> None:
    g, c, m = ids
    broker = make_broker(log_ttl=0.3)
    await fill(broker, g, c, ["a"])
    await broker.append(done(g, c, m, 3, 1))
    await broker.close_log(g)
    # A reader coming back before the ttl resumes from its cursor.
    assert seqs(await broker.read(g, 1, 0)) == [2, 3]

    async def expired() -> bool:
        return await broker.last_seq(g) is None

    await eventually(expired, what="the ended log expired")
    assert await broker.read(g, 0, 0) is None


async def test_discarded_log_is_gone(make_broker: MakeBroker, ids: tuple[uuid.UUID, ...]) -> None:
    g, c, _ = ids
    broker = make_broker()
    await broker.open_log(g, c)
    await broker.discard_log(g)
    assert await broker.read(g, 0, 0) is None
    assert await broker.last_seq(g) is None


async def test_conversation_feed(make_broker: MakeBroker, ids: tuple[uuid.UUID, ...]) -> None:
    g, c, _ = ids
    broker = make_broker()
    feed = broker.open_feed(c)
    other = broker.open_feed(uuid.uuid4())
    await broker.publish(GenerationStarted(conversation_id=c, generation_id=g))
    await broker.publish(ConversationDeleted(conversation_id=c))
    # Numbered in the conversation as they are published.
    assert await asyncio.wait_for(feed.get(), 5) == GenerationStarted(
        conversation_id=c, generation_id=g, conversation_seq=1
    )
    assert await asyncio.wait_for(feed.get(), 5) == ConversationDeleted(conversation_id=c, conversation_seq=2)
    broker.close_feed(feed)
    await broker.publish(ConversationDeleted(conversation_id=c))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(feed.get(), 0.05)  # closed: nothing more comes
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(other.get(), 0.05)  # another conversation's feed never got any


async def test_a_feed_that_fills_up_overflows_and_a_lost_one_wakes_its_reader(ids: tuple[uuid.UUID, ...]) -> None:
    _, c, _ = ids
    broker = InProcessBroker()
    feed = broker.open_feed(c)
    for _ in range(300):
        await broker.publish(ConversationDeleted(conversation_id=c))
    with pytest.raises(FeedOverflow):
        await feed.get()
    lost = broker.open_feed(c)
    waiter = asyncio.create_task(lost.get())
    await asyncio.sleep(0)  # let it block on the empty feed
    lost.lose()
    with pytest.raises(FeedOverflow):
        await asyncio.wait_for(waiter, 5)


def mixed_answer(g: uuid.UUID, c: uuid.UUID) -> list[GenerationEvent]:
    """An answer whose text is interleaved with part events: reasoning still open while text
    comes, two tool calls open at once with interleaved argument pieces, multi-byte UTF-8
    text right before and after part events, a tool result and data."""
    steps: list[tuple[type[GenerationEvent], dict[str, Any]]] = [
        (PartStart, {"part": 0, "kind": "reasoning"}),
        (PartDelta, {"part": 0, "text": "Thinking ü"}),
        (Token, {"text": "Grüße 🚀"}),  # part 1: text, while the reasoning is open
        (PartDelta, {"part": 0, "text": " about 日本"}),  # the reasoning grows, the text stays open
        (Token, {"text": " aus 日本"}),
        (PartEnd, {"part": 0}),
        (Token, {"text": "é"}),
        (PartStart, {"part": 2, "kind": "tool_call", "name": "search", "tool_call_id": "call_a"}),
        (PartStart, {"part": 3, "kind": "tool_call", "name": "fetch", "tool_call_id": "call_b"}),
        (PartDelta, {"part": 2, "text": '{"q": "ü'}),
        (PartDelta, {"part": 3, "text": '{"url": '}),
        (Token, {"text": "✓"}),  # part 4: text between the calls' pieces
        (PartDelta, {"part": 2, "text": '🚀"}'}),
        (PartEnd, {"part": 2, "value": {"q": "ü🚀"}}),
        (PartStart, {"part": 5, "kind": "tool_result", "name": "search", "tool_call_id": "call_a"}),
        (PartEnd, {"part": 5, "value": {"hits": ["ö", 2]}}),
        (PartStart, {"part": 6, "kind": "data", "name": "stats"}),
        (PartDelta, {"part": 3, "text": '"x"}'}),
        (PartEnd, {"part": 6, "value": {"n": 1}}),
        (Token, {"text": "末尾"}),
    ]
    made = (kind(generation_id=g, conversation_id=c, seq=i + 2, **fields) for i, (kind, fields) in enumerate(steps))
    return [start(g, c), *made]


async def test_snapshot_of_text_interleaved_with_parts_equals_the_in_process_logs(
    make_broker: MakeBroker, ids: tuple[uuid.UUID, ...]
) -> None:
    """Rule: after every event of an answer that mixes text and parts (several open at once,
    multi-byte text around part events), a reader older than the window gets a snapshot
    equal to the in-process log's: every part so far, open ones `streaming`; the snapshot
    and the events after it fold to the whole answer."""
    g, c, m = ids
    broker = make_broker(retain=2)
    reference = GenerationLog(g, c, retain=2)
    events = mixed_answer(g, c)
    await broker.open_log(g, c)
    for event in events:
        await broker.append(event)
        reference.append(event)
        if event.seq < 3:
            continue
        got = await broker.read(g, 0, 0)
        assert got is not None and isinstance(got[0], Snapshot), got
        assert got == reference.read_after(0), event
    assert got is not None
    snapshot = got[0]
    assert isinstance(snapshot, Snapshot) and snapshot.seq == events[-1].seq
    assert snapshot.text == "Grüße 🚀 aus 日本é✓末尾"
    assert snapshot.parts == [
        Part(kind="reasoning", text="Thinking ü about 日本"),
        Part(kind="text", text="Grüße 🚀 aus 日本é"),
        Part(kind="tool_call", name="search", tool_call_id="call_a", text='{"q": "ü🚀"}', value={"q": "ü🚀"}),
        Part(kind="tool_call", state="streaming", name="fetch", tool_call_id="call_b", text='{"url": "x"}'),
        Part(kind="text", text="✓"),
        Part(kind="tool_result", name="search", tool_call_id="call_a", value={"hits": ["ö", 2]}),
        Part(kind="data", name="stats", value={"n": 1}),
        Part(kind="text", state="streaming", text="末尾"),
    ]
    # Within the window: the events themselves, exactly once.
    assert await broker.read(g, events[-2].seq, 0) == events[-1:]
    end = done(g, c, m, events[-1].seq + 1, 9)
    await broker.append(end)
    got = await broker.read(g, 3, 0)
    assert got is not None and got[0] == snapshot and got[1:] == [end]


async def test_a_conversation_replays_what_came_after_a_cursor(make_broker: MakeBroker) -> None:
    """`conversation_since`: the latest `conversationSeq` and the events after `since`, or
    None when some are no longer kept (only `conversation_retain` are) or `since` is ahead."""
    broker = make_broker(conversation_retain=3)
    c, other = uuid.uuid4(), uuid.uuid4()
    assert await broker.conversation_since(c, None) == (0, [])
    assert await broker.conversation_since(c, 0) == (0, [])
    events = [GenerationStarted(conversation_id=c, generation_id=uuid.uuid4()) for _ in range(4)]
    for event in events:
        await broker.publish(event)
    await broker.publish(ConversationDeleted(conversation_id=other))  # its own numbering
    numbered = [msgspec.structs.replace(e, conversation_seq=n) for n, e in enumerate(events, 1)]
    assert await broker.conversation_since(c, None) == (4, [])
    assert await broker.conversation_since(c, 4) == (4, [])
    assert await broker.conversation_since(c, 2) == (4, numbered[2:])
    assert await broker.conversation_since(c, 1) == (4, numbered[1:])  # the oldest kept is seq 2
    assert await broker.conversation_since(c, 0) == (4, None)  # seq 1 is no longer kept: reload
    assert await broker.conversation_since(c, 9) == (4, None)  # ahead: the log was lost (a restart)
    assert await broker.conversation_since(other, 0) == (
        1,
        [ConversationDeleted(conversation_id=other, conversation_seq=1)],
    )
