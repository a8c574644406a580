"""Agents of a company. Reads are open to every member; changes are for admins (see guards)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import msgspec

from app.agents.schemas import AgentCreate, AgentListed, AgentOut, AgentUpdate
from app.config import get_settings
from app.db import columns_of
from app.errors import NotFound, check_text, invalid_field
from app.streaming.adapters import AdapterConfigError, normalize_config
from app.tables import Agent

_json_decoder = msgspec.json.Decoder(dict[str, Any])


def _config(value: Any) -> dict[str, Any]:
    # SQLite hands JSON columns back as text; PostgreSQL as text too unless decoded.
    if isinstance(value, str):
        return _json_decoder.decode(value)
    return dict(value or {})


def agent_out(row: dict[str, Any]) -> AgentOut:
    """An `agent` row (its columns' names as keys) as the API gives it."""
    return AgentOut(
        id=row["id"],
        name=row["name"],
        adapter=row["adapter"],
        config=_config(row["config"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def checked_config(adapter: str, config: dict[str, Any]) -> dict[str, Any]:
    """The config as its adapter reads it (defaults left out), or a 400 naming the field;
    an `openai` config must also keep to the operator's upstream policy."""
    try:
        return normalize_config(adapter, config, get_settings().upstream_policy)
    except AdapterConfigError as exc:
        raise invalid_field(f"config.{exc.field}" if exc.field else "config", exc.message) from None


async def list_agents(company_id: UUID) -> list[AgentOut]:
    """The company's agents, oldest first."""
    rows = await Agent.select().where(Agent.company == company_id).order_by(Agent.created_at)
    return [agent_out(r) for r in rows]


async def listed_agents(company_id: UUID, *, with_config: bool) -> list[AgentListed]:
    """The company's agents as the list route shows them: `config` only `with_config` (for admins)."""
    return [
        AgentListed(
            id=a.id,
            name=a.name,
            adapter=a.adapter,
            config=a.config if with_config else None,
            created_at=a.created_at,
            updated_at=a.updated_at,
        )
        for a in await list_agents(company_id)
    ]


async def get_agent(company_id: UUID, agent_id: UUID) -> AgentOut:
    """One agent of the company; another company's agent is NotFound."""
    # Written out (every answer started looks its agent up): see app/db.py.
    rows = await Agent.raw(
        f'SELECT {columns_of(Agent)} FROM "agent" WHERE "id" = {{}} AND "company" = {{}}', agent_id, company_id
    )
    if not rows:
        raise NotFound("agent not found", details={"agentId": str(agent_id)})
    return agent_out(rows[0])


async def create_agent(company_id: UUID, data: AgentCreate) -> AgentOut:
    """Add an agent to the company."""
    check_text("name", data.name)
    config = checked_config(data.adapter, data.config)
    agent = Agent(company=company_id, name=data.name, adapter=data.adapter, config=config)
    await agent.save()
    return await get_agent(company_id, agent.id)


async def update_agent(company_id: UUID, agent_id: UUID, data: AgentUpdate) -> AgentOut:
    """Change the fields that were sent."""
    current = await get_agent(company_id, agent_id)
    values: dict[Any, Any] = {}
    if data.name is not msgspec.UNSET:
        check_text("name", data.name)
        values[Agent.name] = data.name
    if data.adapter is not msgspec.UNSET or data.config is not msgspec.UNSET:
        # The config must suit the adapter the agent ends up with, whichever of them changed.
        adapter = current.adapter if data.adapter is msgspec.UNSET else data.adapter
        config = current.config if data.config is msgspec.UNSET else data.config
        values[Agent.adapter] = adapter
        values[Agent.config] = checked_config(adapter, config)
    if values:
        values[Agent.updated_at] = datetime.now(UTC)
        await Agent.update(values).where(Agent.id == agent_id, Agent.company == company_id)
    return await get_agent(company_id, agent_id)


async def delete_agent(company_id: UUID, agent_id: UUID) -> None:
    """Delete an agent; its conversations stay, without an agent."""
    await get_agent(company_id, agent_id)
    await Agent.delete().where(Agent.id == agent_id, Agent.company == company_id)
