"""Running the app under uvicorn."""

from __future__ import annotations

import logging
import socket
from typing import Any

import uvicorn
from uvicorn.supervisors import ChangeReload, Multiprocess, multiprocess

from app.config import get_settings
from app.streaming.core import stop_all_answers

# After the answers are stopped, connections get this long to close before they are cut.
GRACEFUL_SHUTDOWN_SECONDS = 10


class ClientInputIsNotAnError(logging.Filter):
    """uvicorn logs a traceback at ERROR for a WebSocket text frame that is not UTF-8 (it
    then closes with 1007, as it should). Bad client input is not a server error, and must
    not let a client flood the log with tracebacks: keep it as one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Invalid UTF-8 sequence received from client"):
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


class Server(uvicorn.Server):
    """uvicorn's server, stopping answers first on shutdown, and not keeping connections
    that accept no data (see :func:`limit_unsendable_time`).

    uvicorn waits for open connections to close before running the app's shutdown, and
    an open stream only closes when its answer ends: cancelling the answers first
    (reason `shutdown`) gives every reader its terminal event and lets the process exit.
    """

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        for server in self.servers:
            for listener in server.sockets:
                limit_unsendable_time(listener, get_settings().tcp_user_timeout)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await stop_all_answers("shutdown")
        await super().shutdown(sockets)


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
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        ws_ping_interval=settings.ws_ping_interval,
        ws_ping_timeout=settings.ws_ping_timeout,
        # Frames past our own limit get an error frame; far past it, uvicorn closes with 1009.
        ws_max_size=settings.ws_max_frame_bytes * 4,
    )
    logging.getLogger("uvicorn.error").addFilter(ClientInputIsNotAnError())
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
