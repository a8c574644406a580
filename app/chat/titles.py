"""Server-made conversation titles: a conversation without a title is named after its
first user message (issue #17, point 5), once; a title set by anyone is never replaced."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from uuid import UUID

from app.chat.conversations import conversation_out
from app.db import columns_of
from app.streaming.records import ConversationOut
from app.tables import Conversation

# At most this many characters, the ellipsis included: what fits a conversation list row.
TITLE_CHARS = 60
ELLIPSIS = "…"
# A long first line ends at its first sentence when that sentence is at least this long
# (shorter ones, "Hi!" or "Dr.", make a poor title: the line is cut at a word instead).
MIN_SENTENCE_CHARS = 20
# The end of a sentence: `.`, `!` or `?` followed by whitespace ("3.5" is no end).
_SENTENCE_END = re.compile(r"[.!?](?=\s)")


# Markdown marks that read as noise in a plain-text title: a heading's, quote's or list
# item's mark at the start of the line, and emphasis or code marks around words.
_LINE_MARK = re.compile(r"^\s*(?:#{1,6}|>|[-*+]|\d+[.)])\s+")
_EMPHASIS = re.compile(r"(\*\*|__|`+|~~)(?=\S)(.+?)(?<=\S)\1")


def plain(line: str) -> str:
    """A line of markdown as plain text for a title: "## **Plan** a `trip`" -> "Plan a trip"."""
    return _EMPHASIS.sub(r"\2", _LINE_MARK.sub("", line))


def title_from(content: str) -> str:
    """The title a message gives its conversation: its first non-blank line as plain text
    (markdown marks removed), whitespace collapsed; when longer than :data:`TITLE_CHARS`, its
    first sentence if that fits, else cut at a word boundary with "…". Never empty for
    content that is not blank."""
    lines = (" ".join(plain(part).split()) or " ".join(part.split()) for part in content.splitlines())
    line = next((text for text in lines if text), "")
    if len(line) <= TITLE_CHARS:
        return line
    # endpos one past the limit: the lookahead may see the character after a full stop at the limit.
    sentence = _SENTENCE_END.search(line, MIN_SENTENCE_CHARS - 1, TITLE_CHARS + 1)
    if sentence is not None:
        return line[: sentence.end()]
    room = TITLE_CHARS - len(ELLIPSIS)
    # The last space with room for the word before it (`line[room]` being a space counts too).
    space = line.rfind(" ", 0, room + 1)
    head = (line[:space] if space > 0 else "").rstrip(" ,;:-")
    return (head or line[:room]) + ELLIPSIS  # no space in reach (a long URL): cut inside the word


# Only while the title is still null: a title set meanwhile (PATCH, a concurrent first
# message) wins. Arguments: the title, the time, the conversation.
_SET_IF_UNTITLED = (
    'UPDATE "conversation" SET "title" = {}, "updated_at" = {} WHERE "id" = {} AND "title" IS NULL '
    f"RETURNING {columns_of(Conversation)}"
)


async def title_if_untitled(conversation_id: UUID, content: str) -> ConversationOut | None:
    """Name the conversation after `content` if it still has no title (one statement).
    Returns the conversation as changed, or None when it had a title (or is gone)."""
    title = title_from(content)
    if not title:  # blank content is refused before it gets here; no empty title either way
        return None
    rows = await Conversation.raw(_SET_IF_UNTITLED, title, datetime.now(UTC), conversation_id)
    return conversation_out(rows[0]) if rows else None
