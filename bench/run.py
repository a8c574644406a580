"""The chatstream benchmark: `python -m bench.run [options]` from the repository root.

Starts its servers on 127.0.0.1, each in its own process so that CPU is attributable:
`chatstream serve --no-demo --no-migrate` on a fresh database (a SQLite file in a temporary
directory, or a temporary PostgreSQL database with `--database-url`) and the bare peers
of bench/peers.py under the same uvicorn options. Then, for each scenario (`llm`: the
echo agent paced at `--pace-ms`; `burst`: pace 0) and each transport, N concurrent
streams each receive one answer of T tokens:

- `sse`: its own httpx client: POST /api/conversations/{id}/messages (the answer
  starts), then GET …/stream?after=<generationId>.0, read as a stream;
- `ws`: its own socket on /api/ws (`websockets` client): `subscribe`, its ack, `send`;
- `peer-sse`, `peer-ws`: the same answers from the bare peers (GET /sse, /ws);
- `redis-sse`, `redis-ws` (with `--redis-url`): scale-out through Redis. Two more
  `chatstream serve` processes on the same database, Redis and key prefix: the message is
  POSTed to A (which produces the answer) and the answer read from B, over SSE
  (GET …/stream?after=<generationId>.0) or over a socket on B subscribed before the POST.

Every stream has its own conversation (one conversation runs one answer at a time),
created before the measured window. Figures per run: delivered tokens per second;
inter-token latency p50/p99 (gaps between consecutive tokens as the client sees them,
also as multiples of the pace); time to first token p50/p99, from the request that asks
for the answer (the POST, the `send` frame, the peer's GET or frame; an HTTP request
includes its TCP connect) to the first token; server CPU seconds per 1,000 delivered
tokens (utime+stime of the server process from /proc/<pid>/stat, before and after the
run) and, for each chatstream transport, its ratio to the bare peer's. With PostgreSQL
the CPU of the database backends serving chatstream's pool is reported beside it (on
SQLite that work is inside the server process); each server names its connections
(`application_name`), so that backends are attributed to the right one. A scale-out run
reports A's, B's and Redis's CPU (Redis's pid from INFO) and the sum of everything
server-side, as a ratio to the in-process run of the same transport (`sse`, `ws`). The
load generator is this process, one asyncio event loop; its CPU, and the servers', are
sampled every 0.25 s so that a saturated client (or server) shows as a peak near 1 core.

Scenario `idle` (`--scenarios idle`, not in the default set: it is slow) measures memory
instead: for each of `sse`, `peer-sse`, `ws`, `peer-ws`, a fresh server process (after a
small unmeasured round) gets N connections at once (opened `--open-concurrency` at a time),
each following one answer that is paused (the echo agent, or the peer, at a pace of 60 s:
`start` at once, then a token a minute). Once every stream has its `start`, and the server
was left alone for `--idle-settle` s, its VmRSS (and VmHWM) from /proc/<pid>/status are
compared with the reading before the first connection: KiB per open stream, and for
chatstream its ratio to the bare peer's. Then everything closes, and the run checks that the
server still answers /healthz, that chatstream's paused answers were cancelled by their
disconnect grace (1 s), and that the server stops cleanly.

Everything is bounded: every stream has a timeout, servers are stopped at the end (and
die with this process if it is killed), temporary files and databases are removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
from websockets.asyncio.client import ClientConnection, connect

from bench.peers import token_words, tokens_of

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("llm", "burst")  # the default
IDLE = "idle"
ALL_SCENARIOS = (*SCENARIOS, IDLE)
TRANSPORTS = ("sse", "peer-sse", "redis-sse", "ws", "peer-ws", "redis-ws")  # in the order they run
DEFAULT_TRANSPORTS = ("sse", "peer-sse", "ws", "peer-ws")
SCALEOUT_TRANSPORTS = ("sse", "redis-sse", "ws", "redis-ws")  # the default with --redis-url
PEER_OF = {"sse": "peer-sse", "ws": "peer-ws"}
# A scale-out transport and the in-process one it is compared with.
IN_PROCESS_OF = {"redis-sse": "sse", "redis-ws": "ws"}
CHATSTREAM_TRANSPORTS = frozenset({"sse", "ws", *IN_PROCESS_OF})
MAX_STREAMS = 1000
# The `idle` scenario: the transports it runs, how many streams it may hold, and its answers:
# the echo adapter's (and the peers') longest pace, so an answer sends `start`, then waits a
# minute before each of its few words (it would end after 20 minutes); closing a stream
# cancels chatstream's after a 1 s grace. Its chatstream ratios have a target (issue #16).
IDLE_TRANSPORTS = ("sse", "peer-sse", "ws", "peer-ws")
MAX_IDLE_STREAMS = 100_000
IDLE_PACE = 60.0
IDLE_TOKENS = 20
IDLE_GRACE = 1.0
IDLE_TARGET_RATIO = 1.5
# File descriptors a process needs besides its streams' sockets (database pool, logs, listeners…).
FD_MARGIN = 1024
STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
# A client using more than this share of a core is reported as a possible bottleneck.
CLIENT_SATURATED = 0.9
SSE_ACCEPT = {"Accept": "text/event-stream"}
_TLS_CONTEXT = ssl.create_default_context()  # never used (plain HTTP) but httpx wants one
_LOGGED_ERROR = re.compile(r"\bERROR\b|^Traceback")
# Each server's PostgreSQL connections carry application_name = this + its role.
APP_NAME_PREFIX = "chatstream-bench-"


class BenchError(Exception):
    """The benchmark cannot go on (a server did not start, setup failed)."""


class StreamFailed(Exception):
    """One stream did not receive its whole answer."""


# -- what one stream sees -------------------------------------------------------------------


class WireEvent(msgspec.Struct):
    """The fields of a chatstream (or peer) event or frame the client looks at; the rest is ignored."""

    type: str
    text: str | None = None
    code: str | None = None
    reason: str | None = None
    ref: str | None = None


_wire = msgspec.json.Decoder(WireEvent)


@dataclass
class Recorder:
    """Timestamps of one stream: when it asked for the answer, when each token arrived."""

    expected: list[str]
    asked: float | None = None
    first: float | None = None
    last: float | None = None
    gaps: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    ok: bool = False
    error: str | None = None

    def ask(self) -> None:
        """The client is about to send the request that starts the answer."""
        self.asked = time.perf_counter()

    def handle(self, event: WireEvent, now: float) -> bool:
        """Record an event received at `now`; True after the terminal event."""
        kind = event.type
        if kind == "token":
            if self.last is None:
                self.first = now
            else:
                self.gaps.append(now - self.last)
            self.last = now
            self.texts.append(event.text or "")
            return False
        if kind == "done":
            if self.texts != self.expected:
                got = "".join(self.texts)
                raise StreamFailed(f"done after {len(self.texts)} of {len(self.expected)} tokens: {got[:60]!r}…")
            self.ok = True
            return True
        if kind in ("cancelled", "error", "snapshot"):
            raise StreamFailed(f"{kind}: {event.code or event.reason or ''}".strip())
        return False  # start, ack, message.created, …

    @property
    def ttft(self) -> float | None:
        """Seconds from asking to the first token."""
        if self.asked is None or self.first is None:
            return None
        return self.first - self.asked


class SSEParser:
    """Splits a byte stream into SSE messages, yielding (event, data) for those with data."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[tuple[str, bytes]]:
        """The complete messages that `chunk` finishes."""
        self._buffer += chunk
        *frames, self._buffer = self._buffer.split(b"\n\n")
        messages: list[tuple[str, bytes]] = []
        for frame in frames:
            event = "message"
            data: list[bytes] = []
            for line in frame.split(b"\n"):
                if line.startswith(b"data:"):
                    data.append(line[6:] if line.startswith(b"data: ") else line[5:])
                elif line.startswith(b"event:"):
                    event = line[6:].strip().decode()
            if data:
                messages.append((event, b"\n".join(data)))
        return messages


async def read_sse(response: httpx.Response, recorder: Recorder) -> None:
    """Feed an SSE response to the recorder until the terminal event."""
    parser = SSEParser()
    async for chunk in response.aiter_raw():
        now = time.perf_counter()
        for event, data in parser.feed(chunk):
            if event == "unavailable":  # the server lost its broker: `data` is not an event (it has no `type`)
                raise StreamFailed(f"unavailable: {msgspec.json.decode(data).get('code', '')}")
            if recorder.handle(_wire.decode(data), now):
                return
    raise StreamFailed(f"the stream ended after {len(recorder.texts)} tokens without a terminal event")


async def read_ws(ws: ClientConnection, recorder: Recorder) -> None:
    """Feed a socket's frames to the recorder until the terminal event."""
    async for frame in ws:
        now = time.perf_counter()
        if recorder.handle(_wire.decode(frame), now):
            return
    raise StreamFailed(f"the socket closed after {len(recorder.texts)} tokens without a terminal event")


# -- the four transports ----------------------------------------------------------------------


