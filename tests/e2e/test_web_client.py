"""The web client at `/` in a real browser: Debian's Chromium driven by Playwright, against
a real `chatstream serve` on the run's PostgreSQL database.

Nothing waits by sleeping: every wait is on the page's own state (Playwright's `expect`
and `wait_for_function`), bounded by `STEP`. Screenshots of the main states go to
`test-artifacts/` (gitignored).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page, ViewportSize, async_playwright, expect

from app.agents.schemas import AgentCreate
from app.agents.service import create_agent
from tests.conftest import ROOT
from tests.factories import Tenant
from tests.integration.live_server import LiveServer

pytestmark = pytest.mark.anyio

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
STEP = 10_000  # ms: the longest any single wait may take before the test fails
ARTIFACTS = ROOT / "test-artifacts"
DESKTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 390, "height": 844}
expect.set_options(timeout=STEP)


def ensure_chromium() -> None:
    """Debian's Chromium (.ci/run installs it); installed with apt here when missing, as
    browsers cannot be downloaded otherwise. Missing after that is a failure, not a skip."""
    if Path(CHROMIUM).exists():
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        # One test worker installs; the others wait for it (apt allows one install at a time).
        with open(Path(tempfile.gettempdir()) / "chatstream-tests-chromium.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not Path(CHROMIUM).exists():
                env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
                subprocess.run(["apt-get", "update"], check=False, capture_output=True, timeout=600, env=env)
                subprocess.run(
                    ["apt-get", "install", "-y", "chromium"], check=False, capture_output=True, timeout=900, env=env
                )
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is not installed: run `apt-get install chromium` (as root)")


# -- the server, the browser, a page --------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with LiveServer() as live:
        yield live


@pytest.fixture(autouse=True)
def server_logs_are_clean(server: LiveServer) -> Iterator[None]:
    """Whatever the page does, the server logs no traceback or error."""
    start = len(server.lines)
    yield
    new = server.lines[start:]
    bad = [line for line in new if "Traceback" in line or " ERROR " in line or line.startswith("ERROR")]
    assert not bad, "the server logged errors:\n" + "".join(new)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    ensure_chromium()
    async with async_playwright() as p:
        chromium = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


@asynccontextmanager
async def tab(browser: Browser, viewport: ViewportSize = DESKTOP, **options: Any) -> AsyncIterator[Page]:
    """A page in a fresh browser context (no cookies; Playwright's `new_context` options), closed
    on the way out."""
    context = await browser.new_context(viewport=viewport, **options)
    context.set_default_timeout(STEP)
    try:
        yield await context.new_page()
    finally:
        await context.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A fresh browser context (no cookies) at desktop size; fails the test on any uncaught script error."""
    script_errors: list[str] = []
    async with tab(browser) as fresh:
        fresh.on("pageerror", lambda exc: script_errors.append(str(exc)))
        yield fresh
    assert not script_errors, f"uncaught errors in the page: {script_errors}"


@pytest.fixture
async def http(server: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=STEP / 1000) as client:
        yield client


async def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def sign_in(page: Page, server: LiveServer, token: str) -> None:
    """The login link `chatstream serve` prints: one navigation."""
    await page.goto(f"{server.url}/#key={token}")
    await expect(page.locator("#app")).to_be_visible()


async def slow_agent(tenant: Tenant, name: str = "Slow echo") -> str:
    """An echo agent pausing 0.05 s before each word: slow enough to watch an answer grow."""
    agent = await create_agent(tenant.company_id, AgentCreate(name=name, config={"pace": 0.05}))
    return str(agent.id)


async def new_conversation(page: Page, agent_name: str) -> None:
    await page.get_by_label("Agent").select_option(label=agent_name)
    await page.get_by_role("button", name="New conversation").click()
    await expect(page.get_by_label("Message", exact=True)).to_be_focused()


async def stored_messages(http: httpx.AsyncClient, tenant: Tenant, who: str, conversation_id: str) -> list[dict]:
    response = await http.get(f"/api/conversations/{conversation_id}/messages", headers=tenant.headers(who))
    assert response.status_code == 200, response.text
    items: list[dict] = response.json()["items"]
    return items


async def current_conversation_id(page: Page) -> str:
    button = page.locator('#conversation-list button[aria-current="true"]')
    await expect(button).to_have_count(1)
    conversation_id = await button.get_attribute("data-id")
    assert conversation_id
    return conversation_id


async def send_with_enter(page: Page, text: str) -> None:
    """Type a message in the composer and send it with Enter, as a person would."""
    await page.get_by_label("Message", exact=True).fill(text)
    await page.get_by_label("Message", exact=True).press("Enter")


def words(n: int) -> str:
    return " ".join(f"w{i:03d}" for i in range(1, n + 1))


# -- tests ----------------------------------------------------------------------------------


async def test_login_link_signs_in_in_one_navigation_and_logout_returns_to_the_form(
    page: Page, server: LiveServer, acme: Tenant
) -> None:
    await page.goto(f"{server.url}/")
    await expect(page.get_by_label("API key")).to_be_visible()
    await expect(page.locator("#app")).to_be_hidden()
    await shot(page, "login-form")

    # The link opened as a new document (a changed fragment in an open tab signs nobody in).
    await page.goto("about:blank")
    await sign_in(page, server, acme.tokens["alice"])
    # The key does not stay in the address bar.
    assert page.url == f"{server.url}/"
    await expect(page.locator("#whoami")).to_contain_text("alice")
    await shot(page, "signed-in-empty")

    # The session is a cookie: a reload stays signed in.
    await page.reload()
    await expect(page.locator("#app")).to_be_visible()

    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_label("API key")).to_be_visible()
    await expect(page.locator("#app")).to_be_hidden()
    await page.reload()
    await expect(page.get_by_label("API key")).to_be_visible()

    # The form signs in too; a wrong key gets the server's words, not JSON.
    await page.get_by_label("API key").fill("cs_not_a_key")
    await page.get_by_role("button", name="Sign in").click()
    alert = page.get_by_role("alert")
    await expect(alert).to_contain_text("not valid")
    await expect(alert).not_to_contain_text("{")
    await page.get_by_label("API key").fill(acme.tokens["bob"])
    await page.get_by_label("API key").press("Enter")
    await expect(page.locator("#whoami")).to_contain_text("bob")
    await expect(alert).to_be_hidden()


