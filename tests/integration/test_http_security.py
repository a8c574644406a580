"""Browser-facing protections (issue #14 points 4, 8 and the Host part of 9): JSON-only
bodies, `Origin` / `Sec-Fetch-Site` checks on cookie-authenticated writes and on login,
the Host check against DNS rebinding, and the security headers of every response."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import msgspec
import pytest
import websockets

from app.config import get_settings
from app.main import create_app
from app.tables import ApiKey
from tests.factories import Tenant
from tests.integration.live_server import LiveServer

pytestmark = pytest.mark.anyio

ORIGIN = "http://testserver"
SAME_SITE_ORIGIN = "http://testserver:9000"  # another port of the same host: same site, not same origin


@asynccontextmanager
async def app_client(host: str = "testserver", **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An ASGI client of an app with the given settings changed, sending `Host: host`."""
    application = create_app(msgspec.structs.replace(get_settings(), **settings))
    async with application.lifespan():
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url=f"http://{host}") as client:
            yield client


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "code", "details"} and body["code"] == code, body


async def signed_in(client: httpx.AsyncClient, token: str) -> httpx.AsyncClient:
    """The client holding a session cookie, as a browser does after signing in."""
    own_origin = f"{client.base_url.scheme}://{client.base_url.netloc.decode()}"
    r = await client.post("/api/session", json={"key": token}, headers={"Origin": own_origin})
    assert r.status_code == 200, r.text
    assert client.cookies.get(get_settings().cookie_name)
    return client


# -- request bodies must be JSON ---------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        None,
    ],
)
async def test_a_body_that_is_not_declared_json_is_415_for_every_caller(
    client: httpx.AsyncClient, acme: Tenant, content_type: str | None
) -> None:
    headers = acme.headers("admin") | ({"Content-Type": content_type} if content_type else {})
    before = await ApiKey.count()
    r = await client.post("/api/keys", content=b'{"name": "sneaky", "role": "admin"}', headers=headers)
    assert_error(r, 415, "unsupported_media_type")
    r = await client.post("/api/session", content=b'{"key": "x"}', headers={"Content-Type": content_type or ""})
    assert_error(r, 415, "unsupported_media_type")
    assert await ApiKey.count() == before


async def test_json_with_parameters_and_bodiless_writes_still_work(client: httpx.AsyncClient, acme: Tenant) -> None:
    h = acme.headers("alice")
    r = await client.post(
        "/api/conversations", content=b'{"title": "t"}', headers=h | {"Content-Type": "application/json; charset=utf-8"}
    )
    assert r.status_code == 201, r.text
    assert (await client.delete(f"/api/conversations/{r.json()['id']}", headers=h)).status_code == 204


# -- cookie-authenticated writes come from the server's own pages ------------------------


@pytest.mark.parametrize(
    "browser_headers",
    [
        {"Origin": SAME_SITE_ORIGIN},
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "same-site"},
        {"Sec-Fetch-Site": "cross-site"},
        {},  # neither: refused, a cookie request must say where it comes from
    ],
)
async def test_a_cookie_write_from_another_origin_is_refused(
    client: httpx.AsyncClient, acme: Tenant, browser_headers: dict[str, str]
) -> None:
    await signed_in(client, acme.tokens["admin"])
    before = await ApiKey.count()
    r = await client.post("/api/keys", json={"name": "planted", "role": "admin"}, headers=browser_headers)
    assert_error(r, 403, "origin_refused")
    r = await client.post("/api/agents", json={"name": "planted"}, headers=browser_headers)
    assert_error(r, 403, "origin_refused")
    assert await ApiKey.count() == before


@pytest.mark.parametrize("browser_headers", [{"Origin": ORIGIN}, {"Sec-Fetch-Site": "same-origin"}])
async def test_a_cookie_write_from_the_own_origin_works(
    client: httpx.AsyncClient, acme: Tenant, browser_headers: dict[str, str]
) -> None:
    await signed_in(client, acme.tokens["admin"])
    r = await client.post("/api/keys", json={"name": "mine"}, headers=browser_headers)
    assert r.status_code == 201, r.text
    r = await client.delete("/api/session", headers=browser_headers)
    assert r.status_code == 204, r.text


async def test_bearer_requests_are_not_origin_checked(client: httpx.AsyncClient, acme: Tenant) -> None:
    r = await client.post("/api/keys", json={"name": "k"}, headers=acme.headers("admin") | {"Origin": SAME_SITE_ORIGIN})
    assert r.status_code == 201, r.text


async def test_the_public_url_and_listed_origins_are_own_origins(acme: Tenant) -> None:
    settings = {"public_url": "https://chat.example.com", "allowed_origins": "https://app.example.com"}
    async with app_client("chat.example.com", **settings) as client:
        await signed_in(client, acme.tokens["admin"])
        for origin in ("https://chat.example.com", "https://app.example.com"):
            r = await client.post("/api/conversations", json={}, headers={"Origin": origin})
            assert r.status_code == 201, r.text
        r = await client.post("/api/conversations", json={}, headers={"Origin": "https://chat.example.com:8443"})
        assert_error(r, 403, "origin_refused")


