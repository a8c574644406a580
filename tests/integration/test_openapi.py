"""The OpenAPI document and the health probes (acceptance point 8).

`/schema/openapi.json` must describe every route the app serves under `/api`, plus
`/healthz` and `/readyz`, with the right methods, resolvable request and response
schemas in camelCase, and the two ways to authenticate (Bearer key, session cookie).
The expected routes come both from the app itself and from DESIGN.md, so a route
missing from the app fails as well as a route missing from the document.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
from litestar import Litestar
from litestar.routes import HTTPRoute

from app.config import get_settings
from app.streaming.protocol_schema import ASYNCAPI_PATH, SCHEMA_PATH

pytestmark = pytest.mark.anyio

OPENAPI_URL = "/schema/openapi.json"
HTTP_METHODS = ("get", "post", "put", "patch", "delete")
CAMEL_CASE = re.compile(r"^[a-z][a-zA-Z0-9]*$")

# DESIGN.md "HTTP API": (method, path, success status). Path parameters are compared by
# position only, so `{id}` here matches `{conversation_id}` in the app.
DESIGN_ROUTES = [
    ("POST", "/api/session", 200),
    ("DELETE", "/api/session", 204),
    ("GET", "/api/me", 200),
    ("GET", "/api/agents", 200),
    ("POST", "/api/agents", 201),
    ("PATCH", "/api/agents/{id}", 200),
    ("DELETE", "/api/agents/{id}", 204),
    ("GET", "/api/keys", 200),
    ("POST", "/api/keys", 201),
    ("DELETE", "/api/keys/{id}", 204),
    ("GET", "/api/conversations", 200),
    ("POST", "/api/conversations", 201),
    ("GET", "/api/conversations/{id}", 200),
    ("PATCH", "/api/conversations/{id}", 200),
    ("DELETE", "/api/conversations/{id}", 204),
    ("GET", "/api/conversations/{id}/messages", 200),
    ("POST", "/api/conversations/{id}/messages", 201),
    ("PUT", "/api/conversations/{id}/messages/{messageId}", 200),
    ("GET", "/api/conversations/{id}/history", 200),
    ("GET", "/healthz", 200),
    ("GET", "/readyz", 200),
]

# Request bodies: (method, path) -> (properties it must have, the required ones among them).
REQUEST_BODIES: dict[tuple[str, str], tuple[set[str], set[str]]] = {
    ("POST", "/api/session"): ({"key"}, {"key"}),
    ("POST", "/api/agents"): ({"name", "adapter", "config"}, {"name"}),
    ("PATCH", "/api/agents/{}"): ({"name", "adapter", "config"}, set()),
    ("POST", "/api/keys"): ({"name", "role", "userId"}, {"name"}),
    ("POST", "/api/conversations"): ({"title", "agentId"}, set()),
    ("PATCH", "/api/conversations/{}"): ({"title", "agentId"}, set()),
    ("POST", "/api/conversations/{}/messages"): ({"content", "clientMessageId", "reply"}, {"content"}),
    ("PUT", "/api/conversations/{}/messages/{}"): ({"content"}, {"content"}),
}


# --- helpers -------------------------------------------------------------------------


def normalise(path: str) -> str:
    """`/api/x/{x_id:uuid}` and `/api/x/{id}` both become `/api/x/{}`."""
    return re.sub(r"{[^}]+}", "{}", path)


async def fetch_spec(client: httpx.AsyncClient) -> dict[str, Any]:
    """The OpenAPI document, fetched without credentials."""
    r = await client.get(OPENAPI_URL)
    assert r.status_code == 200, f"GET {OPENAPI_URL}: {r.status_code} {r.text[:500]}"
    spec: dict[str, Any] = r.json()
    return spec


def operations(spec: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """Every operation of the document by (METHOD, normalised path)."""
    found = {}
    for path, item in spec["paths"].items():
        for method in HTTP_METHODS:
            if method in item:
                found[(method.upper(), normalise(path))] = item[method]
    return found


def app_routes(app: Litestar) -> set[tuple[str, str]]:
    """(METHOD, normalised path) of every HTTP route the app serves under /api, plus the probes."""
    found = set()
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        if not (route.path.startswith("/api/") or route.path in ("/healthz", "/readyz")):
            continue
        found |= {(m, normalise(route.path)) for m in route.methods if m not in ("OPTIONS", "HEAD")}
    return found


def resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Follow `$ref`s into components.schemas until a schema proper is reached."""
    seen = set()
    while "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/components/schemas/"), ref
        assert ref not in seen, f"$ref cycle at {ref}"
        seen.add(ref)
        name = ref.removeprefix("#/components/schemas/")
        assert name in spec["components"]["schemas"], f"dangling $ref {ref}"
        schema = spec["components"]["schemas"][name]
    return schema


