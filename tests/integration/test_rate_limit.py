"""Posting messages is limited per API key, over HTTP and WebSocket `send` together and
whatever the key signed in with: past the limit, 429 in the error shape with Retry-After
(an `error` frame on a socket)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anyio
import httpx
import msgspec
import pytest
from websockets.asyncio.client import connect

from app.config import get_settings
from app.main import create_app
from app.tables import Message
from tests.integration.live_server import LiveServer

pytestmark = pytest.mark.anyio

STEP = 10.0  # the longest a read from the live server may take


@pytest.fixture
async def limited() -> AsyncIterator[httpx.AsyncClient]:
    application = create_app(msgspec.structs.replace(get_settings(), messages_per_minute=3))
    async with application.lifespan():
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield client


async def test_a_key_past_its_message_budget_gets_429(limited, acme):
    h = acme.headers("alice")
    cid = (await limited.post("/api/conversations", json={}, headers=h)).json()["id"]
    url = f"/api/conversations/{cid}/messages"
    for i in range(3):
        assert (await limited.post(url, json={"content": f"m{i}"}, headers=h)).status_code == 201
    r = await limited.post(url, json={"content": "one too many"}, headers=h)
    assert r.status_code == 429
    body = r.json()
    assert body["code"] == "rate_limited" and set(body) == {"error", "code", "details"}
    assert int(r.headers["Retry-After"]) == body["details"]["retryAfter"] >= 1
    assert await Message.count().where(Message.conversation == cid) == 3  # the refused one stored nothing

    # Other keys have their own budget; reading is not limited.
    bob = acme.headers("bob")
    bob_cid = (await limited.post("/api/conversations", json={}, headers=bob)).json()["id"]
    r = await limited.post(f"/api/conversations/{bob_cid}/messages", json={"content": "hi"}, headers=bob)
    assert r.status_code == 201
    assert (await limited.get(url, headers=h)).status_code == 200


async def test_cookie_sessions_and_bearer_requests_of_a_key_share_its_budget(limited, acme):
    bearer = acme.headers("alice")
    signed_in = await limited.post("/api/session", json={"key": acme.tokens["alice"]})
    assert signed_in.status_code == 200, signed_in.text
    # The cookie stays in the client; a browser's same-origin write carries its Origin.
    cookie = {"Origin": "http://testserver"}
    cid = (await limited.post("/api/conversations", json={}, headers=bearer)).json()["id"]
    url = f"/api/conversations/{cid}/messages"
    for i, headers in enumerate((bearer, cookie, bearer)):
        r = await limited.post(url, json={"content": f"m{i}", "reply": False}, headers=headers)
        assert r.status_code == 201, r.text
    for headers in (cookie, bearer):
        r = await limited.post(url, json={"content": "one too many"}, headers=headers)
        assert r.status_code == 429 and r.json()["code"] == "rate_limited", r.text
    assert await Message.count().where(Message.conversation == cid) == 3


@pytest.fixture(scope="module")
def limited_server():
    with LiveServer({"CHATSTREAM_MESSAGES_PER_MINUTE": "3"}) as live:
        yield live


async def test_websocket_sends_count_in_the_same_budget(limited_server, acme):
    h = acme.headers("alice")
    async with httpx.AsyncClient(base_url=limited_server.url, timeout=STEP) as http:
        cid = (await http.post("/api/conversations", json={}, headers=h)).json()["id"]
        url = f"/api/conversations/{cid}/messages"
        for i in range(2):
            assert (await http.post(url, json={"content": f"m{i}", "reply": False}, headers=h)).status_code == 201
        ws_url = limited_server.url.replace("http://", "ws://", 1) + "/api/ws"
        async with connect(ws_url, additional_headers=h) as ws:

            async def request(frame):
                await ws.send(json.dumps({**frame, "ref": "r"}))
                with anyio.fail_after(STEP):
                    while (reply := json.loads(await ws.recv())).get("ref") != "r":
                        pass
                return reply

            send = {"type": "send", "conversationId": cid, "content": "over ws", "reply": False}
            assert (await request({**send, "clientMessageId": "a"}))["type"] == "ack"
            refused = await request({**send, "clientMessageId": "b"})
            assert refused["type"] == "error" and refused["code"] == "rate_limited", refused
            assert refused["details"]["retryAfter"] >= 1
            assert (await request({"type": "ping"}))["type"] == "pong"  # an error frame, not a close
        r = await http.post(url, json={"content": "over http"}, headers=h)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert len((await http.get(url, headers=h)).json()["items"]) == 3
