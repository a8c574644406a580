"""Authenticate every `/api` request by `Authorization: Bearer <key>` or the session cookie."""

from __future__ import annotations

from functools import partial

from litestar.connection import ASGIConnection
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult

from app.auth.principal import Principal
from app.auth.principal_cache import PrincipalCache
from app.auth.service import authenticate, authenticate_session
from app.auth.tokens import hash_token
from app.config import get_settings
from app.errors import Unauthorized


def credentials(connection: ASGIConnection) -> str | None:  # type: ignore[type-arg]
    """The token the client sent: the Bearer header (an API key) wins over the cookie (a session)."""
    header = connection.headers.get("authorization")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized(
                "the Authorization header must be 'Bearer <api key>'",
                code="invalid_credentials",
            )
        return token.strip()
    return connection.cookies.get(get_settings().cookie_name) or None


async def principal_for(connection: ASGIConnection, token: str) -> Principal:  # type: ignore[type-arg]
    """The caller behind `token` (from :func:`credentials`): an API key when it came in the
    Bearer header, a session when it came in the cookie (an API key there is refused).
    Recently seen credentials come from the app's :class:`PrincipalCache`."""
    cache: PrincipalCache = connection.app.state.principal_cache
    if connection.headers.get("authorization"):
        principal = await cache.resolve("key:" + hash_token(token), partial(authenticate, token))
        if principal is None:
            raise Unauthorized("the API key is not valid or was revoked", code="invalid_credentials")
        return principal
    principal = await cache.resolve("session:" + hash_token(token), partial(authenticate_session, token))
    if principal is None:
        raise Unauthorized(
            "the session is not valid: signed out, expired, or its key was revoked; sign in again",
            code="invalid_credentials",
        )
    return principal


class ApiKeyAuthMiddleware(AbstractAuthenticationMiddleware):
    """Resolves the caller to a :class:`~app.auth.principal.Principal` (``request.user``)."""

    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:  # type: ignore[type-arg]
        token = credentials(connection)
        if token is None:
            raise Unauthorized("authentication required: send 'Authorization: Bearer <api key>' or sign in")
        return AuthenticationResult(user=await principal_for(connection, token), auth=token)
