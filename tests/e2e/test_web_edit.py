"""The web client's editing: rename and delete the selected conversation, edit a message in
place. Same real server, Debian Chromium and rules as `test_web_client.py` (its fixtures
are reused from there): every wait is on the page's own state, none is a sleep.
"""

from __future__ import annotations

import httpx
import pytest
from playwright.async_api import Browser, Page, expect

from tests.e2e.test_web_client import (
    browser,
    current_conversation_id,
    http,
    new_conversation,
    page,
    server,
    server_logs_are_clean,
    shot,
    sign_in,
    stored_messages,
    tab,
)
from tests.factories import Tenant
from tests.integration.live_server import LiveServer

pytestmark = pytest.mark.anyio

# The shared fixtures, imported so pytest finds them in this module too.
FIXTURES = (browser, http, page, server, server_logs_are_clean)


async def stored_conversation(
    http: httpx.AsyncClient, tenant: Tenant, who: str, conversation_id: str
) -> httpx.Response:
    return await http.get(f"/api/conversations/{conversation_id}", headers=tenant.headers(who))


async def send_and_wait_for_answer(page: Page, text: str) -> None:
    box = page.get_by_label("Message", exact=True)
    await box.fill(text)
    await box.press("Enter")
    await expect(page.locator(".message.agent[data-id]")).to_have_count(1)
    await expect(page.locator(".message.agent.streaming")).to_have_count(0)


async def test_rename_saves_with_enter_escape_cancels_and_empty_clears_the_title(
    page: Page,
    server: LiveServer,
    acme: Tenant,
    http: httpx.AsyncClient,
) -> None:
    created = await http.post("/api/conversations", json={"title": "Old title"}, headers=acme.headers("alice"))
    assert created.status_code == 201, created.text
    conversation_id = created.json()["id"]
    await sign_in(page, server, acme.tokens["alice"])
    item = page.locator(f'#conversation-list button[data-id="{conversation_id}"]')
    await item.click()
    heading = page.locator("#chat-title")
    await expect(heading).to_have_text("Old title")

    # Rename: the input comes prefilled and focused; Enter saves.
    await page.get_by_role("button", name="Rename").click()
    title = page.get_by_label("Conversation title", exact=True)
    await expect(title).to_be_focused()
    await expect(title).to_have_value("Old title")
    await title.fill("New title")
    await title.press("Enter")
    await expect(title).to_be_hidden()
    await expect(heading).to_have_text("New title")
    await expect(item.locator(".title")).to_have_text("New title")
    await expect(page.get_by_role("button", name="Rename")).to_be_focused()
    response = await stored_conversation(http, acme, "alice", conversation_id)
    assert response.json()["title"] == "New title"

    # Escape cancels: nothing sent, nothing changed.
    await page.get_by_role("button", name="Rename").click()
    await title.fill("Not this one")
    await title.press("Escape")
    await expect(title).to_be_hidden()
    await expect(heading).to_have_text("New title")
    await expect(item.locator(".title")).to_have_text("New title")
    response = await stored_conversation(http, acme, "alice", conversation_id)
    assert response.json()["title"] == "New title"

    # Empty clears the title (null): the conversation is untitled again.
    await page.get_by_role("button", name="Rename").click()
    await title.fill("")
    await page.locator("#rename-form").get_by_role("button", name="Save").click()
    await expect(title).to_be_hidden()
    await expect(heading).to_have_text("Untitled conversation")
    await expect(item.locator(".title")).to_have_text("Untitled conversation")
    response = await stored_conversation(http, acme, "alice", conversation_id)
    assert response.json()["title"] is None

    # The list keeps it after a reload: it was stored, not only shown.
    await page.reload()
    await expect(item.locator(".title")).to_have_text("Untitled conversation")


