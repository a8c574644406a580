"""The AI SDK route on the wire, read by the `ai` package's own client code.

A real `chatstream serve` on a free port; the client is tests/js/driver.mjs run by Node:
the package's `AbstractChat` + `DefaultChatTransport` (what `useChat` runs), with a fetch
that records every data frame and can cut the connection (a network error after N frames)
or press stop (our cancel after N frames). Checked: the UI message the package builds
equals the stored answer's parts mapped to UI parts; a dropped answer resumed through the
package's reconnect path has every part exactly once; 204 when nothing runs; stop is
`abort`; bad bodies, unknown and foreign conversations are errors in our shape. The
package also reads the view's chunks for event lists the echo agent cannot produce
(interleaved and invalid tool calls, snapshots).

Nothing sleeps: the driver reacts to the frames it reads; polls of `GET /api/generations/{id}`
are bounded loops. The Node packages come from `npm ci` (tests/js/package-lock.json).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from app.agents.schemas import AgentCreate
from app.agents.service import create_agent
from app.streaming.ai_sdk import DONE_FRAME, UIMessageView, encode_chunks
from app.streaming.events import GenerationEvent, Snapshot
from tests.factories import Tenant
from tests.integration.live_server import LiveServer
from tests.integration.wire_api import messages_of, new_conversation, post_message
from tests.node_support import JS_DIR
from tests.unit.streaming import test_ai_sdk_view as view_cases

pytestmark = pytest.mark.anyio

DRIVER = JS_DIR / "driver.mjs"
STEP = 10.0  # the longest any single HTTP call or settle poll may take
DRIVER_TIMEOUT = 60.0  # the driver stops itself after 30 s


# -- Node and the server -------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with LiveServer({"CHATSTREAM_SSE_PING_INTERVAL": "0.3"}) as live:
        yield live


@pytest.fixture(autouse=True)
def server_logs_are_clean(server: LiveServer) -> Iterator[None]:
    """No test makes the server log a traceback or an error."""
    start = len(server.lines)
    yield
    new = server.lines[start:]
    bad = [line for line in new if "Traceback" in line or " ERROR " in line or line.startswith("ERROR")]
    assert not bad, "the server logged errors:\n" + "".join(new)


@pytest.fixture
async def http(server: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=STEP) as client:
        yield client


async def run_driver(command: str, options: dict[str, Any] | None = None, stdin: bytes | None = None) -> Any:
    """Run tests/js/driver.mjs and return the JSON it prints."""
    with anyio.fail_after(DRIVER_TIMEOUT):
        result = await anyio.run_process(
            ["node", str(DRIVER), command, json.dumps(options or {})], cwd=JS_DIR, input=stdin, check=False
        )
    assert result.returncode == 0, f"driver {command} failed ({result.returncode}):\n{result.stderr.decode()}"
    return json.loads(result.stdout)


def chat_options(server: LiveServer, tenant: Tenant, conversation: str, **extra: Any) -> dict[str, Any]:
    return {"baseUrl": server.url, "key": tenant.tokens["alice"], "conversationId": conversation, **extra}


async def echo_agent(tenant: Tenant, pace: float, mode: str | None = None) -> str:
    config: dict[str, Any] = {"pace": pace, **({"mode": mode} if mode else {})}
    agent = await create_agent(tenant.company_id, AgentCreate(name=f"echo {mode or 'text'} {pace}", config=config))
    return str(agent.id)


async def settled(http: httpx.AsyncClient, tenant: Tenant, generation_id: str) -> dict[str, Any]:
    """The generation once it is no longer `running` (bounded poll: there is no event to wait on)."""
    with anyio.fail_after(STEP):
        while True:
            response = await http.get(f"/api/generations/{generation_id}", headers=tenant.headers("alice"))
            assert response.status_code == 200, response.text
            body: dict[str, Any] = response.json()
            if body["status"] != "running":
                return body
            await anyio.sleep(0.05)


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


# -- what the client should end up with ----------------------------------------------------


def stored_parts(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The stored message's parts (an answer stored without parts: its content as one text part)."""
    parts: list[dict[str, Any]] = message.get("parts") or [{"kind": "text", "text": message["content"]}]
    return parts


