"""The in-process broker: logs by generation, reader counts, expiry of ended logs."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from app.streaming.broker import InProcessBroker
from app.streaming.events import Done, Start

pytestmark = pytest.mark.anyio

G, C, M = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()


async def test_append_read_and_unknown_log() -> None:
    broker = InProcessBroker()
    assert await broker.read(G, 0, 0) is None
    await broker.open_log(G, C)
    await broker.append(Start(generation_id=G, conversation_id=C, seq=1))
    assert [e.seq for e in await broker.read(G, 0, 0) or []] == [1]


async def test_reader_counts() -> None:
    broker = InProcessBroker()
    assert await broker.add_reader(G) == 1
    assert await broker.add_reader(G) == 2
    assert await broker.remove_reader(G) == 1
    assert await broker.remove_reader(G) == 0
    assert await broker.readers(G) == 0
    assert await broker.remove_reader(G) == 0  # never negative


async def test_ended_log_expires_after_ttl() -> None:
    broker = InProcessBroker(log_ttl=0)
    await broker.open_log(G, C)
    await broker.append(Start(generation_id=G, conversation_id=C, seq=1))
    await broker.append(Done(generation_id=G, conversation_id=C, seq=2, message_id=M, token_count=0))
    await broker.close_log(G)
    for _ in range(10):  # call_later(0) runs within the next loop iterations
        if broker.log(G) is None:
            break
        await asyncio.sleep(0)
    assert await broker.read(G, 0, 0) is None
    await broker.close()
