"""The chat domain's side of the streaming core's storage interface (app/streaming/store.py)."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any
from uuid import UUID

from app.auth.service import invalid_credentials
from app.chat import conversations, generations, messages
from app.db import write_transaction
from app.streaming.parts import Part
from app.streaming.records import GenerationOut, HistoryItem, MessageOut
from app.streaming.scopes import Scope
from app.streaming.store import Answering, Credential
from app.tables import Generation, GenerationStatus


class ChatAnswerStore:
    """Implements :class:`app.streaming.store.AnswerStore` with the chat tables."""

    async def running_generation_id(self, conversation_id: UUID) -> UUID | None:
        row = await generations.running_generation(conversation_id)
        return None if row is None else row["id"]

    async def waiting_turn(self, conversation: dict[str, Any]) -> Answering | None:
        message_id = await generations.waiting_turn(conversation["id"])
        agent = await generations.agent_of(conversation) if message_id is not None else None
        if message_id is None or agent is None:
            return None
        return Answering(reply_to_id=message_id, agent_id=agent.id, adapter=agent.adapter, config=agent.config)

    async def start_generation(
        self,
        conversation_id: UUID,
        answering: Answering,
        generation_id: UUID,
        producer: str,
        admit: Callable[[], None],
    ) -> GenerationOut | None:
        try:
            async with write_transaction(Generation._meta.db):
                started = await generations.create_running(
                    conversation_id, answering.reply_to_id, answering.agent_id, generation_id, producer=producer
                )
                admit()
        except generations.GenerationBusy:
            return None
        return started

    async def load_generation(self, generation_id: UUID) -> GenerationOut | None:
        return await generations.load_generation(generation_id)

    async def finish_generation(
        self,
        generation: GenerationOut,
        status: GenerationStatus,
        *,
        parts: list[Part] | None,
        token_count: int,
        chunk_count: int,
        ttft_ms: int | None,
        finish_reason: str | None = None,
        error: str | None = None,
    ) -> MessageOut | None:
        row = await generations.finish_generation(
            generation,
            status,
            parts=parts,
            token_count=token_count,
            chunk_count=chunk_count,
            ttft_ms=ttft_ms,
            finish_reason=finish_reason,
            error=error,
        )
        return None if row is None else messages.message_out(row)

    async def stored_answer(self, message_id: UUID) -> list[Part] | None:
        return await generations.stored_answer(message_id)

    async def load_history(self, conversation_id: UUID) -> list[HistoryItem]:
        return await messages.load_history(conversation_id)

    async def interrupt_orphans(self) -> int:
        return await generations.interrupt_orphans()

    async def running_producers(self) -> list[tuple[UUID, str | None]]:
        return await generations.running_producers()

    async def interrupt(self, generation_id: UUID, chunk_count: int, error: str) -> bool:
        return await generations.interrupt(generation_id, chunk_count, error)

    async def settle_interrupted_length(self, generation_id: UUID, chunk_count: int) -> GenerationOut | None:
        return await generations.settle_interrupted_length(generation_id, chunk_count)

    async def invalid_credentials(self, held: Collection[Credential]) -> set[Credential]:
        return await invalid_credentials(held)

    async def conversation_scope(self, conversation_id: UUID) -> Scope | None:
        return await conversations.conversation_scope(conversation_id)
