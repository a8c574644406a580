"""The streaming core against a real database (PostgreSQL and SQLite): generations run
by the core, their outcome stored in one transaction, readers following by cursor,
resume from the log or from the database, and the policies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

import msgspec
import pytest

from app.agents.schemas import AgentCreate
from app.agents.service import create_agent
from app.auth.principal import Principal
from app.chat.answer_store import ChatAnswerStore
from app.chat.conversations import create_conversation, load_conversation
from app.chat.generations import GenerationBusy, load_generation
from app.chat.messages import edit_message, post_message
from app.chat.schemas import ConversationCreate, MessageCreate, MessageEdit
from app.errors import InvalidInput
from app.streaming.adapters import AdapterError
from app.streaming.broker import InProcessBroker
from app.streaming.core import StreamingCore, terminal_seq
from app.streaming.events import Cancelled, Cursor, Done, Error, GenerationEvent, Snapshot, Start, Token
from app.streaming.policy import StreamPolicy
from app.tables import Generation, GenerationStatus, Message
from tests.factories import make_tenant
from tests.redis_support import any_broker

pytestmark = pytest.mark.anyio

SENTENCE = "the quick brown fox jumps over the lazy dog"


@pytest.fixture
def streaming(db: str, core: StreamingCore) -> StreamingCore:
    """The core, set up after (and so shut down before) the database switch of `db`."""
    return core


async def conversation_with_agent(pace: float = 0) -> tuple[Principal, UUID]:
    tenant = await make_tenant()
    agent = await create_agent(tenant.company_id, AgentCreate(name="echo", config={"pace": pace}))
    alice = tenant.principals["alice"]
    conversation = await create_conversation(alice, ConversationCreate(agent_id=agent.id))
    return alice, conversation.id


async def ask(core: StreamingCore, who: Principal, cid: UUID, content: str = SENTENCE, **policy: Any) -> UUID:
    posted, created = await post_message(who, cid, MessageCreate(content=content, **policy), core)
    assert created and posted.generation is not None
    return posted.generation.id


async def read_all(core: StreamingCore, gid: UUID, after: int = 0) -> list[GenerationEvent]:
    return [event async for batch in core.follow(gid, after, None) for event in batch]


async def read_until(core: StreamingCore, gid: UUID, count: int) -> list[GenerationEvent]:
    """The first `count` events (or fewer if the generation ends first), then stop reading."""
    seen: list[GenerationEvent] = []
    async for batch in core.follow(gid, 0, None):
        seen += batch
        if len(seen) >= count:
            break
    return seen[:count]


def answer_text(events: list[GenerationEvent]) -> str:
    """What a client shows: tokens appended, a snapshot replacing everything before it."""
    text = ""
    for event in events:
        if isinstance(event, Snapshot):
            text = event.text
        elif isinstance(event, Token):
            text += event.text
    return text


async def test_done_stores_the_message_and_row_together(streaming: StreamingCore) -> None:
    alice, cid = await conversation_with_agent()
    gid = await ask(streaming, alice, cid)
    events = await read_all(streaming, gid)

    assert isinstance(events[0], Start) and isinstance(events[-1], Done)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    done = events[-1]
    stored = await Message.select().where(Message.id == done.message_id).first()
    assert stored["content"] == answer_text(events) == SENTENCE
    assert stored["role"] == "agent" and stored["status"] == "complete" and stored["generation"] == gid
    generation = await load_generation(gid)
    assert generation is not None
    assert generation.status is GenerationStatus.done and generation.result_message_id == done.message_id
    assert generation.token_count == done.token_count == len(SENTENCE.split())
    assert generation.ttft_ms is not None and generation.finished_at is not None
    assert terminal_seq(generation) == done.seq


async def test_the_adapter_is_given_the_edited_content(streaming: StreamingCore) -> None:
    alice, cid = await conversation_with_agent()
    posted, _ = await post_message(alice, cid, MessageCreate(content="original words", reply=False), streaming)
    await edit_message(alice, cid, posted.message.id, MessageEdit(content="edited words win"))
    generation = await streaming.answer_unanswered(await load_conversation(alice, cid))
    assert generation is not None
    assert answer_text(await read_all(streaming, generation.id)) == "edited words win"
    assert await streaming.answer_unanswered(await load_conversation(alice, cid)) is None  # answered now


async def test_cancel_is_idempotent_and_keeps_the_partial_answer(streaming: StreamingCore) -> None:
    alice, cid = await conversation_with_agent(pace=0.01)
    gid = await ask(streaming, alice, cid, partial="keep")
    seen = await read_until(streaming, gid, 3)  # start and two tokens
    await streaming.cancel(gid)
    await streaming.cancel(gid)
    events = await read_all(streaming, gid, seen[-1].seq)
    cancelled = events[-1]
    assert isinstance(cancelled, Cancelled) and cancelled.reason == "user"
    assert cancelled.message_id is not None
    stored = await Message.select().where(Message.id == cancelled.message_id).first()
    assert stored["status"] == "partial"
    assert stored["content"] == answer_text(seen + events)
    generation = await load_generation(gid)
    assert generation is not None and generation.status is GenerationStatus.cancelled


async def test_cancel_with_discard_stores_nothing(streaming: StreamingCore) -> None:
    alice, cid = await conversation_with_agent(pace=0.01)
    gid = await ask(streaming, alice, cid, partial="discard")
    await read_until(streaming, gid, 2)
    await streaming.cancel(gid)
    events = await read_all(streaming, gid)
    assert isinstance(events[-1], Cancelled) and events[-1].message_id is None
    assert await Message.count().where(Message.conversation == cid, Message.role == "agent") == 0


async def test_if_busy_reject_refuses_and_stores_nothing(streaming: StreamingCore) -> None:
    alice, cid = await conversation_with_agent(pace=10)
    gid = await ask(streaming, alice, cid)
    with pytest.raises(GenerationBusy) as info:
        await post_message(alice, cid, MessageCreate(content="again"), streaming)
    assert info.value.status == 409 and info.value.details == {"generationId": str(gid)}
    assert await Message.count().where(Message.conversation == cid) == 1
    await streaming.cancel(gid)


async def test_if_busy_interrupt_cancels_the_running_answer(streaming: StreamingCore) -> None:
    alice, cid = await conversation_with_agent(pace=10)
    first = await ask(streaming, alice, cid)
    second = await ask(streaming, alice, cid, content="new question", if_busy="interrupt")
    events = await read_all(streaming, first)
    assert isinstance(events[-1], Cancelled) and events[-1].reason == "interrupted"
    running = await Generation.select(Generation.id).where(
        Generation.conversation == cid, Generation.status == "running"
    )
    assert [r["id"] for r in running] == [second]
    await streaming.cancel(second)


async def test_concurrent_posts_start_exactly_one_generation(streaming: StreamingCore) -> None:
    """One running generation per conversation, decided by the database's partial unique index."""
    alice, cid = await conversation_with_agent(pace=10)
    results = await asyncio.gather(
        *(post_message(alice, cid, MessageCreate(content=f"m{i}"), streaming) for i in range(12)),
        return_exceptions=True,
    )
    started = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, GenerationBusy)]
    assert len(started) == 1 and len(refused) == 11, results
    assert await Message.count().where(Message.conversation == cid) == 1  # refused ones stored nothing
    assert await Generation.count().where(Generation.conversation == cid) == 1
    generation = started[0][0].generation
    assert generation is not None
    await streaming.cancel(generation.id)


