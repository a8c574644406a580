"""The adapter protocol: how the core asks an agent for an answer."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Any, Protocol

import msgspec

from app.chat.schemas import HistoryItem


class AdapterError(Exception):
    """A failure the adapter understands; `code` (and `retry_after`, in seconds, when the
    agent said when to try again) reach readers in the `error` event."""

    def __init__(self, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after


class AdapterConfigError(ValueError):
    """An agent `config` that its adapter cannot use; `field` is the config's own key ('' for all of it)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


class AnswerEnd(msgspec.Struct, frozen=True):
    """What an adapter may report after the answer's last piece: the model's own count of
    the tokens it produced, and why it stopped (`stop`, `length`, ...)."""

    token_count: int | None = None
    finish_reason: str = "stop"


class Adapter(Protocol):
    """Produces an answer to the last turn of `history`, piece by piece. `stream` is given
    the agent's config converted to the adapter's config struct (see `CONFIG_TYPES`)."""

    name: str

    def stream(self, history: Sequence[HistoryItem], config: Any) -> AsyncGenerator[str | AnswerEnd]:
        """Yield the answer's text in order, optionally one :class:`AnswerEnd` last.
        Cancelling the iteration must stop the work. Raise :class:`AdapterError` on failure."""
        ...

    async def aclose(self) -> None:
        """Release what the adapter holds (connections); called when the server stops."""
        ...
