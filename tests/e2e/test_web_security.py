"""The web client's side of issue #14 in Chromium: a login link does not silently replace a
session (points 5), the page works under its Content-Security-Policy with no violation,
and a page on another port of the same host cannot write with the visitor's cookie
(points 4 and 8)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from playwright.async_api import Page, expect

from app.tables import ApiKey
from tests.e2e.test_web_client import (
    browser,
    http,
    new_conversation,
    page,
    send_with_enter,
    server,
    server_logs_are_clean,
    sign_in,
)
from tests.factories import Tenant
from tests.integration.live_server import LiveServer

pytestmark = pytest.mark.anyio

# The shared fixtures, imported so pytest finds them in this module too.
FIXTURES = (browser, http, page, server, server_logs_are_clean)

# Recorded from the first script of every document (Playwright's init scripts are not
# subject to the page's CSP); `violations()` reads them back.
RECORD_VIOLATIONS = """
window.__violations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__violations.push(`${e.violatedDirective} ${e.blockedURI}`);
});
"""


async def watch_csp(page: Page) -> list[str]:
    """Start recording CSP violations (events, and console errors that mention the policy)."""
    console: list[str] = []
    page.on("console", lambda m: console.append(m.text) if "Content Security Policy" in m.text else None)
    await page.context.add_init_script(RECORD_VIOLATIONS)
    return console


async def violations(page: Page, console: list[str]) -> list[str]:
    recorded: list[str] = await page.evaluate("window.__violations")
    return recorded + console


async def who_am_i(page: Page) -> str:
    """The key name of the page's session, asked of the server with the page's cookie."""
    me: dict[str, Any] = await page.evaluate("fetch('/api/me').then((r) => r.json())")
    return str(me["key"]["name"])


# -- point 5: login links -----------------------------------------------------------------


async def test_a_login_link_asks_before_replacing_a_session(page: Page, server: LiveServer, acme: Tenant) -> None:
    await sign_in(page, server, acme.tokens["alice"])
    await expect(page.locator("#whoami")).to_contain_text("alice")

    # Someone else's link, opened in a new tab of the same browser: the page asks, naming
    # the current account; staying is the default.
    page = await page.context.new_page()
    await page.goto(f"{server.url}/#key={acme.tokens['bob']}")
    dialog = page.get_by_role("alertdialog", name="Switch account?")
    await expect(dialog).to_be_visible()
    await expect(dialog).to_contain_text("alice")
    assert page.url == f"{server.url}/"  # the key left the address bar at once
    await expect(page.get_by_role("button", name="Stay signed in")).to_be_focused()
    await page.get_by_role("button", name="Stay signed in").click()
    await expect(dialog).to_be_hidden()
    await expect(page.locator("#whoami")).to_contain_text("alice")
    assert await who_am_i(page) == "alice"

    # Asked again (a new document), the person chooses to switch.
    await page.goto("about:blank")
    await page.goto(f"{server.url}/#key={acme.tokens['bob']}")
    await page.get_by_role("button", name="Switch account").click()
    await expect(page.locator("#whoami")).to_contain_text("bob")
    assert await who_am_i(page) == "bob"


async def test_a_login_link_without_a_session_signs_in_without_asking(
    page: Page, server: LiveServer, acme: Tenant
) -> None:
    await sign_in(page, server, acme.tokens["alice"])
    await expect(page.get_by_role("alertdialog")).to_have_count(0)


async def test_a_changed_fragment_in_an_open_tab_signs_nobody_in(page: Page, server: LiveServer, acme: Tenant) -> None:
    await sign_in(page, server, acme.tokens["alice"])
    await page.evaluate(f"location.hash = '#key={acme.tokens['bob']}'")
    # The key is taken out of the address bar, and nothing else happens.
    await page.wait_for_function("location.hash === ''")
    await expect(page.get_by_role("alertdialog")).to_be_hidden()
    await expect(page.locator("#whoami")).to_contain_text("alice")
    assert await who_am_i(page) == "alice"


# -- point 8: the page under its CSP ------------------------------------------------------


async def test_the_client_works_under_its_csp_and_the_csp_is_enforced(
    page: Page, server: LiveServer, acme: Tenant
) -> None:
    console = await watch_csp(page)
    await sign_in(page, server, acme.tokens["alice"])
    # REST, the page's own WebSocket (the answer streams over it), markdown and highlighted code.
    await new_conversation(page, "Echo")
    await send_with_enter(page, "under the policy")
    await expect(page.locator(".message.agent .content")).to_have_text("under the policy")
    await send_with_enter(page, "*styled*\n\n```python\nx = 1\n```")
    await expect(page.locator(".message.agent[data-id] .code-block")).to_have_count(1)
    # Another WebSocket of the page's own origin, with the session cookie.
    pong = await page.evaluate(
        """() => new Promise((resolve, reject) => {
            const ws = new WebSocket(location.origin.replace("http", "ws") + "/api/ws");
            ws.onopen = () => ws.send(JSON.stringify({type: "ping", ref: "csp"}));
            ws.onmessage = (e) => {
                const frame = JSON.parse(e.data);
                if (frame.type === "hello") return;  // the greeting comes first
                ws.close();
                resolve(frame);
            };
            ws.onclose = (e) => reject(new Error("closed " + e.code));
        })"""
    )
    assert pong == {"type": "pong", "ref": "csp"}
    assert await violations(page, console) == []

    # The policy is in force: an injected inline script does not run.
    ran = await page.evaluate(
        """() => {
            const s = document.createElement("script");
            s.textContent = "window.__inline = true";
            document.body.append(s);
            return window.__inline === true;
        }"""
    )
    assert ran is False
    await page.wait_for_function("window.__violations.length > 0")
    assert any(v.startswith("script-src") for v in await violations(page, console))


# -- point 4: a page on another port of the same host -------------------------------------


class _CatsPage(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><p>cute cats</p>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def attacker_page() -> Iterator[str]:
    """A harmless-looking page on another port of 127.0.0.1 (a real server: Chromium lets
    only loopback pages reach loopback addresses); its URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _CatsPage)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


async def test_a_page_on_another_port_cannot_write_with_the_cookie(
    page: Page, server: LiveServer, acme: Tenant
) -> None:
    await sign_in(page, server, acme.tokens["admin"])
    # The attacker's page, served at http://127.0.0.1:<another port>: the same site as the
    # server (the SameSite cookie goes along), another origin.
    with attacker_page() as other:
        await page.goto(other)
        before = await ApiKey.count()
        statuses = await page.evaluate(
            """async (target) => {
                const body = JSON.stringify({name: "planted", role: "admin"});
                const sent = [];
                // "Simple" requests, sent without asking the server first; the response is opaque.
                for (const type of ["text/plain", "application/x-www-form-urlencoded"]) {
                    const r = await fetch(target + "/api/keys", {
                        method: "POST", mode: "no-cors", credentials: "include", headers: {"Content-Type": type}, body,
                    });
                    sent.push(r.type);
                }
                return sent;
            }""",
            server.url,
        )
        assert statuses == ["opaque", "opaque"]
        assert await ApiKey.count() == before
