"""Several real `chatstream serve` processes on one PostgreSQL database and one Redis:
any process reads, resumes and cancels any generation; conversation events reach every
socket; a process killed, stopped or cut off from Redis loses no stored message and
leaves no reader hanging.

Each cluster uses a Redis key prefix of its own, deleted afterwards. The Redis outage
test runs its own `redis-server` on a free port, so that it can stop and restart it.
Nothing waits by sleeping: reads are bounded by STEP, and the few polls (a row's status,
a key's expiry, Redis coming back) are bounded loops.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis
from httpx_sse import aconnect_sse
from websockets.asyncio.client import ClientConnection, connect

from tests.factories import Tenant, make_tenant
from tests.integration.live_server import LiveServer, free_port
from tests.integration.wire_api import make_agent, new_conversation, text_of
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
from tests.redis_support import REDIS_URL

pytestmark = pytest.mark.anyio

STEP = 15.0  # the longest any single wait may take before the test fails
TERMINAL = ("done", "cancelled", "error")
# Redis connections a server process may hold: its command pool (RedisBroker's default
# pool_size), one each for the reading loop, heartbeats and pub/sub.
MAX_CONNECTIONS = 16 + 3


# -- clusters ----------------------------------------------------------------------------------


class Cluster:
    """`size` servers sharing the run's database and a Redis prefix of their own."""

    def __init__(self, size: int, redis_url: str = REDIS_URL, env: dict[str, str] | None = None) -> None:
        self.prefix = f"chatstream-test-{uuid.uuid4().hex[:12]}:"
        self.redis_url = redis_url
        self.env = {"REDIS_URL": redis_url, "CHATSTREAM_REDIS_PREFIX": self.prefix, **(env or {})}
        self.servers = [LiveServer(self.env) for _ in range(size)]

    def __enter__(self) -> Cluster:
        for server in self.servers:
            server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for server in self.servers:
            server.stop()
        with redis.Redis.from_url(self.redis_url, socket_connect_timeout=2) as client:
            keys = list(client.scan_iter(match=f"{self.prefix}*", count=1000))
            if keys:
                client.unlink(*keys)

    def keys(self, containing: str = "") -> list[str]:
        with redis.Redis.from_url(self.redis_url, socket_connect_timeout=2) as client:
            return [
                k.decode() for k in client.scan_iter(match=f"{self.prefix}*", count=1000) if containing in k.decode()
            ]

    def connections(self) -> list[dict[str, Any]]:
        return connections_of(self.prefix, self.redis_url)


