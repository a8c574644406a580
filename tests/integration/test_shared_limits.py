"""Rate limits shared through Redis: a key's message budget and its WebSocket frame limit
hold across every process on the same Redis (and prefix), however the messages arrive."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
import redis
import redis.asyncio as aredis
from redis.backoff import NoBackoff
from redis.retry import Retry
from websockets.asyncio.client import ClientConnection, connect

from app.rate_limit import RateLimit, RedisWindows
from tests.factories import Tenant
from tests.integration.live_server import LiveServer, free_port
from tests.redis_support import REDIS_URL

pytestmark = pytest.mark.anyio

STEP = 10.0  # the longest a read from a live server may take


@contextlib.contextmanager
def redis_prefix() -> Iterator[str]:
    """A Redis key prefix of the test's own, its keys deleted afterwards."""
    prefix = f"chatstream-test-{uuid.uuid4().hex[:12]}:"
    try:
        yield prefix
    finally:
        with redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2) as client:
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            if keys:
                client.unlink(*keys)


async def test_windows_on_one_redis_share_a_budget() -> None:
    with redis_prefix() as prefix:
        # Two clients stand in for two processes.
        one, two = aredis.Redis.from_url(REDIS_URL), aredis.Redis.from_url(REDIS_URL)
        try:
            a = RateLimit("messages", 3, RedisWindows(one, prefix=prefix))
            b = RateLimit("messages", 3, RedisWindows(two, prefix=prefix))
            key, other = uuid.uuid4(), uuid.uuid4()
            assert [await a.take(key), await b.take(key), await a.take(key)] == [None, None, None]
            wait = await b.take(key)
            assert wait is not None and 1 <= wait <= 60
            assert await a.take(other) is None  # every key has its own budget
            assert await RateLimit("frames", 3, RedisWindows(one, prefix=prefix)).take(key) is None
            # What a window holds expires with it: one member per unit taken, nothing kept past a minute.
            ttl = await one.pttl(f"{prefix}rate:messages:{key}")
            assert 0 < ttl <= 60_000 and await one.zcard(f"{prefix}rate:messages:{key}") == 3
        finally:
            await one.aclose()
            await two.aclose()


async def test_a_window_lets_units_through_while_redis_cannot_be_reached(caplog: pytest.LogCaptureFixture) -> None:
    # No retries of redis-py's own: the window says "allowed" at the first refused connection.
    unreachable = aredis.Redis(port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    try:
        limit = RateLimit("messages", 1, RedisWindows(unreachable))
        assert await limit.take(uuid.uuid4()) is None and await limit.take(uuid.uuid4()) is None
        warnings = [r for r in caplog.records if r.name == "chatstream.limits"]
        assert len(warnings) == 1 and "Redis cannot be reached" in warnings[0].getMessage()  # said once
    finally:
        await unreachable.aclose()


@pytest.fixture(scope="module")
def two_processes() -> Iterator[tuple[LiveServer, LiveServer]]:
    """Two servers on one Redis prefix: 3 messages and 6 socket frames per key per minute."""
    with redis_prefix() as prefix:
        env = {
            "REDIS_URL": REDIS_URL,
            "CHATSTREAM_REDIS_PREFIX": prefix,
            "CHATSTREAM_MESSAGES_PER_MINUTE": "3",
            "CHATSTREAM_WS_FRAMES_PER_MINUTE": "6",
        }
        with LiveServer(env) as a, LiveServer(env) as b:
            yield a, b


async def request(ws: ClientConnection, frame: dict[str, Any]) -> dict[str, Any]:
    """Send `frame` and return the server's answer to it (the frame with its ref)."""
    ref = uuid.uuid4().hex
    await ws.send(json.dumps({**frame, "ref": ref}))
    with anyio.fail_after(STEP):
        while (reply := json.loads(await ws.recv())).get("ref") != ref:
            pass
    return reply


def ws_url(server: LiveServer) -> str:
    return server.url.replace("http://", "ws://", 1) + "/api/ws"


async def test_the_message_budget_holds_across_processes_and_ways_in(
    two_processes: tuple[LiveServer, LiveServer], acme: Tenant
) -> None:
    a, b = two_processes
    h = acme.headers("alice")
    async with httpx.AsyncClient(base_url=a.url, timeout=STEP) as on_a:
        cid = (await on_a.post("/api/conversations", json={}, headers=h)).json()["id"]
        url = f"/api/conversations/{cid}/messages"
        for i in range(2):
            assert (await on_a.post(url, json={"content": f"m{i}", "reply": False}, headers=h)).status_code == 201
        async with connect(ws_url(b), additional_headers=h) as ws:
            send = {"type": "send", "conversationId": cid, "content": "over ws", "reply": False}
            assert (await request(ws, {**send, "clientMessageId": "a"}))["type"] == "ack"
            refused = await request(ws, {**send, "clientMessageId": "b"})
            assert refused["type"] == "error" and refused["code"] == "rate_limited", refused
            assert 1 <= refused["details"]["retryAfter"] <= 60
        r = await on_a.post(url, json={"content": "over http"}, headers=h)
        assert r.status_code == 429 and r.json()["code"] == "rate_limited"
        assert 1 <= int(r.headers["Retry-After"]) <= 60
        assert len((await on_a.get(url, headers=h)).json()["items"]) == 3  # the refused ones stored nothing


async def test_the_frame_limit_holds_across_processes_and_sockets(
    two_processes: tuple[LiveServer, LiveServer], acme: Tenant
) -> None:
    a, b = two_processes
    h = acme.headers("bob")
    async with connect(ws_url(a), additional_headers=h) as on_a, connect(ws_url(b), additional_headers=h) as on_b:
        for ws in (on_a, on_b, on_a, on_b, on_a, on_b):
            assert (await request(ws, {"type": "ping"}))["type"] == "pong"
        for ws in (on_a, on_b):  # the seventh frame of the key, on either process
            refused = await request(ws, {"type": "ping"})
            assert refused["type"] == "error" and refused["code"] == "rate_limited", refused
            assert 1 <= refused["details"]["retryAfter"] <= 60
    # Another key of the company has its own budget.
    async with connect(ws_url(b), additional_headers=acme.headers("alice")) as ws:
        assert (await request(ws, {"type": "ping"}))["type"] == "pong"