@dataclass
class Target:
    """What a stream needs to reach its server."""

    base_url: str
    token: str | None = None  # chatstream API key
    tokens: int = 0
    pace: float = 0.0
    ws_deflate: bool = True

    timeout: float = 60.0

    @property
    def ws_url(self) -> str:
        return "ws" + self.base_url.removeprefix("http")

    def http_client(self, *, hold: bool = False) -> httpx.AsyncClient:
        """A client of its own for one stream, like a browser tab. (One shared client with
        hundreds of connections would measure httpcore's pool, whose bookkeeping is
        quadratic in its connections, rather than the server.) `hold`: no read timeout, for
        a stream that may stay silent for minutes (a paused answer of the peer sends nothing)."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        return httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(self.timeout, read=None) if hold else self.timeout,
            limits=httpx.Limits(max_connections=1),
            verify=_TLS_CONTEXT,  # shared: building one per client costs ~15 ms of CPU each
            trust_env=False,
        )

    def ws_options(self) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        return {
            "additional_headers": headers,
            "compression": "deflate" if self.ws_deflate else None,
            "open_timeout": 60,
            "max_size": None,
        }


async def post_message(
    client: httpx.AsyncClient, tokens: int, conversation: str, disconnect_grace: float | None = None
) -> str:
    """POST the message (the answer starts where it is posted); the answer's generation id."""
    body: dict[str, Any] = {"content": token_words(tokens), "clientMessageId": uuid.uuid4().hex}
    if disconnect_grace is not None:
        body["disconnectGrace"] = disconnect_grace
    posted = await client.post(f"/api/conversations/{conversation}/messages", json=body)
    if posted.status_code != 201:
        raise StreamFailed(f"POST message: {posted.status_code} {posted.text[:200]}")
    generation = posted.json()["generation"]
    if generation is None:
        raise StreamFailed("POST message started no answer")
    return str(generation["id"])


async def read_stream(client: httpx.AsyncClient, conversation: str, generation: str, rec: Recorder) -> None:
    """GET …/stream from the answer's first event, until its end. Without a cursor, an answer
    that ended before this GET arrives is not found (204), which happens at pace 0."""
    url = f"/api/conversations/{conversation}/stream?after={generation}.0"
    async with client.stream("GET", url, headers=SSE_ACCEPT) as response:
        if response.status_code != 200:
            await response.aread()
            raise StreamFailed(f"GET stream: {response.status_code} {response.text[:200]}")
        await read_sse(response, rec)


async def subscribe(ws: ClientConnection, conversation: str) -> None:
    """Send `subscribe` and wait for its ack."""
    await ws.send(msgspec.json.encode({"type": "subscribe", "conversationId": conversation, "ref": "sub"}).decode())
    async for frame in ws:
        event = _wire.decode(frame)
        if event.type == "ack" and event.ref == "sub":
            return
        if event.type == "error":
            raise StreamFailed(f"subscribe: {event.code}")


async def chatstream_sse(target: Target, conversation: str, rec: Recorder) -> None:
    """POST the message (the answer starts), then read GET …/stream from the answer's start."""
    async with target.http_client() as client:
        rec.ask()
        generation = await post_message(client, target.tokens, conversation)
        await read_stream(client, conversation, generation, rec)


def send_frame(conversation: str, tokens: int, **extra: Any) -> str:
    """The `send` frame of a message of `tokens` words (its answer has `tokens` tokens)."""
    send = {
        "type": "send",
        "conversationId": conversation,
        "content": token_words(tokens),
        "clientMessageId": uuid.uuid4().hex,
        **extra,
        "ref": "send",
    }
    return msgspec.json.encode(send).decode()


async def chatstream_ws(target: Target, conversation: str, rec: Recorder) -> None:
    """One socket: `subscribe`, wait for its ack, `send`, read until `done`."""
    async with connect(f"{target.ws_url}/api/ws", **target.ws_options()) as ws:
        await subscribe(ws, conversation)
        rec.ask()
        await ws.send(send_frame(conversation, target.tokens))
        await read_ws(ws, rec)


async def post_to(producer: Target, conversation: str) -> str:
    """POST the message to the producing server A (its own client, closed after); the generation id."""
    async with producer.http_client() as client:
        return await post_message(client, producer.tokens, conversation)


async def scaleout_sse(producer: Target, reader: Target, conversation: str, rec: Recorder) -> None:
    """POST the message to A (it produces the answer), then read GET …/stream from its start on B."""
    async with reader.http_client() as client:
        rec.ask()
        generation = await post_to(producer, conversation)
        await read_stream(client, conversation, generation, rec)


async def scaleout_ws(producer: Target, reader: Target, conversation: str, rec: Recorder) -> None:
    """A socket on B: `subscribe`, its ack; then POST the message to A; read B's frames until `done`."""
    async with connect(f"{reader.ws_url}/api/ws", **reader.ws_options()) as ws:
        await subscribe(ws, conversation)
        rec.ask()
        await post_to(producer, conversation)
        await read_ws(ws, rec)


async def peer_sse(target: Target, rec: Recorder) -> None:
    """GET /sse?tokens=T&pace=P on the bare peer."""
    params = {"tokens": target.tokens, "pace": target.pace}
    async with target.http_client() as client:
        rec.ask()
        async with client.stream("GET", "/sse", params=params, headers=SSE_ACCEPT) as response:
            if response.status_code != 200:
                await response.aread()
                raise StreamFailed(f"GET /sse: {response.status_code} {response.text[:200]}")
            await read_sse(response, rec)


async def peer_ws(target: Target, rec: Recorder) -> None:
    """One socket on the bare peer: one `{"tokens", "pace"}` frame, read until `done`."""
    async with connect(f"{target.ws_url}/ws", **target.ws_options()) as ws:
        rec.ask()
        await ws.send(msgspec.json.encode({"tokens": target.tokens, "pace": target.pace}).decode())
        await read_ws(ws, rec)


# -- idle: streams held open on paused answers --------------------------------------------------

TERMINAL_EVENTS = frozenset({"done", "cancelled", "error", "snapshot"})
# What opens one idle stream: enters its connection into the stack, returns its events.
IdleOpener = Callable[[contextlib.AsyncExitStack], Awaitable[AsyncGenerator[WireEvent]]]


async def sse_events(response: httpx.Response) -> AsyncGenerator[WireEvent]:
    """The events of an SSE response, as they arrive."""
    parser = SSEParser()
    async for chunk in response.aiter_raw():
        for event, data in parser.feed(chunk):
            if event == "unavailable":
                raise StreamFailed(f"unavailable: {msgspec.json.decode(data).get('code', '')}")
            yield _wire.decode(data)


async def ws_events(ws: ClientConnection) -> AsyncGenerator[WireEvent]:
    """The frames of a socket, as they arrive."""
    async for frame in ws:
        yield _wire.decode(frame)


async def _checked(response: httpx.Response, what: str) -> httpx.Response:
    if response.status_code != 200:
        await response.aread()
        raise StreamFailed(f"{what}: {response.status_code} {response.text[:200]}")
    return response


def idle_ws_options(target: Target) -> dict[str, Any]:
    """A browser's socket: it answers the server's pings and sends none of its own."""
    return {**target.ws_options(), "ping_interval": None}


async def open_idle_sse(
    stack: contextlib.AsyncExitStack, target: Target, conversation: str
) -> AsyncGenerator[WireEvent]:
    """One connection: POST the message (its answer may wait IDLE_GRACE s for a reader that
    left), then GET …/stream?after=<generationId>.0 on the same connection."""
    client = await stack.enter_async_context(target.http_client(hold=True))
    generation = await post_message(client, target.tokens, conversation, disconnect_grace=IDLE_GRACE)
    url = f"/api/conversations/{conversation}/stream?after={generation}.0"
    response = await stack.enter_async_context(client.stream("GET", url, headers=SSE_ACCEPT))
    return sse_events(await _checked(response, "GET stream"))


async def open_idle_ws(
    stack: contextlib.AsyncExitStack, target: Target, conversation: str
) -> AsyncGenerator[WireEvent]:
    """One socket: `subscribe`, its ack, then `send` (with the same grace as over SSE)."""
    ws = await stack.enter_async_context(connect(f"{target.ws_url}/api/ws", **idle_ws_options(target)))
    await subscribe(ws, conversation)
    await ws.send(send_frame(conversation, target.tokens, disconnectGrace=IDLE_GRACE))
    return ws_events(ws)


async def open_idle_peer_sse(stack: contextlib.AsyncExitStack, target: Target) -> AsyncGenerator[WireEvent]:
    """GET /sse?tokens=T&pace=P on the peer, its own connection."""
    client = await stack.enter_async_context(target.http_client(hold=True))
    params = {"tokens": target.tokens, "pace": target.pace}
    response = await stack.enter_async_context(client.stream("GET", "/sse", params=params, headers=SSE_ACCEPT))
    return sse_events(await _checked(response, "GET /sse"))


async def open_idle_peer_ws(stack: contextlib.AsyncExitStack, target: Target) -> AsyncGenerator[WireEvent]:
    """One socket on the peer, one `{"tokens", "pace"}` frame."""
    ws = await stack.enter_async_context(connect(f"{target.ws_url}/ws", **idle_ws_options(target)))
    await ws.send(msgspec.json.encode({"tokens": target.tokens, "pace": target.pace}).decode())
    return ws_events(ws)


async def until_start(events: AsyncGenerator[WireEvent]) -> None:
    """Read until the answer's `start` (the socket's acks and `message.created` go by)."""
    async for event in events:
        if event.type == "start":
            return
        if event.type in TERMINAL_EVENTS:
            raise StreamFailed(f"{event.type} before start: {event.code or event.reason or ''}".strip())
    raise StreamFailed("the stream ended before its start event")


@dataclass
class IdleHold:
    """One idle stream: whether it got its `start`, what it received while held open."""

    opened: bool = False
    error: str | None = None  # it could not be opened: why
    tokens: int = 0  # tokens received while held (a paused answer sends one a minute)
    ended: str | None = None  # the server ended it while it was held: how