async def test_delete_asks_in_the_page_cancel_keeps_it_confirm_removes_it(
    page: Page,
    server: LiveServer,
    acme: Tenant,
    http: httpx.AsyncClient,
) -> None:
    ids = []
    for title in ("Keep me", "Delete me"):
        response = await http.post("/api/conversations", json={"title": title}, headers=acme.headers("alice"))
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    keep_id, delete_id = ids
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: dialogs.append(dialog.message))
    await sign_in(page, server, acme.tokens["alice"])
    items = page.locator("#conversation-list button")
    await expect(items).to_have_count(2)
    await page.locator(f'#conversation-list button[data-id="{delete_id}"]').click()
    await expect(page.locator("#chat-title")).to_have_text("Delete me")

    # The first click only asks; Cancel keeps the conversation.
    await page.get_by_role("button", name="Delete", exact=True).click()
    confirm = page.get_by_role("button", name="Confirm delete")
    await expect(confirm).to_be_visible()
    await expect(page.get_by_role("group")).to_contain_text("cannot be undone")
    await shot(page, "delete-confirm")
    await page.locator("#delete-confirm").get_by_role("button", name="Cancel").click()
    await expect(confirm).to_be_hidden()
    await expect(page.get_by_role("button", name="Delete", exact=True)).to_be_focused()
    await expect(items).to_have_count(2)
    await expect(page.locator("#chat-title")).to_have_text("Delete me")
    assert (await stored_conversation(http, acme, "alice", delete_id)).status_code == 200

    # Confirmed: gone from the list and the server, the chat area empty.
    await page.get_by_role("button", name="Delete", exact=True).click()
    await confirm.click()
    await expect(items).to_have_count(1)
    await expect(page.locator(f'#conversation-list button[data-id="{delete_id}"]')).to_have_count(0)
    await expect(page.locator(f'#conversation-list button[data-id="{keep_id}"]')).to_have_count(1)
    await expect(page.locator("#chat-title")).to_have_text("No conversation selected")
    await expect(page.locator("#chat-body")).to_be_hidden()
    await expect(page.get_by_label("Message", exact=True)).to_be_hidden()
    await expect(page.get_by_role("button", name="Rename")).to_be_hidden()
    await expect(page.get_by_role("alert")).to_be_hidden()
    assert (await stored_conversation(http, acme, "alice", delete_id)).status_code == 404
    assert (await stored_conversation(http, acme, "alice", keep_id)).status_code == 200
    assert dialogs == []  # asked in the page, never with window.confirm

    # A reload does not bring it back.
    await page.reload()
    await expect(items).to_have_count(1)
    await expect(page.locator("#chat-title")).to_have_text("No conversation selected")


