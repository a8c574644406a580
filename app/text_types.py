"""String types shared by request schemas.

PostgreSQL text cannot hold a NUL character (SQLite can): every string a client
sends to be stored is refused with a 400 if it contains one, on both engines alike.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from app.limits import MAX_CLIENT_MESSAGE_ID_CHARS, MAX_NAME_CHARS, MAX_TOOL_CALL_ID_CHARS

NO_NUL_PATTERN = "^[^\x00]*$"

# Longer content and titles are refused by the services with 413 naming the field,
# so these types ask only for a non-empty string without NUL.
Text = Annotated[str, msgspec.Meta(min_length=1, pattern=NO_NUL_PATTERN)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_CHARS, pattern=NO_NUL_PATTERN)]
ClientMessageId = Annotated[
    str, msgspec.Meta(min_length=1, max_length=MAX_CLIENT_MESSAGE_ID_CHARS, pattern=NO_NUL_PATTERN)
]
# A tool call's id as the model gave it (the stored result is keyed by it).
ToolCallId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TOOL_CALL_ID_CHARS, pattern=NO_NUL_PATTERN)]
