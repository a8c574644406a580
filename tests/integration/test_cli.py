"""The command line, run as a real subprocess: data commands (plain and --json) and `serve`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT

CONSOLE_SCRIPT = str(Path(sys.executable).with_name("chatstream"))


def sqlite_only_env(cwd: Path) -> dict[str, str]:
    """The embedded default: no DATABASE_URL, so `./chatstream.db` in the working directory."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CHATSTREAM_SQLITE_PATH")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run(args: list[str], cwd: Path, *, module: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "app", *args] if module else [CONSOLE_SCRIPT, *args]
    return subprocess.run(cmd, cwd=cwd, env=sqlite_only_env(cwd), capture_output=True, text=True, timeout=120)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    result = run(["migrate"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "chatstream.db").exists()
    return tmp_path


def test_data_commands_need_migrations_first(tmp_path: Path) -> None:
    result = run(["company", "create", "Acme"], tmp_path)
    assert result.returncode == 1
    assert "chatstream migrate" in result.stderr and "Traceback" not in result.stderr


def test_company_key_agent_json(workdir: Path) -> None:
    created = json.loads(run(["company", "create", "Acme", "--json"], workdir).stdout)
    assert created["company"]["name"] == "Acme"
    assert created["adminKey"]["role"] == "admin" and created["adminKey"]["token"].startswith("cs_")

    key = json.loads(run(["key", "create", "--company", "Acme", "--name", "ci", "--json"], workdir, module=True).stdout)
    assert key["role"] == "member" and key["token"].startswith("cs_")
    admin2 = json.loads(
        run(["key", "create", "--company", created["company"]["id"], "--role", "admin", "--json"], workdir).stdout
    )
    assert admin2["role"] == "admin"
    same_user = json.loads(
        run(["key", "create", "--company", "Acme", "--user-id", key["userId"], "--json"], workdir).stdout
    )
    assert same_user["userId"] == key["userId"]

    agent = json.loads(
        run(
            ["agent", "create", "--company", "Acme", "--name", "Bot", "--config", '{"pace": 0}', "--json"], workdir
        ).stdout
    )
    assert agent["adapter"] == "echo" and agent["config"] == {"pace": 0}
    listed = json.loads(run(["company", "list", "--json"], workdir).stdout)
    assert [c["name"] for c in listed] == ["Acme"]


def test_plain_output_for_people(workdir: Path) -> None:
    out = run(["company", "create", "Acme"], workdir).stdout
    assert "company Acme" in out and "shown once" in out
    assert "agent Bot" in run(["agent", "create", "--company", "Acme", "--name", "Bot"], workdir).stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["key", "create", "--company", "Nope"], "no company"),
        (["agent", "create", "--company", "Acme", "--name", "B", "--adapter", "nope"], "invalid choice: 'nope'"),
        (["agent", "create", "--company", "Acme", "--name", "B", "--config", '{"pace": -1}'], "config.pace"),
        (
            ["agent", "create", "--company", "Acme", "--name", "B", "--adapter", "openai", "--config", "{}"],
            "config.baseUrl: required",
        ),
        (["agent", "create", "--company", "Acme", "--name", "B", "--config", "{bad"], "invalid input"),
        (["agent", "create", "--company", "Acme", "--name", "B", "--config", "[1]"], "invalid input"),
    ],
)
def test_bad_cli_input_is_a_clear_error(workdir: Path, args: list[str], message: str) -> None:
    run(["company", "create", "Acme"], workdir)
    result = run(args, workdir)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`chatstream serve` in a subprocess; its stdout lines are collected as they come."""

    def __init__(self, cwd: Path) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [CONSOLE_SCRIPT, "serve", "--port", str(self.port)],
            cwd=cwd,
            env=sqlite_only_env(cwd),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        # A server that hangs silently is killed, so a blocked readline() ends instead of hanging the suite.
        self.watchdog = threading.Timer(120, self.proc.kill)
        self.watchdog.start()
        self.url = f"http://127.0.0.1:{self.port}"

    def read_until(self, needle: str) -> str:
        """Read output lines until one contains `needle` (the process's own progress, not a sleep)."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if needle in line:
                return line
        raise AssertionError(f"server exited before printing {needle!r}:\n" + "".join(self.lines))

    def stop(self) -> None:
        self.watchdog.cancel()
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def test_serve_embedded_default_first_start_and_restart(tmp_path: Path) -> None:
    """`serve` with nothing configured: SQLite file, migrations, demo data once, a working login link."""
    server = Server(tmp_path)
    try:
        link_line = server.read_until("Open this link")
        server.read_until("Uvicorn running")
        link = link_line.split("sign in: ", 1)[1].strip()
        assert link.startswith(f"{server.url}/#key=cs_")
        token = link.split("#key=", 1)[1]
        assert (tmp_path / "chatstream.db").exists()

        with httpx.Client(base_url=server.url) as http:
            assert http.get("/healthz").json() == {"status": "ok", "checks": {}}
            assert http.get("/readyz").json()["status"] == "ready"
            session = http.post("/api/session", json={"key": token})
            assert session.status_code == 200 and session.json()["role"] == "member"
            assert http.get("/api/me").json()["company"]["name"] == "Demo"
            agents = http.get("/api/agents").json()
            assert [a["adapter"] for a in agents] == ["echo"]
    finally:
        server.stop()

    again = Server(tmp_path)
    try:
        again.read_until("Uvicorn running")
        output = "".join(again.lines)
        assert "Open this link" not in output and "Sign in with an API key" in output
        with httpx.Client(base_url=again.url) as http:
            assert http.get("/api/me", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    finally:
        again.stop()
    listed = json.loads(run(["company", "list", "--json"], tmp_path).stdout)
    assert [c["name"] for c in listed] == ["Demo"]


def test_help_lists_commands() -> None:
    out = subprocess.run([CONSOLE_SCRIPT, "--help"], capture_output=True, text=True, cwd=ROOT).stdout
    for command in ("serve", "migrate", "company", "key", "agent"):
        assert command in out
    serve_help = subprocess.run([CONSOLE_SCRIPT, "serve", "--help"], capture_output=True, text=True, cwd=ROOT).stdout
    for flag in ("--host", "--port", "--workers", "--reload"):
        assert flag in serve_help


def test_serve_refuses_workers_without_redis(tmp_path: Path) -> None:
    """Several workers without Redis would each hold their own answers: refused, saying why
    and what to set."""
    result = run(["serve", "--workers", "2", "--port", str(free_port())], tmp_path)
    assert result.returncode == 2
    assert "REDIS_URL" in result.stderr and "share" in result.stderr and "Traceback" not in result.stderr
    result = run(["serve", "--workers", "0", "--port", str(free_port())], tmp_path)
    assert result.returncode == 2 and "at least 1" in result.stderr
