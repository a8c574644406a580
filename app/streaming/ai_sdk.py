"""The Vercel AI SDK's UI message stream (protocol v1) as a view over our generation events.

`POST /api/ai-sdk/chat` takes what the AI SDK's `DefaultChatTransport` sends (`useChat`),
posts the last user message through the chat service, and streams the answer it started;
`GET /api/ai-sdk/chat/{id}/stream` is `useChat({resume: true})`'s reconnect: the running
answer of the conversation from its start, or 204 when nothing runs.

Nothing here produces an answer: both routes follow the same generation log as the SSE and
WebSocket transports (`core.follow`) and translate each event into UI message chunks
(:class:`UIMessageView`), written as SSE `data: {json}` lines and ended by `data: [DONE]`.
See docs/ai-sdk.md.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from uuid import UUID

import msgspec
from litestar import Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from litestar.response import Stream
from litestar.status_codes import HTTP_200_OK, HTTP_204_NO_CONTENT

from app.auth.principal import Principal
from app.chat.conversations import load_conversation
from app.chat.generations import agent_of
from app.chat.messages import no_agent, post_message
from app.chat.schemas import MessageCreate
from app.errors import invalid_field
from app.openapi import errors, nothing_to_stream
from app.streaming.core import StreamingCore
from app.streaming.events import (
    Cancelled,
    Done,
    Error,
    GenerationEvent,
    PartDelta,
    PartEnd,
    PartStart,
    Snapshot,
    Token,
    fold,
    is_terminal,
)
from app.streaming.parts import AnswerParts, Part
from app.streaming.policy import BusyPolicy, PartialPolicy
from app.streaming.sse import SSE_HEADERS, StreamQuota, reader_frames
from app.text_types import ClientMessageId

logger = logging.getLogger("chatstream.ai_sdk")

# -- the chunks (ai@6 `uiMessageChunkSchema`) -----------------------------------------------


class _Chunk(msgspec.Struct, tag_field="type", rename="camel", kw_only=True, omit_defaults=True):
    pass


class StartChunk(_Chunk, tag="start"):
    message_id: str
    message_metadata: dict[str, Any]


class StartStep(_Chunk, tag="start-step"):
    pass


class FinishStep(_Chunk, tag="finish-step"):
    pass


class Finish(_Chunk, tag="finish"):
    finish_reason: str | None = None
    message_metadata: dict[str, Any] | None = None


class Abort(_Chunk, tag="abort"):
    reason: str | None = None


class ErrorChunk(_Chunk, tag="error"):
    error_text: str


class TextStart(_Chunk, tag="text-start"):
    id: str


class TextDelta(_Chunk, tag="text-delta"):
    id: str
    delta: str


class TextEnd(_Chunk, tag="text-end"):
    id: str


class ReasoningStart(_Chunk, tag="reasoning-start"):
    id: str


class ReasoningDelta(_Chunk, tag="reasoning-delta"):
    id: str
    delta: str


class ReasoningEnd(_Chunk, tag="reasoning-end"):
    id: str


class ToolInputStart(_Chunk, tag="tool-input-start"):
    tool_call_id: str
    tool_name: str


class ToolInputDelta(_Chunk, tag="tool-input-delta"):
    tool_call_id: str
    input_text_delta: str


class ToolInputAvailable(_Chunk, tag="tool-input-available"):
    tool_call_id: str
    tool_name: str
    input: Any  # no default: sent even when null


class ToolInputError(_Chunk, tag="tool-input-error"):
    tool_call_id: str
    tool_name: str
    input: Any  # the arguments' raw text, as streamed
    error_text: str


class ToolOutputAvailable(_Chunk, tag="tool-output-available"):
    tool_call_id: str
    output: Any


class ToolOutputError(_Chunk, tag="tool-output-error"):
    tool_call_id: str
    error_text: str


class DataChunk(msgspec.Struct, kw_only=True):
    """`data-<name>`: the type names the data part, so it is a field, not a struct tag."""

    type: str
    data: Any


UIChunk = (
    StartChunk
    | StartStep
    | FinishStep
    | Finish
    | Abort
    | ErrorChunk
    | TextStart
    | TextDelta
    | TextEnd
    | ReasoningStart
    | ReasoningDelta
    | ReasoningEnd
    | ToolInputStart
    | ToolInputDelta
    | ToolInputAvailable
    | ToolInputError
    | ToolOutputAvailable
    | ToolOutputError
    | DataChunk
)

# One encoder for every chunk of every reader.
_encoder = msgspec.json.Encoder()

UI_MESSAGE_STREAM_HEADERS = {**SSE_HEADERS, "x-vercel-ai-ui-message-stream": "v1"}
DONE_FRAME = b"data: [DONE]\n\n"

# Our finish reasons (OpenAI's spelling) to the AI SDK's enum; anything else is "other".
_FINISH_REASONS = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool-calls",
    "content_filter": "content-filter",
    "error": "error",
}


def encode_chunks(chunks: list[UIChunk]) -> bytes:
    """SSE frames, one `data: <json>` line each."""
    return b"".join(b"data: %s\n\n" % _encoder.encode(chunk) for chunk in chunks)


# How a stream ends early: the credentials went, or the broker did (the client may resume).
REVOKED = encode_chunks(
    [ErrorChunk(error_text="credentials_revoked: the credentials of this stream were revoked or expired")]
)
UNAVAILABLE = encode_chunks([ErrorChunk(error_text="broker_unavailable: the event stream was lost; resume the stream")])
EXPIRED = encode_chunks(
    [ErrorChunk(error_text="token_expired: the access token of this stream expired; resume with a new token")]
)


# -- the view --------------------------------------------------------------------------------


@dataclass
class _Sent:
    """What the client has been sent of one part."""

    text: int = 0  # characters of its text (or a tool call's arguments) sent
    ended: bool = False


class UIMessageView:
    """One generation's events, in order, as UI message chunks for one reader.

    The events are folded into the answer's parts (the same fold as the log's and the
    core's); after each event the parts it touched are compared with what this reader was
    sent, and the difference goes out. So a `snapshot` (a reader whose window is gone)
    brings every part so far, open ones opened and not ended, and the client's message
    comes out the same as a reader's that saw every event.
    """

    def __init__(self) -> None:
        self._answer = AnswerParts()
        self._sent: list[_Sent] = []
        self._calls: set[str] = set()  # tool call ids the client knows (a result needs its call)
        self._started = False
        self.finished = False

    def chunks(self, event: GenerationEvent) -> list[UIChunk]:
        """The chunks for the next event (none after the terminal event)."""
        if self.finished:
            return []
        out: list[UIChunk] = []
        if not self._started:  # the first event may be a snapshot, never a `start`
            self._started = True
            metadata = {"generationId": str(event.generation_id), "conversationId": str(event.conversation_id)}
            out += [StartChunk(message_id=str(event.generation_id), message_metadata=metadata), StartStep()]
        if isinstance(event, Snapshot) and not event.parts and event.text:
            # A snapshot of an answer stored before parts existed: its text is one text part.
            event = msgspec.structs.replace(event, parts=[Part(kind="text", state="streaming", text=event.text)])
        try:
            fold(self._answer, event)
        except ValueError as exc:  # the core orders part events; a misfit is a bug, not a reader's fault
            logger.warning("generation %s: event %d skipped: %s", event.generation_id, event.seq, exc)
            return out
        parts = self._answer.parts
        if isinstance(event, Token | PartDelta):
            # The common case, a piece of a part the client has open: the event's text is the delta.
            index = len(parts) - 1 if isinstance(event, Token) else event.part
            sent = self._sent[index] if index < len(self._sent) else None
            if sent is not None and not sent.ended:
                sent.text += len(event.text)
                return out + self._grow(index, parts[index], event.text)
        touched: range | tuple[int, ...] = ()
        if isinstance(event, Token):
            touched = (len(parts) - 1,)
        elif isinstance(event, PartStart):
            touched = range(max(event.part - 1, 0), event.part + 1)  # the text part it closes, and itself
        elif isinstance(event, PartDelta | PartEnd):
            touched = (event.part,)
        elif isinstance(event, Snapshot):
            touched = range(len(parts))
        for index in touched:
            out += self._sync(index, parts[index])
        if is_terminal(event):
            self.finished = True
            out += self._terminal(event)
        return out

    def _sync(self, index: int, part: Part) -> list[UIChunk]:
        """The chunks that bring the client's copy of part `index` up to `part`."""
        out: list[UIChunk] = []
        if index == len(self._sent):
            self._sent.append(_Sent())
            out += self._open(index, part)
        sent = self._sent[index]
        if sent.ended:
            return out
        text = self._answer.part_text(index)
        if len(text) > sent.text:
            out += self._grow(index, part, text[sent.text :])
            sent.text = len(text)
        # `incomplete` (a snapshot of an answer cut by a cancel) stays open, like `streaming`.
        if part.state in ("complete", "invalid"):
            sent.ended = True
            out += self._close(index, part)
        return out

    def _open(self, index: int, part: Part) -> list[UIChunk]:
        pid = str(index)
        if part.kind == "text":
            return [TextStart(id=pid)]
        if part.kind == "reasoning":
            return [ReasoningStart(id=pid)]
        if part.kind == "tool_call":
            self._calls.add(_call_id(index, part))
            return [ToolInputStart(tool_call_id=_call_id(index, part), tool_name=part.name or "tool")]
        return []  # tool results and data go out whole when they end

    def _grow(self, index: int, part: Part, more: str) -> list[UIChunk]:
        if part.kind == "text":
            return [TextDelta(id=str(index), delta=more)]
        if part.kind == "reasoning":
            return [ReasoningDelta(id=str(index), delta=more)]
        if part.kind == "tool_call":
            return [ToolInputDelta(tool_call_id=_call_id(index, part), input_text_delta=more)]
        return []

    def _close(self, index: int, part: Part) -> list[UIChunk]:
        call_id = _call_id(index, part)
        name = part.name or "tool"
        if part.kind == "text":
            return [TextEnd(id=str(index))]
        if part.kind == "reasoning":
            return [ReasoningEnd(id=str(index))]
        if part.kind == "tool_call":
            if part.state == "invalid":
                error = part.error or "the arguments are not a JSON object"
                return [ToolInputError(tool_call_id=call_id, tool_name=name, input=part.text, error_text=error)]
            return [ToolInputAvailable(tool_call_id=call_id, tool_name=name, input=part.value)]
        if part.kind == "tool_result":
            out: list[UIChunk] = []
            if call_id not in self._calls:
                # The client attaches an output to its tool call and fails without one.
                self._calls.add(call_id)
                out.append(ToolInputAvailable(tool_call_id=call_id, tool_name=name, input=None))
            if part.error is not None:
                out.append(ToolOutputError(tool_call_id=call_id, error_text=part.error))
            else:
                out.append(ToolOutputAvailable(tool_call_id=call_id, output=part.value))
            return out
        return [DataChunk(type=f"data-{part.name or 'data'}", data=part.value)]

    def _terminal(self, event: GenerationEvent) -> list[UIChunk]:
        if isinstance(event, Done):
            out: list[UIChunk] = []
            for index, part in enumerate(self._answer.parts):
                sent = self._sent[index]
                if not sent.ended and part.kind in ("text", "reasoning"):
                    sent.ended = True
                    out.append(TextEnd(id=str(index)) if part.kind == "text" else ReasoningEnd(id=str(index)))
            reason = _FINISH_REASONS.get(event.finish_reason, "other")
            return [
                *out,
                FinishStep(),
                Finish(finish_reason=reason, message_metadata={"messageId": str(event.message_id)}),
            ]
        if isinstance(event, Cancelled):
            return [Abort(reason=event.reason)]
        if isinstance(event, Error):
            return [ErrorChunk(error_text=f"{event.code}: {event.message}")]
        return []


