"""Structured logs (issue #18, point 3) on a real server: with `CHATSTREAM_LOG_FORMAT=json` every
line the server prints is one JSON object; each request has a line with its request id (the
client's `X-Request-ID` when sane, else a made one, returned in the response header) and each
answer a start and an end line with its ids, the id of the request that started it, status,
TTFT, tokens and error code; no line holds the API key, the session cookie, a model key or
any message's content. Text stays the default; `serve --workers 2` logs JSON
from every worker.

The log is read after the server stopped (every line is in); the only waits are bounded
polls of the server's output, which a thread drains and which sets no event.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import anyio
import httpx
import pytest
import redis
from httpx_sse import aconnect_sse

from app.config import get_settings
from tests.factories import Tenant
from tests.integration.live_server import LiveServer, free_port
from tests.integration.wire_api import frame_where, make_agent, socket, text_of
from tests.redis_support import REDIS_URL

pytestmark = pytest.mark.anyio

STEP = 10.0  # the longest any wait may take before the test fails
MADE_ID = re.compile(r"[0-9a-f]{32}")
TERMINAL = ("done", "cancelled", "error")


def marker() -> str:
    """A word found nowhere but where the test put it."""
    return f"zq{uuid.uuid4().hex[:12]}"


def parsed(lines: list[str]) -> list[dict[str, Any]]:
    """Every line as a JSON object (fails on the first that is not one)."""
    objects = []
    for line in lines:
        try:
            obj = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
        assert isinstance(obj, dict), line
        objects.append(obj)
    return objects


async def output_holds(live: LiveServer, check: Any) -> None:
    """Wait (bounded) until `check(lines)` holds for the server's output."""
    with anyio.fail_after(STEP):
        # Polling: the lines come from a thread draining the server's pipe, which sets no event.
        while not check(list(live.lines)):  # noqa: ASYNC110
            await anyio.sleep(0.02)


async def read_to_end(
    http: httpx.AsyncClient, cid: str, gid: str, headers: dict[str, str]
) -> tuple[httpx.Response, list[Any]]:
    """The answer `gid` read from its start to its terminal event (with the cursor `<gid>.0`:
    an answer that ended before the stream opened is read too): (the response, its events)."""
    headers = {**headers, "Last-Event-ID": f"{gid}.0"}
    events: list[dict[str, Any]] = []
    with anyio.fail_after(STEP):
        async with aconnect_sse(http, "GET", f"/api/conversations/{cid}/stream", headers=headers) as source:
            assert source.response.status_code == 200
            async for sse in source.aiter_sse():
                if sse.data:
                    events.append(json.loads(sse.data))
                    if events[-1]["type"] in TERMINAL:
                        break
    return source.response, events


