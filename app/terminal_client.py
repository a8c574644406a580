"""`chatstream chat`: a terminal client over the WebSocket channel.

The reference client for people writing their own (a phone app, say): it signs in with
an API key, lists and opens conversations over REST, and sends messages and prints
answers as they stream over one WebSocket, following docs/protocol.md.

The parts, one job each:

- :class:`Backoff`: delays between reconnection attempts (exponential, full jitter,
  within a total time).
- :class:`StdinLines`: lines typed on stdin, read without ever blocking the event loop,
  so `/quit` and `/stop` work while an answer streams or the server is away.
- :class:`Api`: the REST calls.
- :class:`Link`: the WebSocket, kept open: after a drop it reconnects and subscribes
  again from its cursor, so the running answer goes on without a lost or repeated word.
- :func:`answer_events`: send one message and yield its answer's events, each once.
- :class:`Transcript`: what the person sees (labelled lines; status lines on stderr).
- :class:`Session`: the conversation loop and its commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import re
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import httpx
import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.typing import Subprotocol

from app.streaming.protocol import MSGPACK_SUBPROTOCOL

TERMINAL = frozenset({"done", "cancelled", "error"})
RECONNECT_TIMEOUT = 60.0  # seconds without a working connection before giving up
OPEN_TIMEOUT = 10.0  # one connection attempt: TCP, WebSocket handshake and the subscribe's ack

# Close codes after which trying again with the same key cannot help (docs/protocol.md, Close codes).
DO_NOT_RETRY = {
    4401: "the server refused the API key",
    4403: "the server refused this origin",
    1007: "the server refused a frame that was not UTF-8",
    1008: "the server closed the connection for a policy violation",
    1009: "the server refused a frame that was too large",
}
TRY_AGAIN_SOON = 1013  # too slow, broker unreachable, too many sockets: a short random wait

HELP = """\
Commands:
  /stop   stop the answer being written
  /help   this list
  /quit   leave at once (Ctrl-D leaves once the answers have finished)
Anything else is sent to the agent; start a line with // to send one that begins with /."""

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
    """Something the person should read: a refused key, a lost server."""


