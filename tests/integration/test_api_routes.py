"""The REST routes over HTTP (ASGI on the test's loop, real PostgreSQL)."""

from __future__ import annotations

import hashlib

import pytest

from app.tables import ApiKey, Message

pytestmark = pytest.mark.anyio


async def _conversation(client, tenant, who="alice", **body):
    r = await client.post("/api/conversations", json=body, headers=tenant.headers(who))
    assert r.status_code == 201, r.text
    return r.json()


async def test_session_cookie_login_and_logout(client, acme):
    """A key becomes an HttpOnly SameSite=Strict session cookie that authenticates; logout ends it."""
    r = await client.post("/api/session", json={"key": acme.tokens["alice"]})
    assert r.status_code == 200
    assert r.json()["role"] == "member"
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
    assert (await client.get("/api/me")).status_code == 200

    # As the web client's page sends it: a cookie-authenticated write carries its Origin.
    r = await client.delete("/api/session", headers={"Origin": "http://testserver"})
    assert r.status_code == 204
    assert "max-age=0" in r.headers["set-cookie"].lower()
    assert (await client.get("/api/me")).status_code == 401


async def test_session_with_bad_key_is_401(client):
    r = await client.post("/api/session", json={"key": "cs_nope"})
    assert r.status_code == 401
    assert r.json()["code"] == "invalid_credentials"
    assert "set-cookie" not in r.headers


async def test_me(client, acme):
    r = await client.get("/api/me", headers=acme.headers("admin"))
    body = r.json()
    assert body["role"] == "admin"
    assert body["company"]["id"] == str(acme.company_id)
    assert body["userId"] == str(acme.principals["admin"].user_id)


async def test_keys_token_shown_once_hash_stored_and_revocable(client, acme):
    """POST gives the token once; only its sha256 is stored; a revoked key stops working."""
    admin = acme.headers("admin")
    r = await client.post("/api/keys", json={"name": "ci", "role": "member"}, headers=admin)
    assert r.status_code == 201
    created = r.json()
    token = created["token"]
    assert token.startswith("cs_") and created["prefix"] == token[:10]
    row = await ApiKey.select().where(ApiKey.id == created["id"]).first()
    assert row["token_hash"] == hashlib.sha256(token.encode()).hexdigest()
    assert token not in str(row)

    listed = (await client.get("/api/keys", headers=admin)).json()
    mine = next(k for k in listed if k["id"] == created["id"])
    assert "token" not in mine and mine["revokedAt"] is None

    headers = {"Authorization": f"Bearer {token}"}
    assert (await client.get("/api/me", headers=headers)).status_code == 200
    assert (await client.delete(f"/api/keys/{created['id']}", headers=admin)).status_code == 204
    assert (await client.delete(f"/api/keys/{created['id']}", headers=admin)).status_code == 204  # idempotent
    r = await client.get("/api/me", headers=headers)
    assert r.status_code == 401 and r.json()["code"] == "invalid_credentials"


async def test_key_for_existing_user_shares_identity(client, acme):
    alice_id = str(acme.principals["alice"].user_id)
    r = await client.post("/api/keys", json={"name": "phone", "userId": alice_id}, headers=acme.headers("admin"))
    token = r.json()["token"]
    me = (await client.get("/api/me", headers={"Authorization": f"Bearer {token}"})).json()
    assert me["userId"] == alice_id


async def test_agents_crud(client, acme):
    admin = acme.headers("admin")
    r = await client.post("/api/agents", json={"name": "Helper", "config": {"pace": 0}}, headers=admin)
    assert r.status_code == 201
    agent = r.json()
    assert agent["adapter"] == "echo" and agent["config"] == {"pace": 0}
    # Members read the list (to pick an agent) but cannot change it.
    names = [a["name"] for a in (await client.get("/api/agents", headers=acme.headers("bob"))).json()]
    assert "Helper" in names
    r = await client.patch(f"/api/agents/{agent['id']}", json={"name": "Renamed"}, headers=admin)
    assert r.json()["name"] == "Renamed" and r.json()["config"] == {"pace": 0}
    assert (await client.delete(f"/api/agents/{agent['id']}", headers=admin)).status_code == 204
    assert (await client.patch(f"/api/agents/{agent['id']}", json={}, headers=admin)).status_code == 404


async def test_conversation_lifecycle(client, acme):
    h = acme.headers("alice")
    conv = await _conversation(client, acme, title="Plans", agentId=str(acme.agent_id))
    assert conv["title"] == "Plans" and conv["agentId"] == str(acme.agent_id)
    assert conv["ownerId"] == str(acme.principals["alice"].user_id)
    assert (await client.get(f"/api/conversations/{conv['id']}", headers=h)).json() == conv

    r = await client.post(f"/api/conversations/{conv['id']}/messages", json={"content": "hi"}, headers=h)
    assert r.status_code == 201
    message_id = r.json()["message"]["id"]

    assert (await client.delete(f"/api/conversations/{conv['id']}", headers=h)).status_code == 204
    assert (await client.get(f"/api/conversations/{conv['id']}", headers=h)).status_code == 404
    assert await Message.count().where(Message.id == message_id) == 0  # cascaded


