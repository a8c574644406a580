"""The WebSocket protocol as one JSON Schema document, for client developers.

`protocol_schema()` describes the three tagged unions a client deals with — the frames
it sends (`clientFrame`), the frames the server sends (`serverFrame`) and the
generation events the server forwards (`generationEvent`) — as three top-level entries
that reference shared definitions in `$defs`. It is generated from the msgspec structs
themselves, so it cannot disagree with the server.

Run `python -m app.streaming.protocol_schema` to write it to docs/protocol.schema.json, and
the AsyncAPI document made from it (app/streaming/asyncapi.py) to docs/asyncapi.json
(`--check` only compares, exiting 1 when a file is stale). docs/protocol.md explains them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from app.streaming import asyncapi
from app.streaming.events import GenerationEvent
from app.streaming.protocol import ClientFrame, ServerFrame

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "docs" / "protocol.schema.json"
ASYNCAPI_PATH = SCHEMA_PATH.with_name("asyncapi.json")
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


def _server_structs() -> list[type[msgspec.Struct]]:
    """Every struct the server sends: its frames, the generation events and what they carry."""
    found: dict[type[msgspec.Struct], None] = {}

    def visit(info: msgspec.inspect.Type) -> None:
        if isinstance(info, msgspec.inspect.StructType):
            if info.cls in found:
                return
            found[info.cls] = None
            for field in info.fields:
                visit(field.type)
        for attribute in ("types", "item_type", "key_type", "value_type"):  # unions, lists, dicts
            child = getattr(info, attribute, None)
            for each in child if isinstance(child, tuple) else (child,) if child is not None else ():
                visit(each)

    for info in msgspec.inspect.multi_type_info([ServerFrame, GenerationEvent]):
        visit(info)
    return list(found)


def _always_present(defs: dict[str, Any]) -> None:
    """msgspec calls a field with a default optional, which is right for what a client sends.
    What the server sends has every field on the wire unless its struct omits defaults (the
    server frames omit their null optional fields): mark those fields required."""
    for cls in _server_structs():
        definition = defs.get(cls.__name__)
        if definition is None or cls.__struct_config__.omit_defaults:
            continue
        definition["required"] = list(definition.get("properties", {}))


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
    _always_present(document["$defs"])
    for name, schema in zip(names, unions, strict=True):
        document[name] = {"description": UNIONS[name][1], **schema}
    return document


def render(schema: dict[str, Any]) -> str:
    """The document as committed: pretty-printed, sorted keys, trailing newline."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def documents() -> dict[Path, str]:
    """The committed documents, path -> text: the JSON Schema and the AsyncAPI document made from it."""
    schema = protocol_schema()
    return {SCHEMA_PATH: render(schema), ASYNCAPI_PATH: asyncapi.render(asyncapi.asyncapi_document(schema))}


def main(argv: Sequence[str] | None = None) -> int:
    """Write docs/protocol.schema.json and docs/asyncapi.json; with `--check`, only tell whether they are up to date."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args not in ([], ["--check"]):
        print("usage: python -m app.streaming.protocol_schema [--check]", file=sys.stderr)
        return 2
    stale = 0
    for path, text in documents().items():
        if args == ["--check"]:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                print(f"{path} is stale: run `python -m app.streaming.protocol_schema`", file=sys.stderr)
                stale = 1
            continue
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    return stale


if __name__ == "__main__":
    raise SystemExit(main())
