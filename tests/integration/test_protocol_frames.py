"""Every frame a real server sends in a full WebSocket scenario matches docs/protocol.schema.json:
answers of every part kind, a cancel, a failure, a snapshot, list and conversation events,
acks, pongs and error frames, validated with formats (`date-time`, `uuid`) and the closed
sets (`code`, `reason`) enforced."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import httpx
import jsonschema_rs
import pytest
from websockets.asyncio.client import ClientConnection, connect

from app.streaming.protocol_schema import SCHEMA_PATH
from tests.factories import Tenant
from tests.integration.live_server import LiveServer, free_port
from tests.integration.wire_api import make_agent, new_conversation
from tests.parts_support import make_parts_agent

pytestmark = pytest.mark.anyio

STEP = 10.0  # the longest any wait may take
TERMINAL = ("done", "cancelled", "error")


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    # A short retained log: a resume from an early cursor of a long answer gets a `snapshot`.
    # A model server on this machine may be named (the failing agent's, where nobody listens).
    with LiveServer({"CHATSTREAM_LOG_RETAIN": "4", "CHATSTREAM_UPSTREAM_ALLOW": "127.0.0.1"}) as live:
        yield live


def validators() -> dict[str, jsonschema_rs.Validator]:
    document = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return {
        name: jsonschema_rs.Draft202012Validator({"$defs": document["$defs"], **document[name]}, validate_formats=True)
        for name in ("serverFrame", "generationEvent", "clientFrame")
    }


class Recorder:
    """Reads every frame of a socket into `frames`; `wait_for` waits for one matching a test."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self.sent: list[dict[str, Any]] = []
        self._arrived = asyncio.Event()

    async def run(self) -> None:
        async for raw in self.ws:
            self.frames.append(json.loads(raw))
            self._arrived.set()

    async def send(self, frame: dict[str, Any]) -> None:
        self.sent.append(frame)
        await self.ws.send(json.dumps(frame))

    async def wait_for(self, test: Callable[[dict[str, Any]], bool], after: int = 0) -> dict[str, Any]:
        with anyio.fail_after(STEP):
            while True:
                for frame in self.frames[after:]:
                    if test(frame):
                        return frame
                self._arrived.clear()
                await self._arrived.wait()

    async def request(self, frame: dict[str, Any]) -> dict[str, Any]:
        ref = uuid.uuid4().hex[:12]
        await self.send({**frame, "ref": ref})
        return await self.wait_for(lambda f: f.get("ref") == ref)

    async def answer(self, conversation_id: str, content: str) -> tuple[str, dict[str, Any]]:
        """Send a message; its answer's generation id and terminal event."""
        ack = await self.request(
            {"type": "send", "conversationId": conversation_id, "content": content, "clientMessageId": content}
        )
        assert ack["type"] == "ack", ack
        gid = ack["generation"]["id"]
        return gid, await self.wait_for(lambda f: f.get("generationId") == gid and f["type"] in TERMINAL)


