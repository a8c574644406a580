"""Running the app under uvicorn."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
from importlib.metadata import version
from typing import Any, Literal, NamedTuple

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.supervisors import ChangeReload, Multiprocess, multiprocess
from websockets.exceptions import InvalidState

from app import metrics
from app.config import ENV, Settings, get_settings
from app.logs import uvicorn_log_config

# uvicorn[standard]'s event loop and HTTP parser: pinned dependencies, but only installed
# where they build (CPython; uvloop not on Windows). Without them: asyncio + h11.
try:
    import httptools  # noqa: F401
    import uvloop  # noqa: F401
except ImportError as exc:
    FAST_STACK_MISSING: str | None = f"{exc.name or 'uvloop or httptools'} is not installed"
else:
    FAST_STACK_MISSING = None

# After the answers are stopped, connections get this long to close before they are cut.
GRACEFUL_SHUTDOWN_SECONDS = 10
# An idle keep-alive connection is closed after this many seconds without a new request.
KEEP_ALIVE_SECONDS = 5


class ClientInputIsNotAnError(logging.Filter):
    """uvicorn logs a traceback at ERROR for a WebSocket text frame that is not UTF-8 (it
    then closes with 1007, as it should). Bad client input is not a server error, and must
    not let a client flood the log with tracebacks: keep it as one INFO line.

    When the client's close frame arrived in the same read, uvicorn's 1007 close fails
    (the connection is already closing) and the event loop logs that failure with a
    traceback of its own: the same bad input, kept as the same one line. asyncio says
    "Fatal error: protocol.data_received() call failed.", uvloop "Fatal error on transport
    TCPTransport" (both on the `asyncio` logger): the exception is what tells them apart.
    Bad HTTP needs nothing here: h11 and httptools alike log one WARNING line and answer 400.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        error = record.exc_info[1] if record.exc_info else None
        closing_too = (
            message.startswith("Fatal error")
            and isinstance(error, InvalidState)
            and isinstance(error.__context__, UnicodeDecodeError)
        )
        if closing_too or message.startswith("Invalid UTF-8 sequence received from client"):
            record.msg, record.args = "Invalid UTF-8 sequence received from client.", ()
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


_CLIENT_INPUT_FILTER = ClientInputIsNotAnError()


def quiet_client_input_errors() -> None:
    """Install the filter on the loggers that report bad WebSocket input (in every process:
    workers are spawned, and do not inherit the parent's filters)."""
    for name in ("uvicorn.error", "asyncio"):
        logging.getLogger(name).addFilter(_CLIENT_INPUT_FILTER)


# Allocations (net of frees) between two collections of the youngest generation; Python's
# default is 700. With 1,000 answers streaming at once the default had the collector take a
# tenth of the server's CPU and stop the loop for ~0.1 s at a time (docs/benchmarks.md).
GC_YOUNG_THRESHOLD = 50_000


