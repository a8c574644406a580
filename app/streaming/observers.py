"""What the streaming core tells about the answers it produces, for logs and metrics.

The core calls every registered observer when an answer starts and when it ends; an
observer must be quick and must not raise (it runs inside the answer's task).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol
from uuid import UUID

from app.tables import GenerationStatus


@dataclass(frozen=True, slots=True)
class AnswerStarted:
    """An answer this process produces has started."""

    generation_id: UUID
    conversation_id: UUID
    # Whose quota it counts against (None for an answer no caller started, e.g. after a restart).
    company_id: UUID | None
    adapter: str


@dataclass(frozen=True, slots=True)
class AnswerEnded:
    """An answer this process produced has ended (stored, and its end announced)."""

    generation_id: UUID
    conversation_id: UUID
    company_id: UUID | None
    adapter: str
    status: GenerationStatus
    # Milliseconds to the first answer event; None if none came.
    ttft_ms: int | None
    duration_s: float
    # Tokens as the model counted them, else the pieces streamed.
    tokens: int
    # `adapter_failed`, `broker_unavailable`, ... for a failed answer; the reason of a cancelled one.
    error_code: str | None


class AnswerObserver(Protocol):
    """Told of each answer's start and end (see the module docstring)."""

    def answer_started(self, event: AnswerStarted) -> None: ...

    def answer_ended(self, event: AnswerEnded) -> None: ...