def ui_parts(parts: list[dict[str, Any]], done: bool = True) -> list[dict[str, Any]]:
    """Our stored parts as the AI SDK's UI message parts: a step first; a tool call and its
    result are one tool part (`tool-<name>`), as the client merges them."""
    out: list[dict[str, Any]] = [{"type": "step-start"}]
    tools: dict[str, dict[str, Any]] = {}
    for index, part in enumerate(parts):
        kind = part["kind"]
        closed = part.get("state", "complete") != "incomplete" and done
        if kind == "text":
            out.append({"type": "text", "text": part["text"], "state": "done" if closed else "streaming"})
        elif kind == "reasoning":
            out.append(
                {
                    "type": "reasoning",
                    "id": str(index),
                    "text": part["text"],
                    "state": "done" if closed else "streaming",
                }
            )
        elif kind == "tool_call":
            tool = {"type": f"tool-{part['name']}", "toolCallId": part["toolCallId"]}
            if part.get("state") == "invalid":
                tool.update(state="output-error", rawInput=part["text"], errorText=part["error"])
            else:
                tool.update(state="input-available", input=part["value"])
            tools[part["toolCallId"]] = tool
            out.append(tool)
        elif kind == "tool_result":
            tool = tools[part["toolCallId"]]
            if part.get("error") is not None:
                tool.update(state="output-error", errorText=part["error"])
            else:
                tool.update(state="output-available", output=part.get("value"))
        elif kind == "data":
            out.append({"type": f"data-{part['name']}", "data": part.get("value")})
    return out


def expected_message(stored: dict[str, Any], conversation: str) -> dict[str, Any]:
    generation = stored["generationId"]
    return {
        "id": generation,
        "role": "assistant",
        "metadata": {"generationId": generation, "conversationId": conversation, "messageId": stored["id"]},
        "parts": ui_parts(stored_parts(stored)),
    }


async def the_answer(http: httpx.AsyncClient, tenant: Tenant, conversation: str) -> dict[str, Any]:
    """The conversation's last message: the stored answer."""
    stored = (await messages_of(http, tenant, conversation))[-1]
    assert stored["role"] == "agent", stored
    return stored


def assert_ui_stream(connection: dict[str, Any]) -> list[dict[str, Any]]:
    """A 200 UI message stream v1: its headers, start + start-step first, `[DONE]` last, once."""
    assert connection["status"] == 200, connection
    assert connection["contentType"].startswith("text/event-stream")
    assert connection["uiMessageStream"] == "v1"
    frames = connection["frames"]
    assert [f["type"] for f in frames[:2]] == ["start", "start-step"], frames[:2]
    assert frames[-1] == "[DONE]" and frames.count("[DONE]") == 1
    chunks: list[dict[str, Any]] = frames[:-1]
    return chunks


# -- 1. an answer read by the package ------------------------------------------------------------


async def test_plain_answer_is_the_stored_message(
    node_packages: Path, http: httpx.AsyncClient, server: LiveServer, acme: Tenant
) -> None:
    """Rule: POST /api/ai-sdk/chat with what `DefaultChatTransport` sends posts the last user
    message (its UI id as clientMessageId) and streams its answer; the package's chat ends
    `ready` with [user, assistant], the assistant message being the stored answer (id = the
    generation, metadata naming generation, conversation and stored message)."""
    agent = await echo_agent(acme, 0)
    conversation = await new_conversation(http, acme, agent)
    content = 'Hello there,\nwith "quotes", ünïcödé and data: not a field'
    result = await run_driver("chat", chat_options(server, acme, conversation, text=content, messageId="ui-msg-1"))

    assert result["status"] == "ready" and result["error"] is None, result
    (connection,) = result["connections"]
    chunks = assert_ui_stream(connection)
    assert chunks[-2:] == [
        {"type": "finish-step"},
        {
            "type": "finish",
            "finishReason": "stop",
            "messageMetadata": {"messageId": chunks[-1]["messageMetadata"]["messageId"]},
        },
    ]
    user, stored = await messages_of(http, acme, conversation)
    assert user["role"] == "user" and user["content"] == content and user["clientMessageId"] == "ui-msg-1"
    assert stored["content"] == content
    ui_user, ui_answer = result["messages"]
    assert ui_user == {"id": "ui-msg-1", "role": "user", "parts": [{"type": "text", "text": content}]}
    assert ui_answer == expected_message(stored, conversation)
    assert result["finishes"] == [{"isAbort": False, "isDisconnect": False, "isError": False, "finishReason": "stop"}]


