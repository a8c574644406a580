"""Build tenants for tests through the real services (no fixtures of rows by hand)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from uuid import UUID

from app.agents.schemas import AgentCreate
from app.agents.service import create_agent
from app.auth.principal import Principal
from app.auth.schemas import ApiKeyCreate
from app.auth.service import authenticate, create_key
from app.companies.service import create_company


@dataclass
class Tenant:
    """One company with an admin, two members and an echo agent."""

    company_id: UUID
    agent_id: UUID
    tokens: dict[str, str] = field(default_factory=dict)
    principals: dict[str, Principal] = field(default_factory=dict)

    def headers(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}


async def make_tenant(name: str | None = None) -> Tenant:
    """A fresh company (unique name) with keys `admin`, `alice`, `bob` and an agent."""
    created = await create_company(name or f"co-{uuid.uuid4().hex[:8]}")
    company_id = created.company.id
    agent = await create_agent(company_id, AgentCreate(name="Echo"))
    tenant = Tenant(company_id=company_id, agent_id=agent.id)
    tenant.tokens["admin"] = created.admin_key.token
    for member in ("alice", "bob"):
        key = await create_key(company_id, ApiKeyCreate(name=member))
        tenant.tokens[member] = key.token
    for who, token in tenant.tokens.items():
        principal = await authenticate(token)
        assert principal is not None
        tenant.principals[who] = principal
    return tenant
