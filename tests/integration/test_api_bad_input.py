"""Bad input is refused in the error shape, never with a 500 or a traceback, and changes nothing.

DESIGN.md "HTTP API": errors are always `{"error": str, "code": str, "details": …}`;
400 for malformed/invalid input (which field, why), 401, 403, 404, 409, 413 too large
(content ≤ 50,000 chars, title ≤ 200). "No input, however bad, gives a 500 or a
traceback, or loses stored data." Every rejected request below is checked for the
status, the exact shape, the absence of a traceback, and unchanged stored rows.
"""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import httpx
import pytest
from litestar import Litestar
from litestar.routes import HTTPRoute

from app.config import get_settings
from app.streaming.parts import Part, encode_parts
from app.tables import Agent, ApiKey, Conversation, Generation, Message
from tests.factories import Tenant

pytestmark = pytest.mark.anyio

MAX_CONTENT = 50_000  # DESIGN: content ≤ 50,000 characters
MAX_TITLE = 200  # DESIGN: title ≤ 200 characters
ERROR_KEYS = {"error", "code", "details"}
DETAIL_KEYS = {"field", "message", "source"}


# --- helpers -------------------------------------------------------------------------


def assert_error_shape(response: httpx.Response) -> dict[str, Any]:
    """A rejection: 4xx, JSON with exactly error/code/details, str error and code, no traceback."""
    where = f"{response.request.method} {response.request.url.path}"
    assert 400 <= response.status_code < 500, f"{where}: {response.status_code} {response.text[:500]}"
    assert "Traceback" not in response.text, f"{where} leaked a traceback: {response.text[:500]}"
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict), body
    assert set(body) == ERROR_KEYS, f"{where}: {body}"
    assert isinstance(body["error"], str) and body["error"], body
    assert isinstance(body["code"], str) and body["code"], body
    return body


def named_fields(body: dict[str, Any]) -> list[str]:
    """The fields an error names: `details.field` for 413 too_large, else the 400 details list."""
    details = body["details"]
    if body["code"] == "too_large":
        assert isinstance(details, dict) and set(details) == {"field", "maxLength", "length"}, body
        return [details["field"]]
    assert isinstance(details, list) and details, f"400 details must be a list of {{field, message, source}}: {body}"
    for entry in details:
        assert isinstance(entry, dict) and set(entry) == DETAIL_KEYS, f"detail entry not {DETAIL_KEYS}: {body}"
    return [entry["field"] for entry in details]