async def test_answer_streams_in_visibly_and_ends_as_the_stored_message(
    page: Page, server: LiveServer, acme: Tenant, http: httpx.AsyncClient
) -> None:
    await slow_agent(acme)
    await sign_in(page, server, acme.tokens["alice"])
    await new_conversation(page, "Slow echo")
    conversation_id = await current_conversation_id(page)

    text = words(40)
    await send_with_enter(page, text)
    await expect(page.get_by_label("Message", exact=True)).to_have_value("")
    await expect(page.locator(".message.user .content")).to_have_text(text)

    # Partial text: some words arrived, the last one not yet.
    live = page.locator('.message.agent[aria-live="polite"]')
    await expect(live).to_have_count(1)
    await page.wait_for_function(
        """() => {
            const t = document.querySelector('.message.agent.live .content')?.textContent || '';
            return t.includes('w003') && !t.includes('w040');
        }""",
        polling="raf",
        timeout=STEP,
    )
    await expect(page.get_by_role("button", name="Stop")).to_be_visible()
    await shot(page, "streaming")

    done = page.locator(".message.agent[data-id]")
    await expect(done).to_have_count(1)
    await expect(page.locator(".message.agent.streaming")).to_have_count(0)
    await expect(page.get_by_role("button", name="Stop")).to_be_hidden()
    shown = await done.locator(".content").text_content()
    stored = await stored_messages(http, acme, "alice", conversation_id)
    assert [m["role"] for m in stored] == ["user", "agent"]
    assert stored[1]["id"] == await done.get_attribute("data-id")
    assert shown == stored[1]["content"] == text
    await shot(page, "answered")

    # A reload shows the stored conversation once, no second answer.
    await page.reload()
    await page.locator(f'#conversation-list button[data-id="{conversation_id}"]').click()
    await expect(page.locator(".message")).to_have_count(2)
    await expect(page.locator(".message.agent .content")).to_have_text(text)


