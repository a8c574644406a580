"""Routes: conversations, messages, edits, history. Parse, delegate, answer."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from litestar import Controller, Response, delete, get, patch, post, put
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody, QueryParameter
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED

from app.auth.principal import Principal
from app.chat import conversations, generations, messages, tool_results
from app.chat.schemas import (
    AnswerAgain,
    ConversationCreate,
    ConversationOut,
    ConversationPage,
    ConversationUpdate,
    GenerationOut,
    HistoryItem,
    MessageCreate,
    MessageEdit,
    MessageOut,
    MessagePage,
    MessagePosted,
    ToolResultCreate,
)
from app.limits import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from app.openapi import errors
from app.streaming.core import StreamingCore
from app.tables import GenerationStatus

Limit = Annotated[
    int,
    QueryParameter(ge=1, le=MAX_PAGE_SIZE, description=f"page size, at most {MAX_PAGE_SIZE}"),
]


class ConversationController(Controller):
    path = "/conversations"
    tags = ["conversations"]

    @get("/", summary="List conversations, newest activity first", responses=errors(400))
    async def list_conversations(
        self,
        principal: NamedDependency[Principal],
        cursor: Annotated[str | None, QueryParameter(description="`nextCursor` of the previous page")] = None,
        limit: Limit = DEFAULT_PAGE_SIZE,
    ) -> ConversationPage:
        return await conversations.list_conversations(principal, cursor, limit)

    @post("/", summary="Start a conversation", responses=errors(400, 404, 413))
    async def create_conversation(
        self,
        principal: NamedDependency[Principal],
        core: NamedDependency[StreamingCore],
        data: JSONBody[ConversationCreate],
    ) -> ConversationOut:
        return await conversations.create_conversation(principal, data, core)

    @get("/{conversation_id:uuid}", summary="Get a conversation", responses=errors(404))
    async def get_conversation(
        self, principal: NamedDependency[Principal], conversation_id: FromPath[UUID]
    ) -> ConversationOut:
        return await conversations.get_conversation(principal, conversation_id)

    @patch(
        "/{conversation_id:uuid}",
        summary="Change title and/or agent; only fields sent change, null clears",
        responses=errors(400, 404, 413),
    )
    async def update_conversation(
        self,
        principal: NamedDependency[Principal],
        core: NamedDependency[StreamingCore],
        conversation_id: FromPath[UUID],
        data: JSONBody[ConversationUpdate],
    ) -> ConversationOut:
        return await conversations.update_conversation(principal, conversation_id, data, core)

    @delete("/{conversation_id:uuid}", summary="Delete a conversation and its messages", responses=errors(404))
    async def delete_conversation(
        self,
        principal: NamedDependency[Principal],
        core: NamedDependency[StreamingCore],
        conversation_id: FromPath[UUID],
    ) -> None:
        await conversations.delete_conversation(principal, conversation_id, core)

    @get("/{conversation_id:uuid}/messages", summary="A chronological page of messages", responses=errors(400, 404))
    async def list_messages(
        self,
        principal: NamedDependency[Principal],
        conversation_id: FromPath[UUID],
        before: Annotated[
            UUID | None,
            QueryParameter(description="id of a message: the page ends just before it"),
        ] = None,
        limit: Limit = DEFAULT_PAGE_SIZE,
    ) -> MessagePage:
        return await messages.list_messages(principal, conversation_id, before, limit)

    @post(
        "/{conversation_id:uuid}/messages",
        summary="Post a user message",
        description="201 with the new message; 200 with the original one when `clientMessageId` was seen before.",
        responses={
            HTTP_200_OK: ResponseSpec(MessagePosted, description="The message first posted with this clientMessageId"),
            **errors(400, 404, 409, 413, 429),
        },
    )
    async def post_message(
        self,
        principal: NamedDependency[Principal],
        core: NamedDependency[StreamingCore],
        conversation_id: FromPath[UUID],
        data: JSONBody[MessageCreate],
    ) -> Response[MessagePosted]:
        result, created = await messages.post_message(principal, conversation_id, data, core)
        return Response(result, status_code=HTTP_201_CREATED if created else HTTP_200_OK)

    @post(
        "/{conversation_id:uuid}/tool-results",
        summary="Answer a tool call of the agent's last answer",
        description=(
            "201 with the stored result (a message with role `tool`) and, when it was the last result "
            "the answer waited for, the agent's next answer (else null). 200 with the first result when "
            "this call was answered the same way before; 409 `tool_call_answered` when differently."
        ),
        responses={
            HTTP_200_OK: ResponseSpec(MessagePosted, description="The result first posted for this call"),
            **errors(400, 404, 409, 413, 429),
        },
    )
    async def post_tool_result(
        self,
        principal: NamedDependency[Principal],
        core: NamedDependency[StreamingCore],
        conversation_id: FromPath[UUID],
        data: JSONBody[ToolResultCreate],
    ) -> Response[MessagePosted]:
        result, created = await tool_results.post_tool_result(principal, conversation_id, data, core)
        return Response(result, status_code=HTTP_201_CREATED if created else HTTP_200_OK)

    @put(
        "/{conversation_id:uuid}/messages/{message_id:uuid}",
        summary="Edit a message (keeps the original)",
        responses=errors(400, 403, 404, 413),
    )
    async def edit_message(
        self,
        principal: NamedDependency[Principal],
        core: NamedDependency[StreamingCore],
        conversation_id: FromPath[UUID],
        message_id: FromPath[UUID],
        data: JSONBody[MessageEdit],
    ) -> MessageOut:
        return await messages.edit_message(principal, conversation_id, message_id, data, core)

    @post(
        "/{conversation_id:uuid}/messages/{message_id:uuid}/answer",
        summary="Answer this message again",
        description=(
            "Starts a new answer to the conversation's last user message (`replyToId` = that message), "
            "as a post does: 201 with `{message, generation}`. The earlier answers stay stored; the history "
            "keeps only the newest answer to a message. The body is optional: `ifBusy`, `partial`, "
            "`disconnectGrace` as for a post. 409 `not_last_user_message` for any other message, "
            "`no_agent` without an agent, `generation_in_progress` while an answer runs; 429 as a post."
        ),
        responses=errors(404, 409, 429),
    )
    async def answer_again(
        self,
        principal: NamedDependency[Principal],
        core: NamedDependency[StreamingCore],
        conversation_id: FromPath[UUID],
        message_id: FromPath[UUID],
        data: JSONBody[AnswerAgain | None] = None,
    ) -> MessagePosted:
        return await messages.answer_again(principal, conversation_id, message_id, data or AnswerAgain(), core)

    @get(
        "/{conversation_id:uuid}/history",
        summary="The conversation as the agent is given it",
        responses=errors(404),
    )
    async def history(
        self, principal: NamedDependency[Principal], conversation_id: FromPath[UUID]
    ) -> list[HistoryItem]:
        return await messages.history(principal, conversation_id)


def provide_core(state: State) -> StreamingCore:
    """Dependency: the process's streaming core (created at startup)."""
    core: StreamingCore = state.core
    return core


class GenerationController(Controller):
    """One agent answer: its state and metrics, and stopping it."""

    path = "/generations"
    tags = ["generations"]

    @get("/{generation_id:uuid}", summary="Status and metrics of an answer", responses=errors(404))
    async def get_generation(
        self, principal: NamedDependency[Principal], generation_id: FromPath[UUID]
    ) -> GenerationOut:
        return await generations.get_generation(principal, generation_id)

    @post(
        "/{generation_id:uuid}/cancel",
        status_code=HTTP_200_OK,
        summary="Stop an answer (idempotent: a finished answer reports its final state)",
        responses=errors(404),
    )
    async def cancel_generation(
        self,
        principal: NamedDependency[Principal],
        core: NamedDependency[StreamingCore],
        generation_id: FromPath[UUID],
    ) -> GenerationOut:
        generation = await generations.get_generation(principal, generation_id)
        if generation.status is GenerationStatus.running:
            await core.cancel(generation_id, "user")
        return await generations.get_generation(principal, generation_id)
