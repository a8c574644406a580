"""The conversation list over `GET /api/ws` (`subscribe_conversations`, docs/protocol.md): a
real `chatstream serve` and the real `websockets` client, and two processes on Redis.

A socket that follows the list gets, for every conversation its key may list (a member's
own, every conversation of the company for an admin), `conversation.created`,
`conversation.updated`, `conversation.deleted` and `conversation.activity` (a message was
stored in it), whoever made the change and over whatever channel; another member's and
another company's never. "Nothing arrived" is checked behind a barrier: a `ping` sent after
the change's REST call returned, whose `pong` comes after any frame the change caused.

Also: the core finds a conversation's scope in the database (PostgreSQL and SQLite) when no
request of its process told it.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any

import anyio
import httpx
import pytest

from app.chat.conversations import create_conversation
from app.chat.schemas import ConversationCreate
from app.streaming import scopes
from app.streaming.core import StreamingCore
from app.streaming.protocol import ConversationActivity, ConversationDeleted, MessageCreated
from app.streaming.records import MessageOut
from app.tables import MessageRole, MessageStatus
from tests.factories import Tenant, make_tenant
from tests.integration.live_server import LiveServer
from tests.integration.test_scale_out import Cluster
from tests.integration.test_ws_wire import STEP, Socket, assert_error_frame, open_socket
from tests.integration.wire_api import make_agent, post_message

pytestmark = pytest.mark.anyio

LIST_FRAMES = ("conversation.created", "conversation.updated", "conversation.deleted", "conversation.activity")
MAX_SUBSCRIPTIONS = 1  # the list is not counted: with it, one conversation may still be followed


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with LiveServer({"CHATSTREAM_WS_MAX_SUBSCRIPTIONS": str(MAX_SUBSCRIPTIONS)}) as live:
        yield live


@pytest.fixture
async def http(server: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=STEP) as client:
        yield client


@pytest.fixture
async def acme() -> Tenant:
    return await make_tenant()


@pytest.fixture
async def globex() -> Tenant:
    return await make_tenant()


@pytest.fixture(params=["json", "msgpack"])
def encoding(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


# -- helpers --------------------------------------------------------------------------------------


def listed(frame: dict[str, Any]) -> bool:
    return frame["type"] in LIST_FRAMES


def of(conversation_id: str, kind: str) -> Any:
    return lambda f: f["type"] == kind and f["conversationId"] == conversation_id


async def follow_list(ws: Socket) -> dict[str, Any]:
    ref = ws.next_ref()
    await ws.send({"type": "subscribe_conversations", "ref": ref})
    ack = await ws.wait_for(lambda f: f["type"] in ("ack", "error") and f.get("ref") == ref)
    assert ack == {"type": "ack", "ref": ref}
    return ack


async def list_frames_until_barrier(ws: Socket) -> list[dict[str, Any]]:
    """The list frames that arrived before a `pong` sent now (and every one still pending)."""
    mark = len(ws.log)
    await ws.assert_usable()
    seen = [f for f in ws.pending if listed(f)]
    ws.pending = [f for f in ws.pending if not listed(f)]
    return seen + [f for f in ws.log[mark:] if listed(f) and f not in seen]


async def create(http: httpx.AsyncClient, tenant: Tenant, who: str, **body: Any) -> dict[str, Any]:
    response = await http.post("/api/conversations", json=body, headers=tenant.headers(who))
    assert response.status_code == 201, response.text
    conversation: dict[str, Any] = response.json()
    return conversation


async def rename(http: httpx.AsyncClient, tenant: Tenant, who: str, conversation_id: str, title: str) -> dict[str, Any]:
    response = await http.patch(
        f"/api/conversations/{conversation_id}", json={"title": title}, headers=tenant.headers(who)
    )
    assert response.status_code == 200, response.text
    conversation: dict[str, Any] = response.json()
    return conversation


async def delete(http: httpx.AsyncClient, tenant: Tenant, who: str, conversation_id: str) -> None:
    response = await http.delete(f"/api/conversations/{conversation_id}", headers=tenant.headers(who))
    assert response.status_code == 204, response.text


async def get(http: httpx.AsyncClient, tenant: Tenant, who: str, path: str) -> Any:
    response = await http.get(path, headers=tenant.headers(who))
    assert response.status_code == 200, response.text
    return response.json()


# -- one socket's list ----------------------------------------------------------------------------


async def test_the_list_follows_a_conversation_from_creation_to_deletion(
    server: LiveServer, http: httpx.AsyncClient, acme: Tenant, encoding: str
) -> None:
    agent = await make_agent(acme, 0)
    async with open_socket(server, encoding, acme.headers("alice")) as ws:
        await follow_list(ws)
        conversation = await create(http, acme, "alice", agentId=agent)
        cid = conversation["id"]
        created = await ws.wait_for(of(cid, "conversation.created"))
        assert created == {"type": "conversation.created", "conversationId": cid, "conversation": conversation}

        renamed = await rename(http, acme, "alice", cid, "Lisbon, May")
        updated = await ws.wait_for(of(cid, "conversation.updated"))
        assert updated == {"type": "conversation.updated", "conversationId": cid, "conversation": renamed}

        # The user message, then the agent's answer: two activities, each at its message's time.
        posted = await post_message(http, acme, cid, "Book a table for two", who="alice")
        first = await ws.wait_for(of(cid, "conversation.activity"))
        assert first == {
            "type": "conversation.activity",
            "conversationId": cid,
            "lastMessageAt": posted["message"]["createdAt"],
        }
        second = await ws.wait_for(of(cid, "conversation.activity"))
        messages = (await get(http, acme, "alice", f"/api/conversations/{cid}/messages"))["items"]
        assert [m["role"] for m in messages] == ["user", "agent"]
        assert second["lastMessageAt"] == messages[1]["createdAt"]
        assert datetime.fromisoformat(second["lastMessageAt"]) > datetime.fromisoformat(first["lastMessageAt"])
        # As GET /api/conversations has it now.
        listing = await get(http, acme, "alice", "/api/conversations")
        assert listing["items"][0]["id"] == cid and listing["items"][0]["lastMessageAt"] == second["lastMessageAt"]

        await delete(http, acme, "alice", cid)
        deleted = await ws.wait_for(of(cid, "conversation.deleted"))
        assert deleted == {"type": "conversation.deleted", "conversationId": cid}

        # Nothing more of the list after the unsubscribe's ack (and not the socket's own messages).
        ack = await ws.ack({"type": "unsubscribe_conversations"})
        assert set(ack) == {"type", "ref"}
        later = await create(http, acme, "alice")
        await rename(http, acme, "alice", later["id"], "after")
        await post_message(http, acme, later["id"], "after", who="alice")
        await delete(http, acme, "alice", later["id"])
        assert await list_frames_until_barrier(ws) == []
        assert [f["type"] for f in ws.after(ack) if listed(f)] == []
        # A list frame carries no `ref`, and a conversation subscription was never needed.
        assert all("ref" not in f for f in ws.log if listed(f))


async def test_a_member_lists_their_own_an_admin_the_companys_another_company_nothing(
    server: LiveServer, http: httpx.AsyncClient, acme: Tenant, globex: Tenant
) -> None:
    sockets = {
        "alice": open_socket(server, "json", acme.headers("alice")),
        "bob": open_socket(server, "json", acme.headers("bob")),
        "admin": open_socket(server, "json", acme.headers("admin")),
        "globex": open_socket(server, "json", globex.headers("admin")),
    }
    async with (
        sockets["alice"] as alice,
        sockets["bob"] as bob,
        sockets["admin"] as admin,
        sockets["globex"] as other,
    ):
        for ws in (alice, bob, admin, other):
            await follow_list(ws)
        alices = (await create(http, acme, "alice"))["id"]
        bobs = (await create(http, acme, "bob"))["id"]
        await rename(http, acme, "alice", alices, "alice's")
        await rename(http, acme, "admin", bobs, "renamed by the admin")  # an admin changes bob's
        await post_message(http, acme, alices, "hello", who="alice", reply=False)
        await post_message(http, acme, bobs, "hello", who="admin", reply=False)  # the admin writes in bob's
        await delete(http, acme, "admin", alices)

        def seen(frames: list[dict[str, Any]]) -> list[tuple[str, str]]:
            return [(f["conversationId"], f["type"]) for f in frames]

        created = ["conversation.created"]
        alice_sees = [(alices, t) for t in [*created, "conversation.updated", "conversation.activity"]]
        alice_sees.append((alices, "conversation.deleted"))
        bob_sees = [(bobs, t) for t in [*created, "conversation.updated", "conversation.activity"]]
        assert seen(await list_frames_until_barrier(alice)) == alice_sees
        assert seen(await list_frames_until_barrier(bob)) == bob_sees
        admin_sees = seen(await list_frames_until_barrier(admin))
        assert sorted(admin_sees) == sorted(alice_sees + bob_sees)
        assert [s for s in admin_sees if s[0] == alices] == alice_sees  # each conversation's in order
        assert [s for s in admin_sees if s[0] == bobs] == bob_sees
        assert await list_frames_until_barrier(other) == []


async def test_following_the_list_twice_changes_nothing_and_a_followed_conversation_is_told_twice(
    server: LiveServer, http: httpx.AsyncClient, acme: Tenant
) -> None:
    """Subscribing again is acked and keeps one list. A conversation the socket also follows
    gets its change once per subscription. The list is not counted against the limit of
    subscriptions (here 1)."""
    async with open_socket(server, "json", acme.headers("alice")) as ws:
        await follow_list(ws)
        await follow_list(ws)
        cid = (await create(http, acme, "alice"))["id"]
        await ws.ack({"type": "subscribe", "conversationId": cid})
        other = (await create(http, acme, "alice"))["id"]
        await ws.refused({"type": "subscribe", "conversationId": other}, "too_many_subscriptions")
        renamed = await rename(http, acme, "alice", cid, "twice")
        first = await ws.wait_for(of(cid, "conversation.updated"))
        second = await ws.wait_for(of(cid, "conversation.updated"))
        # Once as the subscribed conversation's event (with its conversationSeq), once in the list.
        told = {"type": "conversation.updated", "conversationId": cid, "conversation": renamed}
        assert sorted([first, second], key=len) == [told, {**told, "conversationSeq": 2}]
        await rename(http, acme, "alice", other, "once")
        assert await ws.wait_for(of(other, "conversation.updated"))
        await ws.assert_usable()
        assert [f for f in ws.pending if f["type"] == "conversation.updated"] == []
        # After an unsubscribe, subscribing again starts a list again.
        await ws.ack({"type": "unsubscribe_conversations"})
        await ws.ack({"type": "unsubscribe_conversations"})  # not following it: acked all the same
        await follow_list(ws)
        await rename(http, acme, "alice", other, "again")
        assert (await ws.wait_for(of(other, "conversation.updated")))["conversation"]["title"] == "again"


async def test_the_title_the_server_gives_a_conversation_is_listed(
    server: LiveServer, http: httpx.AsyncClient, acme: Tenant
) -> None:
    """The first message names an untitled conversation (app/chat/titles.py): lists get the
    message's activity and the new title; the admin's list too."""
    async with (
        open_socket(server, "json", acme.headers("alice")) as alice,
        open_socket(server, "json", acme.headers("admin")) as admin,
    ):
        await follow_list(alice)
        await follow_list(admin)
        cid = (await create(http, acme, "alice"))["id"]
        posted = await post_message(http, acme, cid, "Dinner in Lisbon on Friday", who="alice", reply=False)
        for ws in (alice, admin):
            activity = await ws.wait_for(of(cid, "conversation.activity"))
            assert activity["lastMessageAt"] == posted["message"]["createdAt"]
            named = await ws.wait_for(of(cid, "conversation.updated"))
            assert named["conversation"]["title"] == "Dinner in Lisbon on Friday"
            assert named["conversation"] == await get(http, acme, "alice", f"/api/conversations/{cid}")


async def test_bad_list_frames_are_refused_and_the_socket_goes_on(server: LiveServer, acme: Tenant) -> None:
    async with open_socket(server, "json", acme.headers("alice")) as ws:
        refused = await ws.refused(
            {"type": "subscribe_conversations", "conversationId": str(uuid.uuid4())}, "invalid_frame"
        )
        assert "conversationId" in refused["message"]
        await ws.refused({"type": "unsubscribe_conversations", "all": True}, "invalid_frame")
        await ws.assert_usable()  # a good frame ends the run of violations (5 in a row close the socket)
        for bad in ('{"type": "subscribe_conversations", "ref": 5}', '{"type": "subscribe_conversations", "x": 1}'):
            assert_error_frame(await ws.error_for(bad), "invalid_frame", None)
        long_ref = {"type": "unsubscribe_conversations", "ref": "r" * 65}
        assert_error_frame(await ws.error_for(ws.encode(long_ref)), "invalid_frame", None)
        await ws.assert_usable()
        await follow_list(ws)
        assert [f for f in ws.log if f["type"] == "ack"] == [ws.log[-1]]  # no bad frame was carried out


async def test_a_revoked_key_closes_a_socket_that_follows_the_list(server: LiveServer, acme: Tenant) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=STEP) as http:
        r = await http.post("/api/keys", json={"name": "to revoke"}, headers=acme.headers("admin"))
        assert r.status_code == 201, r.text
        key_id, token = r.json()["id"], r.json()["token"]
        async with open_socket(server, "json", {"Authorization": f"Bearer {token}"}) as ws:
            await follow_list(ws)
            r = await http.delete(f"/api/keys/{key_id}", headers=acme.headers("admin"))
            assert r.status_code == 204, r.text
            close = await ws.closed()
            assert close is not None and close.code == 4401
            assert any(f["type"] == "error" and f["code"] == "credentials_revoked" for f in ws.pending)


# -- two processes --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair() -> Iterator[Cluster]:
    """Two processes sharing the database and a Redis prefix."""
    with Cluster(2) as servers:
        yield servers


async def test_a_list_on_one_process_follows_what_happens_on_another(pair: Cluster, acme: Tenant) -> None:
    a, b = pair.servers
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=STEP) as http_a,
        open_socket(b, "json", acme.headers("admin")) as admin_b,
        open_socket(b, "json", acme.headers("bob")) as bob_b,
    ):
        await follow_list(admin_b)
        await follow_list(bob_b)
        conversation = await create(http_a, acme, "alice")
        cid = conversation["id"]
        created = await admin_b.wait_for(of(cid, "conversation.created"))
        assert created["conversation"] == conversation
        renamed = await rename(http_a, acme, "alice", cid, "made on A")
        assert (await admin_b.wait_for(of(cid, "conversation.updated")))["conversation"] == renamed
        posted = await post_message(http_a, acme, cid, "hello from A", who="alice", reply=False)
        activity = await admin_b.wait_for(of(cid, "conversation.activity"))
        assert activity["lastMessageAt"] == posted["message"]["createdAt"]
        await delete(http_a, acme, "alice", cid)
        await admin_b.wait_for(of(cid, "conversation.deleted"))
        assert await list_frames_until_barrier(bob_b) == []  # alice's, not bob's


async def test_a_conversation_created_on_one_process_is_listed_on_another(pair: Cluster, acme: Tenant) -> None:
    a, b = pair.servers
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=STEP) as http_a,
        open_socket(b, "msgpack", acme.headers("alice")) as alice_b,
    ):
        await follow_list(alice_b)
        conversation = await create(http_a, acme, "alice", title="from A")
        created = await alice_b.wait_for(of(conversation["id"], "conversation.created"))
        assert created == {
            "type": "conversation.created",
            "conversationId": conversation["id"],
            "conversation": conversation,
        }


# -- the core, on the database --------------------------------------------------------------------


async def test_the_core_reads_the_scope_of_a_conversation_it_was_not_told_about(
    db: str, core: StreamingCore, acme: Tenant
) -> None:
    """An event published without a scope for a conversation this process never loaded (e.g.
    after a restart) still reaches the lists: the core reads the scope (on either database)."""
    bob = acme.principals["bob"]
    made = await create_conversation(bob, ConversationCreate(title="untold"))
    scopes.known.forget(made.id)
    admin = core.open_list_feed(acme.company_id, None)
    bobs = core.open_list_feed(acme.company_id, bob.user_id)
    alices = core.open_list_feed(acme.company_id, acme.principals["alice"].user_id)
    message = MessageOut(
        id=uuid.uuid4(),
        conversation_id=made.id,
        role=MessageRole.user,
        author_id=bob.user_id,
        content="hi",
        edited_content=None,
        edited_at=None,
        effective_content="hi",
        client_message_id=None,
        generation_id=None,
        status=MessageStatus.complete,
        created_at=made.created_at,
    )
    try:
        await core.publish(MessageCreated(conversation_id=made.id, message=message))
        activity = ConversationActivity(conversation_id=made.id, last_message_at=made.created_at)
        with anyio.fail_after(STEP):
            assert await admin.get() == activity
            assert await bobs.get() == activity
        assert scopes.known.get(made.id) == scopes.Scope(acme.company_id, bob.user_id)
        barrier = ConversationDeleted(conversation_id=uuid.uuid4())
        await core.publish(barrier, scopes.Scope(acme.company_id, acme.principals["alice"].user_id))
        with anyio.fail_after(STEP):
            assert await alices.get() == barrier  # nothing of bob's before it
    finally:
        for feed in (admin, bobs, alices):
            core.close_list_feed(feed)
