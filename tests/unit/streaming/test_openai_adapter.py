"""The pure parts of the `openai` adapter: history budget, request body, stream parsing,
upstream error messages and retry hints. (Over HTTP: tests/integration/test_openai_adapter.py.)"""

from __future__ import annotations

import email.utils
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import get_args

import httpx
import pytest

from app.agents.schemas import AdapterName
from app.chat.schemas import HistoryItem
from app.streaming.adapters import CONFIG_TYPES, AdapterConfigError, build_adapters, parse_config
from app.streaming.adapters.openai import (
    OpenAIAdapter,
    OpenAIConfig,
    check_upstream,
    error_message,
    fit_history,
    request_body,
    retry_after,
    sse_data,
    status_error,
)
from app.tables import MessageRole
from app.upstream_policy import UpstreamPolicy, parse_allow_list, parse_key_bindings

pytestmark = pytest.mark.anyio

U, A = MessageRole.user, MessageRole.agent


def turns(*items: tuple[MessageRole, str]) -> list[HistoryItem]:
    return [
        HistoryItem(id=uuid.uuid4(), role=role, effective_content=text, created_at=datetime.now(UTC))
        for role, text in items
    ]


def contents(history: list[HistoryItem]) -> list[str]:
    return [item.effective_content for item in history]


def test_every_adapter_name_an_agent_may_use_has_a_config_and_an_instance() -> None:
    assert set(get_args(AdapterName)) == set(CONFIG_TYPES) == set(build_adapters())


def test_a_history_within_budget_is_sent_whole() -> None:
    history = turns((U, "aaaa"), (A, "bbbb"), (U, "cccc"))
    assert fit_history(history, 12) == history


def test_a_long_history_loses_whole_messages_from_the_oldest_side() -> None:
    history = turns((U, "aaaa"), (A, "bbbb"), (U, "cccc"), (A, "dddd"), (U, "eeee"))
    # 11 characters: "eeee" and "dddd" fit, "cccc" would not; the cut starts at a user turn,
    # so "dddd" (an agent message) is dropped too.
    assert contents(fit_history(history, 11)) == ["eeee"]
    assert contents(fit_history(history, 12)) == ["cccc", "dddd", "eeee"]


def test_the_newest_message_is_kept_whatever_its_size() -> None:
    history = turns((U, "short"), (A, "reply"), (U, "x" * 100))
    assert contents(fit_history(history, 10)) == ["x" * 100]


def test_the_request_body() -> None:
    config = OpenAIConfig(
        base_url="http://m/v1",
        model="llama",
        system_prompt="Be kind.",
        temperature=0,
        max_tokens=9,
        include_usage=False,
    )
    body = request_body(config, turns((U, "hi"), (A, "hello"), (U, "how?")))
    assert body == {
        "model": "llama",
        "messages": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "how?"},
        ],
        "stream": True,
        "temperature": 0,
        "max_tokens": 9,
    }


def test_the_config_keeps_only_what_differs_from_the_defaults() -> None:
    raw = {"baseUrl": "https://api.openai.com/v1", "model": "gpt-4o-mini", "timeout": 60.0}
    assert parse_config("openai", raw) == OpenAIConfig(base_url=raw["baseUrl"], model="gpt-4o-mini")
    from app.streaming.adapters import normalize_config

    policy = UpstreamPolicy()
    assert normalize_config("openai", raw, policy) == {"baseUrl": "https://api.openai.com/v1", "model": "gpt-4o-mini"}


POLICY = UpstreamPolicy(
    allow=parse_allow_list("127.0.0.1:11434"),
    key_hosts=parse_key_bindings("OPENAI_API_KEY=api.openai.com,LOCAL_KEY=127.0.0.1:11434"),
)