def connections_of(prefix: str, redis_url: str = REDIS_URL) -> list[dict[str, Any]]:
    """CLIENT LIST entries of the processes on `prefix` (they name their connections `<prefix><process>:<role>`)."""
    with redis.Redis.from_url(redis_url, socket_connect_timeout=2) as client:
        return [c for c in client.client_list() if c["name"].startswith(prefix)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Three processes A, B, C; ended logs expire after 2 s (so resume from the database is quick to reach)."""
    with Cluster(3, env={"CHATSTREAM_LOG_TTL": "2", "CHATSTREAM_SSE_PING_INTERVAL": "0.5"}) as servers:
        yield servers


@pytest.fixture
async def tenant() -> Tenant:
    return await make_tenant()


# -- clients -----------------------------------------------------------------------------------


async def post(url: str, tenant: Tenant, conversation_id: str, content: str, **extra: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=STEP) as http:
        return await http.post(
            f"/api/conversations/{conversation_id}/messages",
            json={"content": content, **extra},
            headers=tenant.headers("alice"),
        )


async def start_answer(url: str, tenant: Tenant, conversation_id: str, content: str, **extra: Any) -> str:
    """POST a message to the server at `url`; the id of the answer it started there."""
    response = await post(url, tenant, conversation_id, content, **extra)
    assert response.status_code == 201, response.text
    generation_id: str = response.json()["generation"]["id"]
    return generation_id


async def conversation(tenant: Tenant, server: LiveServer, pace: float) -> str:
    agent = await make_agent(tenant, pace)
    async with httpx.AsyncClient(base_url=server.url, timeout=STEP) as http:
        return await new_conversation(http, tenant, agent)


async def long_answer(tenant: Tenant, server: LiveServer) -> tuple[str, str, str]:
    """A 100-word answer at 0.2 s a word, started on `server`: (conversation, generation, its start cursor)."""
    cid = await conversation(tenant, server, pace=0.2)
    gid = await start_answer(server.url, tenant, cid, words(100))
    return cid, gid, f"{gid}.0"


async def get(url: str, tenant: Tenant, path: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=STEP) as http:
        response = await http.get(path, headers=tenant.headers("alice"))
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


async def generation_when(url: str, tenant: Tenant, generation_id: str, status: str) -> dict[str, Any]:
    """The generation once it has `status` (bounded poll: no event tells the row changed)."""
    with anyio.fail_after(STEP):
        while True:
            body = await get(url, tenant, f"/api/generations/{generation_id}")
            if body["status"] == status:
                return body
            await anyio.sleep(0.05)


async def read_sse(
    url: str,
    tenant: Tenant,
    conversation_id: str,
    *,
    cursor: str | None = None,
    tokens: int | None = None,
    first_token: asyncio.Event | None = None,
    stop: Callable[[dict[str, Any]], bool] | None = None,
    reached: tuple[Callable[[dict[str, Any]], bool], asyncio.Event] | None = None,
) -> list[dict[str, Any]]:
    """Events of the conversation's stream on `url` (resuming after `cursor` by
    Last-Event-ID), until the terminal event, `tokens` tokens or an event `stop` matches
    (then the reader drops); `reached`: (a match, the event set once an event matched).
    A broker outage shows as an `unavailable` event, returned as it is."""
    headers = {**tenant.headers("alice"), **({"Last-Event-ID": cursor} if cursor else {})}
    events: list[dict[str, Any]] = []
    async with (
        httpx.AsyncClient(base_url=url, timeout=STEP) as http,
        aconnect_sse(http, "GET", f"/api/conversations/{conversation_id}/stream", headers=headers) as source,
    ):
        assert source.response.status_code == 200, await source.response.aread()
        with anyio.fail_after(STEP * 2):
            async for sse in source.aiter_sse():
                if not sse.data:
                    continue  # `: ping` comments (httpx-sse yields them as empty events)
                event = json.loads(sse.data)
                if sse.event == "unavailable":
                    return [*events, {"type": "unavailable", **event}]
                assert sse.id == f"{event['generationId']}.{event['seq']}"
                events.append(event)
                if event["type"] == "token" and first_token is not None:
                    first_token.set()
                if reached is not None and reached[0](event):
                    reached[1].set()
                if event["type"] in TERMINAL:
                    break
                if tokens is not None and sum(e["type"] == "token" for e in events) >= tokens:
                    break
                if stop is not None and stop(event):
                    break
    return events


async def until(condition: Callable[[], bool], interval: float = 0.1) -> None:
    """Poll a condition nothing announces (a key expiring, a process appearing), bounded by STEP."""
    with anyio.fail_after(STEP):
        while True:
            if condition():
                return
            await anyio.sleep(interval)


async def readers_with_a_token(
    *reads: Callable[[asyncio.Event], Coroutine[Any, Any, list[dict[str, Any]]]],
) -> list[asyncio.Task[list[dict[str, Any]]]]:
    """Start each reader (given the event it sets on its first token); their tasks, once
    every one of them has a token."""
    started = [asyncio.Event() for _ in reads]
    tasks = [asyncio.create_task(read(event)) for read, event in zip(reads, started, strict=True)]
    with anyio.fail_after(STEP):
        for event in started:
            await event.wait()
    return tasks


async def sse_and_ws_readers(
    tenant: Tenant, sse_on: LiveServer, ws_on: LiveServer, cid: str, cursor: str
) -> list[asyncio.Task[list[dict[str, Any]]]]:
    """An SSE reader on `sse_on` and a WebSocket reader on `ws_on` from `cursor`, once each has a token."""
    return await readers_with_a_token(
        lambda e: read_sse(sse_on.url, tenant, cid, cursor=cursor, first_token=e),
        lambda e: read_ws(ws_on, tenant, cid, after=cursor, first_token=e),
    )


def ws_url(server: LiveServer) -> str:
    return server.url.replace("http://", "ws://", 1) + "/api/ws"


async def open_ws(server: LiveServer, tenant: Tenant) -> ClientConnection:
    """A socket of alice's, its greeting (`hello`) read."""
    socket = await connect(
        ws_url(server), additional_headers=tenant.headers("alice"), proxy=None, ping_interval=None, close_timeout=1
    )
    assert (await ws_frame(socket))["type"] == "hello"
    return socket


