"""The `openai` adapter's typed parts: upstream chunks (recorded shapes of OpenAI, vLLM,
llama.cpp, Ollama, DeepSeek) to answer items; declared tools (config, request body);
history with tool calls and results to upstream messages. (Over HTTP:
tests/integration/test_openai_adapter.py.)"""

from __future__ import annotations

import itertools
import json
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from app.streaming.adapters import AdapterConfigError, AdapterError, normalize_config, parse_config
from app.streaming.adapters.base import AnswerEnd, AnswerItem, AppendPart, EndPart, StartPart
from app.streaming.adapters.openai import (
    MALFORMED_TOOL_CALL,
    OpenAIConfig,
    _answer,
    fit_history,
    request_body,
    sse_data,
    upstream_messages,
)
from app.streaming.parts import Part
from app.streaming.records import HistoryItem
from app.tables import MessageRole
from app.upstream_policy import UpstreamPolicy
from tests.fake_model_server import chunk, tool_call, tool_calls_chunk, usage_chunk

pytestmark = pytest.mark.anyio

U, A, T = MessageRole.user, MessageRole.agent, MessageRole.tool


async def _events(steps: list[str]) -> AsyncIterator[str]:
    """The steps as the SSE body the fake model server sends, read back through sse_data."""

    async def lines() -> AsyncIterator[str]:
        for step in [*steps, "[DONE]"]:
            yield f"data: {step}"
            yield ""

    async for data in sse_data(lines()):
        yield data


async def items_of(*steps: str) -> list[AnswerItem]:
    """What the adapter yields for a stream of these chunks (then `[DONE]`)."""
    return [item async for item in _answer(_events(list(steps)))]


def call_key(index: int) -> str:
    return f"call:{index}"


# -- recorded shapes -------------------------------------------------------------------

# OpenAI's own stream of one tool call (gpt-4o, as recorded): the first chunk holds the id,
# `type`, the name and `"arguments": ""`; the next ones only the index and a piece.
OPENAI_TOOL_CALL = [
    '{"id":"chatcmpl-AXv","object":"chat.completion.chunk","created":1733000000,"model":"gpt-4o-2024-08-06",'
    '"system_fingerprint":"fp_7f6be3efb0","choices":[{"index":0,"delta":{"role":"assistant","content":null,'
    '"tool_calls":[{"index":0,"id":"call_DdmO9pD3xa9XTPNJ32zg2hcA","type":"function","function":'
    '{"name":"get_weather","arguments":""}}],"refusal":null},"logprobs":null,"finish_reason":null}]}',
    '{"id":"chatcmpl-AXv","object":"chat.completion.chunk","created":1733000000,"model":"gpt-4o-2024-08-06",'
    '"system_fingerprint":"fp_7f6be3efb0","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":'
    '{"arguments":"{\\""}}]},"logprobs":null,"finish_reason":null}]}',
    '{"id":"chatcmpl-AXv","object":"chat.completion.chunk","created":1733000000,"model":"gpt-4o-2024-08-06",'
    '"system_fingerprint":"fp_7f6be3efb0","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":'
    '{"arguments":"location"}}]},"logprobs":null,"finish_reason":null}]}',
    '{"id":"chatcmpl-AXv","object":"chat.completion.chunk","created":1733000000,"model":"gpt-4o-2024-08-06",'
    '"system_fingerprint":"fp_7f6be3efb0","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":'
    '{"arguments":"\\":\\"Paris\\"}"}}]},"logprobs":null,"finish_reason":null}]}',
    '{"id":"chatcmpl-AXv","object":"chat.completion.chunk","created":1733000000,"model":"gpt-4o-2024-08-06",'
    '"system_fingerprint":"fp_7f6be3efb0","choices":[{"index":0,"delta":{},"logprobs":null,'
    '"finish_reason":"tool_calls"}]}',
]


