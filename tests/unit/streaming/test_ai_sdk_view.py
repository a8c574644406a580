"""The AI SDK view: generation events in, UI message chunks (ai@6 protocol v1) out.

Checked on event lists, without a server: the chunks for each part kind, text parts closed
by the next part or the end, interleaved tool calls, a snapshot (alone, or after some
live events) giving the same chunks a full reader would have, and the terminal chunks.
The real client's reading of these chunks is checked in tests/integration/test_ai_sdk.py.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from app.streaming.ai_sdk import DONE_FRAME, UIMessageView, encode_chunks
from app.streaming.events import (
    Cancelled,
    Done,
    Error,
    GenerationEvent,
    PartDelta,
    PartEnd,
    PartStart,
    Snapshot,
    Start,
    Token,
    fold,
)
from app.streaming.parts import AnswerParts, Part

G, C, M = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
IDS = {"generation_id": G, "conversation_id": C}
START = [
    {"type": "start", "messageId": str(G), "messageMetadata": {"generationId": str(G), "conversationId": str(C)}},
    {"type": "start-step"},
]


def numbered(*events: dict[str, Any]) -> list[GenerationEvent]:
    """Events from (type, fields) dicts, seq 1, 2, 3 … in order."""
    built: list[GenerationEvent] = []
    for seq, spec in enumerate(events, start=1):
        kind = spec.pop("t")
        cls = {
            "start": Start,
            "token": Token,
            "part.start": PartStart,
            "part.delta": PartDelta,
            "part.end": PartEnd,
            "done": Done,
            "cancelled": Cancelled,
            "error": Error,
        }[kind]
        built.append(cls(**IDS, seq=seq, **spec))
    return built


def chunks_of(events: list[GenerationEvent]) -> list[dict[str, Any]]:
    """What a reader of these events is sent, decoded as the client reads it."""
    view = UIMessageView()
    chunks = [chunk for event in events for chunk in view.chunks(event)]
    return [json.loads(line.removeprefix(b"data: ")) for line in encode_chunks(chunks).split(b"\n\n") if line]


def done(**extra: Any) -> dict[str, Any]:
    return {"t": "done", "message_id": M, "token_count": 3, **extra}


FINISH = [{"type": "finish-step"}, {"type": "finish", "finishReason": "stop", "messageMetadata": {"messageId": str(M)}}]

# reasoning, text, a tool call with streamed args, its result, data, more text.
MIXED = numbered(
    {"t": "start"},
    {"t": "part.start", "part": 0, "kind": "reasoning"},
    {"t": "part.delta", "part": 0, "text": "let me "},
    {"t": "part.delta", "part": 0, "text": "think"},
    {"t": "part.end", "part": 0},
    {"t": "token", "text": "Hello "},
    {"t": "token", "text": "world"},
    {"t": "part.start", "part": 2, "kind": "tool_call", "name": "echo", "tool_call_id": "call_1"},
    {"t": "part.delta", "part": 2, "text": '{"text": '},
    {"t": "part.delta", "part": 2, "text": '"hi"}'},
    {"t": "part.end", "part": 2, "value": {"text": "hi"}},
    {"t": "part.start", "part": 3, "kind": "tool_result", "name": "echo", "tool_call_id": "call_1"},
    {"t": "part.end", "part": 3, "value": {"echoed": "hi"}},
    {"t": "part.start", "part": 4, "kind": "data", "name": "echo-stats"},
    {"t": "part.end", "part": 4, "value": {"words": 2}},
    {"t": "token", "text": "bye"},
    done(),
)
MIXED_CHUNKS = [
    *START,
    {"type": "reasoning-start", "id": "0"},
    {"type": "reasoning-delta", "id": "0", "delta": "let me "},
    {"type": "reasoning-delta", "id": "0", "delta": "think"},
    {"type": "reasoning-end", "id": "0"},
    {"type": "text-start", "id": "1"},
    {"type": "text-delta", "id": "1", "delta": "Hello "},
    {"type": "text-delta", "id": "1", "delta": "world"},
    {"type": "text-end", "id": "1"},
    {"type": "tool-input-start", "toolCallId": "call_1", "toolName": "echo"},
    {"type": "tool-input-delta", "toolCallId": "call_1", "inputTextDelta": '{"text": '},
    {"type": "tool-input-delta", "toolCallId": "call_1", "inputTextDelta": '"hi"}'},
    {"type": "tool-input-available", "toolCallId": "call_1", "toolName": "echo", "input": {"text": "hi"}},
    {"type": "tool-output-available", "toolCallId": "call_1", "output": {"echoed": "hi"}},
    {"type": "data-echo-stats", "data": {"words": 2}},
    {"type": "text-start", "id": "5"},
    {"type": "text-delta", "id": "5", "delta": "bye"},
    {"type": "text-end", "id": "5"},
    *FINISH,
]


def test_every_part_kind_maps_to_its_chunks() -> None:
    """Rule: start + start-step first (messageId = the generation, metadata names it and the
    conversation); text parts open at their first token with the part index as id and end
    at the next part.start or the end; reasoning, tool input and output, and data chunks as
    their events come; done ends with finish-step and finish (the stored message's id)."""
    assert chunks_of(MIXED) == MIXED_CHUNKS


def test_plain_text_answer() -> None:
    events = numbered({"t": "start"}, {"t": "token", "text": "a"}, {"t": "token", "text": "b"}, done())
    assert chunks_of(events) == [
        *START,
        {"type": "text-start", "id": "0"},
        {"type": "text-delta", "id": "0", "delta": "a"},
        {"type": "text-delta", "id": "0", "delta": "b"},
        {"type": "text-end", "id": "0"},
        *FINISH,
    ]


def test_interleaved_tool_calls() -> None:
    """Rule: several tool calls open at once, their argument pieces interleaved, each go out
    under their own toolCallId, in the order the events came."""
    events = numbered(
        {"t": "start"},
        {"t": "part.start", "part": 0, "kind": "tool_call", "name": "a", "tool_call_id": "ca"},
        {"t": "part.start", "part": 1, "kind": "tool_call", "name": "b", "tool_call_id": "cb"},
        {"t": "part.delta", "part": 0, "text": '{"x":'},
        {"t": "part.delta", "part": 1, "text": '{"y":2}'},
        {"t": "part.delta", "part": 0, "text": "1}"},
        {"t": "part.end", "part": 1, "value": {"y": 2}},
        {"t": "part.end", "part": 0, "value": {"x": 1}},
        done(finish_reason="tool_calls"),
    )
    assert chunks_of(events) == [
        *START,
        {"type": "tool-input-start", "toolCallId": "ca", "toolName": "a"},
        {"type": "tool-input-start", "toolCallId": "cb", "toolName": "b"},
        {"type": "tool-input-delta", "toolCallId": "ca", "inputTextDelta": '{"x":'},
        {"type": "tool-input-delta", "toolCallId": "cb", "inputTextDelta": '{"y":2}'},
        {"type": "tool-input-delta", "toolCallId": "ca", "inputTextDelta": "1}"},
        {"type": "tool-input-available", "toolCallId": "cb", "toolName": "b", "input": {"y": 2}},
        {"type": "tool-input-available", "toolCallId": "ca", "toolName": "a", "input": {"x": 1}},
        {"type": "finish-step"},
        {"type": "finish", "finishReason": "tool-calls", "messageMetadata": {"messageId": str(M)}},
    ]


def test_invalid_tool_call_and_tool_error() -> None:
    """Rule: a tool call whose arguments are not a JSON object is `tool-input-error` with the
    raw text as input; a tool result with an error is `tool-output-error`; a result whose call
    the client never saw gets its `tool-input-available` first (the client needs the call)."""
    events = numbered(
        {"t": "start"},
        {"t": "part.start", "part": 0, "kind": "tool_call", "name": "f", "tool_call_id": "c1"},
        {"t": "part.delta", "part": 0, "text": "{not json"},
        {"t": "part.end", "part": 0, "state": "invalid", "error": "the arguments are not valid JSON"},
        {"t": "part.start", "part": 1, "kind": "tool_result", "name": "g", "tool_call_id": "c2"},
        {"t": "part.end", "part": 1, "error": "boom"},
        done(finish_reason="length"),
    )
    assert chunks_of(events)[2:] == [
        {"type": "tool-input-start", "toolCallId": "c1", "toolName": "f"},
        {"type": "tool-input-delta", "toolCallId": "c1", "inputTextDelta": "{not json"},
        {
            "type": "tool-input-error",
            "toolCallId": "c1",
            "toolName": "f",
            "input": "{not json",
            "errorText": "the arguments are not valid JSON",
        },
        {"type": "tool-input-available", "toolCallId": "c2", "toolName": "g", "input": None},
        {"type": "tool-output-error", "toolCallId": "c2", "errorText": "boom"},
        {"type": "finish-step"},
        {"type": "finish", "finishReason": "length", "messageMetadata": {"messageId": str(M)}},
    ]


def test_null_values_are_sent() -> None:
    """Rule: a null tool input, output or data is sent as null, not left out."""
    events = numbered(
        {"t": "start"},
        {"t": "part.start", "part": 0, "kind": "tool_result", "name": "g", "tool_call_id": "c"},
        {"t": "part.end", "part": 0, "value": None},
        {"t": "part.start", "part": 1, "kind": "data", "name": "d"},
        {"t": "part.end", "part": 1, "value": None},
        done(finish_reason="weird"),
    )
    chunks = chunks_of(events)
    assert {"type": "tool-output-available", "toolCallId": "c", "output": None} in chunks
    assert {"type": "data-d", "data": None} in chunks
    assert chunks[-1]["finishReason"] == "other"


def test_cancel_and_error_end_without_finish() -> None:
    """Rule: a cancel is `abort` with its reason, a failure an `error` chunk with
    `<code>: <message>`; open parts stay open (no end chunks, no finish)."""
    head = [{"t": "start"}, {"t": "token", "text": "par"}]
    cancelled = chunks_of(numbered(*[dict(e) for e in head], {"t": "cancelled", "reason": "user"}))
    assert cancelled[-2:] == [{"type": "text-delta", "id": "0", "delta": "par"}, {"type": "abort", "reason": "user"}]
    failed = chunks_of(numbered(*[dict(e) for e in head], {"t": "error", "code": "adapter_failed", "message": "boom"}))
    assert failed[-1] == {"type": "error", "errorText": "adapter_failed: boom"}
    assert not any(c["type"] in ("text-end", "finish", "finish-step") for c in cancelled + failed)


def test_nothing_after_the_terminal_event() -> None:
    view = UIMessageView()
    events = numbered({"t": "start"}, done(), {"t": "token", "text": "late"})
    assert [c for e in events[:2] for c in view.chunks(e)] and view.finished
    assert view.chunks(events[2]) == []


def snapshot_at(events: list[GenerationEvent], seq: int) -> Snapshot:
    """The snapshot the log would give at `seq`: every part so far (open ones streaming)."""
    answer = AnswerParts()
    for event in events[:seq]:
        fold(answer, event)
    return Snapshot(**IDS, seq=seq, text=answer.text, parts=answer.copy())


def _ui_parts(chunks: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """A small client: the message's parts from the chunks (text and reasoning joined, tools by call id)."""
    parts: list[list[Any]] = []
    by_id: dict[str, list[Any]] = {}
    for c in chunks:
        kind = c["type"]
        if kind in ("text-start", "reasoning-start"):
            by_id[c["id"]] = [kind.split("-")[0], "", "streaming"]
            parts.append(by_id[c["id"]])
        elif kind in ("text-delta", "reasoning-delta"):
            by_id[c["id"]][1] += c["delta"]
        elif kind in ("text-end", "reasoning-end"):
            by_id[c["id"]][2] = "done"
        elif kind == "tool-input-start":
            by_id[c["toolCallId"]] = ["tool", "", "input-streaming", None]
            parts.append(by_id[c["toolCallId"]])
        elif kind == "tool-input-delta":
            by_id[c["toolCallId"]][1] += c["inputTextDelta"]
        elif kind == "tool-input-available":
            by_id[c["toolCallId"]][2:] = ["input-available", c["input"]]
        elif kind == "tool-output-available":
            by_id[c["toolCallId"]][2:] = ["output-available", c["output"]]
        elif kind.startswith("data-"):
            parts.append([kind, c["data"]])
    return [tuple(p) for p in parts]


@pytest.mark.parametrize("seq", range(2, len(MIXED)))
def test_snapshot_instead_of_the_first_events(seq: int) -> None:
    """Rule: a reader whose window is gone gets a snapshot at `seq`, then the live events; its
    chunks build the same message as a full reader's: start first, every part once, open
    parts opened and not ended until their events come, and the same end."""
    resumed = [snapshot_at(MIXED, seq), *MIXED[seq:]]
    chunks = chunks_of(resumed)
    assert chunks[:2] == START
    assert chunks[-2:] == FINISH
    assert _ui_parts(chunks) == _ui_parts(MIXED_CHUNKS)
    starts = [c for c in chunks if c["type"].endswith("-start") and c["type"] != "start"]
    assert len(starts) == len({json.dumps(c) for c in starts}) == 4  # reasoning, 2 texts, 1 tool call


@pytest.mark.parametrize("seq", range(2, len(MIXED)))
def test_snapshot_after_live_events_sends_only_what_is_missing(seq: int) -> None:
    """Rule: a reader that fell behind mid-answer and gets a snapshot is sent only the
    difference: nothing it already has is sent again."""
    live = max(seq - 3, 1)
    resumed = [*MIXED[:live], snapshot_at(MIXED, seq), *MIXED[seq:]]
    chunks = chunks_of(resumed)
    assert _ui_parts(chunks) == _ui_parts(MIXED_CHUNKS)
    assert [c for c in chunks if c["type"] in ("start", "start-step")] == START


def test_snapshot_of_a_stored_answer_without_parts() -> None:
    """Rule: a snapshot with text and no parts (an answer stored before parts) is one text part."""
    events: list[GenerationEvent] = [Snapshot(**IDS, seq=4, text="old answer"), *numbered(done())]
    assert chunks_of(events) == [
        *START,
        {"type": "text-start", "id": "0"},
        {"type": "text-delta", "id": "0", "delta": "old answer"},
        {"type": "text-end", "id": "0"},
        *FINISH,
    ]


def test_snapshot_of_a_cancelled_answer_leaves_cut_parts_open() -> None:
    """Rule: parts a cancel cut (stored `incomplete`) are opened with what they had, not ended."""
    parts = [
        Part(kind="text", text="half"),
        Part(kind="tool_call", state="incomplete", name="f", tool_call_id="c", text='{"a":'),
    ]
    events: list[GenerationEvent] = [
        Snapshot(**IDS, seq=5, text="half", parts=parts),
        *numbered({"t": "cancelled", "reason": "user"}),
    ]
    assert chunks_of(events)[2:] == [
        {"type": "text-start", "id": "0"},
        {"type": "text-delta", "id": "0", "delta": "half"},
        {"type": "text-end", "id": "0"},
        {"type": "tool-input-start", "toolCallId": "c", "toolName": "f"},
        {"type": "tool-input-delta", "toolCallId": "c", "inputTextDelta": '{"a":'},
        {"type": "abort", "reason": "user"},
    ]


def test_frames_are_sse_data_lines() -> None:
    view = UIMessageView()
    body = encode_chunks([c for e in numbered({"t": "start"}, {"t": "token", "text": "a\nb"}) for c in view.chunks(e)])
    frames = body.split(b"\n\n")
    assert frames[-1] == b"" and all(f.startswith(b"data: {") and b"\n" not in f for f in frames[:-1])
    assert DONE_FRAME == b"data: [DONE]\n\n"
