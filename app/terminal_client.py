"""`chatstream chat`: a terminal client over the WebSocket channel.

The reference client for people writing their own (a phone app, say): it signs in
with an API key, lists and opens conversations over REST, and sends messages and
prints answers as they stream over one WebSocket, following docs/protocol.md. If the
socket drops mid-answer it reconnects and subscribes with its last cursor, so the
answer continues without a lost or repeated word.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import sys
from collections.abc import AsyncIterator
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import httpx
import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from app.streaming.protocol import MSGPACK_SUBPROTOCOL

TERMINAL = {"done", "cancelled", "error"}
RECONNECT_ATTEMPTS = 5

# Escape sequences, then any control character left: text from the server must not move
# the cursor, clear the screen, set the window title or write the clipboard of the terminal.
_ESCAPE_SEQUENCE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI: cursor moves, colours, clearing
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC: window title, clipboard
    r"|\x1b[ -~]"  # the other ESC sequences
    r"|\x9b[0-?]*[ -/]*[@-~]"  # 8-bit CSI
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_BUT_LINES = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: object, *, lines: bool = False) -> str:
    """`text` without terminal control sequences; `lines` keeps newlines and tabs (answers)."""
    cleaned = _ESCAPE_SEQUENCE.sub("", str(text))
    return (_CONTROL_BUT_LINES if lines else _CONTROL).sub("", cleaned)


class ClientError(Exception):
    """Something the person should read: a refused key, a server error frame, a lost server."""


class ChatClient:
    """One signed-in connection: REST for listing, one WebSocket for everything live."""

    def __init__(self, url: str, key: str, *, msgpack: bool = False) -> None:
        self.url = url.rstrip("/")
        self.key = key
        self.msgpack = msgpack
        self.http = httpx.AsyncClient(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        self.ws: ClientConnection | None = None
        self._refs = itertools.count(1)
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    # -- connection ----------------------------------------------------------------------

    @property
    def ws_url(self) -> str:
        parts = urlsplit(self.url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return urlunsplit((scheme, parts.netloc, parts.path + "/api/ws", "", ""))

    async def connect(self) -> None:
        """Open the WebSocket (Bearer on the upgrade) and start reading frames."""
        try:
            self.ws = await connect(
                self.ws_url,
                additional_headers={"Authorization": f"Bearer {self.key}"},
                subprotocols=[Subprotocol(MSGPACK_SUBPROTOCOL)] if self.msgpack else None,
                max_size=None,
            )
        except (OSError, InvalidStatus) as exc:
            raise ClientError(f"cannot reach {self.ws_url}: {exc}") from exc
        self._reader = asyncio.create_task(self._read())

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self.ws is not None:
            await self.ws.close()
        await self.http.aclose()

    async def _read(self) -> None:
        """Route frames: answers to a request (same `ref`) to its waiter, the rest to `events`."""
        assert self.ws is not None
        try:
            async for raw in self.ws:
                frame = msgspec.msgpack.decode(raw) if isinstance(raw, bytes) else msgspec.json.decode(raw)
                ref = frame.get("ref")
                waiter = self._pending.pop(ref, None) if ref is not None else None
                if waiter is not None and not waiter.done():
                    waiter.set_result(frame)
                else:
                    await self.events.put(frame)
        except ConnectionClosed as exc:
            await self.events.put({"type": "closed", "code": exc.rcvd.code if exc.rcvd else 1006})
        else:
            await self.events.put({"type": "closed", "code": self.ws.close_code or 1000})
        for waiter in self._pending.values():
            if not waiter.done():
                waiter.set_exception(ClientError("the connection closed"))

    async def request(self, frame: dict[str, Any]) -> dict[str, Any]:
        """Send a frame with a fresh `ref` and wait for the `ack`/`pong` with that ref."""
        assert self.ws is not None
        ref = f"r{next(self._refs)}"
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ref] = waiter
        data = {**frame, "ref": ref}
        await self.ws.send(msgspec.msgpack.encode(data) if self.msgpack else msgspec.json.encode(data).decode())
        reply = await waiter
        if reply["type"] == "error":
            raise ClientError(f"{reply['code']}: {reply['message']}")
        return reply

    # -- REST ----------------------------------------------------------------------------

    async def get(self, path: str, **params: Any) -> Any:
        return self._json(await self.http.get(path, params=params))

    async def post(self, path: str, body: dict[str, Any]) -> Any:
        return self._json(await self.http.post(path, json=body))

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        body = response.json() if response.content else None
        if response.status_code >= 400:
            message = body.get("error") if isinstance(body, dict) else response.text
            raise ClientError(f"{response.status_code}: {message}")
        return body

    # -- answers -------------------------------------------------------------------------

    async def ask(self, conversation_id: str, text: str, client_message_id: str) -> AsyncIterator[dict[str, Any]]:
        """Send a message and yield its answer's events until the terminal one,
        reconnecting and resuming from the last cursor if the socket drops."""
        ack = await self.request(
            {"type": "send", "conversationId": conversation_id, "content": text, "clientMessageId": client_message_id}
        )
        generation = ack.get("generation")
        if generation is None:
            return
        cursor = f"{generation['id']}.0"
        attempts = 0
        while True:
            event = await self.events.get()
            if event["type"] == "closed":
                attempts += 1
                if attempts > RECONNECT_ATTEMPTS:
                    raise ClientError("the connection was lost and could not be restored")
                await asyncio.sleep(min(2**attempts * 0.1, 2))
                with contextlib.suppress(ClientError):
                    await self.connect()
                    await self.request({"type": "subscribe", "conversationId": conversation_id, "after": cursor})
                continue
            if event.get("generationId") != generation["id"]:
                continue  # other conversations' traffic, or conversation events
            cursor = f"{event['generationId']}.{event['seq']}"
            yield event
            if event["type"] in TERMINAL:
                return


async def _choose_conversation(client: ChatClient, args: Any, out: TextIO) -> str:
    if args.conversation:
        conversation: dict[str, Any] = await client.get(f"/api/conversations/{args.conversation}")
        return str(conversation["id"])
    agents = await client.get("/api/agents")
    if args.new is not None or args.message:
        title = args.new or None
        body = {"title": title, "agentId": agents[0]["id"] if agents else None}
        created = await client.post("/api/conversations", body)
        out.write(f"new conversation {printable(created['id'])}\n")
        return str(created["id"])
    page = await client.get("/api/conversations", limit=20)
    for number, item in enumerate(page["items"], start=1):
        out.write(f"  {number}. {printable(item['title'] or '(untitled)')}  {printable(item['id'])}\n")
    out.write("Pick a number, or press Enter for a new conversation: ")
    out.flush()
    choice = (await asyncio.to_thread(sys.stdin.readline)).strip()
    if choice.isdigit() and 1 <= int(choice) <= len(page["items"]):
        return str(page["items"][int(choice) - 1]["id"])
    created = await client.post("/api/conversations", {"agentId": agents[0]["id"] if agents else None})
    return str(created["id"])


async def _print_answer(client: ChatClient, conversation_id: str, text: str, out: TextIO) -> None:
    import uuid

    async for event in client.ask(conversation_id, text, f"cli-{uuid.uuid4()}"):
        kind = event["type"]
        if kind == "token":
            out.write(printable(event["text"], lines=True))
        elif kind == "snapshot":
            out.write(f"\r{printable(event['text'], lines=True)}")
        elif kind == "done":
            out.write("\n")
        elif kind == "cancelled":
            out.write(f"\n[stopped: {printable(event['reason'])}]\n")
        elif kind == "error":
            out.write(f"\n[error: {printable(event['code'])}: {printable(event['message'])}]\n")
        out.flush()


async def run_chat(args: Any, out: TextIO = sys.stdout) -> int:
    """The `chat` command: returns the process exit code."""
    client = ChatClient(args.url, args.key, msgpack=args.msgpack)
    try:
        me = await client.get("/api/me")
        out.write(f"signed in as {printable(me['role'])} of {printable(me['company']['name'])}\n")
        conversation_id = await _choose_conversation(client, args, out)
        await client.connect()
        await client.request({"type": "subscribe", "conversationId": conversation_id})
        if args.message:
            for text in args.message:
                await _print_answer(client, conversation_id, text, out)
            return 0
        out.write("Type a message and press Enter; /quit to leave.\n")
        while True:
            out.write("> ")
            out.flush()
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line or line.strip() == "/quit":
                return 0
            if line.strip():
                await _print_answer(client, conversation_id, line.rstrip("\n"), out)
    except ClientError as exc:
        print(f"error: {printable(exc)}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"error: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    finally:
        await client.close()
