"""What the streaming core needs from storage, as an interface of its own.

The chat domain implements it (app/chat/answer_store.py); the core never imports the
domain, so it can be read and tested without the REST routes. Every method is one
small, self-contained piece of database work.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any, Protocol
from uuid import UUID

import msgspec

from app.streaming.parts import Part
from app.streaming.records import GenerationOut, HistoryItem, MessageOut
from app.streaming.scopes import Scope
from app.tables import GenerationStatus

# An open connection's credential: (API key id, browser session id or None).
Credential = tuple[UUID, UUID | None]


class Answering(msgspec.Struct, frozen=True):
    """A turn waiting for an answer: the message to reply to and the agent that answers."""

    reply_to_id: UUID
    agent_id: UUID
    adapter: str
    config: dict[str, Any]


class AnswerStore(Protocol):
    """Generation rows, history and answer messages, as the core uses them."""

    async def running_generation_id(self, conversation_id: UUID) -> UUID | None:
        """The conversation's running generation, if any."""
        ...

    async def waiting_turn(self, conversation: dict[str, Any]) -> Answering | None:
        """The conversation's last turn if it waits for an answer (an unanswered user message,
        or tool results that answer every call of the last answer) and an agent can answer."""
        ...

    async def start_generation(
        self,
        conversation_id: UUID,
        answering: Answering,
        generation_id: UUID,
        producer: str,
        admit: Callable[[], None],
    ) -> GenerationOut | None:
        """Insert the `running` row (id reserved by the core); `admit` runs in the same
        transaction (raising rolls it back). None when another generation is running."""
        ...

    async def load_generation(self, generation_id: UUID) -> GenerationOut | None:
        """A generation by id (unscoped)."""
        ...

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
        """End a running generation; with `parts`, store them as its answer message in the
        same transaction. Returns that message. A generation already ended is left alone."""
        ...

    async def stored_answer(self, message_id: UUID) -> list[Part] | None:
        """The parts an answer was stored with."""
        ...

    async def load_history(self, conversation_id: UUID) -> list[HistoryItem]:
        """The turns an adapter is given."""
        ...

    async def interrupt_orphans(self) -> int:
        """Mark every running generation interrupted (a lone process starting again)."""
        ...

    async def running_producers(self) -> list[tuple[UUID, str | None]]:
        """(generation, producing process) of every running generation."""
        ...

    async def interrupt(self, generation_id: UUID, chunk_count: int, error: str) -> bool:
        """Mark a running generation whose producer died interrupted; False if it had ended."""
        ...

    async def settle_interrupted_length(self, generation_id: UUID, chunk_count: int) -> GenerationOut | None:
        """Record how many answer events an interrupted generation had (first report wins)."""
        ...

    async def invalid_credentials(self, held: Collection[Credential]) -> set[Credential]:
        """Those of `held` that no longer authenticate (revoked key, ended or expired session)."""
        ...

    async def conversation_scope(self, conversation_id: UUID) -> Scope | None:
        """The conversation's company and owner (who may list it); None when it does not exist."""
        ...
