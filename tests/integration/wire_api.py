"""Setting up through the HTTP API, and a plain WebSocket, for the tests that talk to a real server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Origin

from app.agents.schemas import AgentCreate
from app.agents.service import create_agent
from tests.factories import Tenant
from tests.integration.live_server import LiveServer

STEP = 10.0  # the longest a socket's open, close or wait for a frame may take


async def make_agent(tenant: Tenant, pace: float) -> str:
    """An echo agent that sleeps `pace` seconds before each word."""
    agent = await create_agent(tenant.company_id, AgentCreate(name=f"echo {pace}", config={"pace": pace}))
    return str(agent.id)


async def new_conversation(
    http: httpx.AsyncClient, tenant: Tenant, agent_id: str | None = None, who: str = "alice"
) -> str:
    body = {"agentId": agent_id} if agent_id else {}
    response = await http.post("/api/conversations", json=body, headers=tenant.headers(who))
    assert response.status_code == 201, response.text
    conversation_id: str = response.json()["id"]
    return conversation_id


async def post_message(
    http: httpx.AsyncClient, tenant: Tenant, conversation_id: str, content: str, who: str = "alice", **extra: Any
) -> dict[str, Any]:
    """POST a user message (with policy overrides in `extra`); the 201 body {message, generation}."""
    response = await http.post(
        f"/api/conversations/{conversation_id}/messages",
        json={"content": content, **extra},
        headers=tenant.headers(who),
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def messages_of(http: httpx.AsyncClient, tenant: Tenant, conversation_id: str) -> list[dict[str, Any]]:
    response = await http.get(f"/api/conversations/{conversation_id}/messages", headers=tenant.headers("alice"))
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def text_of(events: list[dict[str, Any]]) -> str:
    """The answer a client reconstructs from wire events: tokens appended; a `snapshot`
    replaces everything before it."""
    text = ""
    for event in events:
        if event["type"] == "snapshot":
            text = event["text"]
        elif event["type"] == "token":
            text += event["text"]
    return text


@asynccontextmanager
async def socket(
    live: LiveServer, headers: dict[str, str], origin: str | None = None
) -> AsyncIterator[ClientConnection]:
    """A JSON WebSocket to `live`'s `/api/ws` with these headers (and `Origin`), closed at the end."""
    url = live.url.replace("http://", "ws://", 1) + "/api/ws"
    with anyio.fail_after(STEP):
        conn = await connect(
            url, additional_headers=headers, origin=Origin(origin) if origin else None, proxy=None, close_timeout=1
        )
    try:
        yield conn
    finally:
        with anyio.move_on_after(STEP):
            await conn.close()


async def frame_where(conn: ClientConnection, **fields: Any) -> dict[str, Any]:
    """The next frame whose fields have these values (the ones before it are skipped)."""
    with anyio.fail_after(STEP):
        while True:
            frame: dict[str, Any] = json.loads(await conn.recv())
            if all(frame.get(k) == v for k, v in fields.items()):
                return frame