class IdleRound:
    """N streams opened at most `concurrency` at a time, each held open from its `start`
    until :meth:`close`. Opening one is bounded by `open_timeout` once it has its turn, and
    every opening by `deadline` seconds from :meth:`open`."""

    def __init__(self, openers: Sequence[IdleOpener], concurrency: int, open_timeout: float, deadline: float) -> None:
        self.holds = [IdleHold() for _ in openers]
        self._openers = openers
        self._limit = asyncio.Semaphore(concurrency)
        self._open_timeout = open_timeout
        self._deadline = deadline
        self._untried = len(openers)
        self._all_tried = asyncio.Event()
        self._release = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def opened(self) -> int:
        return sum(1 for h in self.holds if h.opened)

    async def open(self) -> None:
        """Start opening every stream; return once each has its `start` or has failed."""
        deadline = asyncio.get_running_loop().time() + self._deadline
        if not self._openers:
            self._all_tried.set()
        self._tasks = [asyncio.create_task(self._hold(i, deadline)) for i in range(len(self._openers))]
        await self._all_tried.wait()

    async def close(self, within: float) -> None:
        """Close every stream (the client leaves); wait at most `within` seconds for the closes."""
        self._release.set()
        if not self._tasks:
            return
        _, pending = await asyncio.wait(self._tasks, timeout=within)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for i in (i for i, task in enumerate(self._tasks) if task in pending):
            self.holds[i].ended = self.holds[i].ended or f"did not close within {within:.0f}s"

    async def _hold(self, i: int, deadline: float) -> None:
        hold = self.holds[i]
        try:
            async with contextlib.AsyncExitStack() as stack:
                try:
                    async with asyncio.timeout_at(deadline):  # also bounds the wait for a turn
                        async with self._limit, asyncio.timeout(self._open_timeout):
                            events = await self._openers[i](stack)
                            stack.push_async_callback(events.aclose)
                            await until_start(events)
                    hold.opened = True
                finally:
                    self._untried -= 1
                    if self._untried == 0:
                        self._all_tried.set()
                reading = asyncio.create_task(self._drain(events, hold))
                await self._release.wait()
                reading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reading
        except TimeoutError:
            hold.error = "TimeoutError: not open in time"
        except Exception as exc:  # noqa: BLE001 — a failed stream is counted and reported, not raised
            hold.error = f"{type(exc).__name__}: {exc}"[:300]

    @staticmethod
    async def _drain(events: AsyncGenerator[WireEvent], hold: IdleHold) -> None:
        """Read what the server sends while the stream is held (pings, a token a minute)."""
        try:
            async for event in events:
                if event.type == "token":
                    hold.tokens += 1
                elif event.type in TERMINAL_EVENTS:
                    hold.ended = f"{event.type} {event.code or event.reason or ''}".strip()
                    return
            hold.ended = "closed by the server"
        except Exception as exc:  # noqa: BLE001
            hold.ended = f"{type(exc).__name__}: {exc}"[:300]


# -- processes ----------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the benchmark process dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2 :].split()
    # After the command name: state is field 3, utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (the peak RSS) and RssAnon of a process, in KiB, from /proc/<pid>/status."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon"):
                found[name] = int(value.split()[0])
    return found


def open_files_limit(pid: int) -> int | None:
    """A process's soft RLIMIT_NOFILE, from /proc/<pid>/limits (None: unlimited)."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft = line[len("Max open files") :].split()[0]
                return None if soft == "unlimited" else int(soft)
    return None


def open_fds(pid: int) -> int:
    """File descriptors a process holds now (its sockets among them)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def own_cpu_seconds() -> float:
    """user + system CPU of this process (the load generator)."""
    return time.process_time()


def free_port() -> int:
    """A TCP port of 127.0.0.1 nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def console_command(*args: str) -> list[str]:
    """`chatstream …` from this interpreter's environment (or `python -m app …`)."""
    script = Path(sys.executable).with_name("chatstream")
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "app", *args]


class ServerProcess:
    """A server in a subprocess, its output in a file, ready when `/healthz` answers."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], port: int, log_path: Path) -> None:
        self.name = name
        self.command = command
        self.env = env
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> ServerProcess:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.command,
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 — servers start before the event loop, no threads yet
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        with httpx.Client(timeout=2.0) as probe:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise BenchError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if probe.get(f"{self.url}/healthz").status_code == 200:
                        return self
                time.sleep(0.1)
        self.stop()
        raise BenchError(f"{self.name} did not answer /healthz within {STARTUP_TIMEOUT:.0f}s:\n{self.log_tail()}")

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_since(0).splitlines()[-lines:]) if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGINT (uvicorn's graceful stop), then SIGKILL if it takes too long."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_cli(env: dict[str, str], *args: str) -> Any:
    """Run a `chatstream … --json` data command and return its JSON output."""
    result = subprocess.run(
        console_command(*args, "--json"), check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        raise BenchError(f"chatstream {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return json.loads(result.stdout)


def server_env(database_url: str | None, sqlite_path: Path) -> dict[str, str]:
    """The server's environment: this one without chatstream settings (nor Redis), plus the database."""
    unset = {"DATABASE_URL", "REDIS_URL"}
    env = {k: v for k, v in os.environ.items() if k not in unset and not k.startswith("CHATSTREAM_")}
    env["PYTHONUNBUFFERED"] = "1"
    # One key posts every stream's message and reads every stream: lift the per-key and
    # per-company limits (message rate, sockets, SSE streams, running answers) for the load.
    env["CHATSTREAM_MESSAGES_PER_MINUTE"] = "1000000"
    for held in ("SOCKETS", "STREAMS", "ANSWERS"):
        for per in ("KEY", "COMPANY"):
            env[f"CHATSTREAM_MAX_{held}_PER_{per}"] = str(10 * MAX_STREAMS)
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    else:
        env["CHATSTREAM_SQLITE_PATH"] = str(sqlite_path)
    return env


def idle_env(env: dict[str, str], streams: int) -> dict[str, str]:
    """The environment of the `idle` scenario's chatstream servers: room for `streams` open
    streams (and the small round before them) under the per-key and per-company caps, and
    under the process's connection limit (uvicorn's limit_concurrency)."""
    env = dict(env)
    for held in ("SOCKETS", "STREAMS", "ANSWERS"):
        for per in ("KEY", "COMPANY"):
            env[f"CHATSTREAM_MAX_{held}_PER_{per}"] = str(max(10 * MAX_STREAMS, 2 * streams))
    env["CHATSTREAM_MAX_CONNECTIONS"] = str(max(2000, streams + FD_MARGIN))
    return env


def serving_env(env: dict[str, str], role: str, redis: RedisServer | None = None) -> dict[str, str]:
    """A server's environment: its PostgreSQL connections named after its `role` (so that their
    backends' CPU is attributed to it), and Redis with the run's prefix for a scale-out server."""
    env = dict(env)
    if "DATABASE_URL" in env:  # asyncpg passes query parameters on as session settings
        env["DATABASE_URL"] += f"?application_name={APP_NAME_PREFIX}{role}"
    if redis is not None:
        env["REDIS_URL"], env["CHATSTREAM_REDIS_PREFIX"] = redis.url, redis.prefix
    return env


@dataclass
class PostgresDatabase:
    """A temporary database on a PostgreSQL server, and the CPU its backend processes use."""

    server_url: str
    name: str

    @property
    def url(self) -> str:
        return f"{self.server_url.rstrip('/')}/{self.name}"

    async def _admin(self, sql: str, *args: Any) -> list[Any]:
        import asyncpg

        conn = await asyncpg.connect(f"{self.server_url.rstrip('/')}/postgres")
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    async def query(self, sql: str, *args: Any) -> list[Any]:
        """Rows of a query on the benchmark's database."""
        import asyncpg

        conn = await asyncpg.connect(self.url)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    async def backend_cpu(self, roles: Collection[str]) -> dict[int, float]:
        """CPU seconds of each backend process connected to the database now by the servers of these roles."""
        names = [f"{APP_NAME_PREFIX}{role}" for role in roles]
        rows = await self._admin(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND application_name = ANY($2::text[])",
            self.name,
            names,
        )
        usage: dict[int, float] = {}
        for row in rows:
            with contextlib.suppress(OSError, ValueError):  # a backend that just ended
                usage[int(row["pid"])] = cpu_seconds(int(row["pid"]))
        return usage


@contextlib.contextmanager
def temporary_postgres(server_url: str) -> Iterator[PostgresDatabase]:
    """A new, empty database on the PostgreSQL server at `server_url`; dropped afterwards."""
    database = PostgresDatabase(server_url, f"chatstream_bench_{uuid.uuid4().hex[:12]}")
    asyncio.run(database._admin(f'CREATE DATABASE "{database.name}"'))
    try:
        yield database
    finally:
        asyncio.run(database._admin(f'DROP DATABASE IF EXISTS "{database.name}" WITH (FORCE)'))


