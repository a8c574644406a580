import pytest

pytestmark = pytest.mark.anyio


async def test_flow(client, acme):
    h = acme.headers("alice")
    r = await client.post("/api/conversations", json={"title": "hi", "agentId": str(acme.agent_id)}, headers=h)
    assert r.status_code == 201, r.text
    cid = r.json()["id"]
    r = await client.post(
        f"/api/conversations/{cid}/messages", json={"content": "hello world", "clientMessageId": "c1"}, headers=h
    )
    assert r.status_code == 201, r.text
    r2 = await client.post(
        f"/api/conversations/{cid}/messages", json={"content": "hello world", "clientMessageId": "c1"}, headers=h
    )
    assert r2.status_code == 200, r2.text
    assert r2.json()["message"]["id"] == r.json()["message"]["id"]
    mid = r.json()["message"]["id"]
    r = await client.put(f"/api/conversations/{cid}/messages/{mid}", json={"content": "edited"}, headers=h)
    assert r.status_code == 200, r.text
    r = await client.get(f"/api/conversations/{cid}/history", headers=h)
    print(r.json())
    r = await client.get("/api/conversations", headers=h)
    print(r.json())
    r = await client.patch(f"/api/conversations/{cid}", json={"title": None}, headers=h)
    print(r.status_code, r.json())
    r = await client.post(f"/api/conversations/{cid}/messages", content=b"{bad", headers=h)
    print(r.status_code, r.json())
    r = await client.post(f"/api/conversations/{cid}/messages", json={"content": 1}, headers=h)
    print(r.status_code, r.json())
    r = await client.post(f"/api/conversations/{cid}/messages", json={"content": "x", "zzz": 1}, headers=h)
    print(r.status_code, r.json())
    r = await client.post(f"/api/conversations/{cid}/messages", json={}, headers=h)
    print(r.status_code, r.json())
    r = await client.get("/api/conversations/not-a-uuid", headers=h)
    print(r.status_code, r.json())
    r = await client.get("/api/conversations?limit=1000", headers=h)
    print(r.status_code, r.json())
    r = await client.get("/api/conversations?cursor=zzz", headers=h)
    print(r.status_code, r.json())
    r = await client.post(f"/api/conversations/{cid}/messages", content=b"x" * 300_000, headers=h)
    print(r.status_code, r.json())
    r = await client.get("/api/keys", headers=h)
    print(r.status_code, r.json())
    r = await client.post("/api/session", json={"key": acme.tokens["alice"]})
    print(r.status_code, r.json(), r.headers.get("set-cookie"))
    r = await client.get("/api/me")
    print(r.status_code, r.json())
