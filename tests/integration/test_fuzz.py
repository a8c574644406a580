"""A schema-driven fuzzer against a real server (issue #18, point 1): schemathesis (a pinned
test dependency) generates requests for every operation of `/schema/openapi.json`, with a fixed
seed and a bounded number of examples, authenticated as an admin (who may call every route).

Held: no 5xx for any of them, and every response's body and content type are what the
document says of that status. Not held yet (schemathesis reports them; issue #18 note):
statuses a route answers but does not document, and requests the schema allows that the
server refuses (e.g. unknown body fields, which the structs forbid but the schema does not say).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from tests.factories import Tenant
from tests.integration.live_server import LiveServer

pytestmark = pytest.mark.anyio

ST = str(Path(sys.executable).with_name("st"))
CHECKS = "not_a_server_error,response_schema_conformance,content_type_conformance"


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    live = LiveServer().start()
    try:
        yield live
    finally:
        live.stop()


async def test_no_operation_answers_5xx_or_outside_its_documented_schema(
    server: LiveServer, acme: Tenant, tmp_path: Path
) -> None:
    with anyio.fail_after(240):
        run = await anyio.run_process(
            [
                ST,
                "run",
                f"{server.url}/schema/openapi.json",
                "--header",
                f"Authorization: Bearer {acme.tokens['admin']}",
                "--checks",
                CHECKS,
                "--phases",
                "examples,coverage,fuzzing",
                "--max-examples",
                "25",
                "--seed",
                "20261207",
                "--request-timeout",
                "10",
                "--no-color",
            ],
            check=False,
            cwd=tmp_path,  # its reports and cache go there, not into the checkout
        )
    out, err = run.stdout.decode(), run.stderr.decode()
    assert run.returncode == 0, out[-12000:] + err[-4000:]
    assert " 0 generated" not in out  # it did test something
    bad = [line for line in server.lines if "Traceback" in line or " ERROR " in line]
    assert not bad, "the server logged errors:\n" + "".join(bad)


# What the fuzzer first found, each said plainly.


@pytest.mark.parametrize("path", ["/api/keys", "/api/keys/5c0ffee0-0000-4000-8000-000000000000"])
async def test_options_on_admin_routes_lists_the_methods(server: LiveServer, path: str) -> None:
    """It answered 500 ('user' is not defined in scope): the admin guard ran on Litestar's
    unauthenticated OPTIONS handler."""
    async with httpx.AsyncClient(base_url=server.url) as http:
        response = await http.options(path)
    assert response.status_code == 204, response.text
    assert "OPTIONS" in response.headers["allow"]


async def test_sign_out_documents_no_body_and_sends_none(server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        document = (await http.get("/schema/openapi.json")).json()
        response = await http.delete("/api/session")
    assert "content" not in document["paths"]["/api/session"]["delete"]["responses"]["204"]
    assert response.status_code == 204 and response.content == b""