# -- login CSRF --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "browser_headers", [{"Origin": SAME_SITE_ORIGIN}, {"Sec-Fetch-Site": "same-site"}, {"Sec-Fetch-Site": "cross-site"}]
)
async def test_a_login_from_another_origin_is_refused(
    client: httpx.AsyncClient, acme: Tenant, browser_headers: dict[str, str]
) -> None:
    r = await client.post("/api/session", json={"key": acme.tokens["alice"]}, headers=browser_headers)
    assert_error(r, 403, "origin_refused")
    assert "set-cookie" not in r.headers


async def test_a_login_without_browser_headers_works(client: httpx.AsyncClient, acme: Tenant) -> None:
    """curl and scripts send neither header, and cannot be made to log a victim in."""
    r = await client.post("/api/session", json={"key": acme.tokens["alice"]})
    assert r.status_code == 200, r.text


# -- the Host check ----------------------------------------------------------------------


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1:1234", "[::1]:8000"])
async def test_loopback_hosts_are_allowed_without_a_public_url(host: str) -> None:
    async with app_client(host, allowed_hosts="") as client:
        assert_error(await client.get("/api/me"), 401, "unauthorized")


@pytest.mark.parametrize("host", ["rebind.evil.example", "rebind.evil.example:8000", "testserver", "192.168.1.5"])
async def test_other_hosts_are_refused_without_a_public_url(host: str) -> None:
    async with app_client(host, allowed_hosts="") as client:
        for path in ("/api/me", "/", "/app.js", "/schema/openapi.json"):
            assert_error(await client.get(path), 400, "host_not_allowed")
        assert_error(await client.post("/api/session", json={"key": "x"}), 400, "host_not_allowed")
        # Load balancers probe with any Host.
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200


async def test_with_a_public_url_only_its_host_and_listed_hosts_are_allowed() -> None:
    settings = {"public_url": "https://chat.example.com", "allowed_hosts": "chat-internal.example.com"}
    for host in ("chat.example.com", "CHAT.example.com:443", "chat-internal.example.com"):
        async with app_client(host, **settings) as client:
            assert_error(await client.get("/api/me"), 401, "unauthorized")
    for host in ("localhost:8000", "evil.example"):
        async with app_client(host, **settings) as client:
            assert_error(await client.get("/api/me"), 400, "host_not_allowed")


async def test_a_star_turns_the_host_check_off() -> None:
    async with app_client("anything.example", allowed_hosts="*", public_url="https://chat.example.com") as client:
        assert_error(await client.get("/api/me"), 401, "unauthorized")


@pytest.fixture(scope="module")
def public_server() -> Iterator[LiveServer]:
    """A real server whose public URL is elsewhere: 127.0.0.1 is then a foreign host."""
    with LiveServer({"CHATSTREAM_PUBLIC_URL": "https://chat.example.com", "CHATSTREAM_ALLOWED_HOSTS": ""}) as live:
        yield live


async def test_a_real_server_refuses_foreign_hosts_for_http_and_websocket(
    public_server: LiveServer, acme: Tenant
) -> None:
    async with httpx.AsyncClient(base_url=public_server.url) as http:
        assert_error(await http.get("/", headers=acme.headers("alice")), 400, "host_not_allowed")
        assert (await http.get("/healthz")).status_code == 200
        r = await http.get("/api/me", headers=acme.headers("alice") | {"Host": "chat.example.com"})
        assert r.status_code == 200, r.text
    ws_url = public_server.url.replace("http://", "ws://") + "/api/ws"
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(ws_url, additional_headers=acme.headers("alice")):
            pass
    assert refused.value.response.status_code == 403
    assert "Traceback" not in public_server.output()


# -- security headers --------------------------------------------------------------------

EXPECTED_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


async def test_every_response_has_the_security_headers(client: httpx.AsyncClient, acme: Tenant) -> None:
    responses = [
        await client.get("/"),
        await client.get("/app.js"),
        await client.get("/app.css"),
        await client.get("/no-such-file"),
        await client.get("/api/me"),  # 401
        await client.get("/api/me", headers=acme.headers("alice")),
        await client.post("/api/conversations", content=b"x", headers={"Content-Type": "text/plain"}),  # 415
        await client.get("/schema/openapi.json"),
        await client.get("/healthz"),
    ]
    for r in responses:
        got = {name: r.headers.get(name) for name in EXPECTED_HEADERS}
        assert got == EXPECTED_HEADERS, (r.request.method, r.request.url, r.status_code, got)


async def test_the_schema_is_json_only_no_html_viewer(client: httpx.AsyncClient) -> None:
    """Litestar's viewers load unpinned scripts from a CDN into the app's origin: none is served."""
    for path in ("/schema/swagger", "/schema/redoc", "/schema/elements", "/schema/rapidoc", "/schema/scalar"):
        r = await client.get(path)
        assert r.status_code == 404 and "<script" not in r.text.lower(), (path, r.status_code)
    for path in ("/schema", "/schema/openapi.json"):
        r = await client.get(path)
        assert r.headers["content-type"].startswith("application/vnd.oai.openapi+json"), path
        assert r.json()["openapi"].startswith("3."), path
