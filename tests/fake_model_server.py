"""A local stand-in for an OpenAI-compatible model server, over real HTTP.

It runs under uvicorn on the test's own event loop, so a test scripts each answer with
asyncio primitives: chunks to send, events to wait for between them (to hold an answer
back), a status and body for failures, a stream left hanging or cut short. It records
every request (body, headers, client port) and when the client went away.

Running on the same loop also proves the adapter never blocks the loop: if it did, this
server could not answer and every test here would hang until its timeout.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from tests.integration.live_server import free_port

Step = str | bytes | asyncio.Event


def chunk(
    content: str | None = None,
    *,
    finish_reason: str | None = None,
    role: str | None = None,
    **fields: Any,
) -> str:
    """The JSON of one `chat.completion.chunk` with one choice; `fields` go into its delta
    as they are (`reasoning_content`, `reasoning`, `tool_calls`: see :func:`tool_call`)."""
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    delta.update(fields)
    return json.dumps(
        {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "fake-model",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
    )


def tool_call(
    index: int, *, id: str | None = None, name: str | None = None, arguments: str | None = None
) -> dict[str, Any]:
    """One entry of `delta.tool_calls` as OpenAI streams it: the first of an index has the
    id, `"type": "function"`, the name and `"arguments": ""`; the next ones only the index
    and a piece of the arguments."""
    entry: dict[str, Any] = {"index": index}
    if id is not None:
        entry["id"] = id
        entry["type"] = "function"
    function: dict[str, Any] = {}
    if name is not None:
        function["name"] = name
    if arguments is not None:
        function["arguments"] = arguments
    if function:
        entry["function"] = function
    return entry


def tool_calls_chunk(*calls: dict[str, Any]) -> str:
    """A chunk whose delta holds only these `tool_calls` entries."""
    return chunk(tool_calls=list(calls))


def usage_chunk(completion_tokens: int) -> str:
    """The closing chunk of `stream_options.include_usage`: no choices, the usage."""
    usage = {"prompt_tokens": 10, "completion_tokens": completion_tokens, "total_tokens": 10 + completion_tokens}
    return json.dumps({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "choices": [], "usage": usage})


def answer(*pieces: str, finish_reason: str = "stop", usage: int | None = None) -> list[Step]:
    """The chunks of a complete answer: a role chunk, one chunk per piece, the finish chunk
    and (when given) usage. `[DONE]` is added by the Reply."""
    steps: list[Step] = [chunk(role="assistant", content="")]
    steps += [chunk(piece) for piece in pieces]
    steps.append(chunk(finish_reason=finish_reason))
    if usage is not None:
        steps.append(usage_chunk(usage))
    return steps


@dataclass
class Reply:
    """One scripted answer. `steps`: a str is sent as one `data:` event, bytes as they are,
    an asyncio.Event is waited for. Then `data: [DONE]` (unless `done=False`); with `hang`,
    nothing more until the client leaves; with `abort`, the connection is dropped mid-body."""

    steps: list[Step] = field(default_factory=lambda: answer("Hello", " there"))
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    done: bool = True
    hang: bool = False
    abort: bool = False


@dataclass
class Seen:
    """One request as the server received it."""

    body: dict[str, Any]
    headers: dict[str, str]
    path: str
    client_port: int
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    disconnected_at: float | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)


class FakeModelServer:
    """`POST /v1/chat/completions` answering with the queued replies (`default` when none is queued)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.replies: deque[Reply] = deque()
        self.default = Reply()
        self.requests: list[Seen] = []
        self.request_arrived = asyncio.Event()
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    def queue(self, *replies: Reply) -> None:
        """Answer the next requests with these, in order."""
        self.replies.extend(replies)

    async def next_request(self, count: int) -> Seen:
        """Wait until `count` requests arrived; the last of them."""
        while len(self.requests) < count:
            self.request_arrived.clear()
            await self.request_arrived.wait()
        return self.requests[count - 1]

    async def start(self) -> FakeModelServer:
        config = uvicorn.Config(
            self, host="127.0.0.1", port=self.port, lifespan="off", log_level="warning", timeout_graceful_shutdown=1
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)
        return self

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] != "/v1/chat/completions":
            await _respond(send, 404, b'{"error": {"message": "no such route"}}')
            return
        seen = Seen(
            body=json.loads(raw),
            headers={k.decode(): v.decode() for k, v in scope["headers"]},
            path=scope["path"],
            client_port=scope["client"][1],
        )
        self.requests.append(seen)
        self.request_arrived.set()
        reply = self.replies.popleft() if self.replies else self.default

        async def watch_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            seen.disconnected_at = time.monotonic()
            seen.disconnected.set()

        watcher = asyncio.create_task(watch_disconnect())
        try:
            if reply.status != 200:
                await _respond(send, reply.status, reply.body, reply.headers)
                return
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), *_encode(reply.headers)],
                }
            )
            for step in reply.steps:
                if isinstance(step, asyncio.Event):
                    if not await _first(step, seen.disconnected):
                        return
                    continue
                data = step if isinstance(step, bytes) else f"data: {step}\n\n".encode()
                await send({"type": "http.response.body", "body": data, "more_body": True})
            if reply.hang:
                await seen.disconnected.wait()
                return
            if reply.abort:
                raise ConnectionAbortedError("the fake model server drops the connection (as scripted)")
            tail = b"data: [DONE]\n\n" if reply.done else b""
            await send({"type": "http.response.body", "body": tail, "more_body": False})
        finally:
            seen.finished.set()
            watcher.cancel()


async def _first(wanted: asyncio.Event, gone: asyncio.Event) -> bool:
    """Wait for `wanted`; False if the client left first."""
    tasks = [asyncio.create_task(wanted.wait()), asyncio.create_task(gone.wait())]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()
    return wanted.is_set()


def _encode(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode(), v.encode()) for k, v in headers.items()]


async def _respond(send: Any, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *_encode(headers or {})],
        }
    )
    await send({"type": "http.response.body", "body": body})
