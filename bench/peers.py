"""Bare peers: the least a Litestar app under uvicorn can do to stream an echo answer.

The benchmark divides chatstream's server CPU per token by these peers' to show what
the product costs on top of the framework: database, auth, the per-answer event log,
the reader/producer split, resumable cursors. The peers have none of it. They emit the
same token sequence as the `echo` agent (the words of :func:`token_words`, split by the
same expression, one `asyncio.sleep(pace)` before each word) as msgspec-encoded JSON
events with the same fields and tags as chatstream's (`start`, `token`, `done`):

- `GET /sse?tokens=T&pace=P` — SSE with chatstream's headers, `:ok` first, and
  `event:` / `id:` / `data:` frames, one write per event;
- `GET /ws` — a WebSocket; each text frame `{"tokens": T, "pace": P}` is answered with
  the events of one answer as JSON text frames (encoded and sent as chatstream does);
- `GET /healthz`.

Served by uvicorn with the options `chatstream serve` uses, on the same event loop and HTTP
protocol (`python -m bench.peers`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any
from uuid import UUID

import msgspec
import uvicorn
from litestar import Litestar, WebSocket, get, websocket
from litestar.exceptions import WebSocketDisconnect
from litestar.params import Parameter
from litestar.response import Stream

# The echo adapter's split: a word with the whitespace before it.
_WORD = re.compile(r"\s*\S+")
MAX_TOKENS = 100_000
# The echo adapter's limit: bench.run's `idle` scenario pauses both answers a minute per word.
MAX_PACE = 60.0

SSE_HEADERS = {"Cache-Control": "no-cache", "Connection": "keep-alive", "X-Accel-Buffering": "no"}
OK_COMMENT = b":ok\n\n"


def token_words(count: int) -> str:
    """The message the benchmark sends: `count` short words, so an echo answer has `count` tokens."""
    return " ".join(f"tok{i}" for i in range(count))


def tokens_of(text: str) -> list[str]:
    """The tokens an echo answer to `text` consists of (they concatenate back to `text`)."""
    return _WORD.findall(text)


class _Event(msgspec.Struct, tag_field="type", rename="camel", kw_only=True):
    generation_id: UUID
    conversation_id: UUID
    seq: int


class Start(_Event, tag="start"):
    """Same fields as chatstream's `start`."""

    reply_to_id: UUID | None = None
    agent_id: UUID | None = None


class Token(_Event, tag="token"):
    """Same fields as chatstream's `token`."""

    text: str


class Done(_Event, tag="done"):
    """Same fields as chatstream's `done`."""

    message_id: UUID
    token_count: int
    finish_reason: str = "stop"


PeerEvent = Start | Token | Done


class AnswerRequest(msgspec.Struct, forbid_unknown_fields=True):
    """What a WebSocket client sends to get one answer."""

    tokens: Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKENS)]
    pace: Annotated[float, msgspec.Meta(ge=0, le=MAX_PACE)]


_encoder = msgspec.json.Encoder()
_request_decoder = msgspec.json.Decoder(AnswerRequest)


async def answer(tokens: int, pace: float) -> AsyncIterator[PeerEvent]:
    """The events of one echo answer of `tokens` tokens, paced like the echo adapter."""
    ids: dict[str, Any] = {"generation_id": uuid.uuid4(), "conversation_id": uuid.uuid4()}
    seq = 1
    yield Start(**ids, seq=seq, reply_to_id=uuid.uuid4(), agent_id=uuid.uuid4())
    count = 0
    for word in tokens_of(token_words(tokens)):
        await asyncio.sleep(pace)
        seq += 1
        count += 1
        yield Token(**ids, seq=seq, text=word)
    yield Done(**ids, seq=seq + 1, message_id=uuid.uuid4(), token_count=count)


def sse_frame(event: PeerEvent) -> bytes:
    """One SSE message, framed exactly as chatstream frames its events."""
    tag = type(event).__struct_config__.tag
    return b"event: %s\nid: %s.%d\ndata: %s\n\n" % (
        str(tag).encode(),
        str(event.generation_id).encode(),
        event.seq,
        _encoder.encode(event),
    )


async def _sse_body(tokens: int, pace: float) -> AsyncIterator[bytes]:
    yield OK_COMMENT
    async for event in answer(tokens, pace):
        yield sse_frame(event)


@get("/sse", media_type="text/event-stream")
async def sse_answer(
    tokens: Annotated[int, Parameter(ge=0, le=MAX_TOKENS)],
    pace: Annotated[float, Parameter(ge=0, le=MAX_PACE)],
) -> Stream:
    """One answer as Server-Sent Events."""
    return Stream(_sse_body(tokens, pace), media_type="text/event-stream", headers=SSE_HEADERS)


@websocket("/ws")
async def ws_answers(socket: WebSocket[Any, Any, Any]) -> None:
    """Answer each `{"tokens", "pace"}` text frame with one answer's events, until the peer leaves."""
    await socket.accept()
    try:
        while True:
            request = _request_decoder.decode(await socket.receive_text())
            async for event in answer(request.tokens, request.pace):
                await socket.send_text(_encoder.encode(event).decode())
    except WebSocketDisconnect:
        return


@get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness, for the benchmark to wait on."""
    return {"status": "ok"}


def create_app() -> Litestar:
    """The bare app: no database, no auth, no middleware."""
    return Litestar(route_handlers=[sse_answer, ws_answers, healthz], debug=False)


def uvicorn_options(host: str, port: int) -> dict[str, Any]:
    """The uvicorn options `chatstream serve` uses (app/server.py), for this app: the same
    event loop and HTTP protocol too (`CHATSTREAM_SERVER_IMPL`, which bench.run's
    `--server-env` hands to both), so that the ratios compare the apps, not the stacks."""
    from app.config import get_settings
    from app.server import server_stack

    settings = get_settings()
    stack = server_stack(settings)
    return {
        "loop": stack.loop,
        "http": stack.http,
        "ws_ping_interval": settings.ws_ping_interval,
        "ws_ping_timeout": settings.ws_ping_timeout,
        "ws_max_size": settings.ws_max_frame_bytes * 4,
        "factory": True,
        "host": host,
        "port": port,
        "log_level": settings.log_level.lower(),
        "proxy_headers": True,
        "timeout_graceful_shutdown": 10,
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.peers [--host H] [--port P]`: serve the peers until stopped."""
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args(argv)
    options = uvicorn_options(args.host, args.port)
    config = uvicorn.Config("bench.peers:create_app", **options)
    # Which stack the peers run on, in their log (bench.run --keep keeps it), after uvicorn's logging setup.
    stack = options["loop"], options["http"].__name__
    logging.getLogger("uvicorn.error").info("Event loop: %s, HTTP protocol: %s", *stack)
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
