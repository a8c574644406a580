"""The demo data `serve` creates on an empty database, so a first run has something to try."""

from __future__ import annotations

import msgspec

from app.agents.schemas import AgentCreate
from app.agents.service import create_agent
from app.auth.schemas import ApiKeyCreate
from app.auth.service import create_key
from app.tables import Company, Role

DEMO_COMPANY = "Demo"


class DemoSeed(msgspec.Struct, rename="camel"):
    company_id: str
    agent_id: str
    member_token: str


async def seed_demo_if_empty() -> DemoSeed | None:
    """On a database without any company: a demo company, an `echo` agent and a member key.
    Returns the seed (with the key's token, shown this once) or None if the database had data."""
    if await Company.count() > 0:
        return None
    company = Company(name=DEMO_COMPANY)
    await company.save()
    agent = await create_agent(company.id, AgentCreate(name="Echo", adapter="echo", config={}))
    key = await create_key(company.id, ApiKeyCreate(name="demo member", role=Role.member))
    return DemoSeed(company_id=str(company.id), agent_id=str(agent.id), member_token=key.token)
