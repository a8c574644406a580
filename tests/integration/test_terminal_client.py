"""`chatstream chat`, the terminal client, end to end against a real server over the WebSocket."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.agents.schemas import AgentCreate
from app.agents.service import create_agent
from app.tables import Message
from app.terminal_client import ChatClient
from tests.factories import Tenant
from tests.integration.live_server import LiveServer

CONSOLE_SCRIPT = str(Path(sys.executable).with_name("chatstream"))


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


@pytest.mark.anyio
async def test_one_shot_messages_print_the_streamed_answers(server: LiveServer, acme: Tenant) -> None:
    result = chat(
        server, acme.tokens["alice"], "--new", "From the terminal", "--message", "hello there", "--message", "again"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "signed in as member of " + lines[0].split(" of ", 1)[1]
    assert "hello there" in lines and "again" in lines
    assert await Message.count().where(Message.role == "agent", Message.content == "hello there") >= 1


@pytest.mark.anyio
@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_interactive_session_and_both_encodings(server: LiveServer, acme: Tenant, encoding: str) -> None:
    extra = ["--msgpack"] if encoding == "msgpack" else []
    result = chat(server, acme.tokens["bob"], *extra, stdin="\nfirst question\nsecond question\n/quit\n")
    assert result.returncode == 0, result.stderr
    assert "Pick a number" in result.stdout
    assert "first question\n" in result.stdout and "second question\n" in result.stdout


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
@pytest.mark.parametrize("msgpack", [False, True], ids=["json", "msgpack"])
async def test_a_dropped_socket_resumes_from_the_cursor(server: LiveServer, acme: Tenant, msgpack: bool) -> None:
    """The client reconnects and subscribes with its last cursor: the answer continues, no word lost or repeated."""
    agent = await create_agent(acme.company_id, AgentCreate(name="paced", config={"pace": 0.01}))
    client = ChatClient(server.url, acme.tokens["alice"], msgpack=msgpack)
    try:
        conversation = await client.post("/api/conversations", {"agentId": str(agent.id)})
        await client.connect()
        await client.request({"type": "subscribe", "conversationId": conversation["id"]})
        words = " ".join(f"w{i}" for i in range(60))
        events = []
        async for event in client.ask(conversation["id"], words, "resume-test"):
            events.append(event)
            if len(events) == 10:
                assert client.ws is not None
                await client.ws.close()  # the socket drops mid-answer
        seqs = [e["seq"] for e in events]
        assert seqs == list(range(1, len(seqs) + 1))
        assert events[-1]["type"] == "done"
        text = "".join(e["text"] for e in events if e["type"] == "token")
        assert text == words
        stored = await Message.select(Message.content).where(Message.id == events[-1]["messageId"]).first()
        assert stored["content"] == words
    finally:
        await client.close()


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