async def ws_frame(socket: ClientConnection) -> dict[str, Any]:
    with anyio.fail_after(STEP):
        frame: dict[str, Any] = json.loads(await socket.recv())
        return frame


async def read_ws(
    server: LiveServer,
    tenant: Tenant,
    conversation_id: str,
    *,
    after: str | None = None,
    first_token: asyncio.Event | None = None,
) -> list[dict[str, Any]]:
    """Generation events of the conversation over a WebSocket on `server` (subscribe, with
    `after` to resume), until the terminal event or an `error` frame (returned last)."""
    socket = await open_ws(server, tenant)
    try:
        subscribe = {"type": "subscribe", "conversationId": conversation_id, "ref": "s1"}
        await socket.send(json.dumps({**subscribe, **({"after": after} if after else {})}))
        events: list[dict[str, Any]] = []
        while True:
            frame = await ws_frame(socket)
            if frame["type"] == "error" and "generationId" not in frame:
                return [*events, frame]
            if "seq" not in frame:
                continue  # ack, message.created, …
            events.append(frame)
            if frame["type"] == "token" and first_token is not None:
                first_token.set()
            if frame["type"] in TERMINAL:
                return events
    finally:
        await socket.close()


def wire(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(e["type"], e["seq"], e.get("text")) for e in events]


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


# -- 1. broker selection -----------------------------------------------------------------------


async def test_every_process_reports_the_redis_broker(cluster: Cluster) -> None:
    for server in cluster.servers:
        async with httpx.AsyncClient(base_url=server.url, timeout=STEP) as http:
            ready = await http.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {"database": "ok", "broker": "redis"}


# -- 2. reading on any process -----------------------------------------------------------------


async def test_an_answer_started_on_a_reads_the_same_on_b_and_c(cluster: Cluster, tenant: Tenant) -> None:
    a, b, c = cluster.servers
    cid = await conversation(tenant, a, pace=0.02)
    content = words(25)
    gid = await start_answer(a.url, tenant, cid, content)
    cursor = f"{gid}.0"
    on_a, on_b, on_c = await asyncio.gather(
        read_sse(a.url, tenant, cid, cursor=cursor),
        read_sse(b.url, tenant, cid, cursor=cursor),
        read_ws(c, tenant, cid, after=cursor),
    )
    assert wire(on_a) == wire(on_b) == wire(on_c)
    assert [e["seq"] for e in on_b] == list(range(1, len(on_b) + 1))
    assert on_b[-1]["type"] == "done" and text_of(on_b) == content
    stored = (await get(c.url, tenant, f"/api/conversations/{cid}/messages"))["items"]
    assert stored[-1]["id"] == on_b[-1]["messageId"] and stored[-1]["content"] == content


# -- 3. resuming on another process ------------------------------------------------------------


async def test_a_reader_resumes_on_another_process_exactly_once(cluster: Cluster, tenant: Tenant) -> None:
    a, b, c = cluster.servers
    cid = await conversation(tenant, a, pace=0.03)
    content = words(30)
    gid = await start_answer(a.url, tenant, cid, content)
    first = await read_sse(a.url, tenant, cid, cursor=f"{gid}.0", tokens=5)  # then it drops
    cursor = f"{gid}.{first[-1]['seq']}"
    rest_b, rest_c = await asyncio.gather(
        read_sse(b.url, tenant, cid, cursor=cursor),  # Last-Event-ID
        read_ws(c, tenant, cid, after=cursor),  # subscribe.after
    )
    assert wire(rest_b) == wire(rest_c)
    whole = first + rest_b
    assert [e["seq"] for e in whole] == list(range(1, len(whole) + 1))  # each event exactly once
    assert whole[-1]["type"] == "done" and text_of(whole) == content

    # After the end, still from the log in Redis...
    again = await read_sse(c.url, tenant, cid, cursor=cursor)
    assert wire(again) == wire(rest_b)
    # ...and once the log has expired there (2 s), from the database: the text so far as a
    # snapshot, then the same terminal event.
    await until(lambda: not cluster.keys(gid))
    stored = await read_sse(b.url, tenant, cid, cursor=cursor)
    assert [e["type"] for e in stored] == ["snapshot", "done"] and stored[-1] == whole[-1]
    assert stored[0]["text"] == content