async def test_openais_own_tool_call_stream() -> None:
    items = await items_of(*OPENAI_TOOL_CALL)
    assert items == [
        StartPart(key="call:0", kind="tool_call", name="get_weather", tool_call_id="call_DdmO9pD3xa9XTPNJ32zg2hcA"),
        AppendPart("call:0", '{"'),
        AppendPart("call:0", "location"),
        AppendPart("call:0", '":"Paris"}'),
        EndPart("call:0"),
        AnswerEnd(finish_reason="tool_calls"),
    ]
    # The pieces make the arguments exactly (the core parses them).
    assert json.loads("".join(i.text for i in items if isinstance(i, AppendPart))) == {"location": "Paris"}


async def test_text_then_two_calls_with_interleaved_arguments() -> None:
    items = await items_of(
        chunk(role="assistant", content=""),
        chunk("Checking both."),
        tool_calls_chunk(tool_call(0, id="call_a", name="get_weather", arguments="")),
        tool_calls_chunk(tool_call(1, id="call_b", name="get_time", arguments="")),
        tool_calls_chunk(tool_call(0, arguments='{"city":')),
        tool_calls_chunk(tool_call(1, arguments='{"tz":')),
        tool_calls_chunk(tool_call(0, arguments='"Paris"}')),
        # Two entries in one chunk, out of order.
        tool_calls_chunk(tool_call(1, arguments='"CET"'), tool_call(0, arguments=" ")),
        tool_calls_chunk(tool_call(1, arguments="}")),
        chunk(finish_reason="tool_calls"),
        usage_chunk(31),
    )
    assert items == [
        "Checking both.",
        StartPart(key="call:0", kind="tool_call", name="get_weather", tool_call_id="call_a"),
        StartPart(key="call:1", kind="tool_call", name="get_time", tool_call_id="call_b"),
        AppendPart("call:0", '{"city":'),
        AppendPart("call:1", '{"tz":'),
        AppendPart("call:0", '"Paris"}'),
        AppendPart("call:1", '"CET"'),
        AppendPart("call:0", " "),
        AppendPart("call:1", "}"),
        EndPart("call:0"),
        EndPart("call:1"),
        AnswerEnd(token_count=31, finish_reason="tool_calls"),
    ]


async def test_a_call_given_whole_in_one_chunk_as_ollama_sends_it() -> None:
    ollama = (
        '{"id":"chatcmpl-420","object":"chat.completion.chunk","created":1733000000,"model":"qwen3:8b",'
        '"system_fingerprint":"fp_ollama","choices":[{"index":0,"delta":{"role":"assistant","content":"",'
        '"tool_calls":[{"id":"call_w1b2x3","index":0,"type":"function","function":{"name":"get_weather",'
        '"arguments":"{\\"city\\":\\"Paris\\"}"}}]},"finish_reason":null}]}'
    )
    # Older Ollama (and llama.cpp) builds finish such an answer with `stop`: it still waits for results.
    items = await items_of(ollama, chunk(finish_reason="stop"))
    assert items == [
        StartPart(key="call:0", kind="tool_call", name="get_weather", tool_call_id="call_w1b2x3"),
        AppendPart("call:0", '{"city":"Paris"}'),
        EndPart("call:0"),
        AnswerEnd(finish_reason="tool_calls"),
    ]


async def test_a_call_cut_by_the_length_limit_keeps_that_reason() -> None:
    items = await items_of(
        tool_calls_chunk(tool_call(0, id="call_a", name="f", arguments='{"a":')), chunk(finish_reason="length")
    )
    assert items[-2:] == [EndPart("call:0"), AnswerEnd(finish_reason="length")]


