"""Setting up through the HTTP API, for the tests that talk to a real server."""

from __future__ import annotations

from typing import Any

import httpx

from app.agents.schemas import AgentCreate
from app.agents.service import create_agent
from tests.factories import Tenant


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
