"""Database tables (Piccolo). Every row belongs, directly or through its
conversation, to one company; services always filter by it.

Indexes and constraints Piccolo cannot declare on a table (composite and
partial ones) are created by raw SQL in the initial migration; they are listed
in the docstring of the table they belong to.
"""

from __future__ import annotations

from enum import StrEnum

from piccolo.columns import (
    JSON,
    UUID,
    ForeignKey,
    Integer,
    OnDelete,
    Text,
    Timestamptz,
    Varchar,
)
from piccolo.columns.defaults.timestamptz import TimestamptzNow
from piccolo.table import Table


class Role(StrEnum):
    """What an API key may do in its company."""

    admin = "admin"
    member = "member"


class MessageRole(StrEnum):
    """Who wrote a message: a user, the agent, or a tool (a client's result for a tool call of the agent)."""

    user = "user"
    agent = "agent"
    tool = "tool"


class MessageStatus(StrEnum):
    """`partial`: an answer that was stopped and kept (partial policy `keep`)."""

    complete = "complete"
    partial = "partial"


class GenerationStatus(StrEnum):
    """Lifecycle of one agent answer."""

    running = "running"
    done = "done"
    cancelled = "cancelled"
    failed = "failed"
    interrupted = "interrupted"


class Company(Table):
    """A tenant. Nothing crosses from one company to another."""

    id = UUID(primary_key=True)
    name = Varchar(length=200)
    created_at = Timestamptz(default=TimestamptzNow())


class Agent(Table):
    """An AI agent of a company: which adapter answers, and its settings."""

    id = UUID(primary_key=True)
    company = ForeignKey(Company, on_delete=OnDelete.cascade, null=False, index=True)
    name = Varchar(length=200)
    adapter = Varchar(length=50, default="echo")
    config = JSON(default={})
    created_at = Timestamptz(default=TimestamptzNow())
    updated_at = Timestamptz(default=TimestamptzNow())


class ApiKey(Table, tablename="api_key"):
    """A credential. Only the sha256 of the token is stored; the token is shown once.

    `user_id` names the person the key acts for: several keys may share one.
    """

    id = UUID(primary_key=True)
    company = ForeignKey(Company, on_delete=OnDelete.cascade, null=False, index=True)
    name = Varchar(length=200)
    role = Varchar(length=10, choices=Role, default=Role.member)
    user_id = UUID()
    token_hash = Varchar(length=64, unique=True)
    # The first characters of the token, so that people can tell keys apart.
    token_prefix = Varchar(length=16)
    created_at = Timestamptz(default=TimestamptzNow())
    last_used_at = Timestamptz(null=True, default=None)
    revoked_at = Timestamptz(null=True, default=None)


class Session(Table, tablename="session"):
    """A browser's sign-in: the cookie carries an opaque token; only its sha256 is stored.

    It ends at `expires_at`, at sign-out (`ended_at`), or when its key is revoked.
    """

    id = UUID(primary_key=True)
    api_key = ForeignKey(ApiKey, on_delete=OnDelete.cascade, null=False, index=True)
    token_hash = Varchar(length=64, unique=True)
    created_at = Timestamptz(default=TimestamptzNow())
    expires_at = Timestamptz()
    last_used_at = Timestamptz(null=True, default=None)
    ended_at = Timestamptz(null=True, default=None)


class Conversation(Table):
    """A conversation between one user (its owner) and, optionally, an agent.

    `last_message_at` is the time of the latest activity (creation, then each new
    message); lists are ordered by it, newest first. Index (company, last_message_at).
    """

    id = UUID(primary_key=True)
    company = ForeignKey(Company, on_delete=OnDelete.cascade, null=False)
    owner_id = UUID(index=True)
    agent = ForeignKey(Agent, on_delete=OnDelete.set_null, null=True, default=None)
    title = Varchar(length=200, null=True, default=None)
    last_message_at = Timestamptz(default=TimestamptzNow())
    created_at = Timestamptz(default=TimestamptzNow())
    updated_at = Timestamptz(default=TimestamptzNow())


class Message(Table):
    """One message. Edits keep `content` and set `edited_content`/`edited_at`.

    Index (conversation, created_at); unique (conversation, client_message_id).
    `generation` is the answer that produced an agent message (a plain UUID:
    a foreign key both ways between message and generation would be circular).
    """

    id = UUID(primary_key=True)
    conversation = ForeignKey(Conversation, on_delete=OnDelete.cascade, null=False)
    role = Varchar(length=10, choices=MessageRole)
    author_id = UUID(null=True, default=None)
    content = Text()
    edited_content = Text(null=True, default=None)
    edited_at = Timestamptz(null=True, default=None)
    client_message_id = Varchar(length=100, null=True, default=None)
    generation = UUID(null=True, default=None)
    status = Varchar(length=10, choices=MessageStatus, default=MessageStatus.complete)
    created_at = Timestamptz(default=TimestamptzNow())
    # An agent message's answer as typed parts (app/streaming/parts.py), a tool message's
    # result; null for user messages and for answers stored before parts existed.
    parts = JSON(null=True, default=None)


class Generation(Table):
    """One agent answer and its metrics.

    Partial unique index on (conversation) where status = 'running': at most one
    running generation per conversation, enforced by the database.
    """

    id = UUID(primary_key=True)
    conversation = ForeignKey(Conversation, on_delete=OnDelete.cascade, null=False, index=True)
    reply_to = ForeignKey(Message, on_delete=OnDelete.set_null, null=True, default=None)
    agent = ForeignKey(Agent, on_delete=OnDelete.set_null, null=True, default=None)
    status = Varchar(length=12, choices=GenerationStatus, default=GenerationStatus.running)
    result_message = ForeignKey(Message, on_delete=OnDelete.set_null, null=True, default=None)
    # Tokens the model reported (its usage), else the number of pieces streamed.
    token_count = Integer(default=0)
    # `token` events sent: the terminal event's seq is chunk_count + 2 (after `start`).
    chunk_count = Integer(default=0)
    # Why the model stopped (`stop`, `length`, ...) when the answer completed.
    finish_reason = Varchar(length=32, null=True, default=None)
    ttft_ms = Integer(null=True, default=None)
    error = Text(null=True, default=None)
    started_at = Timestamptz(default=TimestamptzNow())
    finished_at = Timestamptz(null=True, default=None)
    # The server process producing it (`<redis prefix><process id>`, or `local:<id>`):
    # how the other processes find answers whose producer died.
    producer = Varchar(length=200, null=True, default=None)


TABLES: list[type[Table]] = [Company, Agent, ApiKey, Session, Conversation, Message, Generation]