def assert_refs_resolve(spec: dict[str, Any], node: Any, where: str, seen: set[str] | None = None) -> None:
    """Every `$ref` anywhere inside `node` (and inside what it points to) names an existing component."""
    seen = set() if seen is None else seen
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref not in seen:
            seen.add(ref)
            name = ref.removeprefix("#/components/schemas/")
            assert ref.startswith("#/components/schemas/") and name in spec["components"]["schemas"], (
                f"{where}: dangling $ref {ref}"
            )
            assert_refs_resolve(spec, spec["components"]["schemas"][name], where, seen)
        for value in node.values():
            assert_refs_resolve(spec, value, where, seen)
    elif isinstance(node, list):
        for value in node:
            assert_refs_resolve(spec, value, where, seen)


def json_schema_of(content: dict[str, Any] | None) -> dict[str, Any] | None:
    """The schema of the `application/json` content of a request body or response, if any."""
    media = (content or {}).get("application/json")
    return None if media is None else media.get("schema")


# --- the document ----------------------------------------------------------------------------


async def test_openapi_document_is_served_without_credentials(client: httpx.AsyncClient) -> None:
    """GET /schema/openapi.json needs no key and gives an OpenAPI 3 document about chatstream."""
    spec = await fetch_spec(client)
    assert str(spec["openapi"]).startswith("3."), spec["openapi"]
    assert spec["info"]["title"] == "chatstream"
    assert spec["info"]["version"]


async def test_every_route_of_the_app_is_documented(client: httpx.AsyncClient, app: Litestar) -> None:
    """Each (method, path) the app serves under /api, and the probes, is an operation of the document."""
    spec = await fetch_spec(client)
    served = app_routes(app)
    assert served, "the app serves no /api routes?"
    missing = served - set(operations(spec))
    assert not missing, f"served but not documented: {sorted(missing)}"


@pytest.mark.parametrize(("method", "path", "status"), DESIGN_ROUTES, ids=str)
async def test_design_route_is_served_and_documented(
    client: httpx.AsyncClient, app: Litestar, method: str, path: str, status: int
) -> None:
    """Each route of DESIGN.md is served by the app and documented with its success status."""
    key = (method, normalise(path))
    assert key in app_routes(app), f"{method} {path} is in DESIGN.md but the app does not serve it"
    spec = await fetch_spec(client)
    documented = operations(spec)
    assert key in documented, f"{method} {path} is not in the OpenAPI document"
    assert str(status) in documented[key]["responses"], (method, path, sorted(documented[key]["responses"]))


async def test_documented_routes_are_served(client: httpx.AsyncClient, app: Litestar) -> None:
    """The document promises no /api route or probe that the app does not serve."""
    spec = await fetch_spec(client)
    documented = {k for k in operations(spec) if k[1].startswith("/api/") or k[1] in ("/healthz", "/readyz")}
    extra = documented - app_routes(app)
    assert not extra, f"documented but not served: {sorted(extra)}"


@pytest.mark.parametrize(("method", "path"), REQUEST_BODIES, ids=str)
async def test_request_body_schema(client: httpx.AsyncClient, method: str, path: str) -> None:
    """The operation takes a required JSON body whose schema resolves to an object with the
    expected camelCase properties (and the required ones marked required)."""
    spec = await fetch_spec(client)
    operation = operations(spec)[(method, path)]
    body = operation.get("requestBody")
    assert body is not None, f"{method} {path} documents no request body"
    assert body.get("required") is True, body
    schema = json_schema_of(body.get("content"))
    assert schema is not None, f"{method} {path}: no application/json request schema: {body}"
    assert_refs_resolve(spec, schema, f"{method} {path}")
    resolved = resolve(spec, schema)
    assert resolved.get("type") == "object", resolved
    properties = set(resolved.get("properties", {}))
    expected, required = REQUEST_BODIES[(method, path)]
    assert expected <= properties, f"{method} {path}: missing {sorted(expected - properties)} in {sorted(properties)}"
    assert required <= set(resolved.get("required", [])), resolved.get("required")


async def test_every_request_body_is_a_camel_case_object(client: httpx.AsyncClient) -> None:
    """Any operation with a request body (known or new) documents a resolvable object with camelCase names."""
    spec = await fetch_spec(client)
    with_body = {k: op for k, op in operations(spec).items() if "requestBody" in op}
    assert set(REQUEST_BODIES) <= set(with_body), sorted(set(REQUEST_BODIES) - set(with_body))
    for (method, path), operation in with_body.items():
        schema = json_schema_of(operation["requestBody"].get("content"))
        assert schema is not None, f"{method} {path}: no application/json request schema"
        assert_refs_resolve(spec, schema, f"{method} {path}")
        properties = resolve(spec, schema).get("properties", {})
        bad = [name for name in properties if not CAMEL_CASE.match(name)]
        assert not bad, f"{method} {path}: not camelCase: {bad}"


