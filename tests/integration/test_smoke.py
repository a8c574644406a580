import pytest

pytestmark = pytest.mark.anyio


async def test_healthz(client):
    r = await client.get("/healthz")
    assert r.status_code == 200
    r = await client.get("/readyz")
    assert r.json() == {"status": "ready", "checks": {"database": "ok"}}
    r = await client.get("/api/me")
    print(r.status_code, r.headers, r.text)
    assert r.status_code == 401
