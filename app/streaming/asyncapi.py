"""The WebSocket channel `/api/ws` as an AsyncAPI 3.1 document, for client generators and tools.

Made from the same msgspec structs as docs/protocol.schema.json (`protocol_schema()`'s
`$defs` are its `components.schemas`), so the two cannot disagree. It describes the server:
it *receives* client frames and *sends* server frames and generation events on one channel.
Written to docs/asyncapi.json with the JSON Schema (`python -m app.streaming.protocol_schema`)
and served at `/schema/asyncapi.json`.
"""

from __future__ import annotations

import json
from typing import Any, get_args

import msgspec

from app.streaming.events import GenerationEvent
from app.streaming.protocol import MSGPACK_SUBPROTOCOL, PROTOCOL_VERSION, ClientFrame, ServerFrame

CHANNEL = "chat"
# Close codes a client may see (docs/protocol.md, Close codes): code -> (who, meaning).
CLOSE_CODES: dict[int, str] = {
    1000: "normal closure by the client (the server echoes it; it never closes with 1000 on its own)",
    1006: "not sent: client libraries report it when the connection was lost without a close frame",
    1007: "a text frame was not valid UTF-8",
    1008: "policy violation: 5 violations in a row (reason `too many invalid frames (<code>)`)",
    1009: "a frame over 4 x CHATSTREAM_WS_MAX_FRAME_BYTES",
    1011: "keepalive timeout: the client did not answer a protocol ping in time",
    1012: "the server is restarting or stopping (running answers were cancelled first, reason `shutdown`)",
    1013: (
        "try again later: too slow, broker or database unreachable, or too many sockets "
        "(after an `error` frame saying which, with `retryAfter`)"
    ),
    4401: (
        "not authenticated, or the credentials were revoked (after an `error` `credentials_revoked`), or the "
        "access token expired without a `refresh` (after an `error` `token_expired`)"
    ),
    4403: "cookie authentication from an origin that is not allowed",
    4500: "an unexpected server failure while setting up the socket",
}
# The message names of each union, in the union's order (struct names: `ErrorFrame` is the
# server's `error` frame, `Error` the generation event with the same tag).
UNIONS = {"receive": ClientFrame, "send": (ServerFrame, GenerationEvent)}


def _members(union: Any) -> list[type[msgspec.Struct]]:
    return [member for part in (union if isinstance(union, tuple) else (union,)) for member in get_args(part)]


def _rewritten(node: Any) -> Any:
    """JSON Schema `$ref`s into `$defs` become AsyncAPI's into `components.schemas`."""
    if isinstance(node, dict):
        return {
            key: value.replace("#/$defs/", "#/components/schemas/") if key == "$ref" else _rewritten(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_rewritten(value) for value in node]
    return node


def _message(cls: type[msgspec.Struct], schemas: dict[str, Any]) -> dict[str, Any]:
    tag = cls.__struct_config__.tag
    message: dict[str, Any] = {
        "name": tag,
        "title": f"{tag} ({cls.__name__})",
        "payload": {"$ref": f"#/components/schemas/{cls.__name__}"},
    }
    description = schemas[cls.__name__].get("description")
    if description:
        message["summary"] = description
    return message


def asyncapi_document(schema: dict[str, Any]) -> dict[str, Any]:
    """The AsyncAPI 3.1 document of `/api/ws`, from the protocol's JSON Schema document."""
    schemas = _rewritten(schema["$defs"])
    messages = {cls.__name__: _message(cls, schemas) for union in UNIONS.values() for cls in _members(union)}
    channel_messages = {name: {"$ref": f"#/components/messages/{name}"} for name in messages}

    def operation(action: str, summary: str) -> dict[str, Any]:
        return {
            "action": action,
            "summary": summary,
            "channel": {"$ref": f"#/channels/{CHANNEL}"},
            "messages": [{"$ref": f"#/channels/{CHANNEL}/messages/{cls.__name__}"} for cls in _members(UNIONS[action])],
        }

    close_codes = [{"code": code, "meaning": meaning} for code, meaning in CLOSE_CODES.items()]
    return {
        "asyncapi": "3.1.0",
        "info": {
            "title": "chatstream WebSocket protocol",
            "version": PROTOCOL_VERSION,
            "description": (
                "One WebSocket per client at `/api/ws`: the client subscribes to conversations, sends "
                "messages, tool results and cancels; the server sends acks, errors, conversation events "
                "and the events of agent answers (resumable with cursors). This document describes the "
                "server: it receives client frames and sends server frames and generation events. "
                "Frames are JSON text frames, or MessagePack binary frames with the subprotocol "
                f"`{MSGPACK_SUBPROTOCOL}` (same fields). The prose, with examples, is docs/protocol.md; "
                "the same structs as one JSON Schema are docs/protocol.schema.json."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {
                "host": "127.0.0.1:8000",
                "protocol": "ws",
                "description": "`chatstream serve` on this machine; use `wss` behind TLS in production",
                "security": [{"$ref": "#/components/securitySchemes/apiKey"}],
            }
        },
        "channels": {
            CHANNEL: {
                "address": "/api/ws",
                "title": "The chat socket",
                "description": (
                    "Authenticated on the upgrade request (`Authorization: Bearer <access token or api key>`, or a "
                    "browser's session cookie); refused credentials close the socket at once with 4401 or 4403. "
                    "Close codes are listed in `x-close-codes`."
                ),
                "messages": channel_messages,
                "bindings": {
                    "ws": {
                        "method": "GET",
                        "headers": {
                            "type": "object",
                            "properties": {
                                "Authorization": {
                                    "type": "string",
                                    "description": "`Bearer <access token>` (apps) or `Bearer <api key>`",
                                },
                                "Sec-WebSocket-Protocol": {
                                    "type": "string",
                                    "enum": [MSGPACK_SUBPROTOCOL],
                                    "description": "ask for MessagePack binary frames instead of JSON text frames",
                                },
                            },
                        },
                        "bindingVersion": "0.1.0",
                    }
                },
                "x-close-codes": close_codes,
            }
        },
        "operations": {
            "receiveClientFrames": operation("receive", "Frames a client sends"),
            "sendServerFrames": operation("send", "Frames and answer events the server sends"),
        },
        "components": {
            "schemas": schemas,
            "messages": messages,
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": (
                        "An access token (POST /api/tokens; a socket opened with one gets `token_expiring` and "
                        "continues with `refresh`) or an API key, in the upgrade request's Authorization header"
                    ),
                }
            },
        },
    }


def render(document: dict[str, Any]) -> str:
    """The document as committed: pretty-printed, sorted keys, trailing newline."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
