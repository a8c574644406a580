"""The chatstream benchmark: `python -m bench.run [options]` from the repository root.

Starts two servers on 127.0.0.1, each in its own process so that CPU is attributable:
`chatstream serve --no-demo` on a fresh database (a SQLite file in a temporary
directory, or a temporary PostgreSQL database with `--database-url`) and the bare peers
of bench/peers.py under the same uvicorn options. Then, for each scenario (`llm`: the
echo agent paced at `--pace-ms`; `burst`: pace 0) and each transport, N concurrent
streams each receive one answer of T tokens:

- `sse`: its own httpx client: POST /api/conversations/{id}/messages (the answer
  starts), then GET …/stream?after=<generationId>.0, read as a stream;
- `ws`: its own socket on /api/ws (`websockets` client): `subscribe`, its ack, `send`;
- `peer-sse`, `peer-ws`: the same answers from the bare peers (GET /sse, /ws).

Every stream has its own conversation (one conversation runs one answer at a time),
created before the measured window. Figures per run: delivered tokens per second;
inter-token latency p50/p99 (gaps between consecutive tokens as the client sees them,
also as multiples of the pace); time to first token p50/p99, from the request that asks
for the answer (the POST, the `send` frame, the peer's GET or frame; an HTTP request
includes its TCP connect) to the first token; server CPU seconds per 1,000 delivered
tokens (utime+stime of the server process from /proc/<pid>/stat, before and after the
run) and, for each chatstream transport, its ratio to the bare peer's. With PostgreSQL
the CPU of the database backends serving chatstream's pool is reported beside it (on
SQLite that work is inside the server process). The load generator is this process, one
asyncio event loop; its CPU, and the server's, are sampled every 0.25 s so that a
saturated client (or server) shows as a peak near 1 core.

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
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
from websockets.asyncio.client import ClientConnection, connect

from bench.peers import token_words, tokens_of

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("llm", "burst")
TRANSPORTS = ("sse", "peer-sse", "ws", "peer-ws")
PEER_OF = {"sse": "peer-sse", "ws": "peer-ws"}
MAX_STREAMS = 1000
STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
# A client using more than this share of a core is reported as a possible bottleneck.
CLIENT_SATURATED = 0.9
SSE_ACCEPT = {"Accept": "text/event-stream"}
_TLS_CONTEXT = ssl.create_default_context()  # never used (plain HTTP) but httpx wants one
_LOGGED_ERROR = re.compile(r"\bERROR\b|^Traceback")


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
        for _event, data in parser.feed(chunk):
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

    def http_client(self) -> httpx.AsyncClient:
        """A client of its own for one stream, like a browser tab. (One shared client with
        hundreds of connections would measure httpcore's pool, whose bookkeeping is
        quadratic in its connections, rather than the server.)"""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        return httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=self.timeout,
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


async def chatstream_sse(target: Target, conversation: str, rec: Recorder) -> None:
    """POST the message (the answer starts), then read GET …/stream from the answer's start."""
    body = {"content": token_words(target.tokens), "clientMessageId": uuid.uuid4().hex}
    async with target.http_client() as client:
        rec.ask()
        posted = await client.post(f"/api/conversations/{conversation}/messages", json=body)
        if posted.status_code != 201:
            raise StreamFailed(f"POST message: {posted.status_code} {posted.text[:200]}")
        generation = posted.json()["generation"]
        if generation is None:
            raise StreamFailed("POST message started no answer")
        # From the answer's first event: without a cursor, an answer that ended before this
        # GET arrives is not found (204), which happens at pace 0.
        url = f"/api/conversations/{conversation}/stream?after={generation['id']}.0"
        async with client.stream("GET", url, headers=SSE_ACCEPT) as response:
            if response.status_code != 200:
                await response.aread()
                raise StreamFailed(f"GET stream: {response.status_code} {response.text[:200]}")
            await read_sse(response, rec)


