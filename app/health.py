"""Liveness and readiness probes for load balancers and orchestrators."""

from __future__ import annotations

import logging

import msgspec
from litestar import Response, get
from litestar.datastructures import State
from litestar.status_codes import HTTP_503_SERVICE_UNAVAILABLE

from app.db import check_database
from app.errors import ErrorBody
from app.openapi import errors
from app.streaming.core import StreamingCore
from app.tables import Company

logger = logging.getLogger("chatstream.health")


class Health(msgspec.Struct):
    status: str
    checks: dict[str, str] = msgspec.field(default_factory=dict)


@get(
    "/healthz",
    tags=["health"],
    summary="Liveness: the process answers",
    sync_to_thread=False,
)
def healthz() -> Health:
    return Health(status="ok")


@get(
    "/readyz",
    tags=["health"],
    summary="Readiness: the database and the broker answer",
    responses=errors(503, authenticated=False),
)
async def readyz(state: State) -> Response[Health | ErrorBody]:
    core: StreamingCore | None = state.get("core")
    broker = core.broker.name if core is not None else "none"
    checks = {"database": "ok", "broker": broker}
    problems: dict[str, str] = {}
    try:
        await check_database(Company._meta.db)
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready", with the reason
        problems["database"] = str(exc)
    try:
        if core is None:
            raise RuntimeError("the server has not started")
        await core.broker.ping()
    except Exception as exc:  # noqa: BLE001 - as above
        problems["broker"] = str(exc)
    if problems:
        logger.warning("readiness check failed: %s", problems)
        body = ErrorBody(
            error=f"not ready: the {' and the '.join(sorted(problems))} cannot be reached",
            code="not_ready",
            details={**problems, "brokerName": broker},
        )
        return Response(body, status_code=HTTP_503_SERVICE_UNAVAILABLE, headers={"Retry-After": "5"})
    return Response(Health(status="ready", checks=checks))