async def test_mixed_answer_is_the_stored_message(
    node_packages: Path, http: httpx.AsyncClient, server: LiveServer, acme: Tenant
) -> None:
    """Rule: an answer with reasoning, text, a tool call (arguments streamed), its result and a
    data part (echo mode `parts`) is read by the package into exactly the stored parts."""
    agent = await echo_agent(acme, 0, mode="parts")
    conversation = await new_conversation(http, acme, agent)
    result = await run_driver("chat", chat_options(server, acme, conversation, text="mixed parts please"))

    assert result["status"] == "ready" and result["error"] is None, result
    chunks = assert_ui_stream(result["connections"][0])
    kinds = {c["type"] for c in chunks}
    assert {"reasoning-start", "reasoning-delta", "reasoning-end", "text-start", "text-delta", "text-end"} <= kinds
    assert {"tool-input-start", "tool-input-delta", "tool-input-available", "tool-output-available"} <= kinds
    assert any(k.startswith("data-") for k in kinds)
    stored = await the_answer(http, acme, conversation)
    assert {p["kind"] for p in stored["parts"]} == {"reasoning", "text", "tool_call", "tool_result", "data"}
    assert result["messages"][-1] == expected_message(stored, conversation)


async def test_answer_waiting_for_a_tool_result(
    node_packages: Path, http: httpx.AsyncClient, server: LiveServer, acme: Tenant
) -> None:
    """Rule: an answer that ends waiting for the client's tool result (echo mode `tool`) ends
    with `finish` reason `tool-calls`; the package holds the call as `input-available` with
    its parsed arguments, equal to the stored tool call."""
    agent = await echo_agent(acme, 0, mode="tool")
    conversation = await new_conversation(http, acme, agent)
    result = await run_driver("chat", chat_options(server, acme, conversation, text="call the tool"))
    chunks = assert_ui_stream(result["connections"][0])
    assert chunks[-1]["type"] == "finish" and chunks[-1]["finishReason"] == "tool-calls"
    stored = await the_answer(http, acme, conversation)
    answer = result["messages"][-1]
    assert answer == expected_message(stored, conversation)
    (tool,) = [p for p in answer["parts"] if p["type"] == "tool-echo"]
    assert tool["state"] == "input-available" and tool["input"] == {"text": "call the tool"}
    assert result["finishes"][0]["finishReason"] == "tool-calls"


async def test_a_retried_request_posts_once(
    node_packages: Path, http: httpx.AsyncClient, server: LiveServer, acme: Tenant
) -> None:
    """Rule: the same UI message id sent again (a retry) stores nothing new and streams the
    same answer again from its start (from the log, or the database once it is gone)."""
    agent = await echo_agent(acme, 0)
    conversation = await new_conversation(http, acme, agent)
    options = chat_options(server, acme, conversation, text="only once", messageId="retry-1")
    first = await run_driver("chat", options)
    again = await run_driver("chat", options)
    assert len(await messages_of(http, acme, conversation)) == 2
    assert again["messages"][-1] == first["messages"][-1]
    assert again["messages"][-1] == expected_message(await the_answer(http, acme, conversation), conversation)


# -- 2. resume ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["text", "parts"])
@pytest.mark.parametrize("how", ["same chat", "reloaded page"])
async def test_resume_after_a_drop_has_every_part_once(
    node_packages: Path, http: httpx.AsyncClient, server: LiveServer, acme: Tenant, how: str, mode: str
) -> None:
    """Rule: the connection of a running answer is cut after a few chunks (a network error);
    the answer goes on (disconnect grace). Resuming through the package's own path
    (`chat.resumeStream()`, as `useChat({resume: true})` does: GET {api}/{chatId}/stream), in
    the same chat or in a fresh one after a reload, replays the answer from its start and the
    package replaces its partial message: the chat ends with [user, assistant], every part
    exactly once, equal to the stored answer."""
    agent = await echo_agent(acme, 0.05, mode=None if mode == "text" else mode)
    conversation = await new_conversation(http, acme, agent)
    text = words(60 if mode == "text" else 30)  # a parts answer also streams reasoning and the tool's arguments
    options = chat_options(server, acme, conversation, text=text, messageId="drop-1", dropAfter=6)
    if how == "same chat":
        result = await run_driver("chat", {**options, "resume": True})
        assert result["afterSend"]["status"] == "error"  # the drop, as the package saw it
        assert result["finishes"][0]["isDisconnect"] is True
    else:
        dropped = await run_driver("chat", options)
        assert dropped["status"] == "error" and dropped["finishes"][0]["isDisconnect"] is True
        result = await run_driver("resume", {**options, "initialMessages": dropped["messages"][:1]})
    posted, resumed = result["connections"][-2:] if how == "same chat" else (None, result["connections"][-1])
    if posted is not None:
        assert posted["dropped"] and len(posted["frames"]) == 6
    assert resumed["method"] == "GET" and resumed["url"].endswith(f"/api/ai-sdk/chat/{conversation}/stream")
    chunks = assert_ui_stream(resumed)
    assert chunks[-1]["type"] == "finish"

    assert result["status"] == "ready" and result["error"] is None, result
    stored = await the_answer(http, acme, conversation)
    assert stored["status"] == "complete"
    user, answer = result["messages"]
    assert user["id"] == "drop-1"
    assert answer == expected_message(stored, conversation)
    assert len(await messages_of(http, acme, conversation)) == 2


