"""API keys and browser sessions: authenticate, create, list, revoke and end them."""

from __future__ import annotations

import uuid
from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from app.auth.principal import Principal
from app.auth.schemas import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyOut,
    CompanyRef,
    KeyRef,
    Me,
)
from app.auth.tokens import SESSION_TOKEN_PREFIX, display_prefix, hash_token, new_session_token, new_token
from app.db import is_foreign_key_violation
from app.errors import NotFound, Unauthorized, check_text, invalid_field
from app.tables import ApiKey, Company, Role, Session

# `last_used_at` is refreshed at most this often, so reads don't all become writes.
LAST_USED_RESOLUTION = timedelta(minutes=1)
# Ids per query when re-checking credentials (well under the databases' parameter limits).
CHECK_BATCH = 1000

# A credential held by an open connection: (key id, session id or None for a Bearer key).
Credential = tuple[UUID, UUID | None]


def _now() -> datetime:
    return datetime.now(UTC)


async def authenticate(token: str) -> Principal | None:
    """The principal for a valid, unrevoked API key; None otherwise."""
    return await _key_principal(ApiKey.token_hash == hash_token(token))


async def authenticate_key_id(key_id: UUID) -> Principal | None:
    """The principal of the key with this id while it is not revoked (for an access token
    naming it); None otherwise."""
    return await _key_principal(ApiKey.id == key_id)


async def _key_principal(where: Any) -> Principal | None:
    row = (
        await ApiKey.select(ApiKey.id, ApiKey.user_id, ApiKey.company, ApiKey.role, ApiKey.last_used_at)
        .where(where, ApiKey.revoked_at.is_null())
        .first()
    )
    if row is None:
        return None
    await _touch(ApiKey, row["id"], row["last_used_at"])
    return Principal(
        key_id=row["id"],
        user_id=row["user_id"],
        company_id=row["company"],
        role=Role(row["role"]),
    )


async def authenticate_session(token: str) -> Principal | None:
    """The principal for a session token (the cookie) whose session has not ended or
    expired and whose key is not revoked; None otherwise."""
    if not token.startswith(SESSION_TOKEN_PREFIX):
        return None
    return await _session_principal(Session.token_hash == hash_token(token))


async def authenticate_session_id(session_id: UUID) -> Principal | None:
    """As :func:`authenticate_session`, for the session with this id (an access token traded
    for a session names it)."""
    return await _session_principal(Session.id == session_id)


async def _session_principal(where: Any) -> Principal | None:
    key = Session.api_key
    row = (
        await Session.select(
            Session.id,
            Session.last_used_at,
            Session.expires_at,
            key.id.as_alias("key_id"),
            key.user_id.as_alias("user_id"),
            key.company.as_alias("company"),
            key.role.as_alias("role"),
            key.last_used_at.as_alias("key_last_used_at"),
        )
        .where(
            where,
            Session.ended_at.is_null(),
            Session.expires_at > _now(),
            key.revoked_at.is_null(),
        )
        .first()
    )
    if row is None:
        return None
    await _touch(Session, row["id"], row["last_used_at"])
    await _touch(ApiKey, row["key_id"], row["key_last_used_at"])
    return Principal(
        key_id=row["key_id"],
        user_id=row["user_id"],
        company_id=row["company"],
        role=Role(row["role"]),
        session_id=row["id"],
        expires_at=row["expires_at"],
    )


async def _touch(table: type[ApiKey] | type[Session], row_id: UUID, last_used_at: datetime | None) -> None:
    """Refresh a key's or session's `last_used_at` when it is older than the resolution."""
    now = _now()
    if last_used_at is None or now - last_used_at > LAST_USED_RESOLUTION:
        await table.update({table.last_used_at: now}).where(table.id == row_id)


async def start_session(key_id: UUID, lifetime: timedelta) -> str:
    """A new session of the key, valid for `lifetime`; returns its token (the cookie value),
    of which only the hash is stored. The key's ended and expired sessions are dropped."""
    now = _now()
    await Session.delete().where(
        Session.api_key == key_id, Session.ended_at.is_not_null() | (Session.expires_at <= now)
    )
    token = new_session_token()
    try:
        await Session(api_key=key_id, token_hash=hash_token(token), expires_at=now + lifetime).save()
    except Exception as exc:
        if is_foreign_key_violation(exc):  # the key was deleted (with its company) meanwhile
            raise Unauthorized("the API key is not valid or was revoked", code="invalid_credentials") from None
        raise
    return token


