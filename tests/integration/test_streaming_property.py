"""Property: whatever the answer's length, the retained window and the moment a reader
drops, resuming from its cursor gives a text equal to the stored message, and no seq is
ever repeated or skipped (a snapshot may stand for the events it replaces)."""

from __future__ import annotations

import asyncio
import itertools
from uuid import UUID

import pytest
from hypothesis import HealthCheck, given, settings
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
from app.streaming.policy import StreamPolicy
from app.tables import Message
from tests.factories import make_tenant
from tests.redis_support import any_broker


async def _tenant() -> tuple[Principal, UUID, UUID]:
    tenant = await make_tenant()
    fast = await create_agent(tenant.company_id, AgentCreate(name="fast", config={"pace": 0}))
    paced = await create_agent(tenant.company_id, AgentCreate(name="paced", config={"pace": 0.001}))
    return tenant.principals["alice"], fast.id, paced.id


async def _run(who: Principal, agent: UUID, words: int, retain: int, drop_after: int, ttl: float, kind: str) -> None:
    async with any_broker(kind, retain=retain, log_ttl=ttl) as broker:
        await _drop_and_resume(
            who,
            agent,
            words,
            drop_after,
            ttl,
            StreamingCore(broker, StreamPolicy(disconnect_grace=60), store=ChatAnswerStore()),
        )


async def _drop_and_resume(
    who: Principal, agent: UUID, words: int, drop_after: int, ttl: float, core: StreamingCore
) -> None:
    try:
        conversation = await create_conversation(who, ConversationCreate(agent_id=agent))
        content = " ".join(f"w{i}" for i in range(words))
        posted, _ = await post_message(who, conversation.id, MessageCreate(content=content), core)
        assert posted.generation is not None
        gid = posted.generation.id

        received: list[GenerationEvent] = []
        async for batch in core.follow(gid, 0, None):  # first connection, dropped after a while
            received += batch
            if len(received) >= drop_after:
                break
        if ttl == 0:  # let the ended log expire, when it has ended: resume comes from the database
            for _ in range(10):
                await asyncio.sleep(0)
        cursor = received[-1].seq
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
        stored = await Message.select(Message.content).where(Message.id == received[-1].message_id).first()
        assert text == stored["content"] == content
    finally:
        await core.shutdown()


@pytest.mark.parametrize("db", ["postgres", "sqlite"], indirect=True)
def test_resume_reconstructs_the_stored_answer(db: str, broker_kind: str) -> None:
    who, fast, paced = asyncio.run(_tenant())

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        words=st.integers(min_value=1, max_value=60),
        retain=st.integers(min_value=1, max_value=80),
        drop_after=st.integers(min_value=1, max_value=70),
        paced_agent=st.booleans(),
        expire=st.booleans(),
    )
    def check(words: int, retain: int, drop_after: int, paced_agent: bool, expire: bool) -> None:
        agent = paced if paced_agent else fast
        asyncio.run(_run(who, agent, words, retain, drop_after, 0 if expire else 300, broker_kind))

    check()
