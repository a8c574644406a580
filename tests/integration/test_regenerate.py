"""Asking the agent again (issue #17, point 5): `POST /api/conversations/{id}/messages/{messageId}/answer`
starts a new answer to the conversation's last user message, as a post would; the older
answer stays stored, and the history (what the agent is given) keeps only the newest answer.

The rules are checked on the services (PostgreSQL and SQLite, each broker), the route over
HTTP (ASGI). Nothing sleeps: answers are followed to their terminal event in the core's log.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from uuid import UUID, uuid4

import httpx
import msgspec
import pytest

from app.agents.schemas import AgentCreate
from app.agents.service import create_agent
from app.auth.principal import Principal
from app.chat.conversations import create_conversation
from app.chat.generations import GenerationBusy, load_generation
from app.chat.messages import answer_again, edit_message, history, list_messages, post_message
from app.chat.schemas import AnswerAgain, ConversationCreate, MessageCreate, MessageEdit, ToolResultCreate
from app.chat.tool_results import post_tool_result
from app.config import get_settings
from app.errors import Conflict, NotFound
from app.rate_limit import TooManyRequests
from app.streaming.core import StreamingCore
from app.streaming.events import Done, GenerationEvent, Token
from app.streaming.quotas import Quotas
from app.tables import GenerationStatus
from tests.factories import Tenant, make_tenant

pytestmark = pytest.mark.anyio

QUESTION = "find me a table"


@pytest.fixture
def streaming(db: str, core: StreamingCore) -> StreamingCore:
    return core


async def conversation(tenant: Tenant, mode: str = "text", pace: float = 0, who: str = "alice") -> UUID:
    agent = await create_agent(tenant.company_id, AgentCreate(name=f"echo {mode}", config={"pace": pace, "mode": mode}))
    created = await create_conversation(tenant.principals[who], ConversationCreate(title="t", agent_id=agent.id))
    return created.id


async def read_all(core: StreamingCore, generation_id: UUID) -> list[GenerationEvent]:
    """Every event of an answer, to its terminal event."""
    return [event async for batch in core.follow(generation_id, 0, None) for event in batch]


async def ask(core: StreamingCore, who: Principal, cid: UUID, content: str = QUESTION, **extra: Any) -> Any:
    """Post a message and wait for its answer to end; the posted result."""
    posted, _ = await post_message(who, cid, MessageCreate(content=content, **extra), core)
    if posted.generation is not None:
        await read_all(core, posted.generation.id)
    return posted


async def stored_answer(posted: Any) -> UUID:
    """The message the (ended) answer of a post stored."""
    generation = await load_generation(posted.generation.id)
    assert generation is not None and generation.result_message_id is not None
    return generation.result_message_id


def words(events: list[GenerationEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, Token))


async def roles_and_ids(who: Principal, cid: UUID) -> list[tuple[str, UUID]]:
    page = await list_messages(who, cid, None, 100)
    return [(m.role.value, m.id) for m in page.items]


# -- the services ----------------------------------------------------------------------------------------


async def test_asking_again_starts_a_new_answer_and_keeps_the_old_one(streaming: StreamingCore) -> None:
    tenant = await make_tenant()
    alice = tenant.principals["alice"]
    cid = await conversation(tenant)
    first = await ask(streaming, alice, cid)

    again = await answer_again(alice, cid, first.message.id, AnswerAgain(), streaming)
    assert again.message == first.message  # the user message, as it reads now
    generation = again.generation
    assert generation is not None and generation.id != first.generation.id
    assert generation.status is GenerationStatus.running and generation.reply_to_id == first.message.id
    events = await read_all(streaming, generation.id)
    assert isinstance(events[-1], Done) and words(events) == QUESTION
    done = await load_generation(generation.id)
    assert done is not None and done.status is GenerationStatus.done

    # Both answers are stored and listed; the history keeps the newer one only.
    old = await stored_answer(first)
    listed = await roles_and_ids(alice, cid)
    assert listed == [("user", first.message.id), ("agent", old), ("agent", done.result_message_id)]
    turns = await history(alice, cid)
    assert [(t.role.value, t.id) for t in turns] == [("user", first.message.id), ("agent", done.result_message_id)]

    # Asked again once more: still one answer in the history, the newest.
    third = await answer_again(alice, cid, first.message.id, AnswerAgain(), streaming)
    assert third.generation is not None
    await read_all(streaming, third.generation.id)
    newest = await load_generation(third.generation.id)
    assert newest is not None
    turns = await history(alice, cid)
    assert [t.id for t in turns] == [first.message.id, newest.result_message_id]
    assert len(await roles_and_ids(alice, cid)) == 4


async def test_history_leaves_out_older_answers_with_their_tool_rounds(streaming: StreamingCore) -> None:
    """user, agent (calls a tool), tool result, agent (continues), then asked again: the
    history is the user message and the new answer; the first round stays listed."""
    tenant = await make_tenant()
    alice = tenant.principals["alice"]
    cid = await conversation(tenant, mode="tool")
    earlier = await ask(streaming, alice, cid, "an earlier question")
    first = await ask(streaming, alice, cid)
    page = await list_messages(alice, cid, None, 100)
    [call] = [p for p in page.items[-1].parts if p.kind == "tool_call"]
    assert call.tool_call_id is not None
    result = ToolResultCreate(tool_call_id=call.tool_call_id, output={"tables": 2})
    posted, _ = await post_tool_result(alice, cid, result, streaming)
    assert posted.generation is not None
    await read_all(streaming, posted.generation.id)
    before = await history(alice, cid)
    assert [t.role.value for t in before] == ["user", "agent", "user", "agent", "tool", "agent"]

    again = await answer_again(alice, cid, first.message.id, AnswerAgain(), streaming)
    assert again.generation is not None
    await read_all(streaming, again.generation.id)
    newest = await load_generation(again.generation.id)
    assert newest is not None
    turns = await history(alice, cid)
    assert [t.id for t in turns] == [before[0].id, before[1].id, first.message.id, newest.result_message_id]
    assert earlier.message.id == before[0].id  # the earlier turn is untouched
    listed = [role for role, _ in await roles_and_ids(alice, cid)]
    assert listed == ["user", "agent", "user", "agent", "tool", "agent", "agent"]


async def test_calls_of_an_answer_asked_again_wait_for_nothing(streaming: StreamingCore) -> None:
    """Once a newer answer to the message started, the older answer's tool calls take no result."""
    tenant = await make_tenant()
    alice = tenant.principals["alice"]
    cid = await conversation(tenant, mode="tool", pace=0.05)
    first = await ask(streaming, alice, cid)
    page = await list_messages(alice, cid, None, 100)
    [call] = [p for p in page.items[-1].parts if p.kind == "tool_call"]
    assert call.tool_call_id is not None

    again = await answer_again(alice, cid, first.message.id, AnswerAgain(), streaming)
    assert again.generation is not None
    with pytest.raises(NotFound) as refused:  # while the new answer runs (it takes a second)
        await post_tool_result(alice, cid, ToolResultCreate(tool_call_id=call.tool_call_id, output=1), streaming)
    assert refused.value.code == "tool_call_not_found"
    await streaming.cancel(again.generation.id)


