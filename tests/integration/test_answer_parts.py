"""Typed answer parts in the core, against a real database: the events a mixed answer
makes, what is stored and read back, the tool round, and adapters or clients sending
parts that do not fit."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

import msgspec
import pytest

from app.agents.schemas import AgentCreate
from app.agents.service import create_agent
from app.auth.principal import Principal
from app.chat.answer_store import ChatAnswerStore
from app.chat.conversations import create_conversation
from app.chat.messages import history, list_messages, post_message
from app.chat.schemas import ConversationCreate, MessageCreate, ToolResultCreate
from app.chat.tool_results import post_tool_result
from app.errors import Conflict, InvalidInput, NotFound, TooLarge
from app.limits import MAX_CONTENT_CHARS
from app.streaming.adapters import AnswerEnd, AppendPart, EndPart, StartPart
from app.streaming.broker import InProcessBroker
from app.streaming.core import StreamingCore
from app.streaming.events import Cancelled, Done, Error, GenerationEvent, PartDelta, PartEnd, PartStart, Token, fold
from app.streaming.parts import AnswerParts, Part
from app.streaming.policy import StreamPolicy
from app.tables import Message
from tests.factories import make_tenant

pytestmark = pytest.mark.anyio

SENTENCE = "find me a table"


@pytest.fixture
def streaming(db: str, core: StreamingCore) -> StreamingCore:
    return core


async def conversation(mode: str, pace: float = 0) -> tuple[Principal, UUID]:
    tenant = await make_tenant()
    agent = await create_agent(tenant.company_id, AgentCreate(name="echo", config={"pace": pace, "mode": mode}))
    alice = tenant.principals["alice"]
    created = await create_conversation(alice, ConversationCreate(agent_id=agent.id))
    return alice, created.id


async def ask(core: StreamingCore, who: Principal, cid: UUID, **policy: Any) -> UUID:
    posted, _ = await post_message(who, cid, MessageCreate(content=SENTENCE, **policy), core)
    assert posted.generation is not None
    return posted.generation.id


async def read_all(core: StreamingCore, gid: UUID, after: int = 0) -> list[GenerationEvent]:
    return [event async for batch in core.follow(gid, after, None) for event in batch]


def folded(events: list[GenerationEvent], complete: bool = True) -> list[Part]:
    answer = AnswerParts()
    for event in events:
        fold(answer, event)
    return answer.ended(complete=complete)


async def agent_messages(who: Principal, cid: UUID) -> list[Any]:
    page = await list_messages(who, cid, None, 100)
    return [m for m in page.items if m.role == "agent"]


async def test_a_mixed_answer_streams_every_part_kind_and_is_stored_as_parts(streaming: StreamingCore) -> None:
    alice, cid = await conversation("parts")
    events = await read_all(streaming, await ask(streaming, alice, cid))

    kinds = [e.kind for e in events if isinstance(e, PartStart)]
    assert kinds == ["reasoning", "tool_call", "tool_result", "data"]
    assert isinstance(events[-1], Done) and events[-1].finish_reason == "stop"
    parts = folded(events)
    assert [p.kind for p in parts] == ["reasoning", "text", "tool_call", "tool_result", "data", "text"]
    call = parts[2]
    assert call.name == "echo" and call.value == {"text": SENTENCE} and call.state == "complete"
    assert msgspec.json.decode(call.text) == {"text": SENTENCE}  # the arguments as streamed
    assert parts[3].tool_call_id == call.tool_call_id and parts[3].value == {"text": SENTENCE}
    assert parts[4].name == "echo-stats" and parts[4].value == {"words": 4}

    [stored] = await agent_messages(alice, cid)
    assert stored.parts == parts
    assert stored.content == SENTENCE + " (echoed)"  # the text parts only
    with pytest.raises(NotFound):  # the agent answered its own call: it waits for no result
        assert call.tool_call_id is not None
        await post_tool_result(alice, cid, ToolResultCreate(tool_call_id=call.tool_call_id, output=1), streaming)
    turns = await history(alice, cid)
    assert turns[0].parts == [Part(kind="text", text=SENTENCE)] and turns[1].parts == parts


async def test_a_tool_round_continues_the_agent_with_the_result(streaming: StreamingCore) -> None:
    alice, cid = await conversation("tool")
    events = await read_all(streaming, await ask(streaming, alice, cid))
    assert isinstance(events[-1], Done) and events[-1].finish_reason == "tool_calls"
    [call] = [p for p in folded(events) if p.kind == "tool_call"]
    assert call.tool_call_id is not None

    result = ToolResultCreate(tool_call_id=call.tool_call_id, output={"tables": 2})
    posted, created = await post_tool_result(alice, cid, result, streaming)
    assert created and posted.message.role == "tool" and posted.generation is not None
    assert posted.message.parts == [
        Part(kind="tool_result", name="echo", tool_call_id=call.tool_call_id, value={"tables": 2})
    ]
    continued = await read_all(streaming, posted.generation.id)
    assert "".join(e.text for e in continued if isinstance(e, Token)) == 'The tool said: echo returned {"tables":2}'
    assert [m.role for m in (await list_messages(alice, cid, None, 100)).items] == ["user", "agent", "tool", "agent"]

    # The same result again is the first one, with its answer; a different one is refused.
    again, created = await post_tool_result(alice, cid, result, streaming)
    assert not created and again.message.id == posted.message.id and again.generation is not None
    with pytest.raises(Conflict) as refused:
        await post_tool_result(alice, cid, ToolResultCreate(tool_call_id=call.tool_call_id, error="no"), streaming)
    assert refused.value.code == "tool_call_answered"


async def test_tool_results_that_do_not_fit_are_refused_and_store_nothing(streaming: StreamingCore) -> None:
    alice, cid = await conversation("tool")
    events = await read_all(streaming, await ask(streaming, alice, cid))
    [call] = [p for p in folded(events) if p.kind == "tool_call"]
    call_id = call.tool_call_id
    assert call_id is not None
    other = (await make_tenant()).principals["alice"]

    with pytest.raises(NotFound) as unknown:
        await post_tool_result(alice, cid, ToolResultCreate(tool_call_id="call_nobody_made", output=1), streaming)
    assert unknown.value.code == "tool_call_not_found"
    with pytest.raises(NotFound):  # another company's conversation does not exist for them
        await post_tool_result(other, cid, ToolResultCreate(tool_call_id=call_id, output=1), streaming)
    with pytest.raises(InvalidInput):  # neither output nor error
        await post_tool_result(alice, cid, ToolResultCreate(tool_call_id=call_id), streaming)
    with pytest.raises(InvalidInput):  # both
        await post_tool_result(alice, cid, ToolResultCreate(tool_call_id=call_id, output=1, error="x"), streaming)
    with pytest.raises(TooLarge):
        big = ToolResultCreate(tool_call_id=call_id, output="x" * MAX_CONTENT_CHARS)
        await post_tool_result(alice, cid, big, streaming)
    assert await Message.count().where(Message.conversation == cid, Message.role == "tool") == 0

    # A user message moves on: the call no longer waits for a result.
    await post_message(alice, cid, MessageCreate(content="never mind", reply=False), streaming)
    with pytest.raises(NotFound):
        await post_tool_result(alice, cid, ToolResultCreate(tool_call_id=call_id, output=1), streaming)


class ScriptedAdapter:
    """Yields what the test gives it (`config` is ignored), then ends or waits forever."""

    name = "scripted"

    def __init__(self, items: list[Any], hang: bool = False) -> None:
        self.items = items
        self.hang = hang

    async def stream(self, history: Any, config: Any) -> AsyncIterator[Any]:
        import asyncio

        for item in self.items:
            await asyncio.sleep(0)
            yield item
        if self.hang:
            await asyncio.Event().wait()

    async def aclose(self) -> None:
        pass


async def scripted_answer(items: list[Any], **policy: Any) -> tuple[list[GenerationEvent], Principal, UUID]:
    core = StreamingCore(
        InProcessBroker(), StreamPolicy(**policy), store=ChatAnswerStore(), adapters={"echo": ScriptedAdapter(items)}
    )
    try:
        alice, cid = await conversation("text")
        events = await read_all(core, await ask(core, alice, cid))
    finally:
        await core.shutdown()
    return events, alice, cid


@pytest.mark.parametrize(
    "items",
    [
        [AppendPart("nobody", "x")],  # a part never opened
        [EndPart("nobody")],
        [StartPart(key="r", kind="reasoning"), StartPart(key="r", kind="reasoning")],  # opened twice
        [StartPart(key="t", kind="text")],  # text comes as str
        [StartPart(key="x", kind="telepathy")],  # type: ignore[arg-type]
        [StartPart(key="d", kind="data"), EndPart("d", value=object())],  # not JSON
        [42],  # not an item at all
    ],
    ids=["unknown-key", "end-unknown", "opened-twice", "text-part", "unknown-kind", "value-not-json", "not-an-item"],
)
async def test_a_part_that_does_not_fit_fails_the_answer_cleanly(db: str, items: list[Any]) -> None:
    events, alice, cid = await scripted_answer(["some text", *items, "more"], partial="keep")
    error = events[-1]
    assert isinstance(error, Error) and error.code == "invalid_part"
    [kept] = await agent_messages(alice, cid)  # what came before, kept as a failed answer's partial
    assert kept.status == "partial" and kept.content == "some text"
    assert all(p.state != "streaming" for p in kept.parts)


async def test_arguments_that_never_become_json_end_the_call_as_invalid(db: str) -> None:
    call = StartPart(key="c", kind="tool_call", name="book", tool_call_id="call_1")
    events, alice, cid = await scripted_answer([call, AppendPart("c", '{"when": tomorrow'), EndPart("c")])
    [end] = [e for e in events if isinstance(e, PartEnd)]
    assert end.state == "invalid" and end.value is None and end.error and "not valid JSON" in end.error
    assert isinstance(events[-1], Done)
    [stored] = await agent_messages(alice, cid)
    assert stored.parts == [
        Part(
            kind="tool_call",
            state="invalid",
            text='{"when": tomorrow',
            name="book",
            tool_call_id="call_1",
            error=end.error,
        )
    ]


async def test_parts_left_open_end_with_the_answer(db: str) -> None:
    items = [StartPart(key="r", kind="reasoning"), AppendPart("r", "hm"), "done", AnswerEnd(finish_reason="stop")]
    events, _, _ = await scripted_answer(items)
    assert [type(e) for e in events[1:]] == [PartStart, PartDelta, Token, PartEnd, Done]


async def test_a_cancel_mid_arguments_stores_the_call_as_incomplete(db: str) -> None:
    call = StartPart(key="c", kind="tool_call", name="book", tool_call_id="call_1")
    adapter = ScriptedAdapter(["booking", call, AppendPart("c", '{"when": "tomo')], hang=True)
    core = StreamingCore(
        InProcessBroker(), StreamPolicy(partial="keep"), store=ChatAnswerStore(), adapters={"echo": adapter}
    )
    try:
        alice, cid = await conversation("text")
        gid = await ask(core, alice, cid)
        seen: list[GenerationEvent] = []
        async for batch in core.follow(gid, 0, None):
            seen += batch
            if any(isinstance(e, PartDelta) for e in seen):
                break
        await core.cancel(gid)
        events = seen + await read_all(core, gid, seen[-1].seq)
    finally:
        await core.shutdown()
    assert isinstance(events[-1], Cancelled) and events[-1].message_id is not None
    [stored] = await agent_messages(alice, cid)
    assert stored.status == "partial"
    assert stored.parts == [
        Part(kind="text", text="booking"),
        Part(kind="tool_call", state="incomplete", text='{"when": "tomo', name="book", tool_call_id="call_1"),
    ]
    assert stored.parts == folded(events, complete=False)
