"""`GET /api/ws` on the wire: a real `chatstream serve` (uvicorn) on a free port and the
real `websockets` client.

Every behavioural test runs twice, once per encoding: JSON text frames, and MessagePack
binary frames with subprotocol `chatstream.msgpack` (the `encoding` fixture). What is
checked: the upgrade's authentication and close codes, the encodings, every client frame
and its answer, generation events and conversation changes reaching subscribers, resume
by cursor (from this socket or from SSE) exactly once, bad frames answered with `error`
frames on a socket that stays usable, the per-socket limits, protocol pings, and a peer
that stops reading.

Nothing waits by sleeping: tests wait on frames (every read is bounded by `STEP` seconds
so a broken server fails the test instead of hanging it). A paused client's wait for the
server's keepalive is counted in the server's own pings on another socket. The only polls,
each in a bounded loop, are of what has no event to wait on: `GET /api/generations/{id}`,
the server's log output, and the server's end of a TCP connection (/proc/net/tcp).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import anyio
import httpx
import msgspec
import pytest
from httpx_sse import EventSource, aconnect_sse
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close, Frame, Opcode

from app.agents.schemas import AgentCreate
from app.agents.service import create_agent
from app.config import get_settings
from app.streaming.protocol import PROTOCOL_VERSION
from tests.factories import Tenant
from tests.integration.live_server import LiveServer
from tests.integration.wire_api import make_agent, messages_of, new_conversation, post_message, text_of
from tests.parts_support import (
    PART_EVENTS,
    answer_of,
    echo_parts,
    echo_text,
    folded,
    in_tool_call,
    kinds,
    make_parts_agent,
    parts_of,
)

pytestmark = pytest.mark.anyio

STEP = 10.0  # the longest any single read (or settle poll) may take before the test fails
MSGPACK = "chatstream.msgpack"
TERMINAL = ("done", "cancelled", "error")
REPLIES = ("ack", "error", "pong")
EVIL = "http://evil.example"
EXTRA_ORIGIN = "https://app.example"
ZERO_UUID = "00000000-0000-0000-0000-000000000000"

# The keepalive server pings every PING_INTERVAL s and drops a peer that has not answered in PING_TIMEOUT s.
PING_INTERVAL = 0.25
PING_TIMEOUT = 0.5
# The limits server.
FRAMES_PER_MINUTE = 20
MAX_SUBSCRIPTIONS = 2
MAX_FRAME_BYTES = 2048
# Long answers (8000 words each) followed by the socket that stops reading.
LONG_ANSWERS = 5


# -- servers and clients --------------------------------------------------------------------------------


def live_server(env: dict[str, str]) -> Iterator[LiveServer]:
    with LiveServer(env) as live:
        yield live


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    """The server with default WebSocket settings (and one extra allowed origin)."""
    yield from live_server({"CHATSTREAM_WS_ALLOWED_ORIGINS": EXTRA_ORIGIN})


@pytest.fixture(scope="module")
def limits_server() -> Iterator[LiveServer]:
    """Small per-socket limits: frames per minute, subscriptions, frame size."""
    yield from live_server(
        {
            "CHATSTREAM_WS_FRAMES_PER_MINUTE": str(FRAMES_PER_MINUTE),
            "CHATSTREAM_WS_MAX_SUBSCRIPTIONS": str(MAX_SUBSCRIPTIONS),
            "CHATSTREAM_WS_MAX_FRAME_BYTES": str(MAX_FRAME_BYTES),
        }
    )


@pytest.fixture(scope="module")
def keepalive_server() -> Iterator[LiveServer]:
    """Protocol pings every PING_INTERVAL s, PING_TIMEOUT s to answer."""
    yield from live_server(
        {"CHATSTREAM_WS_PING_INTERVAL": str(PING_INTERVAL), "CHATSTREAM_WS_PING_TIMEOUT": str(PING_TIMEOUT)}
    )


@pytest.fixture(scope="module")
def slow_server() -> Iterator[LiveServer]:
    """A peer may leave its outbox full for 1 s; the log keeps every event of a long answer."""
    yield from live_server({"CHATSTREAM_WS_SEND_TIMEOUT": "1", "CHATSTREAM_LOG_RETAIN": "10000"})


@pytest.fixture(scope="module")
def unread_server() -> Iterator[LiveServer]:
    """Like `slow_server`, and the kernel drops a connection that accepts no data for 3 s."""
    yield from live_server(
        {"CHATSTREAM_WS_SEND_TIMEOUT": "1", "CHATSTREAM_LOG_RETAIN": "10000", "CHATSTREAM_TCP_USER_TIMEOUT": "3"}
    )


@pytest.fixture(scope="module")
def small_log_server() -> Iterator[LiveServer]:
    """Keeps 5 events per answer and drops a log as soon as its answer ends: readers get
    snapshots, then the stored outcome."""
    yield from live_server({"CHATSTREAM_LOG_RETAIN": "5", "CHATSTREAM_LOG_TTL": "0"})


# Server output a test checked itself (server id -> lines checked), left out of the general check.
CHECKED_OUTPUT: dict[int, int] = {}


def logged_errors(lines: list[str]) -> list[str]:
    return [line for line in lines if "Traceback" in line or " ERROR " in line or line.startswith("ERROR")]


async def assert_no_error_logged_since(server: LiveServer, mark: int, encoding: str, acme: Tenant) -> None:
    """No error or traceback in the server's output since line `mark`, read up to the accept
    line of a later socket (so that nothing printed before it is missed)."""
    accepted = sum("[accepted]" in line for line in server.lines[mark:])
    async with open_socket(server, encoding, acme.headers("alice")) as barrier:
        await barrier.assert_usable()
    with anyio.fail_after(STEP):
        while True:  # polling the server's output: there is no event to wait on
            if sum("[accepted]" in line for line in server.lines[mark:]) > accepted:
                break
            await anyio.sleep(0.02)
    output = server.lines[mark:]
    CHECKED_OUTPUT[id(server)] = mark + len(output)
    assert not logged_errors(output), "the server logged an error for a client's frames:\n" + "".join(output)


@pytest.fixture(autouse=True)
def server_logs_are_clean() -> Iterator[None]:
    """Whatever a test does to the wire, no server logs a traceback or an error. (A line
    printed late may show up under the next test.)"""
    starts = {id(live): len(live.lines) for live in LiveServer.running}
    yield
    for live in LiveServer.running:
        new = live.lines[max(starts.get(id(live), 0), CHECKED_OUTPUT.get(id(live), 0)) :]
        assert not logged_errors(new), f"the server at {live.url} logged errors:\n" + "".join(new)


@pytest.fixture(params=["json", "msgpack"])
def encoding(request: pytest.FixtureRequest) -> str:
    """JSON text frames, or MessagePack binary frames (subprotocol `chatstream.msgpack`)."""
    value: str = request.param
    return value


@pytest.fixture
async def http(server: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=STEP) as client:
        yield client


def plain(value: Any) -> Any:
    """What a value looks like in JSON (MessagePack timestamps become the same strings)."""
    return msgspec.json.decode(msgspec.json.encode(value))


class PingCounting(ClientConnection):
    """A client connection that notes when each protocol ping of the server arrives."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ping_times: list[float] = []
        self.ping_arrived = asyncio.Event()

    def process_event(self, event: Any) -> None:
        if isinstance(event, Frame) and event.opcode is Opcode.PING:
            self.ping_times.append(time.monotonic())
            self.ping_arrived.set()
        super().process_event(event)

    async def pings(self, count: int) -> list[float]:
        """Arrival times of the first `count` pings (waits for them)."""
        with anyio.fail_after(STEP):
            while len(self.ping_times) < count:
                self.ping_arrived.clear()
                await self.ping_arrived.wait()
        return self.ping_times[:count]


