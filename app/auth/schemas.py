"""Request and response bodies of the auth routes (session, me, keys)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated
from uuid import UUID

import msgspec

from app.tables import Role
from app.text_types import Name


class SessionCreate(msgspec.Struct, forbid_unknown_fields=True):
    """Exchange an API key for a session cookie."""

    key: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class CompanyRef(msgspec.Struct, rename="camel"):
    id: UUID
    name: str


class KeyRef(msgspec.Struct, rename="camel"):
    id: UUID
    name: str


class Me(msgspec.Struct, rename="camel"):
    """The caller, as `GET /api/me` shows it."""

    user_id: UUID
    role: Role
    company: CompanyRef
    key: KeyRef


class ApiKeyCreate(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    """A new key. Omit `userId` to create a key for a new user; pass one to add a key to a user."""

    name: Name
    role: Role = Role.member
    user_id: UUID | None = None


class ApiKeyOut(msgspec.Struct, rename="camel"):
    """An API key as listed; the token itself is never shown again."""

    id: UUID
    name: str
    role: Role
    user_id: UUID
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyOut):
    """A key just created: the only response that carries its `token`."""

    token: str


class TokenCreate(msgspec.Struct, forbid_unknown_fields=True):
    """Ask for an access token; `ttl` (seconds) shortens its life below the server's
    `CHATSTREAM_TOKEN_TTL` (a longer one is cut to it)."""

    ttl: Annotated[int, msgspec.Meta(ge=1, le=86400)] | None = None


class AccessToken(msgspec.Struct, rename="camel"):
    """A short-lived access token: send it as `Authorization: Bearer <token>` until `expiresAt`
    (`expiresIn` seconds from now)."""

    token: str
    token_type: str
    expires_at: datetime
    expires_in: int