@pytest.fixture(scope="module")
def small_window_server() -> Iterator[LiveServer]:
    """A server whose logs keep only the last 5 events of an answer."""
    with LiveServer({"CHATSTREAM_LOG_RETAIN": "5"}) as live:
        yield live


@pytest.mark.parametrize("mode", ["text", "parts"])
async def test_resume_after_the_window_is_gone_gets_a_snapshot(
    node_packages: Path, small_window_server: LiveServer, acme: Tenant, mode: str
) -> None:
    """Rule: with a log window of 5 events, a resumed reader of a running answer gets a
    snapshot of everything so far (several words in one delta, open parts opened),
    then the live events; the package's message is the stored answer, every part once."""
    live = small_window_server
    async with httpx.AsyncClient(base_url=live.url, timeout=STEP) as http:
        agent = await echo_agent(acme, 0.05, mode=None if mode == "text" else mode)
        conversation = await new_conversation(http, acme, agent)
        options = chat_options(live, acme, conversation, text=words(30), dropAfter=12, resume=True)
        result = await run_driver("chat", options)
        assert result["status"] == "ready" and result["error"] is None, result
        chunks = assert_ui_stream(result["connections"][-1])
        deltas = [c["delta"] for c in chunks if c["type"] in ("text-delta", "reasoning-delta")]
        assert any(len(delta.split()) > 1 for delta in deltas), chunks  # one piece: the snapshot
        stored = await the_answer(http, acme, conversation)
        assert result["messages"][1:] == [expected_message(stored, conversation)]


async def test_resume_with_nothing_running_is_204(
    node_packages: Path, http: httpx.AsyncClient, server: LiveServer, acme: Tenant
) -> None:
    """Rule: GET {api}/{id}/stream is 204 with no body when no answer runs (none yet, or the
    last one done) and never starts one, even for an unanswered message; the package then
    leaves the chat as it was (`ready`)."""
    agent = await echo_agent(acme, 0)
    conversation = await new_conversation(http, acme, agent)
    url = f"/api/ai-sdk/chat/{conversation}/stream"
    empty = await http.get(url, headers=acme.headers("alice"))
    assert empty.status_code == 204 and empty.content == b""

    await post_message(http, acme, conversation, "unanswered", reply=False)
    assert (await http.get(url, headers=acme.headers("alice"))).status_code == 204
    result = await run_driver("resume", chat_options(server, acme, conversation))
    assert result["status"] == "ready" and result["messages"] == [] and result["errors"] == []
    assert [c["status"] for c in result["connections"]] == [204]
    assert len(await messages_of(http, acme, conversation)) == 1  # nothing was answered

    await run_driver("chat", chat_options(server, acme, conversation, text="answer me"))
    assert (await http.get(url, headers=acme.headers("alice"))).status_code == 204


# -- 3. stop --------------------------------------------------------------------------------------