async def test_calls_without_ids_get_ones_unique_per_answer() -> None:
    steps = [
        tool_calls_chunk({"index": 0, "function": {"name": "f", "arguments": "{}"}}),
        tool_calls_chunk({"index": 1, "type": "function", "function": {"name": "g"}}),
        chunk(finish_reason="tool_calls"),
    ]
    first, second = await items_of(*steps), await items_of(*steps)
    ids = [[i.tool_call_id for i in items if isinstance(i, StartPart)] for items in (first, second)]
    for a, b in ids:
        assert a is not None and b is not None
        assert re.fullmatch(r"call_[0-9a-f]{12}_0", a) and b == a[:-1] + "1", (a, b)
    assert ids[0][0] != ids[1][0]  # another answer, other ids


async def test_a_repeated_name_and_id_on_later_chunks_is_fine() -> None:
    items = await items_of(
        tool_calls_chunk(tool_call(0, id="call_a", name="f", arguments="{")),
        tool_calls_chunk(tool_call(0, id="call_a", name="f", arguments="}")),
        tool_calls_chunk({"index": 0, "function": {"name": "", "arguments": None}}),
        chunk(finish_reason="tool_calls"),
    )
    assert items == [
        StartPart(key="call:0", kind="tool_call", name="f", tool_call_id="call_a"),
        AppendPart("call:0", "{"),
        AppendPart("call:0", "}"),
        EndPart("call:0"),
        AnswerEnd(finish_reason="tool_calls"),
    ]


async def test_an_empty_tool_calls_list_beside_text_changes_nothing() -> None:
    items = await items_of(chunk("Hi", tool_calls=[]), chunk(finish_reason="stop"))
    assert items == ["Hi", AnswerEnd(finish_reason="stop")]


# vLLM (and DeepSeek's API, llama.cpp's server): `reasoning_content` deltas, then `content`.
VLLM_REASONING = [
    '{"id":"chatcmpl-9f1","object":"chat.completion.chunk","created":1733000000,"model":"Qwen/QwQ-32B",'
    '"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}',
    '{"id":"chatcmpl-9f1","object":"chat.completion.chunk","created":1733000000,"model":"Qwen/QwQ-32B",'
    '"choices":[{"index":0,"delta":{"reasoning_content":"The user"},"logprobs":null,"finish_reason":null}]}',
    '{"id":"chatcmpl-9f1","object":"chat.completion.chunk","created":1733000000,"model":"Qwen/QwQ-32B",'
    '"choices":[{"index":0,"delta":{"reasoning_content":" greets me."},"logprobs":null,"finish_reason":null}]}',
    '{"id":"chatcmpl-9f1","object":"chat.completion.chunk","created":1733000000,"model":"Qwen/QwQ-32B",'
    '"choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}]}',
    '{"id":"chatcmpl-9f1","object":"chat.completion.chunk","created":1733000000,"model":"Qwen/QwQ-32B",'
    '"choices":[{"index":0,"delta":{"content":"!"},"logprobs":null,"finish_reason":"stop","stop_reason":null}]}',
]

# DeepSeek's API: both fields in every delta, the idle one null.
DEEPSEEK_REASONING = [
    chunk(role="assistant", content=None, reasoning_content=""),
    chunk(None, reasoning_content="The user"),
    chunk(None, reasoning_content=" greets me."),
    chunk("Hello", reasoning_content=None),
    chunk("!", reasoning_content=None, finish_reason="stop"),
]

# Ollama (and llama.cpp with `reasoning_format`, newer vLLM): `reasoning`, with `content: ""` beside it.
OLLAMA_REASONING = [
    '{"id":"chatcmpl-77","object":"chat.completion.chunk","created":1733000000,"model":"qwen3:8b",'
    '"system_fingerprint":"fp_ollama","choices":[{"index":0,"delta":{"role":"assistant","content":"",'
    '"reasoning":"The user"},"finish_reason":null}]}',
    '{"id":"chatcmpl-77","object":"chat.completion.chunk","created":1733000000,"model":"qwen3:8b",'
    '"system_fingerprint":"fp_ollama","choices":[{"index":0,"delta":{"role":"assistant","content":"",'
    '"reasoning":" greets me."},"finish_reason":null}]}',
    '{"id":"chatcmpl-77","object":"chat.completion.chunk","created":1733000000,"model":"qwen3:8b",'
    '"system_fingerprint":"fp_ollama","choices":[{"index":0,"delta":{"role":"assistant","content":"Hello"},'
    '"finish_reason":null}]}',
    '{"id":"chatcmpl-77","object":"chat.completion.chunk","created":1733000000,"model":"qwen3:8b",'
    '"system_fingerprint":"fp_ollama","choices":[{"index":0,"delta":{"role":"assistant","content":"!"},'
    '"finish_reason":"stop"}]}',
]