async def test_a_full_scenario_logs_json_lines_with_ids_and_no_secret_or_content(acme: Tenant) -> None:
    model_port = free_port()  # nobody listens: the `openai` agent's answer fails
    model_key = f"sk-model-{uuid.uuid4().hex}"
    env = {
        "CHATSTREAM_LOG_FORMAT": "json",
        "CHATSTREAM_UPSTREAM_ALLOW": f"127.0.0.1:{model_port}",
        "CHATSTREAM_MODEL_KEY_VARS": f"LOGTEST_MODEL_KEY=127.0.0.1:{model_port}",
        "LOGTEST_MODEL_KEY": model_key,
    }
    key = acme.tokens["alice"]
    contents = {name: f"{name} {marker()} {marker()}" for name in ("sse", "ws", "cancel", "edit", "fail", "bad")}
    cookie_name = get_settings().cookie_name
    slow_agent = await make_agent(acme, 0.2)
    sent_ids: dict[str, str] = {}  # what each request sent as X-Request-ID

    def rid(name: str) -> dict[str, str]:
        sent_ids[name] = f"{name}-{uuid.uuid4().hex[:8]}"
        return {"X-Request-ID": sent_ids[name]}

    with LiveServer(env) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=STEP) as http:
            # Sign in with the key; from here on the session cookie authenticates.
            r = await http.post(
                "/api/session", json={"key": key}, headers={"Sec-Fetch-Site": "same-origin", **rid("signin")}
            )
            assert r.status_code == 200, r.text
            assert r.headers["x-request-id"] == sent_ids["signin"]
            session = r.cookies[cookie_name]
            http.cookies.clear()
            browser = {"Cookie": f"{cookie_name}={session}", "Sec-Fetch-Site": "same-origin"}

            r = await http.post(
                "/api/conversations", json={"agentId": str(acme.agent_id)}, headers={**browser, **rid("create")}
            )
            assert r.status_code == 201, r.text
            cid = r.json()["id"]

            # An answer streamed over SSE.
            r = await http.post(
                f"/api/conversations/{cid}/messages",
                json={"content": contents["sse"]},
                headers={**browser, **rid("post")},
            )
            assert r.status_code == 201, r.text
            sse_message, sse_gid = r.json()["message"]["id"], r.json()["generation"]["id"]
            response, events = await read_to_end(http, cid, sse_gid, {**browser, **rid("sse")})
            assert response.headers["x-request-id"] == sent_ids["sse"]
            assert events[-1]["type"] == "done" and text_of(events) == contents["sse"]

            # An answer started and streamed over the WebSocket.
            async with socket(live, {"Cookie": f"{cookie_name}={session}", **rid("ws")}, origin=live.url) as ws:
                assert ws.response is not None and ws.response.headers["x-request-id"] == sent_ids["ws"]
                await ws.send(json.dumps({"type": "subscribe", "conversationId": cid, "ref": "s"}))
                await frame_where(ws, type="ack", ref="s")
                send = {
                    "type": "send",
                    "conversationId": cid,
                    "content": contents["ws"],
                    "clientMessageId": "m1",
                    "ref": "m",
                }
                await ws.send(json.dumps(send))
                ws_gid = (await frame_where(ws, type="ack", ref="m"))["generation"]["id"]
                assert (await frame_where(ws, type="done", generationId=ws_gid))["tokenCount"] > 0

            # One cancelled.
            r = await http.post(
                "/api/conversations", json={"agentId": slow_agent}, headers={**browser, "X-Request-ID": "x" * 129}
            )
            assert r.status_code == 201 and MADE_ID.fullmatch(r.headers["x-request-id"])  # too long: replaced
            slow_cid = r.json()["id"]
            long_content = contents["cancel"] + " " + " ".join(["more words"] * 40)
            r = await http.post(
                f"/api/conversations/{slow_cid}/messages",
                json={"content": long_content},
                headers={**browser, **rid("slow")},
            )
            assert r.status_code == 201, r.text
            cancel_gid = r.json()["generation"]["id"]
            with anyio.fail_after(STEP):
                async with aconnect_sse(
                    http, "GET", f"/api/conversations/{slow_cid}/stream", headers=browser
                ) as source:
                    seen: list[str] = []
                    async for sse in source.aiter_sse():
                        if not sse.data:
                            continue
                        seen.append(json.loads(sse.data)["type"])
                        if seen[-1] == "token" and seen.count("token") == 1:
                            r = await http.post(
                                f"/api/generations/{cancel_gid}/cancel", headers={**browser, **rid("cancel")}
                            )
                            assert r.status_code == 200, r.text
                        if seen[-1] in TERMINAL:
                            break
            assert seen[-1] == "cancelled", seen

            # An edit, a bad request (with an id that is not one we take), one with no id at all.
            r = await http.put(
                f"/api/conversations/{cid}/messages/{sse_message}",
                json={"content": contents["edit"]},
                headers={**browser, **rid("edit")},
            )
            assert r.status_code == 200, r.text
            r = await http.post(
                f"/api/conversations/{cid}/messages",
                json={"content": contents["bad"], "reply": "not a boolean"},
                headers={**browser, "X-Request-ID": "bad id; <script>"},
            )
            assert r.status_code == 400, r.text
            bad_made = r.headers["x-request-id"]
            assert MADE_ID.fullmatch(bad_made)
            r = await http.get("/api/me", headers=browser)
            assert r.status_code == 200
            unsent_made = r.headers["x-request-id"]
            assert MADE_ID.fullmatch(unsent_made) and unsent_made != bad_made

            # One failed: a model server nobody listens at, sent a key.
            agent = {
                "name": "unreachable",
                "adapter": "openai",
                "config": {
                    "baseUrl": f"http://127.0.0.1:{model_port}/v1",
                    "model": "m",
                    "apiKeyEnv": "LOGTEST_MODEL_KEY",
                },
            }
            r = await http.post("/api/agents", json=agent, headers=acme.headers("admin"))
            assert r.status_code == 201, r.text
            r = await http.post("/api/conversations", json={"agentId": r.json()["id"]}, headers=browser)
            fail_cid = r.json()["id"]
            r = await http.post(
                f"/api/conversations/{fail_cid}/messages",
                json={"content": contents["fail"]},
                headers={**browser, **rid("fail")},
            )
            assert r.status_code == 201, r.text
            fail_gid = r.json()["generation"]["id"]
            _, events = await read_to_end(http, fail_cid, fail_gid, browser)
            assert events[-1]["type"] == "error", events

            r = await http.delete("/api/session", headers={**browser, **rid("signout")})
            assert r.status_code in (200, 204), r.text
            assert r.headers["x-request-id"] == sent_ids["signout"]

        gids = {sse_gid, ws_gid, cancel_gid, fail_gid}
        await output_holds(
            live, lambda lines: sum('"generation.end"' in line and any(g in line for g in gids) for line in lines) == 4
        )
    output = live.output()
    lines = parsed(live.lines)

    # Nothing secret, nothing said.
    for secret in [*acme.tokens.values(), session, model_key]:
        assert secret not in output
    for content in contents.values():
        for word in content.split()[1:]:
            assert word not in output, word

    # One line per request, with its id; the made ids are logged too.
    requests = {line["requestId"]: line for line in lines if line.get("event") == "request"}
    expected = {
        "signin": ("POST", "/api/session", 200),
        "create": ("POST", "/api/conversations", 201),
        "post": ("POST", "/api/conversations/{conversation_id}/messages", 201),
        "sse": ("GET", "/api/conversations/{conversation_id}/stream", 200),
        "ws": ("WEBSOCKET", "/api/ws", 101),
        "slow": ("POST", "/api/conversations/{conversation_id}/messages", 201),
        "cancel": ("POST", "/api/generations/{generation_id}/cancel", 200),
        "edit": ("PUT", "/api/conversations/{conversation_id}/messages/{message_id}", 200),
        "fail": ("POST", "/api/conversations/{conversation_id}/messages", 201),
        "signout": ("DELETE", "/api/session", None),
    }
    for name, (method, route, status) in expected.items():
        line = requests[sent_ids[name]]
        assert (line["method"], line["route"].replace(":uuid", "")) == (method, route), line
        assert status is None or line["status"] == status, line
        assert "?" not in line["path"] and isinstance(line["durationMs"], float)
        assert line["level"] == "INFO" and line["logger"] == "chatstream.access"
    for name in ("post", "sse", "ws", "edit"):
        assert requests[sent_ids[name]]["companyId"] == str(acme.company_id)
    assert requests[bad_made]["status"] == 400 and unsent_made in requests
    assert "companyId" not in requests[sent_ids["signin"]]  # not signed in yet

    # A start and an end line per answer, with the id of the request that started it.
    started_by = {sse_gid: "post", ws_gid: "ws", cancel_gid: "slow", fail_gid: "fail"}
    conversation_of = {sse_gid: cid, ws_gid: cid, cancel_gid: slow_cid, fail_gid: fail_cid}
    for gid, name in started_by.items():
        start = [line for line in lines if line.get("event") == "generation.start" and line["generationId"] == gid]
        end = [line for line in lines if line.get("event") == "generation.end" and line["generationId"] == gid]
        assert len(start) == len(end) == 1, (start, end)
        for line in (*start, *end):
            assert line["conversationId"] == conversation_of[gid], line
            assert line["companyId"] == str(acme.company_id), line
            assert line["requestId"] == sent_ids[name], line
            assert line["logger"] == "chatstream.generations"
        assert {"status", "ttftMs", "tokens", "errorCode", "durationMs"} <= end[0].keys()
    ends = {line["generationId"]: line for line in lines if line.get("event") == "generation.end"}
    for gid in (sse_gid, ws_gid):
        assert ends[gid]["status"] == "done" and ends[gid]["errorCode"] is None
        assert ends[gid]["tokens"] > 0 and ends[gid]["ttftMs"] >= 0
    assert ends[cancel_gid]["status"] == "cancelled" and ends[cancel_gid]["errorCode"] == "user"
    assert ends[cancel_gid]["tokens"] >= 1
    assert ends[fail_gid]["status"] == "failed" and ends[fail_gid]["errorCode"], ends[fail_gid]
    assert ends[fail_gid]["level"] == "WARNING"
    # uvicorn's lines are JSON too (the parse above), its access log replaced by ours.
    assert any(
        line["logger"] == "uvicorn.error" and "Application startup complete" in line["message"] for line in lines
    )
    assert not any(line["logger"] == "uvicorn.access" for line in lines)


