"""Test setup shared by every test.

A uniquely named PostgreSQL database is created for the run (one per test worker: the
suite runs in parallel with pytest-xdist) and dropped after;
`DATABASE_URL` points at it before any app module is imported, because Piccolo
reads the engine from `piccolo_conf` at first use. Its schema is made by the
stock `piccolo` CLI. Tests that also run on SQLite take the `db` fixture.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.node_support import install_node_packages

ROOT = Path(__file__).resolve().parent.parent
PG_SERVER = os.environ.get("CHATSTREAM_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
TEST_DB = f"chatstream_test_{uuid.uuid4().hex[:12]}"
os.environ["DATABASE_URL"] = f"{PG_SERVER}/{TEST_DB}"
os.environ.pop("CHATSTREAM_SQLITE_PATH", None)
os.environ.setdefault("PICCOLO_CONF", "piccolo_conf")
# The ASGI test clients send `Host: testserver`; real servers in tests are on 127.0.0.1
# (allowed anyway). Tests of the Host check pass their own settings.
os.environ["CHATSTREAM_ALLOWED_HOSTS"] = "testserver"
# Access tokens (POST /api/tokens) are on, as in a deployment that uses them, for the app
# under test and every server a test starts (a test of the disabled case sets it empty).
TEST_TOKEN_SECRET = "test-token-secret-" + "0123456789abcdef" * 2
os.environ["CHATSTREAM_TOKEN_SECRET"] = TEST_TOKEN_SECRET

PICCOLO = str(Path(sys.executable).with_name("piccolo"))


def piccolo_cli(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the stock `piccolo` command line in a subprocess, from the repo root."""
    result = subprocess.run(
        [PICCOLO, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        input="",
    )
    if check and result.returncode != 0:
        raise AssertionError(f"piccolo {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def postgres_env(database: str) -> dict[str, str]:
    """Environment for a subprocess using the given PostgreSQL database."""
    env = dict(os.environ)
    env["DATABASE_URL"] = f"{PG_SERVER}/{database}"
    return env


def sqlite_env(path: Path) -> dict[str, str]:
    """Environment for a subprocess using the given SQLite file."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["CHATSTREAM_SQLITE_PATH"] = str(path)
    return env


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(f"{PG_SERVER}/postgres")
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def create_database(name: str) -> None:
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))


def drop_database(name: str) -> None:
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _runs_tests(config: pytest.Config) -> bool:
    """False in pytest-xdist's controlling process, which only hands tests to the workers."""
    return hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None)


def pytest_sessionstart(session: pytest.Session) -> None:
    if _runs_tests(session.config):
        create_database(TEST_DB)
        piccolo_cli("migrations", "forwards", "all", env=postgres_env(TEST_DB))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _runs_tests(session.config):
        drop_database(TEST_DB)


@pytest.fixture(scope="session")
def node_packages() -> Path:
    """tests/js/node_modules (the pinned Node packages of the tests), installed once."""
    return install_node_packages()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file, made once by the stock CLI; tests copy it."""
    path = tmp_path_factory.mktemp("sqlite") / "template.db"
    piccolo_cli("migrations", "forwards", "all", env=sqlite_env(path))
    return path


@pytest.fixture(params=["postgres", "sqlite"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Run the test on PostgreSQL and again on a fresh SQLite file.

    Piccolo binds tables to an engine lazily; pointing every table at the SQLite
    engine for the test's duration switches the whole service layer over.
    """
    if request.param == "postgres":
        yield "postgres"
        return
    from piccolo.engine.sqlite import SQLiteEngine

    from app.tables import TABLES

    path = tmp_path / "test.db"
    shutil.copy(request.getfixturevalue("sqlite_template"), path)
    engine = SQLiteEngine(path=str(path), timeout=10)
    saved = [table._meta.db for table in TABLES]
    for table in TABLES:
        table._meta.db = engine
    try:
        yield "sqlite"
    finally:
        for table, previous in zip(TABLES, saved, strict=False):
            table._meta.db = previous


@pytest.fixture
async def app() -> AsyncIterator[object]:
    """The app with its startup/shutdown run on the test's own event loop."""
    from app.main import create_app

    application = create_app()
    async with application.lifespan():
        yield application


@pytest.fixture
async def client(app: object) -> AsyncIterator[object]:
    """An httpx client speaking ASGI to the app on the test's event loop."""
    import httpx

    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        yield http


@pytest.fixture
async def acme() -> object:
    """A company with `admin`, `alice`, `bob` and an echo agent (see tests/factories.py)."""
    from tests.factories import make_tenant

    return await make_tenant()


@pytest.fixture
async def globex() -> object:
    """A second, unrelated company: for cross-tenant checks."""
    from tests.factories import make_tenant

    return await make_tenant()


@pytest.fixture(params=["in-process", "redis"])
def broker_kind(request: pytest.FixtureRequest) -> str:
    """Run the test with each broker: in-process, and Redis (a key prefix of its own)."""
    return str(request.param)


@pytest.fixture
async def core(broker_kind: str) -> AsyncIterator[object]:
    """A streaming core on each broker, shut down (answers cancelled) after the test."""
    from app.chat.answer_store import ChatAnswerStore
    from app.streaming.core import StreamingCore
    from app.streaming.policy import StreamPolicy
    from tests.redis_support import any_broker

    async with any_broker(broker_kind) as broker:
        streaming = StreamingCore(broker, StreamPolicy(), store=ChatAnswerStore())
        yield streaming
        await streaming.shutdown()