async def test_a_cursor_in_a_gap_gets_a_snapshot_and_memory_stays_bounded(tenant: Tenant) -> None:
    """Logs keep 4 events (and expire 1 s after the end): a reader further behind is given
    the text so far, never a silent skip; an ended answer leaves nothing in Redis. With
    parts: a reader on B whose cursor is in the gap while A streams the tool call gets
    every part so far (open ones `streaming`), what a reader on A had folded up to there."""
    with Cluster(2, env={"CHATSTREAM_LOG_RETAIN": "4", "CHATSTREAM_LOG_TTL": "1"}) as small:
        a, b = small.servers
        cid = await conversation(tenant, a, pace=0.01)
        content = words(20)
        gid = await start_answer(a.url, tenant, cid, content)
        live = await read_sse(a.url, tenant, cid, cursor=f"{gid}.0")
        assert live[-1]["type"] == "done"
        with redis.Redis.from_url(small.redis_url) as client:
            assert client.xlen(f"{small.prefix}gen:{{{gid}}}:log") <= 4  # trimmed as it grew
        behind = await read_sse(b.url, tenant, cid, cursor=f"{gid}.2")
        assert behind[0]["type"] == "snapshot" and behind[-1] == live[-1]
        assert text_of(behind) == content
        assert [e["seq"] for e in behind] == sorted({e["seq"] for e in behind})
        await until(lambda: not small.keys(gid))

        mixed, mixed_gid, user = await mixed_answer(tenant, a, pace=0.02)
        passed = asyncio.Event()  # the reader on A is inside the tool call, far past the cursor
        on_a = asyncio.create_task(
            read_sse(a.url, tenant, mixed, cursor=f"{mixed_gid}.0", reached=(in_tool_call, passed))
        )
        with anyio.fail_after(STEP):
            await passed.wait()
        cursor = f"{mixed_gid}.3"  # in the reasoning, long trimmed
        behind = await read_sse(b.url, tenant, mixed, cursor=cursor)
        whole = await on_a
        snapshot = behind[0]
        assert snapshot["type"] == "snapshot" and snapshot["seq"] > 21, snapshot  # after the call started
        assert [e["seq"] for e in behind] == list(range(snapshot["seq"], snapshot["seq"] + len(behind)))
        so_far = folded(e for e in whole if e["seq"] <= snapshot["seq"])
        assert parts_of(snapshot) == so_far.copy() and snapshot["text"] == so_far.text
        assert [p["kind"] for p in snapshot["parts"][:3]] == ["reasoning", "text", "tool_call"]
        assert behind[-1] == whole[-1] and behind[-1]["type"] == "done"
        stored = (await get(b.url, tenant, f"/api/conversations/{mixed}/messages"))["items"][-1]
        assert answer_of(behind) == answer_of(whole) == parts_of(stored) == echo_parts(MIXED_CONTENT, user)
        await until(lambda: not small.keys(mixed_gid))


MIXED_CONTENT = "Grüße aus 日本 🚀 " + words(6)


async def mixed_answer(tenant: Tenant, server: LiveServer, pace: float) -> tuple[str, str, str]:
    """An answer of every part kind by the echo agent (`parts` mode) to MIXED_CONTENT, started
    on `server`: (conversation, generation, the user message)."""
    agent = await make_parts_agent(tenant, pace)
    async with httpx.AsyncClient(base_url=server.url, timeout=STEP) as http:
        cid = await new_conversation(http, tenant, agent)
    response = await post(server.url, tenant, cid, MIXED_CONTENT, disconnectGrace=30)
    assert response.status_code == 201, response.text
    return cid, response.json()["generation"]["id"], response.json()["message"]["id"]