async def test_every_frame_of_a_full_scenario_matches_the_schema(server: LiveServer, acme: Tenant) -> None:
    h = acme.headers("alice")
    quick, slow, parts = await make_agent(acme, 0), await make_agent(acme, 0.2), await make_parts_agent(acme, 0)
    ws_url = server.url.replace("http://", "ws://", 1) + "/api/ws"
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=STEP) as http,
        connect(ws_url, additional_headers=h) as ws,
        anyio.create_task_group() as tasks,
    ):
        # A model server nobody listens on: its answers fail (`upstream_unreachable`).
        config = {"baseUrl": f"http://127.0.0.1:{free_port()}/v1", "model": "m"}
        made = await http.post(
            "/api/agents",
            json={"name": "unreachable", "adapter": "openai", "config": config},
            headers=acme.headers("admin"),
        )
        assert made.status_code == 201, made.text
        broken = made.json()["id"]
        socket = Recorder(ws)
        tasks.start_soon(socket.run)
        assert (await socket.request({"type": "subscribe_conversations"}))["type"] == "ack"
        assert (await socket.request({"type": "ping"}))["type"] == "pong"

        conversations = {}
        for name, agent in (("quick", quick), ("slow", slow), ("parts", parts), ("broken", broken)):
            conversations[name] = await new_conversation(http, acme, agent)
            await socket.wait_for(lambda f, c=conversations[name]: f["type"] == "conversation.created" and c in str(f))
            ack = await socket.request({"type": "subscribe", "conversationId": conversations[name]})
            assert ack["type"] == "ack", ack

        long_text = " ".join(f"word{i}" for i in range(12))
        gid, end = await socket.answer(conversations["quick"], long_text)
        assert end["type"] == "done"
        assert (await socket.answer(conversations["parts"], "parts please"))[1]["type"] == "done"
        assert (await socket.answer(conversations["broken"], "fail please"))[1]["code"] == "upstream_unreachable"

        # A cancelled answer: cancel once its first token is in.
        mark = len(socket.frames)
        ack = await socket.request(
            {"type": "send", "conversationId": conversations["slow"], "content": "a b c d e f", "clientMessageId": "s"}
        )
        slow_gid = ack["generation"]["id"]
        await socket.wait_for(lambda f: f.get("generationId") == slow_gid and f["type"] == "token", mark)
        assert (await socket.request({"type": "cancel", "generationId": slow_gid}))["type"] == "ack"
        cancelled = await socket.wait_for(lambda f: f.get("generationId") == slow_gid and f["type"] in TERMINAL)
        assert cancelled["type"] == "cancelled" and cancelled["reason"] == "user"

        # A resume from the answer's first event, no longer retained: a `snapshot`.
        await socket.request({"type": "unsubscribe", "conversationId": conversations["quick"]})
        mark = len(socket.frames)
        resumed = await socket.request(
            {"type": "subscribe", "conversationId": conversations["quick"], "after": f"{gid}.1"}
        )
        assert resumed["type"] == "ack", resumed
        await socket.wait_for(lambda f: f.get("generationId") == gid and f["type"] == "snapshot", mark)

        # Changes: a rename, an edit, a deletion.
        quick_messages = await http.get(f"/api/conversations/{conversations['quick']}/messages", headers=h)
        first = quick_messages.json()["items"][0]["id"]
        renamed = await http.patch(f"/api/conversations/{conversations['quick']}", json={"title": "t"}, headers=h)
        assert renamed.status_code == 200, renamed.text
        await socket.wait_for(lambda f: f["type"] == "conversation.updated")
        edited = await http.put(
            f"/api/conversations/{conversations['quick']}/messages/{first}", json={"content": "edited"}, headers=h
        )
        assert edited.status_code == 200, edited.text
        await socket.wait_for(lambda f: f["type"] == "message.edited")
        deleted = await http.delete(f"/api/conversations/{conversations['slow']}", headers=h)
        assert deleted.status_code == 204, deleted.text
        await socket.wait_for(lambda f: f["type"] == "conversation.deleted")

        # Error frames: not JSON, an unknown type, a bad frame, an unknown conversation.
        await socket.ws.send("{not json")
        await socket.wait_for(lambda f: f.get("code") == "malformed_frame")
        assert (await socket.request({"type": "dance"}))["code"] == "unknown_type"
        assert (await socket.request({"type": "send"}))["code"] == "invalid_frame"
        assert (await socket.request({"type": "subscribe", "conversationId": str(uuid.uuid4())}))["code"] == "not_found"
        tasks.cancel_scope.cancel()

    check = validators()
    seen: set[str] = set()
    for frame in socket.frames:
        kind = "generationEvent" if "generationId" in frame and "seq" in frame else "serverFrame"
        errors = [error.message for error in check[kind].iter_errors(frame)]
        assert not errors, f"{kind} {frame} does not match docs/protocol.schema.json: {errors}"
        seen.add(frame["type"])
    # What the test sent matches the client side of the schema, but for its two bad frames.
    refused = [frame["type"] for frame in socket.sent if not check["clientFrame"].is_valid(frame)]
    assert refused == ["dance", "send"], socket.sent
    assert {
        "hello",
        "ack",
        "pong",
        "error",
        "start",
        "token",
        "part.start",
        "part.delta",
        "part.end",
        "snapshot",
        "done",
        "cancelled",
        "message.created",
        "message.edited",
        "conversation.created",
        "conversation.updated",
        "conversation.deleted",
        "conversation.activity",
    } <= seen, f"the scenario did not show {sorted(seen)}"
