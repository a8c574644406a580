"""The adapter protocol: how the core asks an agent for an answer."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Any, Protocol

import msgspec

from app.streaming.parts import PartKind
from app.streaming.records import HistoryItem


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


class StartPart(msgspec.Struct, frozen=True, kw_only=True):
    """Open a part other than text: `key` is the adapter's own name for it (e.g. `call:0`),
    used by the :class:`AppendPart` and :class:`EndPart` that follow."""

    key: str
    kind: PartKind
    name: str | None = None
    tool_call_id: str | None = None


class AppendPart(msgspec.Struct, frozen=True):
    """More of an open part: reasoning text, or a piece of a tool call's arguments (JSON text)."""

    key: str
    text: str


class EndPart(msgspec.Struct, frozen=True):
    """Close a part: a tool result's output or a data part's data in `value` (a tool
    result's failure in `error`). A tool call's value is its parsed arguments (the core parses them)."""

    key: str
    value: Any = None
    error: str | None = None


# What an adapter's stream yields: text, part steps, and optionally an AnswerEnd last.
AnswerItem = str | StartPart | AppendPart | EndPart | AnswerEnd


class Adapter(Protocol):
    """Produces an answer to the last turn of `history`, piece by piece. `stream` is given
    the agent's config converted to the adapter's config struct (see `CONFIG_TYPES`)."""

    name: str

    def stream(self, history: Sequence[HistoryItem], config: Any) -> AsyncGenerator[AnswerItem]:
        """Yield the answer in order: text as `str`, other parts as :class:`StartPart`,
        :class:`AppendPart`, :class:`EndPart`; optionally one :class:`AnswerEnd` last.
        Cancelling the iteration must stop the work. Raise :class:`AdapterError` on failure."""
        ...

    async def aclose(self) -> None:
        """Release what the adapter holds (connections); called when the server stops."""
        ...