def _call_id(index: int, part: Part) -> str:
    # Every tool part carries its call id; the fallback only keeps a broken one addressable.
    return part.tool_call_id or f"part-{index}"


# -- the response body ------------------------------------------------------------------------


def ui_message_frames(
    core: StreamingCore, principal: Principal, generation_id: UUID, ping_interval: float
) -> AsyncIterator[bytes]:
    """The whole answer of `generation_id` from its start as UI message chunks, `: ping` when
    idle, then `data: [DONE]`. Revoked credentials or a lost broker end it with an `error` chunk."""
    view = UIMessageView()

    def encode(batch: list[GenerationEvent]) -> bytes:
        return encode_chunks([chunk for event in batch for chunk in view.chunks(event)])

    return reader_frames(
        core,
        principal,
        generation_id,
        0,
        ping_interval,
        encode,
        revoked=REVOKED,
        unavailable=UNAVAILABLE,
        expired=EXPIRED,
        end=DONE_FRAME,
    )


def _stream(core: StreamingCore, principal: Principal, generation_id: UUID) -> Stream:
    return Stream(
        ui_message_frames(core, principal, generation_id, core.sse_ping_interval),
        media_type="text/event-stream",
        headers=UI_MESSAGE_STREAM_HEADERS,
    )


# -- the routes --------------------------------------------------------------------------------


