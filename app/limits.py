"""Size limits that are part of the API contract (see DESIGN.md)."""

MAX_CONTENT_CHARS = 50_000
MAX_TITLE_CHARS = 200
MAX_NAME_CHARS = 200
MAX_CLIENT_MESSAGE_ID_CHARS = 100
# A tool call id; its result is stored under clientMessageId `tool:<id>`, so it fits in one.
MAX_TOOL_CALL_ID_CHARS = 95
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 100
