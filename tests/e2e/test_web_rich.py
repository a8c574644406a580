"""Rich answers in the web client (issue #17, points 1, 2, 3 and 8): markdown and highlighted
code while an answer streams, nothing from a message, a title, an agent name or an error
ever runs, reasoning and tool calls shown (and answered), and an automated accessibility
audit. Same real server, Debian Chromium and rules as `test_web_client.py` (its fixtures are
reused): every wait is on the page's own state, none is a sleep.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page, ViewportSize, expect

from app.agents.schemas import AgentCreate
from app.agents.service import create_agent
from tests.e2e.test_web_client import (
    ARTIFACTS,
    DESKTOP,
    PHONE,
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
    stored_messages,
    tab,
)
from tests.e2e.test_web_security import violations, watch_csp
from tests.factories import Tenant
from tests.integration.live_server import LiveServer

pytestmark = pytest.mark.anyio

# The shared fixtures, imported so pytest finds them in this module too.
FIXTURES = (browser, http, page, server, server_logs_are_clean)

AXE = Path(__file__).parent / "vendor" / "axe.min.js"

MARKDOWN = """# Trip plan

Some *emphasis*, **strong** words and `inline code`, and [the docs](https://example.com/docs).

- first item
- second item

> a quoted line

| city | days |
|------|------|
| Lisbon | 3 |

```python
def greet(name):
    return f"hi {name}"
```"""

ANSWER_DONE = ".message.agent[data-id]"


async def agent(tenant: Tenant, name: str, **config: Any) -> str:
    created = await create_agent(tenant.company_id, AgentCreate(name=name, config=config))
    return str(created.id)


async def answer_done(page: Page, count: int = 1) -> None:
    await expect(page.locator(ANSWER_DONE)).to_have_count(count)
    await expect(page.locator(".message.agent.streaming")).to_have_count(0)


# -- point 1: markdown ----------------------------------------------------------------------


async def test_answers_and_messages_render_markdown_with_highlighted_code(
    browser: Browser, server: LiveServer, acme: Tenant
) -> None:
    async with tab(browser) as page:
        await page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
        await sign_in(page, server, acme.tokens["alice"])
        await new_conversation(page, "Echo")
        await send_with_enter(page, MARKDOWN)
        await answer_done(page)
        for role in ("user", "agent"):
            content = page.locator(f".message.{role} .content")
            await expect(content.locator("h1")).to_have_text("Trip plan")
            await expect(content.locator("em")).to_have_text("emphasis")
            await expect(content.locator("strong")).to_have_text("strong")
            await expect(content.locator("p > code")).to_have_text("inline code")
            link = content.get_by_role("link", name="the docs")
            await expect(link).to_have_attribute("href", "https://example.com/docs")
            await expect(link).to_have_attribute("target", "_blank")
            await expect(link).to_have_attribute("rel", re.compile(r"\bnoopener\b"))
            await expect(content.locator("ul > li")).to_have_count(2)
            await expect(content.locator("blockquote")).to_have_text("a quoted line")
            await expect(content.locator("table th").first).to_have_text("city")
            await expect(content.locator("table td").first).to_have_text("Lisbon")
            code = content.locator("pre code.hljs.language-python")
            await expect(code).to_contain_text('return f"hi {name}"')
            await expect(code.locator(".hljs-keyword").first).to_have_text("def")
        await shot(page, "markdown-answer")

        answer = page.locator(ANSWER_DONE)
        await answer.get_by_role("button", name="Copy code").click()
        await expect(answer.locator(".code-copy")).to_have_text("Copied")
        copied = await page.evaluate("navigator.clipboard.readText()")
        assert copied == 'def greet(name):\n    return f"hi {name}"'
        # Copy (the whole answer) gives its markdown, as written.
        await answer.locator(".message-actions .copy").click()
        assert await page.evaluate("navigator.clipboard.readText()") == MARKDOWN


# While the answer streams, a block that is finished is never rendered again: the observer
# records every node removed from an answer's content outside its open block.
WATCH_REMOVALS = """() => {
    window.__rerendered = 0;
    new MutationObserver((records) => {
        for (const r of records) {
            if (!r.removedNodes.length) continue;
            const target = r.target.nodeType === 1 ? r.target : r.target.parentElement;
            if (target && target.closest('.message.agent .content') && !target.closest('.md-open')) {
                window.__rerendered += r.removedNodes.length;
            }
        }
    }).observe(document.getElementById('message-list'), {childList: true, subtree: true});
}"""


RESET_STATS = "() => Object.assign(window.chatstreamRender, {blocks: 0, openRenders: 0, ms: 0})"


def long_markdown(blocks: int) -> str:
    """`blocks` markdown blocks of 40 words: paragraphs, lists and code, in turn."""
    out = []
    for i in range(blocks):
        words = " ".join(f"w{i:03d}x{j:02d}" for j in range(40))
        if i % 5 == 3:
            out.append("\n".join(f"- {w}" for w in words.split()))
        elif i % 5 == 4:
            out.append("```python\n" + "\n".join(f"x_{n} = {n}  # {w}" for n, w in enumerate(words.split())) + "\n```")
        else:
            out.append(f"Paragraph {i}: *{words}*")
    return "\n\n".join(out)


async def test_streaming_renders_finished_blocks_once_and_reports_the_cost_of_4000_tokens(
    page: Page, server: LiveServer, acme: Tenant
) -> None:
    await agent(acme, "Quick slow echo", pace=0.002)
    await agent(acme, "Fast echo", pace=0)
    await sign_in(page, server, acme.tokens["alice"])

    # Watched while it streams: finished blocks stay as they were rendered.
    await new_conversation(page, "Quick slow echo")
    await page.evaluate(WATCH_REMOVALS)
    text = long_markdown(20)
    await send_with_enter(page, text)
    await expect(page.locator(".message.user")).to_have_count(1)
    await page.evaluate(RESET_STATS)
    await page.wait_for_function(
        "() => document.querySelectorAll('.message.agent.live .part-text > :not(.md-open)').length >= 3",
        polling="raf",
    )
    await answer_done(page)
    paced = await page.evaluate("({...window.chatstreamRender})")
    assert await page.evaluate("window.__rerendered") == 0
    content = page.locator(f"{ANSWER_DONE} .content")
    await expect(content.locator("ul")).to_have_count(4)
    await expect(content.locator(".code-block")).to_have_count(4)

    # 4,000 tokens as fast as the server sends them: what the rendering costs in the page.
    await new_conversation(page, "Fast echo")
    text = long_markdown(50)  # 50 blocks of 40 words and their markup: ~4,000 `token` events
    assert len(re.findall(r"\s*\S+", text)) >= 4000
    await page.evaluate(RESET_STATS)
    await page.evaluate(WATCH_REMOVALS)
    box = page.get_by_label("Message", exact=True)
    await box.evaluate("(box, text) => { box.value = text; }", text)  # typing 24,000 characters takes long
    await box.press("Enter")
    await answer_done(page, 1)
    stats = await page.evaluate("({...window.chatstreamRender})")
    # The user's message renders once too (20 finished blocks, then the last).
    full_ms = await page.evaluate(
        """(text) => {
            const box = document.createElement('div');
            const t = performance.now();
            for (let i = 0; i < 10; i++) box.replaceChildren(), window.chatstreamRenderOnce(box, text);
            return (performance.now() - t) / 10;
        }""",
        text,
    )
    tokens = len(re.findall(r"\s*\S+", text))
    report = {
        "tokens": tokens,
        "blocksRenderedOnce": stats["blocks"],
        "openBlockRenders": stats["openRenders"],
        "renderMsTotal": round(stats["ms"], 1),
        "renderMsPerToken": round(stats["ms"] / tokens, 4),
        "wholeAnswerRenderMs": round(full_ms, 2),
        "naivePerTokenEstimateMs": round(full_ms * tokens / 2, 0),
        "pacedAnswer": {"tokens": len(re.findall(r"\s*\S+", long_markdown(20))), "pace_s": 0.002, **paced},
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "markdown-cost.json").write_text(json.dumps(report, indent=2) + "\n")
    print("markdown cost:", report)
    assert await page.evaluate("window.__rerendered") == 0
    # Every block but the last was rendered exactly once (the message's 50 and the answer's 50).
    assert stats["blocks"] == 2 * 49
    # The open block is rendered at most once per event, and far less often under load (per frame).
    assert stats["openRenders"] <= tokens + 2
    stored = page.locator(f"{ANSWER_DONE} .content")
    await expect(stored.locator(".code-block")).to_have_count(10)


# -- point 2: nothing in a message, a title, an agent name or an error runs ----------------

PAYLOADS = [
    "<img src=x onerror=\"window.__pwned='img'\">",
    '<script>window.__pwned="script"</script>',
    '[click me](javascript:window.__pwned="link")',
    '<a href="javascript:window.__pwned=1">html link</a>',
    '<iframe src="javascript:window.__pwned=1"></iframe>',
    '<svg onload="window.__pwned=1"></svg>',
    "![pic](javascript:window.__pwned=1)",
    '<b onmouseover="window.__pwned=1">bold</b>',
]
HOSTILE = "\n\n".join(PAYLOADS)
INJECTED = "#app script, #app img, #app iframe, #app svg:not(.icon), #app [onerror], #app [onload], #app [onmouseover]"


async def test_no_html_from_a_message_title_agent_name_or_error_runs(
    page: Page, server: LiveServer, acme: Tenant, http: httpx.AsyncClient
) -> None:
    console = await watch_csp(page)
    name = "<img src=x onerror=\"window.__pwned='agent'\">Evil"
    agent_id = await agent(acme, name, pace=0)
    created = await http.post(
        "/api/conversations",
        json={"title": '<script>window.__pwned="title"</script><img src=x onerror=alert(1)>', "agentId": agent_id},
        headers=acme.headers("alice"),
    )
    assert created.status_code == 201, created.text
    conversation_id = created.json()["id"]
    await sign_in(page, server, acme.tokens["alice"])
    await page.locator(f'#conversation-list button[data-id="{conversation_id}"]').click()
    await send_with_enter(page, HOSTILE)
    await answer_done(page)
    await page.locator(ANSWER_DONE).locator("a", has_text="click me").click()

    # Every payload shows as the text it is, and nothing was made of it.
    assert await page.evaluate("window.__pwned") is None
    assert await page.locator(INJECTED).count() == 0
    assert await page.locator('a[href^="javascript"], [src^="javascript"]').count() == 0
    for role in ("user", "agent"):
        shown = await page.locator(f".message.{role} .content").inner_text()
        assert "<script>window.__pwned" in shown and "<iframe" in shown and "<svg onload" in shown
    await expect(page.locator("#chat-title")).to_contain_text("<script>window.__pwned")
    await expect(page.locator("#conversation-list .title")).to_contain_text("<img src=x")
    await expect(page.locator("#chat-agent")).to_contain_text('<img src=x onerror="window.__pwned')
    await expect(page.locator(".message.agent .author")).to_have_text(name)

    # An error whose words are HTML (as a proxy in front could answer) is text as well.
    async def hostile_error(route: Any) -> None:
        await route.fulfill(
            status=400,
            content_type="application/json",
            body=json.dumps({"error": "<img src=x onerror=\"window.__pwned='error'\">bad", "code": "invalid_request"}),
        )

    await page.route(f"**/api/conversations/{conversation_id}/messages", hostile_error)
    await send_with_enter(page, "one more")
    await expect(page.locator("#alert-text")).to_have_text("<img src=x onerror=\"window.__pwned='error'\">bad")
    assert await page.evaluate("window.__pwned") is None
    assert await page.locator(INJECTED).count() == 0
    assert await violations(page, console) == []
    await shot(page, "hostile-content")


# -- point 3: every part kind -------------------------------------------------------------


async def test_reasoning_tool_calls_results_and_data_show_live_and_after_a_reload(
    page: Page, server: LiveServer, acme: Tenant
) -> None:
    await agent(acme, "Parts echo", pace=0.01, mode="parts")
    await sign_in(page, server, acme.tokens["alice"])
    await new_conversation(page, "Parts echo")
    await send_with_enter(page, "Book a table for two")
    await answer_done(page)
    answer = page.locator(ANSWER_DONE)
    reasoning = answer.locator("details.part-reasoning")
    await expect(reasoning.locator("summary")).to_have_text(re.compile(r"^Thought for \d+ s$"))
    await expect(reasoning.locator(".part-body")).to_be_hidden()  # collapsed
    await reasoning.locator("summary").click()
    await expect(reasoning.locator(".part-body")).to_have_text("The user wrote 5 words; echo them.")
    call = answer.locator(".part-tool-call")
    await expect(call.locator("code")).to_have_text("echo")
    await expect(call.locator(".part-state")).to_have_text("done")
    assert json.loads(await call.locator(".part-body").inner_text()) == {"text": "Book a table for two"}
    result = answer.locator(".part-tool-result")
    await expect(result).to_contain_text("Result of echo")
    assert json.loads(await result.locator(".part-body").inner_text()) == {"text": "Book a table for two"}
    data = answer.locator("details.part-data")
    await expect(data.locator("summary")).to_have_text("Data: echo-stats")
    await expect(answer.locator(".part-text").first).to_have_text("Book a table for two")
    await expect(answer.locator(".part-text").last).to_have_text("(echoed)")
    await expect(answer.locator(".tool-answer")).to_have_count(0)  # the server ran that tool
    await shot(page, "parts-live")

    await page.reload()
    answer = page.locator(ANSWER_DONE)
    await expect(answer.locator("details.part-reasoning summary")).to_have_text("Thoughts")
    await expect(answer.locator(".part-tool-call .part-state")).to_have_text("done")
    await expect(answer.locator("details.part-data summary")).to_have_text("Data: echo-stats")


async def test_a_tool_call_the_person_must_answer_is_answered_from_the_page(
    page: Page, server: LiveServer, acme: Tenant, http: httpx.AsyncClient
) -> None:
    await agent(acme, "Tool echo", pace=0.01, mode="tool")
    await sign_in(page, server, acme.tokens["alice"])
    await new_conversation(page, "Tool echo")
    conversation_id = await current_conversation_id(page)
    await send_with_enter(page, "Book a table")
    await answer_done(page)
    form = page.locator(".tool-answer")
    await expect(form).to_have_count(1)
    await shot(page, "tool-call-waiting")
    await form.get_by_label("Result for echo (JSON, or plain text)").fill('{"booked": true, "table": 12}')
    await form.get_by_role("button", name="Send result").click()
    # The result is stored as a tool message, and the agent's next answer follows.
    await expect(page.locator(".message.tool .part-tool-result")).to_contain_text("Result of echo")
    await answer_done(page, 2)
    await expect(page.locator(ANSWER_DONE).last.locator(".content")).to_have_text(
        'The tool said: echo returned {"booked":true,"table":12}'
    )
    await expect(page.locator(".tool-answer")).to_have_count(0)
    stored = await stored_messages(http, acme, "alice", conversation_id)
    assert [m["role"] for m in stored] == ["user", "agent", "tool", "agent"]
    assert stored[2]["parts"][0]["value"] == {"booked": True, "table": 12}

    # After a reload, an answered call offers nothing more.
    await page.reload()
    await answer_done(page, 2)
    await expect(page.locator(".tool-answer")).to_have_count(0)


# -- point 8: an automated accessibility audit --------------------------------------------


async def audit(page: Page, where: str) -> None:
    """axe-core (vendored, tests/e2e/vendor) on the page as it is: no serious or critical violation."""
    if not await page.evaluate("typeof window.axe === 'object'"):
        await page.evaluate(AXE.read_text())  # run by the test driver: the page's CSP does not apply
    result = await page.evaluate("axe.run(document, {resultTypes: ['violations']})")
    bad = [
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:3]}"
        for v in result["violations"]
        if v["impact"] in ("serious", "critical")
    ]
    assert not bad, f"accessibility violations ({where}):\n" + "\n".join(bad)


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["1280x800", "390x844"])
async def test_accessibility_audit_finds_no_serious_violation(
    browser: Browser, server: LiveServer, acme: Tenant, viewport: ViewportSize
) -> None:
    await agent(acme, "Parts echo", pace=0, mode="parts")
    for scheme in ("light", "dark"):
        async with tab(browser, viewport, color_scheme=scheme) as page:
            await page.goto(f"{server.url}/")
            await expect(page.get_by_label("API key")).to_be_visible()
            await audit(page, f"sign-in, {scheme}")
            await page.goto("about:blank")  # a login link signs in on a fresh load only
            await sign_in(page, server, acme.tokens["alice"])
            await audit(page, f"conversation list, {scheme}")
            await new_conversation(page, "Parts echo")
            await send_with_enter(page, MARKDOWN)
            await answer_done(page)
            await page.locator("details.part-reasoning summary").click()
            await audit(page, f"an answer with parts and markdown, {scheme}")
            await page.get_by_role("button", name="Rename").click()
            await audit(page, f"the rename form, {scheme}")
