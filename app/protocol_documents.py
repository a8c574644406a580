"""The WebSocket protocol's machine-readable documents, served next to the OpenAPI document:
`/schema/asyncapi.json` (AsyncAPI 3.1) and `/schema/protocol.json` (JSON Schema of every frame).
Made from the protocol structs once, when first asked for (the same text as docs/)."""

from __future__ import annotations

from functools import cache

from litestar import Response, get

from app.streaming.protocol_schema import ASYNCAPI_PATH, SCHEMA_PATH, documents


@cache
def _documents() -> dict[str, bytes]:
    """Both documents by file name, made once (on the first request for either)."""
    return {path.name: text.encode() for path, text in documents().items()}


@get("/schema/asyncapi.json", include_in_schema=False, sync_to_thread=False)
def asyncapi_json() -> Response[bytes]:
    """The AsyncAPI document of `/api/ws`."""
    return Response(_documents()[ASYNCAPI_PATH.name], media_type="application/json")


@get("/schema/protocol.json", include_in_schema=False, sync_to_thread=False)
def protocol_json() -> Response[bytes]:
    """The JSON Schema of the frames of `/api/ws`."""
    return Response(_documents()[SCHEMA_PATH.name], media_type="application/json")