class RedisServer:
    """The Redis of the scale-out runs, seen from here: its process's CPU (pid from INFO, when
    it runs on this machine), the commands it processed, and the run's keys (one fresh prefix)."""

    def __init__(self, url: str) -> None:
        import redis

        self.url = url
        self.prefix = f"chatstream-bench-{uuid.uuid4().hex}:"
        self.client = redis.Redis.from_url(url, socket_timeout=10, client_name=f"{self.prefix}bench")
        try:
            info = self.client.info("server")
        except (redis.RedisError, OSError) as exc:
            raise BenchError(f"Redis at {url} does not answer: {exc}") from exc
        self.version = str(info.get("redis_version"))
        pid = int(info.get("process_id", 0))
        try:
            cpu_seconds(pid)
            self.pid: int | None = pid
        except (OSError, ValueError, IndexError):  # another machine (or container): not measurable from here
            self.pid = None

    def commands(self) -> int:
        """Commands processed since Redis started (every client's)."""
        return int(self.client.info("stats")["total_commands_processed"])

    def other_clients(self) -> int:
        """Connections that are not this benchmark's (their work would count in Redis's CPU)."""
        return sum(1 for c in self.client.client_list() if not str(c.get("name", "")).startswith(self.prefix))

    def cleanup(self) -> int:
        """Unlink every key of the run's prefix; how many there were."""
        removed = 0
        batch: list[bytes] = []
        for key in self.client.scan_iter(match=f"{self.prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                removed += int(self.client.unlink(*batch))
                batch.clear()
        if batch:
            removed += int(self.client.unlink(*batch))
        self.client.close()
        return removed


# -- runs --------------------------------------------------------------------------------------


class RunResult(msgspec.Struct, kw_only=True):
    """The figures of one run (one scenario, one transport)."""

    scenario: str
    transport: str
    streams: int
    tokens_per_stream: int
    pace_ms: float
    ok_streams: int
    failed_streams: int
    errors: list[str]
    delivered_tokens: int
    wall_s: float
    tokens_per_s: float
    itl_p50_ms: float | None
    itl_p99_ms: float | None
    itl_p50_over_pace: float | None
    itl_p99_over_pace: float | None
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    server_cpu_s: float
    server_cpu_s_per_1k_tokens: float | None
    server_core_use: float
    server_core_peak: float
    db_cpu_s: float | None
    db_cpu_s_per_1k_tokens: float | None
    client_cpu_s: float
    client_core_use: float
    client_core_peak: float
    client_saturated: bool
    server_log_errors: int
    # Scale-out runs (None otherwise): A's and B's share of server_cpu_s, Redis's own CPU,
    # the Redis commands processed per delivered token, and Redis's connections that were
    # not the run's (their work would be in Redis's CPU too).
    producer_cpu_s_per_1k_tokens: float | None
    reader_cpu_s_per_1k_tokens: float | None
    redis_cpu_s_per_1k_tokens: float | None
    redis_commands_per_token: float | None
    redis_other_clients: int | None
    # Everything server-side: the server processes, their PostgreSQL backends, Redis.
    total_cpu_s_per_1k_tokens: float | None
    # The busiest 0.25 s of each server-side process, in cores: `server`, or `producer`, `reader`, `redis`.
    core_peaks: dict[str, float]


class Ratio(msgspec.Struct, kw_only=True):
    """Server CPU per token of a chatstream transport divided by its bare peer's."""

    scenario: str
    transport: str
    peer: str
    cpu_per_token_ratio: float | None


class ScaleoutRatio(msgspec.Struct, kw_only=True):
    """A scale-out run's CPU per token over the in-process run's of the same transport."""

    scenario: str
    transport: str  # redis-sse, redis-ws
    in_process: str  # sse, ws
    total_cpu_ratio: float | None  # servers + PostgreSQL (+ Redis): the figure with a target
    server_cpu_ratio: float | None  # the chatstream processes only


class IdleResult(msgspec.Struct, kw_only=True):
    """The figures of one `idle` run: N streams held open on paused answers, on a fresh server."""

    transport: str
    streams: int
    opened: int  # streams that received their answer's `start`
    failed: int
    errors: list[str]
    open_s: float  # from the first connection to the last `start` (or failure)
    # The server process's memory in KiB (/proc/<pid>/status): before the first connection,
    # with every stream open (after --idle-settle s), and after they closed (their answers
    # ended, --idle-settle s later). `hwm` is VmHWM with every stream open: the peak so far.
    rss_before_kib: int
    rss_open_kib: int
    rss_closed_kib: int
    hwm_open_kib: int
    rss_per_stream_kib: float | None  # (open - before) / opened
    anon_per_stream_kib: float | None  # the same for RssAnon (the heap: no file-backed pages)
    server_fds_open: int  # descriptors the server held with every stream open
    server_fd_limit: int | None  # its RLIMIT_NOFILE (None: unlimited)
    open_server_cpu_s: float  # server CPU while the streams opened
    held_server_cpu_s: float  # server CPU over the --idle-settle s every stream was open and idle
    tokens_while_open: int  # tokens the streams received while held (a paused answer sends one a minute)
    ended_while_open: int  # streams the server ended (or that did not close in time) before they were closed
    close_s: float  # closing every stream, and (chatstream) until no answer was left running
    # chatstream: its answers' states once closed (each should be `cancelled`: the disconnect grace)
    answers_after_close: dict[str, int] | None
    healthy_after: bool  # /healthz answered 200 after the streams closed
    server_exit_code: int | None  # after SIGINT
    stopped_cleanly: bool  # it finished its shutdown after SIGINT (was not killed) and exited as uvicorn does
    server_log_errors: int


class IdleRatio(msgspec.Struct, kw_only=True):
    """RSS per open stream of a chatstream transport divided by its bare peer's."""

    transport: str
    peer: str
    rss_per_stream_ratio: float | None
    target: float
    within_target: bool | None


class Report(msgspec.Struct, kw_only=True):
    """Everything one invocation measured."""

    date: str
    command: str
    revision: str | None
    machine: dict[str, Any]
    config: dict[str, Any]
    runs: list[RunResult]
    ratios: list[Ratio]
    scaleout_ratios: list[ScaleoutRatio]
    idle: list[IdleResult] = msgspec.field(default_factory=list)
    idle_ratios: list[IdleRatio] = msgspec.field(default_factory=list)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1) of unsorted values; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _over(seconds: float | None, pace: float) -> float | None:
    return None if seconds is None or pace <= 0 else round(seconds / pace, 3)


