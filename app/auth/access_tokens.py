"""Short-lived access tokens: signed JWTs (HS256, PyJWT) traded for an API key or a session.

A mobile app should not hold an API key: its backend holds one and hands the app tokens
that expire (`POST /api/tokens`). A token names its key (`sub`), the session it was traded
for (`sid`, only from a cookie), the company and the role, and carries `iat`, `exp`, a
random `jti` and fixed `iss`/`aud`. It is signed with `CHATSTREAM_TOKEN_SECRET`, shared by
every process. A token is never enough on its own: each use also checks that its key (and
session) still authenticates, so revoking the key or ending the session refuses its tokens
before they expire (app/auth/middleware.py).

API keys (`cs_…`) and session tokens (`css_…`) never contain a dot; a token is three
base64url parts joined by dots, so the two are told apart by shape.
"""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import jwt
import msgspec

from app.auth.principal import Principal
from app.auth.tokens import TOKEN_PREFIX
from app.tables import Role

ALGORITHM = "HS256"
ISSUER = "chatstream"
AUDIENCE = "chatstream-api"
# Seconds of clock difference tolerated between the processes that issue and check tokens.
LEEWAY = 5
# A notice `token_expiring` goes out this many seconds before a socket's token expires
# (half the token's lifetime, for tokens shorter than twice this).
EXPIRING_NOTICE = 60.0
REQUIRED_CLAIMS = ["iss", "aud", "sub", "iat", "exp", "jti"]


class InvalidAccessToken(Exception):
    """The token is not one of ours, was tampered with, or expired (`code` says which)."""

    def __init__(self, message: str, code: str = "invalid_token") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class AccessClaims(msgspec.Struct, frozen=True, kw_only=True):
    """What a valid token says (its registered claims checked already)."""

    sub: UUID  # the key
    sid: UUID | None = None  # the session it was traded for
    company: UUID
    role: Role
    iat: int
    exp: int
    jti: str

    @property
    def issued_at(self) -> datetime:
        return datetime.fromtimestamp(self.iat, UTC)

    @property
    def expires_at(self) -> datetime:
        return datetime.fromtimestamp(self.exp, UTC)


def looks_like_access_token(token: str) -> bool:
    """Whether a Bearer credential is a token (three dot-separated parts), not an API key."""
    return token.count(".") == 2 and not token.startswith(TOKEN_PREFIX)


def issue(principal: Principal, secret: str, ttl: int, *, now: float | None = None) -> tuple[str, AccessClaims]:
    """A token for `principal` (a key, or a session of it) valid for `ttl` seconds, never past
    the session's own expiry. The token carries exactly the principal's rights."""
    issued = int(time.time() if now is None else now)
    expires = issued + ttl
    if principal.expires_at is not None:
        expires = min(expires, int(principal.expires_at.timestamp()))
    claims = AccessClaims(
        sub=principal.key_id,
        sid=principal.session_id,
        company=principal.company_id,
        role=principal.role,
        iat=issued,
        exp=expires,
        jti=secrets.token_urlsafe(16),
    )
    payload: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, **msgspec.to_builtins(claims)}
    if payload["sid"] is None:
        del payload["sid"]
    return jwt.encode(payload, secret, algorithm=ALGORITHM), claims


def verify(token: str, secret: str) -> AccessClaims:
    """The claims of a token signed with `secret`, for this issuer and audience, not expired
    (with `LEEWAY`); InvalidAccessToken otherwise."""
    try:
        payload = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            audience=AUDIENCE,
            issuer=ISSUER,
            leeway=LEEWAY,
            options={"require": REQUIRED_CLAIMS},
        )
    except jwt.ExpiredSignatureError:
        raise InvalidAccessToken("the access token expired; get a new one", code="token_expired") from None
    except jwt.InvalidTokenError as exc:
        raise InvalidAccessToken(f"the access token is not valid ({_reason(exc)})") from None
    try:
        return msgspec.convert(payload, AccessClaims, strict=False)
    except msgspec.ValidationError:
        raise InvalidAccessToken("the access token is not valid (its claims are not ours)") from None


def _reason(exc: jwt.InvalidTokenError) -> str:
    """Why PyJWT refused a token, in words that reveal nothing a client could not see itself."""
    reasons: list[tuple[type[jwt.InvalidTokenError], str]] = [
        (jwt.InvalidSignatureError, "bad signature"),
        (jwt.InvalidAudienceError, "wrong audience"),
        (jwt.InvalidIssuerError, "wrong issuer"),
        (jwt.ImmatureSignatureError, "issued in the future"),
        (jwt.InvalidIssuedAtError, "bad issue time"),
        (jwt.MissingRequiredClaimError, "a claim is missing"),
        (jwt.InvalidAlgorithmError, "wrong algorithm"),
        (jwt.DecodeError, "not a token"),
    ]
    for kind, words in reasons:
        if isinstance(exc, kind):
            return words
    return "refused"


def expiring_notice_lead(principal: Principal) -> float:
    """Seconds before a token's expiry at which a socket is told (`token_expiring`)."""
    assert principal.token_issued_at is not None and principal.token_expires_at is not None
    lifetime = (principal.token_expires_at - principal.token_issued_at).total_seconds()
    return min(EXPIRING_NOTICE, max(lifetime, 0.0) / 2)
