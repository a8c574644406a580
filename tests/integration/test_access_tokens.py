"""Short-lived access tokens (#19 point 3), on a real `chatstream serve` with real `websockets`
and `httpx-sse` clients.

`POST /api/tokens` trades an API key (or the session cookie, from the server's own origin) for
a signed token with an expiry and the key's rights, no more. The token is accepted wherever a
key is (REST, SSE, the WebSocket upgrade); a token that is expired, tampered with, signed with
another secret or for another audience is refused (401, or close 4401). Revoking its key closes
the sockets and streams it opened and refuses it at once. A socket opened with a token is told
`token_expiring` before the expiry and can go on with a `refresh` frame; without one it gets
`token_expired` and 4401. An SSE stream opened with a token ends with `event: expired`.

Nothing sleeps: every wait is on a frame, an event or the end of a response, bounded.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import anyio
import httpx
import jwt
import pytest
from websockets.asyncio.client import ClientConnection, connect

from app.auth.access_tokens import AUDIENCE, ISSUER
from tests.conftest import TEST_TOKEN_SECRET
from tests.factories import Tenant, make_tenant
from tests.integration.live_server import LiveServer
from tests.integration.test_revocation import (
    bearer,
    cookie,
    frames_until_closed,
    new_key,
    open_stream,
    refused_upgrade,
    revoke,
    revoked_close,
    revoked_end,
    running_answer,
    sign_in,
    sign_out,
    subscribed_socket,
)

pytestmark = pytest.mark.anyio

STEP = 10.0  # the longest any single wait may take before the test fails
ERROR_KEYS = {"error", "code", "details"}


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    """Tokens on: the test run's CHATSTREAM_TOKEN_SECRET (tests/conftest.py)."""
    with LiveServer() as live:
        yield live


@pytest.fixture
async def tenant() -> Tenant:
    return await make_tenant()


# -- helpers --------------------------------------------------------------------------------------


async def issue(url: str, headers: dict[str, str], body: Any = None) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=STEP) as http:
        if body is None:
            return await http.post("/api/tokens", headers=headers)
        return await http.post("/api/tokens", json=body, headers=headers)


async def token_of(url: str, headers: dict[str, str], ttl: int | None = None) -> dict[str, Any]:
    """A token for the caller in `headers`: the response body."""
    r = await issue(url, headers, None if ttl is None else {"ttl": ttl})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def claims(token: str) -> dict[str, Any]:
    """The claims of a token the server issued (checked, except its expiry)."""
    decoded: dict[str, Any] = jwt.decode(
        token,
        TEST_TOKEN_SECRET,
        algorithms=["HS256"],
        audience=AUDIENCE,
        issuer=ISSUER,
        options={"verify_exp": False},
    )
    return decoded


def forge(tenant: Tenant, who: str = "alice", *, secret: str = TEST_TOKEN_SECRET, **overrides: Any) -> str:
    """A token signed by hand: the claims a real one for `who` has, with `overrides` (None drops one)."""
    principal = tenant.principals[who]
    now = int(time.time())
    payload: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": str(principal.key_id),
        "company": str(principal.company_id),
        "role": principal.role.value,
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
    }
    payload.update(overrides)
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, secret, algorithm="HS256")


def tampered(token: str) -> str:
    """The token with its payload changed (role admin) and the old signature kept."""
    head, payload, signature = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data["role"] = "admin"
    changed = base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    return f"{head}.{changed}.{signature}"


def assert_refused(r: httpx.Response, code: str, status: int = 401) -> dict[str, Any]:
    """An error in the project's shape (and WWW-Authenticate on a 401)."""
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    assert set(body) == ERROR_KEYS and body["code"] == code and body["error"], body
    assert "Traceback" not in r.text
    if status == 401:
        assert r.headers.get("www-authenticate") == "Bearer", r.headers
    return body


def ws_url(server: LiveServer) -> str:
    return server.url.replace("http://", "ws://", 1) + "/api/ws"


async def next_frame(ws: ClientConnection, within: float = STEP) -> dict[str, Any]:
    with anyio.fail_after(within):
        frame: dict[str, Any] = json.loads(await ws.recv())
        return frame


async def frame_of_type(ws: ClientConnection, kind: str, within: float = STEP) -> dict[str, Any]:
    """The next frame of type `kind` (others skipped; an `error` frame fails the test)."""
    with anyio.fail_after(within):
        while True:
            frame: dict[str, Any] = json.loads(await ws.recv())
            if frame["type"] == kind:
                return frame
            assert frame["type"] != "error", frame


@asynccontextmanager
async def socket(server: LiveServer, headers: dict[str, str]) -> AsyncIterator[ClientConnection]:
    """An accepted socket (its `hello` read)."""
    async with connect(ws_url(server), additional_headers=headers, open_timeout=STEP) as ws:
        hello = await next_frame(ws)
        assert hello["type"] == "hello", hello
        yield ws