REASONED_HELLO = [
    StartPart(key="reasoning", kind="reasoning"),
    AppendPart("reasoning", "The user"),
    AppendPart("reasoning", " greets me."),
    EndPart("reasoning"),
    "Hello",
    "!",
    AnswerEnd(finish_reason="stop"),
]


@pytest.mark.parametrize(
    "steps",
    [VLLM_REASONING, DEEPSEEK_REASONING, OLLAMA_REASONING],
    ids=["vllm reasoning_content", "deepseek both fields", "ollama reasoning"],
)
async def test_reasoning_then_text(steps: list[str]) -> None:
    assert await items_of(*steps) == REASONED_HELLO


async def test_a_server_sending_both_reasoning_fields_is_read_once() -> None:
    items = await items_of(chunk(reasoning_content="Hm.", reasoning="Hm."), chunk("Yes.", finish_reason="stop"))
    assert items == [
        StartPart(key="reasoning", kind="reasoning"),
        AppendPart("reasoning", "Hm."),
        EndPart("reasoning"),
        "Yes.",
        AnswerEnd(),
    ]


async def test_reasoning_ends_where_a_tool_call_begins() -> None:
    items = await items_of(
        chunk(reasoning_content="I need the weather."),
        tool_calls_chunk(tool_call(0, id="call_a", name="get_weather", arguments='{"city":"Paris"}')),
        chunk(finish_reason="tool_calls"),
    )
    assert items == [
        StartPart(key="reasoning", kind="reasoning"),
        AppendPart("reasoning", "I need the weather."),
        EndPart("reasoning"),
        StartPart(key="call:0", kind="tool_call", name="get_weather", tool_call_id="call_a"),
        AppendPart("call:0", '{"city":"Paris"}'),
        EndPart("call:0"),
        AnswerEnd(finish_reason="tool_calls"),
    ]


async def test_reasoning_alone_ends_with_the_answer() -> None:
    assert await items_of(chunk(reasoning="Hm."), chunk(finish_reason="stop")) == [
        StartPart(key="reasoning", kind="reasoning"),
        AppendPart("reasoning", "Hm."),
        EndPart("reasoning"),
        AnswerEnd(),
    ]
    # No finish_reason at all: closed at `[DONE]`.
    assert (await items_of(chunk(reasoning="Hm.")))[-2:] == [EndPart("reasoning"), AnswerEnd()]


async def test_reasoning_after_text_is_another_reasoning_part() -> None:
    items = await items_of(chunk(reasoning="a"), chunk("b"), chunk(reasoning="c"), chunk("d"))
    assert items == [
        StartPart(key="reasoning", kind="reasoning"),
        AppendPart("reasoning", "a"),
        EndPart("reasoning"),
        "b",
        StartPart(key="reasoning", kind="reasoning"),
        AppendPart("reasoning", "c"),
        EndPart("reasoning"),
        "d",
        AnswerEnd(),
    ]


async def test_plain_text_is_yielded_as_before() -> None:
    steps = [chunk(role="assistant", content=""), chunk("Hel"), chunk("lo"), chunk(finish_reason="stop")]
    assert await items_of(*steps, usage_chunk(2)) == ["Hel", "lo", AnswerEnd(token_count=2)]


