"""From an adapter's items to the answer's events: the core's one check of what an adapter yields.

Text becomes `token` events; part steps (keys chosen by the adapter) become `part.start`,
`part.delta` and `part.end` with the part's index in the answer. A step that does not fit
fails the answer with `invalid_part`, before anything of it reaches the log.
"""

from __future__ import annotations

from typing import Any

import msgspec

from app.streaming.adapters import AdapterError, AppendPart, EndPart, StartPart
from app.streaming.events import GenerationEvent, PartDelta, PartEnd, PartStart, Token
from app.streaming.parts import OPENED_KINDS, AnswerParts, PartState, parse_arguments

# An event to emit: its type and its fields (seq and ids are added by `emit`).
Step = tuple[type[GenerationEvent], dict[str, Any]]


class AnswerBuilder:
    """Turns an adapter's items into the answer's events, checking them: a part step that
    does not fit (unknown key, unknown kind, a value that is not JSON) is `invalid_part`."""

    def __init__(self) -> None:
        self.answer = AnswerParts()
        self.events = 0  # answer events made (the log's seq after `start` is 1 + this)
        self.pieces = 0  # text, reasoning and argument pieces: the fallback token count
        self._open: dict[str, int] = {}  # adapter key -> index of its open part

    def event(self, item: str | StartPart | AppendPart | EndPart) -> Step | None:
        """The event for one item (None for an empty piece)."""
        answer = self.answer
        if isinstance(item, str):
            if not item:
                return None
            answer.add_text(item)
            made: Step = (Token, {"text": item})
            self.pieces += 1
        elif isinstance(item, AppendPart):
            index = self._index(item.key)
            if not isinstance(item.text, str):
                raise _invalid(f"part {item.key!r}: text must be a string")
            if not item.text:
                return None
            answer.delta(index, item.text)
            made = (PartDelta, {"part": index, "text": item.text})
            self.pieces += 1
        elif isinstance(item, StartPart):
            if item.key in self._open:
                raise _invalid(f"part {item.key!r} is open already")
            if item.kind not in OPENED_KINDS:
                raise _invalid(f"part {item.key!r}: unknown kind {item.kind!r}")
            index = len(answer.parts)
            answer.start(index, item.kind, item.name, item.tool_call_id)
            self._open[item.key] = index
            made = (
                PartStart,
                {"part": index, "kind": item.kind, "name": item.name, "tool_call_id": item.tool_call_id},
            )
        elif isinstance(item, EndPart):
            made = self._end(item.key, item.value, item.error)
        else:
            raise _invalid(f"an adapter yielded {type(item).__name__}, not text or a part step")
        self.events += 1
        return made

    def _index(self, key: str) -> int:
        index = self._open.get(key)
        if index is None:
            raise _invalid(f"part {key!r} is not open")
        return index

    def _end(self, key: str, value: Any, error: str | None) -> Step:
        index = self._index(key)
        state: PartState = "complete"
        if self.answer.parts[index].kind == "tool_call":
            value, error = parse_arguments(self.answer.part_text(index))
            state = "invalid" if error else "complete"
        else:
            try:
                msgspec.json.encode(value)
            except (TypeError, msgspec.EncodeError) as exc:
                raise _invalid(f"part {key!r}: its value is not JSON ({exc})") from None
        del self._open[key]
        self.answer.end(index, state, value, error)
        return PartEnd, {"part": index, "state": state, "value": value, "error": error}

    def open_keys(self) -> list[str]:
        """Keys of the parts still open, in order."""
        return sorted(self._open, key=self._open.__getitem__)


def _invalid(message: str) -> AdapterError:
    return AdapterError("invalid_part", f"the agent sent a part that does not fit: {message}")