async def test_stop_through_our_cancel_ends_with_abort(
    node_packages: Path, http: httpx.AsyncClient, server: LiveServer, acme: Tenant
) -> None:
    """Rule: a client stops an answer with POST /api/generations/{generationId}/cancel (the id
    is the `start` chunk's messageMetadata.generationId); the stream ends with `abort`
    (reason `user`) and `[DONE]`, the package ends `ready` (not an error) with the partial
    answer, and the generation is cancelled with that partial text kept."""
    agent = await echo_agent(acme, 0.05)
    conversation = await new_conversation(http, acme, agent)
    result = await run_driver("chat", chat_options(server, acme, conversation, text=words(60), cancelAfter=5))

    (connection,) = result["connections"]
    assert connection["cancelStatus"] == 200
    chunks = assert_ui_stream(connection)
    assert chunks[-1] == {"type": "abort", "reason": "user"}
    assert not any(c["type"] in ("finish", "finish-step") for c in chunks)
    assert result["status"] == "ready" and result["error"] is None and result["errors"] == []
    generation = await settled(http, acme, chunks[0]["messageMetadata"]["generationId"])
    assert generation["status"] == "cancelled" and generation["error"] == "user"
    answer = result["messages"][-1]
    text = "".join(p["text"] for p in answer["parts"] if p["type"] == "text")
    assert 0 < len(text) < len(words(60))
    if generation["resultMessageId"] is not None:  # the partial policy kept it
        assert (await the_answer(http, acme, conversation))["content"] == text