async def ping(ws: ClientConnection, ref: str) -> None:
    await ws.send(json.dumps({"type": "ping", "ref": ref}))
    pong = await frame_of_type(ws, "pong")
    assert pong["ref"] == ref, pong


def assert_clean(*servers: LiveServer) -> None:
    for live in servers:
        assert "Traceback" not in live.output(), live.output()


# -- issuing --------------------------------------------------------------------------------------


async def test_a_key_gets_a_token_with_its_own_identity(server: LiveServer, tenant: Tenant) -> None:
    """The token names the key, the company and the role; it expires in CHATSTREAM_TOKEN_TTL
    (900 s) unless asked for less; it authenticates as the key does."""
    before = int(time.time())
    body = await token_of(server.url, tenant.headers("alice"))
    assert set(body) == {"token", "tokenType", "expiresAt", "expiresIn"} and body["tokenType"] == "Bearer"
    assert body["expiresIn"] == 900
    got = claims(body["token"])
    alice = tenant.principals["alice"]
    assert got["sub"] == str(alice.key_id) and got["company"] == str(alice.company_id)
    assert got["role"] == "member" and "sid" not in got and got["jti"]
    assert before <= got["iat"] <= int(time.time()) and got["exp"] == got["iat"] + 900
    assert datetime.fromisoformat(body["expiresAt"]).timestamp() == got["exp"]

    async with httpx.AsyncClient(base_url=server.url, timeout=STEP) as http:
        by_key = await http.get("/api/me", headers=tenant.headers("alice"))
        by_token = await http.get("/api/me", headers=bearer(body["token"]))
    assert by_token.status_code == 200, by_token.text
    assert by_token.json() == by_key.json()

    short = await token_of(server.url, tenant.headers("alice"), ttl=30)
    assert short["expiresIn"] == 30 and claims(short["token"])["exp"] - claims(short["token"])["iat"] == 30
    capped = await token_of(server.url, tenant.headers("alice"), ttl=86400)
    assert capped["expiresIn"] == 900  # never longer than the server allows
    assert claims(short["token"])["jti"] != got["jti"]


async def test_a_token_has_its_keys_rights_and_no_more(server: LiveServer, tenant: Tenant) -> None:
    """A member's token is a member: admin routes are 403 and only the member's own
    conversations are visible. A token claiming more than its key (signed right, but role
    admin for a member key, or another company) is refused."""
    member = bearer((await token_of(server.url, tenant.headers("alice")))["token"])
    admin = bearer((await token_of(server.url, tenant.headers("admin")))["token"])
    async with httpx.AsyncClient(base_url=server.url, timeout=STEP) as http:
        assert_refused(await http.get("/api/keys", headers=member), "admin_required", 403)
        assert (await http.get("/api/keys", headers=admin)).status_code == 200
        bobs = await http.post("/api/conversations", json={"title": "bob's"}, headers=tenant.headers("bob"))
        assert bobs.status_code == 201, bobs.text
        assert_refused(await http.get(f"/api/conversations/{bobs.json()['id']}", headers=member), "not_found", 404)
        assert (await http.get(f"/api/conversations/{bobs.json()['id']}", headers=admin)).status_code == 200

        for forged in (forge(tenant, role="admin"), forge(tenant, company=str(uuid.uuid4()))):
            assert_refused(await http.get("/api/me", headers=bearer(forged)), "invalid_token")
        assert (await http.get("/api/me", headers=bearer(forge(tenant)))).status_code == 200  # the control


async def test_a_token_cannot_be_traded_for_another(server: LiveServer, tenant: Tenant) -> None:
    """Only the key (or the session) can ask: a stolen token cannot be made to live longer."""
    token = (await token_of(server.url, tenant.headers("alice")))["token"]
    assert_refused(await issue(server.url, bearer(token)), "token_not_allowed", 403)
    assert_refused(await issue(server.url, {}), "unauthorized")


async def test_the_session_cookie_gets_a_token_from_the_servers_own_origin(server: LiveServer, tenant: Tenant) -> None:
    """A browser session can ask for a token from the server's own pages; another origin (or a
    request with neither Origin nor Sec-Fetch-Site) is refused as every cookie write is. The
    token names the session, and signing out refuses it."""
    session = await sign_in(server.url, tenant.tokens["alice"])
    for foreign in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {}):
        assert_refused(await issue(server.url, {**cookie(session), **foreign}), "origin_refused", 403)

    body = await token_of(server.url, {**cookie(session), "Origin": server.url})
    got = claims(body["token"])
    assert got["sub"] == str(tenant.principals["alice"].key_id) and uuid.UUID(got["sid"])
    async with httpx.AsyncClient(base_url=server.url, timeout=STEP) as http:
        assert (await http.get("/api/me", headers=bearer(body["token"]))).status_code == 200
        await sign_out(server.url, session)
        assert_refused(await http.get("/api/me", headers=bearer(body["token"])), "invalid_credentials")
        # The key's own tokens are not the session's: they stay valid.
        assert (await http.get("/api/me", headers=bearer(forge(tenant)))).status_code == 200