# -- malformed tool calls --------------------------------------------------------------

OPENED = tool_calls_chunk(tool_call(0, id="call_a", name="f", arguments="{"))
MALFORMED = {
    "tool_calls not a list": ([chunk(tool_calls={"index": 0})], "tool_calls is not a list"),
    "an entry not an object": ([chunk(tool_calls=["call"])], "a tool call is not an object"),
    "index missing": ([tool_calls_chunk({"id": "c", "function": {"name": "f"}})], "a tool call has no index"),
    "index negative": ([tool_calls_chunk(tool_call(-1, id="c", name="f"))], "not a non-negative integer"),
    "index a string": ([tool_calls_chunk({"index": "0", "function": {"name": "f"}})], "not a non-negative integer"),
    "index a bool": ([tool_calls_chunk({"index": True, "function": {"name": "f"}})], "not a non-negative integer"),
    "index a float": ([tool_calls_chunk({"index": 0.5, "function": {"name": "f"}})], "not a non-negative integer"),
    "function not an object": ([tool_calls_chunk({"index": 0, "function": "f"})], "function is not an object"),
    "arguments an object": (
        [tool_calls_chunk({"index": 0, "function": {"name": "f", "arguments": {"a": 1}}})],
        "tool call 0: arguments are not a string",
    ),
    "arguments a later number": (
        [OPENED, tool_calls_chunk({"index": 0, "function": {"arguments": 5}})],
        "tool call 0: arguments are not a string",
    ),
    "no name at the start": (
        [tool_calls_chunk(tool_call(0, id="c", arguments="{}"))],
        "tool call 0 starts without a function name",
    ),
    "a name not a string": (
        [tool_calls_chunk({"index": 0, "function": {"name": 7}})],
        "tool call 0: the function name is not a string",
    ),
    "an id not a string": (
        [tool_calls_chunk({"index": 0, "id": 7, "function": {"name": "f"}})],
        "tool call 0: id is not a string",
    ),
    "the name changing mid-call": (
        [OPENED, tool_calls_chunk(tool_call(0, name="g", arguments="}"))],
        "tool call 0: the function name changed mid-call",
    ),
    "a call continuing after the finish": (
        [OPENED, chunk(finish_reason="tool_calls"), tool_calls_chunk(tool_call(0, arguments="}"))],
        "tool call 0 continues after the answer finished",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_a_malformed_tool_call_chunk_is_an_adapter_error(case: str) -> None:
    steps, says = MALFORMED[case]
    seen: list[AnswerItem] = []
    with pytest.raises(AdapterError) as failed:
        async for item in _answer(_events(steps)):
            seen.append(item)
    assert failed.value.code == MALFORMED_TOOL_CALL == "upstream_malformed_tool_call"
    assert failed.value.message.startswith("the model server sent a malformed tool call: "), failed.value.message
    assert says in failed.value.message, failed.value.message
    # The chunk goes to the log as the cause, by its size only (its text may be the answer), never into the message.
    assert "the chunk:" in str(failed.value.__cause__)
    assert not any(isinstance(item, AnswerEnd) for item in seen)


async def test_a_reasoning_field_that_is_not_text_is_a_malformed_chunk() -> None:
    with pytest.raises(AdapterError) as failed:
        await items_of(chunk(reasoning_content=["a"]))
    assert failed.value.code == "upstream_malformed"


# -- declared tools --------------------------------------------------------------------

BASE = {"baseUrl": "https://api.openai.com/v1", "model": "m"}
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CLOCK = {"name": "get-time_2", "parameters": {"type": "object", "properties": {}}}


def test_tools_are_kept_as_given_and_sent_upstream() -> None:
    raw = {**BASE, "tools": [WEATHER, CLOCK], "toolChoice": "required"}
    stored = normalize_config("openai", raw, UpstreamPolicy())
    assert stored == raw  # a tool's missing description stays missing
    body = request_body(parse_config("openai", stored), [])
    assert body["tools"] == [{"type": "function", "function": WEATHER}, {"type": "function", "function": CLOCK}]
    assert body["tool_choice"] == "required"


def test_without_tools_nothing_of_them_is_sent() -> None:
    assert normalize_config("openai", BASE, UpstreamPolicy()) == BASE
    body = request_body(parse_config("openai", {**BASE, "tools": []}), [])
    assert "tools" not in body and "tool_choice" not in body


def test_sixty_four_tools_are_allowed() -> None:
    tools = [{**CLOCK, "name": f"t{i}"} for i in range(64)]
    assert len(parse_config("openai", {**BASE, "tools": tools}).tools) == 64


def _names_tools(field: str) -> bool:
    """The field names the tools (`tools`, or a path in them such as `tools[0].name`)."""
    return field == "tools" or field.startswith("tools[")


BAD_TOOLS: dict[str, tuple[Any, str]] = {
    "not a list": ("get_weather", "array"),
    "an entry not an object": (["get_weather"], "object"),
    "65 tools": ([{**CLOCK, "name": f"t{i}"} for i in range(65)], "length <= 64"),
    "a name with a space": ([{**CLOCK, "name": "get weather"}], "regex"),
    "an empty name": ([{**CLOCK, "name": ""}], "regex"),
    "a 65-character name": ([{**CLOCK, "name": "a" * 65}], "regex"),
    "a name not a string": ([{**CLOCK, "name": 5}], "str"),
    "a long description": ([{**WEATHER, "description": "d" * 1025}], "length <= 1024"),
    "parameters a list": ([{**CLOCK, "parameters": []}], "object"),
    "parameters not an object schema": ([{**CLOCK, "parameters": {"type": "string"}}], '"type": "object"'),
    "parameters without a type": ([{**CLOCK, "parameters": {"properties": {}}}], '"type": "object"'),
    "parameters over 16 KiB": (
        [{**CLOCK, "parameters": {"type": "object", "description": "x" * 16_400}}],
        "at most 16384 bytes",
    ),
}


@pytest.mark.parametrize("case", list(BAD_TOOLS))
def test_a_bad_tools_config_names_the_field(case: str) -> None:
    tools, says = BAD_TOOLS[case]
    for check in (lambda: parse_config("openai", {**BASE, "tools": tools}), lambda: _normalize(tools=tools)):
        with pytest.raises(AdapterConfigError) as refused:
            check()
        assert _names_tools(refused.value.field) and says in refused.value.message, refused.value


def _normalize(**extra: Any) -> dict[str, Any]:
    return normalize_config("openai", {**BASE, **extra}, UpstreamPolicy())


def test_tool_names_must_be_unique() -> None:
    with pytest.raises(AdapterConfigError) as refused:
        _normalize(tools=[WEATHER, {**CLOCK, "name": "get_weather"}])
    assert refused.value.field == "tools" and "two tools are named 'get_weather'" in refused.value.message


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"tools": [WEATHER], "toolChoice": "sometimes"}, "Invalid enum value 'sometimes'"),
        ({"tools": [WEATHER], "toolChoice": {"type": "function"}}, "str"),
        ({"toolChoice": "auto"}, "needs tools"),
        ({"tools": [], "toolChoice": "none"}, "needs tools"),
    ],
)
def test_a_bad_tool_choice_names_the_field(extra: dict[str, Any], says: str) -> None:
    with pytest.raises(AdapterConfigError) as refused:
        _normalize(**extra)
    assert refused.value.field == "toolChoice" and says in refused.value.message, refused.value