@dataclass
class Bench:
    """The servers, the tenant and the options of one invocation."""

    args: argparse.Namespace
    chatstream: ServerProcess | None  # None when only `idle` runs (it starts servers of its own)
    peers: ServerProcess | None  # None when no peer transport runs
    api_token: str
    agents: dict[float, str]  # pace → agent id
    database: PostgresDatabase | None = None  # None: SQLite, whose work is in the server process
    sqlite_path: Path | None = None  # the SQLite file, without `database`
    # Scale-out (`--redis-url`): A produces, B reads, through this Redis.
    producer: ServerProcess | None = None
    reader: ServerProcess | None = None
    redis: RedisServer | None = None
    # `idle`: starts a fresh server for a transport (chatstream, or the peers), stopped at the end.
    start_idle_server: Callable[[str], ServerProcess] | None = None

    def pace_of(self, scenario: str) -> float:
        """Seconds before each token in this scenario."""
        return float(self.args.pace_ms) / 1000 if scenario == "llm" else 0.0

    def stream_timeout(self, pace: float) -> float:
        """Seconds one stream may take, from its (ramped) start to its last token."""
        if self.args.stream_timeout is not None:
            return float(self.args.stream_timeout)
        return 60.0 + float(self.args.ramp) + int(self.args.tokens) * pace * 5

    def servers_of(self, transport: str) -> dict[str, ServerProcess]:
        """The server processes a transport's run uses, by role (`server`; or `producer`, `reader`)."""
        if transport in IN_PROCESS_OF:
            assert self.producer is not None and self.reader is not None
            return {"producer": self.producer, "reader": self.reader}
        if transport in PEER_OF:
            assert self.chatstream is not None
            return {"server": self.chatstream}
        assert self.peers is not None
        return {"server": self.peers}

    async def create_conversations(
        self, count: int, pace: float, server: ServerProcess | None = None, concurrency: int = 8
    ) -> list[str]:
        """`count` new conversations with the agent of this pace (through the API of `server`,
        by default the chatstream server, `concurrency` at a time)."""
        server = server or self.chatstream
        assert server is not None
        limit = asyncio.Semaphore(concurrency)
        headers = {"Authorization": f"Bearer {self.api_token}"}
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60, limits=limits) as client:

            async def one(i: int) -> str:
                async with limit:
                    r = await client.post(
                        "/api/conversations", json={"title": f"bench {i}", "agentId": self.agents[pace]}
                    )
                if r.status_code != 201:
                    raise BenchError(f"POST /api/conversations: {r.status_code} {r.text[:200]}")
                return str(r.json()["id"])

            return list(await asyncio.gather(*(one(i) for i in range(count))))

    async def db_cpu(self, roles: Collection[str]) -> dict[int, float]:
        """CPU seconds of the PostgreSQL backends of these servers, by backend pid (none on SQLite)."""
        return await self.database.backend_cpu(roles) if self.database is not None and roles else {}

    async def run(self, scenario: str, transport: str, streams: int) -> RunResult:
        """N concurrent streams of one answer each; the figures of the run."""
        pace = self.pace_of(scenario)
        chat = transport in CHATSTREAM_TRANSPORTS
        servers = self.servers_of(transport)
        scaleout = transport in IN_PROCESS_OF
        redis = self.redis if scaleout else None

        def target(server: ServerProcess) -> Target:
            return Target(
                base_url=server.url,
                token=self.api_token if chat else None,
                tokens=self.args.tokens,
                pace=pace,
                ws_deflate=not self.args.no_ws_deflate,
                timeout=self.stream_timeout(pace),
            )

        first = target(next(iter(servers.values())))  # the server, or A
        second = target(servers["reader"]) if scaleout else first
        conversations = await self.create_conversations(streams, pace) if chat else []
        expected = tokens_of(token_words(self.args.tokens))
        recorders = [Recorder(expected=expected) for _ in range(streams)]

        def stream_of(i: int) -> Callable[[], Awaitable[None]]:
            rec = recorders[i]
            if transport == "sse":
                return lambda: chatstream_sse(first, conversations[i], rec)
            if transport == "ws":
                return lambda: chatstream_ws(first, conversations[i], rec)
            if transport == "redis-sse":
                return lambda: scaleout_sse(first, second, conversations[i], rec)
            if transport == "redis-ws":
                return lambda: scaleout_ws(first, second, conversations[i], rec)
            if transport == "peer-sse":
                return lambda: peer_sse(first, rec)
            return lambda: peer_ws(first, rec)

        async def guarded(i: int) -> None:
            rec = recorders[i]
            try:
                if self.args.ramp > 0:
                    await asyncio.sleep(self.args.ramp * i / streams)
                async with asyncio.timeout(first.timeout):
                    await stream_of(i)()
            except Exception as exc:  # noqa: BLE001 — a failed stream is counted and reported, not raised
                rec.error = f"{type(exc).__name__}: {exc}"[:300]

        await asyncio.sleep(self.args.settle)  # let the previous run's connections close
        log_offsets = {role: server.log_size() for role, server in servers.items()}
        pids = {role: server.pid for role, server in servers.items()}
        if redis is not None and redis.pid is not None:
            pids["redis"] = redis.pid
        sampler = CpuSampler(pids)
        sampling = asyncio.create_task(sampler.run())
        db_roles = servers if chat else {}
        try:
            other_clients = redis.other_clients() if redis is not None else None
            commands0 = redis.commands() if redis is not None else 0
            db_cpu0 = await self.db_cpu(db_roles)
            cpu0, client_cpu0 = {role: cpu_seconds(pid) for role, pid in pids.items()}, own_cpu_seconds()
            started = time.perf_counter()
            await asyncio.gather(*(guarded(i) for i in range(streams)))
            wall = time.perf_counter() - started
            await asyncio.sleep(0.2)  # the server's last writes and closes belong to this run
            cpu = {role: cpu_seconds(pid) - cpu0[role] for role, pid in pids.items()}
            client_cpu = own_cpu_seconds() - client_cpu0
            db_cpu1 = await self.db_cpu(db_roles)
            commands = redis.commands() - commands0 if redis is not None else None
        finally:
            sampling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampling
        db_cpu = sum(used - db_cpu0.get(pid, 0.0) for pid, used in db_cpu1.items()) if self.database else None
        logs = "".join(server.log_since(log_offsets[role]) for role, server in servers.items())
        return summarize(
            scenario,
            transport,
            pace,
            self.args.tokens,
            recorders,
            Usage(
                wall=wall,
                cpu=cpu,
                client_cpu=client_cpu,
                db_cpu=db_cpu if chat else None,
                peaks=sampler.peaks,
                client_peak=sampler.client_peak,
                log_errors=sum(1 for line in logs.splitlines() if _LOGGED_ERROR.search(line)),
                redis_commands=commands,
                redis_other_clients=other_clients,
            ),
        )

    async def answer_states(self, conversations: Collection[str]) -> Counter[str]:
        """The states of these conversations' answers (`running`, `cancelled`, …), counted, from the database."""
        wanted = set(conversations)
        sql = "SELECT conversation, status FROM generation"
        if self.database is not None:
            rows = [tuple(r) for r in await self.database.query(sql)]
        else:
            assert self.sqlite_path is not None
            rows = await asyncio.to_thread(sqlite_rows, self.sqlite_path, sql)
        return Counter(str(status) for conversation, status in rows if uuid_text(conversation) in wanted)

    async def wait_answers_ended(self, conversations: Collection[str], within: float) -> Counter[str]:
        """Their answers' states once none is running (or after `within` seconds)."""
        deadline = time.monotonic() + within
        while True:
            states = await self.answer_states(conversations)
            if not states.get("running") or time.monotonic() >= deadline:
                return states
            await asyncio.sleep(0.5)  # nothing tells a client that an answer nobody reads has ended: ask again

    async def idle(self, transport: str) -> IdleResult:
        """`--streams` streams held open on paused answers, on a fresh server process (stopped after)."""
        assert self.start_idle_server is not None
        server = await asyncio.to_thread(self.start_idle_server, transport)
        try:
            result = await self._idle_on(server, transport)
            # Errors are counted in what it logged while serving: the peers' uvicorn logs a
            # KeyboardInterrupt when stopped.
            served = server.log_size()
        finally:
            await asyncio.to_thread(server.stop)
        assert server.proc is not None
        result.server_exit_code = code = server.proc.returncode
        # SIGINT is uvicorn's graceful stop: it finishes, then exits 0 or 130, or re-raises the signal.
        finished = f"Finished server process [{server.pid}]" in server.log_since(served)
        result.stopped_cleanly = code in (0, 128 + signal.SIGINT, -signal.SIGINT) and finished
        result.server_log_errors = sum(
            1
            for line in server.log_path.read_bytes()[:served].decode(errors="replace").splitlines()
            if _LOGGED_ERROR.search(line)
        )
        return result

    async def _idle_on(self, server: ServerProcess, transport: str) -> IdleResult:
        args = self.args
        chat = transport in CHATSTREAM_TRANSPORTS
        streams, warmup, settle = int(args.streams), min(int(args.warmup), int(args.streams)), float(args.idle_settle)
        pid = server.pid
        fd_limit = open_files_limit(pid)
        if fd_limit is not None and fd_limit < streams + FD_MARGIN:
            raise BenchError(f"{server.name} may open {fd_limit} files, too few for {streams} streams")
        target = Target(
            base_url=server.url,
            token=self.api_token if chat else None,
            tokens=IDLE_TOKENS,
            pace=IDLE_PACE,
            ws_deflate=not args.no_ws_deflate,
            timeout=float(args.stream_timeout or 60.0),
        )
        # Outside the measured window: the conversations, then a small round that warms the
        # code paths of opening, holding and closing up.
        conversations = (
            await self.create_conversations(warmup + streams, IDLE_PACE, server, concurrency=32) if chat else []
        )

        def idle_round(first: int, count: int) -> IdleRound:
            def opener(i: int) -> IdleOpener:
                if transport == "sse":
                    return lambda stack: open_idle_sse(stack, target, conversations[i])
                if transport == "ws":
                    return lambda stack: open_idle_ws(stack, target, conversations[i])
                if transport == "peer-sse":
                    return lambda stack: open_idle_peer_sse(stack, target)
                return lambda stack: open_idle_peer_ws(stack, target)

            openers = [opener(i) for i in range(first, first + count)]
            # Every stream is open (or has failed) this long after the first started opening.
            deadline = target.timeout + 0.05 * count
            return IdleRound(openers, int(args.open_concurrency), target.timeout, deadline)

        if warmup:
            warm = idle_round(0, warmup)
            await warm.open()
            await warm.close(within=60.0)
            if chat:
                await self.wait_answers_ended(conversations[:warmup], IDLE_GRACE + 60.0)
        measured = conversations[warmup:]
        await asyncio.sleep(settle)  # the warm-up's closes and cancellations are over
        before, cpu0 = memory_kib(pid), cpu_seconds(pid)
        held = idle_round(warmup, streams)
        started = time.perf_counter()
        await held.open()
        open_s = time.perf_counter() - started
        cpu1 = cpu_seconds(pid)
        await asyncio.sleep(settle)  # every stream open, nothing to send: the server settles
        cpu2, open_mem, fds = cpu_seconds(pid), memory_kib(pid), open_fds(pid)
        tokens = sum(h.tokens for h in held.holds)
        closing = time.perf_counter()
        await held.close(within=60.0)
        states = await self.wait_answers_ended(measured, IDLE_GRACE + 60.0 + streams / 100) if chat else None
        close_s = time.perf_counter() - closing
        healthy = await answers_healthz(server)
        await asyncio.sleep(settle)
        closed = memory_kib(pid)
        opened = held.opened

        def per_stream(name: str) -> float | None:
            return round((open_mem[name] - before[name]) / opened, 2) if opened else None

        counted = Counter(h.error for h in held.holds if h.error).most_common()
        return IdleResult(
            transport=transport,
            streams=streams,
            opened=opened,
            failed=streams - opened,
            errors=[error if n == 1 else f"{error} (x{n})" for error, n in counted][:5],
            open_s=round(open_s, 3),
            rss_before_kib=before["VmRSS"],
            rss_open_kib=open_mem["VmRSS"],
            rss_closed_kib=closed["VmRSS"],
            hwm_open_kib=open_mem["VmHWM"],
            rss_per_stream_kib=per_stream("VmRSS"),
            anon_per_stream_kib=per_stream("RssAnon"),
            server_fds_open=fds,
            server_fd_limit=fd_limit,
            open_server_cpu_s=round(cpu1 - cpu0, 3),
            held_server_cpu_s=round(cpu2 - cpu1, 3),
            tokens_while_open=tokens,
            ended_while_open=sum(1 for h in held.holds if h.opened and h.ended),
            close_s=round(close_s, 3),
            answers_after_close=dict(states) if states is not None else None,
            healthy_after=healthy,
            server_exit_code=None,
            stopped_cleanly=False,
            server_log_errors=0,
        )


def sqlite_rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    """Rows of a query on a SQLite file (WAL: reading beside the server is safe)."""
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as db:
        return list(db.execute(sql).fetchall())