async def end_session(token: str) -> Credential | None:
    """Sign-out: end the token's session. Returns (key id, session id) of the session it
    ended, None when the token names no session that was still open."""
    row = (
        await Session.select(Session.id, Session.api_key)
        .where(Session.token_hash == hash_token(token), Session.ended_at.is_null())
        .first()
    )
    if row is None:
        return None
    await Session.update({Session.ended_at: _now()}).where(Session.id == row["id"])
    return row["api_key"], row["id"]


async def invalid_credentials(held: Collection[Credential]) -> set[Credential]:
    """Those of `held` that no longer authenticate: the key is revoked or gone, or the
    session ended or expired (for the periodic re-check of open connections)."""
    now = _now()
    key_ids = list({key_id for key_id, _ in held})
    session_ids = list({session_id for _, session_id in held if session_id is not None})
    valid_keys: set[UUID] = set()
    valid_sessions: set[UUID] = set()
    for start in range(0, len(key_ids), CHECK_BATCH):
        rows = await ApiKey.select(ApiKey.id).where(
            ApiKey.id.is_in(key_ids[start : start + CHECK_BATCH]), ApiKey.revoked_at.is_null()
        )
        valid_keys |= {row["id"] for row in rows}
    for start in range(0, len(session_ids), CHECK_BATCH):
        rows = await Session.select(Session.id).where(
            Session.id.is_in(session_ids[start : start + CHECK_BATCH]),
            Session.ended_at.is_null(),
            Session.expires_at > now,
        )
        valid_sessions |= {row["id"] for row in rows}
    return {
        (key_id, session_id)
        for key_id, session_id in held
        if key_id not in valid_keys or (session_id is not None and session_id not in valid_sessions)
    }


async def describe(principal: Principal) -> Me:
    """What `GET /api/me` answers for this principal."""
    key = await ApiKey.select(ApiKey.id, ApiKey.name).where(ApiKey.id == principal.key_id).first()
    company = await Company.select(Company.id, Company.name).where(Company.id == principal.company_id).first()
    if key is None or company is None:  # deleted between authentication and now
        raise NotFound("key not found")
    return Me(
        user_id=principal.user_id,
        role=principal.role,
        company=CompanyRef(id=company["id"], name=company["name"]),
        key=KeyRef(id=key["id"], name=key["name"]),
    )


def _key_out(row: dict[str, Any]) -> ApiKeyOut:
    return ApiKeyOut(
        id=row["id"],
        name=row["name"],
        role=Role(row["role"]),
        user_id=row["user_id"],
        prefix=row["token_prefix"],
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
        revoked_at=row["revoked_at"],
    )


async def create_key(company_id: UUID, data: ApiKeyCreate) -> ApiKeyCreated:
    """Create a key in a company; the returned `token` is the only copy there will ever be."""
    check_text("name", data.name)
    if data.user_id is not None and await ApiKey.exists().where(
        ApiKey.user_id == data.user_id, ApiKey.company != company_id
    ):
        # A key acts for a user of its own company (or a new one): an id taken from another
        # company would let two companies' keys share one person (and what they own).
        raise invalid_field("userId", "this id belongs to a user of another company; omit userId for a new user")
    token = new_token()
    key = ApiKey(
        company=company_id,
        name=data.name,
        role=data.role.value,
        user_id=data.user_id or uuid.uuid4(),
        token_hash=hash_token(token),
        token_prefix=display_prefix(token),
    )
    try:
        await key.save()
    except Exception as exc:
        if is_foreign_key_violation(exc):  # the company was deleted meanwhile
            raise NotFound("company not found") from None
        raise
    row = await ApiKey.select().where(ApiKey.id == key.id).first()
    if row is None:  # deleted (with its company) right after the insert
        raise NotFound("key not found")
    out = _key_out(row)
    return ApiKeyCreated(**{f: getattr(out, f) for f in out.__struct_fields__}, token=token)


async def list_keys(company_id: UUID) -> list[ApiKeyOut]:
    """Every key of a company, newest first, revoked ones included."""
    rows = await ApiKey.select().where(ApiKey.company == company_id).order_by(ApiKey.created_at, ascending=False)
    return [_key_out(r) for r in rows]


async def revoke_key(company_id: UUID, key_id: UUID) -> None:
    """Revoke a key of the company (idempotent: revoking again keeps the first time)."""
    row = await ApiKey.select(ApiKey.revoked_at).where(ApiKey.id == key_id, ApiKey.company == company_id).first()
    if row is None:
        raise NotFound("key not found")
    if row["revoked_at"] is None:
        await ApiKey.update({ApiKey.revoked_at: _now()}).where(ApiKey.id == key_id)
