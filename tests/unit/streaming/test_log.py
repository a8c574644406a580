"""The generation log: ordered appends, reads after a cursor, snapshots, bounded memory."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from app.streaming.events import Done, Snapshot, Start, Token
from app.streaming.log import GenerationLog

pytestmark = pytest.mark.anyio

G, C, M = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()


def filled(words: list[str], retain: int = 1000, done: bool = True) -> GenerationLog:
    log = GenerationLog(G, C, retain=retain)
    log.append(Start(generation_id=G, conversation_id=C, seq=1))
    for i, word in enumerate(words):
        log.append(Token(generation_id=G, conversation_id=C, seq=i + 2, text=word))
    if done:
        log.append(Done(generation_id=G, conversation_id=C, seq=len(words) + 2, message_id=M, token_count=len(words)))
    return log


def test_seq_must_follow_and_nothing_after_the_end() -> None:
    log = GenerationLog(G, C)
    with pytest.raises(ValueError, match="does not follow"):
        log.append(Token(generation_id=G, conversation_id=C, seq=2, text="x"))
    log = filled(["a"])
    assert log.closed
    with pytest.raises(RuntimeError):
        log.append(Token(generation_id=G, conversation_id=C, seq=4, text="x"))


def test_read_after_gives_every_later_event_once() -> None:
    log = filled(["a", " b", " c"])
    assert [e.seq for e in log.read_after(0)] == [1, 2, 3, 4, 5]
    assert [e.seq for e in log.read_after(3)] == [4, 5]
    assert log.read_after(5) == [] and log.read_after(99) == []
    assert log.text == "a b c"


def test_reader_older_than_the_window_gets_a_snapshot_then_the_rest() -> None:
    words = [f" w{i}" for i in range(20)]
    log = filled(words, retain=5, done=False)
    events = log.read_after(3)
    assert isinstance(events[0], Snapshot)
    assert events[0].seq == log.last_seq and events[0].text == "".join(words)
    assert events[1:] == []
    log.append(Done(generation_id=G, conversation_id=C, seq=log.last_seq + 1, message_id=M, token_count=20))
    events = log.read_after(3)
    assert isinstance(events[0], Snapshot) and isinstance(events[1], Done)
    # A reader inside the window is not given a snapshot.
    assert not any(isinstance(e, Snapshot) for e in log.read_after(log.last_seq - 3))


def test_memory_is_bounded_by_retain_whatever_the_readers_do() -> None:
    log = filled([" x"] * 10_000, retain=100)
    assert len(log._events) == 100


async def test_wait_after_wakes_on_append_and_times_out_when_idle() -> None:
    log = GenerationLog(G, C)
    waiter = asyncio.create_task(log.wait_after(0, max_wait=None))
    await asyncio.sleep(0)  # let the waiter block
    assert not waiter.done()
    log.append(Start(generation_id=G, conversation_id=C, seq=1))
    assert [e.seq for e in await waiter] == [1]
    assert await log.wait_after(1, max_wait=0.01) == []  # nothing comes: [] after the wait


async def test_many_waiters_all_wake_with_a_backlog_in_one_batch() -> None:
    log = GenerationLog(G, C)
    waiters = [asyncio.create_task(log.wait_after(0, max_wait=None)) for _ in range(50)]
    await asyncio.sleep(0)
    log.append(Start(generation_id=G, conversation_id=C, seq=1))
    log.append(Token(generation_id=G, conversation_id=C, seq=2, text="a"))
    results = await asyncio.gather(*waiters)
    assert all([e.seq for e in r] in ([1], [1, 2]) for r in results)
    assert [e.seq for e in log.read_after(0)] == [1, 2]  # what a waiter gets after being woken late


async def test_idle_waits_share_one_timer_and_never_outlast_max_wait() -> None:
    """However many readers wait, the log holds at most one timer; it ends every idle wait
    (each gets []) no later than its own `max_wait`, and a reader with no `max_wait` keeps
    waiting through it until an event comes."""
    log = GenerationLog(G, C)
    patient = asyncio.create_task(log.wait_after(0, max_wait=None))
    idle = [asyncio.create_task(log.wait_after(0, max_wait=0.05)) for _ in range(20)]
    await asyncio.sleep(0)
    assert log._idle_timer is not None  # one, for all of them
    quick = asyncio.create_task(log.wait_after(0, max_wait=0.01))  # a shorter wait moves it earlier
    assert await quick == []
    await asyncio.sleep(0)
    assert all(task.done() for task in idle)  # woken by the same timer, early rather than late
    assert await asyncio.gather(*idle) == [[]] * 20
    assert not patient.done()
    log.append(Start(generation_id=G, conversation_id=C, seq=1))
    assert [e.seq for e in await patient] == [1]
    log.append(Done(generation_id=G, conversation_id=C, seq=2, message_id=G, token_count=0))
    assert log._idle_timer is None  # an ended log keeps no timer


async def test_a_reader_that_leaves_while_waiting_leaves_nothing_behind() -> None:
    """A waiting reader cancelled (its client left) is forgotten at once, and the next
    append still wakes the readers that stayed."""
    log = GenerationLog(G, C)
    leaving = [asyncio.create_task(log.wait_after(0)) for _ in range(3)]
    staying = asyncio.create_task(log.wait_after(0))
    await asyncio.sleep(0)
    for task in leaving:
        task.cancel()
    await asyncio.gather(*leaving, return_exceptions=True)
    assert len(log._wakeup) == 1
    log.append(Start(generation_id=G, conversation_id=C, seq=1))
    assert [e.seq for e in await staying] == [1]
    assert len(log._wakeup) == 0