@pytest.mark.parametrize(
    ("tool", "field"),
    [({"parameters": CLOCK["parameters"]}, "tools[0].name"), ({"name": "f"}, "tools[0].parameters")],
)
def test_a_tool_missing_a_field_names_it(tool: dict[str, Any], field: str) -> None:
    with pytest.raises(AdapterConfigError) as refused:
        parse_config("openai", {**BASE, "tools": [tool]})
    assert refused.value.field == field and refused.value.message == "required", refused.value


def test_an_unknown_field_in_a_tool_is_refused_naming_it() -> None:
    with pytest.raises(AdapterConfigError) as refused:
        parse_config("openai", {**BASE, "tools": [{**CLOCK, "strict": True}]})
    assert refused.value.field == "tools[0].strict" and refused.value.message == "unknown field", refused.value


# -- history to upstream messages ------------------------------------------------------

_ticks = itertools.count(1)


def turn(role: MessageRole, text: str = "", *parts: Part) -> HistoryItem:
    """A history item; a user's or a plain agent's text is its one text part."""
    if not parts and role is not MessageRole.tool:
        parts = (Part(kind="text", text=text),)
    return HistoryItem(
        id=uuid.uuid4(),
        role=role,
        effective_content=text,
        created_at=datetime.fromtimestamp(1_700_000_000 + next(_ticks), UTC),
        parts=list(parts),
    )