async def test_a_mixed_answer_produced_on_a_resumes_on_b_and_c_with_the_same_parts(
    cluster: Cluster, tenant: Tenant
) -> None:
    """Rule: through Redis, an answer of every part kind (reasoning, text, a tool call whose
    arguments come in pieces, its result, data) produced on A and dropped there inside its
    tool call resumes on B (SSE) and C (WebSocket) with the same events exactly once; the
    parts folded from it are the stored ones. Once the log expired, the same cursor gets
    the stored parts as a snapshot (from the database), then the same `done`."""
    a, b, c = cluster.servers
    cid, gid, user = await mixed_answer(tenant, a, pace=0.02)
    first = await read_sse(a.url, tenant, cid, cursor=f"{gid}.0", stop=in_tool_call)  # then it drops
    assert in_tool_call(first[-1])
    cursor = f"{gid}.{first[-1]['seq']}"
    rest_b, rest_c = await asyncio.gather(
        read_sse(b.url, tenant, cid, cursor=cursor),
        read_ws(c, tenant, cid, after=cursor),
    )
    assert rest_b == rest_c
    whole = first + rest_b
    assert [e["seq"] for e in whole] == list(range(1, len(whole) + 1))  # each event exactly once
    assert kinds(whole) == {"start", "token", *PART_EVENTS, "done"}
    stored = (await get(c.url, tenant, f"/api/conversations/{cid}/messages"))["items"][-1]
    assert stored["id"] == whole[-1]["messageId"] and stored["content"] == echo_text(MIXED_CONTENT) == text_of(whole)
    assert answer_of(whole) == parts_of(stored) == echo_parts(MIXED_CONTENT, user)

    await until(lambda: not cluster.keys(gid))
    from_db = await read_sse(b.url, tenant, cid, cursor=cursor)
    assert [e["type"] for e in from_db] == ["snapshot", "done"] and from_db[-1] == whole[-1]
    assert from_db[0]["seq"] == whole[-2]["seq"]
    assert parts_of(from_db[0]) == parts_of(stored) and from_db[0]["text"] == stored["content"]


# -- 4. cancel and policies from anywhere ------------------------------------------------------


async def test_cancel_on_b_stops_the_producer_on_a_for_every_reader(cluster: Cluster, tenant: Tenant) -> None:
    a, b, c = cluster.servers
    cid, gid, cursor = await long_answer(tenant, a)
    readers = await readers_with_a_token(
        lambda e: read_sse(a.url, tenant, cid, cursor=cursor, first_token=e),
        lambda e: read_sse(b.url, tenant, cid, cursor=cursor, first_token=e),
        lambda e: read_ws(c, tenant, cid, after=cursor, first_token=e),
    )

    asked = time.monotonic()
    async with httpx.AsyncClient(base_url=b.url, timeout=STEP) as http:
        response = await http.post(f"/api/generations/{gid}/cancel", headers=tenant.headers("alice"))
    took = time.monotonic() - asked
    assert response.status_code == 200 and response.json()["status"] == "cancelled", response.text
    assert took < 1.0, f"cancel on B took {took:.2f} s to stop the producer on A"
    for events in await asyncio.gather(*readers):
        assert events[-1]["type"] == "cancelled" and events[-1]["reason"] == "user", events[-1]


@pytest.mark.parametrize("comes_back", [True, False])
async def test_disconnect_grace_counts_readers_on_every_process(
    cluster: Cluster, tenant: Tenant, comes_back: bool
) -> None:
    """Produced on A, read only on B; B's reader drops. Another on C within the grace: the
    answer goes on. Nobody: A cancels it (`disconnected`) when the grace is over."""
    a, b, c = cluster.servers
    cid = await conversation(tenant, a, pace=0.05)
    content = words(40)
    gid = await start_answer(a.url, tenant, cid, content, disconnectGrace=1.0)
    first = await read_sse(b.url, tenant, cid, cursor=f"{gid}.0", tokens=3)
    if comes_back:
        rest = await read_sse(c.url, tenant, cid, cursor=f"{gid}.{first[-1]['seq']}")
        assert rest[-1]["type"] == "done" and text_of(first + rest) == content
    else:
        generation = await generation_when(c.url, tenant, gid, "cancelled")
        assert generation["error"] == "disconnected"


