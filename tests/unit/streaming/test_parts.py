"""The fold of events into parts, and the check of what adapters yield."""

from __future__ import annotations

import pytest

from app.streaming.adapters import AdapterError, AppendPart, EndPart, StartPart
from app.streaming.answer_builder import AnswerBuilder
from app.streaming.parts import AnswerParts, Part, parse_arguments


def test_tokens_grow_one_text_part_until_another_part_starts() -> None:
    answer = AnswerParts()
    answer.add_text("a")
    answer.add_text("b")
    answer.start(1, "reasoning", None, None)
    answer.delta(1, "hm")
    answer.add_text("c")  # a new text part: the first one was closed by the reasoning
    assert answer.copy() == [
        Part(kind="text", text="ab"),
        Part(kind="reasoning", state="streaming", text="hm"),
        Part(kind="text", state="streaming", text="c"),
    ]
    assert answer.text == "abc"
    assert [p.state for p in answer.ended(complete=True)] == ["complete", "incomplete", "complete"]
    assert [p.state for p in answer.ended(complete=False)] == ["complete", "incomplete", "incomplete"]


def test_part_events_that_do_not_fit_are_refused() -> None:
    answer = AnswerParts()
    with pytest.raises(ValueError):
        answer.start(1, "reasoning", None, None)  # not the next index
    with pytest.raises(ValueError):
        answer.start(0, "text", None, None)  # text comes as tokens
    answer.start(0, "data", "d", None)
    answer.end(0, "complete", {"x": 1}, None)
    with pytest.raises(ValueError):
        answer.delta(0, "more")  # ended
    with pytest.raises(ValueError):
        answer.end(5, "complete", None, None)  # never opened


def test_a_snapshot_resets_the_fold_and_keeps_an_open_text_part_open() -> None:
    answer = AnswerParts()
    answer.reset([Part(kind="text", state="streaming", text="he")])
    answer.add_text("llo")
    assert answer.copy() == [Part(kind="text", state="streaming", text="hello")]


@pytest.mark.parametrize(
    ("text", "value", "valid"),
    [("", {}, True), ('{"a": 1}', {"a": 1}, True), ("[1]", None, False), ('{"a": ', None, False)],
)
def test_tool_arguments_must_be_a_json_object(text: str, value: object, valid: bool) -> None:
    parsed, error = parse_arguments(text)
    assert parsed == value and (error is None) is valid


def test_the_builder_numbers_parts_by_their_index_and_parses_arguments() -> None:
    built = AnswerBuilder()
    steps = [
        built.event("hi"),
        built.event(StartPart(key="c", kind="tool_call", name="f", tool_call_id="1")),
        built.event(StartPart(key="d", kind="tool_call", name="g", tool_call_id="2")),
        built.event(AppendPart("c", '{"x":')),
        built.event(AppendPart("d", "{}")),
        built.event(AppendPart("c", " 1}")),
        built.event(EndPart("c")),
        built.event(AppendPart("d", "")),  # an empty piece makes no event
    ]
    assert steps[-1] is None
    assert [s[1].get("part") for s in steps[:-1] if s] == [None, 1, 2, 1, 2, 1, 1]
    end = steps[6]
    assert end is not None and end[1] == {"part": 1, "state": "complete", "value": {"x": 1}, "error": None}
    assert built.open_keys() == ["d"] and built.events == 7


@pytest.mark.parametrize(
    "item",
    [AppendPart("nobody", "x"), EndPart("nobody"), StartPart(key="t", kind="text"), 3.5],
)
def test_the_builder_refuses_what_does_not_fit(item: object) -> None:
    with pytest.raises(AdapterError) as refused:
        AnswerBuilder().event(item)  # type: ignore[arg-type]
    assert refused.value.code == "invalid_part"