def call(call_id: str, args: str = '{"city":"Paris"}', name: str = "get_weather", **state: Any) -> Part:
    return Part(kind="tool_call", text=args, name=name, tool_call_id=call_id, value=json.loads(args or "{}"), **state)


def result(call_id: str, value: Any = None, error: str | None = None, name: str = "get_weather") -> Part:
    return Part(kind="tool_result", name=name, tool_call_id=call_id, value=value, error=error)


def tool_turn(call_id: str, value: Any = None, error: str | None = None) -> HistoryItem:
    text = error if error is not None else json.dumps(value, separators=(",", ":"))
    return turn(T, text, result(call_id, value, error))


def test_a_tool_round_in_the_history() -> None:
    history = [
        turn(U, "Weather in Paris and Rome?"),
        turn(
            A,
            "Let me check.",
            Part(kind="reasoning", text="Two cities: two calls."),
            Part(kind="text", text="Let me check."),
            call("call_1"),
            call("call_2", '{"city":"Rome"}'),
        ),
        tool_turn("call_1", {"temp": 21, "sky": "clear"}),
        tool_turn("call_2", error="the weather service is down"),
    ]
    assert upstream_messages(history) == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp":21,"sky":"clear"}'},
        {"role": "tool", "tool_call_id": "call_2", "content": "the weather service is down"},
    ]


def test_a_call_without_text_has_null_content_and_blank_arguments_are_an_empty_object() -> None:
    history = [turn(U, "Time?"), turn(A, "", call("c", "", name="get_time")), tool_turn("c", "12:00")]
    assert upstream_messages(history)[1:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c", "content": '"12:00"'},
    ]