# -- refusing -------------------------------------------------------------------------------------


def bad_tokens(tenant: Tenant) -> dict[str, tuple[str, str]]:
    """Tokens the server must refuse, each with the error code it answers."""
    now = int(time.time())
    good = forge(tenant)
    head, payload, _ = good.split(".")
    return {
        "expired": (forge(tenant, iat=now - 120, exp=now - 60), "token_expired"),
        "tampered": (tampered(good), "invalid_token"),
        "wrong_secret": (forge(tenant, secret="another-secret-" + "x" * 40), "invalid_token"),
        "wrong_audience": (forge(tenant, aud="someone-else"), "invalid_token"),
        "wrong_issuer": (forge(tenant, iss="someone-else"), "invalid_token"),
        "no_expiry": (forge(tenant, exp=None), "invalid_token"),
        "issued_in_the_future": (forge(tenant, iat=now + 3600, exp=now + 7200), "invalid_token"),
        "unsigned": (f"{head}.{payload}.", "invalid_token"),
        "alg_none": (jwt.encode({"sub": "x"}, None, algorithm="none"), "invalid_token"),
        "not_our_claims": (forge(tenant, sub="not-a-uuid"), "invalid_token"),
        "unknown_key": (forge(tenant, sub=str(uuid.uuid4())), "invalid_credentials"),
        "garbage": ("a.b.c", "invalid_token"),
    }


async def test_bad_tokens_are_refused_on_rest_sse_and_the_socket(server: LiveServer, tenant: Tenant) -> None:
    conversation_id = await running_answer(server.url, tenant, tenant.headers("alice"))
    async with httpx.AsyncClient(base_url=server.url, timeout=STEP) as http:
        for case, (token, code) in bad_tokens(tenant).items():
            r = await http.get("/api/me", headers=bearer(token))
            assert r.status_code == 401, (case, r.text)
            assert_refused(r, code)
            r = await http.get(f"/api/conversations/{conversation_id}/stream", headers=bearer(token))
            assert_refused(r, code)
            await refused_upgrade(server, bearer(token))
    assert_clean(server)


# -- using ----------------------------------------------------------------------------------------


async def test_a_token_works_on_sse_and_the_socket(server: LiveServer, tenant: Tenant) -> None:
    token = bearer((await token_of(server.url, tenant.headers("alice")))["token"])
    conversation_id = await running_answer(server.url, tenant, token)
    async with (
        subscribed_socket(server, token, conversation_id) as ws,
        open_stream(server.url, token, conversation_id),
    ):
        await ping(ws, "works")


async def test_revoking_the_key_closes_what_its_tokens_opened(server: LiveServer, tenant: Tenant) -> None:
    """Revocation wins over a token that has not expired: its socket and stream close at once,
    and the token is refused from then on."""
    key_id, key = await new_key(server.url, tenant)
    token = bearer((await token_of(server.url, bearer(key)))["token"])
    conversation_id = await running_answer(server.url, tenant, token)
    async with (
        subscribed_socket(server, token, conversation_id) as ws,
        open_stream(server.url, token, conversation_id) as stream,
    ):
        await revoke(server.url, tenant, key_id)
        await revoked_close(ws)
        await revoked_end(stream)
    async with httpx.AsyncClient(base_url=server.url, timeout=STEP) as http:
        assert_refused(await http.get("/api/me", headers=token), "invalid_credentials")
    await refused_upgrade(server, token)
    assert_clean(server)


# -- expiry and refresh on the socket -------------------------------------------------------------


async def test_a_socket_is_told_before_its_token_expires_and_refreshes_in_place(
    server: LiveServer, tenant: Tenant
) -> None:
    """`token_expiring` (with the token's expiry) arrives before the expiry; a `refresh` with a
    new token of the same key is acked, and the socket keeps working past the old expiry, on
    the same connection: the answer's tokens keep arriving, and a ping is answered."""
    first = await token_of(server.url, tenant.headers("alice"), ttl=4)
    second = await token_of(server.url, tenant.headers("alice"), ttl=60)
    conversation_id = await running_answer(server.url, tenant, tenant.headers("alice"))
    async with subscribed_socket(server, bearer(first["token"]), conversation_id) as ws:
        notice = await frame_of_type(ws, "token_expiring")
        expiry = claims(first["token"])["exp"]
        assert datetime.fromisoformat(notice["expiresAt"]).timestamp() == expiry
        assert 0 <= notice["expiresIn"] <= 2  # told at half-life for a short token
        assert time.time() < expiry + 0.5  # and before the expiry (clocks round to the second)

        await ws.send(json.dumps({"type": "refresh", "ref": "r1", "token": second["token"]}))
        ack = await frame_of_type(ws, "ack")
        assert ack == {"type": "ack", "ref": "r1"}
        # Past the old expiry (and the leeway a check would allow), the answer still streams.
        with anyio.fail_after(STEP + 10):
            while time.time() < expiry + 2:
                frame = await next_frame(ws)
                assert frame["type"] not in ("error", "token_expiring"), frame
        await ping(ws, "still here")
        assert ws.close_code is None


