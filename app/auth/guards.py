"""Route guards."""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from app.auth.principal import Principal
from app.errors import Forbidden


def admin_only(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Only a company admin may pass."""
    user = connection.user
    if not isinstance(user, Principal) or not user.is_admin:
        raise Forbidden("this needs an admin key", code="admin_required")


def provide_principal(request: Request[Any, Any, Any]) -> Principal:
    """Dependency: the authenticated caller."""
    user = request.user
    assert isinstance(user, Principal)
    return user