async def test_if_busy_holds_across_processes(cluster: Cluster, tenant: Tenant) -> None:
    """Messages posted at once to A and to B in each of 5 conversations: one answer each."""
    a, b, _ = cluster.servers
    conversations = [await conversation(tenant, a, pace=0.05) for _ in range(5)]
    responses = await asyncio.gather(
        *(post(server.url, tenant, cid, "hello there") for cid in conversations for server in (a, b))
    )
    for pair in zip(responses[::2], responses[1::2], strict=True):
        assert sorted(r.status_code for r in pair) == [201, 409], [r.text for r in pair]
        refused = next(r for r in pair if r.status_code == 409).json()
        winner = next(r for r in pair if r.status_code == 201).json()
        assert refused["code"] == "generation_in_progress"
        assert refused["details"]["generationId"] == winner["generation"]["id"]


# -- 5. conversation events across processes ---------------------------------------------------


async def test_a_socket_that_moves_to_another_process_gets_the_conversation_events_it_missed(
    cluster: Cluster, tenant: Tenant
) -> None:
    """The conversation's numbering and log are in Redis: one count for every process, and a
    socket back on another process resubscribes with `since` and gets exactly what it missed."""
    a, b, _ = cluster.servers
    cid = await conversation(tenant, a, pace=0)
    socket = await open_ws(a, tenant)
    try:
        await socket.send(json.dumps({"type": "subscribe", "conversationId": cid, "ref": "s"}))
        seen = (await ws_frame(socket))["conversationSeq"]
    finally:
        await socket.close()
    async with httpx.AsyncClient(base_url=a.url, timeout=STEP, headers=tenant.headers("alice")) as http:
        for content in ("one", "two"):
            posted = await http.post(f"/api/conversations/{cid}/messages", json={"content": content, "reply": False})
            assert posted.status_code == 201, posted.text
    socket = await open_ws(b, tenant)
    try:
        await socket.send(json.dumps({"type": "subscribe", "conversationId": cid, "ref": "s", "since": seen}))
        ack = await ws_frame(socket)
        assert ack["type"] == "ack" and ack["conversationSeq"] == seen + 3  # two messages and the title
        missed = [await ws_frame(socket) for _ in range(3)]
        assert [f["conversationSeq"] for f in missed] == [seen + 1, seen + 2, seen + 3]
        assert [f["type"] for f in missed] == ["message.created", "conversation.updated", "message.created"]
        assert [missed[0]["message"]["content"], missed[2]["message"]["content"]] == ["one", "two"]
    finally:
        await socket.close()


async def test_changes_made_on_a_reach_sockets_on_b(cluster: Cluster, tenant: Tenant) -> None:
    a, b, _ = cluster.servers
    cid = await conversation(tenant, a, pace=0)
    socket = await open_ws(b, tenant)
    try:
        await socket.send(json.dumps({"type": "subscribe", "conversationId": cid, "ref": "s"}))
        assert (await ws_frame(socket))["type"] == "ack"
        async with httpx.AsyncClient(base_url=a.url, timeout=STEP, headers=tenant.headers("alice")) as http:
            posted = await http.post(f"/api/conversations/{cid}/messages", json={"content": "hi", "reply": False})
            assert posted.status_code == 201
            message_id = posted.json()["message"]["id"]
            created = await ws_frame(socket)
            assert created["type"] == "message.created" and created["message"]["id"] == message_id
            titled = await ws_frame(socket)  # the untitled conversation is named after its first message
            assert titled["type"] == "conversation.updated" and titled["conversation"]["title"] == "hi"

            edited = await http.put(f"/api/conversations/{cid}/messages/{message_id}", json={"content": "hello"})
            assert edited.status_code == 200, edited.text
            frame = await ws_frame(socket)
            assert frame["type"] == "message.edited" and frame["message"]["effectiveContent"] == "hello"

            renamed = await http.patch(f"/api/conversations/{cid}", json={"title": "Renamed on A"})
            assert renamed.status_code == 200, renamed.text
            frame = await ws_frame(socket)
            assert frame["type"] == "conversation.updated" and frame["conversation"]["title"] == "Renamed on A"
    finally:
        await socket.close()


