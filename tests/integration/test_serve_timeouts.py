"""`chatstream serve` does not let connections linger before authentication: a client has
`CHATSTREAM_HEADER_TIMEOUT` seconds to send a request's headers and `CHATSTREAM_BODY_TIMEOUT`
to send its body (trickling bytes does not reset either), and past
`CHATSTREAM_MAX_CONNECTIONS` open connections requests get 503. Answers being streamed
and WebSockets have no such timer.

Every test runs on both stacks `chatstream serve` can use (`CHATSTREAM_SERVER_IMPL`): uvloop +
httptools (the default where they are installed) and asyncio + h11 (the fallback); the
startup log names the stack, `auto` falls back where uvloop cannot be imported, and bad
client input logs one line, never a traceback, on either.

Real servers on free ports; raw TCP clients for the misbehaving ones. Every wait is bounded
(DEADLINE): a server that never closes fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import resource
import struct
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from websockets.asyncio.client import connect

from app.server import FAST_STACK_MISSING
from tests.conftest import ROOT
from tests.factories import Tenant
from tests.integration.live_server import CONSOLE_SCRIPT, LiveServer
from tests.integration.wire_api import make_agent, new_conversation

pytestmark = pytest.mark.anyio

TIMEOUT = 0.5  # the header and body timeouts of the `timed` server
DEADLINE = 10 * TIMEOUT + 5  # how long a test waits for the server to act


# CHATSTREAM_SERVER_IMPL values, one per stack, and how each stack's startup line begins.
STACKS = [
    pytest.param("uvloop", marks=pytest.mark.skipif(FAST_STACK_MISSING is not None, reason=str(FAST_STACK_MISSING))),
    "asyncio",
]
STARTUP_LINE = {"uvloop": "Event loop: uvloop ", "asyncio": "Event loop: asyncio, HTTP parser: h11 "}


@pytest.fixture(scope="module", params=STACKS)
def stack(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def timed(stack: str) -> Iterator[LiveServer]:
    with LiveServer(
        {
            "CHATSTREAM_SERVER_IMPL": stack,
            "CHATSTREAM_HEADER_TIMEOUT": str(TIMEOUT),
            "CHATSTREAM_BODY_TIMEOUT": str(TIMEOUT),
        }
    ) as live:
        yield live


def startup_lines(live: LiveServer) -> list[str]:
    return [line for line in live.lines if "Event loop: " in line]


def without_uvloop(tmp_path: Path) -> dict[str, str]:
    """An environment where `import uvloop` fails, as where it cannot be installed: a package
    of that name, first on the path, that raises ImportError."""
    (tmp_path / "uvloop").mkdir()
    (tmp_path / "uvloop" / "__init__.py").write_text('raise ImportError("not installed here", name="uvloop")\n')
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path}


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
            with anyio.fail_after(DEADLINE):
                assert json.loads(await ws.recv())["type"] == "hello"  # the greeting first
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


async def test_partial_requests_cannot_starve_the_server_of_file_descriptors(stack: str) -> None:
    """Under a descriptor limit, more half-sent requests than the server has descriptors:
    the header timeout frees them, and `/healthz` is answered. (asyncio leaves connections
    past the limit in the listen backlog until a descriptor is free; uvloop, as libuv does,
    accepts and closes them at once to shed load, so a check may be refused before it is
    answered.)"""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = 128
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))  # inherited by the server
    try:
        live = LiveServer({"CHATSTREAM_SERVER_IMPL": stack, "CHATSTREAM_HEADER_TIMEOUT": "1"})
        live.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        assert live.proc is not None
        spare = limit - fd_count(live.proc.pid)
        async with contextlib.AsyncExitStack() as held:
            for _ in range(spare + 30):
                _, writer = await held.enter_async_context(raw(live))
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
            # Each check is a new connection.
            async with httpx.AsyncClient(
                base_url=live.url, timeout=DEADLINE, limits=httpx.Limits(max_keepalive_connections=0)
            ) as http:
                deadline = time.monotonic() + DEADLINE
                while True:
                    with contextlib.suppress(httpx.TransportError):  # closed at once (uvloop at the limit)
                        if (await http.get("/healthz")).status_code == 200:
                            break
                    assert time.monotonic() < deadline, "never answered"
                    await asyncio.sleep(0.05)
    finally:
        live.stop()


async def test_requests_past_max_connections_get_503(stack: str) -> None:
    live = LiveServer({"CHATSTREAM_SERVER_IMPL": stack, "CHATSTREAM_MAX_CONNECTIONS": "4"}).start()
    try:
        async with contextlib.AsyncExitStack() as held:
            for _ in range(3):
                await held.enter_async_context(raw(live))
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


# -- the stack ------------------------------------------------------------------------------------------------


async def test_the_startup_log_names_the_stack(timed: LiveServer, stack: str) -> None:
    """One INFO line before "Uvicorn running", naming the loop that runs (read from the
    running loop itself) and the HTTP parser, and the setting that chose them."""
    [line] = startup_lines(timed)
    assert line.startswith("INFO:") and STARTUP_LINE[stack] in line, line
    assert line.rstrip().endswith(f"(CHATSTREAM_SERVER_IMPL={stack})"), line
    if stack == "uvloop":
        assert ", HTTP parser: httptools " in line, line


async def test_auto_runs_uvloop_where_installed_and_asyncio_where_not(tmp_path: Path) -> None:
    """`auto` (the default) picks uvloop + httptools when both import; where uvloop cannot
    be imported the same command serves on asyncio + h11 and says why."""
    servers = [("asyncio", LiveServer({"CHATSTREAM_SERVER_IMPL": "auto", **without_uvloop(tmp_path)}))]
    if FAST_STACK_MISSING is None:
        servers.append(("uvloop", LiveServer({"CHATSTREAM_SERVER_IMPL": "auto"})))
    for expected, live in servers:
        live.start()
        try:
            [line] = startup_lines(live)
            assert STARTUP_LINE[expected] in line, line
            if expected == "asyncio":
                assert "(CHATSTREAM_SERVER_IMPL=auto: uvloop is not installed)" in line, line
            async with httpx.AsyncClient(base_url=live.url, timeout=DEADLINE) as http:
                assert (await http.get("/healthz")).status_code == 200
        finally:
            live.stop()


def test_uvloop_asked_for_where_missing_stops_serve_saying_why(tmp_path: Path) -> None:
    env = {**os.environ, **without_uvloop(tmp_path), "CHATSTREAM_SERVER_IMPL": "uvloop"}
    command = [CONSOLE_SCRIPT, "serve", "--port", "1", "--no-demo", "--no-migrate"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result
    assert "CHATSTREAM_SERVER_IMPL=uvloop, but uvloop is not installed" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """One masked client frame (payload under 126 bytes)."""
    mask = os.urandom(4)
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def output_until(live: LiveServer, needle: str) -> list[str]:
    """The server's lines up to the first holding `needle` (fails after DEADLINE)."""
    with anyio.fail_after(DEADLINE):
        # Polling: the lines come from a thread draining the server's pipe, which sets no event.
        while not any(needle in line for line in live.lines):  # noqa: ASYNC110
            await anyio.sleep(0.02)
    return list(live.lines)


