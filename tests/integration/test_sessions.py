"""Browser sessions (#14 point 2): the cookie carries an opaque session token, never the key;
signing out ends the session on the server; an expired session or a revoked key's session
is refused; an API key in the cookie is refused.

The services run on both engines (`db`); the HTTP checks go through the app over ASGI.
Cookie-authenticated writes send `Sec-Fetch-Site: same-origin`, as a browser on the
server's own page does (cross-site writes are refused by the CSRF check).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest

from app.auth import service
from app.auth.tokens import hash_token
from app.config import get_settings
from app.tables import ApiKey, Session
from tests.factories import Tenant, make_tenant

pytestmark = pytest.mark.anyio

SAME_ORIGIN = {"Sec-Fetch-Site": "same-origin"}


def cookie_header(value: str) -> dict[str, str]:
    return {"Cookie": f"{get_settings().cookie_name}={value}"}


async def sign_in(client: httpx.AsyncClient, key: str) -> str:
    """POST /api/session with the key; the session cookie's value."""
    r = await client.post("/api/session", json={"key": key}, headers=SAME_ORIGIN)
    assert r.status_code == 200, r.text
    value = r.cookies[get_settings().cookie_name]
    client.cookies.clear()  # each request below says which cookie it sends
    return value


# -- the services, on PostgreSQL and SQLite -------------------------------------------------------


async def test_session_lifecycle_in_the_database(db: str) -> None:
    """A session authenticates as its key's principal (with its session id) until it ends,
    expires, or its key is revoked; only the token's hash is stored; the periodic re-check
    names exactly the credentials that stopped working."""
    tenant = await make_tenant()
    alice = tenant.principals["alice"]
    token = await service.start_session(alice.key_id, timedelta(hours=1))
    assert token.startswith("css_")
    row = await Session.select().where(Session.token_hash == hash_token(token)).first()
    assert row is not None and row["api_key"] == alice.key_id and row["ended_at"] is None
    assert timedelta(minutes=59) < row["expires_at"] - datetime.now(UTC) <= timedelta(hours=1)

    principal = await service.authenticate_session(token)
    assert principal is not None and principal.session_id == row["id"]
    assert (principal.key_id, principal.user_id, principal.role) == (alice.key_id, alice.user_id, alice.role)
    assert await service.authenticate(token) is None  # a session token is no API key...
    assert await service.authenticate_session(tenant.tokens["alice"]) is None  # ...nor a key a session

    held = {(alice.key_id, row["id"]), (alice.key_id, None)}
    assert await service.invalid_credentials(held) == set()

    # Expired: refused, even though nothing ended it.
    await Session.update({Session.expires_at: datetime.now(UTC) - timedelta(seconds=1)}).where(Session.id == row["id"])
    assert await service.authenticate_session(token) is None
    assert await service.invalid_credentials(held) == {(alice.key_id, row["id"])}

    # Ended by sign-out: refused; signing out twice ends nothing more.
    second = await service.start_session(alice.key_id, timedelta(hours=1))
    ended = await service.end_session(second)
    second_id = (await Session.select(Session.id).where(Session.token_hash == hash_token(second)).first())["id"]
    assert ended == (alice.key_id, second_id)
    assert await service.authenticate_session(second) is None
    assert await service.end_session(second) is None

    # Key revoked: its open sessions stop at once, and the key too.
    third = await service.start_session(alice.key_id, timedelta(hours=1))
    third_principal = await service.authenticate_session(third)
    assert third_principal is not None
    await service.revoke_key(tenant.company_id, alice.key_id)
    assert await service.authenticate_session(third) is None
    third_held = (alice.key_id, third_principal.session_id)
    assert await service.invalid_credentials({third_held, (alice.key_id, None)}) == {
        third_held,
        (alice.key_id, None),
    }


async def test_a_new_session_drops_the_keys_ended_and_expired_ones(db: str) -> None:
    """Signing in again does not let the table grow with dead sessions of the key."""
    tenant = await make_tenant()
    key_id = tenant.principals["bob"].key_id
    ended = await service.start_session(key_id, timedelta(hours=1))
    await service.end_session(ended)
    await service.start_session(key_id, timedelta(seconds=-1))  # born expired
    live = await service.start_session(key_id, timedelta(hours=1))
    newest = await service.start_session(key_id, timedelta(hours=1))
    hashes = {r["token_hash"] for r in await Session.select(Session.token_hash).where(Session.api_key == key_id)}
    assert hashes == {hash_token(live), hash_token(newest)}


# -- over HTTP ------------------------------------------------------------------------------------