@pytest.mark.parametrize(
    ("base_url", "key", "field", "says"),
    [
        ("https://models.evil.example/v1", "OPENAI_API_KEY", "apiKeyEnv", "only to api.openai.com"),
        ("https://api.openai.com.evil.example/v1", "OPENAI_API_KEY", "apiKeyEnv", "only to api.openai.com"),
        ("https://api.openai.com:8443/v1", "LOCAL_KEY", "apiKeyEnv", "only to 127.0.0.1:11434"),
        ("http://127.0.0.1:11435/v1", None, "baseUrl", "not a public address"),
        ("https://api.openai.com/v1", "DATABASE_URL", "apiKeyEnv", "only these variables: LOCAL_KEY, OPENAI_API_KEY"),
        ("https://sk:x@api.openai.com/v1", None, "baseUrl", "user name or password"),
        ("http://evil.example\\@api.openai.com/v1", "OPENAI_API_KEY", "baseUrl", "user name or password"),
        ("http://[::1/v1", None, "baseUrl", "not a valid URL"),
    ],
)
def test_where_a_config_may_send_requests_and_keys(base_url: str, key: str | None, field: str, says: str) -> None:
    config = OpenAIConfig(base_url=base_url, model="m", api_key_env=key)
    with pytest.raises(AdapterConfigError) as refused:
        check_upstream(config, POLICY)
    assert refused.value.field == field and says in refused.value.message, refused.value


@pytest.mark.parametrize(
    ("base_url", "key"),
    [
        ("https://api.openai.com/v1", "OPENAI_API_KEY"),
        ("https://API.OpenAI.com./v1", "OPENAI_API_KEY"),
        ("https://api.openai.com:443/v1", "OPENAI_API_KEY"),
        ("http://127.0.0.1:11434/v1", "LOCAL_KEY"),
        ("https://models.example/v1", None),  # a name: its addresses are checked when connecting
    ],
)
def test_configs_the_policy_allows(base_url: str, key: str | None) -> None:
    check_upstream(OpenAIConfig(base_url=base_url, model="m", api_key_env=key), POLICY)


def test_upstream_errors_say_nothing_of_what_the_server_answered() -> None:
    headers = httpx.Headers({"retry-after": "3"})
    messages = {status: status_error(status, headers) for status in (400, 401, 404, 429, 500, 502)}
    assert {status: error.code for status, error in messages.items()} == {
        400: "upstream_rejected",
        401: "upstream_auth",
        404: "upstream_not_found",
        429: "upstream_rate_limited",
        500: "upstream_unavailable",
        502: "upstream_unavailable",
    }
    assert messages[429].retry_after == 3 and "retry after 3 s" in messages[429].message
    assert messages[500].message == messages[502].message  # the status itself is not told


def test_the_pool_is_bounded() -> None:
    assert OpenAIAdapter(POLICY, max_connections=7).limits == httpx.Limits(
        max_connections=7, max_keepalive_connections=7
    )
    assert OpenAIAdapter(POLICY).limits.max_connections == 100
    assert OpenAIAdapter(POLICY).limits.max_keepalive_connections == 50


async def lines_of(text: str) -> AsyncIterator[str]:
    for line in text.split("\n"):
        yield line


async def test_sse_data_joins_data_lines_and_skips_comments_and_other_fields() -> None:
    text = ': keep-alive\n\nevent: message\ndata: {"a":\ndata: 1}\nid: 3\n\ndata: [DONE]\n\ndata: unfinished'
    assert [d async for d in sse_data(lines_of(text))] == ['{"a":\n1}', "[DONE]"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"error": {"message": "Incorrect API key", "code": "invalid_api_key"}}', "Incorrect API key"),
        (b'{"error": "model not loaded"}', "model not loaded"),
        (b'{"message": "busy"}', "busy"),
        (b"<html>\n  Bad   Gateway\n</html>", "<html> Bad Gateway </html>"),
        (b"", ""),
        (b"x" * 1000, "x" * 299 + "…"),
    ],
)
def test_error_messages_of_upstream_bodies(body: bytes, message: str) -> None:
    assert error_message(body) == message


def test_retry_after_in_seconds_milliseconds_or_a_date() -> None:
    assert retry_after(httpx.Headers({"retry-after": "7"})) == 7
    assert retry_after(httpx.Headers({"retry-after-ms": "1500", "retry-after": "9"})) == 1.5
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    wait = retry_after(httpx.Headers({"retry-after": later}))
    assert wait is not None and 25 <= wait <= 31
    assert retry_after(httpx.Headers({"retry-after": "soon"})) is None
    assert retry_after(httpx.Headers({})) is None
