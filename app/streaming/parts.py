"""Answer parts: an answer is a list of typed parts (text, reasoning, tool calls, tool
results, data), built from the generation's events in order.

:class:`AnswerParts` is the one fold of events into parts: the log keeps one to give a
late reader its `snapshot`, the core keeps one to store the answer, clients do the same.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

PartKind = Literal["text", "reasoning", "tool_call", "tool_result", "data"]
# streaming: still open; incomplete: cut by a cancel or a failure; invalid: a tool call
# whose arguments are not a JSON object (`error` says why).
PartState = Literal["streaming", "complete", "incomplete", "invalid"]
# The kinds a `part.start` opens (text comes as `token` events).
OPENED_KINDS: frozenset[str] = frozenset({"reasoning", "tool_call", "tool_result", "data"})


class Part(msgspec.Struct, rename="camel", kw_only=True):
    """One part of an answer."""

    kind: PartKind
    state: PartState = "complete"
    # text, reasoning: the text; tool_call: the arguments exactly as streamed (JSON text).
    text: str = ""
    # The tool's name (tool_call, tool_result) or the data part's name.
    name: str | None = None
    tool_call_id: str | None = None
    # tool_call: the parsed arguments; tool_result: the tool's output; data: the data.
    value: Any = None
    # An invalid tool call: why; a tool result: the tool's error (`value` is then null).
    error: str | None = None


# Parts as stored (the message's `parts` column) and sent: one encoder and decoder.
_parts_decoder = msgspec.json.Decoder(list[Part])


def encode_parts(parts: list[Part]) -> str:
    """The JSON text a message's `parts` column stores."""
    return msgspec.json.encode(parts).decode()


def decode_parts(raw: str | bytes) -> list[Part]:
    """The parts from a message's `parts` column."""
    return _parts_decoder.decode(raw)


def text_of(parts: list[Part]) -> str:
    """The answer's text: its text parts, concatenated (what `content` stores)."""
    return "".join(part.text for part in parts if part.kind == "text")


def parse_arguments(text: str) -> tuple[Any, str | None]:
    """A tool call's streamed arguments as (value, None), or (None, why) when they are not a JSON object."""
    if not text.strip():
        return {}, None  # a call without arguments
    try:
        value = msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        return None, f"the arguments are not valid JSON: {exc}"
    if not isinstance(value, dict):
        return None, "the arguments are not a JSON object"
    return value, None


class AnswerParts:
    """The parts of an answer so far, folded from its events (tokens and part events).

    The pieces of an open part are kept in a list and joined when the part is read or
    closed: adding a piece costs the same however long the answer already is."""

    __slots__ = ("_open_text", "_pieces", "parts")

    def __init__(self, parts: list[Part] | None = None) -> None:
        self.parts: list[Part] = []
        self._pieces: dict[int, list[str]] = {}
        self._open_text = False
        self.reset(parts or [])

    def reset(self, parts: list[Part]) -> None:
        """Start again from these parts (a `snapshot`)."""
        self.parts = [msgspec.structs.replace(p) for p in parts]
        self._pieces = {}
        self._open_text = bool(self.parts) and self.parts[-1].kind == "text" and self.parts[-1].state == "streaming"

    def add_text(self, text: str) -> None:
        """A `token`: grows the open text part, or opens one."""
        if self._open_text:
            self._pieces.setdefault(len(self.parts) - 1, []).append(text)
        else:
            self.parts.append(Part(kind="text", state="streaming"))
            self._pieces[len(self.parts) - 1] = [text]
            self._open_text = True

    def start(self, index: int, kind: PartKind, name: str | None, tool_call_id: str | None) -> None:
        """A `part.start`: closes an open text part and opens part `index` (the next one)."""
        if index != len(self.parts) or kind not in OPENED_KINDS:
            raise ValueError(f"part.start {index} ({kind}) does not follow {len(self.parts)} parts")
        self._close_text()
        self.parts.append(Part(kind=kind, state="streaming", name=name, tool_call_id=tool_call_id))

    def delta(self, index: int, text: str) -> None:
        """A `part.delta`: grows open part `index`."""
        self._open(index)
        self._pieces.setdefault(index, []).append(text)

    def end(self, index: int, state: PartState, value: Any, error: str | None) -> None:
        """A `part.end`: closes part `index`."""
        part = self._open(index)
        self._join(index)
        part.state = state
        part.value = value
        part.error = error

    def part_text(self, index: int) -> str:
        """The text of part `index` so far (a tool call's arguments as streamed)."""
        self._join(index)
        return self.parts[index].text

    def _open(self, index: int) -> Part:
        if not 0 <= index < len(self.parts) or self.parts[index].state != "streaming":
            raise ValueError(f"part {index} is not open")
        return self.parts[index]

    def _join(self, index: int) -> None:
        pieces = self._pieces.pop(index, None)
        if pieces:
            self.parts[index].text += "".join(pieces)

    def _close_text(self) -> None:
        if self._open_text:
            self._join(len(self.parts) - 1)
            self.parts[-1].state = "complete"
            self._open_text = False

    def _join_all(self) -> None:
        for index in list(self._pieces):
            self._join(index)

    def copy(self) -> list[Part]:
        """Every part so far (open ones `streaming`), detached from this fold."""
        self._join_all()
        return [msgspec.structs.replace(p) for p in self.parts]

    def ended(self, complete: bool) -> list[Part]:
        """The parts as stored: every part still open is `complete` text (answer done) or
        `incomplete` (cut by a cancel or failure; a tool call keeps its raw arguments, no value)."""
        out = self.copy()
        for part in out:
            if part.state == "streaming":
                part.state = "complete" if complete and part.kind == "text" else "incomplete"
        return out

    @property
    def text(self) -> str:
        """The answer's text: its text parts, concatenated."""
        self._join_all()
        return text_of(self.parts)
