"""`GET /api/conversations/{id}/stream` on the wire: a real `chatstream serve` (uvicorn)
on a free port, real sockets, real disconnects.

What is checked here is what only a real server shows: headers flushed before the first
token, the byte-level framing, `: ping` comments on an idle stream, the response ending
after the terminal event, a dropped TCP connection counting as a reader leaving
(disconnect grace, partial policy), resume by `Last-Event-ID` / `?after=` exactly once,
several readers of one answer, a reader that reads nothing for a while, a reader older
than the retained window or than the log itself, and stopping the server under a reader.

Nothing waits by sleeping: tests wait on the stream's own data (every read is bounded by
`STEP` seconds so a broken server fails the test instead of hanging it); the only polls
are of `GET /api/generations/{id}`, in a bounded loop.
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from httpx_sse import EventSource, aconnect_sse

from tests.factories import Tenant
from tests.integration.live_server import LiveServer
from tests.integration.wire_api import make_agent, messages_of, new_conversation, post_message, text_of
from tests.parts_support import (
    PART_EVENTS,
    answer_of,
    echo_parts,
    echo_text,
    folded,
    in_tool_call,
    kinds,
    make_parts_agent,
    parts_of,
)

pytestmark = pytest.mark.anyio

STEP = 10.0  # the longest any single read (or settle poll) may take before the test fails
TERMINAL = ("done", "cancelled", "error")
SSE_HEADERS = {"Accept": "text/event-stream"}


# -- the server and a client of it ---------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    """One real server for the module, on the run's PostgreSQL database, pinging idle streams every 0.3 s."""
    # 36 streams of one key at once in test_first_readers_arriving_together_share_one_answer.
    with LiveServer({"CHATSTREAM_SSE_PING_INTERVAL": "0.3", "CHATSTREAM_MAX_STREAMS_PER_KEY": "50"}) as live:
        yield live


@pytest.fixture(autouse=True)
def server_logs_are_clean(server: LiveServer) -> Iterator[None]:
    """Whatever a test does to the wire, no server logs a traceback or an error. (A line
    printed late may show up under the next test.)"""
    starts = {id(live): len(live.lines) for live in LiveServer.running}
    yield
    for live in LiveServer.running:
        new = live.lines[starts.get(id(live), 0) :]
        bad = [line for line in new if "Traceback" in line or " ERROR " in line or line.startswith("ERROR")]
        assert not bad, f"the server at {live.url} logged errors:\n" + "".join(new)


@pytest.fixture
async def http(server: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=STEP) as client:
        yield client


# -- setup through the API -----------------------------------------------------------------


async def cancel(http: httpx.AsyncClient, tenant: Tenant, generation_id: str) -> httpx.Response:
    return await http.post(f"/api/generations/{generation_id}/cancel", headers=tenant.headers("alice"))


async def settled(http: httpx.AsyncClient, tenant: Tenant, generation_id: str, who: str = "alice") -> dict[str, Any]:
    """The generation once it is no longer `running` (bounded poll: there is no event to wait on)."""
    with anyio.fail_after(STEP):
        while True:
            response = await http.get(f"/api/generations/{generation_id}", headers=tenant.headers(who))
            assert response.status_code == 200, response.text
            body: dict[str, Any] = response.json()
            if body["status"] != "running":
                return body
            await anyio.sleep(0.05)


def words(n: int, tag: str = "w") -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def stream_url(conversation_id: str) -> str:
    return f"/api/conversations/{conversation_id}/stream"


# -- reading events ------------------------------------------------------------------------