# -- 6. faults ---------------------------------------------------------------------------------


async def test_a_killed_producer_ends_its_answers_everywhere(tenant: Tenant) -> None:
    with Cluster(3) as servers:
        a, b, c = servers.servers
        cid, gid, cursor = await long_answer(tenant, a)
        readers = await sse_and_ws_readers(tenant, b, c, cid, cursor)
        assert a.proc is not None
        a.proc.kill()  # SIGKILL: no cleanup of any kind
        killed = time.monotonic()
        for events in await asyncio.gather(*readers):
            assert events[-1]["type"] == "error" and events[-1]["code"] == "producer_lost", events[-1]
        took = time.monotonic() - killed
        assert took < 5.0, f"readers learned of the lost producer after {took:.1f} s"
        generation = await get(b.url, tenant, f"/api/generations/{gid}")
        assert generation["status"] == "interrupted"
        # The conversation takes a new message, answered on B.
        new = await start_answer(b.url, tenant, cid, "are you there")
        answer = await read_sse(c.url, tenant, cid, cursor=f"{new}.0")
        assert answer[-1]["type"] == "done" and text_of(answer) == "are you there"


async def test_a_stopping_node_cancels_its_answers_for_readers_everywhere(tenant: Tenant) -> None:
    with Cluster(3) as servers:
        a, b, c = servers.servers
        cid, gid, cursor = await long_answer(tenant, a)
        readers = await sse_and_ws_readers(tenant, b, c, cid, cursor)
        assert a.proc is not None
        a.proc.send_signal(signal.SIGTERM)
        for events in await asyncio.gather(*readers):
            assert events[-1]["type"] == "cancelled" and events[-1]["reason"] == "shutdown", events[-1]
        assert (await get(b.url, tenant, f"/api/generations/{gid}"))["status"] == "cancelled"