class ServerRefused(ClientError):
    """The server answered one of our frames with an `error` frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class ConnectionLost(ClientError):
    """The WebSocket closed (`code` as received; 1006 when it ended without a close frame) or could not open."""

    def __init__(self, code: int, reason: str = "", *, message: str | None = None) -> None:
        super().__init__(message or f"connection lost ({code}{': ' + reason if reason else ''})")
        self.code = code
        self.reason = reason


class Backoff:
    """Delays between reconnection attempts: exponential with full jitter, within a total time.

    The n-th delay is drawn uniformly from [0, min(cap, base * 2**(n-1))] ("full jitter"),
    so that many clients dropped at once do not all come back at once. The clock starts at
    the first failure; from `limit` seconds on, `next_delay` returns None: give up.
    `reset` once a connection has worked.
    """

    def __init__(
        self,
        limit: float,
        *,
        base: float = 0.5,
        cap: float = 5.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.base = base
        self.cap = cap
        self.rng = rng or random.Random()
        self.clock = clock
        self.attempts = 0
        self._since: float | None = None

    def next_delay(self, *, soon: bool = False, at_least: float = 0.0) -> float | None:
        """Seconds to wait before the next attempt, or None when the time is up.
        `soon`: the server asked for a short random wait (close code 1013); `at_least`: the
        `retryAfter` the server gave before closing."""
        now = self.clock()
        if self._since is None:
            self._since = now
        left = self._since + self.limit - now
        if left <= 0:
            return None
        self.attempts += 1
        ceiling = 2.0 if soon else min(self.cap, self.base * 2 ** (self.attempts - 1))
        delay = max(self.rng.uniform(0.5 if soon else 0.0, ceiling), at_least)
        return min(delay, left)

    def reset(self) -> None:
        self.attempts = 0
        self._since = None


class StdinLines:
    """Lines of stdin, read by a daemon thread with plain `os.read` calls: the event loop never
    waits on the terminal, and a read still pending never holds up the exit (after `/quit`).
    Everything that reads stdin must read it here: a second, buffered reader would swallow lines."""

    def __init__(self, fd: int | None = None) -> None:
        self._fd = sys.stdin.fileno() if fd is None else fd
        self._lines: asyncio.Queue[str | None] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        threading.Thread(target=self._read, name="stdin-lines", daemon=True).start()

    async def readline(self) -> str | None:
        """The next line without its line ending, or None at the end of the input."""
        line = await self._lines.get()
        if line is None:
            self._lines.put_nowait(None)  # the end stays the end for later readers
        return line

    def _read(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                self._put(line.decode(errors="replace").rstrip("\r"))
        if pending:
            self._put(pending.decode(errors="replace").rstrip("\r"))
        self._put(None)

    def _put(self, line: str | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody reads any more
            self._loop.call_soon_threadsafe(self._lines.put_nowait, line)


class Api:
    """The REST calls, authenticated with the key as a Bearer token."""

    def __init__(self, url: str, key: str) -> None:
        self.http = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)

    async def get(self, path: str, **params: Any) -> Any:
        return self._json(await self.http.get(path, params=params))

    async def post(self, path: str, body: dict[str, Any]) -> Any:
        return self._json(await self.http.post(path, json=body))

    async def close(self) -> None:
        await self.http.aclose()

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        body = response.json() if response.content else None
        if response.status_code >= 400:
            message = body.get("error") if isinstance(body, dict) else response.text
            raise ClientError(f"{response.status_code}: {message}")
        return body


def _retry_after(frame: dict[str, Any]) -> float:
    """The seconds an `error` frame asks to wait (`details.retryAfter`), else 0."""
    details = frame.get("details")
    wait = details.get("retryAfter") if isinstance(details, dict) else None
    return float(wait) if isinstance(wait, int | float) and not isinstance(wait, bool) else 0.0


def websocket_url(url: str) -> str:
    """`http(s)://host/prefix` → `ws(s)://host/prefix/api/ws`."""
    parts = urlsplit(url.rstrip("/"))
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, parts.path + "/api/ws", "", ""))


class Link:
    """The WebSocket, kept open for one conversation.

    `run` connects and subscribes to the conversation; after every drop it waits (backoff
    with jitter), reconnects and subscribes again with `after` = `cursor`, the last answer
    event applied, so the running answer continues exactly where it stopped. It raises
    ClientError when a close code says not to retry, or when no connection has worked for
    `reconnect_timeout` seconds. Events arrive on `events`; `request` sends a frame and
    waits for its answer, across reconnections if need be.
    """

    def __init__(
        self,
        url: str,
        key: str,
        conversation_id: str,
        *,
        msgpack: bool = False,
        reconnect_timeout: float = RECONNECT_TIMEOUT,
        status: Callable[[str], None] = lambda text: None,
    ) -> None:
        self.url = websocket_url(url)
        self.key = key
        self.conversation_id = conversation_id
        self.msgpack = msgpack
        self.status = status
        self.backoff = Backoff(reconnect_timeout)
        self.retry_after = 0.0  # seconds the server asked to wait before it closed (details.retryAfter)
        self.cursor: str | None = None
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.connected = asyncio.Event()
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[ConnectionLost] | None = None
        self._refs = itertools.count(1)
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}

    # -- the connection's life -----------------------------------------------------------

    async def run(self) -> None:
        """Keep the link up until cancelled; raise ClientError when it cannot be."""
        lost: ConnectionLost | None = None
        while True:
            try:
                async with asyncio.timeout(OPEN_TIMEOUT):
                    reader = await self._open()
            except (ConnectionLost, TimeoutError) as exc:
                lost = exc if isinstance(exc, ConnectionLost) else ConnectionLost(1006, message="no answer in time")
                await self._discard()
            else:
                if lost is not None:
                    self.status("reconnected" + (f", resuming after {self.cursor}" if self.cursor else ""))
                self.backoff.reset()
                if not reader.done():
                    self.connected.set()
                lost = await reader
            self._refuse_to_retry(lost)
            delay = self.backoff.next_delay(soon=lost.code == TRY_AGAIN_SOON, at_least=self.retry_after)
            self.retry_after = 0.0
            if delay is None:
                raise ClientError(f"giving up: no connection to the server for {self.backoff.limit:g} s (last: {lost})")
            self.status(f"{lost}; reconnecting (attempt {self.backoff.attempts}, next in {delay:.1f} s)…")
            await asyncio.sleep(delay)

    async def _open(self) -> asyncio.Task[ConnectionLost]:
        """Connect, start reading, subscribe (from `cursor`): a working connection or ConnectionLost."""
        try:
            self._ws = await connect(
                self.url,
                additional_headers={"Authorization": f"Bearer {self.key}"},
                subprotocols=[Subprotocol(MSGPACK_SUBPROTOCOL)] if self.msgpack else None,
                max_size=None,
                open_timeout=None,  # run() bounds the whole attempt
                close_timeout=2,
                ping_interval=15,
                ping_timeout=10,
            )
        except (OSError, InvalidHandshake) as exc:
            raise ConnectionLost(1006, message=f"cannot connect: {printable(exc)}") from exc
        self._reader = reader = asyncio.create_task(self._read(self._ws))
        try:
            await self._request_once(self.subscribe_frame())
        except ServerRefused as exc:
            if exc.code == "not_found":
                raise ClientError("the conversation is gone, or not yours") from exc
            if exc.code != "invalid_cursor":
                raise ConnectionLost(1006, str(exc)) from exc
            self.status(f"the server no longer knows {self.cursor}; following the conversation from now")
            self.cursor = None
            await self._request_once(self.subscribe_frame())
        return reader

    def subscribe_frame(self) -> dict[str, Any]:
        """`subscribe` to the conversation, with `after` = the cursor when there is one."""
        frame: dict[str, Any] = {"type": "subscribe", "conversationId": self.conversation_id}
        if self.cursor is not None:
            frame["after"] = self.cursor
        return frame

    @staticmethod
    def _refuse_to_retry(lost: ConnectionLost) -> None:
        if lost.code in DO_NOT_RETRY:
            reason = f": {lost.reason}" if lost.reason else ""
            raise ClientError(f"{DO_NOT_RETRY[lost.code]} (close code {lost.code}{reason}); not reconnecting")

    async def _read(self, ws: ClientConnection) -> ConnectionLost:
        """Route frames until the socket closes: answers to a request (same `ref`) to its
        waiter, everything else to `events`. Returns how the socket ended."""
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                try:
                    frame = msgspec.msgpack.decode(raw) if isinstance(raw, bytes) else msgspec.json.decode(raw)
                except msgspec.DecodeError:
                    continue  # not a frame we can read: skip it, as unknown frames are skipped
                if not isinstance(frame, dict):
                    continue
                ref = frame.get("ref")
                if frame.get("type") == "error" and ref is None and "generationId" not in frame:
                    self.retry_after = _retry_after(frame)  # a close follows: not sooner than this
                waiter = self._pending.pop(ref, None) if isinstance(ref, str) else None
                if waiter is not None:
                    if not waiter.done():
                        waiter.set_result(frame)
                else:
                    self.events.put_nowait(frame)
        self.connected.clear()
        lost = ConnectionLost(ws.close_code or 1006, printable(ws.close_reason or ""))
        for waiter in self._pending.values():
            if not waiter.done():
                waiter.set_exception(lost)
        self._pending.clear()
        return lost

    async def _discard(self) -> None:
        """Forget the connection: stop reading, close the socket."""
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.wait([self._reader])  # unlike `await`, never swallows our own cancellation
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        self._ws = self._reader = None
        self.connected.clear()

    async def close(self) -> None:
        """Close the socket (code 1000)."""
        await self._discard()

    async def drop(self) -> None:
        """Close the socket as a network would drop it: `run` reconnects (for tests and demos)."""
        if self._ws is not None:
            self._ws.transport.abort()

    # -- frames --------------------------------------------------------------------------

    async def request(self, frame: dict[str, Any]) -> dict[str, Any]:
        """Send `frame` and return its answer (`ack`, `pong`). While the link is down, wait for
        it; if it drops before the answer, send again on the next connection. The frames this
        client sends are safe to repeat (`send` carries its clientMessageId; `cancel` and
        `subscribe` are idempotent). An `error` answer raises ServerRefused."""
        while True:
            await self.connected.wait()
            try:
                return await self._request_once(frame)
            except ConnectionLost:
                await asyncio.sleep(0)  # let the reader see the close before waiting again

    async def _request_once(self, frame: dict[str, Any]) -> dict[str, Any]:
        ws = self._ws
        if ws is None:
            raise ConnectionLost(1006, "not connected")
        ref = f"r{next(self._refs)}"
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ref] = waiter
        data = {**frame, "ref": ref}
        try:
            await ws.send(msgspec.msgpack.encode(data) if self.msgpack else msgspec.json.encode(data).decode())
            reply = await waiter
        except ConnectionClosed as exc:
            raise ConnectionLost(ws.close_code or 1006, printable(ws.close_reason or "")) from exc
        finally:
            self._pending.pop(ref, None)
        if reply.get("type") == "error":
            raise ServerRefused(str(reply.get("code")), str(reply.get("message")))
        return reply


async def send_message(link: Link, text: str, client_message_id: str) -> dict[str, Any] | None:
    """Post `text` to the link's conversation; returns the answer it started (the ack's
    `generation`), or None (a conversation without an agent). Safe to repeat after a drop:
    the same `client_message_id` stores nothing twice."""
    ack = await link.request(
        {"type": "send", "conversationId": link.conversation_id, "content": text, "clientMessageId": client_message_id}
    )
    generation: dict[str, Any] | None = ack.get("generation")
    return generation


async def answer_events(link: Link, generation: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """Yield the events of `generation` (from :func:`send_message`) until its terminal one:
    each once, in `seq` order, whatever drops happen on the way."""
    generation_id = generation["id"]
    link.cursor = f"{generation_id}.0"
    if generation.get("status") != "running":
        # It ended before this socket followed it (a `send` repeated after a drop): a subscription
        # does not replay ended answers, but one from its cursor does.
        await link.request(link.subscribe_frame())
    seq = 0
    while True:
        event = await link.events.get()
        if event.get("generationId") != generation_id or not isinstance(event.get("seq"), int):
            continue  # another answer, or a conversation event
        if event["seq"] <= seq:
            continue  # already applied: frames from an earlier connection can overlap
        seq = event["seq"]
        link.cursor = f"{generation_id}.{seq}"
        yield event
        if event["type"] in TERMINAL:
            return


class Transcript:
    """What the person sees: labelled lines on `out` ("you: …", "<agent name>: …"), notes,
    and status lines (reconnecting, errors) on `err`."""

    def __init__(self, out: TextIO, err: TextIO, agents: dict[str, str] | None = None) -> None:
        self.out = out
        self.err = err
        self.agents = agents or {}
        self.answer_open = False  # an answer is being written on the current line of `out`
        self._shown = ""  # the running answer's text printed so far

    def label(self, agent_id: object) -> str:
        return printable(self.agents.get(str(agent_id), "agent")) or "agent"

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def note(self, text: str) -> None:
        """A line of our own (help, hints) on `out`."""
        self.write(("\n" if self.answer_open else "") + text + "\n")
        self.answer_open = False

    def status(self, text: str) -> None:
        """A line about the connection or an error, on `err`."""
        self.err.write(("\n" if self.answer_open else "") + text + "\n")
        self.err.flush()

    def message(self, message: dict[str, Any]) -> None:
        """A stored message, for the history."""
        role = message.get("role")
        who = "you" if role == "user" else self.label(message.get("authorId")) if role == "agent" else str(role)
        text = printable(message.get("effectiveContent") or message.get("content") or "", lines=True)
        stopped = " [stopped]" if message.get("status") == "partial" else ""
        self.write(f"{printable(who)}: {text}{stopped}\n")

    def begin_answer(self, generation: dict[str, Any]) -> None:
        """The agent starts answering: its label."""
        self.write(f"{self.label(generation.get('agentId'))}: ")
        self.answer_open, self._shown = True, ""

    def answer_event(self, event: dict[str, Any]) -> None:
        """One event of the running answer (from :func:`answer_events`)."""
        kind = event["type"]
        if kind == "token":
            self._append(str(event["text"]))
        elif kind == "snapshot":
            text = str(event.get("text") or "")
            if text.startswith(self._shown):
                self._append(text[len(self._shown) :])
            else:  # the answer was replaced: show it whole
                self.write(f"\n{printable(text, lines=True)}")
                self._shown = text
        elif kind == "done":
            self.write("\n")
            self.answer_open = False
            if event.get("finishReason") == "tool_calls":
                self.note("[the agent waits for tool results, which this client cannot give]")
        elif kind == "cancelled":
            self.note(f"[cancelled: {printable(event.get('reason'))}]")
        elif kind == "error":
            self.note(f"[error: {printable(event.get('code'))}: {printable(event.get('message'))}]")

    def _append(self, text: str) -> None:
        self.write(printable(text, lines=True))
        self._shown += text


class Session:
    """The conversation in the terminal. Messages go out one at a time, in the order typed,
    each once the previous answer has ended; `/quit`, `/stop` and `/help` act at once, even
    while an answer streams or the link is reconnecting."""

    def __init__(self, link: Link, transcript: Transcript, lines: StdinLines | None, *, prompt: bool) -> None:
        self.link = link
        self.transcript = transcript
        self.lines = lines
        self.prompt = prompt  # a person at a terminal: show "you: " when ready, do not echo lines
        self.outgoing: asyncio.Queue[str | None] = asyncio.Queue()
        self.running: str | None = None  # the id of the answer being written
        self._idle = False  # waiting for the next line to send (the prompt is shown)
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, messages: list[str] | None = None) -> int:
        """Send `messages` (then leave), or what is typed until `/quit` or the end of the input.
        Returns the exit code; raises ClientError when the link is lost for good."""
        for text in messages or []:
            self.outgoing.put_nowait(text)
        if messages:
            self.outgoing.put_nowait(None)
        link = asyncio.create_task(self.link.run())
        converse = asyncio.create_task(self._converse(stop_on_error=bool(messages)))
        commands = asyncio.create_task(self._read_commands()) if self.lines and not messages else None
        tasks: list[asyncio.Task[Any]] = [link, converse, *([commands] if commands else [])]
        waiting = set(tasks)
        try:
            while True:
                done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    quit_now = task.result()  # raises what the task raised: the link is lost for good
                    if task is converse or quit_now:
                        return 0  # every message answered, or /quit
        finally:
            tasks.extend(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _read_commands(self) -> bool:
        """Act on typed lines; returns True on `/quit`, False at the end of the input."""
        assert self.lines is not None
        while (line := await self.lines.readline()) is not None:
            command = line.strip()
            if command == "/quit":
                return True
            if command == "/help":
                self._say(HELP)
            elif command == "/stop":
                self._spawn(self._stop())
            elif command.startswith("/") and not command.startswith("//"):
                self._say(f"unknown command {printable(command.split()[0])}; /help lists the commands")
            elif command:
                self.outgoing.put_nowait(line.lstrip()[1:] if command.startswith("//") else line)
        self.outgoing.put_nowait(None)  # the input ended: finish what was typed, then leave
        return False

    async def _converse(self, *, stop_on_error: bool) -> None:
        """Send the messages one by one and show their answers."""
        while True:
            if self.prompt and self.outgoing.empty():
                self.transcript.write("you: ")
            self._idle = True
            text = await self.outgoing.get()
            self._idle = False
            if text is None:
                return
            if not self.prompt:
                self.transcript.write(f"you: {printable(text, lines=True)}\n")
            try:
                await self._ask(text)
            except ServerRefused as exc:
                if stop_on_error:
                    raise
                self.transcript.status(f"error: {printable(exc)}")

    async def _ask(self, text: str) -> None:
        """Send one message and show its answer."""
        generation = await send_message(self.link, text, f"cli-{uuid.uuid4()}")
        if generation is None:
            self.transcript.note("(no agent answers in this conversation)")
            return
        self.running = str(generation["id"])
        self.transcript.begin_answer(generation)
        try:
            async for event in answer_events(self.link, generation):
                self.transcript.answer_event(event)
        finally:
            self.running = None

    async def _stop(self) -> None:
        """`/stop`: cancel the running answer (its `cancelled` event says so)."""
        if self.running is None:
            self._say("no answer is being written")
            return
        try:
            await self.link.request({"type": "cancel", "generationId": self.running})
        except ServerRefused as exc:
            self.transcript.status(f"error: {printable(exc)}")

    def _say(self, text: str) -> None:
        """A line of ours in answer to a command; the prompt again if it was showing."""
        self.transcript.note(text)
        if self.prompt and self._idle:
            self.transcript.write("you: ")

    def _spawn(self, work: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _agent_names(api: Api) -> dict[str, str]:
    """Agent id → name, for labelling answers."""
    return {str(agent["id"]): str(agent["name"]) for agent in await api.get("/api/agents")}


async def _open_conversation(api: Api, args: Any, transcript: Transcript, lines: StdinLines | None) -> tuple[str, bool]:
    """The conversation to use: (id, whether it existed before)."""
    if args.conversation:
        conversation: dict[str, Any] = await api.get(f"/api/conversations/{args.conversation}")
        return str(conversation["id"]), True
    first_agent = next(iter(transcript.agents), None)
    if args.new is not None or args.message or lines is None:  # (no lines: one-shot --message)
        created = await api.post("/api/conversations", {"title": args.new or None, "agentId": first_agent})
        transcript.note(f"new conversation {printable(created['id'])}")
        return str(created["id"]), False
    page = await api.get("/api/conversations", limit=20)
    for number, item in enumerate(page["items"], start=1):
        transcript.write(f"  {number}. {printable(item['title'] or '(untitled)')}  {printable(item['id'])}\n")
    transcript.write("Pick a number, or press Enter for a new conversation: ")
    choice = (await lines.readline() or "").strip()
    if choice.isdigit() and 1 <= int(choice) <= len(page["items"]):
        return str(page["items"][int(choice) - 1]["id"]), True
    created = await api.post("/api/conversations", {"agentId": first_agent})
    return str(created["id"]), False


async def _show_history(api: Api, conversation_id: str, transcript: Transcript) -> None:
    """The conversation's latest messages (one page), oldest first."""
    page = await api.get(f"/api/conversations/{conversation_id}/messages", limit=50)
    if page.get("nextCursor"):
        transcript.note("(earlier messages not shown)")
    for message in page["items"]:
        transcript.message(message)


