"""A database outage is 503 `database_unavailable` with Retry-After (clients and load
balancers retry), not a 500 with a traceback in the log; the server works again once the
database is back. The outage is a TCP proxy in front of PostgreSQL that resets and refuses
connections, so the shared server is never touched."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import anyio
import httpx
import pytest

from tests.factories import Tenant
from tests.integration.live_server import LiveServer
from tests.redis_support import TcpProxy, eventually

pytestmark = pytest.mark.anyio

STEP = 10.0


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    database = urlsplit(os.environ["DATABASE_URL"])
    proxy = TcpProxy(f"postgresql://{database.hostname}:{database.port or 5432}")
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


async def test_a_database_outage_is_503_then_the_server_recovers(proxy: TcpProxy, acme: Tenant) -> None:
    database = urlsplit(os.environ["DATABASE_URL"])
    through_proxy = database._replace(netloc=f"{database.username or 'postgres'}@127.0.0.1:{proxy.port}").geturl()
    # The auth cache off: every request reads its key from the database.
    server = LiveServer({"DATABASE_URL": through_proxy, "CHATSTREAM_AUTH_CACHE_SECONDS": "0"})
    await anyio.to_thread.run_sync(server.start)  # in a thread: this loop serves the proxy meanwhile
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=STEP) as http:
            h = acme.headers("alice")
            assert (await http.get("/api/conversations", headers=h)).status_code == 200

            await proxy.stop()
            for path in ("/api/conversations", "/api/me"):
                r = await http.get(path, headers=h)
                assert r.status_code == 503, r.text
                assert r.json() == {
                    "error": "the server cannot reach its database; retry shortly",
                    "code": "database_unavailable",
                    "details": {"retryAfter": 5},
                }
                assert r.headers["Retry-After"] == "5"
            assert (await http.get("/readyz")).status_code == 503

            await proxy.start()

            async def works() -> bool:
                return (await http.get("/api/conversations", headers=h)).status_code == 200

            await eventually(works, within=STEP, what="the server working again")
    finally:
        await anyio.to_thread.run_sync(server.stop)
    log = "\n".join(server.lines)
    assert "database unavailable on GET /api/conversations" in log
    assert "unhandled error" not in log, log  # (asyncpg's pool logs its own reconnect attempts)
