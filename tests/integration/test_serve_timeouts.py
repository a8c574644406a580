"""`chatstream serve` does not let connections linger before authentication: a client has
`CHATSTREAM_HEADER_TIMEOUT` seconds to send a request's headers and `CHATSTREAM_BODY_TIMEOUT`
to send its body (trickling bytes does not reset either), and past
`CHATSTREAM_MAX_CONNECTIONS` open connections requests get 503. Answers being streamed
and WebSockets have no such timer.

Real servers on free ports; raw TCP clients for the misbehaving ones. Every wait is bounded
(DEADLINE): a server that never closes fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from websockets.asyncio.client import connect

from tests.factories import Tenant
from tests.integration.live_server import LiveServer
from tests.integration.wire_api import make_agent, new_conversation

pytestmark = pytest.mark.anyio

TIMEOUT = 0.5  # the header and body timeouts of the `timed` server
DEADLINE = 10 * TIMEOUT + 5  # how long a test waits for the server to act


@pytest.fixture(scope="module")
def timed() -> Iterator[LiveServer]:
    live = LiveServer({"CHATSTREAM_HEADER_TIMEOUT": str(TIMEOUT), "CHATSTREAM_BODY_TIMEOUT": str(TIMEOUT)}).start()
    try:
        yield live
    finally:
        live.stop()


@contextlib.asynccontextmanager
async def raw(live: LiveServer) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sent until it closed the connection (fails after DEADLINE)."""
    with anyio.fail_after(DEADLINE):
        return await reader.read()


async def test_half_a_request_line_is_closed_after_the_header_timeout(timed: LiveServer) -> None:
    async with raw(timed) as (reader, writer):
        started = time.monotonic()
        writer.write(b"GET /heal")
        await writer.drain()
        assert await closed_by_server(reader) == b""
        assert time.monotonic() - started >= TIMEOUT * 0.9  # not refused at once: the timer ran


async def test_trickling_headers_do_not_reset_the_timer(timed: LiveServer) -> None:
    async with raw(timed) as (reader, writer):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")

        async def trickle() -> None:
            with contextlib.suppress(OSError):
                while True:  # a byte every tenth of the timeout, never finishing the headers
                    writer.write(b"X")
                    await writer.drain()
                    await asyncio.sleep(TIMEOUT / 10)

        async with anyio.create_task_group() as group:
            group.start_soon(trickle)
            assert await closed_by_server(reader) == b""
            group.cancel_scope.cancel()


async def test_a_trickling_body_is_closed_after_the_body_timeout(timed: LiveServer, acme: Tenant) -> None:
    head = (
        "POST /api/conversations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: {acme.headers('alice')['Authorization']}\r\nContent-Length: 100\r\n\r\n"
    )
    async with raw(timed) as (reader, writer):
        writer.write(head.encode() + b'{"title": ')  # 10 of the 100 bytes announced
        await writer.drain()
        assert await closed_by_server(reader) == b""
    lines = timed.output()
    assert "Traceback" not in lines and " ERROR " not in lines, lines


async def test_keep_alive_requests_and_long_responses_are_not_cut(timed: LiveServer, acme: Tenant) -> None:
    """The timers cover reading a request only: several requests on one connection, an SSE
    answer and a WebSocket each outlive the timeouts many times over."""
    async with httpx.AsyncClient(base_url=timed.url, timeout=DEADLINE) as http:
        agent = await make_agent(acme, TIMEOUT / 2)
        cid = await new_conversation(http, acme, agent)
        body = {"content": " ".join(["word"] * 12), "reply": False}
        r = await http.post(f"/api/conversations/{cid}/messages", json=body, headers=acme.headers("alice"))
        assert r.status_code == 201, r.text
        # The stream starts the answer: 12 words at TIMEOUT / 2 each take 6 timeouts.
        started = time.monotonic()
        async with http.stream("GET", f"/api/conversations/{cid}/stream", headers=acme.headers("alice")) as stream:
            text = (await stream.aread()).decode()
        assert "event: done" in text and time.monotonic() - started > 3 * TIMEOUT

        url = timed.url.replace("http://", "ws://", 1) + "/api/ws"
        async with connect(url, additional_headers=acme.headers("alice")) as ws:
            until = time.monotonic() + 3 * TIMEOUT
            while time.monotonic() < until:  # keep the socket busy across several timeouts
                await ws.send(json.dumps({"type": "ping", "ref": "p"}))
                with anyio.fail_after(DEADLINE):
                    assert json.loads(await ws.recv())["type"] == "pong"
                await asyncio.sleep(TIMEOUT / 5)
            await ws.send(json.dumps({"type": "ping", "ref": "p"}))
            with anyio.fail_after(DEADLINE):
                assert json.loads(await ws.recv())["type"] == "pong"


async def test_healthz_answers_while_many_connections_trickle(timed: LiveServer) -> None:
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(50):
            _, writer = await stack.enter_async_context(raw(timed))
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
        async with httpx.AsyncClient(base_url=timed.url, timeout=DEADLINE) as http:
            assert (await http.get("/healthz")).status_code == 200


def fd_count(pid: int) -> int:
    return len(os.listdir(Path("/proc") / str(pid) / "fd"))


async def test_partial_requests_cannot_starve_the_server_of_file_descriptors() -> None:
    """Under a descriptor limit, more half-sent requests than the server has descriptors:
    the header timeout frees them, and `/healthz` is answered."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = 128
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))  # inherited by the server
    try:
        live = LiveServer({"CHATSTREAM_HEADER_TIMEOUT": "1"})
        live.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        assert live.proc is not None
        spare = limit - fd_count(live.proc.pid)
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(spare + 30):
                _, writer = await stack.enter_async_context(raw(live))
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
            async with httpx.AsyncClient(base_url=live.url, timeout=DEADLINE) as http:
                assert (await http.get("/healthz")).status_code == 200
    finally:
        live.stop()


async def test_requests_past_max_connections_get_503() -> None:
    live = LiveServer({"CHATSTREAM_MAX_CONNECTIONS": "4"}).start()
    try:
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(3):
                await stack.enter_async_context(raw(live))
            # Each check is a new connection; uvicorn counts the others once it has accepted them.
            async with httpx.AsyncClient(
                base_url=live.url, timeout=DEADLINE, limits=httpx.Limits(max_keepalive_connections=0)
            ) as http:
                deadline = time.monotonic() + DEADLINE
                while (r := await http.get("/healthz")).status_code != 503:
                    assert time.monotonic() < deadline, "never refused"
                    await asyncio.sleep(0.05)
                assert r.headers["connection"] == "close"
        # The idle connections closed: served again.
        async with httpx.AsyncClient(base_url=live.url, timeout=DEADLINE) as http:
            deadline = time.monotonic() + DEADLINE
            while (await http.get("/healthz")).status_code != 200:
                assert time.monotonic() < deadline, "still refused"
                await asyncio.sleep(0.05)
    finally:
        live.stop()
