"""Small things a new user tripped over in the web client (issue #17, point 7): where the focus
lands, Escape, who answers, the favicon. Same real server, Debian Chromium and rules as
`test_web_client.py` (its fixtures are reused from there): every wait is on the page's own
state, none is a sleep.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from playwright.async_api import Browser, Page, Response, Route, expect

from tests.e2e.test_web_client import (
    PHONE,
    browser,
    current_conversation_id,
    http,
    new_conversation,
    page,
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


async def send_a_long_message(page: Page, seen: str) -> None:
    """Send 200 words to the slow echo agent and wait until its answer shows the word `seen`."""
    box = page.get_by_label("Message", exact=True)
    await box.fill(words(200))
    await box.press("Enter")
    await page.wait_for_function(
        f"() => (document.querySelector('.message.agent.live .content')?.textContent || '').includes('{seen}')",
        polling="raf",
    )


async def test_opening_a_conversation_puts_the_focus_in_the_composer(
    page: Page, server: LiveServer, acme: Tenant
) -> None:
    await slow_agent(acme)
    await sign_in(page, server, acme.tokens["alice"])
    await new_conversation(page, "Slow echo")
    first = await current_conversation_id(page)
    await new_conversation(page, "Slow echo")
    # Back to the first one from the list, by keyboard: the focus follows to the composer.
    await page.locator(f'#conversation-list button[data-id="{first}"]').focus()
    await page.keyboard.press("Enter")
    await expect(page.locator('#conversation-list button[aria-current="true"]')).to_have_attribute("data-id", first)
    await expect(page.get_by_label("Message", exact=True)).to_be_focused()

    # And after a reload, the conversation the tab had open comes back with the focus in it.
    await page.reload()
    await expect(page.get_by_label("Message", exact=True)).to_be_focused()


async def test_escape_stops_a_running_answer(
    page: Page, server: LiveServer, acme: Tenant, http: httpx.AsyncClient
) -> None:
    await slow_agent(acme)
    await sign_in(page, server, acme.tokens["alice"])
    await new_conversation(page, "Slow echo")
    conversation_id = await current_conversation_id(page)
    box = page.get_by_label("Message", exact=True)
    await send_a_long_message(page, "w002")
    await expect(box).to_be_focused()
    await page.keyboard.press("Escape")

    stopped = page.locator(".message.agent.stopped")
    await expect(stopped).to_contain_text("Stopped")
    await expect(page.get_by_role("button", name="Stop")).to_be_hidden()
    stored = await stored_messages(http, acme, "alice", conversation_id)
    assert [m["role"] for m in stored] == ["user", "agent"]
    assert stored[1]["status"] == "partial"


async def test_escape_in_the_rename_form_cancels_the_rename_and_leaves_the_answer_running(
    page: Page, server: LiveServer, acme: Tenant
) -> None:
    await slow_agent(acme)
    await sign_in(page, server, acme.tokens["alice"])
    await new_conversation(page, "Slow echo")
    box = page.get_by_label("Message", exact=True)
    await box.fill(words(200))
    await box.press("Enter")
    await expect(page.get_by_role("button", name="Stop")).to_be_visible()
    await page.get_by_role("button", name="Rename").click()
    await page.keyboard.press("Escape")
    await expect(page.get_by_role("button", name="Rename")).to_be_visible()  # the form closed
    await expect(page.get_by_role("button", name="Stop")).to_be_visible()  # the answer runs on
    await page.get_by_role("button", name="Stop").click()
    await expect(page.locator(".message.agent.stopped")).to_contain_text("Stopped")


async def test_the_conversation_says_who_answers_or_that_nobody_will(
    page: Page, server: LiveServer, acme: Tenant
) -> None:
    await slow_agent(acme)
    await sign_in(page, server, acme.tokens["alice"])
    await new_conversation(page, "Slow echo")
    who = page.locator("#chat-agent")
    await expect(who).to_have_text("Answers come from Slow echo.")

    await new_conversation(page, "No agent")
    await expect(who).to_contain_text("nobody will answer here")
    await shot(page, "conversation-without-agent")
    # A message there is stored, and the page does not pretend an answer is coming.
    box = page.get_by_label("Message", exact=True)
    await box.fill("anyone there?")
    await box.press("Enter")
    await expect(page.locator(".message.user[data-id] .content")).to_have_text("anyone there?")
    await expect(page.get_by_role("button", name="Stop")).to_be_hidden()
    await expect(page.locator(".message.agent")).to_have_count(0)


async def test_the_page_has_a_favicon_and_loads_without_a_failed_request(
    page: Page, server: LiveServer, acme: Tenant, http: httpx.AsyncClient
) -> None:
    failed: list[str] = []

    def note(response: Response) -> None:
        if response.status >= 400:
            failed.append(f"{response.status} {response.url}")

    await sign_in(page, server, acme.tokens["alice"])
    page.on("response", note)  # signed in: nothing of a load may fail (before, /api/me is a 401)
    href = await page.locator('link[rel="icon"]').get_attribute("href")
    assert href == "/favicon.svg"
    icon = await http.get(href)
    assert icon.status_code == 200
    assert icon.headers["content-type"].startswith("image/svg+xml")
    await page.reload()
    await expect(page.locator("#app")).to_be_visible()
    assert failed == []


async def test_a_stopped_answer_reads_the_same_after_a_reload(page: Page, server: LiveServer, acme: Tenant) -> None:
    await slow_agent(acme)
    await sign_in(page, server, acme.tokens["alice"])
    await new_conversation(page, "Slow echo")
    await send_a_long_message(page, "w002")
    await page.get_by_role("button", name="Stop").click()
    stopped = page.locator(".message.agent.stopped")
    await expect(stopped).to_contain_text("Stopped. The partial answer was kept.")
    live = await stopped.inner_text()

    await page.reload()
    await expect(stopped).to_have_count(1)
    assert await stopped.inner_text() == live


async def test_text_typed_for_a_conversation_deleted_elsewhere_is_kept(
    page: Page, server: LiveServer, acme: Tenant, http: httpx.AsyncClient
) -> None:
    await slow_agent(acme)
    await sign_in(page, server, acme.tokens["alice"])
    await new_conversation(page, "Slow echo")
    conversation_id = await current_conversation_id(page)
    box = page.get_by_label("Message", exact=True)
    await box.fill("a long thought I do not want to type again")
    gone = await http.delete(f"/api/conversations/{conversation_id}", headers=acme.headers("alice"))
    assert gone.status_code == 204
    await expect(page.get_by_role("alert")).to_contain_text("conversation is gone")  # live, no reload
    # The next conversation opened has the text waiting in its composer.
    await new_conversation(page, "Slow echo")
    await expect(box).to_have_value("a long thought I do not want to type again")


@pytest.mark.parametrize(("scheme", "background"), [("dark", "rgb(22, 23, 27)"), ("light", "rgb(247, 247, 248)")])
async def test_the_theme_follows_the_system_setting(
    browser: Browser, server: LiveServer, acme: Tenant, scheme: str, background: str
) -> None:
    async with tab(browser, color_scheme=scheme) as page:
        await sign_in(page, server, acme.tokens["alice"])
        colors = await page.evaluate(
            "() => [getComputedStyle(document.documentElement).backgroundColor,"
            " getComputedStyle(document.documentElement).color]"
        )
        assert colors[0] == background
        assert colors[1] != colors[0]
        await shot(page, f"theme-{scheme}")


async def test_the_conversation_list_filters_by_title(
    page: Page, server: LiveServer, acme: Tenant, http: httpx.AsyncClient
) -> None:
    for title in ("Trip to Lisbon", "Budget 2027", "lisbon hotels"):
        made = await http.post("/api/conversations", json={"title": title}, headers=acme.headers("alice"))
        assert made.status_code == 201, made.text
    await sign_in(page, server, acme.tokens["alice"])
    titles = page.locator("#conversation-list .title")
    await expect(titles).to_have_count(3)
    search = page.get_by_label("Filter by title")
    await search.fill("LISBON")
    await expect(titles).to_have_text(["lisbon hotels", "Trip to Lisbon"])
    await search.fill("nothing like it")
    await expect(titles).to_have_count(0)
    await expect(page.locator("#conversation-filter-empty")).to_have_text(
        "No loaded conversation has a title like that."
    )
    await search.fill("")
    await expect(titles).to_have_count(3)
    await expect(page.locator("#conversation-filter-empty")).to_have_text("")


# -- a phone (issue #17, point 6) --------------------------------------------------------------


async def bottom_of(page: Page, selector: str) -> float:
    box = await page.locator(selector).last.bounding_box()
    assert box is not None, selector
    return float(box["y"] + box["height"])


async def top_of(page: Page, selector: str) -> float:
    box = await page.locator(selector).bounding_box()
    assert box is not None, selector
    return float(box["y"])


async def test_on_a_phone_the_list_is_behind_a_button_and_the_answer_and_composer_stay_in_view(
    browser: Browser, server: LiveServer, acme: Tenant
) -> None:
    await slow_agent(acme)
    async with tab(browser, PHONE) as page:
        await sign_in(page, server, acme.tokens["alice"])
        toggle = page.locator("#toggle-conversations")
        # No conversation open: the list fills the screen, the chat waits behind it.
        await expect(page.get_by_role("button", name="New conversation")).to_be_visible()
        await expect(page.locator("main.chat")).to_be_hidden()
        await new_conversation(page, "Slow echo")
        # A conversation open: the chat fills the screen, the list is behind the button.
        await expect(page.get_by_role("button", name="New conversation")).to_be_hidden()
        await expect(toggle).to_have_text("Conversations")
        await expect(toggle).to_have_attribute("aria-expanded", "false")
        box = page.get_by_label("Message", exact=True)
        await expect(box).to_be_in_viewport()

        # A long answer, stopped: the newest words and the note under them are above the composer.
        await send_a_long_message(page, "w030")
        await page.get_by_role("button", name="Stop").click()
        note = page.locator(".message.agent.stopped .note")
        await expect(note).to_contain_text("Stopped")
        await expect(note).to_be_in_viewport()
        await expect(box).to_be_in_viewport()
        assert await bottom_of(page, ".message.agent.stopped .note") <= await top_of(page, "#composer")
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"]
        await shot(page, "phone-chat-stopped")

        # The list comes back with the button, and picking a conversation returns to the chat.
        await toggle.click()
        await expect(toggle).to_have_attribute("aria-expanded", "true")
        await expect(page.locator("#conversation-list button").first).to_be_visible()
        await expect(page.locator("main.chat")).to_be_hidden()
        await shot(page, "phone-conversations")
        await page.locator("#conversation-list button").first.click()
        await expect(page.locator("main.chat")).to_be_visible()
        await expect(box).to_be_focused()


async def test_the_answer_is_followed_unless_the_reader_scrolled_up_then_jump_to_latest(
    browser: Browser, server: LiveServer, acme: Tenant
) -> None:
    await slow_agent(acme)
    async with tab(browser, PHONE) as page:
        await sign_in(page, server, acme.tokens["alice"])
        await new_conversation(page, "Slow echo")
        box = page.get_by_label("Message", exact=True)
        await box.fill(words(200))
        await box.press("Enter")
        live = "document.querySelector('.message.agent.live .content')?.textContent || ''"
        at_end = "(b => b.scrollHeight - b.scrollTop - b.clientHeight < 40)(document.querySelector('#chat-body'))"
        # Followed: the messages scroll with the answer while the reader stays at the end.
        await page.wait_for_function(f"() => ({live}).includes('w060') && {at_end}", polling="raf")
        jump = page.get_by_role("button", name="Jump to latest")
        await expect(jump).to_be_hidden()

        # Scrolled up to read: left there while the answer grows, and offered the way back.
        # (The scroll event is sent at once, not on the next frame, so that no token lands in between.)
        await page.locator("#chat-body").evaluate("b => { b.scrollTop = 0; b.dispatchEvent(new Event('scroll')); }")
        await page.wait_for_function(f"() => ({live}).includes('w100')", polling="raf")
        assert await page.locator("#chat-body").evaluate("b => b.scrollTop") == 0
        await expect(jump).to_be_visible()
        await jump.click()
        await page.wait_for_function(f"() => {at_end}", polling="raf")
        await expect(jump).to_be_hidden()
        await page.get_by_role("button", name="Stop").click()
        await expect(page.locator(".message.agent.stopped .note")).to_be_in_viewport()


async def test_copy_puts_the_answer_on_the_clipboard(browser: Browser, server: LiveServer, acme: Tenant) -> None:
    async with tab(browser) as page:
        await page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
        await sign_in(page, server, acme.tokens["alice"])
        await new_conversation(page, "Echo")
        box = page.get_by_label("Message", exact=True)
        await box.fill("copy me, please")
        await box.press("Enter")
        answer = page.locator(".message.agent[data-id]")
        await expect(answer.locator(".content")).to_have_text("copy me, please")
        await expect(page.locator(".message.user").get_by_role("button", name="Copy")).to_have_count(0)
        await answer.get_by_role("button", name="Copy").click()
        copy = answer.locator(".message-actions .copy")  # by class: its name changes
        await expect(copy).to_have_text("Copied")
        assert await page.evaluate("navigator.clipboard.readText()") == "copy me, please"


async def test_a_conversation_made_while_the_agents_load_gets_the_chosen_agent(
    page: Page, server: LiveServer, acme: Tenant
) -> None:
    """A quick click on "New conversation" before the agent list has arrived waits for it
    (it made a conversation without agent: the keyboard test hit it once)."""
    release = asyncio.Event()

    async def hold(route: Route) -> None:
        await release.wait()
        await route.continue_()

    await page.route("**/api/agents", hold)
    await page.goto(f"{server.url}/#key={acme.tokens['alice']}")
    await expect(page.locator("#app")).to_be_visible()
    await page.get_by_role("button", name="New conversation").click()
    release.set()
    await expect(page.locator("#chat-agent")).to_have_text("Answers come from Echo.")