def assert_error(
    response: httpx.Response,
    status: int,
    code: str,
    *,
    field: str | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """`assert_error_shape`, plus this status and code, and (if given) the field it names and its source."""
    body = assert_error_shape(response)
    assert response.status_code == status, f"expected {status}, got {response.status_code}: {body}"
    assert body["code"] == code, body
    if field is not None:
        assert field in named_fields(body), f"{field!r} not named in {body}"
    if source is not None:
        assert any(d.get("field") == field and d.get("source") == source for d in body["details"]), body
    if status == 401:
        assert response.headers.get("www-authenticate") == "Bearer", response.headers
    return body


async def snapshot(*tenants: Tenant) -> dict[str, list[dict[str, Any]]]:
    """Every stored row of these companies. `last_used_at` of keys is left out: authentication refreshes it."""
    companies = [t.company_id for t in tenants]
    return {
        "conversations": await Conversation.select()
        .where(Conversation.company.is_in(companies))
        .order_by(Conversation.id),
        "messages": await Message.select(Message.all_columns())
        .where(Message.conversation.company.is_in(companies))
        .order_by(Message.id),
        "generations": await Generation.select(Generation.all_columns())
        .where(Generation.conversation.company.is_in(companies))
        .order_by(Generation.id),
        "agents": await Agent.select().where(Agent.company.is_in(companies)).order_by(Agent.id),
        "keys": await ApiKey.select(ApiKey.all_columns(exclude=[ApiKey.last_used_at]))
        .where(ApiKey.company.is_in(companies))
        .order_by(ApiKey.id),
    }


@dataclass
class World:
    """Two companies with data in them. Conversations have no agent, so nothing is generated."""

    acme: Tenant
    globex: Tenant
    conversation: UUID  # alice's, in acme
    message: UUID  # alice's own message in it
    admin_message: UUID  # acme's admin's message in alice's conversation
    agent_message: UUID  # an agent's message in alice's conversation
    bob_conversation: UUID
    bob_message: UUID
    globex_conversation: UUID  # globex admin's
    globex_message: UUID

    @property
    def agent(self) -> UUID:
        return self.acme.agent_id

    @property
    def key(self) -> UUID:
        """Bob's API key in acme."""
        return self.acme.principals["bob"].key_id

    def url(self, template: str) -> str:
        """Fill `{conversation}`, `{message}`, `{agent}`, `{key}` … with this world's ids."""
        return template.format(**{name: getattr(self, name) for name in re.findall(r"{(\w+)}", template)})

    def headers(self, who: str | None) -> dict[str, str]:
        """`admin`/`alice`/`bob` of acme, `globex` for globex's admin, None for no credentials."""
        if who is None:
            return {}
        if who == "globex":
            return self.globex.headers("admin")
        return self.acme.headers(who)

    async def snapshot(self) -> dict[str, list[dict[str, Any]]]:
        return await snapshot(self.acme, self.globex)


async def _conversation(client: httpx.AsyncClient, headers: dict[str, str], title: str) -> UUID:
    r = await client.post("/api/conversations", json={"title": title}, headers=headers)
    assert r.status_code == 201, r.text
    return UUID(r.json()["id"])


async def _message(client: httpx.AsyncClient, headers: dict[str, str], conversation: UUID, content: str) -> UUID:
    r = await client.post(
        f"/api/conversations/{conversation}/messages",
        json={"content": content, "reply": False},
        headers=headers,
    )
    assert r.status_code == 201, r.text
    return UUID(r.json()["message"]["id"])


@pytest.fixture
async def world(client: httpx.AsyncClient, acme: Tenant, globex: Tenant) -> World:
    alice, admin, bob, gx = acme.headers("alice"), acme.headers("admin"), acme.headers("bob"), globex.headers("admin")
    conversation = await _conversation(client, alice, "alice's")
    message = await _message(client, alice, conversation, "hello from alice")
    admin_message = await _message(client, admin, conversation, "hello from the admin")
    agent_message = Message(conversation=conversation, role="agent", content="hello from the agent")
    await agent_message.save()
    bob_conversation = await _conversation(client, bob, "bob's")
    bob_message = await _message(client, bob, bob_conversation, "hello from bob")
    globex_conversation = await _conversation(client, gx, "globex's")
    globex_message = await _message(client, gx, globex_conversation, "hello from globex")
    return World(
        acme=acme,
        globex=globex,
        conversation=conversation,
        message=message,
        admin_message=admin_message,
        agent_message=agent_message.id,
        bob_conversation=bob_conversation,
        bob_message=bob_message,
        globex_conversation=globex_conversation,
        globex_message=globex_message,
    )


@asynccontextmanager
async def unchanged(world: World) -> AsyncIterator[None]:
    """The block's (rejected) requests leave every stored row of both companies as it was."""
    before = await world.snapshot()
    yield
    assert await world.snapshot() == before, "a rejected request changed stored rows"


async def send(
    client: httpx.AsyncClient,
    world: World,
    method: str,
    template: str,
    who: str | None,
    *,
    json: Any = None,
    content: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """One request against a path template of `world`, as `who`."""
    all_headers = {**world.headers(who), **(headers or {})}
    if content is not None:
        all_headers.setdefault("content-type", "application/json")
        return await client.request(method, world.url(template), content=content, headers=all_headers)
    return await client.request(method, world.url(template), json=json, headers=all_headers)


# Every endpoint that takes a JSON body: (method, path, caller, a valid body).
BODY_ENDPOINTS: dict[str, tuple[str, str, str | None, dict[str, Any]]] = {
    "POST conversations": ("POST", "/api/conversations", "alice", {"title": "ok"}),
    "PATCH conversation": ("PATCH", "/api/conversations/{conversation}", "alice", {"title": "ok"}),
    "POST messages": ("POST", "/api/conversations/{conversation}/messages", "alice", {"content": "ok"}),
    "PUT message": ("PUT", "/api/conversations/{conversation}/messages/{message}", "alice", {"content": "ok"}),
    "POST tool result": (
        "POST",
        "/api/conversations/{conversation}/tool-results",
        "alice",
        {"toolCallId": "call_1", "output": {"ok": True}},
    ),
    "POST agents": ("POST", "/api/agents", "admin", {"name": "ok"}),
    "PATCH agent": ("PATCH", "/api/agents/{agent}", "admin", {"name": "ok"}),
    "POST keys": ("POST", "/api/keys", "admin", {"name": "ok"}),
    "POST session": ("POST", "/api/session", None, {"key": "cs_not_a_real_key"}),
    "POST tokens": ("POST", "/api/tokens", "alice", {"ttl": 60}),
}
POST_MESSAGES = BODY_ENDPOINTS["POST messages"]


def assert_no_cookie(response: httpx.Response) -> None:
    """A refused sign-in sets no session cookie."""
    assert "set-cookie" not in response.headers, response.headers


async def test_snapshot_sees_changes(client: httpx.AsyncClient, world: World) -> None:
    """Self-check of `unchanged`: an accepted edit does change the snapshot, so the checks below are not vacuous."""
    before = await world.snapshot()
    r = await send(client, world, "PUT", BODY_ENDPOINTS["PUT message"][1], "alice", json={"content": "edited"})
    assert r.status_code == 200, r.text
    assert await world.snapshot() != before


# --- malformed JSON, wrong types, missing and unknown fields ---------------------------


@pytest.mark.parametrize("endpoint", BODY_ENDPOINTS)
async def test_malformed_json_on_every_body_endpoint(client: httpx.AsyncClient, world: World, endpoint: str) -> None:
    """A body that is not JSON is 400 `malformed_json` on every endpoint that takes one."""
    method, path, who, _ = BODY_ENDPOINTS[endpoint]
    async with unchanged(world):
        r = await send(client, world, method, path, who, content=b"{not json")
        assert_error(r, 400, "malformed_json")
        assert_no_cookie(r)


MALFORMED_BODIES = {
    "unquoted": b"{content: x}",
    "single quotes": b"{'content': 'x'}",
    "trailing garbage": b'{"content": "x"} trailing',
    "truncated": b'{"content": "x"',
    "only a brace": b"{",
    "empty body": b"",
    "NaN literal": b'{"content": NaN}',
    "byte order mark": b'\xef\xbb\xbf{"content": "x"}',
    "binary garbage": b"\xff\xfe\xfd",
    "invalid UTF-8 inside a string": b'{"content": "\xff"}',
    "NUL byte": b"\x00",
}


@pytest.mark.parametrize("body", MALFORMED_BODIES.values(), ids=MALFORMED_BODIES.keys())
async def test_malformed_json_variants(client: httpx.AsyncClient, world: World, body: bytes) -> None:
    """Any body that is not a JSON document is 400 `malformed_json` (POST messages)."""
    method, path, who, _ = POST_MESSAGES
    async with unchanged(world):
        r = await send(client, world, method, path, who, content=body)
        assert_error(r, 400, "malformed_json")


WRONG_TYPES = [
    ("POST conversations", {"title": 5}, "title"),
    ("POST conversations", {"agentId": "not-a-uuid"}, "agentId"),
    ("POST conversations", {"agentId": 12}, "agentId"),
    ("PATCH conversation", {"title": ["a"]}, "title"),
    ("PATCH conversation", {"agentId": "not-a-uuid"}, "agentId"),
    ("POST messages", {"content": 1}, "content"),
    ("POST messages", {"content": "x", "reply": "yes"}, "reply"),
    ("POST messages", {"content": "x", "clientMessageId": 7}, "clientMessageId"),
    ("PUT message", {"content": False}, "content"),
    ("POST agents", {"name": 1}, "name"),
    ("POST agents", {"name": "x", "adapter": "no-such-adapter"}, "adapter"),
    ("POST agents", {"name": "x", "config": []}, "config"),
    ("PATCH agent", {"config": "x"}, "config"),
    ("PATCH agent", {"name": None}, "name"),
    ("POST keys", {"name": "k", "role": "root"}, "role"),
    ("POST keys", {"name": "k", "userId": "nope"}, "userId"),
    ("POST session", {"key": 5}, "key"),
    ("POST tokens", {"ttl": "60"}, "ttl"),
    ("POST tokens", {"ttl": 1.5}, "ttl"),
    ("POST tokens", {"ttl": True}, "ttl"),
    ("POST tokens", {"ttl": 0}, "ttl"),
    ("POST tokens", {"ttl": -5}, "ttl"),
    ("POST tokens", {"ttl": 86401}, "ttl"),
    # JSON is typed: no lenient conversion of numbers to booleans or of text to numbers.
    ("POST messages", {"content": "x", "reply": 0}, "reply"),
    ("POST messages", {"content": "x", "reply": "false"}, "reply"),
    ("POST messages", {"content": "x", "disconnectGrace": "5"}, "disconnectGrace"),
    ("POST messages", {"content": "x", "disconnectGrace": True}, "disconnectGrace"),
]


@pytest.mark.parametrize(("endpoint", "body", "field"), WRONG_TYPES)
async def test_wrong_types(client: httpx.AsyncClient, world: World, endpoint: str, body: Any, field: str) -> None:
    """A field of the wrong type is 400 `invalid_request` naming the field."""
    method, path, who, _ = BODY_ENDPOINTS[endpoint]
    async with unchanged(world):
        r = await send(client, world, method, path, who, json=body)
        assert_error(r, 400, "invalid_request", field=field, source="body")
        assert_no_cookie(r)


MISSING_FIELDS = [
    ("POST messages", {"reply": False}, "content"),
    ("PUT message", {}, "content"),
    ("POST agents", {"adapter": "echo"}, "name"),
    ("POST keys", {"role": "member"}, "name"),
    ("POST session", {}, "key"),
]


@pytest.mark.parametrize(("endpoint", "body", "field"), MISSING_FIELDS)
async def test_missing_fields(client: httpx.AsyncClient, world: World, endpoint: str, body: Any, field: str) -> None:
    """A missing required field is 400 `invalid_request` naming the field."""
    method, path, who, _ = BODY_ENDPOINTS[endpoint]
    async with unchanged(world):
        r = await send(client, world, method, path, who, json=body)
        assert_error(r, 400, "invalid_request", field=field, source="body")


@pytest.mark.parametrize("endpoint", BODY_ENDPOINTS)
async def test_unknown_field(client: httpx.AsyncClient, world: World, endpoint: str) -> None:
    """A valid body plus one unknown field is refused (400) naming the unknown field."""
    method, path, who, valid = BODY_ENDPOINTS[endpoint]
    async with unchanged(world):
        r = await send(client, world, method, path, who, json={**valid, "surprise": 1})
        assert_error(r, 400, "invalid_request", field="surprise", source="body")
        assert_no_cookie(r)


@pytest.mark.parametrize(
    ("endpoint", "body", "field"),
    [
        ("POST messages", {"content": "x", "client_message_id": "c1"}, "client_message_id"),
        ("POST conversations", {"agent_id": None}, "agent_id"),
        ("PATCH conversation", {"Title": "x"}, "Title"),
        ("POST keys", {"name": "k", "user_id": None}, "user_id"),
    ],
)
async def test_field_names_are_camel_case_only(
    client: httpx.AsyncClient, world: World, endpoint: str, body: Any, field: str
) -> None:
    """The wire is camelCase: snake_case or differently-cased names are unknown fields, not aliases."""
    method, path, who, _ = BODY_ENDPOINTS[endpoint]
    async with unchanged(world):
        r = await send(client, world, method, path, who, json=body)
        assert_error(r, 400, "invalid_request", field=field)


# --- path ids ----------------------------------------------------------------------------

# Every route with an id: (method, path with `{bad}` where the broken id goes, caller, a valid body).
ID_ROUTES = [
    ("GET", "/api/conversations/{bad}", "alice", None),
    ("PATCH", "/api/conversations/{bad}", "alice", {"title": "x"}),
    ("DELETE", "/api/conversations/{bad}", "alice", None),
    ("GET", "/api/conversations/{bad}/messages", "alice", None),
    ("POST", "/api/conversations/{bad}/messages", "alice", {"content": "x"}),
    ("PUT", "/api/conversations/{bad}/messages/{message}", "alice", {"content": "x"}),
    ("PUT", "/api/conversations/{conversation}/messages/{bad}", "alice", {"content": "x"}),
    ("GET", "/api/conversations/{bad}/history", "alice", None),
    ("PATCH", "/api/agents/{bad}", "admin", {"name": "x"}),
    ("DELETE", "/api/agents/{bad}", "admin", None),
    ("DELETE", "/api/keys/{bad}", "admin", None),
]
BAD_IDS = {
    "word": "not-a-uuid",
    "number": "12345",
    "almost a uuid": "00000000-0000-0000-0000-00000000000g",
    "sql": "%27%20OR%201%3D1--",
    "long": "a" * 300,
    "emoji": "%F0%9F%98%80",
}


def _route_id(route: tuple[str, str, str, Any]) -> str:
    return f"{route[0]} {route[1]}"


@pytest.mark.parametrize("bad", BAD_IDS.values(), ids=BAD_IDS.keys())
@pytest.mark.parametrize("route", ID_ROUTES, ids=_route_id)
async def test_non_uuid_path_id(
    client: httpx.AsyncClient, world: World, route: tuple[str, str, str, Any], bad: str
) -> None:
    """A path id that is not a UUID is 404 `not_found` (or 400), never a 500."""
    method, template, who, body = route
    async with unchanged(world):
        r = await send(client, world, method, template.replace("{bad}", bad), who, json=body)
        assert r.status_code in (400, 404), r.text
        if r.status_code == 404:
            assert_error(r, 404, "not_found")
        else:
            assert_error_shape(r)


@pytest.mark.parametrize("route", ID_ROUTES, ids=_route_id)
async def test_unknown_uuid_path_id(client: httpx.AsyncClient, world: World, route: tuple[str, str, str, Any]) -> None:
    """A well-formed UUID that names nothing is 404 `not_found`."""
    method, template, who, body = route
    async with unchanged(world):
        r = await send(client, world, method, template.replace("{bad}", str(uuid.uuid4())), who, json=body)
        assert_error(r, 404, "not_found")


def _id_routes_of(app: Litestar) -> list[tuple[str, str]]:
    """(method, path) of every HTTP route under /api with a typed path parameter."""
    found = []
    for route in app.routes:
        if isinstance(route, HTTPRoute) and route.path.startswith("/api/") and "{" in route.path:
            found += [(m, route.path) for m in sorted(route.methods) if m not in ("OPTIONS", "HEAD")]
    return found


async def test_every_id_route_of_the_app_refuses_non_uuid_ids(
    client: httpx.AsyncClient, app: Litestar, world: World
) -> None:
    """Derived from the app itself, so new routes are covered: any path parameter that is
    not a UUID (the others being fresh UUIDs) is 400/404 in the error shape."""
    routes = _id_routes_of(app)
    expected = {(method, re.sub(r"{\w+}", "{}", path)) for method, path, *_ in ID_ROUTES}
    assert {(method, re.sub(r"{[^}]+}", "{}", path)) for method, path in routes} >= expected, routes
    async with unchanged(world):
        for method, path in routes:
            params = re.findall(r"{[^}]+}", path)
            for broken in range(len(params)):
                url = path
                for i, param in enumerate(params):
                    url = url.replace(param, "not-a-uuid" if i == broken else str(uuid.uuid4()), 1)
                r = await client.request(
                    method, url, json={} if method in ("POST", "PUT", "PATCH") else None, headers=world.headers("admin")
                )
                assert r.status_code in (400, 404), f"{method} {url}: {r.status_code} {r.text[:300]}"
                assert_error_shape(r)


# --- sizes ------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["POST messages", "PUT message"])
async def test_content_over_50000_chars(client: httpx.AsyncClient, world: World, endpoint: str) -> None:
    """Content of 50,001 characters is 413 `too_large` naming `content` with the limit and length."""
    method, path, who, _ = BODY_ENDPOINTS[endpoint]
    async with unchanged(world):
        r = await send(client, world, method, path, who, json={"content": "x" * (MAX_CONTENT + 1)})
        body = assert_error(r, 413, "too_large", field="content")
        assert body["details"] == {"field": "content", "maxLength": MAX_CONTENT, "length": MAX_CONTENT + 1}


async def test_content_limit_counts_characters_not_bytes(client: httpx.AsyncClient, world: World) -> None:
    """With two-byte characters the reported length is still in characters (50,001, not 100,002 bytes)."""
    method, path, who, _ = POST_MESSAGES
    async with unchanged(world):
        r = await send(client, world, method, path, who, json={"content": "é" * (MAX_CONTENT + 1)})
        body = assert_error(r, 413, "too_large", field="content")
        assert body["details"]["length"] == MAX_CONTENT + 1


@pytest.mark.parametrize("endpoint", ["POST messages", "PUT message"])
async def test_content_of_exactly_50000_chars_is_accepted(
    client: httpx.AsyncClient, world: World, endpoint: str
) -> None:
    """The limit is inclusive and in characters: 50,000 two-byte characters are stored."""
    method, path, who, _ = BODY_ENDPOINTS[endpoint]
    body: dict[str, Any] = {"content": "é" * MAX_CONTENT}
    if method == "POST":
        body["reply"] = False
    r = await send(client, world, method, path, who, json=body)
    assert r.status_code in (200, 201), r.text[:300]


@pytest.mark.parametrize("endpoint", ["POST conversations", "PATCH conversation"])
async def test_title_over_200_chars(client: httpx.AsyncClient, world: World, endpoint: str) -> None:
    """A title of 201 characters is 413 `too_large` naming `title` with the limit and length."""
    method, path, who, _ = BODY_ENDPOINTS[endpoint]
    async with unchanged(world):
        r = await send(client, world, method, path, who, json={"title": "t" * (MAX_TITLE + 1)})
        body = assert_error(r, 413, "too_large", field="title")
        assert body["details"] == {"field": "title", "maxLength": MAX_TITLE, "length": MAX_TITLE + 1}


@pytest.mark.parametrize("endpoint", ["POST conversations", "PATCH conversation"])
async def test_title_of_exactly_200_chars_is_accepted(client: httpx.AsyncClient, world: World, endpoint: str) -> None:
    """The title limit is inclusive: 200 characters are stored."""
    method, path, who, _ = BODY_ENDPOINTS[endpoint]
    r = await send(client, world, method, path, who, json={"title": "t" * MAX_TITLE})
    assert r.status_code in (200, 201), r.text[:300]
    assert r.json()["title"] == "t" * MAX_TITLE


BLANKS = {"empty": "", "spaces": "   ", "newline and tab": "\n\t", "unicode spaces": "\u00a0\u3000"}


@pytest.mark.parametrize("blank", BLANKS.values(), ids=BLANKS.keys())
@pytest.mark.parametrize("endpoint", ["POST messages", "PUT message"])
async def test_blank_content(client: httpx.AsyncClient, world: World, endpoint: str, blank: str) -> None:
    """Empty or whitespace-only content is 400 `invalid_request` naming `content`."""
    method, path, who, _ = BODY_ENDPOINTS[endpoint]
    async with unchanged(world):
        r = await send(client, world, method, path, who, json={"content": blank})
        assert_error(r, 400, "invalid_request", field="content", source="body")


@pytest.mark.parametrize("blank", BLANKS.values(), ids=BLANKS.keys())
@pytest.mark.parametrize("endpoint", ["POST conversations", "PATCH conversation"])
async def test_blank_title(client: httpx.AsyncClient, world: World, endpoint: str, blank: str) -> None:
    """An empty or whitespace-only title is 400 naming `title` (use null to have none)."""
    method, path, who, _ = BODY_ENDPOINTS[endpoint]
    async with unchanged(world):
        r = await send(client, world, method, path, who, json={"title": blank})
        assert_error(r, 400, "invalid_request", field="title", source="body")


@pytest.mark.parametrize("blank", BLANKS.values(), ids=BLANKS.keys())
@pytest.mark.parametrize("endpoint", ["POST agents", "PATCH agent", "POST keys"])
async def test_blank_name(client: httpx.AsyncClient, world: World, endpoint: str, blank: str) -> None:
    """A whitespace-only agent or key name is 400 naming `name`, like blank titles."""
    method, path, who, _ = BODY_ENDPOINTS[endpoint]
    async with unchanged(world):
        r = await send(client, world, method, path, who, json={"name": blank})
        assert_error(r, 400, "invalid_request", field="name", source="body")


def assert_body_too_large(response: httpx.Response) -> None:
    body = assert_error(response, 413, "body_too_large")
    assert body["details"] == {"maxBytes": get_settings().max_body_bytes}, body


@pytest.mark.parametrize("endpoint", BODY_ENDPOINTS)
async def test_body_over_size_limit(client: httpx.AsyncClient, world: World, endpoint: str) -> None:
    """A body over `max_body_bytes` is 413 `body_too_large` on every endpoint that takes one."""
    method, path, who, _ = BODY_ENDPOINTS[endpoint]
    big = b'{"x": "' + b"x" * get_settings().max_body_bytes + b'"}'
    async with unchanged(world):
        r = await send(client, world, method, path, who, content=big)
        assert_body_too_large(r)
        assert_no_cookie(r)


async def test_body_size_limit_boundary(client: httpx.AsyncClient, world: World) -> None:
    """A body of exactly `max_body_bytes` is read (here: then refused for its content length);
    one byte more is refused unread."""
    method, path, who, _ = POST_MESSAGES
    limit = get_settings().max_body_bytes
    prefix, suffix = b'{"content": "', b'"}'
    at_limit = prefix + b"z" * (limit - len(prefix) - len(suffix)) + suffix
    assert len(at_limit) == limit
    async with unchanged(world):
        r = await send(client, world, method, path, who, content=at_limit)
        assert_error(r, 413, "too_large", field="content")
        r = await send(client, world, method, path, who, content=at_limit[:-2] + b'z"}')
        assert_body_too_large(r)


async def test_chunked_body_over_size_limit(client: httpx.AsyncClient, world: World) -> None:
    """A streamed body without Content-Length is cut off at the limit too."""
    limit = get_settings().max_body_bytes

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"content": "'
        for _ in range(limit // 8192 + 2):
            yield b"c" * 8192
        yield b'"}'

    async with unchanged(world):
        r = await client.post(
            world.url(POST_MESSAGES[1]),
            content=chunks(),
            headers={**world.headers("alice"), "content-type": "application/json"},
        )
        assert "content-length" not in r.request.headers
        assert_body_too_large(r)


# --- authentication -------------------------------------------------------------------------

BAD_AUTHORIZATION = {
    "basic scheme": "Basic x",
    "basic with credentials": "Basic YWxpY2U6c2VjcmV0",
    "bearer and a space": "Bearer ",
    "bearer alone": "Bearer",
    "other scheme": "Token abc",
    "garbage token": "Bearer garbage",
    "well-formed unknown token": "Bearer cs_" + "A" * 43,
    "very long token": "Bearer " + "x" * 5000,
}


@pytest.mark.parametrize("header", BAD_AUTHORIZATION.values(), ids=BAD_AUTHORIZATION.keys())
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("GET", "/api/me", None), ("POST", "/api/conversations", {"title": "x"})],
    ids=["GET me", "POST conversations"],
)
async def test_bad_authorization_header(
    client: httpx.AsyncClient, world: World, method: str, path: str, body: Any, header: str
) -> None:
    """A wrongly formatted, unknown or garbage Authorization header is 401 `invalid_credentials`."""
    async with unchanged(world):
        r = await send(client, world, method, path, None, json=body, headers={"Authorization": header})
        assert_error(r, 401, "invalid_credentials")


BAD_ACCESS_TOKENS = {
    "three dots of nothing": "Bearer ..",
    "three words": "Bearer a.b.c",
    "base64 but not a token": "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.AAAA",
    "unsigned": "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.",
    "very long": "Bearer " + "a" * 3000 + "." + "b" * 3000 + ".c",
}


@pytest.mark.parametrize("header", BAD_ACCESS_TOKENS.values(), ids=BAD_ACCESS_TOKENS.keys())
async def test_bad_access_token(client: httpx.AsyncClient, world: World, header: str) -> None:
    """Something shaped like an access token that is not one of ours is 401 `invalid_token`,
    for any route and for asking for a token."""
    async with unchanged(world):
        for method, path, body in (("GET", "/api/me", None), ("POST", "/api/tokens", {"ttl": 60})):
            r = await send(client, world, method, path, None, json=body, headers={"Authorization": header})
            assert_error(r, 401, "invalid_token")


@pytest.mark.parametrize("body", [[], "ttl", 60, {"ttl": None, "extra": 1}], ids=["list", "string", "number", "extra"])
async def test_token_request_that_is_not_an_object(client: httpx.AsyncClient, world: World, body: Any) -> None:
    """POST /api/tokens takes no body or an object `{ttl}`; anything else is 400 `invalid_request`."""
    async with unchanged(world):
        r = await send(client, world, "POST", "/api/tokens", "alice", json=body)
        assert_error(r, 400, "invalid_request")


async def test_non_ascii_authorization_header(client: httpx.AsyncClient, world: World) -> None:
    """Bytes that are not even text in the header are 401, not a 500."""
    async with unchanged(world):
        r = await client.get("/api/me", headers={"Authorization": b"Bearer \xff\xfe"})
        assert_error(r, 401, "invalid_credentials")


async def test_garbage_session_cookie(client: httpx.AsyncClient, world: World) -> None:
    """A session cookie that is not a key is 401 `invalid_credentials`."""
    cookie = f"{get_settings().cookie_name}=garbage"
    async with unchanged(world):
        r = await client.get("/api/me", headers={"Cookie": cookie})
        assert_error(r, 401, "invalid_credentials")


def _protected_routes(app: Litestar) -> list[tuple[str, str]]:
    """(method, path) of every /api route except the (open) session routes, ids filled with UUIDs."""
    found = []
    for route in app.routes:
        if isinstance(route, HTTPRoute) and route.path.startswith("/api/") and route.path != "/api/session":
            path = re.sub(r"{[^}]+}", lambda _: str(uuid.uuid4()), route.path)
            found += [(m, path) for m in sorted(route.methods) if m not in ("OPTIONS", "HEAD")]
    return found


async def test_missing_credentials_on_every_protected_route(
    client: httpx.AsyncClient, app: Litestar, world: World
) -> None:
    """No Authorization header and no cookie: every /api route but the session is 401 `unauthorized`."""
    routes = _protected_routes(app)
    assert ("GET", "/api/me") in routes
    async with unchanged(world):
        for method, path in routes:
            r = await client.request(
                method,
                path,
                json={"title": "x", "content": "x", "name": "x"} if method in ("POST", "PUT", "PATCH") else None,
            )
            assert_error(r, 401, "unauthorized")


async def test_revoked_key(client: httpx.AsyncClient, world: World) -> None:
    """A revoked key is 401 `invalid_credentials` as a Bearer token, as a cookie, and when signing in."""
    r = await client.delete(f"/api/keys/{world.key}", headers=world.headers("admin"))
    assert r.status_code == 204, r.text
    token = world.acme.tokens["bob"]
    async with unchanged(world):
        r = await client.get("/api/me", headers={"Authorization": f"Bearer {token}"})
        assert_error(r, 401, "invalid_credentials")
        r = await client.post("/api/conversations", json={"title": "x"}, headers={"Authorization": f"Bearer {token}"})
        assert_error(r, 401, "invalid_credentials")
        r = await client.get("/api/me", headers={"Cookie": f"{get_settings().cookie_name}={token}"})
        assert_error(r, 401, "invalid_credentials")
        r = await client.post("/api/session", json={"key": token})
        assert_error(r, 401, "invalid_credentials")
        assert_no_cookie(r)


async def test_sign_in_with_unknown_key(client: httpx.AsyncClient, world: World) -> None:
    """POST /api/session with a key that does not exist is 401 and sets no cookie."""
    async with unchanged(world):
        r = await client.post("/api/session", json={"key": "cs_" + "B" * 43})
        assert_error(r, 401, "invalid_credentials")
        assert_no_cookie(r)


# --- who may touch what -----------------------------------------------------------------------

CROSS_TENANT = [
    ("GET", "/api/conversations/{conversation}", None),
    ("PATCH", "/api/conversations/{conversation}", {"title": "hijacked"}),
    ("DELETE", "/api/conversations/{conversation}", None),
    ("GET", "/api/conversations/{conversation}/messages", None),
    ("POST", "/api/conversations/{conversation}/messages", {"content": "hijacked"}),
    ("PUT", "/api/conversations/{conversation}/messages/{message}", {"content": "hijacked"}),
    ("GET", "/api/conversations/{conversation}/history", None),
    ("PATCH", "/api/agents/{agent}", {"name": "hijacked"}),
    ("DELETE", "/api/agents/{agent}", None),
    ("DELETE", "/api/keys/{key}", None),
    # acme's message under globex's own conversation
    ("PUT", "/api/conversations/{globex_conversation}/messages/{message}", {"content": "hijacked"}),
]


@pytest.mark.parametrize(("method", "path", "body"), CROSS_TENANT, ids=lambda v: v if isinstance(v, str) else "")
async def test_cross_tenant_is_not_found(
    client: httpx.AsyncClient, world: World, method: str, path: str, body: Any
) -> None:
    """Globex's admin reaching acme's conversation, message, agent or key gets 404, and nothing changes."""
    async with unchanged(world):
        r = await send(client, world, method, path, "globex", json=body)
        assert_error(r, 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/api/conversations"), ("PATCH", "/api/conversations/{globex_conversation}")],
    ids=["POST conversations", "PATCH conversation"],
)
async def test_other_company_agent_is_not_found(
    client: httpx.AsyncClient, world: World, method: str, path: str
) -> None:
    """Globex attaching acme's agent to a conversation is 404; the title sent along is not applied either."""
    async with unchanged(world):
        r = await send(client, world, method, path, "globex", json={"title": "changed", "agentId": str(world.agent)})
        assert_error(r, 404, "not_found")


MEMBER_SCOPE = [
    ("GET", "/api/conversations/{conversation}", None),
    ("PATCH", "/api/conversations/{conversation}", {"title": "mine now"}),
    ("DELETE", "/api/conversations/{conversation}", None),
    ("GET", "/api/conversations/{conversation}/messages", None),
    ("POST", "/api/conversations/{conversation}/messages", {"content": "hi"}),
    ("PUT", "/api/conversations/{conversation}/messages/{message}", {"content": "edited"}),
    ("GET", "/api/conversations/{conversation}/history", None),
]


@pytest.mark.parametrize(("method", "path", "body"), MEMBER_SCOPE, ids=lambda v: v if isinstance(v, str) else "")
async def test_member_cannot_reach_another_members_conversation(
    client: httpx.AsyncClient, world: World, method: str, path: str, body: Any
) -> None:
    """Bob (a member) reaching alice's conversation in the same company gets 404."""
    async with unchanged(world):
        r = await send(client, world, method, path, "bob", json=body)
        assert_error(r, 404, "not_found")


@pytest.mark.parametrize("message", ["agent_message", "admin_message"])
async def test_member_cannot_edit_agent_or_other_authors_message(
    client: httpx.AsyncClient, world: World, message: str
) -> None:
    """Alice may not edit the agent's message, nor the admin's message in her own conversation: 403."""
    async with unchanged(world):
        r = await send(
            client,
            world,
            "PUT",
            f"/api/conversations/{{conversation}}/messages/{{{message}}}",
            "alice",
            json={"content": "rewritten"},
        )
        assert_error(r, 403, "forbidden")


ADMIN_ROUTES = [
    ("POST", "/api/agents", {"name": "mine"}),
    ("PATCH", "/api/agents/{agent}", {"name": "mine"}),
    ("DELETE", "/api/agents/{agent}", None),
    ("GET", "/api/keys", None),
    ("POST", "/api/keys", {"name": "mine", "role": "admin"}),
    ("DELETE", "/api/keys/{key}", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES, ids=lambda v: v if isinstance(v, str) else "")
async def test_member_on_admin_route(
    client: httpx.AsyncClient, world: World, method: str, path: str, body: Any
) -> None:
    """A member calling an admin route is 403 `admin_required`."""
    async with unchanged(world):
        r = await send(client, world, method, path, "alice", json=body)
        assert_error(r, 403, "admin_required")


async def test_client_message_id_reused_with_other_content(client: httpx.AsyncClient, world: World) -> None:
    """The same clientMessageId with different content is 409 `client_message_id_conflict`; the first stays."""
    path = POST_MESSAGES[1]
    first = {"content": "first", "clientMessageId": "c-1", "reply": False}
    r = await send(client, world, "POST", path, "alice", json=first)
    assert r.status_code == 201, r.text
    first_id = r.json()["message"]["id"]
    async with unchanged(world):
        r = await send(client, world, "POST", path, "alice", json={**first, "content": "second"})
        body = assert_error(r, 409, "client_message_id_conflict")
        assert body["details"] == {"clientMessageId": "c-1", "messageId": first_id}
        # the same id and content, but from another author (the admin), is a conflict too
        r = await send(client, world, "POST", path, "admin", json=first)
        assert_error(r, 409, "client_message_id_conflict")


# --- query parameters --------------------------------------------------------------------------

LIST_ROUTES = ["/api/conversations", "/api/conversations/{conversation}/messages"]
BAD_LIMITS = ["0", "101", "abc", "-1", "1.5", ""]


@pytest.mark.parametrize("limit", BAD_LIMITS)
@pytest.mark.parametrize("path", LIST_ROUTES)
async def test_invalid_limit(client: httpx.AsyncClient, world: World, path: str, limit: str) -> None:
    """`limit` outside 1..100 or not an integer is 400 naming `limit` in the query."""
    async with unchanged(world):
        r = await client.get(world.url(path), params={"limit": limit}, headers=world.headers("alice"))
        assert_error(r, 400, "invalid_request", field="limit", source="query")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


BAD_CURSORS = {
    "word": "zzz",
    "not ascii": "é",
    "not base64": "!!!!",
    "empty list": _b64(b"[]"),
    "not json": _b64(b"not json"),
    "naive datetime": _b64(b'["2020-01-01T00:00:00","00000000-0000-0000-0000-000000000000"]'),
    "wrong types": _b64(b"[1, 2]"),
    "binary": _b64(b"\xff\xfe\x00"),
}


@pytest.mark.parametrize("cursor", BAD_CURSORS.values(), ids=BAD_CURSORS.keys())
async def test_invalid_cursor(client: httpx.AsyncClient, world: World, cursor: str) -> None:
    """A `cursor` this API did not hand out is 400 `invalid_cursor` naming `cursor` in the query."""
    async with unchanged(world):
        r = await client.get("/api/conversations", params={"cursor": cursor}, headers=world.headers("alice"))
        assert_error(r, 400, "invalid_cursor", field="cursor", source="query")


@pytest.mark.parametrize("before", ["zzz", "", "12345"])
async def test_before_not_a_uuid(client: httpx.AsyncClient, world: World, before: str) -> None:
    """`before` that is not a UUID is 400 naming `before` in the query."""
    async with unchanged(world):
        r = await client.get(world.url(LIST_ROUTES[1]), params={"before": before}, headers=world.headers("alice"))
        assert_error(r, 400, "invalid_request", field="before", source="query")


@pytest.mark.parametrize("before", ["nil", "bob_message", "globex_message"])
async def test_before_not_a_message_of_the_conversation(client: httpx.AsyncClient, world: World, before: str) -> None:
    """`before` naming no message, or a message of another conversation or company, is 400 `invalid_cursor`."""
    value = str(UUID(int=0)) if before == "nil" else str(getattr(world, before))
    async with unchanged(world):
        r = await client.get(world.url(LIST_ROUTES[1]), params={"before": value}, headers=world.headers("alice"))
        assert_error(r, 400, "invalid_cursor", field="before", source="query")


# --- anything at all ---------------------------------------------------------------------------------

DEEP = 5000
FUZZ_BODIES: dict[str, bytes] = {
    "null": b"null",
    "empty array": b"[]",
    "string": b'"str"',
    "number": b"1",
    "boolean": b"true",
    "empty object": b"{}",
    "content null": b'{"content": null}',
    "content object": b'{"content": {}}',
    "content array": b'{"content": ["a"]}',
    "content float": b'{"content": 1.5}',
    "content operator object": b'{"content": {"$gt": ""}}',
    "reply null": b'{"content": "x", "reply": null}',
    "clientMessageId empty": b'{"content": "x", "clientMessageId": ""}',
    "clientMessageId too long": b'{"content": "x", "clientMessageId": "' + b"i" * 101 + b'"}',
    "capitalised field": b'{"Content": "x"}',
    "huge number": b'{"content": 1e999}',
    "lone surrogate": b'{"content": "\\ud800"}',
    "invalid UTF-8 in string": b'{"content": "\xc3\x28"}',
    "binary": bytes(range(256)),
    "deeply nested arrays": b"[" * DEEP + b"]" * DEEP,
    "deeply nested content": b'{"content": ' + b'{"a": ' * DEEP + b"1" + b"}" * DEEP + b"}",
    "many unknown fields": b"{" + b",".join(b'"f%d": %d' % (i, i) for i in range(2000)) + b"}",
}


@pytest.mark.parametrize("body", FUZZ_BODIES.values(), ids=FUZZ_BODIES.keys())
async def test_weird_bodies_on_post_messages(client: httpx.AsyncClient, world: World, body: bytes) -> None:
    """Whatever the body, POST messages answers 4xx in the error shape, never a 500, and stores nothing."""
    method, path, who, _ = POST_MESSAGES
    async with unchanged(world):
        r = await send(client, world, method, path, who, content=body)
        assert_error_shape(r)


NUL_FIELDS = [
    pytest.param("POST messages", {"content": "a\u0000b", "reply": False}, id="POST messages content"),
    pytest.param(
        "POST messages",
        {"content": "ok", "clientMessageId": "a\u0000b", "reply": False},
        id="POST messages clientMessageId",
    ),
    pytest.param("PUT message", {"content": "a\u0000b"}, id="PUT message content"),
    pytest.param("POST conversations", {"title": "a\u0000b"}, id="POST conversations title"),
    pytest.param("PATCH conversation", {"title": "a\u0000b"}, id="PATCH conversation title"),
    pytest.param("POST agents", {"name": "a\u0000b"}, id="POST agents name"),
    pytest.param("PATCH agent", {"name": "a\u0000b"}, id="PATCH agent name"),
    pytest.param("POST keys", {"name": "a\u0000b"}, id="POST keys name"),
    pytest.param("POST session", {"key": "a\u0000b"}, id="POST session key"),
]


@pytest.mark.parametrize(("endpoint", "body"), NUL_FIELDS)
async def test_nul_character_in_text_fields(client: httpx.AsyncClient, world: World, endpoint: str, body: Any) -> None:
    """A NUL character (valid JSON, `\\u0000`) in any text field is never a 500: either stored or
    refused in the error shape with nothing changed. (PostgreSQL text cannot hold NUL.)"""
    method, path, who, _ = BODY_ENDPOINTS[endpoint]
    before = await world.snapshot()
    r = await send(client, world, method, path, who, json=body)
    assert r.status_code < 500, f"{method} {path} {body!r}: {r.status_code} {r.text}"
    if r.status_code >= 400:
        assert_error_shape(r)
        assert await world.snapshot() == before


async def test_method_not_allowed_and_unknown_path(client: httpx.AsyncClient, world: World) -> None:
    """Routing errors use the error shape too: 405 for a wrong method, 404 for no such path."""
    async with unchanged(world):
        r = await client.put("/api/conversations", json={}, headers=world.headers("alice"))
        assert_error(r, 405, "method_not_allowed")
        r = await client.get("/api/no-such-thing", headers=world.headers("alice"))
        assert_error(r, 404, "not_found")


_OBJECT_SCHEMA = {"type": "object", "properties": {}}
BAD_AGENT_TOOLS = {
    "tools not a list": {"name": "f", "parameters": _OBJECT_SCHEMA},
    "two tools of one name": [{"name": "f", "parameters": _OBJECT_SCHEMA}, {"name": "f", "parameters": _OBJECT_SCHEMA}],
}


@pytest.mark.parametrize("case", list(BAD_AGENT_TOOLS))
@pytest.mark.parametrize("endpoint", ["POST agents", "PATCH agent"])
async def test_bad_agent_tools(client: httpx.AsyncClient, world: World, endpoint: str, case: str) -> None:
    """An `openai` agent's bad `tools` are 400 `invalid_request` naming `config.tools`; nothing changes."""
    method, path, who, valid = BODY_ENDPOINTS[endpoint]
    config = {"baseUrl": "https://models.example/v1", "model": "m", "tools": BAD_AGENT_TOOLS[case]}
    async with unchanged(world):
        r = await send(client, world, method, path, who, json={**valid, "adapter": "openai", "config": config})
        assert_error(r, 400, "invalid_request", field="config.tools")


# --- tool results -----------------------------------------------------------------------

TOOL_RESULTS = "/api/conversations/{conversation}/tool-results"


async def _pending_call(world: World) -> str:
    """An agent answer in alice's conversation that waits for the result of one tool call."""
    call = Part(kind="tool_call", name="book", tool_call_id="call_1", text="{}", value={})
    answered = Generation(conversation=world.conversation, status="done", finish_reason="tool_calls")
    await answered.save()
    answer = Message(
        conversation=world.conversation, role="agent", content="", parts=encode_parts([call]), generation=answered.id
    )
    await answer.save()
    return "call_1"


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ({"toolCallId": "call_1"}, 400, "invalid_request", "output"),  # neither output nor error
        ({"toolCallId": "call_1", "output": 1, "error": "no"}, 400, "invalid_request", "output"),  # both
        ({"toolCallId": "x" * 96, "output": 1}, 400, "invalid_request", "toolCallId"),
        ({"toolCallId": "call_1", "output": "x" * MAX_CONTENT}, 413, "too_large", "output"),
        ({"toolCallId": "call_1", "error": "x" * (MAX_CONTENT + 1)}, 413, "too_large", "error"),
        ({"toolCallId": "call_nobody_made", "output": 1}, 404, "tool_call_not_found", None),
    ],
    ids=["neither", "both", "id-too-long", "output-too-large", "error-too-large", "unknown-call"],
)
async def test_bad_tool_results(
    client: httpx.AsyncClient, world: World, body: dict[str, Any], status: int, code: str, field: str | None
) -> None:
    await _pending_call(world)
    async with unchanged(world):
        r = await send(client, world, "POST", TOOL_RESULTS, "alice", json=body)
        assert_error(r, status, code, field=field)