async def chatstream_ws(target: Target, conversation: str, rec: Recorder) -> None:
    """One socket: `subscribe`, wait for its ack, `send`, read until `done`."""
    async with connect(f"{target.ws_url}/api/ws", **target.ws_options()) as ws:
        await ws.send(msgspec.json.encode({"type": "subscribe", "conversationId": conversation, "ref": "sub"}).decode())
        async for frame in ws:
            event = _wire.decode(frame)
            if event.type == "ack" and event.ref == "sub":
                break
            if event.type == "error":
                raise StreamFailed(f"subscribe: {event.code}")
        send = {
            "type": "send",
            "conversationId": conversation,
            "content": token_words(target.tokens),
            "clientMessageId": uuid.uuid4().hex,
            "ref": "send",
        }
        rec.ask()
        await ws.send(msgspec.json.encode(send).decode())
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
    """The server's environment: this one without chatstream settings, plus the database."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith("CHATSTREAM_")}
    env["PYTHONUNBUFFERED"] = "1"
    # One key posts every stream's message: lift the per-key message limit for the load.
    env["CHATSTREAM_MESSAGES_PER_MINUTE"] = "1000000"
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    else:
        env["CHATSTREAM_SQLITE_PATH"] = str(sqlite_path)
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

    async def backend_cpu(self) -> dict[int, float]:
        """CPU seconds of each backend process connected to the database now (the server's pool)."""
        rows = await self._admin("SELECT pid FROM pg_stat_activity WHERE datname = $1", self.name)
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


class Ratio(msgspec.Struct, kw_only=True):
    """Server CPU per token of a chatstream transport divided by its bare peer's."""

    scenario: str
    transport: str
    peer: str
    cpu_per_token_ratio: float | None


class Report(msgspec.Struct, kw_only=True):
    """Everything one invocation measured."""

    date: str
    command: str
    revision: str | None
    machine: dict[str, Any]
    config: dict[str, Any]
    runs: list[RunResult]
    ratios: list[Ratio]


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
    chatstream: ServerProcess
    peers: ServerProcess
    api_token: str
    agents: dict[float, str]  # pace → agent id
    database: PostgresDatabase | None = None  # None: SQLite, whose work is in the server process

    def pace_of(self, scenario: str) -> float:
        """Seconds before each token in this scenario."""
        return float(self.args.pace_ms) / 1000 if scenario == "llm" else 0.0

    def stream_timeout(self, pace: float) -> float:
        """Seconds one stream may take, from its (ramped) start to its last token."""
        if self.args.stream_timeout is not None:
            return float(self.args.stream_timeout)
        return 60.0 + float(self.args.ramp) + int(self.args.tokens) * pace * 5

    async def create_conversations(self, count: int, pace: float) -> list[str]:
        """`count` new conversations with the agent of this pace (through the API, 8 at a time)."""
        limit = asyncio.Semaphore(8)
        headers = {"Authorization": f"Bearer {self.api_token}"}
        async with httpx.AsyncClient(base_url=self.chatstream.url, headers=headers, timeout=60) as client:

            async def one(i: int) -> str:
                async with limit:
                    r = await client.post(
                        "/api/conversations", json={"title": f"bench {i}", "agentId": self.agents[pace]}
                    )
                if r.status_code != 201:
                    raise BenchError(f"POST /api/conversations: {r.status_code} {r.text[:200]}")
                return str(r.json()["id"])

            return list(await asyncio.gather(*(one(i) for i in range(count))))

    async def run(self, scenario: str, transport: str, streams: int) -> RunResult:
        """N concurrent streams of one answer each; the figures of the run."""
        pace = self.pace_of(scenario)
        chat = transport in PEER_OF
        server = self.chatstream if chat else self.peers
        target = Target(
            base_url=server.url,
            token=self.api_token if chat else None,
            tokens=self.args.tokens,
            pace=pace,
            ws_deflate=not self.args.no_ws_deflate,
            timeout=self.stream_timeout(pace),
        )
        conversations = await self.create_conversations(streams, pace) if chat else []
        expected = tokens_of(token_words(self.args.tokens))
        recorders = [Recorder(expected=expected) for _ in range(streams)]

        def stream_of(i: int) -> Callable[[], Awaitable[None]]:
            rec = recorders[i]
            if transport == "sse":
                return lambda: chatstream_sse(target, conversations[i], rec)
            if transport == "ws":
                return lambda: chatstream_ws(target, conversations[i], rec)
            if transport == "peer-sse":
                return lambda: peer_sse(target, rec)
            return lambda: peer_ws(target, rec)

        async def guarded(i: int) -> None:
            rec = recorders[i]
            try:
                if self.args.ramp > 0:
                    await asyncio.sleep(self.args.ramp * i / streams)
                async with asyncio.timeout(target.timeout):
                    await stream_of(i)()
            except Exception as exc:  # noqa: BLE001 — a failed stream is counted and reported, not raised
                rec.error = f"{type(exc).__name__}: {exc}"[:300]

        await asyncio.sleep(self.args.settle)  # let the previous run's connections close
        log_offset = server.log_size()
        sampler = CpuSampler(server.pid)
        sampling = asyncio.create_task(sampler.run())
        database = self.database if chat else None
        try:
            db_cpu0 = await database.backend_cpu() if database else {}
            server_cpu0, client_cpu0 = cpu_seconds(server.pid), own_cpu_seconds()
            started = time.perf_counter()
            await asyncio.gather(*(guarded(i) for i in range(streams)))
            wall = time.perf_counter() - started
            await asyncio.sleep(0.2)  # the server's last writes and closes belong to this run
            server_cpu = cpu_seconds(server.pid) - server_cpu0
            client_cpu = own_cpu_seconds() - client_cpu0
            db_cpu1 = await database.backend_cpu() if database else {}
            db_cpu = sum(used - db_cpu0.get(pid, 0.0) for pid, used in db_cpu1.items()) if database else None
        finally:
            sampling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampling
        log = server.log_since(log_offset)
        return summarize(
            scenario,
            transport,
            pace,
            self.args.tokens,
            recorders,
            Usage(
                wall=wall,
                server_cpu=server_cpu,
                client_cpu=client_cpu,
                db_cpu=db_cpu,
                server_peak=sampler.server_peak,
                client_peak=sampler.client_peak,
                log_errors=sum(1 for line in log.splitlines() if _LOGGED_ERROR.search(line)),
            ),
        )


class CpuSampler:
    """The busiest `interval` of the server process and of this one, in cores, while it runs."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.pid = pid
        self.interval = interval
        self.server_peak = 0.0
        self.client_peak = 0.0

    async def run(self) -> None:
        then, server, client = time.perf_counter(), cpu_seconds(self.pid), own_cpu_seconds()
        while True:
            await asyncio.sleep(self.interval)
            now, server_now, client_now = time.perf_counter(), cpu_seconds(self.pid), own_cpu_seconds()
            self.server_peak = max(self.server_peak, (server_now - server) / (now - then))
            self.client_peak = max(self.client_peak, (client_now - client) / (now - then))
            then, server, client = now, server_now, client_now


@dataclass
class Usage:
    """What a run cost: wall time, CPU seconds, the busiest moments, errors the server logged."""

    wall: float
    server_cpu: float
    client_cpu: float
    db_cpu: float | None  # PostgreSQL backends of the server's pool; None on SQLite (in-process)
    server_peak: float
    client_peak: float
    log_errors: int


def summarize(
    scenario: str, transport: str, pace: float, tokens: int, recorders: list[Recorder], usage: Usage
) -> RunResult:
    """The figures of a run from what each stream recorded."""
    delivered = sum(len(r.texts) for r in recorders)
    gaps = [g for r in recorders for g in r.gaps]
    ttfts = [t for r in recorders if (t := r.ttft) is not None]
    itl50, itl99 = percentile(gaps, 0.5), percentile(gaps, 0.99)
    errors = sorted({r.error for r in recorders if r.error})
    ok = sum(1 for r in recorders if r.ok and not r.error)
    wall = max(usage.wall, 1e-9)
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
        server_cpu_s=round(usage.server_cpu, 3),
        server_cpu_s_per_1k_tokens=round(usage.server_cpu / delivered * 1000, 4) if delivered else None,
        server_core_use=round(usage.server_cpu / wall, 3),
        # A run shorter than one sampling window has no sample: its average is its peak.
        server_core_peak=round(max(usage.server_peak, usage.server_cpu / wall), 2),
        db_cpu_s=None if usage.db_cpu is None else round(usage.db_cpu, 3),
        db_cpu_s_per_1k_tokens=round(usage.db_cpu / delivered * 1000, 4)
        if usage.db_cpu is not None and delivered
        else None,
        client_cpu_s=round(usage.client_cpu, 3),
        client_core_use=round(usage.client_cpu / wall, 3),
        client_core_peak=round(max(usage.client_peak, usage.client_cpu / wall), 2),
        client_saturated=max(usage.client_peak, usage.client_cpu / wall) >= CLIENT_SATURATED,
        server_log_errors=usage.log_errors,
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
    for package in ("litestar", "uvicorn", "msgspec", "websockets", "httpx", "piccolo"):
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
    return "\n".join(rows)


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description="Benchmark chatstream's streaming.")
    parser.add_argument("--streams", type=int, default=200, help=f"concurrent streams (1..{MAX_STREAMS}; default 200)")
    parser.add_argument("--tokens", type=int, default=100, help="tokens per answer (default 100)")
    parser.add_argument("--pace-ms", type=float, default=20.0, help="echo pace of the `llm` scenario (default 20)")
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {', '.join(SCENARIOS)} (default all)"
    )
    parser.add_argument(
        "--transports", default=",".join(TRANSPORTS), help=f"comma-separated, of {', '.join(TRANSPORTS)} (default all)"
    )
    parser.add_argument(
        "--database-url",
        default=None,
        help="a PostgreSQL server (e.g. postgresql://postgres@127.0.0.1:5432): a temporary database is made "
        "there and dropped after; default: a SQLite file in a temporary directory",
    )
    parser.add_argument("--ramp", type=float, default=0.0, help="spread stream starts over this many seconds")
    parser.add_argument("--warmup", type=int, default=10, help="streams of an unmeasured run per transport first")
    parser.add_argument("--settle", type=float, default=1.0, help="idle seconds before each measured run")
    parser.add_argument("--stream-timeout", type=float, default=None, help="seconds a stream may take (default: auto)")
    parser.add_argument("--no-ws-deflate", action="store_true", help="do not offer permessage-deflate on sockets")
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
    if not 1 <= args.streams <= MAX_STREAMS:
        parser.error(f"--streams must be between 1 and {MAX_STREAMS}")
    if args.tokens < 1 or args.pace_ms < 0 or args.ramp < 0 or args.warmup < 0 or args.settle < 0:
        parser.error("--tokens must be at least 1; --pace-ms, --ramp, --warmup and --settle not negative")
    args.scenarios = list(dict.fromkeys(s.strip() for s in args.scenarios.split(",") if s.strip()))
    args.transports = list(dict.fromkeys(t.strip() for t in args.transports.split(",") if t.strip()))
    if any("=" not in item for item in args.server_env):
        parser.error("--server-env takes NAME=VALUE")
    bad = [s for s in args.scenarios if s not in SCENARIOS] + [t for t in args.transports if t not in TRANSPORTS]
    if bad or not args.scenarios or not args.transports:
        parser.error(f"unknown or missing scenarios/transports: {', '.join(bad) or 'none given'}")
    return args


def raise_open_files_limit(needed: int) -> None:
    """Sockets: each stream holds one on each side; the servers inherit the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


async def measure(bench: Bench) -> list[RunResult]:
    """Every (scenario, transport) run, each transport warmed up once first."""
    runs: list[RunResult] = []
    warmed: set[str] = set()
    for scenario in bench.args.scenarios:
        for transport in (t for t in TRANSPORTS if t in bench.args.transports):
            if transport not in warmed and bench.args.warmup > 0:
                await bench.run("burst", transport, min(bench.args.warmup, bench.args.streams))
                warmed.add(transport)
            result = await bench.run(scenario, transport, bench.args.streams)
            runs.append(result)
            note = f" — {result.failed_streams} failed: {result.errors[:1]}" if result.failed_streams else ""
            per_1k = _fmt(result.server_cpu_s_per_1k_tokens, 3)
            print(
                f"{scenario:5} {transport:8} {result.ok_streams}/{result.streams} ok, "
                f"{result.tokens_per_s:.0f} tokens/s, server {result.server_cpu_s:.2f} CPU s ({per_1k} per 1k tokens), "
                f"client cores avg {result.client_core_use:.2f} peak {result.client_core_peak:.2f}{note}",
                flush=True,
            )
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; exit status 1 if any stream failed."""
    args = parse_args(argv)
    raise_open_files_limit(4 * args.streams + 256)
    command = shlex.join(["python", "-m", "bench.run", *(sys.argv[1:] if argv is None else argv)])
    workdir = Path(tempfile.mkdtemp(prefix="chatstream-bench-"))
    try:
        # Unwound in reverse: the servers stop before their database is dropped.
        with contextlib.ExitStack() as stack:
            database = stack.enter_context(temporary_postgres(args.database_url)) if args.database_url else None
            env = server_env(database.url if database else None, workdir / "chatstream.db")
            env.update(item.split("=", 1) for item in args.server_env)
            run_cli(env, "migrate")
            company = run_cli(env, "company", "create", f"bench-{uuid.uuid4().hex[:8]}")
            company_id, token = company["company"]["id"], company["adminKey"]["token"]
            agents: dict[float, str] = {}
            for pace in sorted({args.pace_ms / 1000 if s == "llm" else 0.0 for s in [*args.scenarios, "burst"]}):
                config = json.dumps({"pace": pace})
                agent = run_cli(
                    env, "agent", "create", "--company", company_id, "--name", f"echo {pace}", "--config", config
                )
                agents[pace] = agent["id"]
            chat_port, peer_port = free_port(), free_port()
            chatstream = ServerProcess(
                "chatstream", console_command("serve", "--no-demo", "--port", str(chat_port)), env, chat_port,
                workdir / "chatstream.log",
            )  # fmt: skip
            stack.callback(chatstream.stop)
            chatstream.start()
            peer_command = [sys.executable, "-m", "bench.peers", "--port", str(peer_port)]
            peers = ServerProcess("peers", peer_command, env, peer_port, workdir / "peers.log")
            stack.callback(peers.stop)
            peers.start()
            print(
                f"chatstream pid {chatstream.pid} at {chatstream.url} ({'PostgreSQL' if database else 'SQLite'}), "
                f"peers pid {peers.pid} at {peers.url}",
                flush=True,
            )
            bench = Bench(
                args=args, chatstream=chatstream, peers=peers, api_token=token, agents=agents, database=database
            )
            runs = asyncio.run(measure(bench))
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
        },
        runs=runs,
        ratios=ratios(runs),
    )
    print()
    print(markdown_table(report))
    if args.json is not None:
        args.json.write_bytes(msgspec.json.format(msgspec.json.encode(report)) + b"\n")
    return 1 if any(r.failed_streams for r in runs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