class UIPartIn(msgspec.Struct, kw_only=True):
    """A part of a UI message as the client sends it; only text parts are read."""

    type: str
    text: str | None = None


class UIMessageIn(msgspec.Struct, kw_only=True):
    id: ClientMessageId
    role: Literal["system", "user", "assistant"]
    parts: list[UIPartIn]


class ChatRequest(msgspec.Struct, rename="camel", kw_only=True):
    """The body `DefaultChatTransport` sends. `id` is our conversation id; only the last
    message is read (a user message: it is posted, its UI message id as `clientMessageId`);
    the conversation's history is the server's. `ifBusy`, `partial` and `disconnectGrace`
    are our policy overrides (the transport's `body` option adds them). Other fields are
    ignored."""

    id: UUID
    messages: Annotated[list[UIMessageIn], msgspec.Meta(min_length=1)]
    trigger: str = "submit-message"
    message_id: str | None = None
    if_busy: BusyPolicy | None = None
    partial: PartialPolicy | None = None
    disconnect_grace: Annotated[float, msgspec.Meta(ge=0, le=3600)] | None = None


def _message_to_post(data: ChatRequest) -> MessageCreate:
    if data.trigger != "submit-message":
        raise invalid_field("trigger", "only submit-message is supported", code="unsupported_trigger")
    last = data.messages[-1]
    if last.role != "user":
        # A tool output goes to POST /api/conversations/{id}/tool-results.
        raise invalid_field("messages", "the last message must be a user message")
    texts = [part.text for part in last.parts if part.type == "text"]
    if any(text is None for text in texts):
        raise invalid_field("messages", "a text part of the last message has no text")
    content = "".join(text for text in texts if text is not None)
    if not content.strip():
        raise invalid_field("messages", "the last message has no text")
    return MessageCreate(
        content=content,
        client_message_id=last.id,
        if_busy=data.if_busy,
        partial=data.partial,
        disconnect_grace=data.disconnect_grace,
    )


