"""A database outage is 503 `database_unavailable` with Retry-After (clients and load
balancers retry), not a 500 with a traceback in the log, and the same code with `retryAfter`
on the WebSocket; the server works again once the database is back. The outage is a TCP
proxy in front of PostgreSQL that resets and refuses connections, so the shared server is
never touched."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import anyio
import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.factories import Tenant
from tests.integration.live_server import LiveServer
from tests.redis_support import TcpProxy, eventually

pytestmark = pytest.mark.anyio

UNAVAILABLE_FRAME = {
    "code": "database_unavailable",
    "message": "the server cannot reach its database; retry shortly",
    "details": {"retryAfter": 5},
}

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
            conversation = (await http.post("/api/conversations", json={}, headers=h)).json()["id"]
            ws_url = server.url.replace("http://", "ws://", 1) + "/api/ws"
            opened = await connect(ws_url, additional_headers=h)
            assert json.loads(await opened.recv())["type"] == "hello"

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
            # A new socket is told when to come back, then closed with 1013 ("try again later").
            with anyio.fail_after(STEP):
                async with connect(ws_url, additional_headers=h) as refused:
                    notice = json.loads(await refused.recv())
                    with pytest.raises(ConnectionClosed) as closed:
                        await refused.recv()
            assert notice == {**UNAVAILABLE_FRAME, "type": "error"}, notice
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
            # A socket opened before: a `send` is answered with the same error, and the socket stays.
            send = {"type": "send", "conversationId": conversation, "content": "hi", "clientMessageId": "c1"}
            await opened.send(json.dumps({**send, "ref": "s"}))
            with anyio.fail_after(STEP):
                while (reply := json.loads(await opened.recv())).get("ref") != "s":
                    pass
            assert reply == {**UNAVAILABLE_FRAME, "type": "error", "ref": "s"}, reply

            await proxy.start()

            async def works() -> bool:
                return (await http.get("/api/conversations", headers=h)).status_code == 200

            await eventually(works, within=STEP, what="the server working again")
            await opened.close()
    finally:
        await anyio.to_thread.run_sync(server.stop)
    log = "\n".join(server.lines)
    assert "database unavailable on GET /api/conversations" in log
    assert "unhandled error" not in log, log  # (asyncpg's pool logs its own reconnect attempts)
