"""Revocation and sign-out take effect at once on open connections (#14 point 2), on a
real `chatstream serve` with real `websockets` and `httpx-sse` clients.

Revoking a key (`DELETE /api/keys/{id}`) or signing out (`DELETE /api/session`) closes the
WebSockets using it (an `error` frame `credentials_revoked`, then close 4401) and ends its
SSE streams (`event: revoked`) within a few seconds, on the process that was asked and,
through Redis, on the others. Open connections also re-check their credentials every
CHATSTREAM_CREDENTIAL_RECHECK seconds, which catches a change no message announced (here:
the database changed directly) and a session that expired.

The servers taking control messages keep the default re-check (60 s), so what closes their
connections within CLOSE_WITHIN is the message. Nothing sleeps: every wait is on a frame
or an event, bounded.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import httpx
import pytest
from httpx_sse import aconnect_sse
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from app.tables import ApiKey, Session
from tests.factories import Tenant, make_tenant
from tests.integration.live_server import LiveServer
from tests.integration.test_scale_out import Cluster
from tests.integration.wire_api import make_agent

pytestmark = pytest.mark.anyio

STEP = 10.0  # the longest any other wait may take before the test fails
CLOSE_WITHIN = 5.0  # "within a few seconds" of the revocation
COOKIE = "chatstream_session"


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    """One process, in-process broker, default re-check (60 s)."""
    with LiveServer() as live:
        yield live


@pytest.fixture(scope="module")
def recheck_server() -> Iterator[LiveServer]:
    """Re-checks credentials every 0.3 s."""
    with LiveServer({"CHATSTREAM_CREDENTIAL_RECHECK": "0.3"}) as live:
        yield live


@pytest.fixture(scope="module")
def pair() -> Iterator[Cluster]:
    """Two processes sharing the database and a Redis prefix."""
    with Cluster(2) as servers:
        yield servers


@pytest.fixture
async def tenant() -> Tenant:
    return await make_tenant()


# -- helpers --------------------------------------------------------------------------------------


async def new_key(url: str, tenant: Tenant) -> tuple[str, str]:
    """A fresh member key: (id, token)."""
    async with httpx.AsyncClient(base_url=url, timeout=STEP) as http:
        r = await http.post("/api/keys", json={"name": "to revoke"}, headers=tenant.headers("admin"))
        assert r.status_code == 201, r.text
        return r.json()["id"], r.json()["token"]


async def sign_in(url: str, key: str) -> str:
    """POST /api/session; the session cookie's value."""
    async with httpx.AsyncClient(base_url=url, timeout=STEP) as http:
        r = await http.post("/api/session", json={"key": key})
        assert r.status_code == 200, r.text
        value: str = r.cookies[COOKIE]
        return value


async def sign_out(url: str, cookie: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=STEP) as http:
        # Origin: a cookie-authenticated write comes from the server's own page.
        r = await http.delete("/api/session", headers={"Cookie": f"{COOKIE}={cookie}", "Origin": url})
        assert r.status_code == 204, r.text


async def revoke(url: str, tenant: Tenant, key_id: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=STEP) as http:
        r = await http.delete(f"/api/keys/{key_id}", headers=tenant.headers("admin"))
        assert r.status_code == 204, r.text


async def refused(url: str, headers: dict[str, str]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=STEP) as http:
        r = await http.get("/api/me", headers=headers)
        assert r.status_code == 401 and r.json()["code"] == "invalid_credentials", r.text


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def cookie(value: str) -> dict[str, str]:
    return {"Cookie": f"{COOKIE}={value}"}


async def running_answer(url: str, tenant: Tenant, headers: dict[str, str]) -> str:
    """A conversation (of the caller in `headers`) whose answer runs for about a minute."""
    agent = await make_agent(tenant, 0.2)
    async with httpx.AsyncClient(base_url=url, timeout=STEP) as http:
        r = await http.post("/api/conversations", json={"agentId": agent}, headers=headers)
        assert r.status_code == 201, r.text
        conversation_id: str = r.json()["id"]
        words = " ".join(f"w{i}" for i in range(300))
        r = await http.post(
            f"/api/conversations/{conversation_id}/messages",
            json={"content": words, "disconnectGrace": 0},
            headers=headers,
        )
        assert r.status_code == 201, r.text
    return conversation_id


def ws_url(server: LiveServer) -> str:
    return server.url.replace("http://", "ws://", 1) + "/api/ws"


async def next_frame(ws: ClientConnection) -> dict[str, Any]:
    with anyio.fail_after(STEP):
        frame: dict[str, Any] = json.loads(await ws.recv())
        return frame


