"""WebSocket transport: `GET /api/ws` — one socket per client, many conversations.

Each socket has a reader (client frames, checked against the limits, then done), per
subscribed conversation a task that forwards the conversation's feed and follows its
answers through the core, exactly like an SSE reader, and, while it follows the
conversation list (`subscribe_conversations`), a task that forwards the list's feed.
Everything to send goes through one bounded outbox, sent in order by a task that runs
only while the outbox has frames (an idle socket holds no writer task and no queue:
memory per open socket). A peer that
leaves the outbox full for `ws_send_timeout` seconds is told (`error` code `too_slow`) and
closed with 1013; it resumes with its cursors and loses nothing. The exception: while the
outbox is empty and nothing is being sent, the producer of an answer writes the answer's
next event itself (app/streaming/direct.py), without waking the answer's task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Sequence
from typing import Any
from uuid import UUID

import msgspec
from litestar import WebSocket, websocket
from litestar.di import NamedDependency
from litestar.exceptions import WebSocketDisconnect

from app import metrics
from app.auth.access_tokens import expiring_notice_lead, looks_like_access_token
from app.auth.middleware import credentials, principal_for, token_principal
from app.auth.principal import Principal
from app.chat.conversations import load_conversation
from app.chat.generations import get_generation, running_generation
from app.chat.messages import post_message
from app.chat.schemas import MessageCreate, ToolResultCreate
from app.chat.tool_results import post_tool_result
from app.config import Settings, get_settings
from app.db import OUTAGE_RETRY_AFTER, is_outage
from app.errors import ApiError, InvalidInput, Unauthorized
from app.http_security import same_origin_request
from app.streaming.broker import BrokerUnavailable, ConversationFeed, FeedOverflow, ListFeed
from app.streaming.core import StreamingCore
from app.streaming.direct import DirectReader, start
from app.streaming.events import Cursor, GenerationEvent, json_encoder
from app.streaming.protocol import (
    MSGPACK_SUBPROTOCOL,
    PROTOCOL_VERSION,
    Ack,
    Cancel,
    ClientFrame,
    ConversationDeleted,
    ConversationReset,
    ErrorFrame,
    GenerationStarted,
    Hello,
    HelloLimits,
    OutgoingFrame,
    Ping,
    Pong,
    Refresh,
    Send,
    Subscribe,
    SubscribeConversations,
    TokenExpiring,
    ToolResult,
    Unsubscribe,
    UnsubscribeConversations,
    json_client_decoder,
    msgpack_client_decoder,
    msgpack_encoder,
)
from app.tables import GenerationStatus

logger = logging.getLogger("chatstream.ws")

CLOSE_UNAUTHORIZED = 4401
CLOSE_ORIGIN_REFUSED = 4403
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_INTERNAL_ERROR = 1011
CLOSE_SERVICE_RESTART = 1012
# Seconds a client told to come back later (too slow, server restarting) is asked to wait.
RECONNECT_AFTER = 1
# Limit violations in a row (a valid frame resets the count) before the socket is closed.
MAX_VIOLATIONS_IN_A_ROW = 5
# Batches waiting for the writer; each batch is whatever piled up for one reader.
OUTBOX_BATCHES = 64
CLOSE_TIMEOUT = 5.0


class SocketClosing(Exception):
    """Raised inside the session to end it with a close code."""

    def __init__(self, code: int, reason: str, notice: ErrorFrame | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.notice = notice


async def _authenticate(socket: WebSocket[Any, Any, Any], settings: Settings) -> Principal:
    """The caller, or SocketClosing with 4401 (credentials) or 4403 (foreign origin with a cookie)."""
    try:
        token = credentials(socket)
    except Unauthorized as exc:
        raise SocketClosing(CLOSE_UNAUTHORIZED, exc.message) from exc
    if token is None:
        raise SocketClosing(CLOSE_UNAUTHORIZED, "authentication required: Authorization: Bearer <api key>")
    cookie_only = socket.headers.get("authorization") is None
    # A client sending neither Origin nor Sec-Fetch-Site is no browser: no ambient cookie risk.
    if cookie_only and not same_origin_request(socket.headers, settings, allow_without_headers=True):
        raise SocketClosing(CLOSE_ORIGIN_REFUSED, "origin not allowed for cookie authentication")
    try:
        return await principal_for(socket, token)
    except Unauthorized as exc:
        raise SocketClosing(CLOSE_UNAUTHORIZED, exc.message) from exc
    except Exception as exc:
        if not is_outage(exc):
            raise
        logger.warning("websocket refused: the database cannot be reached (%s)", type(exc).__name__)
        raise SocketClosing(CLOSE_TRY_AGAIN_LATER, "database unavailable", database_unavailable(None)) from exc


class Codec:
    """JSON text frames, or MessagePack binary frames (subprotocol `chatstream.msgpack`)."""

    def __init__(self, msgpack: bool) -> None:
        self.msgpack = msgpack

    def decode(self, data: str | bytes) -> ClientFrame:
        frame: ClientFrame
        if isinstance(data, bytes) and self.msgpack:
            frame = msgpack_client_decoder.decode(data)
        else:
            frame = json_client_decoder.decode(data)
        return frame

    def raw_ref(self, data: str | bytes) -> str | None:
        """The `ref` of a frame that failed to decode, if it can be read at all."""
        try:
            raw = (
                msgspec.msgpack.decode(data) if isinstance(data, bytes) and self.msgpack else msgspec.json.decode(data)
            )
        except (msgspec.DecodeError, UnicodeDecodeError, TypeError, RecursionError):
            return None
        ref = raw.get("ref") if isinstance(raw, dict) else None
        return ref if isinstance(ref, str) and len(ref) <= 64 else None

    def encode(self, frame: OutgoingFrame) -> bytes:
        return msgpack_encoder.encode(frame) if self.msgpack else json_encoder.encode(frame)

    def encode_event(self, batch: list[GenerationEvent]) -> bytes:
        """The one event of `batch` (the producer's append gives one at a time), as a frame."""
        (event,) = batch
        return self.encode(event)

    def send_encoded(self, socket: WebSocket[Any, Any, Any], data: bytes) -> Awaitable[None]:
        """Send one frame made by :meth:`encode` (the ASGI message itself: `send_text` and
        `send_data` would add two coroutines to every token)."""
        if self.msgpack:
            return socket.send({"type": "websocket.send", "bytes": data, "text": None})
        return socket.send({"type": "websocket.send", "bytes": None, "text": data.decode()})

    async def send(self, socket: WebSocket[Any, Any, Any], frame: OutgoingFrame) -> None:
        await self.send_encoded(socket, self.encode(frame))


class _AnswerWriter(DirectReader):
    """Writes an answer's events to the socket from the producer's append, while nothing
    else of the session waits to be sent (frames stay in order); else they queue."""

    def __init__(self, session: Session) -> None:
        super().__init__(session.codec.encode_event)
        self.encoding = ("ws", session.codec.msgpack)
        self.session = session

    def start_write(self, data: bytes) -> Awaitable[None] | None:
        session = self.session
        if session.sending or session.outbox or session.closing.done():
            return session.deliver(data)
        rest = start(session.codec.send_encoded(session.socket, data))
        return None if rest is None else session.finish_send(rest)


class Session:
    """One authenticated socket."""

    def __init__(
        self,
        socket: WebSocket[Any, Any, Any],
        principal: Principal,
        core: StreamingCore,
        codec: Codec,
        settings: Settings,
    ) -> None:
        self.socket = socket
        self.principal = principal
        self.core = core
        self.codec = codec
        self.settings = settings
        # What waits to be sent, in order: batches of frames, or one frame already encoded (an
        # answer's event the producer could not write itself). `draining` sends it while it has
        # any; `room` is set when a full outbox has room again.
        self.outbox: deque[Sequence[OutgoingFrame] | bytes] = deque()
        self.draining: asyncio.Task[None] | None = None
        self.room: asyncio.Future[None] | None = None
        # Frames being written (the outbox's, or one the producer began): while there are
        # any, an answer's next event queues behind them instead of being written directly.
        self.sending = 0
        self.subscriptions: dict[UUID, asyncio.Task[None]] = {}
        # Forwards the conversation list while the socket follows it (not counted in the limit).
        self.conversation_list: asyncio.Task[None] | None = None
        self.violations = 0
        self.closing: asyncio.Future[SocketClosing] = asyncio.get_running_loop().create_future()
        self.ended = asyncio.Event()  # set once the socket is closed
        # Set by a `refresh` (a socket opened with an access token): the token watch starts over.
        self.token_refreshed = asyncio.Event()

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self) -> None:
        """Greet the client, then serve the socket until the peer leaves, the session closes
        it, its key or session is revoked (on any process; see StreamingCore.revoke_credentials),
        or the server stops (:func:`close_every_socket`)."""
        await self.codec.send(self.socket, hello(self.settings, self.core))
        _open_sessions.add(self)
        try:
            with self.core.credentials.holding(self.principal.key_id, self.principal.session_id, self._revoked):
                await self._serve()
        finally:
            _open_sessions.discard(self)
            self.ended.set()

    def _revoked(self) -> None:
        self.close_later(credentials_revoked())

    async def _serve(self) -> None:
        reader = asyncio.create_task(self._read_loop())
        token_watch = asyncio.create_task(self._watch_token()) if self.principal.by_token else None
        try:
            waiting: set[asyncio.Future[Any]] = {reader, self.closing}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            tasks = [reader, *self.subscriptions.values()]
            if token_watch is not None:
                tasks.append(token_watch)
            if self.draining is not None:
                tasks.append(self.draining)
            if self.conversation_list is not None:
                tasks.append(self.conversation_list)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.closing.done():
            await self._close(self.closing.result())

    async def _watch_token(self) -> None:
        """A socket opened with an access token: tell the client `token_expiring` a while before
        the token expires (60 s, or half its life for a short one), and close the socket at the
        expiry (`error` `token_expired`, 4401) unless a `refresh` brought a new token first."""
        loop = asyncio.get_running_loop()
        while True:
            self.token_refreshed.clear()
            expires_at = self.principal.token_expires_at
            assert expires_at is not None
            ends = loop.time() + (expires_at.timestamp() - time.time())
            for deadline in (ends - expiring_notice_lead(self.principal), ends):
                try:
                    async with asyncio.timeout_at(deadline):
                        await self.token_refreshed.wait()
                    break  # a new token: start over with its expiry
                except TimeoutError:
                    if deadline == ends:
                        self.close_later(token_expired())
                        return
                    expires_in = round(max(0.0, ends - loop.time()), 3)
                    await self.deliver([TokenExpiring(expires_at=expires_at, expires_in=expires_in)])

    async def _refresh(self, frame: Refresh) -> None:
        """Take the new access token of a `refresh`: valid, and for the same key, session,
        company and role as the socket's (its rights and its revocation stay the same)."""
        if not self.principal.by_token:
            raise InvalidInput(
                "this socket was opened with an API key or a session, not an access token: nothing to refresh"
            )
        if not looks_like_access_token(frame.token):
            raise Unauthorized("refresh takes an access token (POST /api/tokens), not an API key", code="invalid_token")
        try:
            principal = await token_principal(self.socket.app.state.principal_cache, frame.token)
        except Unauthorized as exc:
            raise Unauthorized(exc.message, code="invalid_token", details={"reason": exc.code}) from None
        old = self.principal
        if (principal.key_id, principal.session_id, principal.company_id, principal.role) != (
            old.key_id,
            old.session_id,
            old.company_id,
            old.role,
        ):
            raise Unauthorized(
                "the new token is for other credentials; a socket keeps its key (connect again for another)",
                code="invalid_token",
            )
        self.principal = principal
        self.token_refreshed.set()
        await self.deliver([Ack(ref=frame.ref)])

    def close_later(self, closing: SocketClosing) -> None:
        """Ask the session to end (from any of its tasks)."""
        if not self.closing.done():
            self.closing.set_result(closing)

    async def _close(self, closing: SocketClosing) -> None:
        if closing.notice is not None and closing.notice.code == "too_slow":
            metrics.slow_websocket_closed()
        # The peer may not be reading: bound the goodbye, the server closes the transport anyway.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                if closing.notice is not None:
                    await self.codec.send(self.socket, closing.notice)
                await self.socket.close(closing.code, closing.reason)

    async def _drain(self) -> None:
        """Send the outbox in order until it is empty, then end (the next `deliver` starts
        another). A send that fails (the peer is gone) ends the session."""
        try:
            while self.outbox:
                batch = self.outbox.popleft()
                if self.room is not None:
                    self.room.set_result(None)
                    self.room = None
                self.sending += 1
                try:
                    if isinstance(batch, bytes):
                        await self.codec.send_encoded(self.socket, batch)
                    else:
                        for frame in batch:
                            await self.codec.send(self.socket, frame)
                finally:
                    self.sending -= 1
        except Exception:  # noqa: BLE001 - the peer is gone, or a frame could not be sent: the session ends
            self.close_later(SocketClosing(CLOSE_INTERNAL_ERROR, "sending failed"))
        finally:
            self.draining = None

    async def finish_send(self, rest: Awaitable[None]) -> None:
        """Finish a frame the producer began to write (the peer reads slowly): within
        `ws_send_timeout`, else the peer is too slow, as with a full outbox."""
        self.sending += 1
        try:
            async with asyncio.timeout(self.settings.ws_send_timeout):
                await rest
        except TimeoutError:
            self.close_later(too_slow())
            raise asyncio.CancelledError from None
        finally:
            self.sending -= 1

    async def deliver(self, frames: Sequence[OutgoingFrame] | bytes) -> None:
        """Queue frames (or one encoded frame) to be sent after what is queued already; a
        peer that keeps the outbox full for `ws_send_timeout` is too slow."""
        if len(self.outbox) >= OUTBOX_BATCHES:  # not the usual case: no timer armed per batch
            try:
                async with asyncio.timeout(self.settings.ws_send_timeout):
                    while len(self.outbox) >= OUTBOX_BATCHES:
                        if self.room is None:
                            self.room = asyncio.get_running_loop().create_future()
                        # Shielded: the future is shared by every task waiting for room.
                        await asyncio.shield(self.room)
            except TimeoutError:
                self.close_later(too_slow())
                raise asyncio.CancelledError from None
        self.outbox.append(frames)
        if self.draining is None and not self.closing.done():  # a closing session sends no more
            self.draining = asyncio.create_task(self._drain())

    # -- client frames -------------------------------------------------------------------

    async def _read_loop(self) -> None:
        while True:
            event: dict[str, Any] = dict(await self.socket.receive())
            if event["type"] == "websocket.disconnect":
                return
            data = event.get("text")
            if data is None:
                data = event.get("bytes")
            if isinstance(data, str | bytes):
                await self._handle(data)

    async def _handle(self, data: str | bytes) -> None:
        violations = self.violations
        await self._handle_frame(data)
        if self.violations == violations:  # a frame within the limits ends a run of violations
            self.violations = 0

    async def _handle_frame(self, data: str | bytes) -> None:
        size = len(data) if isinstance(data, bytes) else len(data.encode())
        if size > self.settings.ws_max_frame_bytes:
            limit = self.settings.ws_max_frame_bytes
            return await self._violation(None, "frame_too_large", f"frames are limited to {limit} bytes")
        # Counted per key, over all its sockets (on every process when they share Redis).
        retry_after = await self.core.quotas.frames.take(self.principal.key_id)
        if retry_after is not None:
            limit = self.settings.ws_frames_per_minute
            message = f"at most {limit} frames per minute; retry in {retry_after} s"
            details = {"retryAfter": retry_after}
            return await self._violation(self.codec.raw_ref(data), "rate_limited", message, details)
        try:
            frame = self.codec.decode(data)
        except msgspec.ValidationError as exc:
            unknown = str(exc).startswith("Invalid value") and "$.type" in str(exc)
            return await self._violation(
                self.codec.raw_ref(data), "unknown_type" if unknown else "invalid_frame", str(exc)
            )
        except msgspec.DecodeError as exc:
            return await self._violation(None, "malformed_frame", f"not a valid frame: {exc}")
        except RecursionError:
            return await self._violation(None, "malformed_frame", "not a valid frame: nested too deeply")
        except UnicodeDecodeError:  # a msgpack `str`, or a JSON binary frame, that is not UTF-8
            return await self._violation(None, "malformed_frame", "not a valid frame: text is not valid UTF-8")
        try:
            await self._dispatch(frame)
        except ApiError as exc:
            await self.deliver([ErrorFrame(ref=frame.ref, code=exc.code, message=exc.message, details=exc.details)])
        except BrokerUnavailable:
            await self.deliver([broker_unavailable(frame.ref)])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            metrics.database_error("websocket", exc)
            if is_outage(exc):  # not a bug: the client retries later
                logger.warning("websocket frame %s: the database cannot be reached", type(frame).__name__)
                await self.deliver([database_unavailable(frame.ref)])
                return
            logger.exception("websocket frame %s failed", type(frame).__name__)
            await self.deliver([ErrorFrame(ref=frame.ref, code="internal_error", message="internal server error")])

    async def _violation(self, ref: str | None, code: str, message: str, details: object = None) -> None:
        await self.deliver([ErrorFrame(ref=ref, code=code, message=message, details=details)])
        self.violations += 1
        if self.violations >= MAX_VIOLATIONS_IN_A_ROW:
            self.close_later(SocketClosing(CLOSE_POLICY_VIOLATION, f"too many invalid frames ({code})"))

    async def _dispatch(self, frame: ClientFrame) -> None:
        if isinstance(frame, Subscribe):
            await self._subscribe(frame)
        elif isinstance(frame, Unsubscribe):
            await self._end_subscription(frame.conversation_id)
            await self.deliver([Ack(ref=frame.ref, conversation_id=frame.conversation_id)])
        elif isinstance(frame, Send):
            data = MessageCreate(
                content=frame.content,
                client_message_id=frame.client_message_id,
                reply=frame.reply,
                if_busy=frame.if_busy,
                partial=frame.partial,
                disconnect_grace=frame.disconnect_grace,
            )
            posted, created = await post_message(self.principal, frame.conversation_id, data, self.core)
            ack = Ack(ref=frame.ref, message=posted.message, generation=posted.generation, created=created)
            await self.deliver([ack])
        elif isinstance(frame, ToolResult):
            result = ToolResultCreate(tool_call_id=frame.tool_call_id, output=frame.output, error=frame.error)
            posted, created = await post_tool_result(self.principal, frame.conversation_id, result, self.core)
            ack = Ack(ref=frame.ref, message=posted.message, generation=posted.generation, created=created)
            await self.deliver([ack])
        elif isinstance(frame, Cancel):
            generation = await get_generation(self.principal, frame.generation_id)
            if generation.status is GenerationStatus.running:
                await self.core.cancel(frame.generation_id, "user")
                generation = await get_generation(self.principal, frame.generation_id)
            await self.deliver([Ack(ref=frame.ref, generation=generation)])
        elif isinstance(frame, SubscribeConversations):
            if self.conversation_list is None:  # following it already: nothing to change, no gap
                principal = self.principal
                feed = self.core.open_list_feed(principal.company_id, None if principal.is_admin else principal.user_id)
                try:
                    await self.deliver([Ack(ref=frame.ref)])
                except BaseException:
                    self.core.close_list_feed(feed)
                    raise
                self.conversation_list = asyncio.create_task(self._follow_list(feed))
            else:
                await self.deliver([Ack(ref=frame.ref)])
        elif isinstance(frame, UnsubscribeConversations):
            await self._end_list()
            await self.deliver([Ack(ref=frame.ref)])
        elif isinstance(frame, Refresh):
            await self._refresh(frame)
        else:
            assert isinstance(frame, Ping)
            await self.deliver([Pong(ref=frame.ref)])

    async def _subscribe(self, frame: Subscribe) -> None:
        cid = frame.conversation_id
        if cid not in self.subscriptions and len(self.subscriptions) >= self.settings.ws_max_subscriptions:
            limit = self.settings.ws_max_subscriptions
            return await self._violation(frame.ref, "too_many_subscriptions", f"at most {limit} per socket")
        conversation = await load_conversation(self.principal, cid)
        cursor = Cursor.parse(frame.after, "after", source="frame") if frame.after else None
        # The feed opens first: an answer that starts from here on is announced in it, one that
        # started before is found by the lookup of the running answer that follows.
        feed = self.core.open_feed(cid)
        try:
            first = await self.core.resolve_stream(
                conversation, cursor, start_unanswered=False, cursor_field="after", cursor_source="frame"
            )
            # resolve_stream looked up the running answer unless the cursor named another one.
            look_again = cursor is not None
            # After the feed opened: an event is in the log read here, or in the feed, or both.
            latest, missed = await self.core.conversation_since(cid, frame.since)
            await self._end_subscription(cid)  # a new subscribe replaces the old one, after it has stopped
            frames: list[OutgoingFrame] = [Ack(ref=frame.ref, conversation_id=cid, conversation_seq=latest)]
            if missed is None:  # the client must reload, then go on from `latest`
                frames.append(ConversationReset(conversation_id=cid, conversation_seq=latest))
            else:
                frames.extend(missed)
            await self.deliver(frames)
        except BaseException:
            self.core.close_feed(feed)
            raise
        # Resuming: what the feed holds up to `latest` was just sent (from the log) or is older than the reset.
        seen = latest if frame.since is not None else 0
        self.subscriptions[cid] = asyncio.create_task(self._follow_conversation(cid, feed, first, look_again, seen))

    async def _end_subscription(self, conversation_id: UUID) -> None:
        """Stop following a conversation; returns once nothing more of it can be queued."""
        task = self.subscriptions.pop(conversation_id, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _end_list(self) -> None:
        """Stop following the conversation list; returns once nothing more of it can be queued."""
        task, self.conversation_list = self.conversation_list, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # -- subscriptions -------------------------------------------------------------------

    async def _follow_conversation(
        self,
        conversation_id: UUID,
        feed: ConversationFeed,
        first: tuple[UUID, int] | None,
        look_again: bool,
        seen: int,
    ) -> None:
        """Forward the conversation's events after `seen` (from `feed`, closed at the end) and
        follow its answers: `first`, then whatever starts; with `look_again`, also the answer
        running now (when `first` came from a cursor, a newer answer may run)."""
        answers: dict[UUID, asyncio.Task[None]] = {}

        def follow(generation_id: UUID, after: int) -> None:
            if generation_id not in answers:
                answers[generation_id] = asyncio.create_task(self._follow_answer(generation_id, after))

        try:
            if first is not None:
                follow(*first)
            running = await running_generation(conversation_id) if look_again else None
            if running is not None:
                follow(running["id"], 0)
            while True:
                event = await feed.get()
                if event.conversation_seq and event.conversation_seq <= seen:
                    continue  # sent already, from the conversation's log
                if isinstance(event, GenerationStarted):
                    follow(event.generation_id, 0)
                await self.deliver([event])
                if isinstance(event, ConversationDeleted):
                    return
        except FeedOverflow:
            self.close_later(too_slow())
        except BrokerUnavailable:
            self.close_later(broker_lost())
        finally:
            self.core.close_feed(feed)
            for task in answers.values():
                task.cancel()
            await asyncio.gather(*answers.values(), return_exceptions=True)
            if self.subscriptions.get(conversation_id) is asyncio.current_task():
                del self.subscriptions[conversation_id]

    async def _follow_list(self, feed: ListFeed) -> None:
        """Forward the conversation list's frames (from `feed`, closed at the end)."""
        try:
            while True:
                await self.deliver([await feed.get()])
        except FeedOverflow:
            self.close_later(too_slow())
        finally:
            self.core.close_list_feed(feed)
            if self.conversation_list is asyncio.current_task():
                self.conversation_list = None

    async def _follow_answer(self, generation_id: UUID, after: int) -> None:
        attached = False
        try:
            await self.core.attach(generation_id)
            attached = True
            async for batch in self.core.follow(generation_id, after, None, _AnswerWriter(self)):
                if batch:
                    await self.deliver(batch)
        except BrokerUnavailable:
            # Events may be lost from here: the client starts over from its cursors.
            self.close_later(broker_lost())
        finally:
            if attached:
                self.core.detach(generation_id)


def broker_unavailable(ref: str | None) -> ErrorFrame:
    """The frame for a request the broker (Redis) being down kept from being done."""
    message = "the server cannot reach its message broker; reconnect and subscribe with your last cursors"
    return ErrorFrame(ref=ref, code="broker_unavailable", message=message, details={"retryAfter": 2})


def database_unavailable(ref: str | None) -> ErrorFrame:
    """A frame could not be done, or a socket set up, because the database cannot be reached."""
    message = "the server cannot reach its database; retry shortly"
    return ErrorFrame(ref=ref, code="database_unavailable", message=message, details={"retryAfter": OUTAGE_RETRY_AFTER})


def broker_lost() -> SocketClosing:
    """The close after the broker went down under a subscription (its events may be lost)."""
    return SocketClosing(CLOSE_TRY_AGAIN_LATER, "broker unavailable", broker_unavailable(None))


def credentials_revoked() -> SocketClosing:
    """The close of a socket whose key was revoked or whose session ended or expired."""
    message = "the credentials of this connection were revoked or expired; sign in or use another key"
    notice = ErrorFrame(code="credentials_revoked", message=message)
    return SocketClosing(CLOSE_UNAUTHORIZED, "credentials revoked", notice)


def token_expired() -> SocketClosing:
    """The close of a socket whose access token expired without a `refresh`."""
    message = "the access token of this connection expired; connect again with a new token and resume with your cursors"
    return SocketClosing(CLOSE_UNAUTHORIZED, "token expired", ErrorFrame(code="token_expired", message=message))


def too_slow() -> SocketClosing:
    message = "this connection could not keep up; reconnect and subscribe with your last cursors"
    notice = ErrorFrame(code="too_slow", message=message, details={"retryAfter": RECONNECT_AFTER})
    return SocketClosing(CLOSE_TRY_AGAIN_LATER, "too slow", notice)


def hello(settings: Settings, core: StreamingCore) -> Hello:
    """The greeting: what a client tunes its timers and backoff with."""
    return Hello(
        protocol_version=PROTOCOL_VERSION,
        ping_interval=settings.ws_ping_interval,
        ping_timeout=settings.ws_ping_timeout,
        limits=HelloLimits(
            max_frame_bytes=settings.ws_max_frame_bytes,
            max_subscriptions=settings.ws_max_subscriptions,
            frames_per_minute=core.quotas.frames.per_minute,
            messages_per_minute=core.quotas.messages.per_minute,
        ),
        disconnect_grace=core.policy.disconnect_grace,
    )


# The sockets this process serves, told to come back later when it stops.
_open_sessions: weakref.WeakSet[Session] = weakref.WeakSet()


async def close_every_socket() -> None:
    """The server is stopping: tell every socket when to come back (an `error`
    `server_restarting` with `retryAfter`), close it with 1012, and wait until they are closed."""
    message = "the server is restarting; reconnect and resume with your cursors"
    notice = ErrorFrame(code="server_restarting", message=message, details={"retryAfter": RECONNECT_AFTER})
    sessions = list(_open_sessions)
    for session in sessions:
        session.close_later(SocketClosing(CLOSE_SERVICE_RESTART, "server restarting", notice))
    with contextlib.suppress(TimeoutError):  # each close is bounded (CLOSE_TIMEOUT) already
        async with asyncio.timeout(CLOSE_TIMEOUT + 1):
            await asyncio.gather(*(session.ended.wait() for session in sessions))


@websocket(
    "/ws",
    exclude_from_auth=True,  # authenticated here, so that a refusal is a close code and a reason
    summary="The WebSocket channel (see docs/protocol.md)",
)
async def ws_endpoint(socket: WebSocket[Any, Any, Any], core: NamedDependency[StreamingCore]) -> None:
    settings = get_settings()
    use_msgpack = MSGPACK_SUBPROTOCOL in socket.scope.get("subprotocols", [])
    await socket.accept(subprotocols=MSGPACK_SUBPROTOCOL if use_msgpack else None)
    codec = Codec(use_msgpack)
    try:
        principal = await _authenticate(socket, settings)
    except SocketClosing as refused:
        with contextlib.suppress(WebSocketDisconnect):
            if refused.notice is not None:  # "come back later" says when
                await codec.send(socket, refused.notice)
            await socket.close(refused.code, refused.reason)
        return
    socket.scope["user"] = principal  # as the auth middleware does: the request's log line names its company
    sockets = core.quotas.sockets
    full = sockets.acquire(principal.key_id, principal.company_id)
    if full is not None:  # past the key's or company's cap: say why, then "try again later"
        refusal = sockets.refusal(full, "too_many_sockets")
        with contextlib.suppress(WebSocketDisconnect):
            await codec.send(socket, ErrorFrame(code=refusal.code, message=refusal.message, details=refusal.details))
            await socket.close(CLOSE_TRY_AGAIN_LATER, "too many sockets")
        return
    metrics.websocket_opened()
    try:
        with contextlib.suppress(WebSocketDisconnect):
            await Session(socket, principal, core, codec, settings).run()
    finally:
        metrics.websocket_closed()
        sockets.release(principal.key_id, principal.company_id)