@pytest.mark.parametrize(
    ("patch", "expect_title", "expect_agent"),
    [
        ({"title": "New"}, "New", "agent"),
        ({"agentId": None}, "Old", None),
        ({"title": None}, None, "agent"),
        ({"title": "Both", "agentId": None}, "Both", None),
        ({}, "Old", "agent"),
    ],
    ids=["title-alone", "agent-cleared-alone", "title-cleared", "both", "nothing"],
)
async def test_patch_changes_only_fields_sent(client, acme, patch, expect_title, expect_agent):
    conv = await _conversation(client, acme, title="Old", agentId=str(acme.agent_id))
    r = await client.patch(f"/api/conversations/{conv['id']}", json=patch, headers=acme.headers("alice"))
    assert r.status_code == 200, r.text
    assert r.json()["title"] == expect_title
    assert r.json()["agentId"] == (str(acme.agent_id) if expect_agent else None)


async def test_patch_sets_agent_alone_and_together(client, acme):
    conv = await _conversation(client, acme, title="T")
    h = acme.headers("alice")
    r = await client.patch(f"/api/conversations/{conv['id']}", json={"agentId": str(acme.agent_id)}, headers=h)
    assert r.json()["agentId"] == str(acme.agent_id) and r.json()["title"] == "T"
    r = await client.patch(f"/api/conversations/{conv['id']}", json={"agentId": None, "title": "U"}, headers=h)
    assert r.json()["agentId"] is None and r.json()["title"] == "U"


async def test_conversation_list_newest_activity_first_with_cursor(client, acme):
    h = acme.headers("bob")
    ids = [(await _conversation(client, acme, who="bob", title=f"c{i}"))["id"] for i in range(5)]
    # Activity in the oldest one moves it to the top.
    await client.post(f"/api/conversations/{ids[0]}/messages", json={"content": "bump"}, headers=h)
    expected = [ids[0], *reversed(ids[1:])]

    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/api/conversations", params=params, headers=h)).json()
        seen += [c["id"] for c in page["items"]]
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert seen == expected


async def test_messages_idempotent_post_pages_edit_history(client, acme):
    h = acme.headers("alice")
    conv = await _conversation(client, acme)
    url = f"/api/conversations/{conv['id']}/messages"

    first = await client.post(url, json={"content": "one", "clientMessageId": "m-1"}, headers=h)
    again = await client.post(url, json={"content": "one", "clientMessageId": "m-1"}, headers=h)
    assert first.status_code == 201 and again.status_code == 200
    assert first.json()["message"] == again.json()["message"]
    assert first.json()["generation"] is None
    assert await Message.count().where(Message.conversation == conv["id"]) == 1

    for i in range(2, 8):
        await client.post(url, json={"content": f"msg {i}"}, headers=h)
    default_page = (await client.get(url, headers=h)).json()
    assert len(default_page["items"]) == 7 and default_page["nextCursor"] is None

    newest = (await client.get(url, params={"limit": 3}, headers=h)).json()
    assert [m["content"] for m in newest["items"]] == ["msg 5", "msg 6", "msg 7"]
    older = (await client.get(url, params={"limit": 3, "before": newest["nextCursor"]}, headers=h)).json()
    assert [m["content"] for m in older["items"]] == ["msg 2", "msg 3", "msg 4"]
    oldest = (await client.get(url, params={"limit": 3, "before": older["nextCursor"]}, headers=h)).json()
    assert [m["content"] for m in oldest["items"]] == ["one"] and oldest["nextCursor"] is None

    message_id = first.json()["message"]["id"]
    r = await client.put(f"{url}/{message_id}", json={"content": "ONE"}, headers=h)
    edited = r.json()
    assert r.status_code == 200
    assert edited["content"] == "one" and edited["editedContent"] == "ONE" and edited["editedAt"]
    assert edited["effectiveContent"] == "ONE"

    history = (await client.get(f"/api/conversations/{conv['id']}/history", headers=h)).json()
    assert [m["effectiveContent"] for m in history] == ["ONE", *[f"msg {i}" for i in range(2, 8)]]
    assert set(history[0]) == {"id", "role", "effectiveContent", "createdAt", "parts"}
    assert history[0]["parts"] == [
        {
            "kind": "text",
            "state": "complete",
            "text": "ONE",
            "name": None,
            "toolCallId": None,
            "value": None,
            "error": None,
        }
    ]


async def test_admin_edits_agent_message(client, acme):
    conv = await _conversation(client, acme)
    agent_message = Message(conversation=conv["id"], role="agent", content="answer")
    await agent_message.save()
    url = f"/api/conversations/{conv['id']}/messages/{agent_message.id}"
    r = await client.put(url, json={"content": "better answer"}, headers=acme.headers("admin"))
    assert r.status_code == 200 and r.json()["effectiveContent"] == "better answer"
