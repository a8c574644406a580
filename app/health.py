"""Liveness and readiness probes for load balancers and orchestrators."""

from __future__ import annotations

import logging

import msgspec
from litestar import Response, get
from litestar.status_codes import HTTP_503_SERVICE_UNAVAILABLE

from app.db import check_database
from app.errors import ErrorBody
from app.openapi import errors
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
    summary="Readiness: the database answers",
    responses=errors(503, authenticated=False),
)
async def readyz() -> Response[Health | ErrorBody]:
    try:
        await check_database(Company._meta.db)
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready", with the reason
        logger.warning("readiness check failed: %s", exc)
        body = ErrorBody(
            error="the database is not reachable",
            code="not_ready",
            details={"database": str(exc)},
        )
        return Response(body, status_code=HTTP_503_SERVICE_UNAVAILABLE, headers={"Retry-After": "5"})
    return Response(Health(status="ready", checks={"database": "ok"}))
