"""Answers made of parts, for the resume tests: an echo agent in `parts` mode, the fold a
client makes of the events it got (a `snapshot` replacing what came before it), and the
parts the echo agent's answer must be stored with.

The echo agent's `parts` mode answers `content` with six parts: reasoning, the words, a
call of the `echo` tool (arguments streamed in pieces of 8 characters), its result, a
data part `echo-stats` and the text " (echoed)" (app/streaming/adapters/echo.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any
from uuid import UUID

import msgspec

from app.agents.schemas import AgentCreate
from app.agents.service import create_agent
from app.streaming.events import GenerationEvent, fold, json_decoder
from app.streaming.parts import AnswerParts, Part
from tests.factories import Tenant

PART_EVENTS = ("part.start", "part.delta", "part.end")
# The echo agent's pieces: a word with the whitespace before it.
_WORD = re.compile(r"\s*\S+")


async def make_parts_agent(tenant: Tenant, pace: float) -> str:
    """An echo agent in `parts` mode that sleeps `pace` seconds before each piece."""
    config = {"pace": pace, "mode": "parts"}
    agent = await create_agent(tenant.company_id, AgentCreate(name=f"echo parts {pace}", config=config))
    return str(agent.id)


def decoded(event: GenerationEvent | dict[str, Any]) -> GenerationEvent:
    """An event as the server's structs (a wire event is its JSON object)."""
    if isinstance(event, dict):
        wire: GenerationEvent = json_decoder.decode(json.dumps(event))
        return wire
    return event


def folded(events: Iterable[GenerationEvent | dict[str, Any]]) -> AnswerParts:
    """The answer a reader builds from the events it got, in order (raises ValueError for a
    part event that does not fit: a part started twice, a delta of a part not open)."""
    answer = AnswerParts()
    for event in events:
        fold(answer, decoded(event))
    return answer


def answer_of(events: Iterable[GenerationEvent | dict[str, Any]]) -> list[Part]:
    """The parts of a whole answer from its events (to `done`), as stored: a text part needs no end event."""
    return folded(events).ended(complete=True)


def parts_of(message: dict[str, Any]) -> list[Part]:
    """A stored message's `parts` as returned by the API."""
    return msgspec.convert(message["parts"], list[Part])


def echo_words(content: str) -> list[str]:
    return _WORD.findall(content)


def echo_text(content: str) -> str:
    """The stored `content` of the echo agent's `parts` answer."""
    return "".join(echo_words(content)) + " (echoed)"


def echo_parts(content: str, user_message_id: UUID | str) -> list[Part]:
    """The parts of the echo agent's `parts` answer to the user message `content` (all complete)."""
    call_id = f"echo_{UUID(str(user_message_id)).hex[:12]}"
    words = echo_words(content)
    arguments = {"text": content}
    return [
        Part(kind="reasoning", text=f"The user wrote {len(words)} words; echo them."),
        Part(kind="text", text="".join(words)),
        Part(
            kind="tool_call",
            text=msgspec.json.encode(arguments).decode(),
            name="echo",
            tool_call_id=call_id,
            value=arguments,
        ),
        Part(kind="tool_result", name="echo", tool_call_id=call_id, value=arguments),
        Part(kind="data", name="echo-stats", value={"words": len(words)}),
        Part(kind="text", text=" (echoed)"),
    ]


def kinds(events: Iterable[dict[str, Any]]) -> set[str]:
    """The event types among `events`."""
    return {event["type"] for event in events}


def in_tool_call(event: dict[str, Any]) -> bool:
    """True for a piece of the tool call's arguments (part 2 of the echo agent's `parts` answer)."""
    return bool(event["type"] == "part.delta" and event["part"] == 2)