async def test_an_edited_message_is_answered_with_its_edited_text(streaming: StreamingCore) -> None:
    tenant = await make_tenant()
    alice = tenant.principals["alice"]
    cid = await conversation(tenant)
    first = await ask(streaming, alice, cid)
    await edit_message(alice, cid, first.message.id, MessageEdit(content="two chairs please"), streaming)

    again = await answer_again(alice, cid, first.message.id, AnswerAgain(), streaming)
    assert again.message.effective_content == "two chairs please" and again.message.content == QUESTION
    assert again.generation is not None
    assert words(await read_all(streaming, again.generation.id)) == "two chairs please"


async def test_only_the_last_user_message_can_be_answered_again(streaming: StreamingCore) -> None:
    tenant = await make_tenant()
    alice = tenant.principals["alice"]
    cid = await conversation(tenant)
    earlier = await ask(streaming, alice, cid, "earlier")
    last = await ask(streaming, alice, cid, "last")
    answer = await stored_answer(last)
    for message_id in (earlier.message.id, answer):  # an earlier user message; an agent message
        with pytest.raises(Conflict) as refused:
            await answer_again(alice, cid, message_id, AnswerAgain(), streaming)
        assert refused.value.code == "not_last_user_message"
        assert refused.value.details == {"messageId": str(message_id), "lastUserMessageId": str(last.message.id)}
    with pytest.raises(NotFound) as missing:  # no such message
        await answer_again(alice, cid, (unknown := uuid4()), AnswerAgain(), streaming)
    assert missing.value.details == {"messageId": str(unknown)}
    elsewhere = await conversation(tenant)
    with pytest.raises(NotFound) as missing:  # a message of another conversation
        await answer_again(alice, elsewhere, last.message.id, AnswerAgain(), streaming)
    assert missing.value.details == {"messageId": str(last.message.id)}
    assert len(await roles_and_ids(alice, cid)) == 4  # nothing was started or stored


