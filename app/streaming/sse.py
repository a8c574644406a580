"""SSE transport: `GET /api/conversations/{id}/stream`.

The response only reads: it follows the generation's log from the reader's cursor
and writes each batch of events at once. The generation belongs to the core, so a
reader leaving (the response being cancelled) cannot break it; the core is told in
`finally`, synchronously, and decides (disconnect grace) what that means.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated
from uuid import UUID

from litestar import Response, get
from litestar.di import NamedDependency
from litestar.params import FromPath, HeaderParameter, QueryParameter
from litestar.response import Stream
from litestar.status_codes import HTTP_204_NO_CONTENT

from app.auth.principal import Principal
from app.chat.conversations import load_conversation
from app.openapi import errors
from app.streaming.broker import BrokerUnavailable
from app.streaming.core import StreamingCore
from app.streaming.events import Cursor, GenerationEvent, json_encoder

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    "Connection": "keep-alive",
    # Tells nginx-style proxies not to buffer the stream.
    "X-Accel-Buffering": "no",
}
OK_COMMENT = b":ok\n\n"
PING_COMMENT = b": ping\n\n"
# The broker went down under a reader: say so (no `id:`, so the cursor stays on the last
# real event) and end; `retry:` has a browser's EventSource reconnect and resume in 2 s.
UNAVAILABLE = (
    b"retry: 2000\nevent: unavailable\n"
    b'data: {"code":"broker_unavailable","message":"the event stream was lost; '
    b'reconnect with your last cursor","retryAfter":2}\n\n'
)


def encode_frame(event: GenerationEvent) -> bytes:
    """One SSE message: `event: <type>`, `id: <generationId>.<seq>`, `data: <json>`."""
    tag = type(event).__struct_config__.tag
    return b"event: %s\nid: %s.%d\ndata: %s\n\n" % (
        str(tag).encode(),
        str(event.generation_id).encode(),
        event.seq,
        json_encoder.encode(event),
    )


async def sse_frames(
    core: StreamingCore, generation_id: UUID, after: int, ping_interval: float
) -> AsyncIterator[bytes]:
    """The response body: `:ok` at once, then every event after `after` (a backlog as one
    write), `: ping` when idle, and the end after the terminal event."""
    attached = False
    try:
        try:
            await core.attach(generation_id)
            attached = True
            yield OK_COMMENT
            async for batch in core.follow(generation_id, after, ping_interval):
                yield b"".join(encode_frame(event) for event in batch) if batch else PING_COMMENT
        except BrokerUnavailable:
            yield UNAVAILABLE
    finally:
        if attached:
            core.detach(generation_id)


@get(
    "/conversations/{conversation_id:uuid}/stream",
    tags=["stream"],
    summary="Server-Sent Events of the conversation's answer",
    description=(
        "Attaches to the running answer, or starts one for an unanswered last user message; 204 when "
        "there is nothing to stream. Each event has `event: <type>`, `id: <generationId>.<seq>` and "
        "`data: <json>`; resume with `Last-Event-ID` (or `?after=`). The response ends after the "
        "terminal event (`done`, `cancelled` or `error`)."
    ),
    media_type="text/event-stream",
    responses=errors(400, 404),
)
async def stream_conversation(
    principal: NamedDependency[Principal],
    core: NamedDependency[StreamingCore],
    conversation_id: FromPath[UUID],
    after: Annotated[str | None, QueryParameter(description="cursor `<generationId>.<seq>` to resume after")] = None,
    last_event_id: Annotated[str | None, HeaderParameter(name="Last-Event-ID")] = None,
) -> Response[None] | Stream:
    conversation = await load_conversation(principal, conversation_id)
    # The browser's Last-Event-ID wins over ?after=; each is named in errors as sent.
    field, source, raw_cursor = (
        ("Last-Event-ID", "header", last_event_id) if last_event_id else ("after", "query", after)
    )
    cursor = Cursor.parse(raw_cursor, field, source=source) if raw_cursor else None
    target = await core.resolve_stream(conversation, cursor, cursor_field=field, cursor_source=source)
    if target is None:
        # 204 also tells a browser's EventSource to stop reconnecting.
        return Response(None, status_code=HTTP_204_NO_CONTENT)
    generation_id, after_seq = target
    return Stream(
        sse_frames(core, generation_id, after_seq, core.sse_ping_interval),
        media_type="text/event-stream",
        headers=SSE_HEADERS,
    )
