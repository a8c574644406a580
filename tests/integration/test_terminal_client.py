"""`chatstream chat`, the terminal client, end to end against a real server over the WebSocket.

The client runs as a person runs it: a subprocess whose stdin the test types into and whose
output it reads as it comes. Outages are made with a TCP proxy between the client and the
server (tests/redis_support.py's `TcpProxy`): `stop()` resets every open connection and
refuses new ones, `start()` accepts again on the same port. Every wait is on the client's
output or exit, with a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import random
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from app.agents.schemas import AgentCreate
from app.agents.service import create_agent
from app.tables import Generation, Message
from app.terminal_client import Backoff, Link, answer_events, send_message, websocket_url
from tests.factories import Tenant
from tests.integration.live_server import LiveServer
from tests.integration.wire_api import new_conversation
from tests.redis_support import TcpProxy

CONSOLE_SCRIPT = str(Path(sys.executable).with_name("chatstream"))
STEP = 20.0  # the longest any single wait may take before the test fails
WORDS = " ".join(f"w{i}" for i in range(60))  # at 0.1 s a word: a 6 s answer


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with LiveServer() as live:
        yield live


def chat(server: LiveServer, key: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CONSOLE_SCRIPT, "chat", "--url", server.url, "--key", key, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


class ChatProcess:
    """`chatstream chat` in a subprocess, driven as a person would: lines typed on its stdin,
    stdout and stderr collected as they come (`out`, `err`)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.out = ""
        self.err = ""
        self._changed = asyncio.Event()
        assert proc.stdout is not None and proc.stderr is not None
        self._drains = [
            asyncio.create_task(self._drain(proc.stdout, "out")),
            asyncio.create_task(self._drain(proc.stderr, "err")),
        ]

    async def _drain(self, stream: asyncio.StreamReader, name: str) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")()
        while chunk := await stream.read(4096):
            setattr(self, name, getattr(self, name) + decoder.decode(chunk))
            self._changed.set()
        self._changed.set()

    async def type(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{line}\n".encode())
        await self.proc.stdin.drain()

    async def wait_for(self, condition: str | Callable[[], bool], within: float = STEP) -> None:
        """Until `condition` holds (a string: until stdout or stderr contains it)."""
        check = condition if callable(condition) else lambda: condition in self.out or condition in self.err
        try:
            async with asyncio.timeout(within):
                while not check():
                    self._changed.clear()
                    if self.proc.returncode is not None and all(d.done() for d in self._drains):
                        break
                    await self._changed.wait()
        except TimeoutError:
            pass
        assert check(), f"not seen within {within} s: {condition!r}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"

    async def exit_code(self, within: float = STEP) -> int:
        try:
            async with asyncio.timeout(within):
                code = await self.proc.wait()
                await asyncio.gather(*self._drains)
        except TimeoutError:
            output = f"--- stdout\n{self.out}\n--- stderr\n{self.err}"
            raise AssertionError(f"still running after {within} s\n{output}") from None
        return code

    def answers(self, label: str) -> list[str]:
        """The answer lines of the agent called `label`, without the label."""
        return [line.removeprefix(f"{label}: ") for line in self.out.splitlines() if line.startswith(f"{label}: ")]


@contextlib.asynccontextmanager
async def chat_process(url: str, key: str, *args: str) -> AsyncIterator[ChatProcess]:
    """A running `chatstream chat`; killed on the way out if it is still running."""
    proc = await asyncio.create_subprocess_exec(
        *(CONSOLE_SCRIPT, "chat", "--url", url, "--key", key, *args),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    client = ChatProcess(proc)
    try:
        yield client
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await asyncio.gather(*client._drains, return_exceptions=True)


@contextlib.asynccontextmanager
async def proxy_to(server: LiveServer) -> AsyncIterator[tuple[TcpProxy, str]]:
    """A TCP proxy in front of the server, and the URL to reach the server through it."""
    proxy = TcpProxy(server.url)
    await proxy.start()
    try:
        yield proxy, f"http://127.0.0.1:{proxy.port}"
    finally:
        await proxy.stop()


async def paced_conversation(server: LiveServer, tenant: Tenant, pace: float = 0.1) -> str:
    """A new conversation of alice's with an echo agent called "Paced" (`pace` s a word)."""
    agent = await create_agent(tenant.company_id, AgentCreate(name="Paced", config={"pace": pace}))
    async with httpx.AsyncClient(base_url=server.url, timeout=STEP) as http:
        return await new_conversation(http, tenant, str(agent.id))


# -- one-shot and interactive use --------------------------------------------------------


@pytest.mark.anyio
async def test_one_shot_messages_print_labelled_answers(server: LiveServer, acme: Tenant) -> None:
    result = chat(
        server, acme.tokens["alice"], "--new", "From the terminal", "--message", "hello there", "--message", "again"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "signed in as member of " + lines[0].split(" of ", 1)[1]
    assert lines[-4:] == ["you: hello there", "Echo: hello there", "you: again", "Echo: again"]
    assert await Message.count().where(Message.role == "agent", Message.content == "hello there") >= 1


@pytest.mark.anyio
@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_typed_ahead_lines_are_answered_in_order_until_the_input_ends(
    server: LiveServer, acme: Tenant, encoding: str
) -> None:
    extra = ["--msgpack"] if encoding == "msgpack" else []
    result = chat(server, acme.tokens["bob"], *extra, stdin="\nfirst question\nsecond question\n")
    assert result.returncode == 0, result.stderr
    assert "Pick a number" in result.stdout
    assert "you: first question\nEcho: first question\nyou: second question\nEcho: second question\n" in result.stdout


def test_a_bad_key_is_a_clear_error(server: LiveServer) -> None:
    result = chat(server, "cs_wrong", "--message", "x")
    assert result.returncode == 1
    assert "not valid" in result.stderr and "Traceback" not in result.stderr


def test_an_unreachable_server_is_a_clear_error() -> None:
    result = subprocess.run(
        [CONSOLE_SCRIPT, "chat", "--url", "http://127.0.0.1:9", "--key", "cs_x", "--message", "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "cannot reach" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.anyio
async def test_opening_a_conversation_shows_its_history_with_labels(server: LiveServer, acme: Tenant) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=STEP) as http:
        conversation = await new_conversation(http, acme, str(acme.agent_id))
    first = chat(server, acme.tokens["alice"], "--conversation", conversation, "--message", "good morning")
    assert first.returncode == 0, first.stderr
    async with chat_process(server.url, acme.tokens["alice"], "--conversation", conversation) as client:
        await client.wait_for("/help lists the commands")
        history, _, _ = client.out.partition("Type a message")
        assert history.splitlines()[1:] == ["you: good morning", "Echo: good morning"]
        await client.type("/quit")
        assert await client.exit_code() == 0


@pytest.mark.anyio
async def test_help_and_unknown_commands_stay_local(server: LiveServer, acme: Tenant) -> None:
    conversation = await paced_conversation(server, acme)
    async with chat_process(server.url, acme.tokens["alice"], "--conversation", conversation) as client:
        await client.type("/help")
        await client.wait_for("/stop   stop the answer being written")
        await client.type("/nope")
        await client.wait_for("unknown command /nope")
        await client.type("/stop")
        await client.wait_for("no answer is being written")
        await client.type("/quit")
        assert await client.exit_code() == 0
    assert await Message.count().where(Message.conversation == conversation) == 0


@pytest.mark.anyio
async def test_stop_cancels_the_running_answer(server: LiveServer, acme: Tenant) -> None:
    conversation = await paced_conversation(server, acme)
    async with chat_process(server.url, acme.tokens["alice"], "--conversation", conversation) as client:
        await client.type(WORDS)
        await client.wait_for("Paced: w0 w1 w2")
        await client.type("/stop")
        await client.wait_for("[cancelled: user]")
        await client.type("/quit")
        assert await client.exit_code() == 0
    [answer] = client.answers("Paced")
    assert WORDS.startswith(answer) and len(answer) < len(WORDS)
    generation = await Generation.select(Generation.status).where(Generation.conversation == conversation).first()
    assert generation is not None and generation["status"] == "cancelled"


# -- outages: the client behind a TCP proxy that drops and refuses connections ------------


@pytest.mark.anyio
async def test_an_outage_mid_answer_reconnects_and_resumes_without_a_lost_or_repeated_word(
    server: LiveServer, acme: Tenant
) -> None:
    conversation = await paced_conversation(server, acme)
    async with (
        proxy_to(server) as (proxy, url),
        chat_process(url, acme.tokens["alice"], "--conversation", conversation) as client,
    ):
        await client.type(WORDS)
        await client.wait_for("Paced: w0 w1 w2 w3 w4")
        await proxy.stop()  # every connection reset, new ones refused
        down = time.monotonic()
        # It keeps trying (the bug: one attempt, then silence) and says so.
        await client.wait_for(lambda: client.err.count("reconnecting (attempt") >= 3)
        assert "reconnecting (attempt 1, next in" in client.err
        await asyncio.sleep(max(0.0, down + 3.0 - time.monotonic()))  # the outage itself lasts 3 s
        await proxy.start()
        await client.wait_for(f"Paced: {WORDS}\n")
        assert "reconnected, resuming after" in client.err
        assert client.answers("Paced") == [WORDS]
        await client.type("/quit")
        assert await client.exit_code() == 0
    stored = await Message.select(Message.content).where(Message.conversation == conversation, Message.role == "agent")
    assert [row["content"] for row in stored] == [WORDS]


@pytest.mark.anyio
async def test_an_outage_longer_than_the_bound_exits_with_a_clear_error(server: LiveServer, acme: Tenant) -> None:
    conversation = await paced_conversation(server, acme)
    args = ("--conversation", conversation, "--reconnect-timeout", "3")
    async with proxy_to(server) as (proxy, url), chat_process(url, acme.tokens["alice"], *args) as client:
        await client.type(WORDS)
        await client.wait_for("Paced: w0 w1")
        await proxy.stop()
        down = time.monotonic()
        assert await client.exit_code() == 1
        elapsed = time.monotonic() - down
    assert 3.0 <= elapsed < 5.0, elapsed
    assert "error: giving up: no connection to the server for 3 s" in client.err
    assert client.err.count("reconnecting (attempt") >= 3
    assert "Traceback" not in client.err


@pytest.mark.anyio
async def test_quit_during_an_outage_exits_at_once(server: LiveServer, acme: Tenant) -> None:
    conversation = await paced_conversation(server, acme)
    async with (
        proxy_to(server) as (proxy, url),
        chat_process(url, acme.tokens["alice"], "--conversation", conversation) as client,
    ):
        await client.type(WORDS)
        await client.wait_for("Paced: w0 w1")
        await proxy.stop()
        await client.wait_for("reconnecting (attempt 1")
        asked = time.monotonic()
        await client.type("/quit")
        assert await client.exit_code(within=3.0) == 0
        assert time.monotonic() - asked < 2.0


@pytest.mark.anyio
async def test_a_revoked_key_is_not_retried(server: LiveServer, acme: Tenant) -> None:
    """Close code 4401: reconnecting with the same key cannot help, so the client says why and exits."""
    async with httpx.AsyncClient(base_url=server.url, timeout=STEP) as http:
        made = await http.post("/api/keys", json={"name": "to revoke"}, headers=acme.headers("admin"))
        assert made.status_code == 201, made.text
        async with chat_process(server.url, made.json()["token"], "--new") as client:
            await client.type("hello")
            await client.wait_for("Echo: hello\n")
            revoked = await http.delete(f"/api/keys/{made.json()['id']}", headers=acme.headers("admin"))
            assert revoked.status_code == 204, revoked.text
            assert await client.exit_code() == 1
    assert "the server refused the API key (close code 4401" in client.err
    assert "reconnecting (attempt" not in client.err


@pytest.mark.anyio
async def test_close_code_1013_is_retried_soon(acme: Tenant) -> None:
    """Too many sockets: the server says when to come back (`retryAfter`, 5 s for a socket
    cap), closes with 1013, and the client tries again then, not sooner."""
    with LiveServer({"CHATSTREAM_MAX_SOCKETS_PER_KEY": "1"}) as server:
        key = acme.tokens["alice"]
        blocker = await connect(websocket_url(server.url), additional_headers={"Authorization": f"Bearer {key}"})
        await blocker.send('{"type": "ping", "ref": "p"}')
        async with asyncio.timeout(STEP):  # the key's one socket is open once the pong is there
            while '"pong"' not in str(await blocker.recv()):
                pass  # a greeting frame may come first
        async with chat_process(server.url, key, "--new") as client:
            await client.wait_for("connection lost (1013")
            retry = re.search(r"\(1013[^)]*\); reconnecting \(attempt 1, next in ([\d.]+) s\)", client.err)
            assert retry is not None and float(retry[1]) == 5.0, client.err
            await blocker.close()
            await client.type("hello")
            await client.wait_for("Echo: hello\n")
            await client.type("/quit")
            assert await client.exit_code() == 0
        assert "reconnected" in client.err


# -- the link and the backoff, in process ----------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("msgpack", [False, True], ids=["json", "msgpack"])
async def test_a_dropped_socket_resumes_from_the_cursor(server: LiveServer, acme: Tenant, msgpack: bool) -> None:
    """The link reconnects and subscribes with its last cursor: every event once, in order."""
    agent = await create_agent(acme.company_id, AgentCreate(name="paced", config={"pace": 0.01}))
    async with httpx.AsyncClient(base_url=server.url, timeout=STEP) as http:
        conversation = await new_conversation(http, acme, str(agent.id))
    statuses: list[str] = []
    link = Link(server.url, acme.tokens["alice"], conversation, msgpack=msgpack, status=statuses.append)
    running = asyncio.create_task(link.run())
    try:
        words = " ".join(f"w{i}" for i in range(60))
        generation = await send_message(link, words, "resume-test")
        assert generation is not None
        events: list[dict[str, Any]] = []
        async with asyncio.timeout(STEP):
            async for event in answer_events(link, generation):
                events.append(event)
                if len(events) == 10:
                    await link.drop()  # the connection breaks mid-answer
        seqs = [e["seq"] for e in events]
        assert seqs == list(range(1, len(seqs) + 1))
        assert events[-1]["type"] == "done"
        assert "".join(e["text"] for e in events if e["type"] == "token") == words
        assert any(s.startswith("reconnected") for s in statuses), statuses
        stored = await Message.select(Message.content).where(Message.id == events[-1]["messageId"]).first()
        assert stored is not None and stored["content"] == words
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await link.close()


def test_backoff_is_exponential_with_full_jitter_and_bounded_in_total() -> None:
    now = [0.0]
    backoff = Backoff(10.0, base=0.5, cap=4.0, rng=random.Random(7), clock=lambda: now[0])
    delays = []
    while (delay := backoff.next_delay()) is not None:
        ceiling = min(4.0, 0.5 * 2 ** (backoff.attempts - 1))
        assert 0.0 <= delay <= ceiling
        delays.append(delay)
        now[0] += delay + 0.01  # the attempt itself
    assert now[0] >= 10.0 and sum(delays) <= 10.0  # it gave up at the bound, not before, not long after
    assert len(delays) >= 4 and len(set(delays)) == len(delays)  # jittered
    backoff.reset()
    assert backoff.attempts == 0 and (backoff.next_delay() or 0.0) <= 0.5
    soon = Backoff(10.0, rng=random.Random(1), clock=lambda: 0.0).next_delay(soon=True)
    assert soon is not None and 0.5 <= soon <= 2.0
    # The server's retryAfter is a floor, within the bound.
    assert Backoff(10.0, rng=random.Random(1), clock=lambda: 0.0).next_delay(soon=True, at_least=5) == 5
    assert Backoff(3.0, rng=random.Random(1), clock=lambda: 0.0).next_delay(at_least=5) == 3


# -- text from the server cannot drive the terminal (issue #14 point 8) --------------------

HOSTILE = "\x1b[2J\x1b]0;pwned\x07\x1b]52;c;cHduZWQ=\x1b\\\x9b31m\x07\x08\r"


@pytest.mark.parametrize(
    ("text", "line", "answer"),
    [
        ("plain é 🙂", "plain é 🙂", "plain é 🙂"),
        ("a\x1b[2Jb", "ab", "ab"),  # CSI: clear the screen
        ("a\x1b]0;title\x07b", "ab", "ab"),  # OSC: set the window title
        ("a\x1b]52;c;Zm9v\x1b\\b", "ab", "ab"),  # OSC 52: write the clipboard
        ("a\x9b31mb\x1bc", "ab", "ab"),  # 8-bit CSI, ESC c (reset)
        ("one\ntwo\tthree\r\x00\x7f", "onetwothree", "one\ntwo\tthree"),
    ],
)
def test_printable_strips_control_sequences(text: str, line: str, answer: str) -> None:
    from app.terminal_client import printable

    assert printable(text) == line
    assert printable(text, lines=True) == answer


@pytest.mark.anyio
async def test_titles_answers_and_errors_are_printed_without_control_sequences(
    server: LiveServer, acme: Tenant
) -> None:
    title = f"title{HOSTILE}end"
    result = chat(server, acme.tokens["alice"], "--new", title, "--message", f"hello {HOSTILE}world")
    assert result.returncode == 0, result.stderr
    listing = chat(server, acme.tokens["alice"], stdin="/quit\n")
    assert listing.returncode == 0, listing.stderr
    assert "titleend" in listing.stdout
    missing = chat(server, acme.tokens["alice"], "--conversation", f"x{HOSTILE}", "--message", "x")
    assert missing.returncode == 1
    for output in (result.stdout, listing.stdout, missing.stderr):
        assert not any(c in output for c in "\x1b\x9b\x07\x08"), repr(output)
    assert "hello" in result.stdout and "world" in result.stdout
