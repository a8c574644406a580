"""The web client when things move under it: older pages, a dropped connection and a second
tab mid-answer, and the errors a person must understand (rate limit, conversation gone,
server down). Same real server, Debian Chromium and rules as `test_web_client.py` (its
fixtures are reused from there): every wait is on the page's own state, none is a sleep.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page, WebSocketRoute, expect

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
    tab,
    words,
)
from tests.factories import Tenant
from tests.integration.live_server import LiveServer

pytestmark = pytest.mark.anyio

# The shared fixtures, imported so pytest finds them in this module too.
FIXTURES = (browser, http, page, server, server_logs_are_clean)

LIVE_TEXT = "() => document.querySelector('.message.agent.live .content')?.textContent || ''"


async def live_text_includes(page: Page, word: str) -> None:
    await page.wait_for_function(f"() => ({LIVE_TEXT})().includes({word!r})", polling="raf", timeout=STEP)


# Every text the connection status line shows, recorded from the page's first script on.
RECORD_CONNECTION_STATUS = """
window.__connectionStatus = [];
document.addEventListener("DOMContentLoaded", () => {
  const status = document.getElementById("connection-status");
  new MutationObserver(() => window.__connectionStatus.push(status.textContent)).observe(
    status, {childList: true, characterData: true, subtree: true});
});
"""


def no_repeated_words(text: str) -> None:
    seen = text.split()
    assert len(seen) == len(set(seen)), f"words shown more than once: {text!r}"


async def test_load_older_shows_the_previous_page_once(
    page: Page, server: LiveServer, acme: Tenant, http: httpx.AsyncClient
) -> None:
    created = await http.post("/api/conversations", json={"title": "Long history"}, headers=acme.headers("alice"))
    assert created.status_code == 201, created.text
    conversation_id = created.json()["id"]
    for i in range(55):  # more than one page (50)
        posted = await http.post(
            f"/api/conversations/{conversation_id}/messages",
            json={"content": f"m{i:02d}", "reply": False},
            headers=acme.headers("alice"),
        )
        assert posted.status_code == 201, posted.text

    await sign_in(page, server, acme.tokens["alice"])
    await page.locator(f'#conversation-list button[data-id="{conversation_id}"]').click()
    messages = page.locator("#message-list .message")
    await expect(messages).to_have_count(50)
    await expect(messages.first.locator(".content")).to_have_text("m05")
    await expect(messages.last.locator(".content")).to_have_text("m54")

    older = page.get_by_role("button", name="Load older")
    await older.click()
    await expect(messages).to_have_count(55)
    await expect(older).to_be_hidden()
    await expect(page.locator("#message-list .message .content", has_text="m00")).to_have_count(1)
    shown = [await c.text_content() for c in await messages.locator(".content").all()]
    assert shown == [f"m{i:02d}" for i in range(55)]


async def test_network_drop_mid_answer_resumes_and_shows_the_whole_answer_once(
    page: Page, server: LiveServer, acme: Tenant, http: httpx.AsyncClient
) -> None:
    await slow_agent(acme)
    await page.add_init_script(RECORD_CONNECTION_STATUS)
    await sign_in(page, server, acme.tokens["alice"])
    await new_conversation(page, "Slow echo")
    conversation_id = await current_conversation_id(page)

    # The page's socket is cut after the answer's fifth word (as when a proxy or a flaky
    # network drops it); the page must come back by itself and resume after what it had.
    sockets: list[WebSocketRoute] = []
    resumed_with: list[dict[str, Any]] = []
    cut_at: list[str] = []
    closing: list[asyncio.Future[None]] = []  # kept: a task nobody holds may be collected

    def route(ws: WebSocketRoute) -> None:
        sockets.append(ws)
        upstream = ws.connect_to_server()
        if len(sockets) > 1:
            # Later sockets pass through; their subscribe frames show where they resume.
            def to_server(message: str | bytes) -> None:
                frame = json.loads(message)
                if frame.get("type") == "subscribe":
                    resumed_with.append(frame)
                upstream.send(message)

            ws.on_message(to_server)
            return
        tokens = 0

        def to_page(message: str | bytes) -> None:
            nonlocal tokens
            if cut_at:
                return
            frame = json.loads(message)
            ws.send(message)
            if frame.get("type") == "token":
                tokens += 1
                if tokens == 5:
                    cut_at.append(f"{frame['generationId']}.{frame['seq']}")
                    closing.append(asyncio.ensure_future(ws.close(code=4000, reason="cut by the test")))
                    closing.append(asyncio.ensure_future(upstream.close()))

        upstream.on_message(to_page)

    await page.route_web_socket("**/api/ws", route)
    await page.reload()  # so the page's one socket goes through the route
    await expect(page.locator("#chat-title")).to_have_text("Untitled conversation")
    text = words(120)
    await send_with_enter(page, text)
    await live_text_includes(page, "w006")  # more than the cut socket brought: it resumed

    # It said so while it was away, and resumed after the last event it had.
    statuses = await page.evaluate("window.__connectionStatus")
    assert any("reconnecting" in s for s in statuses), statuses
    assert cut_at and resumed_with, (cut_at, resumed_with)
    assert resumed_with[0] == {
        "type": "subscribe",
        "conversationId": conversation_id,
        "after": cut_at[0],
        "ref": resumed_with[0]["ref"],
    }

    done = page.locator(".message.agent[data-id]")
    await expect(done).to_have_count(1)
    await expect(page.locator(".message.agent")).to_have_count(1)
    await expect(page.locator(".message.agent.streaming")).to_have_count(0)
    await expect(page.locator("#connection-status")).to_be_hidden()
    shown = await done.locator(".content").text_content()
    assert shown is not None
    no_repeated_words(shown)
    stored = await stored_messages(http, acme, "alice", conversation_id)
    assert [m["role"] for m in stored] == ["user", "agent"]
    assert stored[1]["id"] == await done.get_attribute("data-id")
    assert shown == stored[1]["content"] == text
    await shot(page, "stream-resumed")


async def test_second_tab_streams_the_same_answer_at_the_same_time(
    page: Page, server: LiveServer, acme: Tenant, http: httpx.AsyncClient
) -> None:
    await slow_agent(acme)
    await sign_in(page, server, acme.tokens["alice"])
    await new_conversation(page, "Slow echo")
    conversation_id = await current_conversation_id(page)

    text = words(80)
    await send_with_enter(page, text)
    await live_text_includes(page, "w002")

    # Same person, same browser (signed in by the cookie), another tab on the same conversation.
    other = await page.context.new_page()
    await other.goto(f"{server.url}/")
    await other.locator(f'#conversation-list button[data-id="{conversation_id}"]').click()
    # Both tabs show the answer growing at the same time, from its start.
    await other.wait_for_function(
        f"() => {{ const t = ({LIVE_TEXT})(); return t.startsWith('w001 w002') && !t.includes('w080'); }}",
        polling="raf",
        timeout=STEP,
    )
    assert "w080" not in (await page.locator(".message.agent.live .content").text_content() or "")
    await expect(other.get_by_role("button", name="Stop")).to_be_visible()
    await shot(other, "second-tab-streaming")

    for each in (page, other):
        done = each.locator(".message.agent[data-id]")
        await expect(done).to_have_count(1)
        await expect(each.locator(".message.agent")).to_have_count(1)
        shown = await done.locator(".content").text_content()
        assert shown is not None
        no_repeated_words(shown)
        stored = await stored_messages(http, acme, "alice", conversation_id)
        assert shown == stored[1]["content"] == text
    assert [m["role"] for m in await stored_messages(http, acme, "alice", conversation_id)] == ["user", "agent"]


async def test_opening_a_quiet_conversation_shows_no_answer_and_the_tab_keeps_one_socket(
    page: Page, server: LiveServer, acme: Tenant, http: httpx.AsyncClient
) -> None:
    """A conversation whose last message waits for nobody: nothing streams, nothing complains."""
    created = await http.post("/api/conversations", json={"title": "Quiet"}, headers=acme.headers("alice"))
    assert created.status_code == 201, created.text
    conversation_id = created.json()["id"]
    posted = await http.post(
        f"/api/conversations/{conversation_id}/messages",
        json={"content": "note to self"},
        headers=acme.headers("alice"),
    )
    assert posted.status_code == 201, posted.text
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    streams: list[str] = []
    page.on("request", lambda r: streams.append(r.url) if r.url.endswith("/stream") else None)
    await sign_in(page, server, acme.tokens["alice"])
    await page.locator(f'#conversation-list button[data-id="{conversation_id}"]').click()
    await expect(page.locator(".message")).to_have_count(1)
    await new_conversation(page, "Echo")
    await send_with_enter(page, "and now an answer")
    await expect(page.locator(".message.agent[data-id] .content")).to_have_text("and now an answer")
    await page.locator(f'#conversation-list button[data-id="{conversation_id}"]').click()
    await expect(page.locator(".message")).to_have_count(1)
    await expect(page.locator(".message.agent")).to_have_count(0)
    await expect(page.get_by_role("button", name="Stop")).to_be_hidden()
    await expect(page.get_by_role("alert")).to_be_hidden()
    # One socket for the tab, whatever it opened; no EventSource.
    assert sockets == [f"{server.url.replace('http', 'ws')}/api/ws"]
    assert streams == []


# -- errors a person can understand -----------------------------------------------------


@pytest.fixture
def limited_server() -> Iterator[LiveServer]:
    with LiveServer({"CHATSTREAM_MESSAGES_PER_MINUTE": "2"}) as live:
        yield live


async def readable_alert(page: Page) -> str:
    alert = page.get_by_role("alert")
    await expect(alert).to_be_visible()
    message = await page.locator("#alert-text").text_content()
    assert message and "{" not in message and '"code"' not in message
    return message


async def test_rate_limit_says_when_to_retry(page: Page, limited_server: LiveServer, acme: Tenant) -> None:
    await sign_in(page, limited_server, acme.tokens["alice"])
    await page.get_by_label("Agent").select_option(label="No agent")
    await page.get_by_role("button", name="New conversation").click()
    box = page.get_by_label("Message", exact=True)
    await expect(box).to_be_focused()
    for i in (1, 2):
        await box.fill(f"message {i}")
        await box.press("Enter")
        await expect(page.locator(".message.user")).to_have_count(i)

    await box.fill("message 3")
    await box.press("Enter")
    alert = page.get_by_role("alert")
    await expect(alert).to_contain_text("too fast")
    await expect(alert).to_contain_text(r"Try again in")
    message = await readable_alert(page)
    assert "rate_limited" not in message and "retryAfter" not in message
    await expect(page.get_by_role("button", name="Retry")).to_be_visible()
    await expect(box).to_have_value("message 3")
    await expect(page.locator(".message.user")).to_have_count(2)
    await shot(page, "error-rate-limit")


async def test_conversation_deleted_elsewhere_is_gone_and_leaves_the_list(
    page: Page, server: LiveServer, acme: Tenant, http: httpx.AsyncClient
) -> None:
    ids = []
    for title in ("Open then gone", "Gone while listed"):
        created = await http.post("/api/conversations", json={"title": title}, headers=acme.headers("alice"))
        assert created.status_code == 201, created.text
        ids.append(created.json()["id"])
    await sign_in(page, server, acme.tokens["alice"])
    items = page.locator("#conversation-list button")
    await expect(items).to_have_count(2)

    # Open, then it is deleted elsewhere: the page says so at once, without a reload.
    await page.locator(f'#conversation-list button[data-id="{ids[0]}"]').click()
    await expect(page.locator("#chat-title")).to_have_text("Open then gone")
    deleted = await http.delete(f"/api/conversations/{ids[0]}", headers=acme.headers("alice"))
    assert deleted.status_code in (200, 204), deleted.text
    await expect(page.get_by_role("alert")).to_contain_text("conversation is gone")
    await readable_alert(page)
    await expect(items).to_have_count(1)
    await expect(page.locator(f'#conversation-list button[data-id="{ids[0]}"]')).to_have_count(0)
    await expect(page.locator("#chat-title")).to_have_text("No conversation selected")
    await expect(page.get_by_role("button", name="Retry")).to_be_hidden()
    await shot(page, "error-conversation-gone")
    await page.get_by_role("button", name="Dismiss the message").click()

    # Deleted while only listed: it leaves the list, and nothing needs saying.
    deleted = await http.delete(f"/api/conversations/{ids[1]}", headers=acme.headers("alice"))
    assert deleted.status_code in (200, 204), deleted.text
    await expect(items).to_have_count(0)
    await expect(page.get_by_role("alert")).to_be_hidden()


async def test_server_down_says_cannot_reach_the_server_and_retry_works_once_it_is_back(
    browser: Browser, acme: Tenant
) -> None:
    dedicated = LiveServer().start()
    try:
        async with tab(browser) as page:
            await sign_in(page, dedicated, acme.tokens["alice"])
            dedicated.stop()
            await page.get_by_role("button", name="New conversation").click()
            await expect(page.get_by_role("alert")).to_contain_text("Cannot reach the server")
            await readable_alert(page)
            retry = page.get_by_role("button", name="Retry")
            await expect(retry).to_be_visible()
            await shot(page, "error-server-down")
            # Retrying while it is still down says the same again, no silent failure.
            await retry.click()
            await expect(page.get_by_role("alert")).to_contain_text("Cannot reach the server")
            await expect(retry).to_be_visible()

            # The server comes back on the same address: Retry does what was asked.
            restarted = LiveServer()
            restarted.port, restarted.url = dedicated.port, dedicated.url
            restarted.start()
            try:
                await retry.click()
                await expect(page.get_by_role("alert")).to_be_hidden()
                await expect(page.locator("#conversation-list li")).to_have_count(1)
                await expect(page.get_by_label("Message", exact=True)).to_be_visible()
            finally:
                restarted.stop()
    finally:
        dedicated.stop()
