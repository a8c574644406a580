"""docs/protocol.schema.json and docs/protocol.md stay in step with the protocol structs.

- The committed schema is exactly what `protocol_schema()` generates.
- Every client frame, server frame and generation event has an example in protocol.md,
  and every example there is a frame the server would send or accept, field for field.
- The close codes, the WebSocket settings and the error frame codes are documented.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, get_args

import msgspec
import pytest

import app.streaming.ws as ws
from app.config import ENV
from app.streaming.events import GenerationEvent
from app.streaming.protocol import ClientFrame, ServerFrame, json_client_decoder
from app.streaming.protocol_schema import SCHEMA_PATH, UNIONS, protocol_schema, render

DOCS = SCHEMA_PATH.parent / "protocol.md"
REGENERATE = "run `python -m app.streaming.protocol_schema` and commit docs/protocol.schema.json"

server_decoder = msgspec.json.Decoder(ServerFrame)
event_decoder = msgspec.json.Decoder(GenerationEvent)


def tags(union: Any) -> set[str]:
    """The `type` values of a tagged union of structs."""
    return {member.__struct_config__.tag for member in get_args(union)}


CLIENT_TAGS, SERVER_TAGS, EVENT_TAGS = tags(ClientFrame), tags(ServerFrame), tags(GenerationEvent)


def examples(path: Path = DOCS) -> list[dict[str, Any]]:
    """The frames shown in the document: each ```json block is one frame, each line of a ```jsonl block is one."""
    text = path.read_text(encoding="utf-8")
    frames: list[dict[str, Any]] = []
    for lang, body in re.findall(r"^```(jsonl?)\n(.*?)^```$", text, flags=re.M | re.S):
        chunks = [line for line in body.splitlines() if line.strip()] if lang == "jsonl" else [body]
        frames.extend(json.loads(chunk) for chunk in chunks)
    return frames


def kind(frame: dict[str, Any]) -> str:
    """Which union a frame belongs to. `error` is a generation event when it has `generationId`."""
    tag = frame.get("type")
    if tag == "error":
        return "generationEvent" if "generationId" in frame else "serverFrame"
    if tag in CLIENT_TAGS:
        return "clientFrame"
    if tag in SERVER_TAGS:
        return "serverFrame"
    if tag in EVENT_TAGS:
        return "generationEvent"
    raise AssertionError(f"docs/protocol.md shows a frame of unknown type {tag!r}: {frame}")


def test_committed_schema_is_the_generated_one() -> None:
    assert SCHEMA_PATH.exists(), f"{SCHEMA_PATH} is missing: {REGENERATE}"
    committed = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    assert committed == protocol_schema(), f"docs/protocol.schema.json is stale: {REGENERATE}"


def test_committed_schema_is_formatted_as_generated() -> None:
    assert SCHEMA_PATH.read_text(encoding="utf-8") == render(protocol_schema()), (
        f"docs/protocol.schema.json is not formatted as generated: {REGENERATE}"
    )


def test_schema_has_three_unions_over_shared_definitions() -> None:
    schema = protocol_schema()
    defs = schema["$defs"]
    for name, (union, _) in UNIONS.items():
        entry = schema[name]
        refs = [option["$ref"] for option in entry["anyOf"]]
        assert all(ref.startswith("#/$defs/") and ref.removeprefix("#/$defs/") in defs for ref in refs)
        assert set(entry["discriminator"]["mapping"]) == tags(union)
    # The two `error` structs are distinct definitions in distinct unions.
    assert schema["serverFrame"]["discriminator"]["mapping"]["error"] == "#/$defs/ErrorFrame"
    assert schema["generationEvent"]["discriminator"]["mapping"]["error"] == "#/$defs/Error"
    assert "generationId" in defs["Error"]["required"]
    assert "generationId" not in defs["ErrorFrame"]["properties"]
    # Embedded objects are shared, not inlined.
    assert {"MessageOut", "GenerationOut", "ConversationOut"} <= set(defs)


@pytest.mark.parametrize(
    ("union_name", "all_tags"),
    [("clientFrame", CLIENT_TAGS), ("serverFrame", SERVER_TAGS), ("generationEvent", EVENT_TAGS)],
)
def test_docs_show_every_frame(union_name: str, all_tags: set[str]) -> None:
    text = DOCS.read_text(encoding="utf-8")
    missing_mentions = sorted(tag for tag in all_tags if f"`{tag}`" not in text)
    assert not missing_mentions, f"docs/protocol.md never mentions {missing_mentions}"
    shown = {frame["type"] for frame in examples() if kind(frame) == union_name}
    missing = sorted(all_tags - shown)
    assert not missing, f"docs/protocol.md has no ```json example of the {union_name} type(s) {missing}"


def test_docs_examples_are_real_frames() -> None:
    """Client examples decode (unknown fields are refused); server examples are what the server
    would encode: decoding and re-encoding one gives it back unchanged (no missing, extra or
    misspelled field, and no `null` where the server omits the field)."""
    frames = examples()
    assert len(frames) >= len(CLIENT_TAGS | SERVER_TAGS | EVENT_TAGS)
    for frame in frames:
        raw = json.dumps(frame)
        if kind(frame) == "clientFrame":
            json_client_decoder.decode(raw)
            continue
        decoder = event_decoder if kind(frame) == "generationEvent" else server_decoder
        decoded = decoder.decode(raw)
        assert msgspec.to_builtins(decoded) == frame, f"docs/protocol.md example differs from the server's frame: {raw}"


def test_docs_name_every_close_code_and_setting() -> None:
    text = DOCS.read_text(encoding="utf-8")
    codes = {value for name, value in vars(ws).items() if name.startswith("CLOSE_") and isinstance(value, int)}
    assert codes, "no CLOSE_* codes found in app/streaming/ws.py"
    for code in sorted(codes | {1000, 1009, 1011}):
        assert f"| {code} |" in text, f"close code {code} has no row in the close code table of docs/protocol.md"
    settings = sorted(var for field, var in ENV.items() if field.startswith("ws_"))
    missing = [var for var in settings if var not in text]
    assert not missing, f"docs/protocol.md does not mention {missing}"


def test_docs_list_every_error_code_the_transport_sends() -> None:
    """Codes written literally in ws.py (`code="…"`, or the first argument of `_violation`)."""
    source = Path(ws.__file__).read_text(encoding="utf-8")
    literal = set(re.findall(r'code="([a-z_]+)"', source))
    violations = set(re.findall(r'_violation\([^,]+, "([a-z_]+)"', source))
    branches = set(re.findall(r'"([a-z_]+)" if "\$\.type"', source)) | set(re.findall(r'else "([a-z_]+)"', source))
    codes = literal | violations | branches
    assert {"too_slow", "frame_too_large", "rate_limited", "malformed_frame", "invalid_frame"} <= codes
    text = DOCS.read_text(encoding="utf-8")
    missing = sorted(code for code in codes if f"| `{code}` |" not in text)
    assert not missing, f"the error code table of docs/protocol.md has no row for {missing}"