def uuid_text(value: Any) -> str:
    """A UUID column's value (a UUID, its text, or 16 bytes) as the API writes it."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes):
        return str(uuid.UUID(bytes=value))
    return str(uuid.UUID(str(value)))


async def answers_healthz(server: ServerProcess) -> bool:
    """True when the server answers GET /healthz with 200."""
    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as client:
        try:
            return (await client.get(f"{server.url}/healthz")).status_code == 200
        except httpx.HTTPError:
            return False


def idle_ok(result: IdleResult) -> bool:
    """Every stream opened and stayed open until closed, every answer was cancelled, the server
    still answered and stopped cleanly."""
    answers_ok = result.answers_after_close is None or result.answers_after_close == {"cancelled": result.opened}
    return (
        result.failed == 0
        and result.ended_while_open == 0
        and answers_ok
        and result.healthy_after
        and result.stopped_cleanly
        and result.server_log_errors == 0
    )


class CpuSampler:
    """The busiest `interval` of each server-side process and of this one, in cores, while it runs."""

    def __init__(self, pids: Mapping[str, int], interval: float = 0.25) -> None:
        self.pids = dict(pids)
        self.interval = interval
        self.peaks = dict.fromkeys(self.pids, 0.0)
        self.client_peak = 0.0

    def _now(self) -> tuple[float, dict[str, float], float]:
        return time.perf_counter(), {role: cpu_seconds(pid) for role, pid in self.pids.items()}, own_cpu_seconds()

    async def run(self) -> None:
        then, servers, client = self._now()
        while True:
            await asyncio.sleep(self.interval)
            now, servers_now, client_now = self._now()
            for role, used in servers_now.items():
                self.peaks[role] = max(self.peaks[role], (used - servers[role]) / (now - then))
            self.client_peak = max(self.client_peak, (client_now - client) / (now - then))
            then, servers, client = now, servers_now, client_now


@dataclass
class Usage:
    """What a run cost: wall time, CPU seconds, the busiest moments, errors the server logged."""

    wall: float
    cpu: dict[str, float]  # CPU seconds of each server-side process by role: `server`, or `producer`, `reader`, `redis`
    client_cpu: float
    db_cpu: float | None  # PostgreSQL backends of the servers' pools; None on SQLite (in-process) and for peers
    peaks: dict[str, float]
    client_peak: float
    log_errors: int
    redis_commands: int | None = None
    redis_other_clients: int | None = None


def summarize(
    scenario: str, transport: str, pace: float, tokens: int, recorders: list[Recorder], usage: Usage
) -> RunResult:
    """The figures of a run from what each stream recorded."""
    delivered = sum(len(r.texts) for r in recorders)
    gaps = [g for r in recorders for g in r.gaps]
    ttfts = [t for r in recorders if (t := r.ttft) is not None]
    itl50, itl99 = percentile(gaps, 0.5), percentile(gaps, 0.99)
    # The failures by message, the most frequent first, each with how many streams it ended.
    counted = Counter(r.error for r in recorders if r.error).most_common()
    errors = [error if n == 1 else f"{error} (x{n})" for error, n in counted]
    ok = sum(1 for r in recorders if r.ok and not r.error)
    wall = max(usage.wall, 1e-9)

    def per_1k(seconds: float | None) -> float | None:
        return round(seconds / delivered * 1000, 4) if seconds is not None and delivered else None

    server_cpu = sum(used for role, used in usage.cpu.items() if role != "redis")
    server_peak = max((peak for role, peak in usage.peaks.items() if role != "redis"), default=0.0)
    redis_cpu = usage.cpu.get("redis")
    total_cpu = server_cpu + (usage.db_cpu or 0.0) + (redis_cpu or 0.0)
    return RunResult(
        scenario=scenario,
        transport=transport,
        streams=len(recorders),
        tokens_per_stream=tokens,
        pace_ms=round(pace * 1000, 3),
        ok_streams=ok,
        failed_streams=len(recorders) - ok,
        errors=errors[:5],
        delivered_tokens=delivered,
        wall_s=round(wall, 3),
        tokens_per_s=round(delivered / wall, 1),
        itl_p50_ms=_ms(itl50),
        itl_p99_ms=_ms(itl99),
        itl_p50_over_pace=_over(itl50, pace),
        itl_p99_over_pace=_over(itl99, pace),
        ttft_p50_ms=_ms(percentile(ttfts, 0.5)),
        ttft_p99_ms=_ms(percentile(ttfts, 0.99)),
        server_cpu_s=round(server_cpu, 3),
        server_cpu_s_per_1k_tokens=per_1k(server_cpu),
        server_core_use=round(server_cpu / wall, 3),
        # A run shorter than one sampling window has no sample: its average is its peak.
        server_core_peak=round(max(server_peak, server_cpu / wall), 2),
        db_cpu_s=None if usage.db_cpu is None else round(usage.db_cpu, 3),
        db_cpu_s_per_1k_tokens=per_1k(usage.db_cpu),
        client_cpu_s=round(usage.client_cpu, 3),
        client_core_use=round(usage.client_cpu / wall, 3),
        client_core_peak=round(max(usage.client_peak, usage.client_cpu / wall), 2),
        client_saturated=max(usage.client_peak, usage.client_cpu / wall) >= CLIENT_SATURATED,
        server_log_errors=usage.log_errors,
        producer_cpu_s_per_1k_tokens=per_1k(usage.cpu.get("producer")),
        reader_cpu_s_per_1k_tokens=per_1k(usage.cpu.get("reader")),
        redis_cpu_s_per_1k_tokens=per_1k(redis_cpu),
        redis_commands_per_token=round(usage.redis_commands / delivered, 2)
        if usage.redis_commands is not None and delivered
        else None,
        redis_other_clients=usage.redis_other_clients,
        total_cpu_s_per_1k_tokens=per_1k(total_cpu),
        core_peaks={role: round(max(peak, usage.cpu.get(role, 0.0) / wall), 2) for role, peak in usage.peaks.items()},
    )


def ratios(runs: Sequence[RunResult]) -> list[Ratio]:
    """chatstream's CPU per token over its peer's, per scenario and transport measured with its peer."""
    by_key = {(r.scenario, r.transport): r for r in runs}
    found: list[Ratio] = []
    for (scenario, transport), run in by_key.items():
        peer = PEER_OF.get(transport)
        other = by_key.get((scenario, peer)) if peer else None
        if peer is None or other is None:
            continue
        mine, theirs = run.server_cpu_s_per_1k_tokens, other.server_cpu_s_per_1k_tokens
        value = round(mine / theirs, 2) if mine is not None and theirs else None
        found.append(Ratio(scenario=scenario, transport=transport, peer=peer, cpu_per_token_ratio=value))
    return found


def scaleout_ratios(runs: Sequence[RunResult]) -> list[ScaleoutRatio]:
    """Each scale-out run's CPU per token over the in-process run's, per scenario, when both ran."""
    by_key = {(r.scenario, r.transport): r for r in runs}

    def ratio(mine: float | None, theirs: float | None) -> float | None:
        return round(mine / theirs, 2) if mine is not None and theirs else None

    found: list[ScaleoutRatio] = []
    for (scenario, transport), run in by_key.items():
        base = IN_PROCESS_OF.get(transport)
        other = by_key.get((scenario, base)) if base else None
        if base is None or other is None:
            continue
        found.append(
            ScaleoutRatio(
                scenario=scenario,
                transport=transport,
                in_process=base,
                total_cpu_ratio=ratio(run.total_cpu_s_per_1k_tokens, other.total_cpu_s_per_1k_tokens),
                server_cpu_ratio=ratio(run.server_cpu_s_per_1k_tokens, other.server_cpu_s_per_1k_tokens),
            )
        )
    return found


def idle_ratios(results: Sequence[IdleResult]) -> list[IdleRatio]:
    """chatstream's RSS per open stream over its peer's, per transport measured with its peer."""
    by_transport = {r.transport: r for r in results}
    found: list[IdleRatio] = []
    for transport, peer in PEER_OF.items():
        mine, theirs = by_transport.get(transport), by_transport.get(peer)
        if mine is None or theirs is None:
            continue
        a, b = mine.rss_per_stream_kib, theirs.rss_per_stream_kib
        value = round(a / b, 2) if a is not None and b and b > 0 else None
        found.append(
            IdleRatio(
                transport=transport,
                peer=peer,
                rss_per_stream_ratio=value,
                target=IDLE_TARGET_RATIO,
                within_target=None if value is None else value <= IDLE_TARGET_RATIO,
            )
        )
    return found


# -- reporting ---------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """nproc, the CPU model (lscpu), Python and the versions that matter."""
    model = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        model = next(
            (line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), None
        )
    versions = {}
    for package in ("litestar", "uvicorn", "msgspec", "websockets", "httpx", "piccolo", "asyncpg", "redis", "hiredis"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def revision() -> str | None:
    """The commit measured, `+dirty` when app/ has uncommitted changes (None outside git)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "app"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_table(report: Report) -> str:
    """The runs as a Markdown table, then the ratios."""
    rows = [
        "| scenario | transport | streams x tokens | pace ms | ok | tokens/s | ITL p50 / p99 ms (x pace) "
        "| TTFT p50 / p99 ms | server CPU s | server CPU s per 1k tokens | DB CPU s per 1k tokens "
        "| server cores avg / peak | client cores avg / peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.runs:
        itl = f"{_fmt(r.itl_p50_ms)} / {_fmt(r.itl_p99_ms)}"
        if r.itl_p50_over_pace is not None:
            itl += f" ({_fmt(r.itl_p50_over_pace, 2)} / {_fmt(r.itl_p99_over_pace, 2)})"
        server = f"{r.server_core_use:.2f} / {r.server_core_peak:.2f}"
        client = f"{r.client_core_use:.2f} / {r.client_core_peak:.2f}" + (" ⚠" if r.client_saturated else "")
        rows.append(
            f"| {r.scenario} | {r.transport} | {r.streams} x {r.tokens_per_stream} | {_fmt(r.pace_ms, 0)} "
            f"| {r.ok_streams}/{r.streams} | {r.tokens_per_s:.0f} | {itl} "
            f"| {_fmt(r.ttft_p50_ms)} / {_fmt(r.ttft_p99_ms)} | {r.server_cpu_s:.2f} "
            f"| {_fmt(r.server_cpu_s_per_1k_tokens, 3)} | {_fmt(r.db_cpu_s_per_1k_tokens, 3)} | {server} | {client} |"
        )
    if report.ratios:
        rows += ["", "| scenario | chatstream / bare peer | CPU per token ratio |", "|---|---|---|"]
        rows += [
            f"| {x.scenario} | {x.transport} / {x.peer} | {_fmt(x.cpu_per_token_ratio, 2)} |" for x in report.ratios
        ]
    if any(r.transport in IN_PROCESS_OF for r in report.runs):
        rows += ["", scaleout_table(report)]
    if report.idle:
        rows = [*rows, "", idle_table(report)] if report.runs else [idle_table(report)]
    return "\n".join(rows)


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def idle_table(report: Report) -> str:
    """The `idle` runs: memory per open stream, and chatstream's ratio to the bare peer's."""
    rows = [
        "| transport | streams | open | open s | RSS before / open / closed MiB | peak MiB | KiB per stream "
        "| anon KiB per stream | tokens while open | server CPU s: opening / idle | answers after close "
        "| healthz / stop (exit code) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.idle:
        states = sorted((r.answers_after_close or {}).items())
        answers = ", ".join(f"{n} {state}" for state, n in states) if r.answers_after_close is not None else "—"
        rows.append(
            f"| {r.transport} | {r.streams} | {r.opened}/{r.streams} | {r.open_s:.1f} "
            f"| {_mib(r.rss_before_kib)} / {_mib(r.rss_open_kib)} / {_mib(r.rss_closed_kib)} "
            f"| {_mib(r.hwm_open_kib)} | {_fmt(r.rss_per_stream_kib)} | {_fmt(r.anon_per_stream_kib)} "
            f"| {r.tokens_while_open} | {r.open_server_cpu_s:.2f} / {r.held_server_cpu_s:.2f} "
            f"| {answers} "
            f"| {'ok' if r.healthy_after else 'FAILED'} / {'clean' if r.stopped_cleanly else 'NOT CLEAN'} "
            f"({r.server_exit_code}) |"
        )
    if report.idle_ratios:
        rows += [
            "",
            "| chatstream / bare peer | KiB per open stream | ratio | target |",
            "|---|---|---|---|",
        ]
        per_stream = {r.transport: r.rss_per_stream_kib for r in report.idle}
        for x in report.idle_ratios:
            verdict = "n/a" if x.within_target is None else ("met" if x.within_target else "missed")
            rows.append(
                f"| {x.transport} / {x.peer} | {_fmt(per_stream.get(x.transport))} / {_fmt(per_stream.get(x.peer))} "
                f"| {_fmt(x.rss_per_stream_ratio, 2)} | ≤ {x.target:g}: {verdict} |"
            )
    return "\n".join(rows)


def scaleout_table(report: Report) -> str:
    """The in-process and scale-out runs side by side: CPU per 1k tokens of every server-side process."""
    ratio_of = {(x.scenario, x.transport): x for x in report.scaleout_ratios}
    rows = [
        "| scenario | transport | processes | ok | tokens/s | ITL p50 / p99 ms | TTFT p50 / p99 ms "
        "| CPU s per 1k tokens: A / B / Redis / PostgreSQL = sum | sum ÷ in-process | Redis commands per token "
        "| busiest 0.25 s, cores: A / B / Redis |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.runs:
        scaleout = r.transport in IN_PROCESS_OF
        if r.transport not in CHATSTREAM_TRANSPORTS:
            continue
        first = r.producer_cpu_s_per_1k_tokens if scaleout else r.server_cpu_s_per_1k_tokens
        cpu = " / ".join(
            _fmt(x, 3) if x is not None else "—"
            for x in (first, r.reader_cpu_s_per_1k_tokens, r.redis_cpu_s_per_1k_tokens, r.db_cpu_s_per_1k_tokens)
        )
        ratio = ratio_of.get((r.scenario, r.transport))
        peaks = " / ".join(
            _fmt(r.core_peaks.get(role), 2) if role in r.core_peaks else "—"
            for role in (("producer", "reader", "redis") if scaleout else ("server",))
        )
        rows.append(
            f"| {r.scenario} | {r.transport} | {'A → Redis → B' if scaleout else 'one'} "
            f"| {r.ok_streams}/{r.streams} | {r.tokens_per_s:.0f} | {_fmt(r.itl_p50_ms)} / {_fmt(r.itl_p99_ms)} "
            f"| {_fmt(r.ttft_p50_ms)} / {_fmt(r.ttft_p99_ms)} | {cpu} = {_fmt(r.total_cpu_s_per_1k_tokens, 3)} "
            f"| {_fmt(ratio.total_cpu_ratio, 2) if ratio else '—'} "
            f"| {_fmt(r.redis_commands_per_token, 1) if scaleout else '—'} "
            f"| {peaks} |"
        )
    return "\n".join(rows)


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description="Benchmark chatstream's streaming.")
    parser.add_argument(
        "--streams",
        type=int,
        default=200,
        help=f"concurrent streams (1..{MAX_STREAMS}; `idle` alone: 1..{MAX_IDLE_STREAMS}; default 200)",
    )
    parser.add_argument("--tokens", type=int, default=100, help="tokens per answer (default 100)")
    parser.add_argument("--pace-ms", type=float, default=20.0, help="echo pace of the `llm` scenario (default 20)")
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, of {', '.join(ALL_SCENARIOS)} (default {','.join(SCENARIOS)}; `idle` is slow)",
    )
    parser.add_argument(
        "--transports",
        default=None,
        help=f"comma-separated, of {', '.join(TRANSPORTS)} (default {','.join(DEFAULT_TRANSPORTS)}; "
        f"with --redis-url: {','.join(SCALEOUT_TRANSPORTS)})",
    )
    parser.add_argument(
        "--database-url",
        default=None,
        help="a PostgreSQL server (e.g. postgresql://postgres@127.0.0.1:5432): a temporary database is made "
        "there and dropped after; default: a SQLite file in a temporary directory",
    )
    parser.add_argument(
        "--redis-url",
        default=None,
        help="a Redis server (e.g. redis://127.0.0.1:6379/0) for the scale-out transports redis-sse and redis-ws: "
        "two more servers, A producing and B reading, share it under a fresh key prefix (removed after); "
        "needs --database-url",
    )
    parser.add_argument("--ramp", type=float, default=0.0, help="spread stream starts over this many seconds")
    parser.add_argument("--warmup", type=int, default=10, help="streams of an unmeasured run per transport first")
    parser.add_argument("--settle", type=float, default=1.0, help="idle seconds before each measured run")
    parser.add_argument("--stream-timeout", type=float, default=None, help="seconds a stream may take (default: auto)")
    parser.add_argument("--no-ws-deflate", action="store_true", help="do not offer permessage-deflate on sockets")
    parser.add_argument(
        "--open-concurrency", type=int, default=200, help="idle: streams being opened at once (default 200)"
    )
    parser.add_argument(
        "--idle-settle",
        type=float,
        default=5.0,
        help="idle: seconds the server is left alone before each memory reading (default 5)",
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for chatstream (e.g. CHATSTREAM_LOG_LEVEL=WARNING); repeatable. By default the server "
        "gets none of this environment's CHATSTREAM_* variables",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (server logs, SQLite file)")
    args = parser.parse_args(argv)
    args.scenarios = list(dict.fromkeys(s.strip() for s in args.scenarios.split(",") if s.strip()))
    most = MAX_IDLE_STREAMS if args.scenarios == [IDLE] else MAX_STREAMS
    if not 1 <= args.streams <= most:
        parser.error(
            f"--streams must be between 1 and {most}" + ("" if most == MAX_IDLE_STREAMS else " (`idle` alone: more)")
        )
    if args.tokens < 1 or args.pace_ms < 0 or args.ramp < 0 or args.warmup < 0 or args.settle < 0:
        parser.error("--tokens must be at least 1; --pace-ms, --ramp, --warmup and --settle not negative")
    if args.open_concurrency < 1 or args.idle_settle < 0:
        parser.error("--open-concurrency must be at least 1, --idle-settle not negative")
    if args.transports is None:
        args.transports = ",".join(SCALEOUT_TRANSPORTS if args.redis_url else DEFAULT_TRANSPORTS)
    args.transports = list(dict.fromkeys(t.strip() for t in args.transports.split(",") if t.strip()))
    if any("=" not in item for item in args.server_env):
        parser.error("--server-env takes NAME=VALUE")
    bad = [s for s in args.scenarios if s not in ALL_SCENARIOS] + [t for t in args.transports if t not in TRANSPORTS]
    if bad or not args.scenarios or not args.transports:
        parser.error(f"unknown or missing scenarios/transports: {', '.join(bad) or 'none given'}")
    if args.scenarios == [IDLE] and not any(t in IDLE_TRANSPORTS for t in args.transports):
        parser.error(f"the idle scenario runs {', '.join(IDLE_TRANSPORTS)}: none of them is in --transports")
    scaleout = [t for t in args.transports if t in IN_PROCESS_OF]
    if scaleout and not args.redis_url:
        parser.error(f"--transports {','.join(scaleout)} needs --redis-url")
    if args.redis_url and not args.database_url:
        parser.error("--redis-url needs --database-url: the servers of a scale-out run share a PostgreSQL database")
    return args


def raise_open_files_limit(needed: int, *, to_hard: bool = False) -> int | None:
    """Sockets: each stream holds one on each side; the servers inherit the limit (they start
    after this). Raised to `needed`, or with `to_hard` as far as the hard limit allows; the
    soft limit now (None: unlimited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    wanted = hard if to_hard else (needed if hard == resource.RLIM_INFINITY else min(needed, hard))
    if wanted == resource.RLIM_INFINITY:  # an unlimited hard limit: a soft limit must be a number
        wanted = max(needed, soft)
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    return soft


def print_idle(result: IdleResult) -> None:
    """One line per `idle` run, as it ends."""
    note = f" — {result.failed} failed: {result.errors[:1]}" if result.failed else ""
    if result.ended_while_open:
        note += f" — {result.ended_while_open} ended before they were closed"
    if result.answers_after_close is not None:
        note += f"; answers after close: {dict(result.answers_after_close)}"
    print(
        f"idle  {result.transport:9} {result.opened}/{result.streams} open in {result.open_s:.1f}s, "
        f"RSS {_mib(result.rss_before_kib)} → {_mib(result.rss_open_kib)} MiB "
        f"({_fmt(result.rss_per_stream_kib)} KiB per stream), closed {_mib(result.rss_closed_kib)} MiB, "
        f"healthz {'ok' if result.healthy_after else 'FAILED'}, "
        f"stop {'clean' if result.stopped_cleanly else 'NOT CLEAN'} ({result.server_exit_code}){note}",
        flush=True,
    )


async def measure(bench: Bench) -> tuple[list[RunResult], list[IdleResult]]:
    """Every (scenario, transport) run, each transport warmed up once first; `idle` runs on servers of its own."""
    runs: list[RunResult] = []
    idle: list[IdleResult] = []
    warmed: set[str] = set()
    for scenario in bench.args.scenarios:
        if scenario == IDLE:
            for transport in (t for t in TRANSPORTS if t in bench.args.transports and t in IDLE_TRANSPORTS):
                idle.append(await bench.idle(transport))
                print_idle(idle[-1])
            continue
        for transport in (t for t in TRANSPORTS if t in bench.args.transports):
            if transport not in warmed and bench.args.warmup > 0:
                await bench.run("burst", transport, min(bench.args.warmup, bench.args.streams))
                warmed.add(transport)
            result = await bench.run(scenario, transport, bench.args.streams)
            runs.append(result)
            note = f" — {result.failed_streams} failed: {result.errors[:1]}" if result.failed_streams else ""
            per_1k = _fmt(result.server_cpu_s_per_1k_tokens, 3)
            if transport in IN_PROCESS_OF:
                a, b = result.producer_cpu_s_per_1k_tokens, result.reader_cpu_s_per_1k_tokens
                per_1k += f": A {_fmt(a, 3)}, B {_fmt(b, 3)}; Redis {_fmt(result.redis_cpu_s_per_1k_tokens, 3)}"
            if result.redis_other_clients:
                note += f" — Redis had {result.redis_other_clients} other client(s): its CPU includes their work"
            print(
                f"{scenario:5} {transport:9} {result.ok_streams}/{result.streams} ok, "
                f"{result.tokens_per_s:.0f} tokens/s, server {result.server_cpu_s:.2f} CPU s ({per_1k} per 1k tokens), "
                f"client cores avg {result.client_core_use:.2f} peak {result.client_core_peak:.2f}{note}",
                flush=True,
            )
    return runs, idle


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; exit status 1 if any stream failed."""
    args = parse_args(argv)
    idle = IDLE in args.scenarios
    streaming = [s for s in args.scenarios if s != IDLE]
    if idle:  # every process (this one, each server) holds a socket per stream, and more
        limit = raise_open_files_limit(args.streams + FD_MARGIN, to_hard=True)
        if limit is not None and limit < args.streams + FD_MARGIN:
            print(
                f"error: {args.streams} idle streams need {args.streams + FD_MARGIN} open files per process; "
                f"the hard limit (RLIMIT_NOFILE) allows {limit}: raise it (ulimit -Hn) or use fewer --streams",
                file=sys.stderr,
            )
            return 2
    else:
        raise_open_files_limit(6 * args.streams + 256)
    command = shlex.join(["python", "-m", "bench.run", *(sys.argv[1:] if argv is None else argv)])
    workdir = Path(tempfile.mkdtemp(prefix="chatstream-bench-"))
    sqlite_path = workdir / "chatstream.db"
    try:
        # Unwound in reverse: the servers stop before their database is dropped.
        with contextlib.ExitStack() as stack:
            database = stack.enter_context(temporary_postgres(args.database_url)) if args.database_url else None
            base_env = server_env(database.url if database else None, sqlite_path)
            settings = dict(item.split("=", 1) for item in args.server_env)
            env = {**base_env, **settings}
            run_cli(env, "migrate")
            company = run_cli(env, "company", "create", f"bench-{uuid.uuid4().hex[:8]}")
            company_id, token = company["company"]["id"], company["adminKey"]["token"]
            agents: dict[float, str] = {}
            paces = {args.pace_ms / 1000 if s == "llm" else 0.0 for s in [*streaming, "burst"]}
            for pace in sorted(paces | ({IDLE_PACE} if idle else set())):
                config = json.dumps({"pace": pace})
                agent = run_cli(
                    env, "agent", "create", "--company", company_id, "--name", f"echo {pace}", "--config", config
                )
                agents[pace] = agent["id"]

            def server(name: str, role: str, redis: RedisServer | None = None) -> ServerProcess:
                port = free_port()
                command = console_command("serve", "--no-demo", "--no-migrate", "--port", str(port))
                process = ServerProcess(name, command, serving_env(env, role, redis), port, workdir / f"{name}.log")
                stack.callback(process.stop)
                return process.start()

            def idle_server(transport: str) -> ServerProcess:
                """A fresh process for one `idle` run: no memory of the runs before it."""
                port, name = free_port(), f"idle-{transport}"
                if transport in CHATSTREAM_TRANSPORTS:
                    command = console_command("serve", "--no-demo", "--no-migrate", "--port", str(port))
                    idle_settings = {**idle_env(base_env, args.streams + args.warmup), **settings}
                    process = ServerProcess(
                        name, command, serving_env(idle_settings, "idle"), port, workdir / f"{name}.log"
                    )
                else:
                    command = [sys.executable, "-m", "bench.peers", "--port", str(port)]
                    process = ServerProcess(name, command, env, port, workdir / f"{name}.log")
                stack.callback(process.stop)
                process.start()
                print(f"idle: {name} pid {process.pid} at {process.url}", flush=True)
                return process

            where = "PostgreSQL" if database else "SQLite"
            chatstream = None
            if streaming:
                chatstream = server("chatstream", "server")
                print(f"chatstream pid {chatstream.pid} at {chatstream.url} ({where})", flush=True)
            else:
                print(f"idle only, on {where}: each transport gets a server of its own", flush=True)
            peers = None
            if streaming and any(t not in CHATSTREAM_TRANSPORTS for t in args.transports):
                peer_port = free_port()
                peer_command = [sys.executable, "-m", "bench.peers", "--port", str(peer_port)]
                peers = ServerProcess("peers", peer_command, env, peer_port, workdir / "peers.log")
                stack.callback(peers.stop)
                peers.start()
                print(f"peers pid {peers.pid} at {peers.url}", flush=True)
            redis = producer = reader = None
            if args.redis_url and streaming:
                redis = RedisServer(args.redis_url)
                stack.callback(redis.cleanup)  # after A and B stop (the stack unwinds in reverse)
                producer = server("chatstream-a", "producer", redis)
                reader = server("chatstream-b", "reader", redis)
                pid_note = f"pid {redis.pid}" if redis.pid is not None else "pid unknown: its CPU is not measured"
                print(
                    f"scale-out: A (producer) pid {producer.pid} at {producer.url}, B (reader) pid {reader.pid} "
                    f"at {reader.url}, Redis {redis.version} ({pid_note}), key prefix {redis.prefix}",
                    flush=True,
                )
            bench = Bench(
                args=args,
                chatstream=chatstream,
                peers=peers,
                api_token=token,
                agents=agents,
                database=database,
                sqlite_path=None if database else sqlite_path,
                producer=producer,
                reader=reader,
                redis=redis,
                start_idle_server=idle_server,
            )
            runs, idle_runs = asyncio.run(measure(bench))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report = Report(
        date=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        command=command,
        revision=revision(),
        machine=machine_info(),
        config={
            "streams": args.streams,
            "tokens": args.tokens,
            "pace_ms": args.pace_ms,
            "scenarios": args.scenarios,
            "transports": args.transports,
            "database": "postgresql" if args.database_url else "sqlite",
            "ramp_s": args.ramp,
            "warmup_streams": args.warmup,
            "ws_deflate": not args.no_ws_deflate,
            "server_env": args.server_env,
            "redis": bool(args.redis_url),
            "idle": {
                "pace_s": IDLE_PACE,
                "tokens": IDLE_TOKENS,
                "disconnect_grace_s": IDLE_GRACE,
                "open_concurrency": args.open_concurrency,
                "settle_s": args.idle_settle,
                "warmup_streams": min(args.warmup, args.streams),
            }
            if idle
            else None,
        },
        runs=runs,
        ratios=ratios(runs),
        scaleout_ratios=scaleout_ratios(runs),
        idle=idle_runs,
        idle_ratios=idle_ratios(idle_runs),
    )
    print()
    print(markdown_table(report))
    if args.json is not None:
        args.json.write_bytes(msgspec.json.format(msgspec.json.encode(report)) + b"\n")
    return 1 if any(r.failed_streams for r in runs) or not all(idle_ok(r) for r in idle_runs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
