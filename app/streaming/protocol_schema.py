"""The WebSocket protocol as one JSON Schema document, for client developers.

`protocol_schema()` describes the three tagged unions a client deals with — the frames
it sends (`clientFrame`), the frames the server sends (`serverFrame`) and the
generation events the server forwards (`generationEvent`) — as three top-level entries
that reference shared definitions in `$defs`. It is generated from the msgspec structs
themselves, so it cannot disagree with the server.

Run `python -m app.streaming.protocol_schema` to write it to docs/protocol.schema.json
(`--check` only compares, exiting 1 when the file is stale). docs/protocol.md explains it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from app.streaming.events import GenerationEvent
from app.streaming.protocol import ClientFrame, ServerFrame

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "docs" / "protocol.schema.json"
REF_TEMPLATE = "#/$defs/{name}"
DIALECT = "https://json-schema.org/draft/2020-12/schema"

# Top-level entry -> (union, what it is). Order is the order of `schema_components`' answer.
UNIONS: dict[str, tuple[Any, str]] = {
    "clientFrame": (
        ClientFrame,
        "A frame the client sends (JSON text frame, or MessagePack binary frame with subprotocol "
        "`chatstream.msgpack`). Tagged by `type`. Unknown fields are refused.",
    ),
    "serverFrame": (
        ServerFrame,
        "A frame the server sends about the connection, the client's own frames and subscribed "
        "conversations. Tagged by `type`. Optional fields whose value is null are omitted.",
    ),
    "generationEvent": (
        GenerationEvent,
        "An event of one agent answer (generation), forwarded to subscribers of its conversation. "
        "Tagged by `type`; every event has `generationId`, `conversationId` and `seq`. An `error` "
        "frame with a `generationId` is this event, one without is a server `error` frame.",
    ),
}


def _schema_hook(cls: type) -> dict[str, Any]:
    """Schemas for types msgspec has no JSON Schema for: `object` (ErrorFrame.details) is any JSON value."""
    if cls is object:
        return {"description": "Any JSON value; its shape depends on the error `code` (see docs/protocol.md)."}
    raise NotImplementedError


def _tidy(node: Any) -> Any:
    """Descriptions come from docstrings: fold their line breaks and indentation into single spaces."""
    if isinstance(node, dict):
        return {
            k: " ".join(v.split()) if k == "description" and isinstance(v, str) else _tidy(v) for k, v in node.items()
        }
    if isinstance(node, list):
        return [_tidy(v) for v in node]
    return node


def protocol_schema() -> dict[str, Any]:
    """The protocol as one JSON Schema (draft 2020-12) document.

    Top-level `clientFrame`, `serverFrame` and `generationEvent` are discriminated unions
    (`anyOf` of `$ref`s into `$defs`, with an OpenAPI-style `discriminator` on `type`);
    every struct they use — frames, events, `MessageOut`, `GenerationOut`, … — is defined
    once in `$defs`. Note that `$defs/ErrorFrame` (server frame) and `$defs/Error`
    (generation event) share the tag `error`; they belong to different unions.
    """
    names = list(UNIONS)
    unions, components = msgspec.json.schema_components(
        [union for union, _ in UNIONS.values()],
        schema_hook=_schema_hook,
        ref_template=REF_TEMPLATE,
    )
    document: dict[str, Any] = {
        "$schema": DIALECT,
        "title": "chatstream WebSocket protocol (GET /api/ws)",
        "description": (
            "Frames of the chatstream WebSocket channel. `clientFrame`: what a client sends; "
            "`serverFrame`: what the server sends; `generationEvent`: the events of agent answers "
            "the server forwards. Field names are camelCase; UUIDs are strings; timestamps are "
            "RFC 3339 strings in JSON and MessagePack timestamps (extension type -1) in MessagePack. "
            "See docs/protocol.md."
        ),
        "$defs": _tidy(components),
    }
    for name, schema in zip(names, unions, strict=True):
        document[name] = {"description": UNIONS[name][1], **schema}
    return document


def render(schema: dict[str, Any]) -> str:
    """The document as committed: pretty-printed, sorted keys, trailing newline."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Write docs/protocol.schema.json; with `--check`, only tell whether it is up to date."""
    args = list(sys.argv[1:] if argv is None else argv)
    text = render(protocol_schema())
    if args == ["--check"]:
        current = SCHEMA_PATH.read_text(encoding="utf-8") if SCHEMA_PATH.exists() else None
        if current != text:
            print(f"{SCHEMA_PATH} is stale: run `python -m app.streaming.protocol_schema`", file=sys.stderr)
            return 1
        return 0
    if args:
        print("usage: python -m app.streaming.protocol_schema [--check]", file=sys.stderr)
        return 2
    SCHEMA_PATH.parent.mkdir(parents=True, exist_ok=True)
    SCHEMA_PATH.write_text(text, encoding="utf-8")
    print(f"wrote {SCHEMA_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
