"""Tenancy over HTTP, with two companies and two members each (acme, globex: admin, alice, bob)."""

from __future__ import annotations

import pytest

from app.tables import Conversation, Message

pytestmark = pytest.mark.anyio


async def _setup(client, acme):
    """alice's conversation with one message of hers."""
    h = acme.headers("alice")
    conv = (await client.post("/api/conversations", json={"title": "alice's"}, headers=h)).json()
    msg = (await client.post(f"/api/conversations/{conv['id']}/messages", json={"content": "hi"}, headers=h)).json()
    return conv["id"], msg["message"]["id"]


def _routes(cid: str, mid: str) -> list[tuple[str, str, dict | None]]:
    return [
        ("GET", f"/api/conversations/{cid}", None),
        ("PATCH", f"/api/conversations/{cid}", {"title": "taken"}),
        ("GET", f"/api/conversations/{cid}/messages", None),
        ("POST", f"/api/conversations/{cid}/messages", {"content": "intrusion"}),
        ("PUT", f"/api/conversations/{cid}/messages/{mid}", {"content": "rewritten"}),
        ("GET", f"/api/conversations/{cid}/history", None),
        ("DELETE", f"/api/conversations/{cid}", None),
    ]


async def _snapshot(cid: str) -> tuple[list, list]:
    conv = await Conversation.select().where(Conversation.id == cid)
    msgs = await Message.select().where(Message.conversation == cid).order_by(Message.created_at)
    return conv, msgs


@pytest.mark.parametrize("intruder", ["bob", "globex-admin", "globex-alice"])
async def test_others_get_404_and_change_nothing(client, acme, globex, intruder):
    """Another member of the company, and anyone of another company, find nothing and change nothing."""
    cid, mid = await _setup(client, acme)
    before = await _snapshot(cid)
    headers = acme.headers("bob") if intruder == "bob" else globex.headers(intruder.split("-")[1])
    for method, url, body in _routes(cid, mid):
        r = await client.request(method, url, json=body, headers=headers)
        assert r.status_code == 404, (method, url, r.text)
        assert r.json()["code"] == "not_found"
    assert await _snapshot(cid) == before


async def test_member_lists_only_own_admin_lists_company(client, acme, globex):
    cid, _ = await _setup(client, acme)
    bob_conv = (await client.post("/api/conversations", json={}, headers=acme.headers("bob"))).json()["id"]
    globex_conv = (await client.post("/api/conversations", json={}, headers=globex.headers("alice"))).json()["id"]

    async def listed(headers):
        return {c["id"] for c in (await client.get("/api/conversations?limit=100", headers=headers)).json()["items"]}

    alice_sees, bob_sees, admin_sees = (
        await listed(acme.headers("alice")),
        await listed(acme.headers("bob")),
        await listed(acme.headers("admin")),
    )
    assert cid in alice_sees and bob_conv not in alice_sees and globex_conv not in alice_sees
    assert bob_conv in bob_sees and cid not in bob_sees
    assert {cid, bob_conv} <= admin_sees and globex_conv not in admin_sees


async def test_admin_reaches_company_conversations(client, acme):
    cid, mid = await _setup(client, acme)
    admin = acme.headers("admin")
    assert (await client.get(f"/api/conversations/{cid}", headers=admin)).status_code == 200
    r = await client.put(f"/api/conversations/{cid}/messages/{mid}", json={"content": "moderated"}, headers=admin)
    assert r.status_code == 200


async def test_only_author_or_admin_edits_user_message(client, acme):
    """An admin's message in alice's conversation: alice (not the author) gets 403."""
    cid, _ = await _setup(client, acme)
    r = await client.post(
        f"/api/conversations/{cid}/messages", json={"content": "from admin"}, headers=acme.headers("admin")
    )
    admin_msg = r.json()["message"]["id"]
    r = await client.put(
        f"/api/conversations/{cid}/messages/{admin_msg}", json={"content": "x"}, headers=acme.headers("alice")
    )
    assert r.status_code == 403 and r.json()["code"] == "forbidden"
    stored = await Message.select(Message.edited_content).where(Message.id == admin_msg).first()
    assert stored["edited_content"] is None


async def test_member_cannot_edit_agent_message(client, acme):
    cid, _ = await _setup(client, acme)
    agent_msg = Message(conversation=cid, role="agent", content="answer")
    await agent_msg.save()
    r = await client.put(
        f"/api/conversations/{cid}/messages/{agent_msg.id}", json={"content": "x"}, headers=acme.headers("alice")
    )
    assert r.status_code == 403 and r.json()["code"] == "forbidden"
    stored = await Message.select(Message.edited_content).where(Message.id == agent_msg.id).first()
    assert stored["edited_content"] is None


async def test_other_company_agent_and_key_are_404(client, acme, globex):
    admin = acme.headers("admin")
    r = await client.patch(f"/api/agents/{globex.agent_id}", json={"name": "stolen"}, headers=admin)
    assert r.status_code == 404
    assert (await client.delete(f"/api/agents/{globex.agent_id}", headers=admin)).status_code == 404
    r = await client.post("/api/conversations", json={"agentId": str(globex.agent_id)}, headers=acme.headers("alice"))
    assert r.status_code == 404
    assert (await client.delete(f"/api/keys/{globex.principals['bob'].key_id}", headers=admin)).status_code == 404
    agents = (await client.get("/api/agents", headers=admin)).json()
    assert str(globex.agent_id) not in {a["id"] for a in agents}
    keys = (await client.get("/api/keys", headers=admin)).json()
    assert str(globex.principals["bob"].key_id) not in {k["id"] for k in keys}


async def test_members_cannot_use_admin_routes(client, acme):
    h = acme.headers("alice")
    for method, url, body in [
        ("GET", "/api/keys", None),
        ("POST", "/api/keys", {"name": "x"}),
        ("DELETE", f"/api/keys/{acme.principals['bob'].key_id}", None),
        ("POST", "/api/agents", {"name": "x"}),
        ("PATCH", f"/api/agents/{acme.agent_id}", {"name": "x"}),
        ("DELETE", f"/api/agents/{acme.agent_id}", None),
    ]:
        r = await client.request(method, url, json=body, headers=h)
        assert r.status_code == 403 and r.json()["code"] == "admin_required", (method, url)