def tune_garbage_collector() -> None:
    """Once the app has started: leave everything made so far (modules, the app, its routes
    and schemas: they live as long as the process) out of every later collection, and
    collect young objects less often."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


class Server(uvicorn.Server):
    """uvicorn's server, stopping answers first on shutdown, not keeping connections that
    accept no data (see :func:`limit_unsendable_time`), with the garbage collector tuned
    for many concurrent answers (see :func:`tune_garbage_collector`).

    uvicorn waits for open connections to close before running the app's shutdown, and
    an open stream only closes when its answer ends: cancelling the answers first
    (reason `shutdown`) gives every reader its terminal event and lets the process exit.
    """

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        quiet_client_input_errors()
        # One line per server process (each worker, the reloader's child), before uvicorn's
        # "running on" line.
        stack, reason = running_stack(self.config.http_protocol_class), server_stack(get_settings()).reason
        logging.getLogger("uvicorn.error").info("Event loop: %s (%s)", stack, reason)
        await super().startup(sockets)
        tune_garbage_collector()
        for server in self.servers:
            for listener in server.sockets:
                limit_unsendable_time(listener, get_settings().tcp_user_timeout)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Imported here: the bare peers of bench/peers.py use this module without the app.
        from app.streaming.core import stop_all_answers
        from app.streaming.ws import close_every_socket

        await stop_all_answers("shutdown")
        await close_every_socket()  # each told to come back in a second (1012), not dropped
        await super().shutdown(sockets)


ReadPhase = Literal["headers", "body"]


class ReadTimeouts(asyncio.Protocol):
    """Read timers for an HTTP protocol of uvicorn's (mixed in before it): the connection is
    closed when its client takes longer than `header_timeout` seconds to send a request's
    headers, or `body_timeout` to send its body. uvicorn has neither: a client trickling
    bytes would hold its connection (and a file descriptor) forever, before any
    authentication.

    Each timer runs from the start of its phase and is not reset by data arriving; a
    request being answered (or a WebSocket) has none. The protocol says which phase it is
    in (:meth:`_reading_phase`) and calls :meth:`_watch_reading` whenever it may have
    changed; the timers start with the connection and stop when it is lost.
    """

    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    _read_phase: ReadPhase | None = None
    _read_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._watch_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_read_timer()
        super().connection_lost(exc)

    def _reading_phase(self) -> ReadPhase | None:
        """What the server waits for from the client: a request's headers, its body, or nothing."""
        raise NotImplementedError

    def _watch_reading(self) -> None:
        """Start the timer of the phase the client is in (headers, body), once per phase."""
        # A WebSocket now (the transport has another protocol), or closing: no read timers.
        protocol: object = self.transport.get_protocol()
        done = protocol is not self or self.transport.is_closing()
        phase = None if done else self._reading_phase()
        if phase == self._read_phase:
            return
        self._read_phase = phase
        self._stop_read_timer()
        if phase is None:
            return
        settings = get_settings()
        seconds = settings.header_timeout if phase == "headers" else settings.body_timeout
        if seconds > 0:  # 0 turns it off
            self._read_timer = self.loop.call_later(seconds, self._read_timed_out)

    def _stop_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if not self.transport.is_closing():
            self.transport.close()


class TimedH11Protocol(ReadTimeouts, H11Protocol):
    """uvicorn's h11 protocol with the read timers of :class:`ReadTimeouts` (the plain stack)."""

    def handle_events(self) -> None:
        super().handle_events()
        self._watch_reading()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_reading()

    def send_400_response(self, msg: str) -> None:
        # Bad bytes after a request's headers (a broken chunk) get uvicorn's 400 while the app
        # is already answering that request: its own response can no longer be sent, and
        # h11 would refuse it with a traceback at ERROR. The app now sees a disconnect.
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
        super().send_400_response(msg)

    def _reading_phase(self) -> ReadPhase | None:
        # h11 tracks the client's side: IDLE until a request's headers are in, SEND_BODY
        # until its body is; DONE (being answered) and the rest wait for nothing.
        state = self.conn.their_state
        return "headers" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None


if FAST_STACK_MISSING is None:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class TimedHttpToolsProtocol(ReadTimeouts, HttpToolsProtocol):
        """uvicorn's httptools protocol with the read timers of :class:`ReadTimeouts`, in the
        same phases as :class:`TimedH11Protocol`'s.

        httptools keeps no state to ask, so the body phase is tracked from its callbacks
        (headers complete → message complete), and "being answered" from uvicorn's cycles.
        """

        _reading_body = False

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch_reading()

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            self._reading_body = True  # until on_message_complete, in this read or a later one

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._reading_body = False

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch_reading()

        def _reading_phase(self) -> ReadPhase | None:
            if self.pipeline:  # requests queued behind a response being sent: reading is paused
                return None
            if self._reading_body:  # as h11's SEND_BODY: also after an early response (413)
                return "body"
            if self.cycle is not None and not self.cycle.response_complete:
                return None  # the request is in, and being answered
            return "headers"  # waiting for a request (h11's IDLE), or for the rest of its headers


class ServerStack(NamedTuple):
    """The event loop and HTTP protocol `chatstream serve` runs on, and why."""

    loop: Literal["uvloop", "asyncio"]  # uvicorn's `loop` option
    http: type[asyncio.Protocol]  # uvicorn's `http` option
    reason: str  # the setting, and what was missing when `auto` fell back


