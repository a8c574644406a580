"""`echo`: answers with the last user message's effective content, word by word.

Its `mode` makes it answer with every part kind, without a model: `parts` adds reasoning,
a tool call the agent runs itself (its call and its result), and data; `tool` ends the
answer with a tool call for the client to answer (finish reason `tool_calls`). After
tool results, it says what the tools returned.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, Sequence
from typing import Annotated, Literal

import msgspec

from app.streaming.adapters.base import AnswerEnd, AnswerItem, AppendPart, EndPart, StartPart
from app.streaming.parts import Part
from app.streaming.records import HistoryItem
from app.tables import MessageRole

# A word with the whitespace before it, so the pieces concatenate back to the text.
_WORD = re.compile(r"\s*\S+")
# A tool call's arguments are streamed in pieces of this many characters.
_ARGS_PIECE = 8


class EchoConfig(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    # Seconds before each piece; 0 answers as fast as the server can.
    pace: Annotated[float, msgspec.Meta(ge=0, le=60)] = 0.05
    # text: the words only; parts: reasoning, words, the `echo` tool's call and result, data;
    # tool: reasoning, words, then a call of the `echo` tool for the client to answer.
    mode: Literal["text", "parts", "tool"] = "text"


class EchoAdapter:
    """Repeats the user's last message: the default agent, and the one tests and benchmarks use."""

    name = "echo"

    async def stream(self, history: Sequence[HistoryItem], config: EchoConfig) -> AsyncGenerator[AnswerItem]:
        if history and history[-1].role is MessageRole.tool:
            for item in _after_tools(history):
                await asyncio.sleep(config.pace)
                yield item
            return
        last_user = next((m for m in reversed(history) if m.role is MessageRole.user), None)
        if last_user is None:
            return
        for item in _answer(last_user, config.mode):
            # Even at pace 0, yield to the loop so readers and cancellation get in between pieces.
            await asyncio.sleep(config.pace)
            yield item

    async def aclose(self) -> None:
        """Nothing to release."""


def _answer(turn: HistoryItem, mode: str) -> list[AnswerItem]:
    text = turn.effective_content
    words: list[AnswerItem] = list(_WORD.findall(text))
    if mode == "text":
        return words
    call_id = f"echo_{turn.id.hex[:12]}"
    items: list[AnswerItem] = [
        StartPart(key="thinking", kind="reasoning"),
        *(AppendPart("thinking", w) for w in _WORD.findall(f"The user wrote {len(words)} words; echo them.")),
        EndPart("thinking"),
        *words,
        StartPart(key="call", kind="tool_call", name="echo", tool_call_id=call_id),
        *(AppendPart("call", piece) for piece in _pieces(msgspec.json.encode({"text": text}).decode())),
        EndPart("call"),
    ]
    if mode == "tool":
        return [*items, AnswerEnd(finish_reason="tool_calls")]
    return [
        *items,
        StartPart(key="result", kind="tool_result", name="echo", tool_call_id=call_id),
        EndPart("result", value={"text": text}),
        StartPart(key="stats", kind="data", name="echo-stats"),
        EndPart("stats", value={"words": len(words)}),
        " (echoed)",
    ]


def _after_tools(history: Sequence[HistoryItem]) -> list[AnswerItem]:
    """What the tools returned, for the results that came since the last answer."""
    results: list[Part] = []
    for turn in reversed(history):
        if turn.role is not MessageRole.tool:
            break
        results[:0] = [p for p in turn.parts if p.kind == "tool_result"]
    said = "; ".join(
        f"{p.name or 'the tool'} failed: {p.error}"
        if p.error is not None
        else f"{p.name or 'the tool'} returned {msgspec.json.encode(p.value).decode()}"
        for p in results
    )
    return list(_WORD.findall(f"The tool said: {said}" if said else "The tool said nothing."))


def _pieces(text: str) -> list[str]:
    return [text[i : i + _ARGS_PIECE] for i in range(0, len(text), _ARGS_PIECE)]