async def test_last_reader_leaving_with_no_grace_cancels(streaming: StreamingCore) -> None:
    alice, cid = await conversation_with_agent(pace=0.01)
    gid = await ask(streaming, alice, cid, disconnect_grace=0, partial="discard")
    await streaming.attach(gid)
    await read_until(streaming, gid, 2)
    streaming.detach(gid)
    events = await read_all(streaming, gid)
    assert isinstance(events[-1], Cancelled) and events[-1].reason == "disconnected"
    assert await Message.count().where(Message.conversation == cid, Message.role == "agent") == 0


async def test_a_reader_back_within_grace_keeps_the_answer_going(streaming: StreamingCore) -> None:
    alice, cid = await conversation_with_agent(pace=0.005)
    gid = await ask(streaming, alice, cid, disconnect_grace=30)  # members may ask up to the server default
    await streaming.attach(gid)
    seen = await read_until(streaming, gid, 2)
    streaming.detach(gid)
    await streaming.attach(gid)  # back, well within grace
    rest = await read_all(streaming, gid, seen[-1].seq)
    streaming.detach(gid)
    assert isinstance(rest[-1], Done)
    assert answer_text(seen + rest) == SENTENCE


async def test_grace_expiry_cancels_when_nobody_comes_back(streaming: StreamingCore) -> None:
    alice, cid = await conversation_with_agent(pace=10)
    gid = await ask(streaming, alice, cid, disconnect_grace=0.05)
    await streaming.attach(gid)
    streaming.detach(gid)
    events = await read_all(streaming, gid)  # ends when the grace timer has cancelled it
    assert isinstance(events[-1], Cancelled) and events[-1].reason == "disconnected"


