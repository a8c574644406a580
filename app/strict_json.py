"""JSON request bodies decoded strictly, into the type the handler declares.

Litestar decodes a body to plain Python values and then converts them to the handler's
`data` type leniently (the same conversion that turns query strings into numbers), so
`{"reply": 0}` passed as `false` and `{"limit": "5"}` as 5, although the OpenAPI document
says a boolean or an integer. Decoding the bytes straight into the declared msgspec type
in strict mode refuses them with the usual 400 `invalid_request`; query and path
parameters stay lenient (they are text on the wire).
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request
from litestar.exceptions import ValidationException


class StrictJSONRequest(Request[Any, Any, Any]):
    """A request whose `json()` is the body decoded strictly into the handler's `data` type."""

    async def json(self) -> Any:
        """The body as the handler's `data` type (a 400 if it is not one); else as Litestar reads it."""
        field = self.route_handler.parsed_data_field
        body = await self.body()
        if field is None or not body:
            return await super().json()
        try:
            return msgspec.json.decode(body, type=field.annotation, strict=True)
        except msgspec.ValidationError as exc:
            # The shape Litestar gives its own validation errors (app/exception_handlers.py reads it).
            raise ValidationException(extra=[{"message": str(exc), "key": "data", "source": "body"}]) from None
        except msgspec.DecodeError:
            return await super().json()  # not JSON at all: Litestar's error for that
