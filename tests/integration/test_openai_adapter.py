"""The `openai` adapter against a local fake OpenAI-compatible server, over real HTTP.

The fake server (tests/fake_model_server.py) runs on the test's event loop: a test
scripts each answer, holds chunks back with events, and sees what the adapter sent
and when it hung up. The streaming core runs in-process here; one test reads over SSE
from a real `chatstream serve`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import time
import uuid
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator, Iterator
from typing import Any
from uuid import UUID

import anyio
import httpx
import msgspec
import pytest
from httpx_sse import aconnect_sse

from app.agents.schemas import AgentCreate
from app.agents.service import create_agent
from app.auth.principal import Principal
from app.chat.answer_store import ChatAnswerStore
from app.chat.conversations import create_conversation
from app.chat.generations import load_generation
from app.chat.messages import edit_message, post_message
from app.chat.schemas import ConversationCreate, MessageCreate, MessageEdit
from app.config import get_settings
from app.streaming.adapters import build_adapters
from app.streaming.adapters.openai import OpenAIAdapter
from app.streaming.broker import InProcessBroker
from app.streaming.core import StreamingCore
from app.streaming.events import Done, Error, GenerationEvent, PartDelta, PartEnd, PartStart, Token
from app.streaming.parts import Part, decode_parts, encode_parts
from app.streaming.policy import StreamPolicy
from app.tables import Agent, Conversation, GenerationStatus, Message, MessageRole
from tests.factories import Tenant, make_tenant
from tests.fake_model_server import FakeModelServer, Reply, Step, answer, chunk, tool_call, tool_calls_chunk
from tests.integration.live_server import LiveServer, free_port

pytestmark = pytest.mark.anyio


@pytest.fixture
def broker_kind() -> str:
    """Nothing here depends on the broker: the in-process one only (the core's own tests run both)."""
    return "in-process"


KEY_VAR = "OPENAI_API_KEY"
KEY = "sk-test-not-a-real-key"
STEP = 10.0  # the longest any wait may take before the test fails


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The key, and an operator's policy for the fake model server on 127.0.0.1: that
    address allowed (as for a local model server) and the key bound to it. Settings are
    read again after (their cache is cleared before monkeypatch restores the environment)."""
    monkeypatch.setenv(KEY_VAR, KEY)
    operator_policy(monkeypatch, allow="127.0.0.1", keys=f"{KEY_VAR}=127.0.0.1")
    yield
    get_settings.cache_clear()


def operator_policy(monkeypatch: pytest.MonkeyPatch, *, allow: str, keys: str) -> None:
    """Set CHATSTREAM_UPSTREAM_ALLOW and CHATSTREAM_MODEL_KEY_VARS for the settings read next."""
    monkeypatch.setenv("CHATSTREAM_UPSTREAM_ALLOW", allow)
    monkeypatch.setenv("CHATSTREAM_MODEL_KEY_VARS", keys)
    get_settings.cache_clear()


def core_with(**settings: Any) -> StreamingCore:
    """A streaming core whose adapters use these settings (the rest as the test's)."""
    return StreamingCore(
        InProcessBroker(),
        StreamPolicy(),
        store=ChatAnswerStore(),
        adapters=build_adapters(msgspec.structs.replace(get_settings(), **settings)),
    )


@pytest.fixture
async def fake() -> AsyncIterator[FakeModelServer]:
    server = await FakeModelServer().start()
    try:
        yield server
    finally:
        await server.stop()


def model_config(base_url: str, **extra: Any) -> dict[str, Any]:
    return {"baseUrl": base_url, "model": "fake-model", "apiKeyEnv": KEY_VAR, **extra}


async def openai_conversation(base_url: str, **config: Any) -> tuple[Tenant, Principal, UUID]:
    tenant = await make_tenant()
    agent = await create_agent(
        tenant.company_id, AgentCreate(name="Model", adapter="openai", config=model_config(base_url, **config))
    )
    alice = tenant.principals["alice"]
    conversation = await create_conversation(alice, ConversationCreate(agent_id=agent.id))
    return tenant, alice, conversation.id


async def ask(core: StreamingCore, who: Principal, cid: UUID, content: str = "Hi", **policy: Any) -> UUID:
    posted, _ = await post_message(who, cid, MessageCreate(content=content, **policy), core)
    assert posted.generation is not None
    return posted.generation.id


async def read_all(core: StreamingCore, gid: UUID) -> list[GenerationEvent]:
    with anyio.fail_after(STEP):
        return [event async for batch in core.follow(gid, 0, None) for event in batch]


# -- 1. agent config -------------------------------------------------------------------


BAD_CONFIGS = [
    ({"model": "m"}, "config.baseUrl", "required"),
    ({"baseUrl": "ftp://models.example/v1", "model": "m"}, "config.baseUrl", "http:// or https://"),
    ({"baseUrl": "http://127.0.0.1:1/v1"}, "config.model", "required"),
    ({"baseUrl": "http://127.0.0.1:1/v1", "model": ""}, "config.model", "length"),
    ({"baseUrl": "http://127.0.0.1:1/v1", "model": "m", "temperature": 3}, "config.temperature", "<= 2"),
    ({"baseUrl": "http://127.0.0.1:1/v1", "model": "m", "temperature": "hot"}, "config.temperature", "float"),
    ({"baseUrl": "http://127.0.0.1:1/v1", "model": "m", "maxTokens": 0}, "config.maxTokens", ">= 1"),
    ({"baseUrl": "http://127.0.0.1:1/v1", "model": "m", "timeout": 0}, "config.timeout", "> 0"),
    ({"baseUrl": "http://127.0.0.1:1/v1", "model": "m", "historyBudgetChars": 0}, "config.historyBudgetChars", ">="),
    ({"baseUrl": "http://127.0.0.1:1/v1", "model": "m", "systemPrompt": 5}, "config.systemPrompt", "str"),
    ({"baseUrl": "http://127.0.0.1:1/v1", "model": "m", "mdoel": "x"}, "config.mdoel", "unknown field"),
    ({"baseUrl": "http://127.0.0.1:1/v1", "model": "m", "apiKey": "sk-1"}, "config.apiKey", "never put a secret"),
    ({"baseUrl": "http://127.0.0.1:1/v1", "model": "m", "apiKeyEnv": "not a name"}, "config.apiKeyEnv", "variable"),
    ({"baseUrl": "http://127.0.0.1:1/v1", "model": "m", "apiKeyEnv": "DATABASE_URL"}, "config.apiKeyEnv", "only"),
    # A key goes only to the hosts it is bound to (here 127.0.0.1): not to the admin's own.
    (
        {"baseUrl": "https://models.admin.example/v1", "model": "m", "apiKeyEnv": KEY_VAR},
        "config.apiKeyEnv",
        f"sends {KEY_VAR} only to 127.0.0.1",
    ),
    ({"baseUrl": "http://user:pass@127.0.0.1:1/v1", "model": "m"}, "config.baseUrl", "user name or password"),
    ({"baseUrl": "http://models.example\\@127.0.0.1:1/v1", "model": "m"}, "config.baseUrl", "user name"),
    ({"baseUrl": "http://10.0.0.8:8000/v1", "model": "m"}, "config.baseUrl", "not a public address"),
]


@pytest.mark.parametrize(("config", "field", "says"), BAD_CONFIGS)
async def test_a_bad_config_is_a_400_naming_the_field(
    client: httpx.AsyncClient, acme: Tenant, config: dict[str, Any], field: str, says: str
) -> None:
    created = await client.post(
        "/api/agents", json={"name": "M", "adapter": "openai", "config": config}, headers=acme.headers("admin")
    )
    assert created.status_code == 400, created.text
    body = created.json()
    assert body["code"] == "invalid_request" and body["details"][0]["field"] == field, body
    assert says in body["error"], body

    # The same config sent to an existing agent is refused too, and the agent is unchanged.
    path = f"/api/agents/{acme.agent_id}"
    before = (await client.get("/api/agents", headers=acme.headers("admin"))).json()
    updated = await client.patch(path, json={"adapter": "openai", "config": config}, headers=acme.headers("admin"))
    assert updated.status_code == 400 and updated.json()["details"][0]["field"] == field
    assert (await client.get("/api/agents", headers=acme.headers("admin"))).json() == before


TOOL = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
BAD_TOOL_CONFIGS: dict[str, tuple[dict[str, Any], str, str]] = {
    "tools not a list": ({"tools": {"name": "f"}}, "config.tools", "array"),
    "65 tools": ({"tools": [{**TOOL, "name": f"t{i}"} for i in range(65)]}, "config.tools", "length <= 64"),
    "a bad name": ({"tools": [{**TOOL, "name": "get weather"}]}, "config.tools", "regex"),
    "a long description": ({"tools": [{**TOOL, "description": "d" * 1025}]}, "config.tools", "1024"),
    "parameters not an object schema": (
        {"tools": [{**TOOL, "parameters": {"type": "array"}}]},
        "config.tools",
        '"type": "object"',
    ),
    "parameters over 16 KiB": (
        {"tools": [{**TOOL, "parameters": {"type": "object", "description": "x" * 17_000}}]},
        "config.tools",
        "16384 bytes",
    ),
    "two tools of one name": ({"tools": [TOOL, TOOL]}, "config.tools", "unique"),
    "a bad toolChoice": ({"tools": [TOOL], "toolChoice": "always"}, "config.toolChoice", "Invalid enum value"),
    "a toolChoice without tools": ({"toolChoice": "required"}, "config.toolChoice", "needs tools"),
}


@pytest.mark.parametrize("case", list(BAD_TOOL_CONFIGS))
async def test_a_bad_tools_config_is_a_400_naming_the_field(client: httpx.AsyncClient, acme: Tenant, case: str) -> None:
    extra, field, says = BAD_TOOL_CONFIGS[case]
    config = {"baseUrl": "http://127.0.0.1:1/v1", "model": "m", **extra}
    created = await client.post(
        "/api/agents", json={"name": "M", "adapter": "openai", "config": config}, headers=acme.headers("admin")
    )
    assert created.status_code == 400, created.text
    body = created.json()
    # `config.tools`, or (once parse_config keeps nested paths) a path in it, `config.tools[0].name`.
    named = body["details"][0]["field"]
    assert body["code"] == "invalid_request" and (named == field or named.startswith(f"{field}[")), body
    assert says in body["error"], body


async def test_a_config_must_suit_the_adapter_the_agent_ends_up_with(client: httpx.AsyncClient, acme: Tenant) -> None:
    path = f"/api/agents/{acme.agent_id}"
    # Switching an echo agent to openai without a model config is refused...
    switched = await client.patch(path, json={"adapter": "openai"}, headers=acme.headers("admin"))
    assert switched.status_code == 400 and switched.json()["details"][0]["field"] == "config.baseUrl"
    # ...as is an echo setting given to an openai agent.
    config = model_config("http://127.0.0.1:1/v1")
    ok = await client.patch(path, json={"adapter": "openai", "config": config}, headers=acme.headers("admin"))
    assert ok.status_code == 200, ok.text
    wrong = await client.patch(path, json={"config": {"pace": 1}}, headers=acme.headers("admin"))
    assert wrong.status_code == 400 and wrong.json()["details"][0]["field"] == "config.pace"


async def test_the_key_itself_is_never_stored_or_shown(client: httpx.AsyncClient, acme: Tenant) -> None:
    config = model_config("http://127.0.0.1:1/v1", systemPrompt="Be brief.", temperature=0.2, maxTokens=64)
    created = await client.post(
        "/api/agents", json={"name": "M", "adapter": "openai", "config": config}, headers=acme.headers("admin")
    )
    assert created.status_code == 201, created.text
    assert created.json()["config"] == config  # defaults left out, the variable's name only
    listed = await client.get("/api/agents", headers=acme.headers("admin"))
    assert KEY not in created.text and KEY not in listed.text
    stored = await Agent.select(Agent.config).where(Agent.id == created.json()["id"]).first()
    assert KEY not in json.dumps(stored["config"])


async def test_members_do_not_see_agents_configs(client: httpx.AsyncClient, acme: Tenant) -> None:
    config = model_config("http://127.0.0.1:1/v1", systemPrompt="Internal instructions.")
    created = await client.post(
        "/api/agents", json={"name": "M", "adapter": "openai", "config": config}, headers=acme.headers("admin")
    )
    assert created.status_code == 201, created.text
    as_member = await client.get("/api/agents", headers=acme.headers("alice"))
    assert as_member.status_code == 200
    assert {a["name"]: a["config"] for a in as_member.json()} == {"Echo": None, "M": None}
    assert "127.0.0.1" not in as_member.text and "Internal instructions" not in as_member.text
    as_admin = await client.get("/api/agents", headers=acme.headers("admin"))
    assert {a["name"]: a["config"] for a in as_admin.json()}["M"] == config


# -- 1b. where requests and keys may go (the operator's policy) -------------------------


async def test_a_key_bound_elsewhere_is_refused_on_create_and_patch(
    client: httpx.AsyncClient, acme: Tenant, fake: FakeModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The operator binds the key to OpenAI and allows the local address; an admin points
    # an agent holding the key at a server of their own (here the fake one).
    operator_policy(monkeypatch, allow="127.0.0.1", keys=f"{KEY_VAR}=api.openai.com")
    body = {"name": "Thief", "adapter": "openai", "config": model_config(fake.url)}
    created = await client.post("/api/agents", json=body, headers=acme.headers("admin"))
    assert created.status_code == 400, created.text
    assert created.json()["details"][0]["field"] == "config.apiKeyEnv"
    assert "api.openai.com" in created.json()["error"]
    patched = await client.patch(
        f"/api/agents/{acme.agent_id}",
        json={"adapter": "openai", "config": model_config(fake.url)},
        headers=acme.headers("admin"),
    )
    assert patched.status_code == 400 and patched.json()["details"][0]["field"] == "config.apiKeyEnv"
    # A port in the binding must match too.
    operator_policy(monkeypatch, allow="127.0.0.1", keys=f"{KEY_VAR}=127.0.0.1:{free_port()}")
    elsewhere = await client.post("/api/agents", json=body, headers=acme.headers("admin"))
    assert elsewhere.status_code == 400 and elsewhere.json()["details"][0]["field"] == "config.apiKeyEnv"
    operator_policy(monkeypatch, allow="127.0.0.1", keys=f"{KEY_VAR}=127.0.0.1:{fake.port}")
    bound = await client.post("/api/agents", json=body, headers=acme.headers("admin"))
    assert bound.status_code == 201, bound.text
    assert fake.requests == []


async def test_a_key_is_never_sent_to_a_host_it_is_not_bound_to_even_from_a_stored_row(
    fake: FakeModelServer, core: StreamingCore, caplog: pytest.LogCaptureFixture
) -> None:
    # An agent saved without a key, then its row edited to name one: the adapter checks
    # again before sending, and the key (bound to OpenAI only) never leaves.
    tenant = await make_tenant()
    agent = await create_agent(
        tenant.company_id, AgentCreate(name="M", adapter="openai", config={"baseUrl": fake.url, "model": "m"})
    )
    await Agent.update({Agent.config: model_config(fake.url)}).where(Agent.id == agent.id)
    alice = tenant.principals["alice"]
    cid = (await create_conversation(alice, ConversationCreate(agent_id=agent.id))).id
    strict = core_with(model_key_vars=f"{KEY_VAR}=api.openai.com")
    try:
        error = (await read_all(strict, await ask(strict, alice, cid)))[-1]
    finally:
        await strict.shutdown()
    assert isinstance(error, Error) and error.code == "api_key_not_allowed", error
    assert fake.requests == []  # nothing sent at all, so no Authorization either
    assert KEY not in caplog.text


DENIED_URLS = {
    "loopback": ("http://127.0.0.1:11434/v1", "127.0.0.1:11434"),
    "loopback, short form": ("http://127.1:11434/v1", "127.0.0.0/8"),
    "localhost": ("http://localhost:6379/v1", "127.0.0.1:6379"),
    "private": ("http://10.1.2.3/v1", "10.0.0.0/8"),
    "link-local (cloud metadata)": ("http://169.254.169.254/latest", "169.254.169.254"),
    "IPv6 loopback": ("http://[::1]:8000/v1", "[::1]:8000"),
    "IPv4-mapped IPv6": ("http://[::ffff:127.0.0.1]:8000/v1", "127.0.0.1"),
    "unspecified": ("http://0.0.0.0:5432/v1", "0.0.0.0"),
    "private IPv6": ("http://[fd00::5]/v1", "fd00::/8"),
}


@pytest.mark.parametrize("case", list(DENIED_URLS))
async def test_a_non_public_base_url_is_refused_unless_the_operator_allows_it(
    client: httpx.AsyncClient, acme: Tenant, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    url, rule = DENIED_URLS[case]
    body = {"name": "M", "adapter": "openai", "config": {"baseUrl": url, "model": "m"}}
    for allow in ("", "192.168.0.0/16,127.0.0.1:1"):  # nothing, or other addresses only
        operator_policy(monkeypatch, allow=allow, keys=f"{KEY_VAR}=api.openai.com")
        refused = await client.post("/api/agents", json=body, headers=acme.headers("admin"))
        assert refused.status_code == 400, (allow, refused.text)
        assert refused.json()["details"][0]["field"] == "config.baseUrl"
        assert "CHATSTREAM_UPSTREAM_ALLOW" in refused.json()["error"]
    operator_policy(monkeypatch, allow=rule, keys=f"{KEY_VAR}=api.openai.com")
    allowed = await client.post("/api/agents", json=body, headers=acme.headers("admin"))
    assert allowed.status_code == 201, allowed.text


async def test_the_address_is_checked_when_connecting(fake: FakeModelServer) -> None:
    # `localhost` passed the check when the agent was saved (127.0.0.1 was allowed then);
    # a server whose policy allows nothing private resolves it when connecting and refuses.
    _, alice, cid = await openai_conversation(f"http://localhost:{fake.port}/v1", apiKeyEnv=None)
    strict = core_with(upstream_allow="")
    try:
        error = (await read_all(strict, await ask(strict, alice, cid)))[-1]
    finally:
        await strict.shutdown()
    assert isinstance(error, Error) and error.code == "upstream_unreachable", error
    assert fake.requests == []
    # Allowing the address (not the name) lets the resolved, checked address be used.
    allowing = core_with(upstream_allow=f"127.0.0.1:{fake.port}")
    try:
        done = (await read_all(allowing, await ask(allowing, alice, cid)))[-1]
    finally:
        await allowing.shutdown()
    assert isinstance(done, Done), done
    assert len(fake.requests) == 1 and fake.requests[0].headers["host"] == f"localhost:{fake.port}"


async def test_a_refused_address_and_a_refused_connection_look_the_same(fake: FakeModelServer) -> None:
    # What a tenant sees must not tell "nothing listens" from "not allowed" (port scanning).
    _, alice, closed_cid = await openai_conversation(f"http://127.0.0.1:{free_port()}/v1")
    _, bob, open_cid = await openai_conversation(fake.url)
    seen = []
    for allow, who, cid in (("127.0.0.1", alice, closed_cid), ("", bob, open_cid)):
        probe = core_with(upstream_allow=allow)
        try:
            seen.append((await read_all(probe, await ask(probe, who, cid)))[-1])
        finally:
            await probe.shutdown()
    assert all(isinstance(e, Error) for e in seen), seen
    assert {(e.code, e.message) for e in seen if isinstance(e, Error)} == {
        ("upstream_unreachable", "cannot reach the model server")
    }
    assert fake.requests == []


# -- 2. what is sent upstream ----------------------------------------------------------


async def test_history_is_the_effective_content_with_roles_and_system_prompt(
    fake: FakeModelServer, core: StreamingCore
) -> None:
    _, alice, cid = await openai_conversation(fake.url, systemPrompt="You are terse.", temperature=0.3, maxTokens=50)
    fake.queue(Reply(steps=answer("Paris")))
    first = await ask(core, alice, cid, "Capital of Frnace?")
    await read_all(core, first)
    question = await Message.select(Message.id).where(Message.role == "user", Message.conversation == cid).first()
    await edit_message(alice, cid, question["id"], MessageEdit(content="Capital of France?"), core)
    fake.queue(Reply(steps=answer("Berlin")))
    await read_all(core, await ask(core, alice, cid, "And Germany?"))

    sent = (await fake.next_request(2)).body
    assert sent["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "And Germany?"},
    ]
    assert sent["model"] == "fake-model" and sent["stream"] is True
    assert sent["temperature"] == 0.3 and sent["max_tokens"] == 50
    assert sent["stream_options"] == {"include_usage": True}
    assert fake.requests[1].headers["authorization"] == f"Bearer {KEY}"


async def test_a_long_history_is_cut_from_the_oldest_side_whole_messages_only(
    fake: FakeModelServer, core: StreamingCore
) -> None:
    _, alice, cid = await openai_conversation(fake.url, historyBudgetChars=25, includeUsage=False)
    turns = [("a" * 10, "b" * 10), ("c" * 10, "d" * 10)]
    for number, (question, reply) in enumerate(turns, start=1):
        fake.queue(Reply(steps=answer(reply)))
        await read_all(core, await ask(core, alice, cid, question))
        await fake.next_request(number)
    fake.queue(Reply(steps=answer("ok")))
    await read_all(core, await ask(core, alice, cid, "e" * 10))

    sent = (await fake.next_request(3)).body
    # 25 characters hold the newest two messages (d, e); a third would cut into "c", which is
    # left out whole, and the history then starts with the user turn, not the agent's "d".
    assert sent["messages"] == [{"role": "user", "content": "e" * 10}]
    assert "stream_options" not in sent and "temperature" not in sent and "max_tokens" not in sent


async def test_the_newest_message_is_sent_even_over_the_budget(fake: FakeModelServer, core: StreamingCore) -> None:
    _, alice, cid = await openai_conversation(fake.url, historyBudgetChars=5)
    await read_all(core, await ask(core, alice, cid, "a much longer question"))
    assert (await fake.next_request(1)).body["messages"] == [{"role": "user", "content": "a much longer question"}]


# -- 2b. tools, reasoning and tool calls ------------------------------------------------

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}

# Reasoning (vLLM's `reasoning_content`), a sentence, then two calls whose arguments come
# interleaved, as OpenAI streams them (first chunk: id, type, name, `"arguments": ""`).
TOOL_ROUND: list[Step] = [
    chunk(role="assistant", content=""),
    chunk(reasoning_content="Two cities,"),
    chunk(reasoning_content=" two calls."),
    chunk("Checking."),
    tool_calls_chunk(tool_call(0, id="call_paris", name="get_weather", arguments="")),
    tool_calls_chunk(tool_call(1, id="call_rome", name="get_weather", arguments="")),
    tool_calls_chunk(tool_call(0, arguments='{"city":')),
    tool_calls_chunk(tool_call(1, arguments='{"city":"Rome"}')),
    tool_calls_chunk(tool_call(0, arguments='"Paris"}')),
    chunk(finish_reason="tool_calls"),
]


async def test_declared_tools_reach_the_model_server(fake: FakeModelServer, core: StreamingCore) -> None:
    _, alice, cid = await openai_conversation(fake.url, tools=[WEATHER_TOOL], toolChoice="auto")
    await read_all(core, await ask(core, alice, cid))
    sent = (await fake.next_request(1)).body
    assert sent["tools"] == [{"type": "function", "function": WEATHER_TOOL}]
    assert sent["tool_choice"] == "auto"


async def test_reasoning_and_tool_calls_stream_as_parts_and_are_stored(
    fake: FakeModelServer, core: StreamingCore
) -> None:
    _, alice, cid = await openai_conversation(fake.url, tools=[WEATHER_TOOL])
    fake.queue(Reply(steps=TOOL_ROUND))
    events = await read_all(core, await ask(core, alice, cid, "Weather in Paris and Rome?"))
    starts = [(e.part, e.kind, e.name, e.tool_call_id) for e in events if isinstance(e, PartStart)]
    assert starts == [
        (0, "reasoning", None, None),
        (2, "tool_call", "get_weather", "call_paris"),
        (3, "tool_call", "get_weather", "call_rome"),
    ]
    deltas = [(e.part, e.text) for e in events if isinstance(e, PartDelta)]
    assert deltas == [(0, "Two cities,"), (0, " two calls."), (2, '{"city":'), (3, '{"city":"Rome"}'), (2, '"Paris"}')]
    ends = {e.part: (e.state, e.value) for e in events if isinstance(e, PartEnd)}
    assert ends == {0: ("complete", None), 2: ("complete", {"city": "Paris"}), 3: ("complete", {"city": "Rome"})}
    assert [e.text for e in events if isinstance(e, Token)] == ["Checking."]
    done = events[-1]
    assert isinstance(done, Done) and done.finish_reason == "tool_calls", events

    stored = await Message.select().where(Message.id == done.message_id).first()
    assert stored is not None and stored["content"] == "Checking."
    parts = decode_parts(stored["parts"])
    assert [(p.kind, p.state, p.text) for p in parts] == [
        ("reasoning", "complete", "Two cities, two calls."),
        ("text", "complete", "Checking."),
        ("tool_call", "complete", '{"city":"Paris"}'),
        ("tool_call", "complete", '{"city":"Rome"}'),
    ]


async def test_a_history_with_a_tool_round_is_sent_as_tool_calls_and_tool_messages(
    fake: FakeModelServer, core: StreamingCore
) -> None:
    _, alice, cid = await openai_conversation(fake.url, tools=[WEATHER_TOOL])
    fake.queue(Reply(steps=TOOL_ROUND))
    await read_all(core, await ask(core, alice, cid, "Weather in Paris and Rome?"))
    # The clients' results, stored as tool messages (as the tool-results route stores them).
    for call_id, output in (("call_paris", {"temp": 21}), ("call_rome", {"temp": 25})):
        await Message(
            conversation=cid,
            role=MessageRole.tool.value,
            content=json.dumps(output),
            parts=encode_parts([Part(kind="tool_result", name="get_weather", tool_call_id=call_id, value=output)]),
        ).save()
    fake.queue(Reply(steps=answer("Rome is warmer.")))
    await read_all(core, await ask(core, alice, cid, "Which is warmer?"))

    sent = (await fake.next_request(2)).body
    assert sent["messages"] == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "call_paris",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                },
                {
                    "id": "call_rome",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_paris", "content": '{"temp":21}'},
        {"role": "tool", "tool_call_id": "call_rome", "content": '{"temp":25}'},
        {"role": "user", "content": "Which is warmer?"},
    ]


# -- 3. streaming, usage and time to first token ---------------------------------------


async def test_tokens_reach_an_sse_reader_before_the_model_has_finished(fake: FakeModelServer) -> None:
    tenant, _, cid = await openai_conversation(fake.url)
    release = asyncio.Event()
    fake.queue(Reply(steps=[*answer("Hel")[:2], release, *answer("lo", " world", usage=42)[1:]]))
    server = LiveServer({KEY_VAR: KEY}).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=STEP) as http:
            posted = await http.post(
                f"/api/conversations/{cid}/messages", json={"content": "Hi"}, headers=tenant.headers("alice")
            )
            assert posted.status_code == 201, posted.text
            gid = posted.json()["generation"]["id"]
            seen: list[dict[str, Any]] = []
            async with aconnect_sse(
                http, "GET", f"/api/conversations/{cid}/stream", headers=tenant.headers("alice")
            ) as source:
                with anyio.fail_after(STEP):
                    async for sse in source.aiter_sse():
                        if not sse.data:
                            continue
                        event = json.loads(sse.data)
                        seen.append(event)
                        if event["type"] == "token" and not release.is_set():
                            # The first piece is here while the model still holds back the rest.
                            assert event["text"] == "Hel" and not fake.requests[0].finished.is_set()
                            release.set()
                        if event["type"] in ("done", "cancelled", "error"):
                            break
            assert [e["type"] for e in seen] == ["start", "token", "token", "token", "done"]
            assert "".join(e["text"] for e in seen if e["type"] == "token") == "Hello world"
            assert seen[-1]["tokenCount"] == 42 and seen[-1]["finishReason"] == "stop"
            generation = (await http.get(f"/api/generations/{gid}", headers=tenant.headers("alice"))).json()
            assert generation["tokenCount"] == 42 and generation["chunkCount"] == 3
            assert generation["ttftMs"] is not None and generation["ttftMs"] >= 0
            assert generation["finishReason"] == "stop"
    finally:
        server.stop()


async def test_without_usage_the_pieces_are_counted_and_length_is_reported(
    fake: FakeModelServer, core: StreamingCore
) -> None:
    _, alice, cid = await openai_conversation(fake.url)
    fake.queue(Reply(steps=answer("one", " two", finish_reason="length")))
    events = await read_all(core, await ask(core, alice, cid))
    done = events[-1]
    assert isinstance(done, Done) and done.token_count == 2 and done.finish_reason == "length"
    generation = await load_generation(done.generation_id)
    assert generation is not None and generation.finish_reason == "length" and generation.ttft_ms is not None
    # Replayed from the database, the same `done`.
    assert (await core.stored_events(done.generation_id, done.seq - 1)) == [done]


# -- 4. cancel closes the upstream request ---------------------------------------------


@pytest.mark.parametrize("how", ["core", "rest"])
async def test_cancelling_closes_the_upstream_request_within_a_second(
    fake: FakeModelServer, core: StreamingCore, app: Any, client: httpx.AsyncClient, how: str
) -> None:
    tenant, alice, cid = await openai_conversation(fake.url)
    never = asyncio.Event()
    fake.queue(Reply(steps=[*answer("Hel")[:2], never]))
    if how == "core":
        gid = await ask(core, alice, cid)
    else:
        posted = await client.post(
            f"/api/conversations/{cid}/messages", json={"content": "Hi"}, headers=tenant.headers("alice")
        )
        gid = UUID(posted.json()["generation"]["id"])
    seen = await fake.next_request(1)
    producer_core: StreamingCore = core if how == "core" else app.state.core
    with anyio.fail_after(STEP):
        async for batch in producer_core.follow(gid, 0, None):
            if any(isinstance(e, Token) for e in batch):
                break

    asked = time.monotonic()
    if how == "core":
        await core.cancel(gid, "user")
    else:
        response = await client.post(f"/api/generations/{gid}/cancel", headers=tenant.headers("alice"))
        assert response.status_code == 200, response.text
    with anyio.fail_after(STEP):
        await seen.disconnected.wait()
    assert seen.disconnected_at is not None and seen.disconnected_at - asked < 1.0
    generation = await load_generation(gid)
    assert generation is not None and generation.status is GenerationStatus.cancelled


# -- 5. upstream failures --------------------------------------------------------------

OPENAI_ERROR = b'{"error": {"message": "%s", "type": "invalid_request_error"}}'

FAILURES = {
    "401": (Reply(status=401, body=OPENAI_ERROR % b"Incorrect API key provided"), "upstream_auth", "credentials"),
    "403": (Reply(status=403, body=b"forbidden"), "upstream_auth", "credentials"),
    "404 model": (
        Reply(status=404, body=OPENAI_ERROR % b"The model `fake-model` does not exist"),
        "upstream_not_found",
        "no such model",
    ),
    "429": (
        Reply(status=429, body=OPENAI_ERROR % b"Rate limit reached", headers={"Retry-After": "7"}),
        "upstream_rate_limited",
        "retry after 7 s",
    ),
    "400": (Reply(status=400, body=OPENAI_ERROR % b"context too long"), "upstream_rejected", "rejected"),
    "500": (Reply(status=500, body=b"<html>Internal Server Error</html>"), "upstream_unavailable", "unavailable"),
    "503": (Reply(status=503, body=OPENAI_ERROR % b"overloaded"), "upstream_unavailable", "unavailable"),
    "malformed chunk": (Reply(steps=[*answer("Hel")[:2], "{not json"]), "upstream_malformed", "cannot read"),
    "error chunk": (
        Reply(steps=[*answer("Hel")[:2], '{"error": {"message": "model crashed"}}']),
        "upstream_error",
        "failed mid-answer",
    ),
    "malformed tool call": (
        Reply(steps=[*answer("Hel")[:2], tool_calls_chunk({"id": "call_x", "function": {"name": "f"}})]),
        "upstream_malformed_tool_call",
        "malformed tool call: a tool call has no index",
    ),
    "tool call renamed": (
        Reply(
            steps=[
                *answer("Hel")[:2],
                tool_calls_chunk(tool_call(0, id="call_x", name="f", arguments='{"a":')),
                tool_calls_chunk(tool_call(0, name="g", arguments="1}")),
            ]
        ),
        "upstream_malformed_tool_call",
        "the function name changed mid-call",
    ),
    "stall": (Reply(steps=answer("Hel")[:2], hang=True), "upstream_timeout", "sent nothing for 0.5 s"),
    "no [DONE]": (Reply(steps=answer("Hel", "lo"), done=False), "upstream_incomplete", "without [DONE]"),
    "cut off": (Reply(steps=[*answer("Hel")[:2], b'data: {"choi'], done=False), "upstream_incomplete", "[DONE]"),
    "dropped": (Reply(steps=answer("Hel")[:2], abort=True), "upstream_incomplete", "broke off"),
}


@pytest.mark.parametrize("partial", ["discard", "keep"])
@pytest.mark.parametrize("case", list(FAILURES))
async def test_an_upstream_failure_is_an_error_event(
    fake: FakeModelServer, core: StreamingCore, case: str, partial: str
) -> None:
    reply, code, says = FAILURES[case]
    _, alice, cid = await openai_conversation(fake.url, timeout=0.5)
    fake.queue(reply)
    gid = await ask(core, alice, cid, partial=partial)
    events = await read_all(core, gid)
    error = events[-1]
    assert isinstance(error, Error), events
    assert error.code.startswith(code) and says in error.message, error
    if case == "429":
        assert error.retry_after == 7
    produced = "".join(e.text for e in events if isinstance(e, Token))
    agent_messages = await Message.select().where(Message.conversation == cid, Message.role == MessageRole.agent.value)
    if partial == "keep" and produced:
        assert [m["content"] for m in agent_messages] == [produced] and agent_messages[0]["status"] == "partial"
        assert error.message_id == agent_messages[0]["id"]
    else:
        assert agent_messages == [] and error.message_id is None
    generation = await load_generation(gid)
    assert generation is not None and generation.status is GenerationStatus.failed
    assert generation.error is not None and generation.error.startswith(error.code)


SECRET = "secret-internal-text"
LEAKS = {
    "500 body": Reply(status=500, body=SECRET.encode()),
    "401 body": Reply(status=401, body=OPENAI_ERROR % SECRET.encode()),
    "404 body": Reply(status=404, body=f"<html>{SECRET}</html>".encode()),
    "error chunk": Reply(steps=[*answer("Hel")[:2], json.dumps({"error": {"message": SECRET}})]),
    "non-JSON chunk": Reply(steps=[*answer("Hel")[:2], f"<{SECRET}>"]),
    "malformed tool call": Reply(steps=[*answer("Hel")[:2], tool_calls_chunk({"index": 0, "id": SECRET})]),
}


STREAM_CHUNKS = {"non-JSON chunk", "malformed tool call"}


@pytest.mark.parametrize("case", list(LEAKS))
async def test_tenants_get_a_generic_error_and_the_detail_goes_to_the_log(
    fake: FakeModelServer, client: httpx.AsyncClient, app: Any, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    """What another service answers must not come back through an agent (SSRF with the
    response reflected): not in the `error` event, not in the generation; the log has it
    (an error's text; of a malformed chunk of the answer's stream, only its size)."""
    tenant, _, cid = await openai_conversation(fake.url)
    fake.queue(LEAKS[case])
    caplog.set_level("WARNING", logger="chatstream.openai")
    posted = await client.post(
        f"/api/conversations/{cid}/messages", json={"content": "Hi"}, headers=tenant.headers("alice")
    )
    gid = UUID(posted.json()["generation"]["id"])
    error = (await read_all(app.state.core, gid))[-1]
    assert isinstance(error, Error), error
    generation = await client.get(f"/api/generations/{gid}", headers=tenant.headers("alice"))
    for text in (error.message, generation.text):
        assert SECRET not in text and str(fake.port) not in text and "127.0.0.1" not in text, text
    logged = [r.getMessage() for r in caplog.records if r.name == "chatstream.openai" and r.levelname == "WARNING"]
    if case in STREAM_CHUNKS:  # a chunk of the answer's stream may hold the answer: its size only
        assert any(fake.url in line and "not logged" in line for line in logged), caplog.text
        assert not any(SECRET in line for line in logged), caplog.text
    else:
        assert any(SECRET in line and fake.url in line for line in logged), caplog.text


async def test_a_refused_connection_is_an_error_event(core: StreamingCore) -> None:
    _, alice, cid = await openai_conversation(f"http://127.0.0.1:{free_port()}/v1")
    error = (await read_all(core, await ask(core, alice, cid)))[-1]
    assert isinstance(error, Error) and error.code == "upstream_unreachable", error


async def test_a_missing_key_variable_is_an_error_event(
    fake: FakeModelServer, core: StreamingCore, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, alice, cid = await openai_conversation(fake.url)
    monkeypatch.delenv(KEY_VAR)
    error = (await read_all(core, await ask(core, alice, cid)))[-1]
    assert isinstance(error, Error) and error.code == "api_key_missing" and KEY_VAR in error.message
    assert fake.requests == []  # nothing was sent without the key


async def test_a_stored_config_the_adapter_cannot_use_is_an_error_event(core: StreamingCore) -> None:
    _, alice, cid = await openai_conversation("http://127.0.0.1:1/v1")
    conversation = await Conversation.select(Conversation.agent).where(Conversation.id == cid).first()
    await Agent.update({Agent.config: {"model": "m"}}).where(Agent.id == conversation["agent"])
    error = (await read_all(core, await ask(core, alice, cid)))[-1]
    assert isinstance(error, Error) and error.code == "invalid_agent_config" and "baseUrl" in error.message


# -- 6. one pooled client per process, closed on shutdown ------------------------------


async def test_answers_share_one_pooled_connection_and_shutdown_closes_it(fake: FakeModelServer) -> None:
    from app.streaming.broker import InProcessBroker
    from app.streaming.policy import StreamPolicy

    core = StreamingCore(InProcessBroker(), StreamPolicy(), store=ChatAnswerStore())
    _, alice, cid = await openai_conversation(fake.url)
    try:
        for number in (1, 2):
            events = await read_all(core, await ask(core, alice, cid, f"question {number}"))
            assert isinstance(events[-1], Done)
            await fake.next_request(number)
        adapter = core.adapters["openai"]
        assert isinstance(adapter, OpenAIAdapter)
        client = adapter.client
        # The second answer reused the first one's connection (same client port).
        assert fake.requests[0].client_port == fake.requests[1].client_port
    finally:
        await core.shutdown()
    assert client.is_closed


async def test_the_pool_is_bounded_and_an_answer_waiting_past_its_timeout_fails(fake: FakeModelServer) -> None:
    _, alice, first_cid = await openai_conversation(fake.url, timeout=STEP)
    _, bob, second_cid = await openai_conversation(fake.url, timeout=0.5)
    core = core_with(model_max_connections=1)
    release = asyncio.Event()
    fake.queue(Reply(steps=[*answer("Hel")[:2], release, *answer("lo")[1:]]))
    try:
        first = await ask(core, alice, first_cid)
        await fake.next_request(1)  # the only connection is taken
        error = (await read_all(core, await ask(core, bob, second_cid)))[-1]
        assert isinstance(error, Error) and error.code == "upstream_unavailable", error
        assert len(fake.requests) == 1  # the second answer never got a connection
        release.set()
        assert isinstance((await read_all(core, first))[-1], Done)
    finally:
        await core.shutdown()


async def test_the_app_closes_the_model_client_on_shutdown(fake: FakeModelServer) -> None:
    from app.main import create_app

    app = create_app()
    async with app.lifespan():
        adapter = app.state.core.adapters["openai"]
        client = adapter.client
        assert not client.is_closed
    assert client.is_closed


# -- 7. the README's example -----------------------------------------------------------


async def test_the_readme_example_runs_against_a_local_model_server(fake: FakeModelServer) -> None:
    """The README's Ollama command, pointed at the fake server, makes an agent that answers
    in `chatstream chat`."""
    from app.companies.service import create_company
    from tests.conftest import ROOT
    from tests.integration.live_server import CONSOLE_SCRIPT

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    # The README allows the local model server's address; here that of the fake one.
    assert "export CHATSTREAM_UPSTREAM_ALLOW=127.0.0.1:11434" in readme
    env = {**os.environ, "CHATSTREAM_UPSTREAM_ALLOW": f"127.0.0.1:{fake.port}", "CHATSTREAM_MODEL_KEY_VARS": ""}
    line = next(li for li in readme.splitlines() if "agent create" in li and "11434" in li)
    args = shlex.split(line)
    assert args[0] == ".venv/bin/chatstream"
    company = await create_company(f"readme-{uuid.uuid4().hex[:8]}")
    args[0] = CONSOLE_SCRIPT
    args[args.index("--company") + 1] = company.company.name
    config = json.loads(args[args.index("--config") + 1])
    args[args.index("--config") + 1] = json.dumps({**config, "baseUrl": fake.url})

    made = await asyncio.create_subprocess_exec(*args, stdout=PIPE, stderr=PIPE, env=env)
    out, err = await made.communicate()
    assert made.returncode == 0, err.decode()

    fake.queue(Reply(steps=answer("Hello", " from", " the", " model")))
    server = LiveServer(env).start()
    try:
        chat = await asyncio.create_subprocess_exec(
            CONSOLE_SCRIPT,
            *("chat", "--url", server.url, "--key", company.admin_key.token, "--new", "--message", "Hi"),
            stdout=PIPE,
            stderr=PIPE,
        )
        with anyio.fail_after(STEP * 3):
            out, err = await chat.communicate()
    finally:
        server.stop()
    assert chat.returncode == 0, err.decode()
    assert "Hello from the model" in out.decode()
    sent = fake.requests[0].body
    assert sent["model"] == config["model"]
    assert sent["messages"] == [
        {"role": "system", "content": config["systemPrompt"]},
        {"role": "user", "content": "Hi"},
    ]
