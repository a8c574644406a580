"""Create and find companies. Not exposed over HTTP: operators use the CLI."""

from __future__ import annotations

from uuid import UUID

import msgspec

from app.auth.schemas import ApiKeyCreate, ApiKeyCreated
from app.auth.service import create_key
from app.errors import NotFound
from app.tables import Company, Role


class CompanyOut(msgspec.Struct, rename="camel"):
    id: UUID
    name: str


class CompanyCreated(msgspec.Struct, rename="camel"):
    """A new company and its first admin key (the token is shown this once)."""

    company: CompanyOut
    admin_key: ApiKeyCreated


async def create_company(name: str, admin_key_name: str = "admin") -> CompanyCreated:
    """Create a company and its first admin key."""
    company = Company(name=name)
    await company.save()
    key = await create_key(company.id, ApiKeyCreate(name=admin_key_name, role=Role.admin))
    return CompanyCreated(company=CompanyOut(id=company.id, name=name), admin_key=key)


async def list_companies() -> list[CompanyOut]:
    """All companies, oldest first."""
    rows = await Company.select(Company.id, Company.name).order_by(Company.created_at)
    return [CompanyOut(id=r["id"], name=r["name"]) for r in rows]


async def find_company(ref: str) -> CompanyOut:
    """A company by id or by exact name; NotFound when there is none, or several of that name."""
    try:
        query = Company.select(Company.id, Company.name).where(Company.id == UUID(ref))
    except ValueError:
        query = Company.select(Company.id, Company.name).where(Company.name == ref)
    rows = await query
    if len(rows) != 1:
        raise NotFound(f"no company {ref!r}" if not rows else f"{len(rows)} companies are named {ref!r}; use the id")
    return CompanyOut(id=rows[0]["id"], name=rows[0]["name"])
