"""SSE transport: `GET /api/conversations/{id}/stream`.

The response only reads: it follows the generation's log from the reader's cursor
and writes each batch of events at once. The generation belongs to the core, so a
reader leaving (the response being cancelled) cannot break it; the core is told in
`finally`, synchronously, and decides (disconnect grace) what that means. A reader whose
key is revoked, or whose session ends, gets `event: revoked` and the response ends; one
authenticated by an access token gets `event: expired` when the token expires, and ends.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from functools import lru_cache
from typing import Annotated, Any
from uuid import UUID

from litestar import Response, get
from litestar.di import NamedDependency
from litestar.enums import MediaType
from litestar.middleware import ASGIMiddleware
from litestar.params import FromPath, HeaderParameter, QueryParameter
from litestar.response import Stream
from litestar.response.base import ASGIResponse
from litestar.response.streaming import ASGIStreamingResponse
from litestar.status_codes import HTTP_204_NO_CONTENT
from litestar.types import ASGIApp, Receive, Scope, Send
from litestar.utils.helpers import get_enum_string_value

from app import metrics
from app.auth.principal import Principal
from app.chat.conversations import load_conversation
from app.openapi import errors, nothing_to_stream
from app.streaming.broker import BrokerUnavailable
from app.streaming.core import StreamingCore
from app.streaming.direct import DirectReader, start
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
# The reader's key was revoked or its session ended or expired: say so and end (no `id:`);
# a browser's EventSource that reconnects gets 401 and stops.
REVOKED = (
    b"event: revoked\n"
    b'data: {"code":"credentials_revoked","message":"the credentials of this stream were revoked or expired"}\n\n'
)

# The reader's access token expired: say so and end (no `id:`); reconnect with a new token
# and the last cursor (`Last-Event-ID`).
EXPIRED = (
    b"event: expired\n"
    b'data: {"code":"token_expired","message":"the access token of this stream expired; '
    b'reconnect with a new token and your last cursor"}\n\n'
)


@lru_cache(maxsize=4096)
def _frame_head(event_type: type[GenerationEvent], generation_id: UUID) -> bytes:
    # Made once per answer and event type: formatting a UUID on every token cost more than the JSON.
    return b"event: %s\nid: %s." % (str(event_type.__struct_config__.tag).encode(), str(generation_id).encode())


def encode_frame(event: GenerationEvent) -> bytes:
    """One SSE message: `event: <type>`, `id: <generationId>.<seq>`, `data: <json>`."""
    return b"%s%d\ndata: %s\n\n" % (
        _frame_head(type(event), event.generation_id),
        event.seq,
        json_encoder.encode(event),
    )


class BodyWriter(DirectReader):
    """Writes a stream response's events as body chunks, from the producer's own append
    while the reader is caught up (app/streaming/direct.py). :class:`ReaderStream` gives it
    the response's `send` when the body starts."""

    def __init__(self, encode: Callable[[list[GenerationEvent]], bytes], encoding: object | None) -> None:
        super().__init__(encode)
        self.encoding = encoding
        self.send: Send | None = None

    def start_write(self, data: bytes) -> Awaitable[None] | None:
        assert self.send is not None, "the body has not started"
        return start(self.send({"type": "http.response.body", "body": data, "more_body": True}))