async def test_shift_enter_is_a_newline_and_enter_sends(
    page: Page, server: LiveServer, acme: Tenant, http: httpx.AsyncClient
) -> None:
    await sign_in(page, server, acme.tokens["alice"])
    await new_conversation(page, "Echo")
    conversation_id = await current_conversation_id(page)

    box = page.get_by_label("Message", exact=True)
    await box.type("first line")
    await box.press("Shift+Enter")
    await box.type("second line")
    await expect(box).to_have_value("first line\nsecond line")
    await expect(page.locator(".message")).to_have_count(0)

    await box.press("Enter")
    await expect(box).to_have_value("")
    await expect(page.locator(".message.agent[data-id]")).to_have_count(1)
    stored = await stored_messages(http, acme, "alice", conversation_id)
    assert stored[0]["content"] == "first line\nsecond line"
    assert stored[0]["clientMessageId"]


async def test_stop_cancels_the_answer_and_shows_it_stopped(
    page: Page, server: LiveServer, acme: Tenant, http: httpx.AsyncClient
) -> None:
    await slow_agent(acme)
    await sign_in(page, server, acme.tokens["alice"])
    await new_conversation(page, "Slow echo")
    conversation_id = await current_conversation_id(page)

    await page.get_by_label("Message", exact=True).fill(words(200))
    await page.get_by_label("Message", exact=True).press("Enter")
    await page.wait_for_function(
        "() => (document.querySelector('.message.agent.live .content')?.textContent || '').includes('w002')",
        polling="raf",
        timeout=STEP,
    )
    await page.get_by_role("button", name="Stop").click()

    stopped = page.locator(".message.agent.stopped")
    await expect(stopped).to_contain_text("Stopped")
    await expect(stopped).to_contain_text("partial answer was kept")  # the server's default policy
    await expect(page.get_by_role("button", name="Stop")).to_be_hidden()
    await shot(page, "stopped")

    shown = await stopped.locator(".content").text_content()
    stored = await stored_messages(http, acme, "alice", conversation_id)
    assert [m["role"] for m in stored] == ["user", "agent"]
    assert stored[1]["status"] == "partial"
    assert stored[1]["id"] == await stopped.get_attribute("data-id")
    assert shown == stored[1]["content"]
    assert "w002" in shown and "w200" not in shown


async def test_too_long_message_shows_a_readable_error_and_keeps_the_text(
    page: Page, server: LiveServer, acme: Tenant, http: httpx.AsyncClient
) -> None:
    await sign_in(page, server, acme.tokens["alice"])
    await new_conversation(page, "Echo")
    conversation_id = await current_conversation_id(page)

    text = "x" * 50_001
    await send_with_enter(page, text)
    alert = page.get_by_role("alert")
    await expect(alert).to_be_visible()
    await expect(alert).to_contain_text("content is too long")
    await expect(alert).to_contain_text("at most 50000")
    message = await page.locator("#alert-text").text_content()
    assert message and "{" not in message and "too_large" not in message
    await expect(page.get_by_label("Message", exact=True)).to_have_value(text)
    await shot(page, "error-too-long")
    assert await stored_messages(http, acme, "alice", conversation_id) == []

    await page.get_by_role("button", name="Dismiss the message").click()
    await expect(alert).to_be_hidden()


async def test_network_failure_says_cannot_reach_the_server_and_retry_works(
    page: Page, server: LiveServer, acme: Tenant
) -> None:
    await sign_in(page, server, acme.tokens["alice"])
    await page.route("**/api/conversations", lambda route: route.abort("connectionrefused"))
    await page.get_by_role("button", name="New conversation").click()
    alert = page.get_by_role("alert")
    await expect(alert).to_contain_text("Cannot reach the server")
    await expect(page.locator("#conversation-list li")).to_have_count(0)
    await shot(page, "error-offline")

    await page.unroute("**/api/conversations")
    await page.get_by_role("button", name="Retry").click()
    await expect(alert).to_be_hidden()
    await expect(page.locator("#conversation-list li")).to_have_count(1)


