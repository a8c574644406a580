"""Routes: session (cookie login/logout), me, API keys (admin)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import UUID

from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import Cookie
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody
from litestar.status_codes import HTTP_200_OK, HTTP_204_NO_CONTENT

from app.auth import access_tokens, service
from app.auth.guards import admin_only
from app.auth.principal import Principal
from app.auth.schemas import AccessToken, ApiKeyCreate, ApiKeyCreated, ApiKeyOut, Me, SessionCreate, TokenCreate
from app.config import get_settings
from app.errors import ApiError, ErrorBody, Forbidden, Unauthorized
from app.openapi import errors
from app.streaming.core import StreamingCore


def _cookie(value: str, max_age: int) -> Cookie:
    settings = get_settings()
    return Cookie(
        key=settings.cookie_name,
        value=value,
        path="/",
        httponly=True,
        samesite="strict",
        secure=settings.cookie_secure,
        max_age=max_age,
    )


class SessionController(Controller):
    """Browsers trade an API key for a session: an HttpOnly, SameSite=Strict cookie carrying
    an opaque session token (never the key). The session ends at sign-out, at its expiry
    (`cookie_max_age`), or when its key is revoked.
    """

    path = "/session"
    tags = ["session"]

    @post(
        "/",
        status_code=HTTP_200_OK,
        exclude_from_auth=True,
        summary="Sign in with an API key",
        responses=errors(400, 401, authenticated=False),  # 401: the key is not valid
    )
    async def login(self, data: JSONBody[SessionCreate]) -> Response[Me]:
        principal = await service.authenticate(data.key)
        if principal is None:
            raise Unauthorized("the API key is not valid or was revoked", code="invalid_credentials")
        me = await service.describe(principal)
        lifetime = get_settings().cookie_max_age
        token = await service.start_session(principal.key_id, timedelta(seconds=lifetime))
        return Response(me, cookies=[_cookie(token, lifetime)])

    @delete(
        "/",
        status_code=HTTP_204_NO_CONTENT,
        exclude_from_auth=True,
        summary="Sign out",
        security=[{}],  # `{}`: no credentials needed (without a session it is a harmless 204)
        # No body: the generated 204 would document a JSON `null` (Response[None] is for the cookie).
        responses={HTTP_204_NO_CONTENT: ResponseSpec(None, description="Signed out (also when no session was open)")},
    )
    async def logout(self, request: Request[Any, Any, Any], core: NamedDependency[StreamingCore]) -> Response[None]:
        """End the cookie's session on the server (its sockets and streams close) and clear the cookie."""
        token = request.cookies.get(get_settings().cookie_name)
        ended = await service.end_session(token) if token else None
        if ended is not None:
            await core.revoke_credentials(*ended)
        return Response(None, status_code=HTTP_204_NO_CONTENT, cookies=[_cookie("", 0)])


class MeController(Controller):
    path = "/me"
    tags = ["session"]

    @get("/", summary="Who the caller is", responses=errors())
    async def me(self, principal: NamedDependency[Principal]) -> Me:
        return await service.describe(principal)


class ApiKeyController(Controller):
    """API keys of the caller's company. Admins only."""

    path = "/keys"
    tags = ["keys"]
    guards = [admin_only]

    @get("/", summary="List the company's API keys", responses=errors(403))
    async def list_keys(self, principal: NamedDependency[Principal]) -> list[ApiKeyOut]:
        return await service.list_keys(principal.company_id)

    @post("/", summary="Create an API key; the token is in this response only", responses=errors(400, 403))
    async def create_key(self, principal: NamedDependency[Principal], data: JSONBody[ApiKeyCreate]) -> ApiKeyCreated:
        return await service.create_key(principal.company_id, data)

    @delete("/{key_id:uuid}", summary="Revoke an API key (idempotent)", responses=errors(403, 404))
    async def revoke_key(
        self, principal: NamedDependency[Principal], core: NamedDependency[StreamingCore], key_id: FromPath[UUID]
    ) -> None:
        """Revoke the key; its sessions end and every socket and stream using it closes."""
        await service.revoke_key(principal.company_id, key_id)
        await core.revoke_credentials(key_id)


class TokensDisabled(ApiError):
    status = 503
    code = "tokens_disabled"


class TokenController(Controller):
    """Short-lived access tokens (app/auth/access_tokens.py): for apps that must not hold an
    API key. The app's backend, which holds the key, asks for a token and hands it to the app."""

    path = "/tokens"
    tags = ["session"]

    @post(
        "/",
        status_code=HTTP_200_OK,
        summary="Trade the API key (or the session cookie) for a short-lived access token",
        description=(
            "Answers a signed token to send as `Authorization: Bearer <token>` (REST, SSE, WebSocket) "
            "until `expiresAt`. It has the rights of the key that asked (same company, same role), no more; "
            "revoking the key, or ending the session it came from, refuses it at once. The body is optional: "
            "`ttl` asks for a shorter life than the server's `CHATSTREAM_TOKEN_TTL`. A token cannot be traded "
            "for another (403 `token_not_allowed`); 503 `tokens_disabled` when the server has no "
            "`CHATSTREAM_TOKEN_SECRET`."
        ),
        responses={
            **errors(403),
            503: ResponseSpec(
                data_container=ErrorBody,
                description="`tokens_disabled`: the server has no CHATSTREAM_TOKEN_SECRET and issues no tokens",
                generate_examples=False,
            ),
        },
    )
    async def issue_token(
        self, principal: NamedDependency[Principal], data: JSONBody[TokenCreate | None] = None
    ) -> AccessToken:
        settings = get_settings()
        if not settings.token_secret:
            raise TokensDisabled(
                "this server issues no access tokens: its operator must set CHATSTREAM_TOKEN_SECRET "
                "(the same on every server process)"
            )
        if principal.by_token:
            raise Forbidden(
                "an access token cannot be traded for another: ask with the API key (or the session)",
                code="token_not_allowed",
            )
        ttl = settings.token_ttl if data is None or data.ttl is None else min(data.ttl, settings.token_ttl)
        token, claims = access_tokens.issue(principal, settings.token_secret, ttl)
        if claims.exp <= claims.iat:  # the session it comes from ends now
            raise Unauthorized("the session has expired; sign in again", code="invalid_credentials")
        return AccessToken(
            token=token, token_type="Bearer", expires_at=claims.expires_at, expires_in=claims.exp - claims.iat
        )
