"""Routes: agents of the caller's company. Everyone may list (admins see configs); admins change."""

from __future__ import annotations

from uuid import UUID

from litestar import Controller, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from app.agents import service
from app.agents.schemas import AgentCreate, AgentListed, AgentOut, AgentUpdate
from app.auth.guards import admin_only
from app.auth.principal import Principal
from app.openapi import errors


class AgentController(Controller):
    path = "/agents"
    tags = ["agents"]

    @get(
        "/",
        summary="List the company's agents",
        description="Every member may list; `config` (model server, system prompt, key variable) is `null` "
        "unless the caller is an admin.",
        responses=errors(),
    )
    async def list_agents(self, principal: NamedDependency[Principal]) -> list[AgentListed]:
        return await service.listed_agents(principal.company_id, with_config=principal.is_admin)

    @post("/", guards=[admin_only], summary="Create an agent (admin)", responses=errors(400, 403))
    async def create_agent(self, principal: NamedDependency[Principal], data: JSONBody[AgentCreate]) -> AgentOut:
        return await service.create_agent(principal.company_id, data)

    @patch("/{agent_id:uuid}", guards=[admin_only], summary="Change an agent (admin)", responses=errors(400, 403, 404))
    async def update_agent(
        self,
        principal: NamedDependency[Principal],
        agent_id: FromPath[UUID],
        data: JSONBody[AgentUpdate],
    ) -> AgentOut:
        return await service.update_agent(principal.company_id, agent_id, data)

    @delete("/{agent_id:uuid}", guards=[admin_only], summary="Delete an agent (admin)", responses=errors(403, 404))
    async def delete_agent(self, principal: NamedDependency[Principal], agent_id: FromPath[UUID]) -> None:
        await service.delete_agent(principal.company_id, agent_id)