async def test_a_generation_without_readers_runs_to_the_end(streaming: StreamingCore) -> None:
    """Grace counts from the last reader leaving: an answer nobody opened yet is not cancelled."""
    alice, cid = await conversation_with_agent()
    gid = await ask(streaming, alice, cid, disconnect_grace=0)
    assert isinstance((await read_all(streaming, gid))[-1], Done)


async def test_resume_from_the_database_after_the_log_expired(db: str, broker_kind: str) -> None:
    async with any_broker(broker_kind, log_ttl=0) as broker:
        await _resume_from_the_database(StreamingCore(broker, StreamPolicy(), store=ChatAnswerStore()))


async def _resume_from_the_database(streaming: StreamingCore) -> None:
    try:
        alice, cid = await conversation_with_agent()
        gid = await ask(streaming, alice, cid)
        live = await read_all(streaming, gid)
        for _ in range(100):
            if await streaming.broker.last_seq(gid) is None:
                break
            await asyncio.sleep(0)
        assert await streaming.broker.last_seq(gid) is None

        stored = await read_all(streaming, gid, 3)  # mid-stream cursor
        assert isinstance(stored[0], Snapshot) and stored[0].seq == live[-1].seq - 1
        assert stored[0].text == SENTENCE
        assert stored[1] == live[-1]  # the same done event, same seq
        assert await read_all(streaming, gid, live[-2].seq) == [live[-1]]
        assert await read_all(streaming, gid, live[-1].seq) == []
    finally:
        await streaming.shutdown()


async def test_a_reader_older_than_the_window_gets_a_snapshot(db: str, broker_kind: str) -> None:
    async with any_broker(broker_kind, retain=3) as broker:
        await _snapshot_for_an_old_reader(StreamingCore(broker, StreamPolicy(), store=ChatAnswerStore()))


async def _snapshot_for_an_old_reader(streaming: StreamingCore) -> None:
    try:
        alice, cid = await conversation_with_agent()
        gid = await ask(streaming, alice, cid)
        await read_all(streaming, gid)
        events = await read_all(streaming, gid, 1)
        assert isinstance(events[0], Snapshot) and isinstance(events[-1], Done)
        assert answer_text(events) == SENTENCE
    finally:
        await streaming.shutdown()


async def test_shutdown_cancels_running_answers(db: str) -> None:
    streaming = StreamingCore(InProcessBroker(), StreamPolicy(), store=ChatAnswerStore())
    alice, cid = await conversation_with_agent(pace=10)
    gid = await ask(streaming, alice, cid)
    await streaming.shutdown()
    generation = await load_generation(gid)
    assert generation is not None and generation.status is GenerationStatus.cancelled
    assert generation.error == "shutdown"


async def leftover_running(streaming: StreamingCore, cid: UUID) -> Generation:
    """A `running` row nobody produces: left by a run that crashed (alone), or produced by a
    process whose heartbeat is gone (shared broker); the core then ends it."""
    stale = Generation(conversation=cid, status="running", producer=f"{streaming.broker.node}-dead")
    if streaming.broker.shared:
        assert streaming.broker.is_peer(stale.producer)
    await stale.save()
    if streaming.broker.shared:
        assert await streaming.reap_orphans() == 1
    else:
        await streaming.startup()
    return stale


async def test_leftover_running_generations_end_interrupted(streaming: StreamingCore) -> None:
    _, cid = await conversation_with_agent()
    stale = await leftover_running(streaming, cid)
    generation = await load_generation(stale.id)
    assert generation is not None and generation.status is GenerationStatus.interrupted
    events = await read_all(streaming, stale.id)
    code = "producer_lost" if streaming.broker.shared else "interrupted"
    assert events[-1].seq == 2 and getattr(events[-1], "code", None) == code


