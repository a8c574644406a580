"""Request and response bodies of the agent routes."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

import msgspec

from app.text_types import Name

# The adapters this server can run (app/streaming/adapters): `echo` repeats the user's
# message word by word; `openai` asks an OpenAI-compatible model server.
AdapterName = Literal["echo", "openai"]


class AgentCreate(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    name: Name
    adapter: AdapterName = "echo"
    config: dict[str, Any] = msgspec.field(default_factory=dict)


class AgentUpdate(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    """Only the fields sent are changed."""

    name: Name | msgspec.UnsetType = msgspec.UNSET
    adapter: AdapterName | msgspec.UnsetType = msgspec.UNSET
    config: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET


class AgentOut(msgspec.Struct, rename="camel"):
    id: UUID
    name: str
    adapter: str
    config: dict[str, Any]
    created_at: datetime
    updated_at: datetime


class AgentListed(msgspec.Struct, rename="camel"):
    """An agent as listed. `config` (model server URL, system prompt, key variable...) is
    the admins' business: it is `null` unless the caller is an admin."""

    id: UUID
    name: str
    adapter: str
    config: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime
