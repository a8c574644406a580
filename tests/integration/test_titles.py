"""Server-made conversation titles (issue #17, point 5): a conversation without a title is
named after its first user message, however it was posted (REST, WebSocket `send`), and
every subscriber is told with `conversation.updated`. A title someone set is never replaced.

The naming rule itself (`title_from`) is checked without a database; the rest on
PostgreSQL and SQLite (the services), over HTTP (ASGI) and on a real server's WebSocket.
Nothing waits by sleeping: tests wait on the conversation's feed or on WebSocket frames.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from app.chat.conversations import create_conversation, get_conversation, update_conversation
from app.chat.messages import post_message
from app.chat.schemas import ConversationCreate, ConversationUpdate, MessageCreate
from app.chat.titles import ELLIPSIS, TITLE_CHARS, title_from
from app.streaming.core import StreamingCore
from app.streaming.protocol import ConversationUpdated, MessageCreated
from tests.factories import Tenant, make_tenant
from tests.integration.live_server import LiveServer
from tests.integration.wire_api import frame_where, socket

pytestmark = pytest.mark.anyio

STEP = 10.0  # the longest any wait may take before the test fails
LONG = "Could you please find me a quiet table for two near the window at the Lisbon place tonight"


# -- the rule ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "title"),
    [
        ("Book a table for two", "Book a table for two"),
        ("  Book   a\ttable  ", "Book a table"),  # whitespace collapsed
        ("\n\n  First line here \nsecond line\nthird", "First line here"),  # the first non-blank line
        (LONG, "Could you please find me a quiet table for two near the…"),  # cut at a word
        (
            "Book a table for two at the Lisbon place. We arrive at eight, by the window.",
            "Book a table for two at the Lisbon place.",  # its first sentence
        ),
        ("Hi! " + LONG, "Hi! Could you please find me a quiet table for two near the…"),  # "Hi!" is too short
        ("x" * 100, "x" * (TITLE_CHARS - 1) + ELLIPSIS),  # one long word: cut inside it
        ("a" * 59 + " bbbb", "a" * 59 + ELLIPSIS),
        (
            "version 3.5 of the thing is what everyone here keeps talking about today",
            "version 3.5 of the thing is what everyone here keeps…",  # "3.5" ends no sentence
        ),
        ("## **Plan** a `trip`:\n\nmore", "Plan a trip:"),  # markdown marks are not part of a title
        ("- first item\n- second", "first item"),
        ("> quoted __words__", "quoted words"),
        ("2*3 is six, a_b stays", "2*3 is six, a_b stays"),  # single marks are text
        ("**\nreal words", "**"),  # only marks: kept as written rather than skipped
    ],
    ids=[
        "short",
        "spaces",
        "lines",
        "long",
        "sentence",
        "short sentence",
        "one word",
        "word at limit",
        "3.5",
        "markdown",
        "list item",
        "quote",
        "single marks",
        "only marks",
    ],
)
def test_title_from(content: str, title: str) -> None:
    """The first non-blank line, whitespace collapsed; longer than 60 characters: its first
    sentence (20 to 60 characters), else cut at a word with "…" (60 characters in all)."""
    made = title_from(content)
    assert made == title
    assert 0 < len(made) <= TITLE_CHARS


# -- the services, on both engines ------------------------------------------------------------------


@pytest.fixture
def broker_kind() -> str:
    """The in-process broker only: the event's way through Redis is the core's own tests' matter."""
    return "in-process"


@pytest.fixture
def streaming(db: str, core: StreamingCore) -> StreamingCore:
    return core


async def next_event(feed: Any) -> Any:
    return await asyncio.wait_for(feed.get(), STEP)


async def test_the_first_message_names_the_conversation_and_subscribers_are_told(streaming: StreamingCore) -> None:
    tenant = await make_tenant()
    alice = tenant.principals["alice"]
    created = await create_conversation(alice, ConversationCreate(agent_id=tenant.agent_id))
    assert created.title is None
    feed = streaming.open_feed(created.id)
    try:
        posted, _ = await post_message(alice, created.id, MessageCreate(content="Dinner in Lisbon\nfor two"), streaming)
        assert posted.generation is not None  # the answer starts as usual
        events = [await next_event(feed)]
        while not isinstance(events[-1], ConversationUpdated):
            events.append(await next_event(feed))
    finally:
        streaming.close_feed(feed)
    now = await get_conversation(alice, created.id)
    assert now.title == "Dinner in Lisbon" and now.updated_at > created.updated_at
    assert isinstance(events[0], MessageCreated) and events[0].message.id == posted.message.id  # the message first
    assert events[-1] == ConversationUpdated(
        conversation_id=created.id, conversation=now, conversation_seq=events[-1].conversation_seq
    )
    assert events[0].conversation_seq < events[-1].conversation_seq  # numbered in that order


