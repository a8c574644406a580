"""A row that vanishes between a service's check and its write (a conversation deleted
while a message is edited or posted, a company deleted while a key is made) is a 404,
never a 500; and a key's user must belong to the key's company. On both engines.

Where the race is forced, the delete runs at a fixed point between the check and the
write (a step of the service replaced by one that deletes first), so the test does not
depend on how the scheduler interleaves two requests.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any
from uuid import UUID

import httpx
import pytest

from app.auth.principal import Principal
from app.auth.schemas import ApiKeyCreate
from app.auth.service import create_key
from app.chat import messages
from app.chat.conversations import create_conversation
from app.chat.messages import edit_message, post_message
from app.chat.schemas import ConversationCreate, MessageCreate, MessageEdit
from app.errors import InvalidInput, NotFound
from app.streaming.core import StreamingCore
from app.tables import ApiKey, Company, Conversation, Message
from tests.factories import Tenant, make_tenant

pytestmark = pytest.mark.anyio


@pytest.fixture
def broker_kind() -> str:
    return "in-process"


async def _conversation_with_message(tenant: Tenant, core: StreamingCore) -> tuple[uuid.UUID, uuid.UUID]:
    alice = tenant.principals["alice"]
    conversation = await create_conversation(alice, ConversationCreate(title="t"))
    posted, _ = await post_message(alice, conversation.id, MessageCreate(content="hello"), core)
    return conversation.id, posted.message.id


async def test_edit_while_the_conversation_is_deleted_is_404(
    db: str, core: StreamingCore, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant = await make_tenant()
    conversation_id, message_id = await _conversation_with_message(tenant, core)
    original_update = Message.update

    class DeleteFirst:
        """The edit's UPDATE, run just after a concurrent DELETE of the conversation."""

        def __init__(self, *args: Any) -> None:
            self.query = original_update(*args)

        def where(self, *conditions: Any) -> DeleteFirst:
            self.query = self.query.where(*conditions)
            return self

        def __await__(self) -> Any:
            return self.run().__await__()

        async def run(self) -> Any:
            await Conversation.delete().where(Conversation.id == conversation_id)
            return await self.query

    monkeypatch.setattr(Message, "update", DeleteFirst)
    with pytest.raises(NotFound) as caught:
        await edit_message(tenant.principals["alice"], conversation_id, message_id, MessageEdit(content="new"))
    assert caught.value.details == {"messageId": str(message_id)}
    assert not await Message.exists().where(Message.id == message_id)


async def test_post_while_the_conversation_is_deleted_is_404(
    db: str, core: StreamingCore, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant = await make_tenant()
    alice = tenant.principals["alice"]
    conversation = await create_conversation(alice, ConversationCreate(title="t", agent_id=tenant.agent_id))
    load_agent_of = messages.load_agent_of

    async def delete_then_agent(principal: Principal, conversation_id: UUID) -> Any:
        agent = await load_agent_of(principal, conversation_id)
        await Conversation.delete().where(Conversation.id == conversation.id)
        return agent

    monkeypatch.setattr(messages, "load_agent_of", delete_then_agent)
    with pytest.raises(NotFound) as caught:
        await post_message(alice, conversation.id, MessageCreate(content="hi"), core)
    assert caught.value.details == {"conversationId": str(conversation.id)}
    assert not await Message.exists().where(Message.conversation == conversation.id)
    assert not core._producers  # nothing was launched for it


async def test_concurrent_edits_and_delete_over_http_never_500(client: httpx.AsyncClient) -> None:
    tenant = await make_tenant()
    headers = tenant.headers("alice")
    conversation = (await client.post("/api/conversations", json={"title": "t"}, headers=headers)).json()
    base = f"/api/conversations/{conversation['id']}"
    message = (await client.post(f"{base}/messages", json={"content": "hi"}, headers=headers)).json()["message"]
    edits = [
        client.put(f"{base}/messages/{message['id']}", json={"content": f"edit {i}"}, headers=headers)
        for i in range(20)
    ]
    responses = await asyncio.gather(*edits[:10], client.delete(base, headers=headers), *edits[10:])
    assert {r.status_code for r in responses} <= {200, 204, 404}, [r.text for r in responses if r.status_code >= 500]
    for r in responses:
        if r.status_code == 404:
            assert r.json()["code"] == "not_found"


async def test_key_user_must_belong_to_the_company(db: str) -> None:
    acme, globex = await make_tenant(), await make_tenant()
    stranger = globex.principals["alice"].user_id
    with pytest.raises(InvalidInput) as caught:
        await create_key(acme.company_id, ApiKeyCreate(name="k", user_id=stranger))
    assert caught.value.details[0]["field"] == "userId"
    assert not await ApiKey.exists().where(ApiKey.user_id == stranger, ApiKey.company == acme.company_id)
    # A user of the company, or a new one (an id no company uses), is fine.
    for user_id in (acme.principals["alice"].user_id, uuid.uuid4()):
        key = await create_key(acme.company_id, ApiKeyCreate(name="phone", user_id=user_id))
        assert key.user_id == user_id


async def test_key_for_a_deleted_company_is_404(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tenant = await make_tenant()
    await Company.delete().where(Company.id == tenant.company_id)
    with pytest.raises(NotFound):
        await create_key(tenant.company_id, ApiKeyCreate(name="late"))


async def test_key_for_another_companys_user_over_http_is_400(client: httpx.AsyncClient) -> None:
    acme, globex = await make_tenant(), await make_tenant()
    r = await client.post(
        "/api/keys",
        json={"name": "k", "userId": str(globex.principals["bob"].user_id)},
        headers=acme.headers("admin"),
    )
    assert r.status_code == 400, r.text
    assert r.json()["details"][0]["field"] == "userId"