@post(
    "/ai-sdk/chat",
    status_code=HTTP_200_OK,
    tags=["ai-sdk"],
    summary="Post a user message and stream its answer as an AI SDK UI message stream (v1)",
    description=(
        "For the AI SDK's `useChat` / `DefaultChatTransport` (`api: '/api/ai-sdk/chat'`): `id` is the "
        "conversation, the last message (a user message) is posted with its id as `clientMessageId` "
        "(a retry posts nothing twice) and its answer is streamed from its start as `data: {json}` "
        "chunks, ending with `data: [DONE]`. 409 `no_agent` for a conversation without an agent. "
        "Stop an answer with `POST /api/generations/{generationId}/cancel` (the id is in the `start` "
        "chunk's messageMetadata): the stream ends with `abort`. See docs/ai-sdk.md."
    ),
    media_type="text/event-stream",
    responses=errors(400, 404, 409, 413, 429),
    middleware=[StreamQuota()],
)
async def ai_sdk_chat(
    principal: NamedDependency[Principal],
    core: NamedDependency[StreamingCore],
    data: JSONBody[ChatRequest],
) -> Stream:
    message = _message_to_post(data)
    conversation = await load_conversation(principal, data.id)
    if await agent_of(conversation) is None:
        raise no_agent(data.id)  # before posting: nothing is stored
    posted, _ = await post_message(principal, data.id, message, core)
    if posted.generation is None:  # the agent was removed meanwhile, or a retry of an unanswered message
        raise no_agent(data.id)
    return _stream(core, principal, posted.generation.id)


@get(
    "/ai-sdk/chat/{conversation_id:uuid}/stream",
    tags=["ai-sdk"],
    summary="Resume: the conversation's running answer as an AI SDK UI message stream; 204 when none runs",
    description=(
        "`useChat({resume: true})` calls this on mount and after a dropped connection: the running "
        "answer from its start (the client replaces its message with the replay), or 204 when no "
        "answer is running. It never starts an answer."
    ),
    media_type="text/event-stream",
    responses={**errors(404, 429), **nothing_to_stream("No answer is running")},
    middleware=[StreamQuota()],
)
async def ai_sdk_resume(
    principal: NamedDependency[Principal],
    core: NamedDependency[StreamingCore],
    conversation_id: FromPath[UUID],
) -> Response[None] | Stream:
    conversation = await load_conversation(principal, conversation_id)
    target = await core.resolve_stream(conversation, None, start_unanswered=False)
    if target is None:
        return Response(None, status_code=HTTP_204_NO_CONTENT)
    return _stream(core, principal, target[0])