class Events:
    """Decoded events of one SSE response (via httpx-sse), each checked as it arrives:
    `event:` is the data's `type`, `id:` is `<generationId>.<seq>`, the conversation is ours."""

    def __init__(self, source: EventSource, conversation_id: str) -> None:
        self.response = source.response
        self._events = source.aiter_sse()
        self.conversation_id = conversation_id

    async def next(self) -> dict[str, Any] | None:
        """The next event, or None when the response has ended."""
        with anyio.fail_after(STEP):
            while True:
                try:
                    sse = await anext(self._events)
                except StopAsyncIteration:
                    return None
                # httpx-sse 0.4 dispatches an empty event for a comment-only block (`: ping`) once
                # an `id:` was seen (florimondmanca/httpx-sse#35); the SSE spec (and a browser)
                # dispatches nothing without `data:`.
                if sse.data or sse.event != "message":
                    break
        data: dict[str, Any] = json.loads(sse.data)
        assert sse.event == data["type"], (sse.event, data)
        assert sse.id == f"{data['generationId']}.{data['seq']}", (sse.id, data)
        assert data["conversationId"] == self.conversation_id
        return data

    async def until(self, match: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """Read until an event that matches (the last one returned) has come; returns every event read."""
        got: list[dict[str, Any]] = []
        while not got or not match(got[-1]):
            event = await self.next()
            assert event is not None and event["type"] not in TERMINAL, [*got, event]
            got.append(event)
        return got

    async def until_tokens(self, count: int) -> list[dict[str, Any]]:
        """Read until `count` token events have come; returns every event read."""
        got: list[dict[str, Any]] = []
        while sum(e["type"] == "token" for e in got) < count:
            event = await self.next()
            assert event is not None and event["type"] not in TERMINAL, [*got, event]
            got.append(event)
        return got

    async def to_end(self) -> list[dict[str, Any]]:
        """Read to the terminal event, then check that the response ends right after it."""
        got: list[dict[str, Any]] = []
        while True:
            event = await self.next()
            assert event is not None, f"the response ended without a terminal event: {got}"
            got.append(event)
            if event["type"] in TERMINAL:
                break
        assert await self.next() is None, "the response went on after the terminal event"
        return got

    async def close(self) -> None:
        await self._events.aclose()


@asynccontextmanager
async def events_of(
    http: httpx.AsyncClient,
    conversation_id: str,
    headers: dict[str, str],
    *,
    last_event_id: str | None = None,
    after: str | None = None,
) -> AsyncIterator[Events]:
    """An open stream of the conversation (status 200 checked); leaving the block drops the connection."""
    sent = dict(headers)
    if last_event_id is not None:
        sent["Last-Event-ID"] = last_event_id
    params = {"after": after} if after is not None else None
    with anyio.fail_after(STEP):
        opened = aconnect_sse(http, "GET", stream_url(conversation_id), headers=sent, params=params)
        source = await opened.__aenter__()
    try:
        assert source.response.status_code == 200, (source.response.status_code, await source.response.aread())
        events = Events(source, conversation_id)
        try:
            yield events
        finally:
            await events.close()
    finally:
        await opened.__aexit__(None, None, None)


class RawSSE:
    """The response body as bytes, lines and frames (blocks ended by a blank line), for framing checks."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._chunks = response.aiter_bytes()
        self._buffer = b""
        self.received = b""

    async def _more(self) -> bool:
        with anyio.fail_after(STEP):
            try:
                chunk = await anext(self._chunks)
            except StopAsyncIteration:
                return False
        self._buffer += chunk
        self.received += chunk
        return True

    async def prefix(self, size: int) -> bytes:
        """The first `size` bytes of the body (waits for them)."""
        while len(self.received) < size and await self._more():
            pass
        return self.received[:size]

    async def line(self) -> str | None:
        """The next line without its `\\n`; None at the end of the body."""
        while b"\n" not in self._buffer:
            if not await self._more():
                assert self._buffer == b"", f"the body ended inside a line: {self._buffer!r}"
                return None
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    async def frame(self) -> list[str] | None:
        """The lines of the next frame; None at the end of the body (never inside a frame)."""
        lines: list[str] = []
        while True:
            line = await self.line()
            if line is None:
                assert not lines, f"the body ended inside a frame: {lines}"
                return None
            if line == "":
                if lines:
                    return lines
                continue
            lines.append(line)


def parse_event_frame(frame: list[str]) -> tuple[str, str, dict[str, Any]]:
    """An event frame is exactly `event: <type>`, `id: <cursor>`, `data: <one line of json>`."""
    assert len(frame) == 3, frame
    event, cursor, data = frame
    assert event.startswith("event: ") and cursor.startswith("id: ") and data.startswith("data: "), frame
    return event[len("event: ") :], cursor[len("id: ") :], json.loads(data[len("data: ") :])


def is_comment(frame: list[str]) -> bool:
    return all(line.startswith(":") for line in frame)


@asynccontextmanager
async def raw_stream(http: httpx.AsyncClient, conversation_id: str, headers: dict[str, str]) -> AsyncIterator[RawSSE]:
    """The stream as raw bytes; opening it (the headers) must not take long, whatever the agent does."""
    request = http.build_request("GET", stream_url(conversation_id), headers={**SSE_HEADERS, **headers})
    with anyio.fail_after(5):
        response = await http.send(request, stream=True)
    try:
        assert response.status_code == 200, response.status_code
        yield RawSSE(response)
    finally:
        await response.aclose()


# -- checks --------------------------------------------------------------------------------


def seqs(events: list[dict[str, Any]]) -> list[int]:
    return [e["seq"] for e in events]


def assert_contiguous(events: list[dict[str, Any]], first: int) -> None:
    """Every seq from `first` on, once, in order: nothing repeated, nothing skipped."""
    assert seqs(events) == list(range(first, first + len(events))), seqs(events)


def assert_whole_answer(events: list[dict[str, Any]]) -> None:
    """A reader that joined without a cursor: from `start` (seq 1) or from a snapshot, contiguous, to the end."""
    assert events[0]["type"] in ("start", "snapshot"), events[0]
    if events[0]["type"] == "start":
        assert events[0]["seq"] == 1
    assert_contiguous(events, events[0]["seq"])
    assert events[-1]["type"] in TERMINAL
    assert all(e["type"] not in TERMINAL for e in events[:-1])


# -- 1. headers flushed before the first token ---------------------------------------------


async def test_headers_and_ok_are_flushed_before_the_first_token(http: httpx.AsyncClient, acme: Tenant) -> None:
    """Rule: the origin's SSE headers (`text/event-stream`, `Cache-Control: no-cache`,
    `Connection: keep-alive`, `X-Accel-Buffering: no`) and a first `:ok` comment reach the
    client at once, while the agent has produced no token (its first word is a minute
    away); a cancel ends the stream with `cancelled`, and the response ends after it."""
    agent = await make_agent(acme, 60)
    conversation = await new_conversation(http, acme, agent)
    generation = (await post_message(http, acme, conversation, "nothing for a minute"))["generation"]["id"]

    async with raw_stream(http, conversation, acme.headers("alice")) as raw:
        headers = raw.response.headers
        assert headers["content-type"].startswith("text/event-stream")
        assert headers["cache-control"] == "no-cache"
        assert headers["x-accel-buffering"] == "no"
        assert headers.get("connection") == "keep-alive", dict(headers)
        assert await raw.prefix(5) == b":ok\n\n"
        assert await raw.frame() == [":ok"]
        state = (await http.get(f"/api/generations/{generation}", headers=acme.headers("alice"))).json()
        assert state["status"] == "running" and state["ttftMs"] is None  # still no token

        cancelled = await cancel(http, acme, generation)
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        events = []
        while (frame := await raw.frame()) is not None:
            if not is_comment(frame):
                events.append(parse_event_frame(frame))
    assert [kind for kind, _, _ in events] == ["start", "cancelled"]
    assert events[-1][2]["reason"] == "user" and events[-1][2]["messageId"] is None


# -- 2. framing ------------------------------------------------------------------------------


async def test_framing_of_a_whole_answer(http: httpx.AsyncClient, acme: Tenant) -> None:
    """Rule: each event is `event: <type>` / `id: <generationId>.<seq>` / `data: <json>` and a
    blank line; seq runs 1..n without a gap, `start` first, `done` last; the tokens
    concatenate to the stored agent message named by `done.messageId`; a newline or
    non-ASCII text inside a token does not break a frame; the response ends after `done`."""
    agent = await make_agent(acme, 0)
    conversation = await new_conversation(http, acme, agent)
    content = 'Line one  of the answer\nline two: ünïcödé, 🚀 and "quotes"\tdata: not a field\n\nid: 7 event: x'
    await post_message(http, acme, conversation, content, reply=False)

    frames: list[list[str]] = []
    async with raw_stream(http, conversation, acme.headers("alice")) as raw:
        assert await raw.frame() == [":ok"]
        while (frame := await raw.frame()) is not None:
            frames.append(frame)
        assert raw.received.endswith(b"\n\n")
    events = []
    for kind, cursor, data in (parse_event_frame(f) for f in frames if not is_comment(f)):
        assert kind == data["type"]
        assert cursor == f"{data['generationId']}.{data['seq']}"
        assert data["conversationId"] == conversation
        events.append(data)
    assert_contiguous(events, 1)
    assert events[0]["type"] == "start" and events[-1]["type"] == "done"
    assert {e["type"] for e in events[1:-1]} == {"token"}
    assert len({e["generationId"] for e in events}) == 1
    done = events[-1]
    assert done["tokenCount"] == len(events) - 2 and done["finishReason"] == "stop"
    assert text_of(events) == content

    stored = (await messages_of(http, acme, conversation))[-1]
    assert stored["id"] == done["messageId"]
    assert stored["role"] == "agent" and stored["status"] == "complete"
    assert stored["content"] == content and stored["generationId"] == done["generationId"]


# -- 3. pings ----------------------------------------------------------------------------------


async def test_idle_stream_gets_ping_comments(http: httpx.AsyncClient, acme: Tenant) -> None:
    """Rule: an idle stream gets `: ping` comment frames (every CHATSTREAM_SSE_PING_INTERVAL
    seconds, 0.3 here), which keep proxies from timing it out and carry no event."""
    agent = await make_agent(acme, 60)
    conversation = await new_conversation(http, acme, agent)
    generation = (await post_message(http, acme, conversation, "idle"))["generation"]["id"]

    async with raw_stream(http, conversation, acme.headers("alice")) as raw:
        pings = 0
        while pings < 2:
            frame = await raw.frame()
            assert frame is not None
            if frame == [": ping"]:
                pings += 1
            else:
                assert frame == [":ok"] or parse_event_frame(frame)[0] == "start", frame
        assert (await cancel(http, acme, generation)).status_code == 200
        kinds = []
        while (frame := await raw.frame()) is not None:
            if not is_comment(frame):
                kinds.append(parse_event_frame(frame)[0])
    assert kinds == ["cancelled"]


# -- 4. 204 and the origin's start-on-read -------------------------------------------------------


async def test_nothing_to_stream_is_204_and_an_unanswered_message_is_answered(
    http: httpx.AsyncClient, acme: Tenant
) -> None:
    """Rule: with nothing to stream the answer is 204 with no body (which stops a browser's
    EventSource): a conversation without messages, one without an agent, one whose answer
    is done. A last user message posted with `reply: false` is answered by the first stream
    reader (the origin's behaviour): a generation replying to it, streamed to `done`."""
    agent = await make_agent(acme, 0)
    conversation = await new_conversation(http, acme, agent)
    headers = {**SSE_HEADERS, **acme.headers("alice")}
    with anyio.fail_after(STEP):
        empty = await http.get(stream_url(conversation), headers=headers)
    assert empty.status_code == 204 and empty.content == b""

    no_agent = await new_conversation(http, acme)
    await post_message(http, acme, no_agent, "anyone there?")
    with anyio.fail_after(STEP):
        assert (await http.get(stream_url(no_agent), headers=headers)).status_code == 204

    posted = await post_message(http, acme, conversation, "echo me back please", reply=False)
    assert posted["generation"] is None
    async with events_of(http, conversation, acme.headers("alice")) as stream:
        events = await stream.to_end()
    assert_whole_answer(events)
    assert events[0]["type"] == "start" and events[0]["replyToId"] == posted["message"]["id"]
    assert events[-1]["type"] == "done" and text_of(events) == "echo me back please"
    generation = await settled(http, acme, events[0]["generationId"])
    assert generation["status"] == "done" and generation["replyToId"] == posted["message"]["id"]

    with anyio.fail_after(STEP):
        after_done = await http.get(stream_url(conversation), headers=headers)
    assert after_done.status_code == 204 and after_done.content == b""


# -- 5. auth ---------------------------------------------------------------------------------


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """A JSON error in the project's shape, not a stream."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert set(body) == {"error", "code", "details"} and isinstance(body["error"], str) and body["error"]
    if code is not None:
        assert body["code"] == code, body
    return body


async def test_stream_auth_and_scoping(
    http: httpx.AsyncClient, server: LiveServer, acme: Tenant, globex: Tenant
) -> None:
    """Rule: the stream takes a Bearer key or the session cookie (a browser's EventSource can
    send only the cookie); no credentials is a 401 JSON error, never a stream; another
    company's or another member's conversation is 404; an admin reaches the company's."""
    agent = await make_agent(acme, 0)
    conversation = await new_conversation(http, acme, agent)
    url = stream_url(conversation)

    await post_message(http, acme, conversation, "by bearer", reply=False)
    async with events_of(http, conversation, acme.headers("alice")) as stream:
        assert text_of(await stream.to_end()) == "by bearer"

    await post_message(http, acme, conversation, "by cookie", reply=False)
    async with httpx.AsyncClient(base_url=server.url, timeout=STEP) as browser:
        login = await browser.post("/api/session", json={"key": acme.tokens["alice"]})
        assert login.status_code == 200 and browser.cookies
        async with events_of(browser, conversation, {}) as stream:
            assert text_of(await stream.to_end()) == "by cookie"

    with anyio.fail_after(STEP):
        assert_error(await http.get(url, headers=SSE_HEADERS), 401)
        assert_error(await http.get(url, headers={**SSE_HEADERS, "Authorization": "Bearer cs_nope"}), 401)
        assert_error(await http.get(url, headers={**SSE_HEADERS, **globex.headers("admin")}), 404, "not_found")
        assert_error(await http.get(url, headers={**SSE_HEADERS, **acme.headers("bob")}), 404, "not_found")
        assert (await http.get(url, headers={**SSE_HEADERS, **acme.headers("admin")})).status_code == 204


@pytest.mark.parametrize(
    "cursor",
    ["garbage", "not-a-uuid.3", "00000000-0000-0000-0000-000000000000", "{gen}", "{gen}.-1", "{gen}.x"],
)
@pytest.mark.parametrize("via", ["Last-Event-ID", "after"])
async def test_malformed_cursor_is_400(http: httpx.AsyncClient, acme: Tenant, via: str, cursor: str) -> None:
    """Rule: a cursor that is not `<generationId>.<seq>`, from `Last-Event-ID` or `?after=`, is a
    400 JSON error with code `invalid_cursor` naming where it came from — not a stream."""
    agent = await make_agent(acme, 0)
    conversation = await new_conversation(http, acme, agent)
    generation = (await post_message(http, acme, conversation, "hi"))["generation"]["id"]
    value = cursor.replace("{gen}", generation)
    headers = {**SSE_HEADERS, **acme.headers("alice")}
    with anyio.fail_after(STEP):
        if via == "after":
            response = await http.get(stream_url(conversation), headers=headers, params={"after": value})
        else:
            response = await http.get(stream_url(conversation), headers={**headers, "Last-Event-ID": value})
    body = assert_error(response, 400, "invalid_cursor")
    assert body["details"][0]["field"] == via
    await settled(http, acme, generation)


async def test_cursor_of_another_conversation_is_400(http: httpx.AsyncClient, acme: Tenant, globex: Tenant) -> None:
    """Rule: a well-formed cursor of a generation of another conversation (the caller's own,
    or another company's) or of no generation at all is a 400 `invalid_cursor`: a stream
    never crosses conversations."""
    agent = await make_agent(acme, 0)
    mine = await new_conversation(http, acme, agent)
    other = await new_conversation(http, acme, agent)
    other_generation = (await post_message(http, acme, other, "elsewhere"))["generation"]["id"]
    globex_agent = await make_agent(globex, 0)
    foreign = await new_conversation(http, globex, globex_agent, who="admin")
    foreign_generation = (await post_message(http, globex, foreign, "far away", who="admin"))["generation"]["id"]
    headers = {**SSE_HEADERS, **acme.headers("alice")}
    for cursor in (f"{other_generation}.1", f"{foreign_generation}.1", "00000000-0000-0000-0000-000000000000.1"):
        with anyio.fail_after(STEP):
            by_header = await http.get(stream_url(mine), headers={**headers, "Last-Event-ID": cursor})
            by_query = await http.get(stream_url(mine), headers=headers, params={"after": cursor})
        assert_error(by_header, 400, "invalid_cursor")
        assert_error(by_query, 400, "invalid_cursor")
    await settled(http, acme, other_generation)
    await settled(http, globex, foreign_generation, who="admin")


# -- 6. resume over a real socket ----------------------------------------------------------------


@pytest.mark.parametrize("via", ["Last-Event-ID", "after"])
async def test_resume_after_a_dropped_connection(http: httpx.AsyncClient, acme: Tenant, via: str) -> None:
    """Rule: a reader that drops its connection and comes back with the last id it saw gets
    every later event exactly once (no seq repeated or skipped) and the terminal event;
    coming back after the answer ended with a cursor from the middle gives the missing
    events from the retained log, identical to the live ones, then `done`; coming back
    with the terminal event's id is 204 (nothing more: EventSource stops)."""
    agent = await make_agent(acme, 0.03)
    conversation = await new_conversation(http, acme, agent)
    content = words(25)
    generation = (await post_message(http, acme, conversation, content, disconnectGrace=30))["generation"]["id"]

    async with events_of(http, conversation, acme.headers("alice")) as stream:
        first = await stream.until_tokens(5)
    assert_contiguous(first, 1)
    last_seen = f"{generation}.{first[-1]['seq']}"

    resume = {("last_event_id" if via == "Last-Event-ID" else "after"): last_seen}
    async with events_of(http, conversation, acme.headers("alice"), **resume) as stream:
        rest = await stream.to_end()
    everything = first + rest
    assert_contiguous(everything, 1)
    assert {e["type"] for e in rest[:-1]} == {"token"} and rest[-1]["type"] == "done"
    assert text_of(everything) == content
    assert (await settled(http, acme, generation))["status"] == "done"

    mid = {("last_event_id" if via == "Last-Event-ID" else "after"): f"{generation}.3"}
    async with events_of(http, conversation, acme.headers("alice"), **mid) as stream:
        tail = await stream.to_end()
    assert tail == everything[3:]

    end = f"{generation}.{everything[-1]['seq']}"
    headers = {**SSE_HEADERS, **acme.headers("alice")}
    with anyio.fail_after(STEP):
        if via == "after":
            response = await http.get(stream_url(conversation), headers=headers, params={"after": end})
        else:
            response = await http.get(stream_url(conversation), headers={**headers, "Last-Event-ID": end})
    assert response.status_code == 204


# -- 7. a second reader ----------------------------------------------------------------------------


async def test_second_reader_joining_mid_stream(http: httpx.AsyncClient, acme: Tenant) -> None:
    """Rule: a reader joining a running answer without a cursor gets it from its start (seq 1,
    or a snapshot) and follows it live; both readers end with the same `done` and the same text."""
    agent = await make_agent(acme, 0.02)
    conversation = await new_conversation(http, acme, agent)
    content = words(30)
    await post_message(http, acme, conversation, content, disconnectGrace=30)

    async with events_of(http, conversation, acme.headers("alice")) as reader_a:
        a_events = await reader_a.until_tokens(3)
        async with events_of(http, conversation, acme.headers("alice")) as reader_b:
            b_events = await reader_b.to_end()
        a_events += await reader_a.to_end()
    assert_contiguous(a_events, 1)
    assert_whole_answer(a_events)
    assert_whole_answer(b_events)
    assert a_events[-1]["type"] == "done" and b_events[-1] == a_events[-1]
    assert text_of(a_events) == text_of(b_events) == content


# -- 8. policies on a real disconnect ---------------------------------------------------------------


async def test_disconnect_with_no_grace_cancels_and_discards(http: httpx.AsyncClient, acme: Tenant) -> None:
    """Rule (origin parity): with `disconnectGrace: 0` and `partial: discard`, the only reader
    closing its connection cancels the answer (reason `disconnected`) and nothing of it is
    stored; a reader coming back with its cursor learns that ending."""
    agent = await make_agent(acme, 0.05)
    conversation = await new_conversation(http, acme, agent)
    posted = await post_message(http, acme, conversation, words(40), disconnectGrace=0, partial="discard")
    generation = posted["generation"]["id"]

    async with events_of(http, conversation, acme.headers("alice")) as stream:
        got = await stream.until_tokens(1)

    final = await settled(http, acme, generation)
    assert final["status"] == "cancelled" and final["error"] == "disconnected"
    assert final["resultMessageId"] is None
    assert final["tokenCount"] < 40
    assert [m["id"] for m in await messages_of(http, acme, conversation)] == [posted["message"]["id"]]

    async with events_of(
        http, conversation, acme.headers("alice"), last_event_id=f"{generation}.{got[-1]['seq']}"
    ) as s:
        tail = await s.to_end()
    assert_contiguous(got + tail, 1)
    assert tail[-1]["type"] == "cancelled"
    assert tail[-1]["reason"] == "disconnected" and tail[-1]["messageId"] is None


async def test_reader_back_within_grace_keeps_the_answer(http: httpx.AsyncClient, acme: Tenant) -> None:
    """Rule: with a disconnect grace, a reader that drops and comes back (Last-Event-ID)
    within it keeps the same generation going: it resumes exactly once and reaches `done`."""
    agent = await make_agent(acme, 0.03)
    conversation = await new_conversation(http, acme, agent)
    content = words(25)
    generation = (await post_message(http, acme, conversation, content, disconnectGrace=5))["generation"]["id"]

    async with events_of(http, conversation, acme.headers("alice")) as stream:
        first = await stream.until_tokens(3)
    async with events_of(
        http, conversation, acme.headers("alice"), last_event_id=f"{generation}.{first[-1]['seq']}"
    ) as stream:
        rest = await stream.to_end()
    assert_contiguous(first + rest, 1)
    assert rest[-1]["type"] == "done" and rest[-1]["generationId"] == generation
    assert text_of(first + rest) == content
    final = await settled(http, acme, generation)
    assert final["status"] == "done" and final["resultMessageId"] == rest[-1]["messageId"]


async def test_cancel_with_partial_keep_stores_what_was_streamed(http: httpx.AsyncClient, acme: Tenant) -> None:
    """Rule: cancelling mid-answer with `partial: keep` stores exactly the text streamed up to
    the cancel as a `partial` agent message, named by the `cancelled` event, which is the
    last event of the stream."""
    agent = await make_agent(acme, 0.05)
    conversation = await new_conversation(http, acme, agent)
    posted = await post_message(http, acme, conversation, words(60), partial="keep", disconnectGrace=30)
    generation = posted["generation"]["id"]

    async with events_of(http, conversation, acme.headers("alice")) as stream:
        events = await stream.until_tokens(3)
        response = await cancel(http, acme, generation)
        assert response.status_code == 200
        state = response.json()
        assert state["status"] == "cancelled" and state["error"] == "user"
        events += await stream.to_end()
    assert_contiguous(events, 1)
    cancelled = events[-1]
    assert cancelled["type"] == "cancelled" and cancelled["reason"] == "user"
    assert cancelled["messageId"] is not None and cancelled["messageId"] == state["resultMessageId"]
    text = text_of(events)
    assert state["tokenCount"] == sum(e["type"] == "token" for e in events)

    stored = {m["id"]: m for m in await messages_of(http, acme, conversation)}
    message = stored[cancelled["messageId"]]
    assert message["role"] == "agent" and message["status"] == "partial"
    assert message["content"] == text and message["generationId"] == generation
    assert posted["message"]["content"].startswith(text.lstrip())


# -- 9. a slow reader ----------------------------------------------------------------------------------


async def test_slow_reader_gets_everything_once(http: httpx.AsyncClient, acme: Tenant) -> None:
    """Rule: a reader that reads nothing while another one follows the whole answer neither
    slows it nor loses anything: afterwards it reads every event (or a snapshot and the
    rest) exactly once, ending with the same `done` and the same text."""
    agent = await make_agent(acme, 0.01)
    conversation = await new_conversation(http, acme, agent)
    content = words(200)
    generation = (await post_message(http, acme, conversation, content, disconnectGrace=30))["generation"]["id"]

    async with events_of(http, conversation, acme.headers("alice")) as slow:
        async with events_of(http, conversation, acme.headers("alice")) as fast:
            b_events = await fast.to_end()
        assert (await settled(http, acme, generation))["status"] == "done"
        a_events = await slow.to_end()
    assert_whole_answer(b_events)
    assert_whole_answer(a_events)
    assert a_events[-1]["type"] == "done" and a_events[-1] == b_events[-1]
    assert text_of(a_events) == text_of(b_events) == content


# -- 10. cancel is idempotent -------------------------------------------------------------------------


async def test_cancel_is_idempotent(http: httpx.AsyncClient, acme: Tenant) -> None:
    """Rule: cancelling a finished answer is 200 with its final state, unchanged; cancelling
    again (or twice at once) gives the same state."""
    agent = await make_agent(acme, 0)
    conversation = await new_conversation(http, acme, agent)
    await post_message(http, acme, conversation, "finish first", reply=False)
    async with events_of(http, conversation, acme.headers("alice")) as stream:
        events = await stream.to_end()
    generation = events[0]["generationId"]
    before = (await http.get(f"/api/generations/{generation}", headers=acme.headers("alice"))).json()
    assert before["status"] == "done"
    first, second = await cancel(http, acme, generation), await cancel(http, acme, generation)
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json() == before

    slow = await make_agent(acme, 60)
    other = await new_conversation(http, acme, slow)
    running = (await post_message(http, acme, other, "never finishes"))["generation"]["id"]
    results: list[httpx.Response] = []

    async def cancel_into(results: list[httpx.Response]) -> None:
        results.append(await cancel(http, acme, running))

    with anyio.fail_after(STEP):
        async with anyio.create_task_group() as group:
            group.start_soon(cancel_into, results)
            group.start_soon(cancel_into, results)
    again = await cancel(http, acme, running)
    assert [r.status_code for r in results] == [200, 200] and again.status_code == 200
    assert results[0].json() == results[1].json() == again.json()
    assert again.json()["status"] == "cancelled" and again.json()["error"] == "user"


# -- more readers, more answers ------------------------------------------------------------------------


async def test_one_of_two_readers_leaving_does_not_cancel(http: httpx.AsyncClient, acme: Tenant) -> None:
    """Rule: `disconnectGrace: 0` cancels when the LAST reader leaves, not any reader: with two
    readers, one closing its connection leaves the answer running to `done` for the other."""
    agent = await make_agent(acme, 0.03)
    conversation = await new_conversation(http, acme, agent)
    content = words(20)
    posted = await post_message(http, acme, conversation, content, disconnectGrace=0, partial="discard")
    async with events_of(http, conversation, acme.headers("alice")) as stays:
        events = await stays.until_tokens(1)
        async with events_of(http, conversation, acme.headers("alice")) as leaves:
            await leaves.until_tokens(1)
        events += await stays.to_end()
    assert_contiguous(events, 1)
    assert events[-1]["type"] == "done" and text_of(events) == content
    assert (await settled(http, acme, posted["generation"]["id"]))["status"] == "done"


async def test_first_readers_arriving_together_share_one_answer(http: httpx.AsyncClient, acme: Tenant) -> None:
    """Rule: one running generation per conversation: several readers arriving at once for an
    unanswered user message start ONE answer and all follow it from its start to `done`
    (none is told the answer's events are unavailable); one agent message is stored.
    Several conversations at once, since the readers race each other."""
    agent = await make_agent(acme, 0.05)
    content = words(8)

    async def readers_of_one_conversation(readers: int) -> None:
        conversation = await new_conversation(http, acme, agent)
        await post_message(http, acme, conversation, content, reply=False)
        results: list[list[dict[str, Any]]] = []

        async def read_all() -> None:
            async with events_of(http, conversation, acme.headers("alice")) as stream:
                results.append(await stream.to_end())

        async with anyio.create_task_group() as group:
            for _ in range(readers):
                group.start_soon(read_all)
        assert len(results) == readers
        assert len({r[0]["generationId"] for r in results}) == 1
        for events in results:
            assert_whole_answer(events)
            assert events[-1] == results[0][-1] and text_of(events) == content
        agent_messages = [m for m in await messages_of(http, acme, conversation) if m["role"] == "agent"]
        assert [m["id"] for m in agent_messages] == [results[0][-1]["messageId"]]

    async with anyio.create_task_group() as group:
        for _ in range(6):
            group.start_soon(readers_of_one_conversation, 6)


async def test_reconnect_after_done_follows_the_next_answer(http: httpx.AsyncClient, acme: Tenant) -> None:
    """Rule: a browser's EventSource reconnects after the response ends, sending the last id
    it saw (the previous answer's `done`): it gets the answer running now, from its start."""
    agent = await make_agent(acme, 0.02)
    conversation = await new_conversation(http, acme, agent)
    await post_message(http, acme, conversation, "first answer", reply=False)
    async with events_of(http, conversation, acme.headers("alice")) as stream:
        first = await stream.to_end()
    last_id = f"{first[-1]['generationId']}.{first[-1]['seq']}"
    # Long enough (4 s) to be still running when the reconnect comes, even on a loaded machine
    # (10 words, 0.2 s, had ended first once: the server then rightly answers 204).
    second = (await post_message(http, acme, conversation, words(200), disconnectGrace=30))["generation"]["id"]
    async with events_of(http, conversation, acme.headers("alice"), last_event_id=last_id) as stream:
        events = await stream.to_end()
    assert {e["generationId"] for e in events} == {second}
    assert_whole_answer(events)
    assert events[-1]["type"] == "done" and text_of(events) == words(200)


# -- beyond the retained log: a small window, an expired log -------------------------------------------


@pytest.fixture(scope="module")
def small_log_server() -> Iterator[LiveServer]:
    """A second server on the same database that keeps 5 events per answer and drops a log as
    soon as its answer ends, so that snapshots and the stored outcome are what readers get."""
    with LiveServer(
        {"CHATSTREAM_SSE_PING_INTERVAL": "0.3", "CHATSTREAM_LOG_RETAIN": "5", "CHATSTREAM_LOG_TTL": "0"}
    ) as live:
        yield live


@pytest.fixture
async def small_http(small_log_server: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=small_log_server.url, timeout=STEP) as client:
        yield client


def echo_pieces(content: str) -> list[str]:
    """The token texts the echo adapter makes of `content` (a word with the whitespace before it)."""
    return re.findall(r"\s*\S+", content)


async def test_reader_older_than_the_window_gets_a_snapshot(small_http: httpx.AsyncClient, acme: Tenant) -> None:
    """Rule: a reader whose cursor fell out of the retained window gets one `snapshot` (the
    whole answer up to its seq) and then continues live, exactly once, to `done`."""
    agent = await make_agent(acme, 0.02)
    conversation = await new_conversation(small_http, acme, agent)
    content = words(30)
    generation = (await post_message(small_http, acme, conversation, content, disconnectGrace=30))["generation"]["id"]

    async with events_of(small_http, conversation, acme.headers("alice")) as stream:
        first = await stream.until_tokens(2)
    cursor = f"{generation}.{first[-1]['seq']}"
    async with events_of(small_http, conversation, acme.headers("alice")) as other:
        # Let the answer move well past the window (waiting on the other reader's data, not a clock).
        seen: list[dict[str, Any]] = []
        while not seen or seen[-1]["seq"] < first[-1]["seq"] + 10:
            event = await other.next()
            assert event is not None and event["type"] not in TERMINAL
            seen.append(event)
        async with events_of(small_http, conversation, acme.headers("alice"), last_event_id=cursor) as stream:
            rest = await stream.to_end()
        seen += await other.to_end()
    snapshot = rest[0]
    assert snapshot["type"] == "snapshot" and snapshot["seq"] > first[-1]["seq"] + 1
    assert snapshot["text"] == "".join(echo_pieces(content)[: snapshot["seq"] - 1])
    assert_contiguous(rest, snapshot["seq"])
    assert rest[-1]["type"] == "done" and text_of(rest) == content
    assert_whole_answer(seen)
    assert seen[-1] == rest[-1] and text_of(seen) == content


async def test_resume_after_the_log_expired_uses_the_stored_answer(small_http: httpx.AsyncClient, acme: Tenant) -> None:
    """Rule: resuming an answer that ended while the reader was away, after its log is gone,
    gives what the reader misses from the database: a `snapshot` of the stored answer (if it
    missed any of it) and the terminal event with the stored message — exactly once, with
    the seqs the live events had; a cursor at the end is 204."""
    agent = await make_agent(acme, 0.01)
    conversation = await new_conversation(small_http, acme, agent)
    content = words(20)
    generation = (await post_message(small_http, acme, conversation, content, disconnectGrace=30))["generation"]["id"]
    async with events_of(small_http, conversation, acme.headers("alice")) as stream:
        first = await stream.until_tokens(3)
    final = await settled(small_http, acme, generation)
    assert final["status"] == "done"
    end = final["tokenCount"] + 2

    async with events_of(
        small_http, conversation, acme.headers("alice"), after=f"{generation}.{first[-1]['seq']}"
    ) as s:
        rest = await s.to_end()
    assert [e["type"] for e in rest] == ["snapshot", "done"]
    assert seqs(rest) == [end - 1, end]
    assert rest[0]["text"] == content
    assert rest[1]["messageId"] == final["resultMessageId"] and rest[1]["tokenCount"] == final["tokenCount"]

    async with events_of(small_http, conversation, acme.headers("alice"), last_event_id=f"{generation}.{end - 1}") as s:
        assert await s.to_end() == [rest[1]]
    with anyio.fail_after(STEP):
        response = await small_http.get(
            stream_url(conversation), headers={**acme.headers("alice"), "Last-Event-ID": f"{generation}.{end}"}
        )
    assert response.status_code == 204


# -- answers of every part kind --------------------------------------------------------------------------

MIXED_CONTENT = "Grüße aus 日本 🚀 " + words(6)


def in_reasoning(event: dict[str, Any]) -> bool:
    """A piece of the reasoning (part 0 of the echo agent's `parts` answer)."""
    return bool(event["type"] == "part.delta" and event["part"] == 0)


def assert_mixed_answer(events: list[dict[str, Any]], stored: dict[str, Any], content: str, user: str) -> None:
    """`events` (from `start`, or a snapshot, to `done`) make the echo agent's `parts` answer to
    `content`: what they fold to is the stored message's parts, its content the text parts."""
    assert events[-1]["type"] == "done" and events[-1]["finishReason"] == "stop", events[-1]
    assert stored["id"] == events[-1]["messageId"] and stored["role"] == "agent" and stored["status"] == "complete"
    assert stored["content"] == echo_text(content) == text_of(events)
    assert answer_of(events) == parts_of(stored) == echo_parts(content, user)


@pytest.mark.parametrize("drop", ["in the reasoning", "in the tool call"])
async def test_a_mixed_answer_resumes_exactly_once(http: httpx.AsyncClient, acme: Tenant, drop: str) -> None:
    """Rule: an answer of every part kind (reasoning, text, a tool call whose arguments come in
    pieces, its result, data, more text) resumes like text: a reader dropped inside a part
    and back with `Last-Event-ID` gets every later event exactly once, to `done`; the parts
    it folds from what it got are the stored message's parts, its content the text parts."""
    agent = await make_parts_agent(acme, 0.01)
    conversation = await new_conversation(http, acme, agent)
    posted = await post_message(http, acme, conversation, MIXED_CONTENT, disconnectGrace=30)
    async with events_of(http, conversation, acme.headers("alice")) as stream:
        first = await stream.until(in_tool_call if drop == "in the tool call" else in_reasoning)
    cursor = f"{first[-1]['generationId']}.{first[-1]['seq']}"
    async with events_of(http, conversation, acme.headers("alice"), last_event_id=cursor) as stream:
        rest = await stream.to_end()
    whole = first + rest
    assert_whole_answer(whole)
    assert whole[0]["type"] == "start" and whole[0]["generationId"] == posted["generation"]["id"]
    assert kinds(whole) == {"start", "token", *PART_EVENTS, "done"}
    stored = (await messages_of(http, acme, conversation))[-1]
    assert_mixed_answer(whole, stored, MIXED_CONTENT, posted["message"]["id"])


async def test_reader_older_than_the_window_gets_every_part_in_its_snapshot(
    small_http: httpx.AsyncClient, acme: Tenant
) -> None:
    """Rule: a reader of an answer with parts whose cursor fell out of the retained window
    gets one `snapshot` with every part so far (the open ones `streaming`), exactly the
    answer another reader had folded up to that seq, then the rest exactly once."""
    agent = await make_parts_agent(acme, 0.02)
    conversation = await new_conversation(small_http, acme, agent)
    posted = await post_message(small_http, acme, conversation, MIXED_CONTENT, disconnectGrace=30)
    async with events_of(small_http, conversation, acme.headers("alice")) as stream:
        first = await stream.until(in_reasoning)
    cursor = f"{first[-1]['generationId']}.{first[-1]['seq']}"
    async with events_of(small_http, conversation, acme.headers("alice")) as other:
        # Well past the window (5 events): inside the tool call, waiting on the other reader's data.
        seen = await other.until(lambda e: in_tool_call(e) and e["seq"] > first[-1]["seq"] + 10)
        reached = seen[-1]["seq"]
        async with events_of(small_http, conversation, acme.headers("alice"), last_event_id=cursor) as stream:
            rest = await stream.to_end()
        seen += await other.to_end()
    snapshot = rest[0]
    assert snapshot["type"] == "snapshot" and snapshot["seq"] >= reached, (reached, snapshot)
    assert_contiguous(rest, snapshot["seq"])
    assert_whole_answer(seen)
    so_far = folded(e for e in seen if e["seq"] <= snapshot["seq"])
    assert parts_of(snapshot) == so_far.copy() and snapshot["text"] == so_far.text
    assert [p["kind"] for p in snapshot["parts"][:3]] == ["reasoning", "text", "tool_call"]
    assert snapshot["parts"][0]["state"] == "complete"  # the reasoning ended before the call
    stored = (await messages_of(small_http, acme, conversation))[-1]
    assert_mixed_answer(rest, stored, MIXED_CONTENT, posted["message"]["id"])
    assert_mixed_answer(seen, stored, MIXED_CONTENT, posted["message"]["id"])
    assert seen[-1] == rest[-1]


async def resume_from_the_database(
    http: httpx.AsyncClient, tenant: Tenant, conversation_id: str, cursor: str
) -> list[dict[str, Any]]:
    """The rest of an ended answer from `cursor`, once its log is gone (ttl 0): the log is
    dropped just after the terminal event, so a reader right after it may still get the log's
    snapshot, whose last text part is open (bounded poll: nothing tells the log was dropped)."""
    with anyio.fail_after(STEP):
        while True:
            async with events_of(http, conversation_id, tenant.headers("alice"), after=cursor) as stream:
                rest = await stream.to_end()
            if rest[0]["type"] != "snapshot" or all(p["state"] != "streaming" for p in rest[0]["parts"]):
                return rest
            await anyio.sleep(0.05)


async def test_resume_of_a_mixed_answer_after_the_log_expired_gets_the_stored_parts(
    small_http: httpx.AsyncClient, acme: Tenant
) -> None:
    """Rule: resuming an answer with parts after its log is gone gives a `snapshot` of the
    stored answer, every part of it (the tool call with its parsed arguments, its result,
    the data), then `done`, with the seqs the live events had; one event later, only `done`."""
    agent = await make_parts_agent(acme, 0.01)
    conversation = await new_conversation(small_http, acme, agent)
    posted = await post_message(small_http, acme, conversation, MIXED_CONTENT, disconnectGrace=30)
    generation = posted["generation"]["id"]
    async with events_of(small_http, conversation, acme.headers("alice")) as stream:
        first = await stream.until(in_tool_call)
    final = await settled(small_http, acme, generation)
    assert final["status"] == "done"
    end = final["chunkCount"] + 2

    rest = await resume_from_the_database(small_http, acme, conversation, f"{generation}.{first[-1]['seq']}")
    assert [e["type"] for e in rest] == ["snapshot", "done"] and seqs(rest) == [end - 1, end]
    stored = (await messages_of(small_http, acme, conversation))[-1]
    assert parts_of(rest[0]) == parts_of(stored) and rest[0]["text"] == stored["content"]
    assert_mixed_answer(rest, stored, MIXED_CONTENT, posted["message"]["id"])
    assert rest[1]["messageId"] == final["resultMessageId"] and rest[1]["tokenCount"] == final["tokenCount"]
    async with events_of(small_http, conversation, acme.headers("alice"), after=f"{generation}.{end - 1}") as s:
        assert await s.to_end() == [rest[1]]


# -- shutdown with a reader connected ---------------------------------------------------------------------


async def test_shutdown_ends_open_streams_with_cancelled(server: LiveServer, acme: Tenant) -> None:
    """Rule: stopping the server (SIGINT, as Ctrl+C or a process manager does) cancels every
    running answer with reason `shutdown`, a connected reader gets that `cancelled` event
    and its response ends, and the process exits promptly — an open stream must not hold
    the shutdown until the answer finishes by itself."""
    live = LiveServer({"CHATSTREAM_SSE_PING_INTERVAL": "0.3"}).start()
    try:
        async with httpx.AsyncClient(base_url=live.url, timeout=STEP) as http:
            agent = await make_agent(acme, 60)
            conversation = await new_conversation(http, acme, agent)
            generation = (await post_message(http, acme, conversation, "a long answer"))["generation"]["id"]
            async with events_of(http, conversation, acme.headers("alice")) as stream:
                assert (await stream.next() or {}).get("type") == "start"
                assert live.proc is not None
                live.proc.send_signal(signal.SIGINT)
                rest: list[dict[str, Any]] = []
                with anyio.move_on_after(3):
                    rest = await stream.to_end()
                assert rest, "3 s after SIGINT the stream is still open (pings only); server output:\n" + "".join(
                    live.lines[-5:]
                )
        assert [e["type"] for e in rest] == ["cancelled"] and rest[0]["reason"] == "shutdown"
        assert live.proc.wait(timeout=STEP) in (0, 130)  # exits by itself (130: re-raised SIGINT)
        assert "Traceback" not in live.output(), live.output()
    finally:
        live.stop()
    async with httpx.AsyncClient(base_url=server.url, timeout=STEP) as http:
        state = await settled(http, acme, generation)
    assert state["status"] == "cancelled" and state["error"] == "shutdown"
