"""Authenticate every `/api` request by `Authorization: Bearer <key or access token>` or the
session cookie."""

from __future__ import annotations

from functools import partial

import msgspec
from litestar.connection import ASGIConnection
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult

from app.auth.access_tokens import InvalidAccessToken, looks_like_access_token, verify
from app.auth.principal import Principal
from app.auth.principal_cache import PrincipalCache
from app.auth.service import authenticate, authenticate_key_id, authenticate_session, authenticate_session_id
from app.auth.tokens import hash_token
from app.config import get_settings
from app.errors import Unauthorized


def credentials(connection: ASGIConnection) -> str | None:  # type: ignore[type-arg]
    """The token the client sent: the Bearer header (an API key or an access token) wins over
    the cookie (a session)."""
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
    Bearer header (or an access token, told apart by its shape), a session when it came in the
    cookie (an API key there is refused). Recently seen credentials come from the app's
    :class:`PrincipalCache`."""
    cache: PrincipalCache = connection.app.state.principal_cache
    if connection.headers.get("authorization"):
        if looks_like_access_token(token):
            return await token_principal(cache, token)
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


async def token_principal(cache: PrincipalCache, token: str) -> Principal:
    """The caller behind an access token: its signature, audience, issuer and expiry are
    checked, then its key (and the session it was traded for) must still authenticate, through
    the same cache as keys and sessions (which a revocation clears at once); the token's
    company and role must be the key's. Unauthorized otherwise: code `token_expired` for an
    expired token, `invalid_token` for one that is not valid, `invalid_credentials` when its key
    was revoked or its session ended."""
    secret = get_settings().token_secret
    if not secret:
        raise Unauthorized(
            "this server accepts no access tokens (CHATSTREAM_TOKEN_SECRET is not set); use an API key",
            code="invalid_token",
        )
    try:
        claims = verify(token, secret)
    except InvalidAccessToken as exc:
        raise Unauthorized(exc.message, code=exc.code) from None
    if claims.sid is not None:
        principal = await cache.resolve(f"session-id:{claims.sid}", partial(authenticate_session_id, claims.sid))
    else:
        principal = await cache.resolve(f"key-id:{claims.sub}", partial(authenticate_key_id, claims.sub))
    if principal is None:
        raise Unauthorized(
            "the access token's key was revoked or its session ended; get a token from valid credentials",
            code="invalid_credentials",
        )
    if (principal.key_id, principal.company_id, principal.role) != (claims.sub, claims.company, claims.role):
        raise Unauthorized("the access token does not match its key", code="invalid_token")
    return msgspec.structs.replace(principal, token_issued_at=claims.issued_at, token_expires_at=claims.expires_at)


class ApiKeyAuthMiddleware(AbstractAuthenticationMiddleware):
    """Resolves the caller to a :class:`~app.auth.principal.Principal` (``request.user``)."""

    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:  # type: ignore[type-arg]
        token = credentials(connection)
        if token is None:
            raise Unauthorized(
                "authentication required: send 'Authorization: Bearer <api key or access token>' or sign in"
            )
        return AuthenticationResult(user=await principal_for(connection, token), auth=token)
