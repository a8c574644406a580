"""Direct writes (app/streaming/direct.py): a caught-up reader is written to by the producer's
append itself; a reader whose write has to wait falls back to its own task and still gets
every event exactly once, in order, while the others go on being written directly."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable

import pytest

from app.chat.answer_store import ChatAnswerStore
from app.streaming.broker import Broker, InProcessBroker
from app.streaming.core import StreamingCore
from app.streaming.direct import DirectReader, start
from app.streaming.events import Done, GenerationEvent, Start, Token
from app.streaming.policy import StreamPolicy
from tests.redis_support import redis_scope

pytestmark = pytest.mark.anyio

GID, CID = uuid.uuid4(), uuid.uuid4()


def _encode(batch: list[GenerationEvent]) -> bytes:
    return b"".join(b"%d," % event.seq for event in batch)


class Writer(DirectReader):
    """Records each write as a socket would see it; a write waits while `gate` is closed."""

    encoding = _encode

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        super().__init__(_encode)
        self.gate = gate
        self.written: list[int] = []
        self.by_task = 0  # batches its own task wrote (not the producer)
        self.direct = 0  # writes the producer (or Redis's reading loop) started
        self.parked = asyncio.Event()
        self.progress = asyncio.Event()  # set by every write

    async def got(self, seq: int) -> None:
        """Return once event `seq` was written."""
        while not self.written or self.written[-1] < seq:
            self.progress.clear()
            await self.progress.wait()

    async def send(self, data: bytes) -> None:
        self.written.extend(int(seq) for seq in data.decode().split(",") if seq)
        self.progress.set()
        if self.gate is not None:
            await self.gate.wait()

    def start_write(self, data: bytes) -> Awaitable[None] | None:
        self.direct += 1
        return start(self.send(data))

    async def wait(self, max_idle: float | None) -> bool:
        self.parked.set()  # it parks: the producer (or the reading loop) may write to it
        return await super().wait(max_idle)

    async def read(self, core: StreamingCore) -> None:
        """The reader's task: writes only what the producer could not write for it."""
        async for batch in core.follow(GID, 0, None, self):
            self.by_task += 1
            await self.send(_encode(batch))


def _core(broker: Broker) -> StreamingCore:
    # The store is not asked: every log here stays open, and no read waits with a limit.
    return StreamingCore(broker, StreamPolicy(disconnect_grace=60), store=ChatAnswerStore())


def _event(seq: int) -> GenerationEvent:
    if seq == 1:
        return Start(generation_id=GID, conversation_id=CID, seq=1)
    return Token(generation_id=GID, conversation_id=CID, seq=seq, text=f"t{seq}")


def _done(seq: int) -> GenerationEvent:
    return Done(generation_id=GID, conversation_id=CID, seq=seq, message_id=uuid.uuid4(), token_count=seq - 2)


async def _reading(broker: InProcessBroker, *writers: Writer) -> list[asyncio.Task[None]]:
    """Open the log and start each writer's reader task; returns once every one is parked."""
    core = _core(broker)
    await broker.open_log(GID, CID)
    readers = [asyncio.create_task(writer.read(core)) for writer in writers]
    log = broker.log(GID)
    assert log is not None
    for _ in range(20):  # loop turns, not time: each reader's task reaches its first wait
        if len(log._parked) == len(writers):
            return readers
        await asyncio.sleep(0)
    raise AssertionError("the readers did not park")


async def test_start_runs_a_send_that_need_not_wait_here_and_hands_on_one_that_must() -> None:
    ran: list[str] = []

    async def quick() -> None:
        ran.append("quick")

    assert start(quick()) is None and ran == ["quick"]

    gate = asyncio.Event()

    async def slow() -> None:
        ran.append("slow begins")
        await gate.wait()
        ran.append("slow ends")

    rest = start(slow())
    assert rest is not None and ran[-1] == "slow begins"

    async def finish() -> None:
        await rest

    finishing = asyncio.ensure_future(finish())
    await asyncio.sleep(0)
    gate.set()
    await finishing
    assert ran[-1] == "slow ends"


async def test_a_cancel_of_the_task_finishing_a_write_goes_into_the_write() -> None:
    seen: list[str] = []

    async def blocked() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.append("cancelled inside")
            raise

    rest = start(blocked())
    assert rest is not None

    async def finish() -> None:
        await rest

    task = asyncio.ensure_future(finish())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["cancelled inside"]


async def test_a_caught_up_reader_is_written_by_the_append_itself() -> None:
    broker = InProcessBroker()
    writer = Writer()
    [reader] = await _reading(broker, writer)
    for seq in (1, 2, 3):
        await broker.append(_event(seq))  # never yields to the reader's task
        assert writer.written[-1] == seq
    await broker.append(_done(4))
    await reader
    assert writer.written == [1, 2, 3, 4] and writer.by_task == 0


async def test_a_reader_that_lags_gets_every_event_once_while_the_others_are_written_directly() -> None:
    broker = InProcessBroker(retain=1000)
    gate = asyncio.Event()
    fast, slow = Writer(), Writer(gate)
    readers = await _reading(broker, fast, slow)
    for seq in range(1, 61):
        await broker.append(_event(seq))
        if seq == 30:
            gate.set()  # the slow reader's socket drains: it catches up through its task
            gate = asyncio.Event()
            slow.gate = gate  # and then lags again
        if seq % 10 == 0:
            await asyncio.sleep(0)
    gate.set()
    await broker.append(_done(61))
    await asyncio.gather(*readers)
    assert fast.written == list(range(1, 62)) and fast.by_task == 0
    assert slow.written == list(range(1, 62)) and slow.by_task > 0


async def test_a_stopped_reader_is_not_written_to_and_its_follow_ends() -> None:
    broker = InProcessBroker()
    writer = Writer()
    [reader] = await _reading(broker, writer)
    await broker.append(_event(1))
    writer.stop()  # e.g. its key was revoked
    await broker.append(_event(2))
    await reader
    assert writer.written == [1]
    log = broker.log(GID)
    assert log is not None and log._parked == []


async def test_a_reader_that_leaves_while_parked_is_forgotten() -> None:
    broker = InProcessBroker()
    writer = Writer()
    [reader] = await _reading(broker, writer)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    log = broker.log(GID)
    assert log is not None and log._parked == []
    await broker.append(_event(1))
    assert writer.written == []


async def test_through_redis_the_reading_loop_writes_to_caught_up_readers_and_a_lagging_one_misses_nothing() -> None:
    """Process B reads what process A appends: B's reading loop writes each event it reads to
    B's parked readers; one whose write must wait reads for itself and gets every event once."""
    async with redis_scope() as scope:
        producer, reading = scope.broker(), scope.broker()
        core = _core(reading)
        await producer.open_log(GID, CID)
        gate = asyncio.Event()
        fast, slow = Writer(), Writer(gate)
        readers = [asyncio.create_task(writer.read(core)) for writer in (fast, slow)]
        sent = 0
        async with asyncio.timeout(10):
            while not fast.parked.is_set():  # a few events, until B's reading loop has a watch to park on
                sent += 1
                await producer.append(_event(sent))
                await fast.got(sent)
        for seq in range(sent + 1, 61):
            await producer.append(_event(seq))
            if seq == 30:
                gate.set()
                gate = asyncio.Event()
                slow.gate = gate
        gate.set()
        await producer.append(_done(61))
        await asyncio.gather(*readers)
    assert fast.written == list(range(1, 62)) and slow.written == list(range(1, 62))
    assert fast.direct > 0, "the reading loop wrote to the caught-up reader"
