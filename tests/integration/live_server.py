"""A real `chatstream serve` in a subprocess, for tests where the wire matters.

The server gets the test process's environment (so `DATABASE_URL` is the run's
migrated PostgreSQL database and tenants made through the services work on it) plus
whatever the test adds. Its output is read line by line: startup waits for uvicorn's
"Uvicorn running" line (a watchdog kills a server that hangs silently, so the read
ends), then a thread keeps draining the pipe so the server never blocks on a full
pipe, and the lines stay available for diagnostics.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import ClassVar

from tests.conftest import ROOT

CONSOLE_SCRIPT = str(Path(sys.executable).with_name("chatstream"))
STARTUP_TIMEOUT = 60.0


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """`chatstream serve --no-demo --no-migrate` on a free port of 127.0.0.1."""

    # Every server started and not yet stopped (for checks over all of their output).
    running: ClassVar[list[LiveServer]] = []

    def __init__(self, extra_env: dict[str, str] | None = None, extra_args: list[str] | None = None) -> None:
        self.extra_args = extra_args or []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self._drain: threading.Thread | None = None

    def start(self) -> LiveServer:
        self.proc = subprocess.Popen(
            [CONSOLE_SCRIPT, "serve", "--port", str(self.port), "--no-demo", "--no-migrate", *self.extra_args],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        watchdog = threading.Timer(STARTUP_TIMEOUT, self.proc.kill)
        watchdog.start()
        try:
            self._read_until("Uvicorn running")
        except BaseException:
            self.stop()
            raise
        finally:
            watchdog.cancel()
        self._drain = threading.Thread(target=self._drain_output, name="live-server-output", daemon=True)
        self._drain.start()
        LiveServer.running.append(self)
        return self

    def __enter__(self) -> LiveServer:
        """`with LiveServer(...) as live:` starts it, and stops it on the way out."""
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _read_until(self, needle: str) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if needle in line:
                return
        raise AssertionError(f"server exited before printing {needle!r}:\n{self.output()}")

    def _drain_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def output(self) -> str:
        """Everything the server printed so far."""
        return "".join(self.lines)

    def stop(self) -> int | None:
        """SIGINT (uvicorn's graceful stop), then kill if it does not end in time. Returns the exit code."""
        if self in LiveServer.running:
            LiveServer.running.remove(self)
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._drain is not None:
            self._drain.join(timeout=5)
        return self.proc.returncode