async def run_chat(args: Any, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """The `chat` command: returns the process exit code."""
    api = Api(args.url.rstrip("/"), args.key)
    transcript = Transcript(out, err)
    link: Link | None = None
    try:
        me = await api.get("/api/me")
        transcript.write(f"signed in as {printable(me['role'])} of {printable(me['company']['name'])}\n")
        transcript.agents = await _agent_names(api)
        lines = None if args.message else StdinLines()
        conversation_id, existed = await _open_conversation(api, args, transcript, lines)
        if existed:
            await _show_history(api, conversation_id, transcript)
        link = Link(
            args.url,
            args.key,
            conversation_id,
            msgpack=args.msgpack,
            reconnect_timeout=args.reconnect_timeout,
            status=transcript.status,
        )
        if lines is not None:
            transcript.note("Type a message and press Enter; /help lists the commands, /quit leaves.")
        session = Session(link, transcript, lines, prompt=lines is not None and os.isatty(sys.stdin.fileno()))
        return await session.run(args.message)
    except ClientError as exc:
        transcript.status(f"error: {printable(exc)}")
        return 1
    except httpx.HTTPError as exc:
        transcript.status(f"error: cannot reach {printable(args.url)}: {printable(exc)}")
        return 1
    finally:
        if link is not None:
            await link.close()
        await api.close()