async def test_a_reader_back_after_a_crash_fixes_where_the_interrupted_answer_ends(streaming: StreamingCore) -> None:
    """The process that knew the answer's length died: the first cursor back decides it,
    the terminal `error interrupted` takes the next seq, and that cursor then has the end."""
    _, cid = await conversation_with_agent()
    stale = await leftover_running(streaming, cid)
    conversation = {"id": cid}
    target = await streaming.resolve_stream(conversation, Cursor(generation_id=stale.id, seq=7))
    assert target == (stale.id, 7)
    events = await read_all(streaming, stale.id, 7)
    code = "producer_lost" if streaming.broker.shared else "interrupted"
    assert [(e.seq, getattr(e, "code", None)) for e in events] == [(8, code)]
    generation = await load_generation(stale.id)
    assert generation is not None and terminal_seq(generation) == 8
    # The end is now known: that cursor has everything; one beyond it is refused.
    assert await read_all(streaming, stale.id, 8) == []
    with pytest.raises(InvalidInput):
        await streaming.resolve_stream(conversation, Cursor(generation_id=stale.id, seq=9))


class FailingAdapter:
    """Two words, then a failure the adapter names."""

    name = "failing"

    async def stream(self, history: Any, config: Any) -> AsyncIterator[str]:
        yield "half"
        yield " an answer"
        raise AdapterError("upstream_unavailable", "the model server went away", retry_after=3)

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize("partial", ["keep", "discard"])
async def test_an_adapter_failure_is_an_error_event_with_the_kept_text(db: str, partial: str) -> None:
    streaming = StreamingCore(
        InProcessBroker(), StreamPolicy(partial=partial), store=ChatAnswerStore(), adapters={"echo": FailingAdapter()}
    )
    try:
        alice, cid = await conversation_with_agent()
        gid = await ask(streaming, alice, cid)
        events = await read_all(streaming, gid)
        error = events[-1]
        assert isinstance(error, Error) and error.code == "upstream_unavailable" and error.retry_after == 3
        generation = await load_generation(gid)
        assert generation is not None and generation.status is GenerationStatus.failed
        if partial == "keep":
            stored = await Message.select().where(Message.id == error.message_id).first()
            assert stored["content"] == "half an answer" and stored["status"] == "partial"
        else:
            assert error.message_id is None
            assert await Message.count().where(Message.conversation == cid, Message.role == "agent") == 0
        # Resumed after the log expired, the same error comes from the database (retryAfter,
        # relative to when it was said, only on the live event).
        stored_events = await streaming.stored_events(gid, 1)
        assert stored_events[-1] == msgspec.structs.replace(error, retry_after=None)
    finally:
        await streaming.shutdown()


async def test_many_answers_ending_together_are_all_stored(streaming: StreamingCore) -> None:
    """Concurrent writers wait for each other (on SQLite: BEGIN IMMEDIATE and the busy
    timeout) instead of failing: every answer ends with `done` and its message stored."""
    tenant = await make_tenant()
    agent = await create_agent(tenant.company_id, AgentCreate(name="fast", config={"pace": 0}))
    alice = tenant.principals["alice"]
    streaming.quotas.answers.per_key = 30  # 30 answers at once from one key (10 by default)
    conversations = [(await create_conversation(alice, ConversationCreate(agent_id=agent.id))).id for _ in range(30)]
    generations = await asyncio.gather(*(ask(streaming, alice, cid, "one two three") for cid in conversations))
    endings = await asyncio.gather(*(read_all(streaming, gid) for gid in generations))
    assert all(isinstance(events[-1], Done) for events in endings), [e[-1] for e in endings]
    assert await Message.count().where(Message.role == "agent", Message.conversation.is_in(conversations)) == 30


async def test_an_outcome_that_cannot_be_stored_still_ends_the_stream(
    streaming: StreamingCore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the database refuses the outcome, readers get a terminal `error storage_failed`
    instead of waiting forever."""
    import app.streaming.core as core_module

    async def refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("database unavailable")

    monkeypatch.setattr(streaming.store, "finish_generation", refuse)
    monkeypatch.setattr(core_module, "STORE_ATTEMPTS", 2)
    alice, cid = await conversation_with_agent()
    gid = await ask(streaming, alice, cid)
    events = await read_all(streaming, gid)
    assert isinstance(events[-1], Error) and events[-1].code == "storage_failed"