# -- 4. errors ------------------------------------------------------------------------------------


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """A JSON error in the project's shape, not a stream."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert set(body) == {"error", "code", "details"} and body["error"], body
    if code is not None:
        assert body["code"] == code, body
    return body


def ui_body(conversation: str, *messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"id": conversation, "messages": list(messages), "trigger": "submit-message", **extra}


def user_message(text: str = "hi", id: str = "m1") -> dict[str, Any]:
    return {"id": id, "role": "user", "parts": [{"type": "text", "text": text}]}


async def test_bad_bodies_are_400_and_store_nothing(http: httpx.AsyncClient, acme: Tenant) -> None:
    """Rule: a body that is not what the transport sends is a 400 in our error shape naming
    the field, and nothing is stored: malformed JSON, no or a bad `id`, no messages, a last
    message that is not a user message or has no text, a bad message id, a trigger other
    than submit-message (regenerating is not offered)."""
    agent = await echo_agent(acme, 0)
    conversation = await new_conversation(http, acme, agent)
    headers = {**acme.headers("alice"), "content-type": "application/json"}
    bodies: list[tuple[Any, str | None]] = [
        ({"messages": [user_message()]}, "id"),
        ({"id": "not-a-uuid", "messages": [user_message()]}, "id"),
        (ui_body(conversation), "messages"),
        ({"id": conversation, "messages": "hi"}, "messages"),
        (ui_body(conversation, {"id": "a", "role": "assistant", "parts": [{"type": "text", "text": "x"}]}), "messages"),
        (ui_body(conversation, {"id": "f", "role": "user", "parts": [{"type": "file", "url": "x"}]}), "messages"),
        (ui_body(conversation, user_message("   ")), "messages"),
        (ui_body(conversation, {"id": "t", "role": "user", "parts": [{"type": "text"}]}), "messages"),
        (ui_body(conversation, user_message(id="")), None),
        (ui_body(conversation, user_message(id="x" * 101)), None),
        (ui_body(conversation, {"id": "r", "role": "robot", "parts": []}), None),
        (ui_body(conversation, user_message(), trigger="regenerate-message"), "trigger"),
    ]
    with anyio.fail_after(STEP):
        malformed = await http.post("/api/ai-sdk/chat", content=b"{not json", headers=headers)
        assert_error(malformed, 400)
        for body, field in bodies:
            response = await http.post("/api/ai-sdk/chat", json=body, headers=acme.headers("alice"))
            error = assert_error(response, 400)
            if field is not None:
                assert any(d.get("field", "").startswith(field) for d in error["details"]), (body, error)
    assert await messages_of(http, acme, conversation) == []


async def test_unknown_foreign_and_agentless_conversations(
    http: httpx.AsyncClient, acme: Tenant, globex: Tenant
) -> None:
    """Rule: an unknown conversation, another company's or another member's is 404 on both
    routes; a conversation without an agent is 409 `no_agent` and the message is not
    stored; no credentials is 401."""
    agent = await echo_agent(acme, 0)
    mine = await new_conversation(http, acme, agent)
    agentless = await new_conversation(http, acme)
    unknown = "00000000-0000-0000-0000-000000000000"
    with anyio.fail_after(STEP):
        for who, tenant in (("alice", globex), ("bob", acme)):
            headers = tenant.headers("admin" if tenant is globex else who)
            assert_error(await http.post("/api/ai-sdk/chat", json=ui_body(mine, user_message()), headers=headers), 404)
            assert_error(await http.get(f"/api/ai-sdk/chat/{mine}/stream", headers=headers), 404)
        alice = acme.headers("alice")
        assert_error(await http.post("/api/ai-sdk/chat", json=ui_body(unknown, user_message()), headers=alice), 404)
        assert_error(await http.get(f"/api/ai-sdk/chat/{unknown}/stream", headers=alice), 404)
        response = await http.post("/api/ai-sdk/chat", json=ui_body(agentless, user_message()), headers=alice)
        assert_error(response, 409, "no_agent")
        assert_error(await http.post("/api/ai-sdk/chat", json=ui_body(mine, user_message())), 401)
        assert_error(await http.get(f"/api/ai-sdk/chat/{mine}/stream"), 401)
    assert await messages_of(http, acme, agentless) == []
    assert await messages_of(http, acme, mine) == []


# -- 5. the package reads the view's chunks for every event shape ---------------------------------


def body_of(events: list[GenerationEvent]) -> bytes:
    view = UIMessageView()
    return b":ok\n\n" + encode_chunks([c for e in events for c in view.chunks(e)]) + DONE_FRAME


async def read_by_package(events: list[GenerationEvent]) -> dict[str, Any]:
    result = await run_driver("read", stdin=body_of(events))
    assert result["errors"] == [], result
    message: dict[str, Any] = result["message"]
    return message


async def test_package_reads_every_chunk_the_view_makes(node_packages: Path) -> None:
    """Rule: the package's parser (uiMessageChunkSchema) and processUIMessageStream accept every
    chunk the view makes: the mixed answer, interleaved tool calls, an invalid tool call
    (`tool-input-error`), a tool error (`tool-output-error`), null outputs and data, a cancel
    (`abort`), a failure (`error`, reported to onError)."""
    mixed = await read_by_package(view_cases.MIXED)
    assert mixed["parts"] == [
        {"type": "step-start"},
        {"type": "reasoning", "id": "0", "text": "let me think", "state": "done"},
        {"type": "text", "text": "Hello world", "state": "done"},
        {
            "type": "tool-echo",
            "toolCallId": "call_1",
            "state": "output-available",
            "input": {"text": "hi"},
            "output": {"echoed": "hi"},
        },
        {"type": "data-echo-stats", "data": {"words": 2}},
        {"type": "text", "text": "bye", "state": "done"},
    ]
    assert mixed["id"] == str(view_cases.G)
    assert mixed["metadata"] == {
        "generationId": str(view_cases.G),
        "conversationId": str(view_cases.C),
        "messageId": str(view_cases.M),
    }

    interleaved = view_cases.numbered(
        {"t": "start"},
        {"t": "part.start", "part": 0, "kind": "tool_call", "name": "a", "tool_call_id": "ca"},
        {"t": "part.start", "part": 1, "kind": "tool_call", "name": "b", "tool_call_id": "cb"},
        {"t": "part.delta", "part": 0, "text": '{"x":'},
        {"t": "part.delta", "part": 1, "text": '{"y":2}'},
        {"t": "part.delta", "part": 0, "text": "1}"},
        {"t": "part.end", "part": 1, "value": {"y": 2}},
        {"t": "part.end", "part": 0, "value": {"x": 1}},
        {"t": "part.start", "part": 2, "kind": "tool_call", "name": "c", "tool_call_id": "cc"},
        {"t": "part.delta", "part": 2, "text": "{broken"},
        {"t": "part.end", "part": 2, "state": "invalid", "error": "not JSON"},
        {"t": "part.start", "part": 3, "kind": "tool_result", "name": "a", "tool_call_id": "ca"},
        {"t": "part.end", "part": 3, "error": "tool failed"},
        {"t": "part.start", "part": 4, "kind": "tool_result", "name": "b", "tool_call_id": "cb"},
        {"t": "part.end", "part": 4, "value": None},
        {"t": "part.start", "part": 5, "kind": "data", "name": "nothing"},
        {"t": "part.end", "part": 5, "value": None},
        view_cases.done(finish_reason="tool_calls"),
    )
    message = await read_by_package(interleaved)
    assert message["parts"][1:] == [
        {"type": "tool-a", "toolCallId": "ca", "state": "output-error", "input": {"x": 1}, "errorText": "tool failed"},
        {"type": "tool-b", "toolCallId": "cb", "state": "output-available", "input": {"y": 2}, "output": None},
        {"type": "tool-c", "toolCallId": "cc", "state": "output-error", "rawInput": "{broken", "errorText": "not JSON"},
        {"type": "data-nothing", "data": None},
    ]

    cancelled = view_cases.numbered({"t": "start"}, {"t": "token", "text": "cut"}, {"t": "cancelled", "reason": "user"})
    assert (await read_by_package(cancelled))["parts"] == [
        {"type": "step-start"},
        {"type": "text", "text": "cut", "state": "streaming"},
    ]
    failed = view_cases.numbered({"t": "start"}, {"t": "error", "code": "adapter_failed", "message": "boom"})
    result = await run_driver("read", stdin=body_of(failed))
    assert result["errors"] == ["Error: adapter_failed: boom"]


@pytest.mark.parametrize("seq", [2, 6, 9, 12, 16])
async def test_package_reads_a_snapshot_into_the_same_message(node_packages: Path, seq: int) -> None:
    """Rule: a reader whose window is gone (snapshot at `seq`, then the live events) ends with
    the same UI message as one that saw every event."""
    events = view_cases.MIXED
    snapshot: Snapshot = view_cases.snapshot_at(events, seq)
    assert await read_by_package([snapshot, *events[seq:]]) == await read_by_package(events)


# -- 6. the documented example, cookies, quota -----------------------------------------------------


async def test_the_documented_example_runs(node_packages: Path, server: LiveServer, acme: Tenant) -> None:
    """Rule: docs/ai-sdk.md's runnable example (tests/js/example.mjs) prints the answer's UI message."""
    with anyio.fail_after(DRIVER_TIMEOUT):
        result = await anyio.run_process(
            ["node", str(JS_DIR / "example.mjs"), server.url, acme.tokens["alice"], "hello from the docs"],
            cwd=JS_DIR,
            check=False,
        )
    assert result.returncode == 0, result.stderr.decode()
    message = json.loads(result.stdout)
    assert message["role"] == "assistant"
    assert [p for p in message["parts"] if p["type"] == "text"] == [
        {"type": "text", "text": "hello from the docs", "state": "done"}
    ]


async def test_session_cookie_from_the_same_origin(http: httpx.AsyncClient, server: LiveServer, acme: Tenant) -> None:
    """Rule: a browser's useChat authenticates with the session cookie, like every route (a
    cookie write from the page's own origin)."""
    agent = await echo_agent(acme, 0)
    conversation = await new_conversation(http, acme, agent)
    async with httpx.AsyncClient(base_url=server.url, timeout=STEP) as browser:
        login = await browser.post("/api/session", json={"key": acme.tokens["alice"]})
        assert login.status_code == 200 and browser.cookies
        with anyio.fail_after(STEP):
            response = await browser.post(
                "/api/ai-sdk/chat",
                json=ui_body(conversation, user_message("by cookie")),
                headers={"Origin": server.url},
            )
    assert response.status_code == 200 and response.headers["x-vercel-ai-ui-message-stream"] == "v1"
    lines = [line for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    deltas = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["delta"] for c in deltas if c["type"] == "text-delta") == "by cookie"