async def test_conversation_list_is_newest_first_with_load_more(
    page: Page, server: LiveServer, acme: Tenant, http: httpx.AsyncClient
) -> None:
    ids = []
    for i in range(52):  # more than one page (50)
        response = await http.post("/api/conversations", json={"title": f"c{i:02d}"}, headers=acme.headers("bob"))
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    await sign_in(page, server, acme.tokens["bob"])
    items = page.locator("#conversation-list button")
    await expect(items).to_have_count(50)
    await expect(items.first).to_contain_text("c51")
    await page.get_by_role("button", name="Load more").click()
    await expect(items).to_have_count(52)
    await expect(items.last).to_contain_text("c00")
    await expect(page.get_by_role("button", name="Load more")).to_be_hidden()
    shown = [await b.get_attribute("data-id") for b in await items.all()]
    assert shown == ids[::-1]


@pytest.mark.parametrize("viewport", [PHONE, DESKTOP], ids=["phone", "desktop"])
async def test_usable_on_phone_and_desktop_by_keyboard(
    browser: Browser, server: LiveServer, acme: Tenant, viewport: ViewportSize
) -> None:
    async with tab(browser, viewport) as page:
        await sign_in(page, server, acme.tokens["alice"])
        # Keyboard only: Tab to the agent picker and the create button, Enter to create.
        await page.get_by_label("Agent").focus()
        await page.keyboard.press("Tab")
        await expect(page.get_by_role("button", name="New conversation")).to_be_focused()
        await page.keyboard.press("Enter")
        box = page.get_by_label("Message", exact=True)
        await expect(box).to_be_focused()
        await page.keyboard.type("hello from the keyboard")
        await page.keyboard.press("Enter")
        await expect(page.locator(".message.agent[data-id] .content")).to_have_text("hello from the keyboard")

        # Nothing wider than the screen; every control has a name.
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= viewport["width"]
        await expect(box).to_be_in_viewport()
        unnamed = await page.evaluate(
            """() => [...document.querySelectorAll('button, input, select, textarea')]
                .filter((e) => e.offsetParent !== null)
                .filter((e) => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                               && !e.textContent.trim())
                .map((e) => e.outerHTML)"""
        )
        assert unnamed == []
        # A focused control shows a focus ring.
        await box.focus()
        outline = await box.evaluate("(e) => getComputedStyle(e).outlineStyle")
        assert outline != "none"
        await shot(page, f"viewport-{viewport['width']}x{viewport['height']}")


async def test_reload_mid_answer_resumes_and_shows_the_whole_answer_once(
    page: Page, server: LiveServer, acme: Tenant, http: httpx.AsyncClient
) -> None:
    await slow_agent(acme)
    await sign_in(page, server, acme.tokens["alice"])
    await new_conversation(page, "Slow echo")
    conversation_id = await current_conversation_id(page)

    text = words(60)
    await send_with_enter(page, text)
    await page.wait_for_function(
        "() => (document.querySelector('.message.agent.live .content')?.textContent || '').includes('w002')",
        polling="raf",
    )
    await page.reload()

    # The tab comes back to its conversation and follows the answer from its start.
    assert await current_conversation_id(page) == conversation_id
    await page.wait_for_function(
        """() => {
            const t = document.querySelector('.message.agent.live .content')?.textContent || '';
            return t.startsWith('w001 w002') && !t.includes('w060');
        }""",
        polling="raf",
    )
    done = page.locator(".message.agent[data-id]")
    await expect(done).to_have_count(1)
    await expect(page.locator(".message.agent")).to_have_count(1)
    stored = await stored_messages(http, acme, "alice", conversation_id)
    assert await done.locator(".content").text_content() == stored[1]["content"] == text
