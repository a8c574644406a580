"""The web client as a live conversation (issue #17, points 4 and 5): what another tab, a
phone or a REST client does appears in the page without a reload, over the tab's one
WebSocket; asking again, editing and asking again, and titles the server makes. Same real
server, Debian Chromium and rules as `test_web_client.py` (its fixtures are reused): every
wait is on the page's own state, none is a sleep.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from playwright.async_api import Locator, Page, expect

from tests.e2e.test_web_client import (
    STEP,
    browser,
    current_conversation_id,
    http,
    new_conversation,
    page,
    send_with_enter,
    server,
    server_logs_are_clean,
    shot,
    sign_in,
    slow_agent,
    stored_messages,
    words,
)
from tests.factories import Tenant
from tests.integration.live_server import LiveServer

pytestmark = pytest.mark.anyio

# The shared fixtures, imported so pytest finds them in this module too.
FIXTURES = (browser, http, page, server, server_logs_are_clean)

DONE = ".message.agent[data-id]"


def listed(page: Page, conversation_id: str) -> Locator:
    return page.locator(f'#conversation-list button[data-id="{conversation_id}"]')


async def test_what_is_done_elsewhere_appears_without_a_reload_over_one_socket(
    page: Page, server: LiveServer, acme: Tenant, http: httpx.AsyncClient
) -> None:
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    alice = acme.headers("alice")
    await sign_in(page, server, acme.tokens["alice"])
    await new_conversation(page, "Echo")
    conversation_id = await current_conversation_id(page)
    base = f"/api/conversations/{conversation_id}"

    # A message posted over REST (a phone, a script): it shows, and so does its answer.
    posted = await http.post(f"{base}/messages", json={"content": "sent from the phone"}, headers=alice)
    assert posted.status_code == 201, posted.text
    message_id = posted.json()["message"]["id"]
    await expect(page.locator(f'.message.user[data-id="{message_id}"] .content')).to_have_text("sent from the phone")
    await expect(page.locator(f"{DONE} .content")).to_have_text("sent from the phone")

    # An edit of it.
    edited = await http.put(f"{base}/messages/{message_id}", json={"content": "edited on the phone"}, headers=alice)
    assert edited.status_code == 200, edited.text
    user = page.locator(f'.message.user[data-id="{message_id}"]')
    await expect(user.locator(".content")).to_have_text("edited on the phone")
    await expect(user.locator(".note.edited")).to_be_visible()

    # A rename: the header and the list.
    renamed = await http.patch(base, json={"title": "Renamed elsewhere"}, headers=alice)
    assert renamed.status_code == 200, renamed.text
    await expect(page.locator("#chat-title")).to_have_text("Renamed elsewhere")
    await expect(listed(page, conversation_id).locator(".title")).to_have_text("Renamed elsewhere")

    # Another conversation made elsewhere joins the list; new activity in it moves it to the top.
    other = await http.post("/api/conversations", json={"title": "Made elsewhere"}, headers=alice)
    assert other.status_code == 201, other.text
    other_id = other.json()["id"]
    await expect(listed(page, other_id)).to_have_count(1)
    first = page.locator("#conversation-list li:first-child button")
    await expect(first).to_have_attribute("data-id", other_id)
    posted = await http.post(f"{base}/messages", json={"content": "back here", "reply": False}, headers=alice)
    assert posted.status_code == 201, posted.text
    await expect(first).to_have_attribute("data-id", conversation_id)
    await expect(page.locator(".message.user .content").last).to_have_text("back here")
    await shot(page, "live-from-elsewhere")

    # Deleted elsewhere: it leaves the list.
    gone = await http.delete(f"/api/conversations/{other_id}", headers=alice)
    assert gone.status_code == 204
    await expect(listed(page, other_id)).to_have_count(0)

    # Another tab of the same person renames it back: this tab follows.
    tab = await page.context.new_page()
    await tab.goto(page.url)
    await tab.locator(f'#conversation-list button[data-id="{conversation_id}"]').click()
    await tab.get_by_role("button", name="Rename", exact=True).click()
    await tab.get_by_label("Conversation title").fill("Renamed in a tab")
    await tab.get_by_label("Conversation title").press("Enter")
    await expect(page.locator("#chat-title")).to_have_text("Renamed in a tab")
    await tab.close()

    # All of it over the tab's one socket.
    assert sockets == [f"{server.url.replace('http', 'ws')}/api/ws"]


async def test_answer_again_keeps_the_previous_answer(
    page: Page, server: LiveServer, acme: Tenant, http: httpx.AsyncClient
) -> None:
    await sign_in(page, server, acme.tokens["alice"])
    await new_conversation(page, "Echo")
    conversation_id = await current_conversation_id(page)
    await send_with_enter(page, "tell me again")
    await expect(page.locator(DONE)).to_have_count(1)
    await page.locator(DONE).get_by_role("button", name="Answer again").click()
    await expect(page.locator(DONE)).to_have_count(2)
    await expect(page.locator(".message.agent.streaming")).to_have_count(0)
    # Both answers stay; only the newest offers to answer again.
    await expect(page.locator(f"{DONE} .content")).to_have_text(["tell me again", "tell me again"])
    await expect(page.locator(DONE).first.get_by_role("button", name="Answer again")).to_be_hidden()
    await expect(page.locator(DONE).last.get_by_role("button", name="Answer again")).to_be_visible()
    stored = await stored_messages(http, acme, "alice", conversation_id)
    assert [m["role"] for m in stored] == ["user", "agent", "agent"]
    await shot(page, "answer-again")

    # After a reload the same.
    await page.reload()
    await expect(page.locator(DONE)).to_have_count(2)
    await expect(page.locator(DONE).last.get_by_role("button", name="Answer again")).to_be_visible()


async def test_editing_the_last_question_offers_to_answer_it_again(
    page: Page, server: LiveServer, acme: Tenant, http: httpx.AsyncClient
) -> None:
    await sign_in(page, server, acme.tokens["alice"])
    await new_conversation(page, "Echo")
    conversation_id = await current_conversation_id(page)
    await send_with_enter(page, "first version")
    await expect(page.locator(DONE)).to_have_count(1)
    user = page.locator(".message.user")
    await user.get_by_role("button", name="Edit").click()
    await page.get_by_label("Edit message").fill("second version")
    await page.get_by_role("button", name="Save and answer again").click()
    await expect(user.locator(".content")).to_have_text("second version")
    await expect(page.locator(DONE)).to_have_count(2)
    await expect(page.locator(f"{DONE} .content")).to_have_text(["first version", "second version"])
    await shot(page, "edit-and-answer-again")
    stored = await stored_messages(http, acme, "alice", conversation_id)
    assert [m["role"] for m in stored] == ["user", "agent", "agent"]
    assert stored[0]["effectiveContent"] == "second version"


async def test_the_server_titles_a_conversation_from_its_first_message(
    page: Page, server: LiveServer, acme: Tenant, http: httpx.AsyncClient
) -> None:
    await sign_in(page, server, acme.tokens["alice"])
    await new_conversation(page, "Echo")
    conversation_id = await current_conversation_id(page)
    await expect(page.locator("#chat-title")).to_have_text("Untitled conversation")
    await send_with_enter(page, "Plan a trip to Lisbon in May\nwith two friends")
    await expect(page.locator("#chat-title")).to_have_text("Plan a trip to Lisbon in May")
    await expect(listed(page, conversation_id).locator(".title")).to_have_text("Plan a trip to Lisbon in May")
    await shot(page, "title-from-first-message")
    got = await http.get(f"/api/conversations/{conversation_id}", headers=acme.headers("alice"))
    assert got.json()["title"] == "Plan a trip to Lisbon in May"


async def test_leaving_and_coming_back_mid_answer_shows_it_whole_once(
    page: Page, server: LiveServer, acme: Tenant, http: httpx.AsyncClient
) -> None:
    await slow_agent(acme)
    await sign_in(page, server, acme.tokens["alice"])
    await new_conversation(page, "Echo")
    other_id = await current_conversation_id(page)
    await new_conversation(page, "Slow echo")
    conversation_id = await current_conversation_id(page)
    text = words(60)
    await send_with_enter(page, text)
    await page.wait_for_function(
        "() => (document.querySelector('.message.agent.live .content')?.textContent || '').includes('w005')",
        polling="raf",
    )
    # Away while it streams, then back: the answer so far again from its start, then the rest.
    await listed(page, other_id).click()
    await expect(page.locator(".message")).to_have_count(0)
    await listed(page, conversation_id).click()
    await expect(page.locator(DONE)).to_have_count(1)
    await expect(page.locator(".message.agent")).to_have_count(1)
    shown = await page.locator(f"{DONE} .content").text_content()
    assert shown == text
    stored = await stored_messages(http, acme, "alice", conversation_id)
    assert stored[1]["content"] == text


async def test_a_tab_past_the_socket_limit_says_why_it_waits(acme: Tenant, page: Page) -> None:
    with LiveServer({"CHATSTREAM_MAX_SOCKETS_PER_KEY": "1"}) as one_socket:
        acked = asyncio.Event()  # the first tab's socket answered: it holds the one place
        page.on("websocket", lambda ws: ws.on("framereceived", lambda frame: acked.set()))
        await sign_in(page, one_socket, acme.tokens["alice"])
        await asyncio.wait_for(acked.wait(), STEP / 1000)
        await expect(page.locator("#connection-status")).to_be_hidden()
        other = await page.context.new_page()
        await other.goto(f"{one_socket.url}/")
        await expect(other.locator("#connection-status")).to_contain_text("Too many open tabs")
        await shot(other, "too-many-tabs")
        # Closing the first tab frees its socket: the second one gets in on its next try.
        await page.close()
        await expect(other.locator("#connection-status")).to_be_hidden(timeout=30_000)
