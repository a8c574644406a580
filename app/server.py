"""Running the app under uvicorn."""

from __future__ import annotations

import socket

import uvicorn

from app.config import get_settings
from app.streaming.core import stop_all_answers

# After the answers are stopped, connections get this long to close before they are cut.
GRACEFUL_SHUTDOWN_SECONDS = 10


class Server(uvicorn.Server):
    """uvicorn's server, stopping answers first on shutdown.

    uvicorn waits for open connections to close before running the app's shutdown, and
    an open stream only closes when its answer ends: cancelling the answers first
    (reason `shutdown`) gives every reader its terminal event and lets the process exit.
    """

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await stop_all_answers("shutdown")
        await super().shutdown(sockets)


def run(host: str, port: int, log_level: str, reload: bool = False) -> None:
    """Serve `app.main:create_app` until stopped."""
    settings = get_settings()
    options = {
        "ws_ping_interval": settings.ws_ping_interval,
        "ws_ping_timeout": settings.ws_ping_timeout,
        # Frames past our own limit get an error frame; far past it, uvicorn closes with 1009.
        "ws_max_size": settings.ws_max_frame_bytes * 4,
        "factory": True,
        "host": host,
        "port": port,
        "log_level": log_level,
        "proxy_headers": True,
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_SECONDS,
    }
    if reload:  # the reloader runs its own server processes
        uvicorn.run("app.main:create_app", reload=True, **options)  # type: ignore[arg-type]
        return
    Server(uvicorn.Config("app.main:create_app", **options)).run()  # type: ignore[arg-type]
