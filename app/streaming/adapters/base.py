"""The adapter protocol."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol

from app.chat.schemas import HistoryItem


class AdapterError(Exception):
    """A failure the adapter understands; `code` reaches readers in the `error` event."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Adapter(Protocol):
    """Produces an answer to the last turn of `history`, piece by piece."""

    name: str

    def stream(self, history: Sequence[HistoryItem], settings: Mapping[str, Any]) -> AsyncIterator[str]:
        """Yield the answer's text in order; cancelling the iteration must stop the work."""
        ...