async def test_the_cookie_is_an_opaque_session_token_with_the_configured_lifetime(
    client: httpx.AsyncClient, acme: Tenant
) -> None:
    """Sign-in sets a cookie whose value is a `css_` session token (not the key), HttpOnly,
    SameSite=Strict, Max-Age = CHATSTREAM_COOKIE_MAX_AGE, and the stored session expires
    then; the cookie authenticates REST calls as the key's user."""
    r = await client.post("/api/session", json={"key": acme.tokens["alice"]}, headers=SAME_ORIGIN)
    assert r.status_code == 200, r.text
    value = r.cookies[get_settings().cookie_name]
    assert value.startswith("css_") and acme.tokens["alice"] not in r.headers["set-cookie"]
    header = r.headers["set-cookie"].lower()
    max_age = get_settings().cookie_max_age
    assert "httponly" in header and "samesite=strict" in header and f"max-age={max_age}" in header
    row = await Session.select().where(Session.token_hash == hash_token(value)).first()
    assert row is not None
    assert abs((row["expires_at"] - row["created_at"]).total_seconds() - max_age) < 5
    client.cookies.clear()
    me = await client.get("/api/me", headers=cookie_header(value))
    assert me.status_code == 200 and me.json()["userId"] == str(acme.principals["alice"].user_id)


async def test_sign_out_ends_the_session_on_the_server(client: httpx.AsyncClient, acme: Tenant) -> None:
    """After DELETE /api/session the same cookie value is 401 (a stolen copy is worthless);
    the cookie is cleared; another session of the same key keeps working."""
    first = await sign_in(client, acme.tokens["alice"])
    other = await sign_in(client, acme.tokens["alice"])
    assert (await client.get("/api/me", headers=cookie_header(first))).status_code == 200

    r = await client.delete("/api/session", headers={**cookie_header(first), **SAME_ORIGIN})
    assert r.status_code == 204, r.text
    assert "max-age=0" in r.headers["set-cookie"].lower()
    client.cookies.clear()

    after = await client.get("/api/me", headers=cookie_header(first))
    assert after.status_code == 401 and after.json()["code"] == "invalid_credentials", after.text
    posted = await client.post(
        "/api/conversations", json={"title": "x"}, headers={**cookie_header(first), **SAME_ORIGIN}
    )
    assert posted.status_code == 401, posted.text
    assert (await client.get("/api/me", headers=cookie_header(other))).status_code == 200
    # Signing out without a session (or a second time) is still a 204 that clears the cookie.
    again = await client.delete("/api/session", headers={**cookie_header(first), **SAME_ORIGIN})
    assert again.status_code == 204 and "max-age=0" in again.headers["set-cookie"].lower()


async def test_an_expired_session_is_refused(client: httpx.AsyncClient, acme: Tenant) -> None:
    """A browser may keep sending a cookie after its time: the server refuses the session."""
    value = await sign_in(client, acme.tokens["alice"])
    await Session.update({Session.expires_at: datetime.now(UTC) - timedelta(seconds=1)}).where(
        Session.token_hash == hash_token(value)
    )
    r = await client.get("/api/me", headers=cookie_header(value))
    assert r.status_code == 401 and r.json()["code"] == "invalid_credentials", r.text


async def test_an_api_key_in_the_cookie_is_refused(client: httpx.AsyncClient, acme: Tenant) -> None:
    """The cookie takes session tokens only; keys go in the Bearer header (and a session
    token is no Bearer key)."""
    r = await client.get("/api/me", headers=cookie_header(acme.tokens["alice"]))
    assert r.status_code == 401 and r.json()["code"] == "invalid_credentials", r.text
    value = await sign_in(client, acme.tokens["alice"])
    r = await client.get("/api/me", headers={"Authorization": f"Bearer {value}"})
    assert r.status_code == 401 and r.json()["code"] == "invalid_credentials", r.text


async def test_revoking_a_key_ends_its_sessions(client: httpx.AsyncClient, acme: Tenant) -> None:
    """DELETE /api/keys/{id}: the key and every session made with it are 401 at once, also
    right after they were used (and cached: app/auth/principal_cache.py)."""
    value = await sign_in(client, acme.tokens["bob"])
    key_id = acme.principals["bob"].key_id
    assert (await client.get("/api/me", headers=cookie_header(value))).status_code == 200
    assert (await client.get("/api/me", headers=acme.headers("bob"))).status_code == 200
    r = await client.delete(f"/api/keys/{key_id}", headers=acme.headers("admin"))
    assert r.status_code == 204, r.text
    assert (await ApiKey.select(ApiKey.revoked_at).where(ApiKey.id == key_id).first())["revoked_at"] is not None
    for headers in (cookie_header(value), acme.headers("bob")):
        r = await client.get("/api/me", headers=headers)
        assert r.status_code == 401 and r.json()["code"] == "invalid_credentials", r.text