class Socket:
    """One client socket in one encoding: sends dict frames, receives decoded dicts.

    Frames that arrive while the test waits for another one stay `pending` (in arrival
    order) for a later wait; `log` has every frame received, in order."""

    def __init__(self, conn: ClientConnection, encoding: str) -> None:
        self.conn = conn
        self.msgpack = encoding == "msgpack"
        self.pending: list[dict[str, Any]] = []
        self.log: list[dict[str, Any]] = []
        self.raw: list[str | bytes] = []
        self.hello: dict[str, Any] | None = None
        self.conversation_seqs: dict[str, int] = {}  # the latest conversationSeq of each conversation
        self._refs = itertools.count(1)

    def encode(self, frame: Any) -> str | bytes:
        return msgspec.msgpack.encode(frame) if self.msgpack else json.dumps(frame)

    async def send(self, frame: Any) -> None:
        await self.conn.send(self.encode(frame))

    async def _receive(self) -> dict[str, Any]:
        """The next frame; the greeting (`hello`, always the first) is kept in `hello` instead."""
        while True:
            with anyio.fail_after(STEP):
                data = await self.conn.recv()
            self.raw.append(data)
            if self.msgpack:
                assert isinstance(data, bytes), f"a text frame on a MessagePack socket: {data!r}"
                frame = plain(msgspec.msgpack.decode(data))
            else:
                assert isinstance(data, str), f"a binary frame on a JSON socket: {data!r}"
                frame = json.loads(data)
            assert isinstance(frame, dict) and isinstance(frame.get("type"), str), frame
            assert frame.get("code") != "internal_error", frame
            self.log.append(frame)
            if "conversationSeq" in frame and frame["type"] not in ("ack", "conversation.reset"):
                # A conversation's events come in order (the ack and a reset say where it stands).
                last = self.conversation_seqs.get(frame["conversationId"], 0)
                assert frame["conversationSeq"] > last, (last, frame)
                self.conversation_seqs[frame["conversationId"]] = frame["conversationSeq"]
            if frame["type"] != "hello":
                return frame
            assert len(self.log) == 1, f"hello is the first frame, not {self.log}"
            self.hello = frame

    async def _find(self, match: Callable[[dict[str, Any]], bool], take: bool) -> dict[str, Any]:
        checked = 0
        while True:
            while checked < len(self.pending):
                frame = self.pending[checked]
                if match(frame):
                    return self.pending.pop(checked) if take else frame
                checked += 1
            self.pending.append(await self._receive())

    async def wait_for(self, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Take the first frame (pending or arriving) that matches; the others stay pending."""
        return await self._find(match, take=True)

    async def peek(self, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Wait until a frame that matches has arrived, leaving it pending."""
        return await self._find(match, take=False)

    def next_ref(self) -> str:
        return f"r{next(self._refs)}"

    async def request(self, frame: dict[str, Any]) -> dict[str, Any]:
        """Send a frame with a fresh `ref`; the ack, error or pong carrying it back."""
        ref = self.next_ref()
        await self.send({**frame, "ref": ref})
        return await self.wait_for(lambda f: f["type"] in REPLIES and f.get("ref") == ref)

    async def ack(self, frame: dict[str, Any]) -> dict[str, Any]:
        reply = await self.request(frame)
        assert reply["type"] == "ack", (frame, reply)
        return reply

    async def refused(self, frame: dict[str, Any], code: str) -> dict[str, Any]:
        reply = await self.request(frame)
        assert_error_frame(reply, code, reply.get("ref"))
        assert reply.get("ref") is not None
        return reply

    async def error_for(self, data: str | bytes) -> dict[str, Any]:
        """Send raw bytes (or text); the next error frame."""
        await self.conn.send(data)
        return await self.wait_for(lambda f: f["type"] == "error" and "generationId" not in f)

    async def assert_usable(self) -> None:
        """The socket still answers: a ping gets its pong (with the ref)."""
        ref = self.next_ref()
        await self.send({"type": "ping", "ref": ref})
        reply = await self.wait_for(lambda f: f["type"] in REPLIES and f.get("ref") == ref)
        assert reply == {"type": "pong", "ref": ref}

    async def events(self, generation_id: str, tokens: int) -> list[dict[str, Any]]:
        """Take the generation's events until `tokens` token events came (no terminal event)."""
        got: list[dict[str, Any]] = []
        while sum(e["type"] == "token" for e in got) < tokens:
            got.append(await self.wait_for(of_generation(generation_id)))
            assert got[-1]["type"] not in TERMINAL, got
        return got

    async def events_until(self, generation_id: str, match: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """Take the generation's events until one that matches (the last one returned; no terminal event)."""
        got: list[dict[str, Any]] = []
        while not got or not match(got[-1]):
            got.append(await self.wait_for(of_generation(generation_id)))
            assert got[-1]["type"] not in TERMINAL, got
        return got

    async def answer(self, generation_id: str) -> list[dict[str, Any]]:
        """Take the generation's events up to and including its terminal event."""
        got: list[dict[str, Any]] = []
        while not got or got[-1]["type"] not in TERMINAL:
            got.append(await self.wait_for(of_generation(generation_id)))
        return got

    async def closed(self) -> Close | None:
        """Read until the server closes the connection; the close frame it sent (None: the
        TCP connection just ended). Frames read on the way stay pending."""
        with anyio.fail_after(STEP):
            try:
                while True:
                    self.pending.append(await self._receive())
            except ConnectionClosed as exc:
                return exc.rcvd

    async def close_or_pong(self) -> Close | None:
        """Send a ping: None when its pong comes back (the socket is still open), else the
        close frame the server sent. Frames read on the way stay pending."""
        ref = self.next_ref()
        try:
            await self.send({"type": "ping", "ref": ref})
            await self.wait_for(lambda f: f["type"] == "pong" and f.get("ref") == ref)
        except ConnectionClosed as exc:
            return exc.rcvd
        return None

    def after(self, frame: dict[str, Any]) -> list[dict[str, Any]]:
        """Every frame received after this one."""
        index = next(i for i, f in enumerate(self.log) if f is frame)
        return self.log[index + 1 :]


def of_generation(generation_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda f: f.get("generationId") == generation_id and "seq" in f


def message_created(message_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda f: f["type"] == "message.created" and f["message"]["id"] == message_id


def ws_url(live: LiveServer) -> str:
    return live.url.replace("http://", "ws://", 1) + "/api/ws"


@asynccontextmanager
async def open_socket(
    live: LiveServer,
    encoding: str,
    headers: dict[str, str] | None = None,
    *,
    origin: str | None = None,
    compression: str | None = "deflate",
    connection: type[ClientConnection] = ClientConnection,
) -> AsyncIterator[Socket]:
    """A socket to `/api/ws` (offering `chatstream.msgpack` for MessagePack, which the
    server must select); the client sends no protocol pings of its own."""
    msgpack = encoding == "msgpack"
    with anyio.fail_after(STEP):
        conn = await connect(
            ws_url(live),
            additional_headers=headers,
            origin=origin,  # type: ignore[arg-type]
            subprotocols=[MSGPACK] if msgpack else None,  # type: ignore[list-item]
            compression=compression,
            proxy=None,
            ping_interval=None,
            close_timeout=1,
            create_connection=connection,
        )
    try:
        assert conn.subprotocol == (MSGPACK if msgpack else None)
        yield Socket(conn, encoding)
    finally:
        with anyio.move_on_after(STEP):
            await conn.close()


# -- frames and checks -------------------------------------------------------------------------------


def subscribe(conversation_id: str, after: str | None = None) -> dict[str, Any]:
    frame = {"type": "subscribe", "conversationId": conversation_id}
    return frame if after is None else {**frame, "after": after}


def send(conversation_id: str, content: str, client_message_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "send",
        "conversationId": conversation_id,
        "content": content,
        "clientMessageId": client_message_id,
        **extra,
    }


def assert_error_frame(frame: dict[str, Any], code: str, ref: str | None) -> None:
    """An `error` frame (not a generation's `error` event) with this code and ref."""
    assert frame["type"] == "error" and frame["code"] == code, (code, frame)
    assert isinstance(frame["message"], str) and frame["message"], frame
    assert "generationId" not in frame and "seq" not in frame, frame
    assert frame.get("ref") == ref, (ref, frame)
    assert set(frame) <= {"type", "code", "message", "ref", "details"}, frame


def cursor_of(event: dict[str, Any]) -> str:
    return f"{event['generationId']}.{event['seq']}"


def seqs(events: list[dict[str, Any]]) -> list[int]:
    return [e["seq"] for e in events]


def assert_contiguous(events: list[dict[str, Any]], first: int) -> None:
    """Seqs run first, first+1, … with no gap and no repeat."""
    assert seqs(events) == list(range(first, first + len(events))), seqs(events)


def assert_whole_answer(events: list[dict[str, Any]], conversation_id: str) -> None:
    """`start` at seq 1, then tokens, then one terminal event; every event of one generation
    and this conversation, with exactly the fields of its type."""
    assert_contiguous(events, 1)
    assert events[0]["type"] == "start" and events[-1]["type"] in TERMINAL
    assert {e["type"] for e in events[1:-1]} <= {"token"}
    assert len({e["generationId"] for e in events}) == 1
    assert {e["conversationId"] for e in events} == {conversation_id}
    common = {"type", "generationId", "conversationId", "seq"}
    assert set(events[0]) == common | {"replyToId", "agentId"}, events[0]
    for token in events[1:-1]:
        assert set(token) == common | {"text"} and token["text"], token
    end = {"done": {"messageId", "tokenCount", "finishReason"}, "cancelled": {"reason", "messageId"}}
    if events[-1]["type"] in end:
        assert set(events[-1]) == common | end[events[-1]["type"]], events[-1]
    else:
        assert common | {"code", "message"} <= set(events[-1]), events[-1]


def words(n: int, tag: str = "w") -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


# -- setup through the API --------------------------------------------------------------------------


async def settled(http: httpx.AsyncClient, tenant: Tenant, generation_id: str, who: str = "alice") -> dict[str, Any]:
    """The generation once it is no longer `running` (bounded poll: there is no event to wait on)."""
    with anyio.fail_after(STEP):
        while True:
            response = await http.get(f"/api/generations/{generation_id}", headers=tenant.headers(who))
            assert response.status_code == 200, response.text
            body: dict[str, Any] = response.json()
            if body["status"] != "running":
                return body
            await anyio.sleep(0.05)


class SSE:
    """Decoded events of one `GET /api/conversations/{id}/stream` response."""

    def __init__(self, source: EventSource) -> None:
        self._events = source.aiter_sse()

    async def next(self) -> dict[str, Any] | None:
        """The next event, or None when the response has ended."""
        with anyio.fail_after(STEP):
            while True:
                try:
                    sse = await anext(self._events)
                except StopAsyncIteration:
                    return None
                if sse.data:  # httpx-sse yields an empty event for a `: ping` comment
                    break
        data: dict[str, Any] = json.loads(sse.data)
        assert sse.event == data["type"] and sse.id == cursor_of(data), (sse, data)
        return data

    async def until(self, match: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        while not got or not match(got[-1]):
            event = await self.next()
            assert event is not None and event["type"] not in TERMINAL, [*got, event]
            got.append(event)
        return got

    async def until_tokens(self, count: int) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        while sum(e["type"] == "token" for e in got) < count:
            event = await self.next()
            assert event is not None and event["type"] not in TERMINAL, [*got, event]
            got.append(event)
        return got

    async def to_end(self) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        while not got or got[-1]["type"] not in TERMINAL:
            event = await self.next()
            assert event is not None, f"the response ended without a terminal event: {got}"
            got.append(event)
        return got


@asynccontextmanager
async def sse_stream(http: httpx.AsyncClient, conversation_id: str, headers: dict[str, str]) -> AsyncIterator[SSE]:
    with anyio.fail_after(STEP):
        opened = aconnect_sse(http, "GET", f"/api/conversations/{conversation_id}/stream", headers=headers)
        source = await opened.__aenter__()
    try:
        assert source.response.status_code == 200, source.response.status_code
        yield SSE(source)
    finally:
        await opened.__aexit__(None, None, None)


# -- 1. authentication -----------------------------------------------------------------------------------


async def session_cookie(live: LiveServer, token: str) -> dict[str, str]:
    """`POST /api/session` with the key; the cookie as a browser would send it on the upgrade."""
    async with httpx.AsyncClient(base_url=live.url, timeout=STEP) as browser:
        login = await browser.post("/api/session", json={"key": token})
        assert login.status_code == 200, login.text
        return {"Cookie": f"chatstream_session={login.cookies['chatstream_session']}"}


async def test_bearer_and_cookie_authenticate_the_upgrade(
    server: LiveServer, http: httpx.AsyncClient, acme: Tenant, encoding: str
) -> None:
    """Rule: the upgrade takes `Authorization: Bearer <key>` (from any origin: a header is not
    ambient) or the session cookie with no `Origin`, the server's own origin or a configured
    extra origin; the socket acts as that caller (own conversation yes, another member's
    not found, an admin reaches the company's)."""
    mine = await new_conversation(http, acme)
    bobs = await new_conversation(http, acme, who="bob")
    cookie = await session_cookie(server, acme.tokens["alice"])
    ways = [
        (acme.headers("alice"), None),
        (acme.headers("alice"), EVIL),
        (cookie, None),
        (cookie, server.url),
        (cookie, EXTRA_ORIGIN),
    ]
    for headers, origin in ways:
        async with open_socket(server, encoding, headers, origin=origin) as ws:
            await ws.assert_usable()
            ack = await ws.ack(subscribe(mine))
            assert ack == {"type": "ack", "ref": ack["ref"], "conversationId": mine, "conversationSeq": 1}
            await ws.refused(subscribe(bobs), "not_found")
    async with open_socket(server, encoding, acme.headers("admin")) as ws:
        await ws.ack(subscribe(mine))
        await ws.ack(subscribe(bobs))


async def test_cookie_from_a_foreign_origin_is_closed_with_4403(
    server: LiveServer, http: httpx.AsyncClient, acme: Tenant, encoding: str
) -> None:
    """Rule: a cookie-authenticated upgrade from a foreign `Origin` (a page of another site
    riding the browser's cookie) is closed with 4403 and a reason, before any frame."""
    cookie = await session_cookie(server, acme.tokens["alice"])
    for origin in (EVIL, f"http://127.0.0.1.evil.example:{server.port}", "null"):
        async with open_socket(server, encoding, cookie, origin=origin) as ws:
            close = await ws.closed()
            assert ws.log == []
        assert close is not None and close.code == 4403, (origin, close)
        assert "origin" in close.reason.lower(), close


@pytest.mark.parametrize(
    "case", ["nothing", "garbage_key", "not_bearer", "revoked_key", "revoked_cookie", "garbage_cookie"]
)
async def test_bad_credentials_are_closed_with_4401(
    server: LiveServer, http: httpx.AsyncClient, acme: Tenant, encoding: str, case: str
) -> None:
    """Rule: an upgrade with no credentials, a key that is not one, a malformed Authorization
    header, or a revoked key (as Bearer or inside an earlier session cookie) is closed with
    4401 and a reason that says what is wrong, before any frame."""
    created = await http.post("/api/keys", json={"name": "temporary"}, headers=acme.headers("admin"))
    assert created.status_code == 201, created.text
    key = created.json()
    cookie = await session_cookie(server, key["token"])
    revoked = await http.delete(f"/api/keys/{key['id']}", headers=acme.headers("admin"))
    assert revoked.status_code == 204, revoked.text
    headers, expected = {
        "nothing": ({}, "authentication required"),
        "garbage_key": ({"Authorization": "Bearer cs_not_a_key"}, "not valid"),
        "not_bearer": ({"Authorization": f"Basic {acme.tokens['alice']}"}, "bearer"),
        "revoked_key": ({"Authorization": f"Bearer {key['token']}"}, "revoked"),
        "revoked_cookie": (cookie, "revoked"),
        "garbage_cookie": ({"Cookie": "chatstream_session=cs_not_a_key"}, "not valid"),
    }[case]
    async with open_socket(server, encoding, headers) as ws:
        close = await ws.closed()
        assert ws.log == []
    assert close is not None and close.code == 4401, close
    assert expected in close.reason.lower(), close


# -- 2. encodings -------------------------------------------------------------------------------------------


async def test_msgpack_frames_carry_the_same_fields_as_json(
    server: LiveServer, http: httpx.AsyncClient, acme: Tenant
) -> None:
    """Rule: offering `chatstream.msgpack` makes the server select it and send binary
    MessagePack frames (and read them); without it, text JSON frames. The same answer
    and the same conversation changes reach a JSON and a MessagePack subscriber as the
    same frames, field for field (timestamps travel as MessagePack timestamps)."""
    agent = await make_agent(acme, 0)
    conversation = await new_conversation(http, acme, agent)
    alice = acme.headers("alice")
    async with open_socket(server, "json", alice) as js, open_socket(server, "msgpack", alice) as mp:
        assert js.conn.subprotocol is None and mp.conn.subprotocol == MSGPACK
        assert (await js.ack(subscribe(conversation)))["conversationId"] == conversation
        assert (await mp.ack(subscribe(conversation)))["conversationId"] == conversation

        sent = await mp.ack(send(conversation, "same words both ways", "enc-1"))
        assert set(sent) == {"type", "ref", "message", "generation", "created"} and sent["created"] is True
        generation = sent["generation"]["id"]
        user_id = sent["message"]["id"]
        js_events, mp_events = await js.answer(generation), await mp.answer(generation)
        assert_whole_answer(js_events, conversation)
        assert mp_events == js_events
        assert text_of(js_events) == "same words both ways"
        agent_id = js_events[-1]["messageId"]
        for message_id in (user_id, agent_id):
            assert await mp.wait_for(message_created(message_id)) == await js.wait_for(message_created(message_id))

        edited = await http.put(
            f"/api/conversations/{conversation}/messages/{user_id}", json={"content": "edited"}, headers=alice
        )
        assert edited.status_code == 200, edited.text
        is_edit = lambda f: f["type"] == "message.edited"  # noqa: E731
        js_edit, mp_edit = await js.wait_for(is_edit), await mp.wait_for(is_edit)
        assert mp_edit == js_edit and js_edit["message"] == edited.json()

        again = await js.ack(send(conversation, "same words both ways", "enc-1"))
        assert set(again) == set(sent) and again["created"] is False
        assert again["message"] == js_edit["message"] and again["generation"]["id"] == generation

    for offered, selected in ((["chatstream.cbor"], None), (["chatstream.cbor", MSGPACK], MSGPACK)):
        with anyio.fail_after(STEP):
            other = await connect(
                ws_url(server),
                additional_headers=alice,
                subprotocols=offered,  # type: ignore[arg-type]
                proxy=None,
                ping_interval=None,
            )
        async with other:
            assert other.subprotocol == selected
            await Socket(other, "msgpack" if selected else "json").assert_usable()

    assert js.raw and all(isinstance(frame, str) for frame in js.raw)
    assert mp.raw and all(isinstance(frame, bytes) for frame in mp.raw)
    decoded = [msgspec.msgpack.decode(frame) for frame in mp.raw if isinstance(frame, bytes)]
    created = [frame["message"]["createdAt"] for frame in decoded if frame["type"] == "message.created"]
    assert created and all(isinstance(at, datetime) and at.tzinfo is not None for at in created), created


async def test_a_frame_of_the_other_kind_is_read_as_json(server: LiveServer, acme: Tenant, encoding: str) -> None:
    """Rule (docs/protocol.md): a binary frame on a JSON socket, and a text frame on a
    MessagePack socket, are read as JSON; the answer comes in the socket's own encoding."""
    async with open_socket(server, encoding, acme.headers("alice")) as ws:
        ping = json.dumps({"type": "ping", "ref": "other-kind"})
        await ws.conn.send(ping if ws.msgpack else ping.encode())
        assert await ws.wait_for(lambda f: True) == {"type": "pong", "ref": "other-kind"}


async def test_text_that_is_not_utf8_is_closed_with_1007(server: LiveServer, acme: Tenant, encoding: str) -> None:
    """Rule: a text frame that is not UTF-8 closes the socket with 1007 (docs/protocol.md),
    and, like any bad input, leaves no error or traceback in the server's log. (The log is
    read up to the accept line of a later socket, so that nothing printed before is missed.)"""
    mark = len(server.lines)
    async with open_socket(server, encoding, acme.headers("alice")) as ws:
        await ws.assert_usable()
        await ws.conn.send(b'{"type": "ping", "ref": "\xff"}', text=True)
        close = await ws.closed()
    assert close is not None and close.code == 1007, close
    await assert_no_error_logged_since(server, mark, encoding, acme)


# -- 3. frames ------------------------------------------------------------------------------------------------


async def test_the_first_frame_is_hello(server: LiveServer, acme: Tenant, encoding: str) -> None:
    """Rule: an accepted socket first gets `hello`: the protocol version, the server's ping
    timers, its limits and its disconnect grace, in the socket's encoding."""
    async with open_socket(server, encoding, acme.headers("alice")) as ws:
        await ws.assert_usable()
        settings = get_settings()
        assert ws.hello == {
            "type": "hello",
            "protocolVersion": PROTOCOL_VERSION,
            "pingInterval": settings.ws_ping_interval,
            "pingTimeout": settings.ws_ping_timeout,
            "limits": {
                "maxFrameBytes": settings.ws_max_frame_bytes,
                "maxSubscriptions": settings.ws_max_subscriptions,
                "framesPerMinute": settings.ws_frames_per_minute,
                "messagesPerMinute": settings.messages_per_minute,
            },
            "disconnectGrace": settings.disconnect_grace,
        }
        assert ws.log[0] is ws.hello


async def test_ping_gets_pong(server: LiveServer, acme: Tenant, encoding: str) -> None:
    """Rule: `ping` is answered by `pong` carrying the ping's `ref` (none when none was sent)."""
    async with open_socket(server, encoding, acme.headers("alice")) as ws:
        await ws.send({"type": "ping", "ref": "p-1"})
        assert await ws.wait_for(lambda f: True) == {"type": "pong", "ref": "p-1"}
        await ws.send({"type": "ping"})
        assert await ws.wait_for(lambda f: True) == {"type": "pong"}


async def test_send_streams_the_answer_and_is_idempotent(
    server: LiveServer, http: httpx.AsyncClient, acme: Tenant, encoding: str
) -> None:
    """Rule: `subscribe` is acked with the conversation; `send` is acked with the stored
    message, its answer and `created: true`; the subscriber then gets `message.created`
    (and `conversation.updated`: the untitled conversation is named after the message),
    the answer's events (`start`, tokens, `done`; seq 1..n, ids on each) and the agent's
    `message.created`. The same `send` again (same clientMessageId) is acked with
    `created: false`, the same message and answer, and stores and announces nothing; the
    same clientMessageId with other content is refused."""
    agent = await make_agent(acme, 0)
    conversation = await new_conversation(http, acme, agent)
    content = "one two  three\nfour ünïcödé 🚀"
    async with open_socket(server, encoding, acme.headers("alice")) as ws:
        await ws.ack(subscribe(conversation))
        ack = await ws.ack(send(conversation, content, "cm-1"))
        assert set(ack) == {"type", "ref", "message", "generation", "created"} and ack["created"] is True
        message, generation = ack["message"], ack["generation"]
        assert message["role"] == "user" and message["content"] == content
        assert message["clientMessageId"] == "cm-1" and message["conversationId"] == conversation
        assert generation["status"] == "running" and generation["replyToId"] == message["id"]
        assert generation["conversationId"] == conversation and generation["agentId"] == agent

        created = await ws.wait_for(message_created(message["id"]))
        assert created == {
            "type": "message.created",
            "conversationId": conversation,
            "message": message,
            "conversationSeq": created["conversationSeq"],
        }
        titled = await ws.wait_for(lambda f: f["type"] == "conversation.updated")  # it had no title
        assert titled["conversation"]["title"] == "one two three"
        events = await ws.answer(generation["id"])
        assert_whole_answer(events, conversation)
        assert events[0]["replyToId"] == message["id"] and events[0]["agentId"] == agent
        started = await ws.wait_for(lambda f: f["type"] == "generation.started")
        assert started["generationId"] == generation["id"] and started["conversationSeq"] > created["conversationSeq"]
        done = events[-1]
        assert done["type"] == "done" and done["tokenCount"] == len(events) - 2 and done["finishReason"] == "stop"
        assert text_of(events) == content
        answer = (await ws.wait_for(message_created(done["messageId"])))["message"]
        assert answer["role"] == "agent" and answer["content"] == content and answer["status"] == "complete"
        assert answer["generationId"] == generation["id"]
        stored = await messages_of(http, acme, conversation)
        assert [m["id"] for m in stored] == [message["id"], done["messageId"]]

        again = await ws.ack(send(conversation, content, "cm-1"))
        assert again["created"] is False and again["message"] == message
        assert again["generation"]["id"] == generation["id"] and again["generation"]["status"] == "done"
        conflict = await ws.refused(send(conversation, "something else", "cm-1"), "client_message_id_conflict")
        assert conflict["details"]["messageId"] == message["id"]
        await ws.assert_usable()
        assert ws.pending == [], "the retry announced something"
    assert await messages_of(http, acme, conversation) == stored


async def test_cancel_stops_the_answer_for_every_subscriber(
    server: LiveServer, http: httpx.AsyncClient, acme: Tenant, encoding: str
) -> None:
    """Rule: while an answer runs, another `send` is refused (`generation_in_progress`, naming
    it); `cancel {generationId}` is acked with the generation, now `cancelled` (reason
    `user`), every subscriber gets the `cancelled` event as its last, and cancelling again
    is acked with the same final state."""
    agent = await make_agent(acme, 60)
    conversation = await new_conversation(http, acme, agent)
    alice = acme.headers("alice")
    async with open_socket(server, encoding, alice) as ws, open_socket(server, encoding, alice) as watcher:
        await ws.ack(subscribe(conversation))
        await watcher.ack(subscribe(conversation))
        generation = (await ws.ack(send(conversation, "a minute per word", "c-1")))["generation"]["id"]
        await ws.peek(of_generation(generation))
        await watcher.peek(of_generation(generation))

        busy = await ws.refused(send(conversation, "meanwhile", "c-2"), "generation_in_progress")
        assert busy["details"]["generationId"] == generation

        cancel = {"type": "cancel", "generationId": generation}
        state = (await ws.ack(cancel))["generation"]
        assert state["id"] == generation and state["status"] == "cancelled" and state["error"] == "user"
        for socket in (ws, watcher):
            events = await socket.answer(generation)
            assert_whole_answer(events, conversation)
            assert [e["type"] for e in events] == ["start", "cancelled"]
            assert events[-1]["reason"] == "user" and events[-1]["messageId"] is None
        assert (await ws.ack(cancel))["generation"] == state
        await ws.assert_usable()
        assert [f for f in ws.pending if "seq" in f] == []


async def test_unsubscribe_ends_the_conversation_events(
    server: LiveServer, http: httpx.AsyncClient, acme: Tenant, encoding: str
) -> None:
    """Rule: `unsubscribe` is acked with the conversation, and from the ack on nothing of
    that conversation reaches the socket — not the rest of the running answer, not its
    agent message, not an edit — while another subscriber gets all of it."""
    agent = await make_agent(acme, 0)
    conversation = await new_conversation(http, acme, agent)
    alice = acme.headers("alice")
    async with open_socket(server, encoding, alice) as ws, open_socket(server, encoding, alice) as witness:
        await ws.ack(subscribe(conversation))
        await witness.ack(subscribe(conversation))
        posted = await post_message(http, acme, conversation, words(2000))
        generation = posted["generation"]["id"]
        await ws.events(generation, 3)

        ack = await ws.ack({"type": "unsubscribe", "conversationId": conversation})
        assert ack == {"type": "ack", "ref": ack["ref"], "conversationId": conversation}
        events = await witness.answer(generation)
        assert events[-1]["type"] == "done"
        await witness.wait_for(message_created(events[-1]["messageId"]))
        edit = await http.put(
            f"/api/conversations/{conversation}/messages/{posted['message']['id']}",
            json={"content": "edited"},
            headers=alice,
        )
        assert edit.status_code == 200
        await witness.wait_for(lambda f: f["type"] == "message.edited")
        await ws.assert_usable()
        late = [f for f in ws.after(ack) if f.get("conversationId") == conversation]
        assert late == [], f"{len(late)} frame(s) of the conversation after the unsubscribe ack: {late[:3]}"


async def test_rest_changes_reach_subscribers(
    server: LiveServer, http: httpx.AsyncClient, acme: Tenant, encoding: str
) -> None:
    """Rule: changes made over HTTP reach subscribed sockets as the REST responses describe
    them: a posted message (`message.created`), an edit (`message.edited`, original
    content kept), a new title (`conversation.updated`), and a deletion — which cancels the
    running answer (`cancelled`, reason `deleted`) and ends with `conversation.deleted`;
    the conversation is then not found."""
    agent = await make_agent(acme, 60)
    conversation = await new_conversation(http, acme, agent)
    alice = acme.headers("alice")
    async with open_socket(server, encoding, alice) as ws:
        await ws.ack(subscribe(conversation))
        posted = await post_message(http, acme, conversation, "posted over http", reply=False)
        message = posted["message"]
        created = await ws.wait_for(message_created(message["id"]))
        assert created == {
            "type": "message.created",
            "conversationId": conversation,
            "message": message,
            "conversationSeq": created["conversationSeq"],
        }

        response = await http.put(
            f"/api/conversations/{conversation}/messages/{message['id']}", json={"content": "edited"}, headers=alice
        )
        assert response.status_code == 200, response.text
        edited = await ws.wait_for(lambda f: f["type"] == "message.edited")
        assert edited == {
            "type": "message.edited",
            "conversationId": conversation,
            "message": response.json(),
            "conversationSeq": edited["conversationSeq"],  # after the title's (the Socket checks the order)
        }
        assert edited["message"]["editedContent"] == "edited" and edited["message"]["content"] == "posted over http"

        response = await http.patch(f"/api/conversations/{conversation}", json={"title": "Renamed"}, headers=alice)
        assert response.status_code == 200, response.text
        # (The first message named the untitled conversation: that `conversation.updated` came before.)
        updated = await ws.wait_for(
            lambda f: f["type"] == "conversation.updated" and f["conversation"]["title"] == "Renamed"
        )
        assert updated == {
            "type": "conversation.updated",
            "conversationId": conversation,
            "conversation": response.json(),
            "conversationSeq": edited["conversationSeq"] + 1,  # the conversation's next event
        }
        assert updated["conversation"]["title"] == "Renamed"

        generation = (await post_message(http, acme, conversation, "never answered"))["generation"]["id"]
        await ws.peek(of_generation(generation))
        response = await http.delete(f"/api/conversations/{conversation}", headers=alice)
        assert response.status_code == 204, response.text
        deleted = await ws.wait_for(lambda f: f["type"] == "conversation.deleted")
        assert deleted == {
            "type": "conversation.deleted",
            "conversationId": conversation,
            "conversationSeq": deleted["conversationSeq"],
        }
        events = await ws.answer(generation)
        assert [e["type"] for e in events] == ["start", "cancelled"] and events[-1]["reason"] == "deleted"
        assert any(f is deleted for f in ws.after(events[-1])), "conversation.deleted came before `cancelled`"
        await ws.refused(subscribe(conversation), "not_found")


# -- 4. resume -----------------------------------------------------------------------------------------------


async def test_a_socket_back_from_offline_gets_the_conversation_events_it_missed(
    server: LiveServer, http: httpx.AsyncClient, acme: Tenant, encoding: str
) -> None:
    """Rule: conversation events carry `conversationSeq`; a socket that resubscribes with
    `since` = the last one it had gets the events it missed, in order and once (an answer
    started meanwhile too: `generation.started`, then the answer itself), then live ones."""
    agent = await make_agent(acme, 0.05)
    conversation = await new_conversation(http, acme, agent)
    alice = acme.headers("alice")
    async with open_socket(server, encoding, alice) as ws:
        ack = await ws.ack(subscribe(conversation))
        posted = (await post_message(http, acme, conversation, "before the drop", reply=False))["message"]
        await ws.wait_for(message_created(posted["id"]))
        titled = await ws.wait_for(lambda f: f["type"] == "conversation.updated")  # named after that message
        seen = titled["conversationSeq"]
        assert seen == ack["conversationSeq"] + 2
    # Offline: a message, an edit, a rename and an answer happen.
    missed = await post_message(http, acme, conversation, "while away one two three")
    edited = await http.put(
        f"/api/conversations/{conversation}/messages/{posted['id']}", json={"content": "edited"}, headers=alice
    )
    assert edited.status_code == 200, edited.text
    renamed = await http.patch(f"/api/conversations/{conversation}", json={"title": "Away"}, headers=alice)
    assert renamed.status_code == 200, renamed.text
    async with open_socket(server, encoding, alice) as ws:
        back = await ws.ack({**subscribe(conversation), "since": seen})
        latest = back["conversationSeq"]
        replayed = [
            await ws.wait_for(lambda f: "conversationSeq" in f and "ref" not in f) for _ in range(latest - seen)
        ]
        assert [f["conversationSeq"] for f in replayed] == list(range(seen + 1, latest + 1))
        kinds = [f["type"] for f in replayed]
        assert kinds[0] == "message.created" and replayed[0]["message"]["id"] == missed["message"]["id"]
        assert "generation.started" in kinds and "message.edited" in kinds and kinds[-1] == "conversation.updated"
        started = next(f for f in replayed if f["type"] == "generation.started")
        assert started["generationId"] == missed["generation"]["id"]
        # Live from here: the next event follows the replayed ones.
        later = (await post_message(http, acme, conversation, "after the return", reply=False))["message"]
        live = await ws.wait_for(message_created(later["id"]))
        assert live["conversationSeq"] > latest
        assert not [f for f in ws.pending if f.get("conversationSeq", latest + 1) <= seen], ws.pending


async def test_a_cursor_too_old_or_ahead_is_told_to_reload(
    http: httpx.AsyncClient, acme: Tenant, encoding: str
) -> None:
    """Rule: when the events after `since` are no longer all kept (or `since` is ahead of
    the conversation: its log was lost), the ack is followed by `conversation.reset` with the
    conversation's latest `conversationSeq`; the client reloads over HTTP and goes on from it."""
    with LiveServer({"CHATSTREAM_CONVERSATION_LOG_RETAIN": "2"}) as small:
        async with httpx.AsyncClient(base_url=small.url, timeout=STEP) as client:
            conversation = await new_conversation(client, acme)
            for i in range(4):
                await post_message(client, acme, conversation, f"m{i}", reply=False)
        async with open_socket(small, encoding, acme.headers("alice")) as ws:
            latest = (await ws.ack(subscribe(conversation)))["conversationSeq"]
            assert latest >= 4
            for since in (latest - 2, latest - 1, latest):  # kept: replayed (none for `latest`)
                ws.conversation_seqs.clear()  # each resubscription goes back in the numbering
                await ws.ack({**subscribe(conversation), "since": since})
                replayed = [
                    await ws.wait_for(lambda f, since=since: f.get("conversationSeq", 0) > since)
                    for _ in range(latest - since)
                ]
                assert [f["conversationSeq"] for f in replayed] == list(range(since + 1, latest + 1))
            for since in (0, latest - 3, latest + 5):
                ack = await ws.ack({**subscribe(conversation), "since": since})
                reset = await ws.wait_for(lambda f: f["type"] == "conversation.reset")
                assert reset == {
                    "type": "conversation.reset",
                    "conversationId": conversation,
                    "conversationSeq": latest,
                }
                assert ws.after(ack)[:1] == [reset] or ws.pending == [], "the reset follows the ack at once"
            await ws.assert_usable()


async def test_resume_with_a_cursor_from_this_socket(
    server: LiveServer, http: httpx.AsyncClient, acme: Tenant, encoding: str
) -> None:
    """Rule: a socket that subscribes with `after` = the cursor of the last event it had
    (`<generationId>.<seq>`) gets every later event exactly once, to the terminal event —
    live, or from the retained log once the answer ended (identical to the live events);
    a cursor at the terminal event gets nothing more."""
    agent = await make_agent(acme, 0.02)
    conversation = await new_conversation(http, acme, agent)
    content = words(30)
    alice = acme.headers("alice")
    async with open_socket(server, encoding, alice) as first:
        await first.ack(subscribe(conversation))
        generation = (await first.ack(send(conversation, content, "resume-1")))["generation"]["id"]
        seen = await first.events(generation, 5)
    async with open_socket(server, encoding, alice) as again:
        await again.ack(subscribe(conversation, after=cursor_of(seen[-1])))
        rest = await again.answer(generation)
    everything = seen + rest
    assert_whole_answer(everything, conversation)
    assert everything[-1]["type"] == "done" and text_of(everything) == content

    async with open_socket(server, encoding, alice) as late:
        await late.ack(subscribe(conversation, after=f"{generation}.3"))
        assert await late.answer(generation) == everything[3:]
    async with open_socket(server, encoding, alice) as finished:
        await finished.ack(subscribe(conversation, after=cursor_of(everything[-1])))
        await finished.assert_usable()
        assert finished.pending == []


async def test_a_cursor_of_an_ended_answer_also_follows_the_newer_running_one(
    server: LiveServer, http: httpx.AsyncClient, acme: Tenant, encoding: str
) -> None:
    """Rule: subscribing with the cursor of an answer that ended while the client was away
    gives the rest of that answer and then the conversation's newer running answer too."""
    agent = await make_agent(acme, 0.05)
    conversation = await new_conversation(http, acme, agent)
    alice = acme.headers("alice")
    async with open_socket(server, encoding, alice) as first:
        await first.ack(subscribe(conversation))
        older = (await first.ack(send(conversation, words(6), "older")))["generation"]["id"]
        seen = await first.events(older, 2)
    assert (await settled(http, acme, older))["status"] == "done"
    newer = (await post_message(http, acme, conversation, words(200)))["generation"]["id"]  # 10 s of answer
    async with open_socket(server, encoding, alice) as again:
        await again.ack(subscribe(conversation, after=cursor_of(seen[-1])))
        rest = await again.answer(older)
        assert_whole_answer(seen + rest, conversation)
        started = await again.events(newer, 2)
        assert seqs(started)[0] == 1 and started[0]["type"] == "start"
        await again.ack({"type": "cancel", "generationId": newer})
        assert (await again.answer(newer))[-1]["type"] == "cancelled"


async def test_resume_from_an_sse_cursor_and_sse_agrees_with_ws(
    server: LiveServer, http: httpx.AsyncClient, acme: Tenant, encoding: str
) -> None:
    """Rule: one cursor for both transports: a socket subscribing with `after` = an SSE `id:`
    gets the rest exactly once; an SSE reader and a socket following the same answer get
    the same events — same seq, same text, same fields."""
    agent = await make_agent(acme, 0.02)
    conversation = await new_conversation(http, acme, agent)
    content = words(30)
    alice = acme.headers("alice")
    async with open_socket(server, encoding, alice) as ws:
        await ws.ack(subscribe(conversation))
        generation = (await post_message(http, acme, conversation, content, disconnectGrace=30))["generation"]["id"]
        async with sse_stream(http, conversation, alice) as stream:
            first = await stream.until_tokens(4)
            async with open_socket(server, encoding, alice) as resumed:
                await resumed.ack(subscribe(conversation, after=cursor_of(first[-1])))
                rest = await resumed.answer(generation)
            by_sse = first + await stream.to_end()
        by_ws = await ws.answer(generation)
    assert_whole_answer(by_sse, conversation)
    assert by_sse[-1]["type"] == "done" and text_of(by_sse) == content
    assert by_ws == by_sse
    assert rest == by_sse[len(first) :]


MIXED_CONTENT = "Grüße aus 日本 🚀 " + words(6)


def in_reasoning(event: dict[str, Any]) -> bool:
    """A piece of the reasoning (part 0 of the echo agent's `parts` answer)."""
    return bool(event["type"] == "part.delta" and event["part"] == 0)


def assert_mixed_answer(events: list[dict[str, Any]], stored: dict[str, Any], user: str) -> None:
    """`events` (from `start`, or a snapshot, to `done`) make the echo agent's `parts` answer to
    MIXED_CONTENT: what they fold to is the stored message's parts, its content the text parts."""
    assert events[-1]["type"] == "done" and events[-1]["finishReason"] == "stop", events[-1]
    assert stored["id"] == events[-1]["messageId"] and stored["role"] == "agent" and stored["status"] == "complete"
    assert stored["content"] == echo_text(MIXED_CONTENT) == text_of(events)
    assert answer_of(events) == parts_of(stored) == echo_parts(MIXED_CONTENT, user)


async def test_a_mixed_answer_is_the_same_on_sse_and_ws_and_resumes_exactly_once(
    server: LiveServer, http: httpx.AsyncClient, acme: Tenant, encoding: str
) -> None:
    """Rule: an answer of every part kind (reasoning, text, a tool call whose arguments come
    in pieces, its result, data) carries one seq on both transports: a socket following it
    and an SSE reader get the same events, fields and seqs; a socket subscribing with an
    SSE cursor taken inside the tool call gets the rest exactly once; the parts folded
    from what each got are the stored message's."""
    agent = await make_parts_agent(acme, 0.01)
    conversation = await new_conversation(http, acme, agent)
    alice = acme.headers("alice")
    async with open_socket(server, encoding, alice) as ws:
        await ws.ack(subscribe(conversation))
        posted = await post_message(http, acme, conversation, MIXED_CONTENT, disconnectGrace=30)
        generation = posted["generation"]["id"]
        async with sse_stream(http, conversation, alice) as stream:
            first = await stream.until(in_tool_call)
            async with open_socket(server, encoding, alice) as resumed:
                await resumed.ack(subscribe(conversation, after=cursor_of(first[-1])))
                rest = await resumed.answer(generation)
            by_sse = first + await stream.to_end()
        by_ws = await ws.answer(generation)
    assert_contiguous(by_sse, 1)
    assert by_sse[0]["type"] == "start" and kinds(by_sse) == {"start", "token", *PART_EVENTS, "done"}
    assert by_ws == by_sse
    assert rest == by_sse[len(first) :]
    stored = (await messages_of(http, acme, conversation))[-1]
    assert_mixed_answer(by_ws, stored, posted["message"]["id"])
    assert answer_of(first + rest) == parts_of(stored)


async def sse_events(live: LiveServer, tenant: Tenant, conversation_id: str, cursor: str) -> list[dict[str, Any]]:
    """The conversation's stream on `live` from `cursor` (by Last-Event-ID), to the terminal event."""
    async with (
        httpx.AsyncClient(base_url=live.url, timeout=STEP) as http,
        sse_stream(http, conversation_id, {**tenant.headers("alice"), "Last-Event-ID": cursor}) as stream,
    ):
        return await stream.to_end()


async def test_a_mixed_answer_beyond_the_window_and_after_the_log_expired(
    small_log_server: LiveServer, acme: Tenant, encoding: str
) -> None:
    """Rule: a socket whose cursor (inside the reasoning) fell out of the retained window
    gets one `snapshot` with every part so far (open ones `streaming`), exactly what a
    socket that followed the answer had folded up to that seq, then the rest exactly
    once. Once the answer's log is gone, the same cursor gets, on a socket and on SSE
    alike, a `snapshot` of the stored parts and `done`, with the live events' seqs."""
    alice = acme.headers("alice")
    async with httpx.AsyncClient(base_url=small_log_server.url, timeout=STEP) as http:
        agent = await make_parts_agent(acme, 0.02)
        conversation = await new_conversation(http, acme, agent)
        async with open_socket(small_log_server, encoding, alice) as witness:
            await witness.ack(subscribe(conversation))
            posted = await post_message(http, acme, conversation, MIXED_CONTENT)
            generation = posted["generation"]["id"]
            first = await witness.events_until(generation, in_reasoning)
            cursor = cursor_of(first[-1])
            # Well past the window (5 events), inside the tool call: waiting on the witness's frames.
            seen = first + await witness.events_until(
                generation, lambda e: in_tool_call(e) and e["seq"] > first[-1]["seq"] + 10
            )
            reached = seen[-1]["seq"]
            async with open_socket(small_log_server, encoding, alice) as resumed:
                await resumed.ack(subscribe(conversation, after=cursor))
                rest = await resumed.answer(generation)
            seen += await witness.answer(generation)
        assert_contiguous(seen, 1)
        snapshot = rest[0]
        assert snapshot["type"] == "snapshot" and snapshot["seq"] >= reached, (reached, snapshot)
        assert_contiguous(rest, snapshot["seq"])
        assert rest[1:] == seen[snapshot["seq"] :]
        so_far = folded(seen[: snapshot["seq"]])
        assert parts_of(snapshot) == so_far.copy() and snapshot["text"] == so_far.text
        assert [p["kind"] for p in snapshot["parts"][:3]] == ["reasoning", "text", "tool_call"]
        stored = (await messages_of(http, acme, conversation))[-1]
        assert_mixed_answer(rest, stored, posted["message"]["id"])
        assert_mixed_answer(seen, stored, posted["message"]["id"])

        # The log is dropped just after `done`: a reader right then may still get the log's
        # snapshot (its last text part open). Bounded poll: nothing tells the log was dropped.
        end = seen[-1]["seq"]
        with anyio.fail_after(STEP):
            while True:
                async with open_socket(small_log_server, encoding, alice) as late:
                    await late.ack(subscribe(conversation, after=cursor))
                    stored_rest = await late.answer(generation)
                if all(p["state"] != "streaming" for p in stored_rest[0].get("parts", [])):
                    break
                await anyio.sleep(0.05)
        assert [e["type"] for e in stored_rest] == ["snapshot", "done"] and seqs(stored_rest) == [end - 1, end]
        assert parts_of(stored_rest[0]) == parts_of(stored) and stored_rest[0]["text"] == stored["content"]
        assert stored_rest[1] == seen[-1]
        assert await sse_events(small_log_server, acme, conversation, cursor) == stored_rest


# -- 5. bad frames and limits ---------------------------------------------------------------------------------


MALFORMED: dict[str, tuple[Any, str, str | None]] = {
    # case: (payload — a str/bytes is sent as is, anything else in the socket's encoding —, code, ref)
    "not_decodable": (None, "malformed_frame", None),
    "empty": (None, "malformed_frame", None),
    "not_an_object": ([1, 2, 3], "invalid_frame", None),
    "no_type": ({"ref": "x-1"}, "invalid_frame", "x-1"),
    "unknown_type": ({"type": "shout", "ref": "x-1"}, "unknown_type", "x-1"),
    "wrong_field_type": ({"type": "subscribe", "conversationId": 42, "ref": "x-1"}, "invalid_frame", "x-1"),
    "not_a_uuid": ({"type": "cancel", "generationId": "nope", "ref": "x-1"}, "invalid_frame", "x-1"),
    "missing_field": ({"type": "send", "conversationId": ZERO_UUID, "ref": "x-1"}, "invalid_frame", "x-1"),
    "empty_content": (send(ZERO_UUID, "", "c", ref="x-1"), "invalid_frame", "x-1"),
    "unknown_field": ({"type": "ping", "ref": "x-1", "extra": True}, "invalid_frame", "x-1"),
    "ref_not_a_string": ({"type": "ping", "ref": 7}, "invalid_frame", None),
    "ref_too_long": ({"type": "ping", "ref": "x" * 65}, "invalid_frame", None),
    # 100 kB, well under the frame limit, but nested deeper than the decoder recurses: either code will do.
    "deeply_nested_array": (None, "invalid_frame|malformed_frame", None),
    "deeply_nested_object": (None, "invalid_frame|malformed_frame", None),
}


def malformed_payload(case: str, msgpack: bool) -> Any:
    if case == "not_decodable":
        return b"\xc1\x00" if msgpack else '{"type": "ping", "ref": "x-1"'
    if case == "empty":
        return b"" if msgpack else ""
    if case == "deeply_nested_array":
        return b"\x91" * 100_000 if msgpack else "[" * 100_000
    if case == "deeply_nested_object":
        return b"\x81\xa1a" * 30_000 if msgpack else '{"a":' * 20_000
    return MALFORMED[case][0]


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_malformed_frame_gets_an_error_and_the_socket_stays_usable(
    server: LiveServer, acme: Tenant, encoding: str, case: str
) -> None:
    """Rule: a frame that is not a valid client frame — undecodable bytes, not an object, no
    or an unknown `type`, a field of the wrong type, a missing or unknown field, a bad
    `ref` — gets an `error` frame with a code (and the frame's `ref` when it can be read),
    and the socket stays usable: the next `ping` gets its `pong`."""
    _, code, ref = MALFORMED[case]
    async with open_socket(server, encoding, acme.headers("alice")) as ws:
        await ws.assert_usable()
        payload = malformed_payload(case, ws.msgpack)
        data = payload if isinstance(payload, str | bytes) else ws.encode(payload)
        try:
            error = await ws.error_for(data)
        except ConnectionClosed as exc:
            pytest.fail(f"the server dropped the socket instead of answering ({exc.rcvd}, {exc.sent})")
        assert_error_frame(error, error["code"], ref)
        assert error["code"] in code.split("|"), (code, error)
        await ws.assert_usable()


async def test_requests_the_server_cannot_do_get_errors(
    server: LiveServer, http: httpx.AsyncClient, acme: Tenant, globex: Tenant, encoding: str
) -> None:
    """Rule: well-formed frames the server cannot do get an `error` frame with the frame's
    `ref` and the socket stays usable: subscribing to (or sending to) another company's or
    another member's conversation or no conversation is `not_found`, so is cancelling a
    generation the caller cannot see; a bad `after` cursor (malformed, of another
    conversation, of no generation, ahead of the answer) is `invalid_cursor`, naming
    `after`; content over the limit is `too_large`, blank content `invalid_request`."""
    agent = await make_agent(acme, 0)
    mine = await new_conversation(http, acme, agent)
    mine_generation = (await post_message(http, acme, mine, "mine"))["generation"]["id"]
    other = await new_conversation(http, acme, agent)
    other_generation = (await post_message(http, acme, other, "other"))["generation"]["id"]
    bobs = await new_conversation(http, acme, agent, who="bob")
    bob_generation = (await post_message(http, acme, bobs, "bob's", who="bob"))["generation"]["id"]
    globex_agent = await make_agent(globex, 0)
    foreign = await new_conversation(http, globex, globex_agent, who="admin")
    foreign_generation = (await post_message(http, globex, foreign, "far", who="admin"))["generation"]["id"]
    for generation, tenant, who in (
        (mine_generation, acme, "alice"),
        (other_generation, acme, "alice"),
        (bob_generation, acme, "bob"),
        (foreign_generation, globex, "admin"),
    ):
        await settled(http, tenant, generation, who)

    refused: list[tuple[dict[str, Any], str]] = [
        (subscribe(foreign), "not_found"),
        (subscribe(bobs), "not_found"),
        (subscribe(ZERO_UUID), "not_found"),
        (send(foreign, "hi", "n-1"), "not_found"),
        (send(bobs, "hi", "n-2"), "not_found"),
        ({"type": "cancel", "generationId": foreign_generation}, "not_found"),
        ({"type": "cancel", "generationId": bob_generation}, "not_found"),
        ({"type": "cancel", "generationId": ZERO_UUID}, "not_found"),
        (send(mine, "x" * 50_001, "n-3"), "too_large"),
        (send(mine, " \n\t ", "n-4"), "invalid_request"),
    ]
    for cursor in (
        "garbage",
        "not-a-uuid.3",
        mine_generation,
        f"{mine_generation}.-1",
        f"{mine_generation}.x",
        f"{mine_generation}.999",
        f"{other_generation}.1",
        f"{foreign_generation}.1",
        f"{ZERO_UUID}.1",
    ):
        refused.append((subscribe(mine, after=cursor), "invalid_cursor"))
    async with open_socket(server, encoding, acme.headers("alice")) as ws:
        for frame, code in refused:
            error = await ws.refused(frame, code)
            if code == "invalid_cursor":  # the field at fault is named
                assert error["details"][0]["field"] == "after", error
            await ws.assert_usable()
        assert (await ws.ack(subscribe(mine)))["conversationId"] == mine
    assert len(await messages_of(http, acme, mine)) == 2


async def test_five_bad_frames_in_a_row_close_with_1008(server: LiveServer, acme: Tenant, encoding: str) -> None:
    """Rule: bad frames are forgiven while valid ones come in between (four bad, a ping, four
    bad, a ping: still open), but five in a row — each answered by an error frame — close
    the socket with 1008 and a reason."""
    bad = '{"type": "ping"' if encoding == "json" else b"\xc1"
    async with open_socket(server, encoding, acme.headers("alice")) as ws:
        for _ in range(2):
            for _ in range(4):
                assert_error_frame(await ws.error_for(bad), "malformed_frame", None)
            await ws.assert_usable()
        for _ in range(5):
            await ws.conn.send(bad)
        close = await ws.closed()
        errors = [f for f in ws.pending if f["type"] == "error"]
    assert close is not None and close.code == 1008, close
    assert "too many invalid frames" in close.reason, close
    assert [e["code"] for e in errors] == ["malformed_frame"] * 5, errors


async def test_subscriptions_per_socket_are_limited(limits_server: LiveServer, acme: Tenant, encoding: str) -> None:
    """Rule: at most CHATSTREAM_WS_MAX_SUBSCRIPTIONS conversations per socket: one more is an
    error frame `too_many_subscriptions` (the socket stays usable; subscribing again to a
    followed conversation is not one more); unsubscribing, or the conversation being
    deleted, frees a place; five refusals in a row close the socket with 1008."""
    async with httpx.AsyncClient(base_url=limits_server.url, timeout=STEP) as http:
        conversations = [await new_conversation(http, acme) for _ in range(4)]
        one, two, three, four = conversations
        async with open_socket(limits_server, encoding, acme.headers("alice")) as ws:
            await ws.ack(subscribe(one))
            await ws.ack(subscribe(two))
            await ws.refused(subscribe(three), "too_many_subscriptions")
            await ws.ack(subscribe(one))
            await ws.ack({"type": "unsubscribe", "conversationId": one})
            await ws.ack(subscribe(three))
            response = await http.delete(f"/api/conversations/{two}", headers=acme.headers("alice"))
            assert response.status_code == 204
            await ws.wait_for(lambda f: f["type"] == "conversation.deleted")
            await ws.ack(subscribe(one))
            for _ in range(5):
                await ws.refused(subscribe(four), "too_many_subscriptions")
            close = await ws.close_or_pong()
    assert close is not None, "five too_many_subscriptions in a row, and the socket is still open (pong)"
    assert close.code == 1008 and "too_many_subscriptions" in close.reason, close


async def test_frames_per_minute_are_limited(limits_server: LiveServer, acme: Tenant, encoding: str) -> None:
    """Rule: at most CHATSTREAM_WS_FRAMES_PER_MINUTE frames per API key per minute (the
    greeting says how many): the next ones get error frames `rate_limited`, and five in a row
    close the socket with 1008."""
    async with open_socket(limits_server, encoding, acme.headers("alice")) as ws:
        await ws.assert_usable()
        assert ws.hello is not None and ws.hello["limits"]["framesPerMinute"] == FRAMES_PER_MINUTE
        for _ in range(FRAMES_PER_MINUTE - 1):
            await ws.assert_usable()
        await ws.send({"type": "ping", "ref": "too-many"})
        error = await ws.wait_for(lambda f: f["type"] == "error")
        assert error["code"] == "rate_limited" and error.get("ref") in (None, "too-many"), error
        for _ in range(4):
            await ws.send({"type": "ping", "ref": "too-many"})
        close = await ws.closed()
        errors = [f for f in ws.pending if f["type"] == "error"]
    assert close is not None and close.code == 1008 and "rate_limited" in close.reason, close
    assert [e["code"] for e in errors] == ["rate_limited"] * 4, errors
    assert not [f for f in ws.log if f["type"] == "pong" and f.get("ref") == "too-many"]


async def test_oversized_frames(limits_server: LiveServer, acme: Tenant, encoding: str) -> None:
    """Rule: a frame over CHATSTREAM_WS_MAX_FRAME_BYTES gets an error frame `frame_too_large`
    and is not done (the socket stays usable); one far over it (4 times) is closed by
    the server with 1009."""
    async with httpx.AsyncClient(base_url=limits_server.url, timeout=STEP) as http:
        conversation = await new_conversation(http, acme)
        async with open_socket(limits_server, encoding, acme.headers("alice")) as ws:
            big = ws.encode({**send(conversation, "x" * (MAX_FRAME_BYTES + 100), "big-1"), "ref": "big"})
            assert MAX_FRAME_BYTES < len(big) < 4 * MAX_FRAME_BYTES
            error = await ws.error_for(big)
            assert error["code"] == "frame_too_large" and error.get("ref") in (None, "big"), error
            await ws.assert_usable()
            assert await messages_of(http, acme, conversation) == []
            await ws.conn.send(ws.encode({**send(conversation, "x" * (5 * MAX_FRAME_BYTES), "big-2")}))
            close = await ws.closed()
        assert close is not None and close.code == 1009, close
        assert await messages_of(http, acme, conversation) == []


# -- 6. liveness and pressure -------------------------------------------------------------------------------


async def test_server_pings_keep_a_reading_client_alive(
    keepalive_server: LiveServer, acme: Tenant, encoding: str
) -> None:
    """Rule: the server sends protocol pings every CHATSTREAM_WS_PING_INTERVAL seconds; a
    client that answers them (as any client library does while it reads) stays connected
    well past ping_interval + ping_timeout."""
    async with open_socket(keepalive_server, encoding, acme.headers("alice"), connection=PingCounting) as ws:
        assert isinstance(ws.conn, PingCounting)
        times = await ws.conn.pings(6)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(PING_INTERVAL * 0.8 <= gap <= PING_INTERVAL + 2 for gap in gaps), gaps
        assert times[-1] - times[0] > PING_INTERVAL + PING_TIMEOUT
        await ws.assert_usable()


async def test_a_client_that_stops_reading_is_closed_by_the_keepalive(
    keepalive_server: LiveServer, acme: Tenant, encoding: str
) -> None:
    """Rule: a peer that stops reading (so stops answering protocol pings) is closed by the
    server once ping_interval + ping_timeout have passed (uvicorn: 1011, "keepalive ping
    timeout"); another socket, reading, stays open. The wait is counted in the server's
    pings on the reading socket, not slept."""
    alice = acme.headers("alice")
    async with (
        open_socket(keepalive_server, encoding, alice, connection=PingCounting) as clock,
        open_socket(keepalive_server, encoding, alice) as mute,
    ):
        assert isinstance(clock.conn, PingCounting)
        await mute.assert_usable()
        mute.conn.transport.pause_reading()
        now = len(clock.conn.ping_times)
        await clock.conn.pings(now + int(3 * (PING_INTERVAL + PING_TIMEOUT) / PING_INTERVAL))
        mute.conn.transport.resume_reading()
        close = await mute.closed()
        await clock.assert_usable()
    assert close is not None and close.code == 1011, close


class Overwhelmed:
    """A socket (`slow`) that stopped reading while LONG_ANSWERS long answers stream to it,
    and another socket (`fast`) reading the first of them."""

    def __init__(self, fast: Socket, slow: Socket) -> None:
        self.fast = fast
        self.slow = slow
        self.conversations: list[str] = []
        self.generations: list[str] = []
        self.fast_events: list[dict[str, Any]] = []


@asynccontextmanager
async def overwhelmed(
    live: LiveServer, http: httpx.AsyncClient, tenant: Tenant, encoding: str, content: str
) -> AsyncIterator[Overwhelmed]:
    """Start the answers with the slow socket paused; yields once the fast socket has read
    its answer to `done` and the server has given up on the slow socket.

    Pressure needs several answers: the server's kernel send buffer grows to 4 MB
    (tcp_wmem) and one answer (content <= 50,000 characters) is about 1 MB of frames. The
    moment the server gives up is seen through one more conversation whose answer only
    the slow socket follows, posted with `disconnectGrace: 0`: it is cancelled
    (`disconnected`) as soon as that socket's subscriptions end."""
    alice = tenant.headers("alice")
    agent = await make_agent(tenant, 0)
    conversations = [await new_conversation(http, tenant, agent) for _ in range(LONG_ANSWERS)]
    tripwire = await new_conversation(http, tenant, await make_agent(tenant, 60))
    wire = (await post_message(http, tenant, tripwire, "x", disconnectGrace=0))["generation"]["id"]
    async with (
        open_socket(live, encoding, alice) as fast,
        open_socket(live, encoding, alice, compression=None) as slow,
    ):
        state = Overwhelmed(fast, slow)
        state.conversations = conversations
        await fast.ack(subscribe(conversations[0]))
        for conversation in [*conversations, tripwire]:
            await slow.ack(subscribe(conversation))
        await slow.peek(of_generation(wire))
        slow.conn.transport.pause_reading()

        state.generations.append((await fast.ack(send(conversations[0], content, "long")))["generation"]["id"])
        for conversation in conversations[1:]:
            state.generations.append((await post_message(http, tenant, conversation, content))["generation"]["id"])
        state.fast_events = await fast.answer(state.generations[0])
        assert state.fast_events[-1]["type"] == "done" and text_of(state.fast_events) == content

        gave_up = await settled(http, tenant, wire)
        assert gave_up["status"] == "cancelled" and gave_up["error"] == "disconnected", gave_up
        yield state


async def slow_readers_closed(http: httpx.AsyncClient) -> float:
    """The server's `chatstream_slow_readers_closed_total` (app/metrics.py)."""
    text = (await http.get("/metrics")).text
    families = text_string_to_metric_families(text)
    return sum(s.value for f in families for s in f.samples if s.name == "chatstream_slow_readers_closed_total")


async def test_a_stopping_server_says_when_to_come_back(http: httpx.AsyncClient, acme: Tenant) -> None:
    """Rule: when the server stops, a socket gets its running answer's `cancelled`
    (reason `shutdown`), then an `error` `server_restarting` with `retryAfter`, then close 1012."""
    agent = await make_agent(acme, 60)  # an answer that runs until the server stops
    with LiveServer() as stopping:
        async with httpx.AsyncClient(base_url=stopping.url, timeout=STEP) as client:
            conversation = await new_conversation(client, acme, agent)
        async with open_socket(stopping, "json", acme.headers("alice")) as ws:
            await ws.ack(subscribe(conversation))
            generation = (await ws.ack(send(conversation, "one two three", "stop-1")))["generation"]["id"]
            await ws.wait_for(lambda f: f.get("generationId") == generation and f["type"] == "start")
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(anyio.to_thread.run_sync, stopping.stop)  # SIGINT: a graceful stop
                close = await ws.closed()
    assert close is not None and close.code == 1012, close
    cancelled = [f for f in ws.pending if f.get("generationId") == generation and f["type"] in TERMINAL]
    assert cancelled == [cancelled[0]] and cancelled[0]["reason"] == "shutdown", ws.pending
    notice = ws.pending[-1]
    assert_error_frame(notice, "server_restarting", None)
    assert notice["details"] == {"retryAfter": 1}


async def test_a_reader_that_cannot_keep_up_is_closed_and_resumes(
    slow_server: LiveServer, acme: Tenant, encoding: str
) -> None:
    """Rule: a socket that stops reading while long answers stream does not delay another
    socket's subscriber of the same answer (it gets `done`); once its outbox has stayed
    full for CHATSTREAM_WS_SEND_TIMEOUT seconds the server gives up on it: it is told
    (`error` `too_slow`) and closed with 1013 (seen here by a client that resumes reading
    right after the server gave up). Reconnecting and subscribing with its last cursor of
    each answer, it gets the rest exactly once, ending with `done`, and the text equals
    the stored message."""
    content = words(8000)
    async with httpx.AsyncClient(base_url=slow_server.url, timeout=STEP) as http:
        slow_before = await slow_readers_closed(http)
        async with overwhelmed(slow_server, http, acme, encoding, content) as state:
            state.slow.conn.transport.resume_reading()
            close = await state.slow.closed()
        assert await slow_readers_closed(http) == slow_before + 1  # in the server's metrics
        notices = [f for f in state.slow.log if f["type"] == "error" and "generationId" not in f]
        observed = f"close={close}, notices={notices}"

        for conversation, generation in zip(state.conversations, state.generations, strict=True):
            received = [f for f in state.slow.log if f.get("generationId") == generation and "seq" in f]
            assert received and received[-1]["type"] not in TERMINAL, (observed, len(received))
            assert_contiguous(received, 1)
            async with open_socket(slow_server, encoding, acme.headers("alice")) as back:
                await back.ack(subscribe(conversation, after=cursor_of(received[-1])))
                rest = await back.answer(generation)
            assert_whole_answer(received + rest, conversation)
            assert rest[-1]["type"] == "done"
            stored = {m["id"]: m for m in await messages_of(http, acme, conversation)}
            assert text_of(received + rest) == stored[rest[-1]["messageId"]]["content"] == content
            if generation == state.generations[0]:
                assert rest[-1] == state.fast_events[-1]

        assert [n["code"] for n in notices] == ["too_slow"], observed
        assert close is not None and close.code == 1013, observed


TCP_STATES = {"01": "ESTABLISHED", "04": "FIN_WAIT1", "05": "FIN_WAIT2", "06": "TIME_WAIT", "08": "CLOSE_WAIT"}


def tcp_socket(local_port: int, remote_port: int) -> tuple[str, int] | None:
    """State and bytes in the send queue of the local TCP socket local_port -> remote_port
    (from /proc/net/tcp); None when there is no such socket."""
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            local, remote = (int(address.split(":")[1], 16) for address in fields[1:3])
            if (local, remote) == (local_port, remote_port):
                return TCP_STATES.get(fields[3], fields[3]), int(fields[4].split(":")[0], 16)
    return None


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="watches the server's socket in /proc/net/tcp")
async def test_a_reader_that_never_reads_again_is_let_go(
    unread_server: LiveServer, acme: Tenant, encoding: str
) -> None:
    """Rule: a peer that cannot keep up is closed — also when it never reads again: the
    app lets go of it at once, and the kernel drops the connection (and the megabytes
    queued for it) once it has accepted no data for CHATSTREAM_TCP_USER_TIMEOUT seconds. Watched on the
    server's end of the TCP connection (/proc/net/tcp) in a bounded poll; afterwards the
    client reads what reached it and reports how the connection ended."""
    async with (
        httpx.AsyncClient(base_url=unread_server.url, timeout=STEP) as http,
        overwhelmed(unread_server, http, acme, encoding, words(8000)) as state,
    ):
        client_port = state.slow.conn.transport.get_extra_info("sockname")[1]
        started = time.monotonic()
        server_end = tcp_socket(unread_server.port, client_port)
        with anyio.move_on_after(5 + 3):
            while server_end is not None and server_end[0] == "ESTABLISHED":
                await anyio.sleep(0.1)
                server_end = tcp_socket(unread_server.port, client_port)
        waited = time.monotonic() - started
        state.slow.conn.transport.resume_reading()
        close = await state.slow.closed()
    notices = [f["code"] for f in state.slow.log if f["type"] == "error" and "generationId" not in f]
    observed = (
        f"{waited:.1f} s after the server gave up, its end of the connection is {server_end} "
        f"(state, bytes queued); the client then read notices={notices} and close={close}"
    )
    assert server_end is None or server_end[0] != "ESTABLISHED", observed


# -- invalid UTF-8 inside frames (issue #14 point 8) ------------------------------------------------


async def test_invalid_utf8_inside_a_binary_frame_gets_an_error_frame(
    server: LiveServer, acme: Tenant, encoding: str
) -> None:
    """Rule: a MessagePack `str`, or a JSON binary frame, that is not UTF-8 is a bad frame: an
    `error` frame (`malformed_frame`) on a socket that stays open, not a dropped connection."""
    async with open_socket(server, encoding, acme.headers("alice")) as ws:
        await ws.assert_usable()
        # fixmap{type: "ping", ref: <str of two bytes that are not UTF-8>}
        data = b"\x82\xa4type\xa4ping\xa3ref\xa2\xff\xfe" if ws.msgpack else b'{"type": "ping", "ref": "\xff\xfe"}'
        try:
            error = await ws.error_for(data)
        except ConnectionClosed as exc:
            pytest.fail(f"the server dropped the socket instead of answering ({exc.rcvd}, {exc.sent})")
        assert_error_frame(error, "malformed_frame", None)
        await ws.assert_usable()


async def test_invalid_utf8_text_followed_by_a_close_logs_no_traceback(
    server: LiveServer, acme: Tenant, encoding: str
) -> None:
    """Rule: a text frame that is not UTF-8 arriving with the client's close frame (one TCP
    write, so the server reads both at once) is bad client input: no traceback in the log."""
    mark = len(server.lines)
    async with open_socket(server, encoding, acme.headers("alice")) as ws:
        await ws.assert_usable()
        protocol = ws.conn.protocol
        protocol.send_text(b'{"type": "ping", "ref": "\xff"}')
        protocol.send_close(1000)
        ws.conn.transport.write(b"".join(protocol.data_to_send()))
        await ws.closed()
    await assert_no_error_logged_since(server, mark, encoding, acme)


async def test_a_tool_round_over_the_socket(
    server: LiveServer, http: httpx.AsyncClient, acme: Tenant, encoding: str
) -> None:
    """Rule: an answer that ends with `finishReason: tool_calls` waits; the `tool_result`
    frame answers its call and is acked with the stored result (role `tool`) and the
    agent's next answer, which subscribers then get; the same result again is acked with
    `created: false`; another result for the call, or a call nobody made, is an error frame
    on a socket that stays usable."""
    created = await create_agent(acme.company_id, AgentCreate(name="echo tool", config={"pace": 0, "mode": "tool"}))
    conversation = await new_conversation(http, acme, str(created.id))
    async with open_socket(server, encoding, acme.headers("alice")) as ws:
        await ws.ack(subscribe(conversation))
        first = await ws.ack(send(conversation, "look it up", "cm-tool"))
        events = await ws.answer(first["generation"]["id"])
        assert events[-1]["type"] == "done" and events[-1]["finishReason"] == "tool_calls"
        [call] = [e for e in events if e["type"] == "part.start" and e["kind"] == "tool_call"]
        frame = {"type": "tool_result", "conversationId": conversation, "toolCallId": call["toolCallId"]}

        ack = await ws.ack({**frame, "output": {"found": True}})
        assert ack["created"] is True and ack["message"]["role"] == "tool"
        assert ack["message"]["parts"][0]["value"] == {"found": True}
        continued = await ws.answer(ack["generation"]["id"])
        assert continued[-1]["type"] == "done"
        assert text_of(continued) == 'The tool said: echo returned {"found":true}'

        again = await ws.ack({**frame, "output": {"found": True}})
        assert again["created"] is False and again["message"]["id"] == ack["message"]["id"]
        await ws.refused({**frame, "error": "changed my mind"}, "tool_call_answered")
        await ws.refused({**frame, "toolCallId": "call_nobody_made", "output": 1}, "tool_call_not_found")
        await ws.refused({**frame, "output": 1, "error": "both"}, "invalid_request")
        assert (await ws.request({"type": "ping"}))["type"] == "pong"