async def test_streams_count_against_the_key_stream_quota(acme: Tenant) -> None:
    """Rule: both routes hold one of the key's SSE stream places for as long as they stream
    (CHATSTREAM_MAX_STREAMS_PER_KEY, 1 here): past it, 429 `too_many_streams` before
    anything is posted or streamed."""
    live = LiveServer({"CHATSTREAM_MAX_STREAMS_PER_KEY": "1"}).start()
    try:
        async with httpx.AsyncClient(base_url=live.url, timeout=STEP) as http:
            agent = await echo_agent(acme, 0.05)
            busy = await new_conversation(http, acme, agent)
            other = await new_conversation(http, acme, agent)
            alice = acme.headers("alice")
            request = http.build_request(
                "POST", "/api/ai-sdk/chat", json=ui_body(busy, user_message(words(60))), headers=alice
            )
            with anyio.fail_after(STEP):
                held = await http.send(request, stream=True)
            try:
                assert held.status_code == 200
                with anyio.fail_after(STEP):
                    assert_error(
                        await http.post("/api/ai-sdk/chat", json=ui_body(other, user_message()), headers=alice),
                        429,
                        "too_many_streams",
                    )
                    assert_error(await http.get(f"/api/ai-sdk/chat/{busy}/stream", headers=alice), 429)
                assert await messages_of(http, acme, other) == []
            finally:
                await held.aclose()  # the answer runs on; stopping the server ends it
    finally:
        live.stop()