async def test_a_tool_result_cannot_be_answered_again(streaming: StreamingCore) -> None:
    tenant = await make_tenant()
    alice = tenant.principals["alice"]
    cid = await conversation(tenant, mode="tool")
    await ask(streaming, alice, cid)
    page = await list_messages(alice, cid, None, 100)
    [call] = [p for p in page.items[-1].parts if p.kind == "tool_call"]
    assert call.tool_call_id is not None
    posted, _ = await post_tool_result(
        alice, cid, ToolResultCreate(tool_call_id=call.tool_call_id, output=1), streaming
    )
    assert posted.generation is not None
    await read_all(streaming, posted.generation.id)
    with pytest.raises(Conflict) as refused:
        await answer_again(alice, cid, posted.message.id, AnswerAgain(), streaming)
    assert refused.value.code == "not_last_user_message"


async def test_while_an_answer_runs_the_busy_policy_applies(streaming: StreamingCore) -> None:
    tenant = await make_tenant()
    alice = tenant.principals["alice"]
    cid = await conversation(tenant, pace=10)
    posted, _ = await post_message(alice, cid, MessageCreate(content=QUESTION), streaming)
    assert posted.generation is not None
    with pytest.raises(GenerationBusy) as busy:
        await answer_again(alice, cid, posted.message.id, AnswerAgain(), streaming)
    assert busy.value.code == "generation_in_progress"
    assert busy.value.details == {"generationId": str(posted.generation.id)}

    # `interrupt` cancels the running answer and starts the new one.
    again = await answer_again(alice, cid, posted.message.id, AnswerAgain(if_busy="interrupt"), streaming)
    old = await load_generation(posted.generation.id)
    assert old is not None and old.status is GenerationStatus.cancelled and old.error == "interrupted"
    assert again.generation is not None and again.generation.status is GenerationStatus.running
    await streaming.cancel(again.generation.id)


async def test_a_conversation_without_agent_is_409_no_agent(streaming: StreamingCore) -> None:
    tenant = await make_tenant()
    alice = tenant.principals["alice"]
    bare = await create_conversation(alice, ConversationCreate(title="t"))
    posted, _ = await post_message(alice, bare.id, MessageCreate(content=QUESTION), streaming)
    with pytest.raises(Conflict) as refused:
        await answer_again(alice, bare.id, posted.message.id, AnswerAgain(), streaming)
    assert refused.value.code == "no_agent"
    assert refused.value.details == {"conversationId": str(bare.id)}


async def test_who_may_ask_again(streaming: StreamingCore) -> None:
    """The owner and the company's admins, as for posting; another member or company: 404."""
    tenant, other = await make_tenant(), await make_tenant()
    cid = await conversation(tenant)
    first = await ask(streaming, tenant.principals["alice"], cid)
    for outsider in (tenant.principals["bob"], other.principals["admin"]):
        with pytest.raises(NotFound) as refused:
            await answer_again(outsider, cid, first.message.id, AnswerAgain(), streaming)
        assert refused.value.details == {"conversationId": str(cid)}
    again = await answer_again(tenant.principals["admin"], cid, first.message.id, AnswerAgain(), streaming)
    assert again.generation is not None
    await read_all(streaming, again.generation.id)


@pytest.fixture
def small_quotas(streaming: StreamingCore) -> Iterator[StreamingCore]:
    """Three messages a minute and one running answer per key."""
    settings = msgspec.structs.replace(get_settings(), messages_per_minute=3, max_answers_per_key=1)
    saved, streaming.quotas = streaming.quotas, Quotas(settings)
    yield streaming
    streaming.quotas = saved


