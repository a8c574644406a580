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

import jsonschema_rs
import msgspec
import pytest

import app.streaming.ws as ws
from app.config import ENV
from app.streaming import adapters, answer_builder
from app.streaming.events import ANSWER_ERROR_CODES, CANCEL_REASONS, GenerationEvent
from app.streaming.protocol import FRAME_ERROR_CODES, ClientFrame, ServerFrame, json_client_decoder
from app.streaming.protocol_schema import ASYNCAPI_PATH, SCHEMA_PATH, UNIONS, documents, protocol_schema

DOCS = SCHEMA_PATH.parent / "protocol.md"
REGENERATE = "run `python -m app.streaming.protocol_schema` and commit docs/protocol.schema.json and docs/asyncapi.json"

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


def test_committed_documents_are_formatted_as_generated() -> None:
    for path, text in documents().items():
        assert path.read_text(encoding="utf-8") == text, f"{path.name} is not as generated: {REGENERATE}"


def test_the_asyncapi_document_has_every_frame_and_close_code() -> None:
    document = json.loads(ASYNCAPI_PATH.read_text(encoding="utf-8"))
    assert document["asyncapi"] == "3.1.0"
    assert document["components"]["schemas"] == json.loads(
        json.dumps(protocol_schema()["$defs"]).replace("#/$defs/", "#/components/schemas/")
    )
    operations = document["operations"]
    received = {ref["$ref"].rsplit("/", 1)[1] for ref in operations["receiveClientFrames"]["messages"]}
    sent = {ref["$ref"].rsplit("/", 1)[1] for ref in operations["sendServerFrames"]["messages"]}
    assert received == {cls.__name__ for cls in get_args(ClientFrame)}
    assert sent == {cls.__name__ for union in (ServerFrame, GenerationEvent) for cls in get_args(union)}
    close_codes = {entry["code"] for entry in document["channels"]["chat"]["x-close-codes"]}
    documented = set(map(int, re.findall(r"^\| (\d{4}) \|", section("## Close codes"), flags=re.M)))
    assert close_codes == documented


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


def section(title: str) -> str:
    """The text of one `## `/`### ` section of docs/protocol.md (up to the next heading of any level)."""
    text = DOCS.read_text(encoding="utf-8")
    start = text.index(f"\n{title}\n")
    following = re.search(r"^#{2,3} ", text[start + len(title) + 2 :], flags=re.M)
    return text[start : start + len(title) + 2 + (following.start() if following else len(text))]


def table_codes(text: str) -> set[str]:
    """The codes in the first column of the markdown tables of `text` (not its tables of fields)."""
    codes: set[str] = set()
    for table in re.findall(r"(?:^\|.*\n)+", text, flags=re.M):
        header, _, *rows = table.splitlines()
        if not header.startswith("| field "):
            codes |= {match.group(1) for row in rows if (match := re.match(r"\| `([a-z_]+)`", row))}
    return codes


def test_the_closed_sets_of_the_schema_are_the_documented_ones() -> None:
    errors = section("## Error codes")
    http_only = {code for code in table_codes(errors) if re.search(rf"^\| `{code}` \| HTTP only", errors, flags=re.M)}
    assert table_codes(errors) - http_only == set(FRAME_ERROR_CODES)
    assert table_codes(section("### `error` (generation event)")) == set(ANSWER_ERROR_CODES)
    assert table_codes(section("### `cancelled`")) == set(CANCEL_REASONS)
    defs = protocol_schema()["$defs"]
    assert defs["ErrorFrame"]["properties"]["code"]["enum"] == list(FRAME_ERROR_CODES)
    assert defs["Error"]["properties"]["code"]["enum"] == list(ANSWER_ERROR_CODES)
    assert defs["Cancelled"]["properties"]["reason"]["enum"] == list(CANCEL_REASONS)


def test_adapters_fail_only_with_documented_codes() -> None:
    sources = [*Path(adapters.__file__).parent.glob("*.py"), Path(answer_builder.__file__)]
    codes = {code for path in sources for code in re.findall(r'AdapterError\(\s*"([a-z_]+)"', path.read_text())}
    assert {"upstream_timeout", "invalid_part", "api_key_missing"} <= codes
    assert codes <= set(ANSWER_ERROR_CODES), sorted(codes - set(ANSWER_ERROR_CODES))


def validator(union: str) -> jsonschema_rs.Validator:
    document = protocol_schema()
    return jsonschema_rs.Draft202012Validator({"$defs": document["$defs"], **document[union]}, validate_formats=True)


def test_the_docs_examples_match_the_schema() -> None:
    for frame in examples():
        errors = [error.message for error in validator(kind(frame)).iter_errors(frame)]
        assert not errors, f"docs/protocol.md example {frame} does not match the schema: {errors}"


GID, CID = "a0027643-1198-460d-8eda-923f863a4b51", "f455e359-7f0b-444f-9c31-7f6f45f1664b"
IDS = {"generationId": GID, "conversationId": CID, "seq": 2}


@pytest.mark.parametrize(
    ("union", "frame"),
    [
        ("generationEvent", {"type": "token", "text": "", **IDS}),  # a token is never empty
        ("generationEvent", {"type": "token", **IDS}),  # nor missing
        ("generationEvent", {"type": "cancelled", "reason": "bored", "messageId": None, **IDS}),
        ("generationEvent", {"type": "cancelled", "reason": "user", **IDS}),  # `messageId` is always there
        (
            "generationEvent",
            {"type": "error", "code": "oops", "message": "m", "messageId": None, "retryAfter": None, **IDS},
        ),
        ("serverFrame", {"type": "error", "code": "oops", "message": "m"}),
        ("serverFrame", {"type": "conversation.activity", "conversationId": CID, "lastMessageAt": "yesterday"}),
        (
            "serverFrame",
            {"type": "conversation.activity", "conversationId": "c1", "lastMessageAt": "2026-12-07T01:02:03Z"},
        ),
    ],
)
def test_the_schema_refuses_what_the_server_never_sends(union: str, frame: dict[str, Any]) -> None:
    assert not validator(union).is_valid(frame)
    assert validator("serverFrame").is_valid(
        {"type": "conversation.activity", "conversationId": CID, "lastMessageAt": "2026-12-07T01:02:03.5+00:00"}
    )