class RedisServer:
    """A `redis-server` of this test's own (no persistence) on a free port, to stop and start."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + STEP
        while True:
            try:
                with redis.Redis(port=self.port, socket_connect_timeout=1) as client:
                    client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=STEP)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_redis_stopped_and_started_under_load(tenant: Tenant, own_redis: RedisServer) -> None:
    with Cluster(2, redis_url=own_redis.url) as servers:
        a, b = servers.servers
        cid, gid, cursor = await long_answer(tenant, a)
        readers = await sse_and_ws_readers(tenant, b, b, cid, cursor)

        own_redis.stop()
        sse, ws = await asyncio.gather(*readers)
        # Open streams end, saying why: SSE with an `unavailable` event (no id: the cursor stays
        # on the last real event), or the answer's own `error` event; WebSocket with an error frame.
        assert sse[-1]["type"] == "unavailable" or (
            sse[-1]["type"] == "error" and sse[-1]["code"] == "broker_unavailable"
        )
        assert ws[-1]["type"] == "error" and ws[-1]["code"] == "broker_unavailable", ws[-1]

        # New requests: 503 in the error shape with Retry-After, never a 500 or a hang.
        refused = await post(b.url, tenant, cid, "while redis is down")
        assert refused.status_code in (409, 503), refused.text
        other = await conversation(tenant, b, pace=0)
        refused = await post(b.url, tenant, other, "while redis is down")
        assert refused.status_code == 503, refused.text
        assert refused.json()["code"] == "broker_unavailable" and int(refused.headers["Retry-After"]) > 0
        async with httpx.AsyncClient(base_url=b.url, timeout=STEP) as http:
            assert (await http.get("/readyz")).status_code == 503
        # Reading over HTTP does not need Redis.
        items = (await get(a.url, tenant, f"/api/conversations/{cid}/messages"))["items"]
        assert items[0]["content"] == words(100)

        # Redis back (empty: it keeps nothing on disk): everything works again, no restart.
        own_redis.start()
        with anyio.fail_after(STEP):
            while True:
                response = await post(b.url, tenant, other, "redis is back")
                if response.status_code != 503:
                    break
                await anyio.sleep(0.2)
        assert response.status_code == 201, response.text
        new = response.json()["generation"]["id"]
        answer = await read_sse(a.url, tenant, other, cursor=f"{new}.0")
        assert answer[-1]["type"] == "done" and text_of(answer) == "redis is back"
        # The answer cut off by the outage ended (and is resumable from the database); no
        # stored message was lost.
        ended = await get(b.url, tenant, f"/api/generations/{gid}")
        assert ended["status"] != "running", ended
        items = (await get(b.url, tenant, f"/api/conversations/{cid}/messages"))["items"]
        assert words(100) in [m["content"] for m in items]
        resumed = await read_sse(b.url, tenant, cid, cursor=f"{gid}.{sse[-2]['seq']}")
        assert resumed[-1]["type"] in TERMINAL


# -- 7. cost stays flat ------------------------------------------------------------------------


async def test_redis_connections_do_not_grow_with_readers(tenant: Tenant) -> None:
    """One process serving 1,000 SSE readers of one answer holds as many Redis connections as with none."""
    with Cluster(1, env={"CHATSTREAM_MAX_STREAMS_PER_KEY": "1000"}) as one:  # all of them alice's
        (a,) = one.servers
        cid = await conversation(tenant, a, pace=0.5)
        gid = await start_answer(a.url, tenant, cid, words(200))
        assert len(one.connections()) <= MAX_CONNECTIONS
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=a.url, timeout=STEP * 4, limits=limits) as http:
            headers = {**tenant.headers("alice"), "Last-Event-ID": f"{gid}.0"}
            streams = []
            try:
                for _ in range(10):
                    batch = [
                        http.stream("GET", f"/api/conversations/{cid}/stream", headers=headers) for _ in range(100)
                    ]
                    responses = await asyncio.gather(*(s.__aenter__() for s in batch))
                    streams += list(zip(batch, responses, strict=True))
                    assert all(r.status_code == 200 for r in responses)
                # Every reader has its first bytes, so it is attached.
                await asyncio.gather(*(anext(r.aiter_bytes()) for _, r in streams))
                busy = one.connections()
                # At most the command pool, the reading loop's and the pub/sub connection,
                # however many readers: a fixed number, not one per reader.
                assert len(busy) <= MAX_CONNECTIONS, [c["name"] for c in busy]
            finally:
                async with httpx.AsyncClient(base_url=a.url, timeout=STEP) as control:
                    await control.post(f"/api/generations/{gid}/cancel", headers=tenant.headers("alice"))
                for stream, _ in streams:
                    await stream.__aexit__(None, None, None)


# -- the `serve --workers` path ----------------------------------------------------------------


async def test_serve_with_workers_shares_answers_through_redis(tenant: Tenant) -> None:
    prefix = f"chatstream-test-{uuid.uuid4().hex[:12]}:"
    env = {"REDIS_URL": REDIS_URL, "CHATSTREAM_REDIS_PREFIX": prefix}
    server = LiveServer(env, ["--workers", "2"]).start()
    try:
        assert server.proc is not None
        # uvicorn's parent says "running" before its workers are up: wait for both.
        await until(lambda: server.output().count("Application startup complete") >= 2)
        cid = await conversation(tenant, server, pace=0.01)
        for round_ in range(4):  # whichever worker takes each request, every answer reads whole
            content = words(10 + round_)
            gid = await start_answer(server.url, tenant, cid, content)
            answer = await read_sse(server.url, tenant, cid, cursor=f"{gid}.0")
            assert answer[-1]["type"] == "done" and text_of(answer) == content
        processes = {c["name"].removeprefix(prefix).split(":")[0] for c in connections_of(prefix)}
        assert len(processes) == 2, processes  # both workers are on the shared broker
    finally:
        server.stop()
        with redis.Redis.from_url(REDIS_URL) as client:
            keys = list(client.scan_iter(match=f"{prefix}*"))
            if keys:
                client.unlink(*keys)
