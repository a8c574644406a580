"""Generations over HTTP (ASGI on the test's loop): POST starts one, status and metrics,
idempotent cancel, 409 with the running id, tenancy."""

from __future__ import annotations

import asyncio

import pytest

from app.agents.schemas import AgentCreate
from app.agents.service import create_agent
from app.tables import Message

pytestmark = pytest.mark.anyio


async def _conversation(client, tenant, pace: float) -> str:
    agent = await create_agent(tenant.company_id, AgentCreate(name="paced", config={"pace": pace}))
    r = await client.post("/api/conversations", json={"agentId": str(agent.id)}, headers=tenant.headers("alice"))
    return r.json()["id"]


async def _wait_finished(client, headers, gid: str) -> dict:
    for _ in range(500):  # bounded: the answer takes milliseconds at pace 0
        body = (await client.get(f"/api/generations/{gid}", headers=headers)).json()
        if body["status"] != "running":
            return body
        await asyncio.sleep(0.01)
    raise AssertionError("the generation did not finish")


async def test_post_starts_a_generation_with_status_and_metrics(client, acme):
    h = acme.headers("alice")
    cid = await _conversation(client, acme, pace=0)
    r = await client.post(f"/api/conversations/{cid}/messages", json={"content": "one two three"}, headers=h)
    assert r.status_code == 201
    generation = r.json()["generation"]
    assert generation["status"] == "running" and generation["replyToId"] == r.json()["message"]["id"]

    final = await _wait_finished(client, h, generation["id"])
    assert final["status"] == "done" and final["tokenCount"] == 3
    assert final["ttftMs"] is not None and final["startedAt"] and final["finishedAt"]
    stored = await Message.select().where(Message.id == final["resultMessageId"]).first()
    assert stored["content"] == "one two three"

    # Cancelling a finished answer reports its final state.
    again = await client.post(f"/api/generations/{generation['id']}/cancel", headers=h)
    assert again.status_code == 200 and again.json() == final


async def test_no_agent_or_reply_false_starts_nothing(client, acme):
    h = acme.headers("alice")
    bare = (await client.post("/api/conversations", json={}, headers=h)).json()["id"]
    r = await client.post(f"/api/conversations/{bare}/messages", json={"content": "hi"}, headers=h)
    assert r.json()["generation"] is None
    cid = await _conversation(client, acme, pace=0)
    r = await client.post(f"/api/conversations/{cid}/messages", json={"content": "hi", "reply": False}, headers=h)
    assert r.json()["generation"] is None


async def test_cancel_is_idempotent(client, acme):
    h = acme.headers("alice")
    cid = await _conversation(client, acme, pace=10)
    r = await client.post(f"/api/conversations/{cid}/messages", json={"content": "slow answer"}, headers=h)
    gid = r.json()["generation"]["id"]
    first = await client.post(f"/api/generations/{gid}/cancel", headers=h)
    second = await client.post(f"/api/generations/{gid}/cancel", headers=h)
    assert first.status_code == second.status_code == 200
    assert first.json()["status"] == "cancelled" and first.json() == second.json()
    assert first.json()["error"] == "user"


async def test_busy_conversation_409_names_the_running_generation(client, acme):
    h = acme.headers("alice")
    cid = await _conversation(client, acme, pace=10)
    url = f"/api/conversations/{cid}/messages"
    results = await asyncio.gather(*(client.post(url, json={"content": f"m{i}"}, headers=h) for i in range(10)))
    created = [r for r in results if r.status_code == 201]
    busy = [r for r in results if r.status_code == 409]
    assert len(created) == 1 and len(busy) == 9
    running = created[0].json()["generation"]["id"]
    for r in busy:
        assert r.json()["code"] == "generation_in_progress"
        assert r.json()["details"] == {"generationId": running}
    assert await Message.count().where(Message.conversation == cid) == 1

    # `interrupt` cancels the running answer and starts the new one.
    r = await client.post(url, json={"content": "new", "ifBusy": "interrupt"}, headers=h)
    assert r.status_code == 201
    old = (await client.get(f"/api/generations/{running}", headers=h)).json()
    assert old["status"] == "cancelled" and old["error"] == "interrupted"
    await client.post(f"/api/generations/{r.json()['generation']['id']}/cancel", headers=h)


async def test_other_tenants_and_members_cannot_see_or_cancel(client, acme, globex):
    h = acme.headers("alice")
    cid = await _conversation(client, acme, pace=10)
    r = await client.post(f"/api/conversations/{cid}/messages", json={"content": "private"}, headers=h)
    gid = r.json()["generation"]["id"]
    for headers in (acme.headers("bob"), globex.headers("admin")):
        assert (await client.get(f"/api/generations/{gid}", headers=headers)).status_code == 404
        r = await client.post(f"/api/generations/{gid}/cancel", headers=headers)
        assert r.status_code == 404 and r.json()["code"] == "not_found"
    assert (await client.get(f"/api/generations/{gid}", headers=h)).json()["status"] == "running"
    assert (await client.get(f"/api/generations/{gid}", headers=acme.headers("admin"))).status_code == 200
    await client.post(f"/api/generations/{gid}/cancel", headers=h)


@pytest.mark.parametrize(
    "body",
    [{"ifBusy": "sometimes"}, {"partial": "half"}, {"disconnectGrace": -1}, {"disconnectGrace": "soon"}],
)
async def test_bad_policy_overrides_are_400(client, acme, body):
    cid = await _conversation(client, acme, pace=0)
    r = await client.post(
        f"/api/conversations/{cid}/messages", json={"content": "x", **body}, headers=acme.headers("alice")
    )
    assert r.status_code == 400 and r.json()["code"] == "invalid_request"
    assert r.json()["details"][0]["field"] == next(iter(body))
    assert await Message.count().where(Message.conversation == cid) == 0


async def test_a_cursor_ahead_of_the_answer_is_400(client, acme):
    """A cursor naming a seq the answer has not produced is refused before any stream starts."""
    h = acme.headers("alice")
    cid = await _conversation(client, acme, pace=10)
    r = await client.post(f"/api/conversations/{cid}/messages", json={"content": "slow"}, headers=h)
    gid = r.json()["generation"]["id"]
    r = await client.get(f"/api/conversations/{cid}/stream", headers={**h, "Last-Event-ID": f"{gid}.999"})
    assert r.status_code == 400 and r.json()["code"] == "invalid_cursor"
    final = (await client.post(f"/api/generations/{gid}/cancel", headers=h)).json()
    terminal = final["tokenCount"] + 2
    r = await client.get(f"/api/conversations/{cid}/stream", params={"after": f"{gid}.{terminal + 1}"}, headers=h)
    assert r.status_code == 400 and r.json()["code"] == "invalid_cursor"
    r = await client.get(f"/api/conversations/{cid}/stream", params={"after": f"{gid}.{terminal}"}, headers=h)
    assert r.status_code == 204  # has everything, nothing else to stream