async def test_every_operation_documents_a_success_response(client: httpx.AsyncClient) -> None:
    """Each operation has a 2xx response: 204, an SSE stream, or a JSON schema that resolves."""
    spec = await fetch_spec(client)
    for (method, path), operation in operations(spec).items():
        if path.startswith("/schema"):
            continue
        success = {code: r for code, r in operation["responses"].items() if code.startswith("2")}
        assert success, f"{method} {path}: no 2xx response in {sorted(operation['responses'])}"
        for code, response in success.items():
            if code == "204":
                continue
            if "text/event-stream" in response.get("content", {}):
                continue  # an SSE stream: OpenAPI 3.1 cannot give its events a schema
            schema = json_schema_of(response.get("content"))
            assert schema, f"{method} {path} {code}: no application/json schema"
            assert_refs_resolve(spec, schema, f"{method} {path} {code}")
            assert resolve(spec, schema), f"{method} {path} {code}: empty schema"


async def test_response_schemas_are_camel_case(client: httpx.AsyncClient) -> None:
    """Response objects of /api use camelCase property names, as the wire does."""
    spec = await fetch_spec(client)
    for name, schema in spec["components"]["schemas"].items():
        bad = [p for p in schema.get("properties", {}) if not CAMEL_CASE.match(p)]
        assert not bad, f"components.schemas.{name}: not camelCase: {bad}"


async def test_documented_errors_have_the_error_shape(client: httpx.AsyncClient) -> None:
    """Where the document describes a 4xx/5xx JSON body, it is the body the app sends: error/code/details."""
    spec = await fetch_spec(client)
    wrong = []
    for (method, path), operation in operations(spec).items():
        for code, response in operation["responses"].items():
            schema = json_schema_of(response.get("content"))
            if code[0] in "45" and schema is not None:
                properties = set(resolve(spec, schema).get("properties", {}))
                if properties != {"error", "code", "details"}:
                    wrong.append(f"{method} {path} {code}: {sorted(properties)}")
    assert not wrong, "error responses documented in another shape:\n" + "\n".join(wrong)


async def test_path_ids_are_documented_as_uuids(client: httpx.AsyncClient) -> None:
    """Every path parameter of /api is a required string in uuid format."""
    spec = await fetch_spec(client)
    for path, item in spec["paths"].items():
        if not path.startswith("/api/") or "{" not in path:
            continue
        for method in HTTP_METHODS:
            if method not in item:
                continue
            params = [p for p in item[method].get("parameters", []) if p["in"] == "path"]
            assert {p["name"] for p in params} == set(re.findall(r"{([^}]+)}", path)), (method, path, params)
            for param in params:
                assert param["required"] is True
                assert param["schema"].get("format") == "uuid", (method, path, param)


async def test_security_schemes(client: httpx.AsyncClient) -> None:
    """components.securitySchemes has `bearer` (HTTP bearer) and `cookie` (the session cookie)."""
    spec = await fetch_spec(client)
    schemes = spec["components"]["securitySchemes"]
    assert schemes["bearer"]["type"] == "http"
    assert schemes["bearer"]["scheme"].lower() == "bearer"
    assert schemes["cookie"]["type"] == "apiKey"
    assert schemes["cookie"]["in"] == "cookie"
    assert schemes["cookie"]["name"] == get_settings().cookie_name


async def test_authenticated_operations_name_both_schemes(client: httpx.AsyncClient) -> None:
    """Every /api operation except the session ones requires `bearer` or `cookie`; the probes require nothing."""
    spec = await fetch_spec(client)
    for (method, path), operation in operations(spec).items():
        security = operation.get("security", spec.get("security", []))
        if path in ("/healthz", "/readyz"):
            assert not security, (method, path, security)
        elif path.startswith("/api/") and path != "/api/session":
            assert {"bearer": []} in security and {"cookie": []} in security, (method, path, security)


# --- probes -----------------------------------------------------------------------------------


async def test_healthz(client: httpx.AsyncClient) -> None:
    """GET /healthz is 200 `{"status": "ok"}` without credentials, and ignores a bad Authorization header."""
    for headers in ({}, {"Authorization": "Bearer garbage"}):
        r = await client.get("/healthz", headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "ok"


async def test_readyz(client: httpx.AsyncClient) -> None:
    """GET /readyz is 200 `{"status": "ready", "checks": {"database": "ok", "broker": "in-process"}}`
    while the database answers (the broker: see tests/integration/test_scale_out.py)."""
    for headers in ({}, {"Authorization": "Bearer garbage"}):
        r = await client.get("/readyz", headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "ready", body
        assert body["checks"] == {"database": "ok", "broker": "in-process"}, body


async def test_the_socket_protocol_documents_are_served_next_to_openapi(client: httpx.AsyncClient) -> None:
    """/schema/asyncapi.json and /schema/protocol.json: the committed docs, without credentials."""
    for url, path in (("/schema/asyncapi.json", ASYNCAPI_PATH), ("/schema/protocol.json", SCHEMA_PATH)):
        response = await client.get(url)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("application/json")
        assert response.json() == json.loads(path.read_text(encoding="utf-8"))
