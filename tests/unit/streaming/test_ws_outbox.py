"""The WebSocket session's outbox (app/streaming/ws.py): frames go out in order; the task that
sends them runs only while the outbox has frames (an idle socket holds none); a peer that
keeps the outbox full for `ws_send_timeout` is closed as too slow."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

from app.streaming.protocol import Pong
from app.streaming.ws import CLOSE_TRY_AGAIN_LATER, OUTBOX_BATCHES, Codec, Session

pytestmark = pytest.mark.anyio


class Socket:
    """Records each frame's `ref`; a send waits while `gate` is closed."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.refs: list[str] = []

    async def send(self, message: dict[str, Any]) -> None:
        await self.gate.wait()
        self.refs.append(msgspec.json.decode(message["text"])["ref"])


def session_on(socket: Socket, send_timeout: float = 30.0) -> Session:
    settings: Any = SimpleNamespace(ws_send_timeout=send_timeout)
    return Session(socket, principal=None, core=None, codec=Codec(msgpack=False), settings=settings)  # type: ignore[arg-type]


async def drained(session: Session) -> None:
    while session.draining is not None:
        await session.draining


async def test_an_idle_session_holds_no_sending_task() -> None:
    socket = Socket()
    session = session_on(socket)
    assert session.draining is None
    await session.deliver([Pong(ref="1"), Pong(ref="2")])
    assert session.draining is not None  # started by the frames, ends with them
    await drained(session)
    assert socket.refs == ["1", "2"]
    assert session.draining is None and not session.outbox and session.sending == 0


async def test_frames_queued_behind_a_slow_send_go_out_in_order() -> None:
    socket = Socket()
    session = session_on(socket)
    socket.gate.clear()
    await session.deliver([Pong(ref="a")])
    await asyncio.sleep(0)  # the sending task takes "a" and waits in the socket's send
    assert session.sending == 1
    for ref in "bcd":
        await session.deliver([Pong(ref=ref)])
    socket.gate.set()
    await drained(session)
    assert socket.refs == ["a", "b", "c", "d"]
    await session.deliver([Pong(ref="e")])  # a new sending task for the next frame
    await drained(session)
    assert socket.refs[-1] == "e"


async def test_a_full_outbox_waits_for_room() -> None:
    socket = Socket()
    session = session_on(socket)
    socket.gate.clear()
    await session.deliver([Pong(ref="0")])
    await asyncio.sleep(0)  # "0" is being sent: the outbox is empty again
    for i in range(1, OUTBOX_BATCHES + 1):
        await session.deliver([Pong(ref=str(i))])
    late = asyncio.create_task(session.deliver([Pong(ref="late")]))
    await asyncio.sleep(0)
    assert not late.done()  # waits for room
    socket.gate.set()
    await late
    await drained(session)
    assert socket.refs == [str(i) for i in range(OUTBOX_BATCHES + 1)] + ["late"]
    assert not session.closing.done()


async def test_a_peer_that_keeps_the_outbox_full_is_too_slow() -> None:
    socket = Socket()
    session = session_on(socket, send_timeout=0.05)
    socket.gate.clear()
    for i in range(OUTBOX_BATCHES + 1):
        await session.deliver([Pong(ref=str(i))])
    with pytest.raises(asyncio.CancelledError):
        await session.deliver([Pong(ref="late")])
    closing = session.closing.result()
    assert (closing.code, closing.reason) == (CLOSE_TRY_AGAIN_LATER, "too slow")
    sending = session.draining
    assert sending is not None
    sending.cancel()
    await asyncio.gather(sending, return_exceptions=True)
