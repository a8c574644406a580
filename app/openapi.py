"""OpenAPI documentation of error responses: every route lists the errors it can give,
all in the project's error shape (Litestar would otherwise document its own)."""

from __future__ import annotations

import msgspec
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPI, OpenAPIType, Reference, Schema

from app.errors import ErrorBody

_DESCRIPTIONS = {
    400: "Malformed JSON or invalid input; `details` lists each field and why",
    401: "Missing, unknown or revoked API key",
    403: "The caller's role does not allow this",
    404: "No such resource for this caller (other tenants' rows are not found either)",
    409: "Conflicts with the current state",
    413: "Request body or a field is too large",
    429: "Too many messages from this key; retry after `Retry-After` seconds",
    503: "Not ready",
}


def errors(*statuses: int, authenticated: bool = True) -> dict[int, ResponseSpec]:
    """`responses=` for a route: the given error statuses, 400 (any request can be malformed)
    and 401 when it needs a key."""
    codes = sorted({400, *statuses, *((401,) if authenticated else ())})
    return {
        code: ResponseSpec(data_container=ErrorBody, description=_DESCRIPTIONS[code], generate_examples=False)
        for code in codes
    }


def nothing_to_stream(description: str) -> dict[int, ResponseSpec]:
    """`responses=` entry for a stream route that answers 204 (no body) when nothing runs."""
    return {204: ResponseSpec(None, description=description)}


def _structs(base: type[msgspec.Struct] = msgspec.Struct) -> dict[str, type[msgspec.Struct]]:
    """Every struct class defined in `app`, by name (as Litestar names its schema)."""
    found: dict[str, type[msgspec.Struct]] = {}
    sub: type[msgspec.Struct]
    for sub in base.__subclasses__():
        if sub.__module__.startswith("app."):
            found[sub.__name__] = sub
        found.update(_structs(sub))
    return found


def close_request_bodies(document: OpenAPI) -> None:
    """Say `additionalProperties: false` of each request body whose struct refuses unknown fields
    (an extra field is a 400 `invalid_request`): Litestar leaves it out, and client generators
    and fuzzers then send fields the server refuses. Response schemas stay open, so that clients
    keep working when a response gains a field. A body that may be left out (`T | None`) is
    documented as not required."""
    structs = _structs()
    components = document.components.schemas if document.components and document.components.schemas else {}
    for item in (document.paths or {}).values():
        for operation in (item.post, item.put, item.patch):
            body = operation.request_body if operation is not None else None
            if body is None or isinstance(body, Reference):
                continue
            for media in (body.content or {}).values():
                # `JSONBody[T | None] = None` is documented as `oneOf: [T, null]`: the body may be
                # left out altogether (Litestar says `required` of every body).
                options = (
                    media.schema.one_of if isinstance(media.schema, Schema) and media.schema.one_of else [media.schema]
                )
                if any(isinstance(option, Schema) and option.type == OpenAPIType.NULL for option in options):
                    body.required = False
                for option in options:
                    ref = option.ref if isinstance(option, Reference) else None
                    name = ref.rsplit("/", 1)[-1] if ref else None
                    struct = structs.get(name or "")
                    schema = components.get(name or "")
                    if (
                        struct is not None
                        and isinstance(schema, Schema)
                        and struct.__struct_config__.forbid_unknown_fields
                    ):
                        schema.additional_properties = False