def server_stack(settings: Settings) -> ServerStack:
    """uvloop + httptools when both import (`auto`, or `uvloop`), asyncio + h11 otherwise or
    when `server_impl` is `asyncio`. SystemExit, saying why, when `uvloop` cannot be had."""
    reason = f"{ENV['server_impl']}={settings.server_impl}"
    if settings.server_impl != "asyncio" and FAST_STACK_MISSING is None:
        return ServerStack("uvloop", TimedHttpToolsProtocol, reason)
    if settings.server_impl == "uvloop":
        raise SystemExit(f"error: {reason}, but {FAST_STACK_MISSING}: set it to auto or asyncio")
    if settings.server_impl == "auto":
        reason += f": {FAST_STACK_MISSING}"
    return ServerStack("asyncio", TimedH11Protocol, reason)


def running_stack(http: type[asyncio.Protocol]) -> str:
    """What this process serves on, e.g. `uvloop 0.23.0, HTTP parser: httptools 0.9.0`: the
    running event loop (read from the loop itself, not from the setting) and `http`'s parser."""
    loop = type(asyncio.get_running_loop()).__module__.partition(".")[0]  # uvloop.Loop, asyncio.…
    parser = "h11" if issubclass(http, H11Protocol) else "httptools"
    loop_name = loop if loop == "asyncio" else f"{loop} {version(loop)}"
    return f"{loop_name}, HTTP parser: {parser} {version(parser)}"


class Worker(multiprocess.Process):
    """A worker process of `serve --workers N`: uvicorn's, running our :class:`Server`."""

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = Server(config=self.config)
        return self._server

    def join(self) -> None:
        super().join()
        metrics.worker_ended(self.pid)  # its open streams, sockets and answers stop counting


def run(host: str, port: int, log_level: str, reload: bool = False, workers: int = 1) -> None:
    """Serve `app.main:create_app` until stopped: restarting on code changes with `reload`,
    or in `workers` processes sharing the listening socket (uvicorn's supervisor, which
    also replaces a worker that dies)."""
    settings = get_settings()
    stack = server_stack(settings)
    config = uvicorn.Config(
        "app.main:create_app",
        factory=True,
        host=host,
        port=port,
        log_level=log_level,
        # Text or JSON lines (CHATSTREAM_LOG_FORMAT, app/logs.py). The app logs one line per
        # request itself (app/request_log.py: with its request id, without the query string).
        log_config=uvicorn_log_config(settings),
        access_log=False,
        reload=reload,
        proxy_headers=True,
        loop=stack.loop,
        http=stack.http,
        # Past this many open connections (WebSockets included), HTTP requests get 503.
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        ws_ping_interval=settings.ws_ping_interval,
        ws_ping_timeout=settings.ws_ping_timeout,
        # Frames past our own limit get an error frame; far past it, uvicorn closes with 1009.
        ws_max_size=settings.ws_max_frame_bytes * 4,
    )
    server = Server(config)
    if config.should_reload:  # the same server, run by uvicorn's reloader in a child process
        ChangeReload(config, target=server.run, sockets=[config.bind_socket()]).run()
    elif workers > 1:
        config.workers = workers
        # The supervisor makes (and remakes) its workers with its module's `Process`.
        multiprocess.Process = Worker  # type: ignore[misc]
        # The workers write their metrics to files in one directory: a scrape of any worker sums them.
        with metrics.shared_by_workers(settings.metrics):
            Multiprocess(config, sockets=[config.bind_socket()]).run()
    else:
        server.run()


def limit_unsendable_time(listener: Any, seconds: float) -> None:
    """Have the kernel drop a connection whose peer accepts no data for `seconds`.

    A peer that stops reading but keeps its connection open would otherwise hold the
    connection and its send buffers forever: the server's close frame cannot reach it
    either. Accepted sockets inherit the option from the listening one.
    """
    if seconds > 0 and hasattr(socket, "TCP_USER_TIMEOUT"):
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(seconds * 1000))