@asynccontextmanager
async def subscribed_socket(
    server: LiveServer, headers: dict[str, str], conversation_id: str
) -> AsyncIterator[ClientConnection]:
    """A socket subscribed to the conversation, once it has received a token of the answer."""
    async with connect(ws_url(server), additional_headers=headers, open_timeout=STEP) as ws:
        await ws.send(json.dumps({"type": "subscribe", "ref": "sub", "conversationId": conversation_id}))
        while (await next_frame(ws))["type"] != "token":
            pass
        yield ws


async def frames_until_closed(ws: ClientConnection, within: float) -> list[dict[str, Any]]:
    """Every frame (tokens of an answer left out) until the server closes the socket, within `within` s."""
    frames: list[dict[str, Any]] = []
    with anyio.fail_after(within):
        try:
            while True:
                frame = json.loads(await ws.recv())
                if frame["type"] != "token":
                    frames.append(frame)
        except ConnectionClosed:
            pass
    return frames


async def revoked_close(ws: ClientConnection) -> list[dict[str, Any]]:
    """Read until the server closes; the frames after the last token. Asserts the close is
    4401 after an `error` frame `credentials_revoked`, within CLOSE_WITHIN seconds."""
    frames = await frames_until_closed(ws, CLOSE_WITHIN)
    assert ws.close_code == 4401, (ws.close_code, ws.close_reason, frames)
    assert frames and frames[-1]["type"] == "error" and frames[-1]["code"] == "credentials_revoked", frames
    with pytest.raises(ConnectionClosed):  # nothing can be sent on it any more
        await ws.send(json.dumps({"type": "ping", "ref": "late"}))
    return frames


async def read_stream(
    url: str, headers: dict[str, str], conversation_id: str, first_token: asyncio.Event
) -> list[tuple[str, str]]:
    """(event, data) of the conversation's SSE stream until the response ends."""
    got: list[tuple[str, str]] = []
    async with (
        httpx.AsyncClient(base_url=url, timeout=STEP) as http,
        aconnect_sse(http, "GET", f"/api/conversations/{conversation_id}/stream", headers=headers) as source,
    ):
        assert source.response.status_code == 200, await source.response.aread()
        async for sse in source.aiter_sse():
            if sse.data:
                got.append((sse.event, sse.data))
            if sse.event == "token":
                first_token.set()
    return got


@asynccontextmanager
async def open_stream(url: str, headers: dict[str, str], conversation_id: str) -> AsyncIterator[asyncio.Task[Any]]:
    """An SSE reader of the conversation, once it has a token; its task gives its events."""
    first_token = asyncio.Event()
    task = asyncio.create_task(read_stream(url, headers, conversation_id, first_token))
    try:
        with anyio.fail_after(STEP):
            await first_token.wait()
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def revoked_end(stream: asyncio.Task[list[tuple[str, str]]]) -> None:
    """The stream ends with `event: revoked` (code `credentials_revoked`) within CLOSE_WITHIN s,
    before the answer's own end."""
    with anyio.fail_after(CLOSE_WITHIN):
        events = await stream
    event, data = events[-1]
    assert event == "revoked" and json.loads(data)["code"] == "credentials_revoked", events[-3:]
    assert not any(e in ("done", "cancelled", "error") for e, _ in events), events[-3:]


async def refused_upgrade(server: LiveServer, headers: dict[str, str]) -> None:
    """A new socket with these credentials is closed with 4401 before any frame."""
    async with connect(ws_url(server), additional_headers=headers, open_timeout=STEP) as ws:
        with anyio.fail_after(STEP), pytest.raises(ConnectionClosed):
            await ws.recv()
    assert ws.close_code == 4401, (ws.close_code, ws.close_reason)


def assert_clean(*servers: LiveServer) -> None:
    for live in servers:
        assert "Traceback" not in live.output(), live.output()


# -- one process ----------------------------------------------------------------------------------


async def test_revoking_a_key_closes_its_sockets_and_streams(server: LiveServer, tenant: Tenant) -> None:
    """An open WebSocket and an open SSE stream of a key end within a few seconds of the
    key's revocation; the socket of another key stays; the key is refused afterwards."""
    key_id, token = await new_key(server.url, tenant)
    conversation_id = await running_answer(server.url, tenant, bearer(token))
    others = await running_answer(server.url, tenant, tenant.headers("alice"))
    async with (
        subscribed_socket(server, bearer(token), conversation_id) as ws,
        subscribed_socket(server, tenant.headers("alice"), others) as unrelated,
        open_stream(server.url, bearer(token), conversation_id) as stream,
    ):
        await revoke(server.url, tenant, key_id)
        await revoked_close(ws)
        await revoked_end(stream)
        await unrelated.send(json.dumps({"type": "ping", "ref": "still"}))
        while (frame := await next_frame(unrelated))["type"] != "pong":
            assert frame["type"] != "error", frame
    await refused_upgrade(server, bearer(token))
    assert_clean(server)


