"""Running the app under uvicorn."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.supervisors import ChangeReload, Multiprocess, multiprocess
from websockets.exceptions import InvalidState

from app.config import get_settings
from app.streaming.core import stop_all_answers

# After the answers are stopped, connections get this long to close before they are cut.
GRACEFUL_SHUTDOWN_SECONDS = 10
# An idle keep-alive connection is closed after this many seconds without a new request.
KEEP_ALIVE_SECONDS = 5


class ClientInputIsNotAnError(logging.Filter):
    """uvicorn logs a traceback at ERROR for a WebSocket text frame that is not UTF-8 (it
    then closes with 1007, as it should). Bad client input is not a server error, and must
    not let a client flood the log with tracebacks: keep it as one INFO line.

    When the client's close frame arrived in the same read, uvicorn's 1007 close fails
    (the connection is already closing) and asyncio logs that failure with a traceback of
    its own: the same bad input, kept as the same one line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        error = record.exc_info[1] if record.exc_info else None
        closing_too = (
            message.startswith("Fatal error: protocol.data_received() call failed.")
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


class Server(uvicorn.Server):
    """uvicorn's server, stopping answers first on shutdown, and not keeping connections
    that accept no data (see :func:`limit_unsendable_time`).

    uvicorn waits for open connections to close before running the app's shutdown, and
    an open stream only closes when its answer ends: cancelling the answers first
    (reason `shutdown`) gives every reader its terminal event and lets the process exit.
    """

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        quiet_client_input_errors()
        await super().startup(sockets)
        for server in self.servers:
            for listener in server.sockets:
                limit_unsendable_time(listener, get_settings().tcp_user_timeout)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await stop_all_answers("shutdown")
        await super().shutdown(sockets)


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose client takes longer than
    `header_timeout` seconds to send a request's headers, or `body_timeout` to send its
    body. uvicorn has neither: a client trickling bytes would hold its connection (and a
    file descriptor) forever, before any authentication.

    Each timer runs from the start of its phase and is not reset by data arriving; a
    request being answered (or a WebSocket) has none.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = get_settings()
        self._timeouts = {h11.IDLE: settings.header_timeout, h11.SEND_BODY: settings.body_timeout}
        self._phase: object = None
        self._read_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._set_read_timer(None)
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        self._watch_reading()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_reading()

    def _watch_reading(self) -> None:
        """Start the timer of the phase the client is in (headers, body), once per phase."""
        upgraded = self.transport.get_protocol() is not self  # now a WebSocket: no read timers
        phase = None if upgraded else self.conn.their_state
        if phase is self._phase:
            return
        self._phase = phase
        seconds = self._timeouts.get(phase, 0) if phase is not None else 0
        self._set_read_timer(self.loop.call_later(seconds, self._read_timed_out) if seconds > 0 else None)

    def _set_read_timer(self, timer: asyncio.TimerHandle | None) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
        self._read_timer = timer

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if not self.transport.is_closing():
            self.transport.close()


class Worker(multiprocess.Process):
    """A worker process of `serve --workers N`: uvicorn's, running our :class:`Server`."""

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = Server(config=self.config)
        return self._server


def run(host: str, port: int, log_level: str, reload: bool = False, workers: int = 1) -> None:
    """Serve `app.main:create_app` until stopped: restarting on code changes with `reload`,
    or in `workers` processes sharing the listening socket (uvicorn's supervisor, which
    also replaces a worker that dies)."""
    settings = get_settings()
    config = uvicorn.Config(
        "app.main:create_app",
        factory=True,
        host=host,
        port=port,
        log_level=log_level,
        reload=reload,
        proxy_headers=True,
        http=TimedH11Protocol,
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