async def test_a_title_is_never_replaced_by_a_message(streaming: StreamingCore) -> None:
    tenant = await make_tenant()
    alice = tenant.principals["alice"]
    titled = await create_conversation(alice, ConversationCreate(title="Mine"))
    await post_message(alice, titled.id, MessageCreate(content="something else"), streaming)
    assert (await get_conversation(alice, titled.id)).title == "Mine"

    untitled = await create_conversation(alice, ConversationCreate())
    await post_message(alice, untitled.id, MessageCreate(content="first"), streaming)
    await post_message(alice, untitled.id, MessageCreate(content="second"), streaming)
    assert (await get_conversation(alice, untitled.id)).title == "first"
    # A PATCH may change it; one that clears it leaves the conversation to be named again.
    await update_conversation(alice, untitled.id, ConversationUpdate(title=None), streaming)
    await post_message(alice, untitled.id, MessageCreate(content="third"), streaming)
    assert (await get_conversation(alice, untitled.id)).title == "third"


# -- over HTTP --------------------------------------------------------------------------------------


async def conversation(client: httpx.AsyncClient, tenant: Tenant, **body: Any) -> dict[str, Any]:
    r = await client.post("/api/conversations", json=body, headers=tenant.headers("alice"))
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    return created


async def post(client: httpx.AsyncClient, tenant: Tenant, cid: str, content: str) -> None:
    r = await client.post(
        f"/api/conversations/{cid}/messages", json={"content": content, "reply": False}, headers=tenant.headers("alice")
    )
    assert r.status_code == 201, r.text


async def title_of(client: httpx.AsyncClient, tenant: Tenant, cid: str) -> str | None:
    r = await client.get(f"/api/conversations/{cid}", headers=tenant.headers("alice"))
    assert r.status_code == 200, r.text
    title: str | None = r.json()["title"]
    return title


@pytest.mark.parametrize(
    ("content", "title"),
    [
        ("Where should we eat tonight?", "Where should we eat tonight?"),
        (LONG, "Could you please find me a quiet table for two near the…"),
        ("Plan the trip\n\n- flights\n- hotel", "Plan the trip"),
    ],
    ids=["short", "long", "multi-line"],
)
async def test_a_message_posted_over_rest_names_the_conversation(
    client: httpx.AsyncClient, acme: Tenant, content: str, title: str
) -> None:
    cid = (await conversation(client, acme))["id"]
    await post(client, acme, cid, content)
    assert await title_of(client, acme, cid) == title
    listed = (await client.get("/api/conversations", headers=acme.headers("alice"))).json()["items"]
    assert next(c for c in listed if c["id"] == cid)["title"] == title


async def test_a_title_given_at_creation_stays_and_a_second_message_changes_nothing(
    client: httpx.AsyncClient, acme: Tenant
) -> None:
    cid = (await conversation(client, acme, title="Trip to Porto"))["id"]
    await post(client, acme, cid, "Let us plan it")
    assert await title_of(client, acme, cid) == "Trip to Porto"

    other = (await conversation(client, acme))["id"]
    await post(client, acme, other, "First question")
    await post(client, acme, other, "Second question")
    assert await title_of(client, acme, other) == "First question"


# -- on the wire: a WebSocket subscriber ------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with LiveServer() as live:
        yield live


async def test_a_subscriber_gets_the_new_title_of_a_message_sent_over_the_websocket(
    server: LiveServer, acme: Tenant
) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=STEP) as http:
        cid = (await conversation(http, acme, agentId=str(acme.agent_id)))["id"]
        alice = acme.headers("alice")
        async with socket(server, alice) as watcher, socket(server, alice) as sender:
            await watcher.send(json.dumps({"type": "subscribe", "conversationId": cid, "ref": "s"}))
            await frame_where(watcher, type="ack", ref="s")
            frame = {"type": "send", "conversationId": cid, "content": LONG, "clientMessageId": "m1", "ref": "m"}
            await sender.send(json.dumps(frame))
            ack = await frame_where(sender, type="ack", ref="m")
            assert ack["message"]["content"] == LONG

            updated = await frame_where(watcher, type="conversation.updated")
            title = "Could you please find me a quiet table for two near the…"
            assert updated["conversationId"] == cid and updated["conversation"]["title"] == title
            r = await http.get(f"/api/conversations/{cid}", headers=acme.headers("alice"))
            assert updated["conversation"] == r.json()
            # The socket's answer goes on as usual.
            assert await frame_where(watcher, type="done", generationId=ack["generation"]["id"])