async def test_edit_own_message_shows_the_effective_text_and_the_edited_marker(
    page: Page,
    server: LiveServer,
    acme: Tenant,
    http: httpx.AsyncClient,
) -> None:
    await sign_in(page, server, acme.tokens["alice"])
    await new_conversation(page, "Echo")
    conversation_id = await current_conversation_id(page)
    await send_and_wait_for_answer(page, "hello world")

    mine = page.locator(".message.user")
    agent = page.locator(".message.agent")
    # A member edits their own message; the agent's answer has no edit control.
    await expect(mine.get_by_role("button", name="Edit")).to_have_count(1)
    await expect(agent.get_by_role("button", name="Edit")).to_have_count(0)
    await expect(mine.locator(".note.edited")).to_have_count(0)

    # Escape cancels: the text stays, nothing is stored.
    await mine.get_by_role("button", name="Edit").click()
    box = mine.get_by_label("Edit message")
    await expect(box).to_be_focused()
    await expect(box).to_have_value("hello world")
    await box.fill("not saved")
    await box.press("Escape")
    await expect(box).to_have_count(0)
    await expect(mine.locator(".content")).to_have_text("hello world")
    await expect(mine.get_by_role("button", name="Edit")).to_be_focused()

    # Ctrl+Enter saves (a plain Enter is a new line).
    await mine.get_by_role("button", name="Edit").click()
    await expect(box).to_have_value("hello world")
    await box.fill("hello edited")
    await box.press("Enter")
    await box.type("second line")
    await expect(box).to_have_value("hello edited\nsecond line")
    await shot(page, "edit-message")
    await box.press("Control+Enter")
    await expect(box).to_have_count(0)
    await expect(mine.locator(".content")).to_have_text("hello edited\nsecond line")
    await expect(mine.locator(".note.edited")).to_have_text("edited")
    await expect(mine.get_by_role("button", name="Edit")).to_be_focused()
    await expect(agent.get_by_role("button", name="Edit")).to_have_count(0)
    await shot(page, "edited-message")

    stored = await stored_messages(http, acme, "alice", conversation_id)
    assert [m["role"] for m in stored] == ["user", "agent"]
    assert stored[0]["id"] == await mine.get_attribute("data-id")
    assert stored[0]["content"] == "hello world"
    assert stored[0]["editedContent"] == "hello edited\nsecond line"
    assert stored[0]["effectiveContent"] == "hello edited\nsecond line"
    assert stored[0]["editedAt"]
    assert stored[1]["editedContent"] is None

    # After a reload the stored state shows the same way.
    await page.reload()
    await expect(page.locator(".message")).to_have_count(2)
    await expect(mine.locator(".content")).to_have_text("hello edited\nsecond line")
    await expect(mine.locator(".note.edited")).to_be_visible()
    await expect(agent.get_by_role("button", name="Edit")).to_have_count(0)


async def test_members_get_no_edit_on_agent_messages_admins_edit_every_message(
    page: Page,
    browser: Browser,
    server: LiveServer,
    acme: Tenant,
    http: httpx.AsyncClient,
) -> None:
    await sign_in(page, server, acme.tokens["alice"])
    await new_conversation(page, "Echo")
    conversation_id = await current_conversation_id(page)
    await send_and_wait_for_answer(page, "answer me")
    await expect(page.locator(".message.user").get_by_role("button", name="Edit")).to_have_count(1)
    await expect(page.locator(".message.agent").get_by_role("button", name="Edit")).to_have_count(0)
    await expect(page.locator(".message.agent .content")).to_have_text("answer me")

    async with tab(browser) as admin:  # another person: their own cookies
        await sign_in(admin, server, acme.tokens["admin"])
        await expect(admin.locator("#whoami")).to_contain_text("(admin)")
        await admin.locator(f'#conversation-list button[data-id="{conversation_id}"]').click()
        await expect(admin.locator(".message")).to_have_count(2)
        answer = admin.locator(".message.agent")
        await expect(admin.locator(".message.user").get_by_role("button", name="Edit")).to_have_count(1)
        await expect(answer.get_by_role("button", name="Edit")).to_have_count(1)

        # The admin edits the agent's answer, with the Save button.
        await answer.get_by_role("button", name="Edit").click()
        box = answer.get_by_label("Edit message")
        await expect(box).to_have_value("answer me")
        await box.fill("a corrected answer")
        await answer.get_by_role("button", name="Save").click()
        await expect(box).to_have_count(0)
        await expect(answer.locator(".content")).to_have_text("a corrected answer")
        await expect(answer.locator(".note.edited")).to_be_visible()
        await shot(admin, "admin-edited-agent-message")

    stored = await stored_messages(http, acme, "alice", conversation_id)
    assert stored[1]["role"] == "agent"
    assert stored[1]["content"] == "answer me"
    assert stored[1]["editedContent"] == "a corrected answer"

    # The member sees the edited answer, still without an edit control.
    await page.reload()
    await expect(page.locator(".message.agent .content")).to_have_text("a corrected answer")
    await expect(page.locator(".message.agent .note.edited")).to_be_visible()
    await expect(page.locator(".message.agent").get_by_role("button", name="Edit")).to_have_count(0)
