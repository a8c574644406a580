"""Access tokens (app/auth/access_tokens.py): what a token says, and what is refused."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest

from app.auth.access_tokens import (
    AUDIENCE,
    ISSUER,
    LEEWAY,
    InvalidAccessToken,
    expiring_notice_lead,
    issue,
    looks_like_access_token,
    verify,
)
from app.auth.principal import Principal
from app.auth.tokens import new_session_token, new_token
from app.config import SettingsError, settings_from_env
from app.tables import Role

SECRET = "unit-test-secret-" + "x" * 60  # long enough for HS512 too (the refused case)


def principal(role: Role = Role.member, **extra: Any) -> Principal:
    return Principal(key_id=uuid.uuid4(), user_id=uuid.uuid4(), company_id=uuid.uuid4(), role=role, **extra)


def signed(payload: dict[str, Any], secret: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(payload, secret, algorithm=algorithm)


def claims_of(who: Principal, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    payload: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": str(who.key_id),
        "company": str(who.company_id),
        "role": who.role.value,
        "iat": now,
        "exp": now + 60,
        "jti": "j",
    }
    payload.update(overrides)
    return {k: v for k, v in payload.items() if v is not None}


def test_a_token_says_who_and_until_when() -> None:
    who = principal(Role.admin)
    token, claims = issue(who, SECRET, 300, now=1_000_000_000)
    assert (claims.sub, claims.company, claims.role, claims.sid) == (who.key_id, who.company_id, Role.admin, None)
    assert (claims.iat, claims.exp) == (1_000_000_000, 1_000_000_300)
    raw = jwt.decode(token, SECRET, algorithms=["HS256"], audience=AUDIENCE, options={"verify_exp": False})
    assert raw["iss"] == ISSUER and raw["sub"] == str(who.key_id) and raw["role"] == "admin" and "sid" not in raw
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    fresh, _ = issue(who, SECRET, 300)
    assert verify(fresh, SECRET).sub == who.key_id
    assert issue(who, SECRET, 300)[1].jti != issue(who, SECRET, 300)[1].jti


def test_a_sessions_token_names_the_session_and_ends_with_it() -> None:
    now = time.time()
    session = uuid.uuid4()
    who = principal(session_id=session, expires_at=datetime.fromtimestamp(now + 100, UTC))
    _, claims = issue(who, SECRET, 900, now=now)
    assert claims.sid == session
    assert claims.exp == int(now + 100)  # never past the session's own end
    token, _ = issue(who, SECRET, 30, now=now)
    assert verify(token, SECRET).sid == session


def test_expiry_allows_a_small_clock_difference_only() -> None:
    who = principal()
    now = int(time.time())
    within = signed(claims_of(who, iat=now - 60, exp=now - LEEWAY + 2))
    assert verify(within, SECRET).sub == who.key_id
    past = signed(claims_of(who, iat=now - 60, exp=now - LEEWAY - 2))
    with pytest.raises(InvalidAccessToken) as refused:
        verify(past, SECRET)
    assert refused.value.code == "token_expired"


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("wrong_secret", "bad signature"),
        ("wrong_audience", "wrong audience"),
        ("wrong_issuer", "wrong issuer"),
        ("future", "issued in the future"),
        ("no_jti", "a claim is missing"),
        ("no_exp", "a claim is missing"),
        ("hs512", "wrong algorithm"),
        ("alg_none", "wrong algorithm"),
        ("garbage", "not a token"),
        ("bad_role", "not ours"),
        ("bad_sub", "not ours"),
    ],
)
def test_tokens_that_are_not_ours_are_refused(case: str, words: str) -> None:
    who = principal()
    now = int(time.time())
    token = {
        "wrong_secret": lambda: signed(claims_of(who), secret="another-" + "y" * 40),
        "wrong_audience": lambda: signed(claims_of(who, aud="other")),
        "wrong_issuer": lambda: signed(claims_of(who, iss="other")),
        "future": lambda: signed(claims_of(who, iat=now + 600, exp=now + 900)),
        "no_jti": lambda: signed(claims_of(who, jti=None)),
        "no_exp": lambda: signed(claims_of(who, exp=None)),
        "hs512": lambda: signed(claims_of(who), algorithm="HS512"),
        "alg_none": lambda: jwt.encode(claims_of(who), None, algorithm="none"),
        "garbage": lambda: "a.b.c",
        "bad_role": lambda: signed(claims_of(who, role="root")),
        "bad_sub": lambda: signed(claims_of(who, sub="not-a-uuid")),
    }[case]()
    with pytest.raises(InvalidAccessToken) as refused:
        verify(token, SECRET)
    assert refused.value.code == "invalid_token"
    assert words in refused.value.message


def test_tokens_are_told_from_keys_and_session_tokens_by_shape() -> None:
    token, _ = issue(principal(), SECRET, 60)
    assert looks_like_access_token(token)
    assert not looks_like_access_token(new_token())
    assert not looks_like_access_token(new_session_token())
    assert not looks_like_access_token("cs_a.b.c")


def test_the_expiring_notice_comes_a_minute_early_or_at_half_life() -> None:
    start = datetime(2026, 12, 7, tzinfo=UTC)

    def lead(seconds: float) -> float:
        return expiring_notice_lead(
            principal(token_issued_at=start, token_expires_at=start + timedelta(seconds=seconds))
        )

    assert lead(900) == 60
    assert lead(120) == 60
    assert lead(60) == 30
    assert lead(3) == 1.5


def test_token_settings() -> None:
    settings = settings_from_env({})
    assert settings.token_secret is None and settings.token_ttl == 900
    settings = settings_from_env({"CHATSTREAM_TOKEN_SECRET": SECRET, "CHATSTREAM_TOKEN_TTL": "120"})
    assert settings.token_secret == SECRET and settings.token_ttl == 120
    with pytest.raises(SettingsError) as short:
        settings_from_env({"CHATSTREAM_TOKEN_SECRET": "hunter2-short"})
    assert "CHATSTREAM_TOKEN_SECRET" in str(short.value) and "hunter2" not in str(short.value)
    for ttl in ("59", "86401", "soon"):
        with pytest.raises(SettingsError, match="CHATSTREAM_TOKEN_TTL"):
            settings_from_env({"CHATSTREAM_TOKEN_TTL": ttl})