async def test_bad_client_input_logs_one_line_and_no_traceback(timed: LiveServer, acme: Tenant) -> None:
    """A text frame that is not UTF-8, alone or with the client's close frame in the same
    read (where the event loop reports the failed 1007 close), and a broken chunk after a
    request's headers: each is one line at INFO or WARNING, never an ERROR or a traceback."""
    mark = len(timed.lines)
    upgrade = (
        f"GET /api/ws HTTP/1.1\r\nHost: 127.0.0.1:{timed.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: {acme.headers('alice')['Authorization']}\r\n\r\n"
    ).encode()
    bad_text = ws_frame(0x1, b'{"type": "ping", "ref": "\xff"}')
    for tail in (b"", ws_frame(0x8, struct.pack("!H", 1000))):
        async with raw(timed) as (reader, writer):
            writer.write(upgrade)
            with anyio.fail_after(DEADLINE):
                assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
            writer.write(bad_text + tail)
            await closed_by_server(reader)
    async with raw(timed) as (reader, writer):
        writer.write(b"POST /api/conversations HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n")
        assert (await closed_by_server(reader)).startswith(b"HTTP/1.1 400 ")
    # A later request's log line (it names its request id): everything the bad input made the
    # server log is before it.
    barrier = f"barrier-{uuid.uuid4().hex}"
    async with httpx.AsyncClient(base_url=timed.url, timeout=DEADLINE) as http:
        assert (await http.get("/healthz", headers={"X-Request-ID": barrier})).status_code == 200
    output = (await output_until(timed, barrier))[mark:]
    bad = [line for line in output if "Traceback" in line or "ERROR" in line]
    assert not bad, "".join(output)
    assert sum("Invalid UTF-8 sequence received from client." in line for line in output) >= 2, "".join(output)
    assert sum("Invalid HTTP request received." in line for line in output) == 1, "".join(output)
