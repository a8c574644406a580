"""What one API key and one company may hold at once: running answers (HTTP, SSE and
WebSocket `send`), SSE streams and WebSocket sockets; and the disconnect grace only an
admin may raise. Counts come back to zero however the thing held ends.

Answers and the grace are checked in process (the app over ASGI, and the core itself on
each broker); streams and sockets on a real `chatstream serve`, where holding one open
and dropping it is real.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID

import anyio
import httpx
import msgspec
import pytest
from httpx_sse import aconnect_sse
from litestar import Litestar
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from app.auth.principal import Principal
from app.chat.answer_store import ChatAnswerStore
from app.chat.conversations import create_conversation
from app.chat.generations import GenerationBusy
from app.chat.messages import post_message
from app.chat.schemas import ConversationCreate, MessageCreate
from app.config import Settings, get_settings
from app.main import create_app
from app.rate_limit import TooManyRequests
from app.streaming.core import StreamingCore
from app.streaming.policy import StreamPolicy
from app.streaming.quotas import Quotas
from app.tables import Message
from tests.factories import Tenant, make_tenant
from tests.integration.live_server import LiveServer
from tests.integration.test_streaming_core import FailingAdapter
from tests.integration.wire_api import make_agent, new_conversation
from tests.redis_support import any_broker

pytestmark = pytest.mark.anyio

STEP = 10.0  # the longest any wait may take before the test fails
SLOW = 0.2  # seconds per word: an answer that runs while the test looks at it


async def until(condition: Callable[[], Any], what: str) -> None:
    """Poll `condition` (sync or async) until it is true, for at most STEP seconds."""
    deadline = time.monotonic() + STEP
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def refused(response: httpx.Response, code: str, scope: str) -> None:
    assert response.status_code == 429, response.text
    body = response.json()
    assert set(body) == {"error", "code", "details"} and body["code"] == code
    assert body["details"]["scope"] == scope
    assert int(response.headers["Retry-After"]) == body["details"]["retryAfter"] >= 1


# -- running answers and the grace, in process ---------------------------------------------------------


@pytest.fixture
async def small_app() -> AsyncIterator[Litestar]:
    settings = msgspec.structs.replace(get_settings(), max_answers_per_key=1, max_answers_per_company=2)
    application = create_app(settings)
    async with application.lifespan():
        yield application


@pytest.fixture
async def http(small_app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=small_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


def post(http: httpx.AsyncClient, tenant: Tenant, who: str, cid: str, **body: Any) -> Any:
    body.setdefault("content", "hello there")
    return http.post(f"/api/conversations/{cid}/messages", json=body, headers=tenant.headers(who))


async def test_running_answers_are_capped_per_key_and_per_company(
    small_app: Litestar, http: httpx.AsyncClient, acme: Tenant
) -> None:
    core: StreamingCore = small_app.state.core
    agent = await make_agent(acme, SLOW)
    convs = {who: [await new_conversation(http, acme, agent, who) for _ in range(2)] for who in acme.tokens}
    first = await post(http, acme, "alice", convs["alice"][0])
    assert first.status_code == 201 and first.json()["generation"]["status"] == "running"

    # Her second answer is refused before anything is stored; a message asking for no answer is not.
    refused(await post(http, acme, "alice", convs["alice"][1]), "too_many_answers", "key")
    assert await Message.count().where(Message.conversation == convs["alice"][1]) == 0
    assert (await post(http, acme, "alice", convs["alice"][1], reply=False)).status_code == 201
    # A stream reader arriving first would start that answer: refused the same way.
    stream = await http.get(f"/api/conversations/{convs['alice'][1]}/stream", headers=acme.headers("alice"))
    refused(stream, "too_many_answers", "key")

    # Bob has his own place; the company's two are then taken.
    second = await post(http, acme, "bob", convs["bob"][0])
    assert second.status_code == 201
    refused(await post(http, acme, "admin", convs["admin"][0]), "too_many_answers", "company")
    assert core.quotas.answers.held(company_id=acme.company_id) == 2

    # Cancelled answers give their places back (cancel returns once the outcome is stored).
    for answer in (first, second):
        gid = answer.json()["generation"]["id"]
        assert (await http.post(f"/api/generations/{gid}/cancel", headers=acme.headers("admin"))).status_code == 200
    assert core.quotas.answers.held(company_id=acme.company_id) == 0
    third = await post(http, acme, "admin", convs["admin"][0])
    assert third.status_code == 201
    await http.post(f"/api/generations/{third.json()['generation']['id']}/cancel", headers=acme.headers("admin"))


async def test_only_an_admin_may_ask_for_a_longer_disconnect_grace(http: httpx.AsyncClient, acme: Tenant) -> None:
    default = get_settings().disconnect_grace
    cid = await new_conversation(http, acme)
    r = await post(http, acme, "alice", cid, disconnectGrace=default + 1, reply=False)
    assert r.status_code == 403, r.text
    body = r.json()
    assert body["code"] == "admin_required" and body["details"]["field"] == "disconnectGrace"
    assert await Message.count().where(Message.conversation == cid) == 0
    assert (await post(http, acme, "alice", cid, disconnectGrace=default, reply=False)).status_code == 201
    assert (await post(http, acme, "alice", cid, disconnectGrace=0, reply=False)).status_code == 201

    admin_cid = await new_conversation(http, acme, who="admin")
    assert (await post(http, acme, "admin", admin_cid, disconnectGrace=3600, reply=False)).status_code == 201
    assert (await post(http, acme, "admin", admin_cid, disconnectGrace=3601, reply=False)).status_code == 400


# -- the core: counts back to zero however an answer ends ----------------------------------------------


@asynccontextmanager
async def capped_core(broker_kind: str, **adapters: Any) -> AsyncIterator[StreamingCore]:
    quotas = Quotas(msgspec.structs.replace(Settings(), max_answers_per_key=1))
    async with any_broker(broker_kind) as broker:
        core = StreamingCore(
            broker, StreamPolicy(disconnect_grace=0), store=ChatAnswerStore(), adapters=adapters or None, quotas=quotas
        )
        try:
            yield core
        finally:
            await core.shutdown()


async def conversation(tenant: Tenant, pace: float) -> tuple[Principal, UUID]:
    agent = await make_agent(tenant, pace)
    alice = tenant.principals["alice"]
    created = await create_conversation(alice, ConversationCreate(agent_id=UUID(agent)))
    return alice, created.id


async def ask(core: StreamingCore, who: Principal, cid: UUID) -> UUID:
    posted, _ = await post_message(who, cid, MessageCreate(content="one two three"), core)
    assert posted.generation is not None
    return posted.generation.id


async def test_an_answer_gives_its_place_back_however_it_ends(broker_kind: str, acme: Tenant) -> None:
    async with capped_core(broker_kind) as core:
        held = core.quotas.answers
        alice, cid = await conversation(acme, SLOW)
        _, other = await conversation(acme, SLOW)

        # Cancelled by the user.
        gid = await ask(core, alice, cid)
        with pytest.raises(TooManyRequests):
            await ask(core, alice, other)
        await core.cancel(gid, "user")
        assert held.held() == 0

        # Its last reader left (grace 0).
        gid = await ask(core, alice, cid)
        await core.attach(gid)
        core.detach(gid)
        await until(lambda: held.held() == 0, "the disconnected answer's place")

        # A busy conversation refuses the message with 409 (not 429, even at the cap), and
        # counts nothing for it.
        gid = await ask(core, alice, cid)
        admin = acme.principals["admin"]
        for who in (alice, admin):
            with pytest.raises(GenerationBusy):
                await ask(core, who, cid)
        assert held.held(key_id=alice.key_id) == 1 and held.held(key_id=admin.key_id) == 0
        await core.cancel(gid, "user")

        # Done: the place is back once the answer has ended.
        _, fast = await conversation(acme, 0)
        gid = await ask(core, alice, fast)
        await until(lambda: held.held() == 0, "the finished answer's place")

        # Interrupted by the next message of the same key, which takes the place at once.
        gid = await ask(core, alice, cid)
        posted, _ = await post_message(alice, cid, MessageCreate(content="instead", if_busy="interrupt"), core)
        assert posted.generation is not None and held.held() == 1
        await core.shutdown()  # stops every answer
        assert held.held() == 0


async def test_a_failed_answer_gives_its_place_back(acme: Tenant) -> None:
    async with capped_core("in-process", echo=FailingAdapter()) as core:
        alice, cid = await conversation(acme, 0)
        await ask(core, alice, cid)
        await until(lambda: core.quotas.answers.held() == 0, "the failed answer's place")
        await ask(core, alice, cid)


# -- streams and sockets, on the wire ------------------------------------------------------------------

SOCKETS_PER_KEY = 2
SOCKETS_PER_COMPANY = 3


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with LiveServer(
        {
            "CHATSTREAM_MAX_SOCKETS_PER_KEY": str(SOCKETS_PER_KEY),
            "CHATSTREAM_MAX_SOCKETS_PER_COMPANY": str(SOCKETS_PER_COMPANY),
            "CHATSTREAM_MAX_STREAMS_PER_KEY": "1",
            "CHATSTREAM_MAX_ANSWERS_PER_KEY": "1",
        }
    ) as live:
        yield live


@pytest.fixture
async def wire(server: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=STEP) as client:
        yield client


@asynccontextmanager
async def socket(server: LiveServer, tenant: Tenant, who: str) -> AsyncIterator[ClientConnection]:
    url = server.url.replace("http://", "ws://", 1) + "/api/ws"
    with anyio.fail_after(STEP):
        conn = await connect(url, additional_headers=tenant.headers(who))
    try:
        yield conn
    finally:
        await conn.close()


async def frame(conn: ClientConnection) -> dict[str, Any]:
    with anyio.fail_after(STEP):
        data: dict[str, Any] = json.loads(await conn.recv())
    return data


async def request(conn: ClientConnection, body: dict[str, Any]) -> dict[str, Any]:
    """Send a frame; the ack, error or pong answering it (other frames skipped)."""
    await conn.send(json.dumps({**body, "ref": "r"}))
    while True:
        reply = await frame(conn)
        if reply.get("ref") == "r":
            return reply


async def assert_open(conn: ClientConnection) -> None:
    assert (await request(conn, {"type": "ping"}))["type"] == "pong"


async def assert_refused_socket(server: LiveServer, tenant: Tenant, who: str, scope: str) -> None:
    """The upgrade is accepted, then (no `hello`) an `error` frame says why and the close is 1013."""
    async with socket(server, tenant, who) as conn:
        notice = await frame(conn)
        assert notice["type"] == "error" and notice["code"] == "too_many_sockets", notice
        assert notice["details"]["scope"] == scope and notice["details"]["retryAfter"] >= 1
        with anyio.fail_after(STEP), pytest.raises(ConnectionClosed) as closed:
            await conn.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013


async def socket_opens(server: LiveServer, tenant: Tenant, who: str) -> bool:
    """An accepted socket is greeted (`hello`); a refused one gets the `error` instead."""
    async with socket(server, tenant, who) as conn:
        return (await frame(conn))["type"] == "hello"


async def test_sockets_are_capped_per_key_and_per_company(server: LiveServer) -> None:
    tenant = await make_tenant()
    async with socket(server, tenant, "alice") as first, socket(server, tenant, "alice") as second:
        await assert_open(first)
        await assert_open(second)
        await assert_refused_socket(server, tenant, "alice", "key")
        async with socket(server, tenant, "bob") as third:
            await assert_open(third)
            await assert_refused_socket(server, tenant, "admin", "company")
        await assert_open(first)  # the refused ones changed nothing for the open ones
    # Closed sockets gave their places back: alice has both again.
    await until(lambda: socket_opens(server, tenant, "alice"), "a socket place to come back")
    async with socket(server, tenant, "alice") as first, socket(server, tenant, "alice") as second:
        await assert_open(first)
        await assert_open(second)


async def test_streams_are_capped_per_key(server: LiveServer, wire: httpx.AsyncClient) -> None:
    tenant = await make_tenant()
    agent = await make_agent(tenant, SLOW)
    cid = await new_conversation(wire, tenant, agent)
    url = f"/api/conversations/{cid}/stream"
    long = await post(wire, tenant, "alice", cid, content=" ".join(["word"] * 200))
    assert long.status_code == 201
    async with aconnect_sse(wire, "GET", url, headers=tenant.headers("alice")) as events:
        # Held in a name: an iterator dropped at once is closed, and the stream with it.
        held = events.aiter_sse()
        assert (await anext(held)).event == "start"
        refused(await wire.get(url, headers=tenant.headers("alice")), "too_many_streams", "key")
        # Another key of the company still may.
        async with aconnect_sse(wire, "GET", url, headers=tenant.headers("admin")) as other:
            other_held = other.aiter_sse()
            assert (await anext(other_held)).event == "start"

    async def stream_opens() -> bool:
        async with aconnect_sse(wire, "GET", url, headers=tenant.headers("alice")) as again:
            return again.response.status_code == 200

    await until(stream_opens, "the closed stream's place to come back")
    await wire.post(f"/api/generations/{long.json()['generation']['id']}/cancel", headers=tenant.headers("alice"))


async def test_a_websocket_send_past_the_answer_cap_gets_an_error_frame(
    server: LiveServer, wire: httpx.AsyncClient
) -> None:
    tenant = await make_tenant()
    agent = await make_agent(tenant, SLOW)
    busy, other = [await new_conversation(wire, tenant, agent) for _ in range(2)]
    first = await post(wire, tenant, "alice", busy)
    assert first.status_code == 201
    async with socket(server, tenant, "alice") as conn:
        reply = await request(conn, {"type": "send", "conversationId": other, "content": "hi", "clientMessageId": "m1"})
        assert reply["type"] == "error" and reply["code"] == "too_many_answers", reply
        assert reply["details"]["scope"] == "key"
        await assert_open(conn)
    items = (await wire.get(f"/api/conversations/{other}/messages", headers=tenant.headers("alice"))).json()["items"]
    assert items == []
    gid = first.json()["generation"]["id"]
    await wire.post(f"/api/generations/{gid}/cancel", headers=tenant.headers("alice"))