class _ReaderResponse(ASGIStreamingResponse):
    """Litestar's streaming response, telling the body's writer the `send` it writes
    through, and watching for the client's disconnect with a plain asyncio task (Litestar's
    anyio task group cost more per stream, in CPU and in the memory of an idle stream)."""

    __slots__ = ("writer",)

    def __init__(self, *, writer: BodyWriter, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.writer = writer

    async def send_body(self, send: Send, receive: Receive) -> None:
        self.writer.send = send
        body = asyncio.current_task()
        assert body is not None
        watch = asyncio.create_task(_cancel_on_disconnect(receive, body))
        try:
            await self._stream(send)
        except asyncio.CancelledError:
            # The client left (the watch cancelled the body): the response just ends.
            left = watch.done() and not watch.cancelled() and watch.exception() is None
            if not (left and body.uncancel() == 0):
                raise
        finally:
            watch.cancel()


async def _cancel_on_disconnect(receive: Receive, body: asyncio.Task[Any]) -> None:
    """Cancel the response's `body` task when the client disconnects; returns (only) then."""
    while (await receive())["type"] != "http.disconnect":
        pass
    body.cancel()


class ReaderStream(Stream):
    """A `Stream` of a reader's body (see :func:`reader_frames`) that its `writer` may also
    write to directly."""

    __slots__ = ("writer",)

    def __init__(self, content: AsyncIterator[bytes], *, writer: BodyWriter, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.writer = writer

    def to_asgi_response(
        self,
        app: Any,
        request: Any,
        *,
        background: Any = None,
        cookies: Iterable[Any] | None = None,
        encoded_headers: Iterable[tuple[bytes, bytes]] | None = None,
        headers: dict[str, str] | None = None,
        is_head_response: bool = False,
        media_type: MediaType | str | None = None,
        status_code: int | None = None,
        type_encoders: Any = None,
    ) -> ASGIResponse:
        # As Litestar's Stream.to_asgi_response does it, but for the response class.
        assert isinstance(self.iterator, AsyncIterator)
        return _ReaderResponse(
            writer=self.writer,
            iterator=self.iterator,
            background=self.background or background,
            content_length=0,
            cookies=self.cookies if cookies is None else itertools.chain(self.cookies, cookies),
            encoded_headers=encoded_headers,
            encoding=self.encoding,
            headers={**headers, **self.headers} if headers is not None else self.headers,
            is_head_response=is_head_response,
            media_type=get_enum_string_value(media_type or self.media_type or MediaType.JSON),
            status_code=self.status_code or status_code,
        )


class _Revocation:
    """Ends a response body whose credentials are revoked. The body's task is cancelled only
    while it waits for events, never while a frame is being written (that would break the
    response mid-frame); a revocation during a write is seen before the next wait. The
    producer stops writing to the body at once."""

    def __init__(self, writer: DirectReader | None) -> None:
        self.task = asyncio.current_task()
        self.writer = writer
        self.waiting = False
        self.revoked = False
        self.expired = False  # it was the access token's expiry, not a revocation

    def expire(self) -> None:
        if not self.revoked:
            self.expired = True
            self()

    def __call__(self) -> None:
        self.revoked = True
        if self.writer is not None:
            self.writer.stop()
        if self.waiting and self.task is not None:
            self.task.cancel()

    def absorbs_cancel(self) -> bool:
        """After a CancelledError: True when only the revocation cancelled the task (it is
        then taken back); False when the task is being cancelled otherwise (a disconnect)."""
        return self.revoked and self.task is not None and self.task.uncancel() == 0


async def reader_frames(
    core: StreamingCore,
    principal: Principal,
    generation_id: UUID,
    after: int,
    ping_interval: float,
    encode: Callable[[list[GenerationEvent]], bytes],
    *,
    revoked: bytes,
    unavailable: bytes,
    expired: bytes,
    end: bytes = b"",
    writer: BodyWriter | None = None,
) -> AsyncIterator[bytes]:
    """A stream response's body, whatever its encoding: `:ok` at once, then every event after
    `after` (a backlog as one write, through `encode`), `: ping` when idle, and `end` after
    the terminal event; `revoked` when the principal's key is revoked or its session ends,
    `expired` when its access token expires, `unavailable` when the broker is lost. With
    `writer` (whose encoding is `encode`'s), the producer writes the events of a caught-up
    reader itself; they are not yielded here."""
    attached = False
    revocation = _Revocation(writer)
    expiry: asyncio.TimerHandle | None = None
    if principal.token_expires_at is not None:
        expiry = asyncio.get_running_loop().call_later(
            principal.token_expires_at.timestamp() - time.time(), revocation.expire
        )
    try:
        with core.credentials.holding(principal.key_id, principal.session_id, revocation):
            try:
                await core.attach(generation_id)
                attached = True
                metrics.sse_stream_opened()
                yield OK_COMMENT
                batches = core.follow(generation_id, after, ping_interval, writer)
                while not revocation.revoked:
                    revocation.waiting = True
                    try:
                        batch = await anext(batches)
                    except StopAsyncIteration:
                        break
                    except asyncio.CancelledError:
                        if not revocation.absorbs_cancel():
                            raise
                        break
                    finally:
                        revocation.waiting = False
                    yield encode(batch) if batch else PING_COMMENT
                if revocation.revoked:
                    yield expired if revocation.expired else revoked
            except BrokerUnavailable:
                yield unavailable
            if end:
                yield end
    finally:
        if expiry is not None:
            expiry.cancel()
        if attached:
            metrics.sse_stream_closed()
            core.detach(generation_id)


def _sse_batch(batch: list[GenerationEvent]) -> bytes:
    return b"".join(encode_frame(event) for event in batch)


def sse_stream(
    core: StreamingCore, principal: Principal, generation_id: UUID, after: int, ping_interval: float
) -> ReaderStream:
    """The SSE response: every event after `after` as `event:`/`id:`/`data:` messages (each
    event's frame made once for all its SSE readers)."""
    writer = BodyWriter(_sse_batch, encoding=_sse_batch)
    body = reader_frames(
        core,
        principal,
        generation_id,
        after,
        ping_interval,
        _sse_batch,
        revoked=REVOKED,
        unavailable=UNAVAILABLE,
        expired=EXPIRED,
        writer=writer,
    )
    return ReaderStream(body, writer=writer, media_type="text/event-stream", headers=SSE_HEADERS)


class StreamQuota(ASGIMiddleware):
    """Holds one of the caller's stream places for the whole response, however it ends
    (a try/finally around it: a disconnect can end a response before its body starts).
    Past the key's or the company's cap: 429 `too_many_streams`, before anything streams."""

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        principal = scope["user"]
        assert isinstance(principal, Principal)  # the route is authenticated
        quota = scope["litestar_app"].state.core.quotas.streams
        full = quota.acquire(principal.key_id, principal.company_id)
        if full is not None:
            raise quota.refusal(full, "too_many_streams")
        try:
            await next_app(scope, receive, send)
        finally:
            quota.release(principal.key_id, principal.company_id)


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
    responses={**errors(400, 404, 429), **nothing_to_stream("Nothing to stream: no answer runs or is due")},
    middleware=[StreamQuota()],
)
async def stream_conversation(
    principal: NamedDependency[Principal],
    core: NamedDependency[StreamingCore],
    conversation_id: FromPath[UUID],
    after: Annotated[str | None, QueryParameter(description="cursor `<generationId>.<seq>` to resume after")] = None,
    last_event_id: Annotated[str | None, HeaderParameter(name="Last-Event-ID")] = None,
) -> Response[None] | ReaderStream:
    conversation = await load_conversation(principal, conversation_id)
    # The browser's Last-Event-ID wins over ?after=; each is named in errors as sent.
    field, source, raw_cursor = (
        ("Last-Event-ID", "header", last_event_id) if last_event_id else ("after", "query", after)
    )
    cursor = Cursor.parse(raw_cursor, field, source=source) if raw_cursor else None
    target = await core.resolve_stream(
        conversation, cursor, cursor_field=field, cursor_source=source, starter=principal
    )
    if target is None:
        # 204 also tells a browser's EventSource to stop reconnecting.
        return Response(None, status_code=HTTP_204_NO_CONTENT)
    generation_id, after_seq = target
    return sse_stream(core, principal, generation_id, after_seq, core.sse_ping_interval)
