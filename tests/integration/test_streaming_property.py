"""Property: whatever the answer's length, the retained window, the moment a reader drops
and how far the answer moves on while it is away, resuming from its cursor gives a text
equal to the stored message, and no seq is ever repeated or skipped (a snapshot may stand
for the events it replaces). The same for
answers of every part kind (the echo agent's `parts` mode: reasoning, text, a tool call
and its result, data): the parts a reader folds from what it got, snapshot included,
are the stored message's parts."""

from __future__ import annotations

import asyncio
import itertools
from uuid import UUID

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from app.agents.schemas import AgentCreate
from app.agents.service import create_agent
from app.auth.principal import Principal
from app.chat.answer_store import ChatAnswerStore
from app.chat.conversations import create_conversation
from app.chat.messages import post_message
from app.chat.schemas import ConversationCreate, MessageCreate
from app.streaming.core import StreamingCore
from app.streaming.events import Done, GenerationEvent, Snapshot, Token
from app.streaming.parts import Part, decode_parts
from app.streaming.policy import StreamPolicy
from app.tables import Message
from tests.factories import make_tenant
from tests.parts_support import answer_of, echo_parts, echo_text
from tests.redis_support import any_broker

MODES = ("text", "parts")


async def _tenant() -> tuple[Principal, dict[tuple[bool, str], UUID]]:
    """A member, and echo agents by (paced, mode)."""
    tenant = await make_tenant()
    agents: dict[tuple[bool, str], UUID] = {}
    for mode in MODES:
        for paced, pace in ((False, 0.0), (True, 0.001)):
            config = {"pace": pace, "mode": mode}
            agents[paced, mode] = (await create_agent(tenant.company_id, AgentCreate(name=mode, config=config))).id
    return tenant.principals["alice"], agents


async def _run(
    who: Principal,
    agent: UUID,
    words: int,
    retain: int,
    drop_after: int,
    ttl: float,
    kind: str,
    mode: str = "text",
    lag: int = 0,
) -> None:
    async with any_broker(kind, retain=retain, log_ttl=ttl) as broker:
        await _drop_and_resume(
            who,
            agent,
            words,
            drop_after,
            ttl,
            StreamingCore(broker, StreamPolicy(disconnect_grace=60), store=ChatAnswerStore()),
            mode,
            lag,
        )


async def _drop_and_resume(
    who: Principal,
    agent: UUID,
    words: int,
    drop_after: int,
    ttl: float,
    core: StreamingCore,
    mode: str = "text",
    lag: int = 0,
) -> None:
    try:
        conversation = await create_conversation(who, ConversationCreate(agent_id=agent))
        # Answers with parts: multi-byte text too (the Redis broker keeps the text's byte offsets).
        content = " ".join(f"w{i}" if mode == "text" or i % 3 else f"ü{i}🚀" for i in range(words))
        posted, _ = await post_message(who, conversation.id, MessageCreate(content=content), core)
        assert posted.generation is not None
        gid = posted.generation.id

        received: list[GenerationEvent] = []
        async for batch in core.follow(gid, 0, None):  # first connection, dropped after a while
            received += batch
            if len(received) >= drop_after:
                break
        cursor = received[-1].seq
        if lag:  # the answer moves `lag` events on while the reader is away (seen by another reader, not a clock)
            async for batch in core.follow(gid, cursor, None):
                if batch[-1].seq >= cursor + lag:
                    break
        if ttl == 0:  # let the ended log expire, when it has ended: resume comes from the database
            for _ in range(10):
                await asyncio.sleep(0)
        async for batch in core.follow(gid, cursor, None):  # reconnect with the cursor
            received += batch

        seqs = [e.seq for e in received]
        assert all(b > a for a, b in itertools.pairwise(seqs)), seqs  # never repeated
        for prev, event in itertools.pairwise(received):  # never skipped silently
            assert event.seq == prev.seq + 1 or isinstance(event, Snapshot), (prev, event)
        assert isinstance(received[-1], Done)
        text = ""
        for event in received:
            text = (
                event.text if isinstance(event, Snapshot) else text + (event.text if isinstance(event, Token) else "")
            )
        stored = await (
            Message.select(Message.content, Message.parts).where(Message.id == received[-1].message_id).first()
        )
        assert stored is not None
        expected = content if mode == "text" else echo_text(content)
        assert text == stored["content"] == expected
        # Every part kind: folded from what the reader got (a snapshot replacing what came
        # before it; a part started or ended twice would not fold), equal to the stored parts.
        parts = [Part(kind="text", text=content)] if mode == "text" else echo_parts(content, posted.message.id)
        assert answer_of(received) == decode_parts(stored["parts"]) == parts
    finally:
        await core.shutdown()


@pytest.mark.parametrize("db", ["postgres", "sqlite"], indirect=True)
def test_resume_reconstructs_the_stored_answer(db: str, broker_kind: str) -> None:
    who, agents = asyncio.run(_tenant())

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        words=st.integers(min_value=1, max_value=60),
        retain=st.integers(min_value=1, max_value=80),
        drop_after=st.integers(min_value=1, max_value=70),
        paced_agent=st.booleans(),
        expire=st.booleans(),
        mode=st.sampled_from(MODES),
        lag=st.integers(min_value=0, max_value=40),
    )
    # Always among the examples: answers with parts resumed from a snapshot of the log (the
    # cursor in the reasoning, the answer by then in its text; the cursor in the text, the
    # answer by then inside its tool call), and from the database (the answer ended, its log gone).
    @example(words=10, retain=3, drop_after=3, paced_agent=False, expire=False, mode="parts", lag=12)
    @example(words=10, retain=2, drop_after=12, paced_agent=True, expire=False, mode="parts", lag=11)
    @example(words=10, retain=3, drop_after=3, paced_agent=False, expire=True, mode="parts", lag=40)
    def check(words: int, retain: int, drop_after: int, paced_agent: bool, expire: bool, mode: str, lag: int) -> None:
        agent = agents[paced_agent, mode]
        asyncio.run(_run(who, agent, words, retain, drop_after, 0 if expire else 300, broker_kind, mode, lag))

    check()