async def test_text_stays_the_default(acme: Tenant) -> None:
    with LiveServer() as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=STEP) as http:
            r = await http.get("/api/me", headers={**acme.headers("alice"), "X-Request-ID": "text-mode-1"})
            assert r.status_code == 200 and r.headers["x-request-id"] == "text-mode-1"
            await output_holds(live, lambda lines: any("(request text-mode-1" in line for line in lines))
    request_line = next(line for line in live.lines if "(request text-mode-1" in line)
    assert "GET /api/me 200" in request_line and f"company {acme.company_id}" in request_line
    assert not any(line.startswith("{") for line in live.lines), live.output()


async def test_workers_log_json_lines(acme: Tenant) -> None:
    prefix = f"chatstream-test-{uuid.uuid4().hex[:12]}:"
    env = {"CHATSTREAM_LOG_FORMAT": "json", "REDIS_URL": REDIS_URL, "CHATSTREAM_REDIS_PREFIX": prefix}
    try:
        with LiveServer(env, ["--workers", "2"]) as live:
            # uvicorn's parent says "running" before its workers are up: wait for both.
            await output_holds(live, lambda lines: sum("Application startup complete" in line for line in lines) >= 2)
            async with httpx.AsyncClient(base_url=live.url, timeout=STEP) as http:
                for n in range(6):
                    r = await http.get("/api/me", headers={**acme.headers("alice"), "X-Request-ID": f"worker-req-{n}"})
                    assert r.status_code == 200
            await output_holds(live, lambda lines: sum('"worker-req-' in line for line in lines) >= 6)
    finally:
        with redis.Redis.from_url(REDIS_URL) as client:
            keys = list(client.scan_iter(match=f"{prefix}*"))
            if keys:
                client.unlink(*keys)
    lines = parsed(live.lines)
    workers = {line["pid"] for line in lines if "Application startup complete" in line["message"]}
    assert len(workers) == 2, workers
    served = [line for line in lines if str(line.get("requestId", "")).startswith("worker-req-")]
    assert len(served) == 6 and {line["pid"] for line in served} <= workers
    parent = [line for line in lines if line["message"].startswith("Started parent process")]
    assert parent and parent[0]["pid"] not in workers
