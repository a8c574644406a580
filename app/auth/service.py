"""API keys: authenticate a token, create, list and revoke keys."""

from __future__ import annotations

import uuid
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
from app.auth.tokens import display_prefix, hash_token, new_token
from app.db import is_foreign_key_violation
from app.errors import NotFound, check_text, invalid_field
from app.tables import ApiKey, Company, Role

# `last_used_at` is refreshed at most this often, so reads don't all become writes.
LAST_USED_RESOLUTION = timedelta(minutes=1)


def _now() -> datetime:
    return datetime.now(UTC)


async def authenticate(token: str) -> Principal | None:
    """The principal for a valid, unrevoked token; None otherwise."""
    row = (
        await ApiKey.select(ApiKey.id, ApiKey.user_id, ApiKey.company, ApiKey.role, ApiKey.last_used_at)
        .where(ApiKey.token_hash == hash_token(token), ApiKey.revoked_at.is_null())
        .first()
    )
    if row is None:
        return None
    now = _now()
    if row["last_used_at"] is None or now - row["last_used_at"] > LAST_USED_RESOLUTION:
        await ApiKey.update({ApiKey.last_used_at: now}).where(ApiKey.id == row["id"])
    return Principal(
        key_id=row["id"],
        user_id=row["user_id"],
        company_id=row["company"],
        role=Role(row["role"]),
    )


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
    if data.user_id is not None and not await ApiKey.exists().where(
        ApiKey.user_id == data.user_id, ApiKey.company == company_id
    ):
        # A key acts for a user of its own company: an id from elsewhere would let two
        # companies' keys share one person (and what they own).
        raise invalid_field("userId", "no user of this company has this id; omit userId to create a new user")
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
