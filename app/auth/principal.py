"""Who is calling: resolved from an API key or a browser session on every request."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

import msgspec

from app.tables import Role


class Principal(msgspec.Struct, frozen=True):
    """The caller: a user acting in one company with one role, through one key, and
    through one browser session when the session cookie authenticated it (valid until
    `expires_at`). When a short-lived access token authenticated it (app/auth/access_tokens.py),
    `token_issued_at` and `token_expires_at` are the token's; `session_id` is then the session
    the token was traded for, if any."""

    key_id: UUID
    user_id: UUID
    company_id: UUID
    role: Role
    session_id: UUID | None = None
    expires_at: datetime | None = None
    token_issued_at: datetime | None = None
    token_expires_at: datetime | None = None

    @property
    def by_token(self) -> bool:
        """Whether an access token (not an API key or a session cookie) authenticated the caller."""
        return self.token_expires_at is not None

    @property
    def is_admin(self) -> bool:
        return self.role is Role.admin