def test_a_server_side_tool_result_follows_its_agent_message() -> None:
    # The echo agent's `parts` mode: the tool ran on the server, its result is in the answer.
    history = [
        turn(U, "hi"),
        turn(
            A,
            "hi hi",
            Part(kind="text", text="hi "),
            call("e1", '{"text":"hi"}', name="echo"),
            result("e1", {"text": "hi"}, name="echo"),
            Part(kind="data", name="echo-stats", value={"words": 1}),
            Part(kind="text", text="hi"),
        ),
        turn(U, "again"),
    ]
    assert upstream_messages(history) == [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": "hi hi",
            "tool_calls": [
                {"id": "e1", "type": "function", "function": {"name": "echo", "arguments": '{"text":"hi"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "e1", "content": '{"text":"hi"}'},
        {"role": "user", "content": "again"},
    ]


def test_incomplete_invalid_and_unanswered_calls_are_left_out() -> None:
    history = [
        turn(U, "go"),
        turn(
            A,
            "Trying.",
            Part(kind="text", text="Trying."),
            Part(kind="tool_call", state="incomplete", text='{"ci', name="get_weather", tool_call_id="cut"),
            Part(kind="tool_call", state="invalid", text="{oops", name="get_weather", tool_call_id="bad", error="x"),
            call("unanswered"),
            call("answered"),
        ),
        tool_turn("answered", 1),
        # A result for a call the history does not hold (cut by the budget, or unknown).
        tool_turn("elsewhere", 2),
        turn(U, "and?"),
    ]
    messages = upstream_messages(history)
    assert messages[1]["tool_calls"] == [
        {"id": "answered", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    ]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "user"]
    assert messages[2] == {"role": "tool", "tool_call_id": "answered", "content": "1"}


def test_an_agent_message_whose_calls_all_went_unanswered_is_plain_text() -> None:
    # The user moved on without answering: a server refuses calls left without results.
    history = [turn(U, "go"), turn(A, "Calling.", Part(kind="text", text="Calling."), call("c")), turn(U, "never mind")]
    assert upstream_messages(history)[1] == {"role": "assistant", "content": "Calling."}


def test_a_result_given_after_a_later_user_message_still_follows_its_call() -> None:
    history = [turn(U, "go"), turn(A, "", call("c")), turn(U, "hurry"), tool_turn("c", "ok")]
    assert [m["role"] for m in upstream_messages(history)] == ["user", "assistant", "tool", "user"]


def test_an_edited_agent_message_sends_its_edited_text_with_its_calls() -> None:
    # The history gives an edited answer as its other parts, then the edited text.
    history = [turn(U, "go"), turn(A, "Edited.", call("c"), Part(kind="text", text="Edited.")), tool_turn("c", 1)]
    assert upstream_messages(history)[1]["content"] == "Edited."


def test_legacy_items_without_parts_are_sent_as_text() -> None:
    history = [
        HistoryItem(id=uuid.uuid4(), role=role, effective_content=text, created_at=datetime.now(UTC))
        for role, text in ((U, "hi"), (A, "hello"), (U, "how?"))
    ]
    assert upstream_messages(history) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how?"},
    ]


def test_the_budget_counts_arguments_and_results_and_keeps_a_round_whole() -> None:
    old_round = [turn(U, "q1"), turn(A, "a1", call("c1", '{"x":"' + "y" * 50 + '"}')), tool_turn("c1", "r" * 40)]
    history = [*old_round, turn(U, "q2")]
    # "q2" (2) + the old round: "q1" 2 + "a1" 2 + 58 of arguments + 42 of result = 106.
    assert fit_history(history, 106) == history
    # One character less: the whole round goes (its tool message never without its call).
    assert [i.effective_content for i in fit_history(history, 105)] == ["q2"]


def test_the_current_tool_round_is_always_kept() -> None:
    # The continuation after a tool result: the question, the call and its result are kept
    # whatever the budget, so the model sees what it asked for.
    history = [
        turn(U, "old question"),
        turn(A, "old answer"),
        turn(U, "Weather?"),
        turn(A, "", call("c")),
        tool_turn("c", {"temp": 21}),
    ]
    kept = fit_history(history, 1)
    assert kept == history[2:]
    assert [m["role"] for m in upstream_messages(kept)] == ["user", "assistant", "tool"]


def test_a_cut_never_starts_with_an_agent_or_tool_message() -> None:
    history = [
        turn(U, "q" * 50),
        turn(A, "", call("c", "{}")),
        tool_turn("c", "r"),
        turn(A, "done"),
        turn(U, "next"),
    ]
    # Room for "next", "done" and the call with its result ("{}" + '"r"'), not for the first question.
    assert [i.role for i in fit_history(history, 13)] == [U]


def test_the_request_body_carries_the_converted_history() -> None:
    config = OpenAIConfig(base_url="http://m/v1", model="m", include_usage=False)
    history = [turn(U, "Time?"), turn(A, "", call("c", "{}", name="get_time")), tool_turn("c", "12:00")]
    assert request_body(config, history)["messages"] == upstream_messages(history)