async def test_signing_out_closes_that_sessions_sockets_and_streams(server: LiveServer, tenant: Tenant) -> None:
    """Sign-out ends the session's socket and stream at once, and the old cookie is refused
    (WebSocket upgrade 4401, REST 401); another session of the same key stays open."""
    key = tenant.tokens["alice"]
    conversation_id = await running_answer(server.url, tenant, bearer(key))
    leaving, staying = await sign_in(server.url, key), await sign_in(server.url, key)
    async with (
        subscribed_socket(server, cookie(leaving), conversation_id) as ws,
        subscribed_socket(server, cookie(staying), conversation_id) as other,
        open_stream(server.url, cookie(leaving), conversation_id) as stream,
    ):
        await sign_out(server.url, leaving)
        await revoked_close(ws)
        await revoked_end(stream)
        await other.send(json.dumps({"type": "ping", "ref": "still"}))
        while (frame := await next_frame(other))["type"] != "pong":
            assert frame["type"] != "error", frame
    await refused_upgrade(server, cookie(leaving))
    async with httpx.AsyncClient(base_url=server.url, timeout=STEP) as http:
        r = await http.get("/api/me", headers=cookie(leaving))
        assert r.status_code == 401 and r.json()["code"] == "invalid_credentials", r.text
    assert_clean(server)


# -- two processes through Redis ------------------------------------------------------------------


async def test_revocation_reaches_the_other_process(pair: Cluster, tenant: Tenant) -> None:
    """Revoking a key on process A closes its socket and stream on process B; signing out
    on A closes that session's socket on B."""
    a, b = pair.servers
    key_id, token = await new_key(a.url, tenant)
    conversation_id = await running_answer(b.url, tenant, bearer(token))
    async with (
        subscribed_socket(b, bearer(token), conversation_id) as ws,
        open_stream(b.url, bearer(token), conversation_id) as stream,
    ):
        await revoke(a.url, tenant, key_id)
        await revoked_close(ws)
        await revoked_end(stream)
    # B used the key a moment ago (and keeps it a few seconds: app/auth/principal_cache.py);
    # the message that closed its socket also made it forget the key.
    await refused(b.url, bearer(token))

    alice = tenant.tokens["alice"]
    conversation_id = await running_answer(b.url, tenant, bearer(alice))
    session = await sign_in(b.url, alice)
    async with subscribed_socket(b, cookie(session), conversation_id) as ws:
        await sign_out(a.url, session)
        await revoked_close(ws)
    await refused(b.url, cookie(session))
    assert_clean(a, b)


# -- the periodic re-check ------------------------------------------------------------------------


async def test_the_recheck_closes_what_no_message_announced(recheck_server: LiveServer, tenant: Tenant) -> None:
    """Credentials that stop working without a control message (changed in the database
    directly: a revoked key, an expired session) close their socket and stream at the next
    re-check."""
    key_id, token = await new_key(recheck_server.url, tenant)
    conversation_id = await running_answer(recheck_server.url, tenant, bearer(token))
    async with (
        subscribed_socket(recheck_server, bearer(token), conversation_id) as ws,
        open_stream(recheck_server.url, bearer(token), conversation_id) as stream,
    ):
        await ApiKey.update({ApiKey.revoked_at: datetime.now(UTC)}).where(ApiKey.id == key_id)
        await revoked_close(ws)
        await revoked_end(stream)

    alice = tenant.tokens["alice"]
    conversation_id = await running_answer(recheck_server.url, tenant, bearer(alice))
    session = await sign_in(recheck_server.url, alice)
    async with (
        subscribed_socket(recheck_server, cookie(session), conversation_id) as ws,
        open_stream(recheck_server.url, cookie(session), conversation_id) as stream,
    ):
        await Session.update({Session.expires_at: datetime.now(UTC) - timedelta(seconds=1)}).where(
            Session.api_key == tenant.principals["alice"].key_id
        )
        await revoked_close(ws)
        await revoked_end(stream)
    assert_clean(recheck_server)
