"""An answer's rows at its start and end, stored atomically on both databases (on PostgreSQL
as one statement each, on SQLite as a transaction): the first ending wins and stores the
answer once; concurrent retries of a message that starts an answer store one message and
one answer."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from app.agents.schemas import AgentCreate
from app.agents.service import create_agent
from app.chat.conversations import create_conversation
from app.chat.generations import create_running, finish_generation, load_generation
from app.chat.messages import post_message
from app.chat.schemas import ConversationCreate, MessageCreate
from app.streaming.core import StreamingCore
from app.streaming.parts import Part
from app.tables import Conversation, Generation, GenerationStatus, Message
from tests.factories import make_tenant

pytestmark = pytest.mark.anyio


@pytest.fixture
def broker_kind() -> str:
    return "in-process"  # storage only


async def test_the_first_ending_stores_the_answer_and_a_second_changes_nothing(db: str) -> None:
    tenant = await make_tenant()
    alice = tenant.principals["alice"]
    conversation = await create_conversation(alice, ConversationCreate())
    running = await create_running(conversation.id, None, None, uuid.uuid4())
    parts = [Part(kind="text", text="the answer")]
    ends = {"token_count": 2, "chunk_count": 3, "ttft_ms": 5}

    stored = await finish_generation(running, GenerationStatus.done, parts=parts, **ends)
    assert stored is not None and stored["content"] == "the answer" and stored["generation"] == running.id
    again = await finish_generation(running, GenerationStatus.cancelled, parts=[Part(kind="text", text="x")], **ends)
    assert again is None

    ended = await load_generation(running.id)
    assert ended is not None and ended.status is GenerationStatus.done and ended.result_message_id == stored["id"]
    messages = await Message.select(Message.content).where(Message.conversation == conversation.id)
    assert messages == [{"content": "the answer"}]
    row = await Conversation.select(Conversation.last_message_at).where(Conversation.id == conversation.id).first()
    assert row is not None and row["last_message_at"] == stored["created_at"]


async def test_an_ending_without_an_answer_to_keep_stores_no_message(db: str) -> None:
    tenant = await make_tenant()
    conversation = await create_conversation(tenant.principals["alice"], ConversationCreate())
    running = await create_running(conversation.id, None, None, uuid.uuid4())
    assert (
        await finish_generation(
            running, GenerationStatus.cancelled, parts=None, token_count=0, chunk_count=1, ttft_ms=None
        )
        is None
    )
    ended = await load_generation(running.id)
    assert ended is not None and ended.status is GenerationStatus.cancelled and ended.result_message_id is None
    assert await Message.count().where(Message.conversation == conversation.id) == 0


async def test_an_ending_after_the_conversation_was_deleted_stores_nothing(db: str) -> None:
    tenant = await make_tenant()
    conversation = await create_conversation(tenant.principals["alice"], ConversationCreate())
    running = await create_running(conversation.id, None, None, uuid.uuid4())
    await Conversation.delete().where(Conversation.id == conversation.id)
    parts = [Part(kind="text", text="late")]
    assert (
        await finish_generation(running, GenerationStatus.done, parts=parts, token_count=1, chunk_count=2, ttft_ms=1)
        is None
    )
    assert await Message.count().where(Message.conversation == conversation.id) == 0


async def test_concurrent_retries_of_a_message_that_starts_an_answer_store_one_of_each(
    db: str, core: StreamingCore
) -> None:
    tenant = await make_tenant()
    alice = tenant.principals["alice"]
    agent = await create_agent(tenant.company_id, AgentCreate(name="slow", config={"pace": 0.05}))
    conversation = await create_conversation(alice, ConversationCreate(agent_id=agent.id))
    data = MessageCreate(content="one two three four five", client_message_id="retry")
    results = await asyncio.gather(*(post_message(alice, conversation.id, data, core) for _ in range(8)))

    assert sum(1 for _, created in results if created) == 1
    assert len({posted.message.id for posted, _ in results}) == 1
    answers = {posted.generation.id for posted, _ in results if posted.generation is not None}
    assert len(answers) == 1, "every retry is told the one answer"
    assert await Message.count().where(Message.conversation == conversation.id) == 1
    assert await Generation.count().where(Generation.conversation == conversation.id) == 1
