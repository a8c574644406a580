"""Posting messages is limited per API key: past the limit, 429 in the error shape with Retry-After."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import msgspec
import pytest

from app.config import get_settings
from app.main import create_app
from app.tables import Message

pytestmark = pytest.mark.anyio


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