async def test_asking_again_counts_as_a_message_and_as_a_running_answer(small_quotas: StreamingCore) -> None:
    core = small_quotas
    tenant = await make_tenant()
    alice = tenant.principals["alice"]
    cid, slow_cid = await conversation(tenant), await conversation(tenant, pace=10)
    first = await ask(core, alice, cid)  # message 1
    running, _ = await post_message(alice, slow_cid, MessageCreate(content="slow"), core)  # message 2
    assert running.generation is not None

    with pytest.raises(TooManyRequests) as refused:  # message 3; the key's one running answer is taken
        await answer_again(alice, cid, first.message.id, AnswerAgain(), core)
    assert refused.value.code == "too_many_answers"
    assert [role for role, _ in await roles_and_ids(alice, cid)] == ["user", "agent"]  # nothing started
    await core.cancel(running.generation.id)

    with pytest.raises(TooManyRequests) as limited:  # a fourth message in the minute
        await answer_again(alice, cid, first.message.id, AnswerAgain(), core)
    assert limited.value.code == "rate_limited"


# -- the route -------------------------------------------------------------------------------------------


async def http_conversation(client: httpx.AsyncClient, tenant: Tenant, **body: Any) -> str:
    r = await client.post("/api/conversations", json={"title": "t", **body}, headers=tenant.headers("alice"))
    assert r.status_code == 201, r.text
    cid: str = r.json()["id"]
    return cid


async def finished(client: httpx.AsyncClient, tenant: Tenant, cid: str, gid: str) -> str:
    """Read the answer's stream to its end (SSE, from its start); the stream's text."""
    r = await client.get(
        f"/api/conversations/{cid}/stream", params={"after": f"{gid}.0"}, headers=tenant.headers("alice")
    )
    assert r.status_code == 200 and "event: done" in r.text, r.text
    return r.text


async def test_the_route(client: httpx.AsyncClient, acme: Tenant) -> None:
    h = acme.headers("alice")
    agent = await create_agent(acme.company_id, AgentCreate(name="fast", config={"pace": 0}))
    cid = await http_conversation(client, acme, agentId=str(agent.id))
    posted = (await client.post(f"/api/conversations/{cid}/messages", json={"content": "one two"}, headers=h)).json()
    await finished(client, acme, cid, posted["generation"]["id"])
    url = f"/api/conversations/{cid}/messages/{posted['message']['id']}/answer"

    # No body, an empty object, or policy overrides: 201 {message, generation}, as a post.
    for kwargs in ({}, {"json": {}}, {"json": {"ifBusy": "reject", "partial": "keep", "disconnectGrace": 5}}):
        r = await client.post(url, headers=h, **kwargs)
        assert r.status_code == 201, r.text
        body = r.json()
        assert set(body) == {"message", "generation"} and body["message"] == posted["message"]
        assert body["generation"]["replyToId"] == posted["message"]["id"] and body["generation"]["status"] == "running"
        await finished(client, acme, cid, body["generation"]["id"])
    messages = (await client.get(f"/api/conversations/{cid}/messages", headers=h)).json()["items"]
    assert [m["role"] for m in messages] == ["user", "agent", "agent", "agent", "agent"]
    turns = (await client.get(f"/api/conversations/{cid}/history", headers=h)).json()
    assert [t["id"] for t in turns] == [posted["message"]["id"], messages[-1]["id"]]

    # Errors, in the error shape.
    r = await client.post(url, json={"surprise": 1}, headers=h)
    assert r.status_code == 400 and r.json()["code"] == "invalid_request"
    assert r.json()["details"][0]["field"] == "surprise"
    r = await client.post(f"/api/conversations/{cid}/messages/{messages[-1]['id']}/answer", headers=h)
    assert r.status_code == 409 and r.json()["code"] == "not_last_user_message"
    for path in (f"{uuid4()}/messages/{posted['message']['id']}", f"{cid}/messages/{uuid4()}"):
        r = await client.post(f"/api/conversations/{path}/answer", headers=h)
        assert r.status_code == 404 and r.json()["code"] == "not_found", r.text
    for path in (f"not-a-uuid/messages/{posted['message']['id']}", f"{cid}/messages/not-a-uuid"):
        r = await client.post(f"/api/conversations/{path}/answer", headers=h)
        assert r.status_code == 404 and set(r.json()) == {"error", "code", "details"}, r.text
    r = await client.post(url, headers=acme.headers("bob"))
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    r = await client.post(url)
    assert r.status_code == 401


async def test_the_route_is_documented(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/schema/openapi.json")).json()
    operation = spec["paths"]["/api/conversations/{conversation_id}/messages/{message_id}/answer"]["post"]
    assert operation["summary"] == "Answer this message again"
    assert {"201", "400", "401", "404", "409", "429"} <= set(operation["responses"])
    schema = operation["responses"]["201"]["content"]["application/json"]["schema"]
    assert schema["$ref"].endswith("/MessagePosted")