async def test_tool_results_for_another_tenant_or_answered_twice(client: httpx.AsyncClient, world: World) -> None:
    """Another company's conversation is 404; a second, different result for a call is 409 and
    the first stands; the same result again is 200 with the first."""
    call_id = await _pending_call(world)
    async with unchanged(world):
        r = await send(client, world, "POST", TOOL_RESULTS, "globex", json={"toolCallId": call_id, "output": 1})
        assert_error(r, 404, "not_found")
    first = await send(client, world, "POST", TOOL_RESULTS, "alice", json={"toolCallId": call_id, "output": 1})
    assert first.status_code == 201, first.text
    assert first.json()["message"]["role"] == "tool" and first.json()["generation"] is None  # no agent here
    async with unchanged(world):
        again = await send(client, world, "POST", TOOL_RESULTS, "alice", json={"toolCallId": call_id, "output": 1})
        assert again.status_code == 200 and again.json()["message"]["id"] == first.json()["message"]["id"]
        other = await send(client, world, "POST", TOOL_RESULTS, "alice", json={"toolCallId": call_id, "error": "x"})
        assert_error(other, 409, "tool_call_answered")


async def test_a_tool_result_cannot_be_edited_and_its_id_prefix_is_reserved(
    client: httpx.AsyncClient, world: World
) -> None:
    call_id = await _pending_call(world)
    posted = await send(client, world, "POST", TOOL_RESULTS, "alice", json={"toolCallId": call_id, "output": 1})
    assert posted.status_code == 201, posted.text
    result = posted.json()["message"]["id"]
    async with unchanged(world):
        path = f"/api/conversations/{{conversation}}/messages/{result}"
        r = await send(client, world, "PUT", path, "admin", json={"content": "something else"})
        assert_error(r, 400, "not_editable", field="messageId", source="path")
        body = {"content": "hi", "clientMessageId": f"tool:{call_id}"}
        r = await send(client, world, "POST", POST_MESSAGES[1], "alice", json=body)
        assert_error(r, 400, "invalid_request", field="clientMessageId")
