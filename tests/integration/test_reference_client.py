"""The reference client of docs/protocol.md (docs/examples/resume_client.py) works as the
document says: run against a real server through a TCP proxy that drops every connection
mid-answer and refuses new ones for a while, it reconnects, resumes with its cursors, and
prints the whole answer once; its message is stored once. The document shows the file as it is."""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterator, Iterator

import anyio
import httpx
import pytest

from tests.conftest import ROOT
from tests.factories import Tenant
from tests.integration.live_server import LiveServer
from tests.integration.wire_api import make_agent, messages_of, new_conversation
from tests.redis_support import TcpProxy

pytestmark = pytest.mark.anyio

CLIENT = ROOT / "docs" / "examples" / "resume_client.py"
DOCS = ROOT / "docs" / "protocol.md"
STEP = 20.0


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with LiveServer() as live:
        yield live


@pytest.fixture
async def http(server: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=STEP) as client:
        yield client


def test_the_document_shows_the_client_as_it_is() -> None:
    blocks = re.findall(r"^```python\n(.*?)^```$", DOCS.read_text(encoding="utf-8"), flags=re.M | re.S)
    assert CLIENT.read_text(encoding="utf-8") in blocks, "docs/protocol.md must show docs/examples/resume_client.py"


async def read_until(stream: asyncio.StreamReader, seen: bytearray, test: re.Pattern[bytes]) -> None:
    with anyio.fail_after(STEP):
        while not test.search(seen):
            chunk = await stream.read(256)
            assert chunk, f"ended before {test.pattern!r}: {seen.decode()}"
            seen.extend(chunk)


async def test_the_reference_client_resumes_an_answer_over_a_drop(
    server: LiveServer, http: httpx.AsyncClient, acme: Tenant
) -> None:
    words = [f"w{i}" for i in range(40)]
    conversation = await new_conversation(http, acme, await make_agent(acme, 0.05))
    proxy = TcpProxy(server.url)
    await proxy.start()
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        str(CLIENT),
        f"ws://127.0.0.1:{proxy.port}/api/ws",
        acme.tokens["alice"],
        conversation,
        " ".join(words),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert client.stdout is not None and client.stderr is not None
    out, err = bytearray(), bytearray()
    try:
        await read_until(client.stdout, out, re.compile(rb"w5\b"))  # the answer streams
        await proxy.stop()  # every connection dropped, new ones refused
        await read_until(client.stderr, err, re.compile(rb"\[reconnecting in"))
        await proxy.start()
        with anyio.fail_after(STEP):
            rest, more_err = await client.communicate()
        out.extend(rest)
        err.extend(more_err)
    finally:
        if client.returncode is None:
            client.kill()
        await proxy.stop()
    assert client.returncode == 0, err.decode()
    assert out.decode().strip() == " ".join(words), out.decode()  # every word, once
    stored = await messages_of(http, acme, conversation)
    assert [m["role"] for m in stored] == ["user", "agent"], stored  # sent again after the drop, stored once
    assert stored[1]["content"] == " ".join(words)