async def test_a_socket_whose_token_expires_unrefreshed_is_closed(server: LiveServer, tenant: Tenant) -> None:
    body = await token_of(server.url, tenant.headers("alice"), ttl=2)
    async with socket(server, bearer(body["token"])) as ws:
        frames = await frames_until_closed(ws, STEP)
    kinds = [frame["type"] for frame in frames]
    assert kinds == ["token_expiring", "error"], frames
    assert frames[-1]["code"] == "token_expired", frames
    assert ws.close_code == 4401 and ws.close_reason == "token expired", (ws.close_code, ws.close_reason)
    assert time.time() >= claims(body["token"])["exp"] - 0.5


async def test_a_refresh_with_other_credentials_is_refused_and_changes_nothing(
    server: LiveServer, tenant: Tenant
) -> None:
    """Another key's token, a bad token or a key is refused with `invalid_token`; the socket
    keeps its token and still expires when that one does. A socket opened with a key has
    nothing to refresh (`invalid_request`)."""
    body = await token_of(server.url, tenant.headers("alice"), ttl=4)  # the refusals take milliseconds
    bobs = (await token_of(server.url, tenant.headers("bob")))["token"]
    admins = (await token_of(server.url, tenant.headers("admin")))["token"]
    expired = forge(tenant, iat=int(time.time()) - 120, exp=int(time.time()) - 60)
    async with socket(server, bearer(body["token"])) as ws:
        for ref, token, reason in (
            ("bob", bobs, None),
            ("admin", admins, None),
            ("expired", expired, "token_expired"),
            ("garbage", "a.b.c", "invalid_token"),
            ("key", tenant.tokens["alice"], None),
        ):
            await ws.send(json.dumps({"type": "refresh", "ref": ref, "token": token}))
            error = await next_frame(ws)
            while error["type"] == "token_expiring":
                error = await next_frame(ws)
            assert error["type"] == "error" and error["code"] == "invalid_token" and error["ref"] == ref, error
            if reason is not None:
                assert error["details"] == {"reason": reason}, error
        await ping(ws, "unchanged")
        frames = await frames_until_closed(ws, STEP)
    assert frames and frames[-1]["code"] == "token_expired", frames
    assert ws.close_code == 4401

    async with socket(server, tenant.headers("alice")) as ws:
        await ws.send(json.dumps({"type": "refresh", "ref": "k", "token": body["token"]}))
        error = await next_frame(ws)
        assert error["type"] == "error" and error["code"] == "invalid_request" and error["ref"] == "k", error
        await ping(ws, "key socket")


async def test_an_sse_stream_opened_with_a_token_ends_at_its_expiry(server: LiveServer, tenant: Tenant) -> None:
    """The stream ends with `event: expired` (code `token_expired`), no `id:`; the client
    reconnects with a new token and its cursor."""
    body = await token_of(server.url, tenant.headers("alice"), ttl=2)
    conversation_id = await running_answer(server.url, tenant, tenant.headers("alice"))
    async with open_stream(server.url, bearer(body["token"]), conversation_id) as stream:
        with anyio.fail_after(STEP):
            events = await stream
    event, data = events[-1]
    assert event == "expired" and json.loads(data)["code"] == "token_expired", events[-3:]
    assert not any(e in ("done", "cancelled", "error", "revoked") for e, _ in events), events[-3:]
    assert_clean(server)


# -- a server without a secret --------------------------------------------------------------------


async def test_without_a_secret_no_token_is_issued_or_accepted(tenant: Tenant) -> None:
    with LiveServer({"CHATSTREAM_TOKEN_SECRET": ""}) as disabled:
        body = assert_refused(await issue(disabled.url, tenant.headers("alice")), "tokens_disabled", 503)
        assert "CHATSTREAM_TOKEN_SECRET" in body["error"]
        async with httpx.AsyncClient(base_url=disabled.url, timeout=STEP) as http:
            assert_refused(await http.get("/api/me", headers=bearer(forge(tenant))), "invalid_token")
        await refused_upgrade(disabled, bearer(forge(tenant)))
        assert_clean(disabled)
