"""The stock `piccolo` CLI builds, checks, removes and rebuilds the schema on both engines."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, create_database, drop_database, piccolo_cli, postgres_env, sqlite_env

TABLES = {"company", "agent", "api_key", "session", "conversation", "message", "generation"}
INDEXES = {
    "message_conversation_created_at",
    "message_conversation_client_message_id",
    "conversation_company_last_message_at",
    "generation_one_running_per_conversation",
}


@pytest.fixture(params=["postgres", "sqlite"])
def fresh_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, dict[str, str], str]]:
    """An empty database of each engine: (engine, env for the CLI, name or path)."""
    if request.param == "postgres":
        name = f"chatstream_mig_{uuid.uuid4().hex[:10]}"
        create_database(name)
        try:
            yield "postgres", postgres_env(name), name
        finally:
            drop_database(name)
    else:
        path = tmp_path / "migrations.db"
        yield "sqlite", sqlite_env(path), str(path)


def _schema(engine: str, where: str) -> tuple[set[str], set[str], dict[str, set[str]]]:
    """(tables, indexes, columns per table) as the database reports them."""
    import asyncio

    import asyncpg

    from tests.conftest import PG_SERVER

    if engine == "sqlite":
        conn = sqlite3.connect(where)
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
            columns = {t: {r[1] for r in conn.execute(f"PRAGMA table_info({t})")} for t in tables}
        finally:
            conn.close()
        return tables, indexes, columns

    async def read() -> tuple[set[str], set[str], dict[str, set[str]]]:
        conn = await asyncpg.connect(f"{PG_SERVER}/{where}")
        try:
            tables = {r[0] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")}
            indexes = {r[0] for r in await conn.fetch("SELECT indexname FROM pg_indexes WHERE schemaname='public'")}
            columns: dict[str, set[str]] = {}
            for r in await conn.fetch(
                "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema='public'"
            ):
                columns.setdefault(r[0], set()).add(r[1])
        finally:
            await conn.close()
        return tables, indexes, columns

    return asyncio.run(read())


def test_forwards_check_backwards_forwards(fresh_db: tuple[str, dict[str, str], str]) -> None:
    """forwards all -> every table and index; check lists them as run; backwards all -> none;
    forwards again -> the same schema."""
    engine, env, where = fresh_db
    out = piccolo_cli("migrations", "forwards", "all", env=env).stdout
    assert "ok!" in out
    tables, indexes, columns = _schema(engine, where)
    assert tables >= TABLES
    assert indexes >= INDEXES
    assert {"edited_content", "edited_at", "client_message_id", "generation", "status"} <= columns["message"]
    assert {"token_hash", "token_prefix", "revoked_at", "last_used_at", "user_id", "role"} <= columns["api_key"]
    assert "token" not in columns["api_key"]
    assert {"api_key", "token_hash", "expires_at", "ended_at", "last_used_at"} <= columns["session"]
    assert {"token_count", "chunk_count", "finish_reason", "ttft_ms"} <= columns["generation"]
    assert "parts" in columns["message"]

    check = piccolo_cli("migrations", "check", env=env).stdout
    ran = [line for line in check.splitlines() if line.startswith("chatstream")]
    migrations = sorted(p for p in (ROOT / "piccolo_migrations").glob("chatstream_*.py"))
    assert len(ran) == len(migrations) >= 4 and all(line.rstrip().endswith("True") for line in ran), check

    piccolo_cli("migrations", "backwards", "chatstream", "--migration_id=all", "--auto_agree", env=env)
    tables, indexes, _ = _schema(engine, where)
    assert not tables & TABLES
    assert not indexes & INDEXES

    piccolo_cli("migrations", "forwards", "all", env=env)
    assert _schema(engine, where) == _schema(engine, where)
    tables, indexes, columns_again = _schema(engine, where)
    assert tables >= TABLES and indexes >= INDEXES and columns_again == columns


PARTS_MIGRATION = "2026-12-03T13:17:19:933039"
NOW = "CURRENT_TIMESTAMP"


def _sql(engine: str, where: str, statements: list[str], query: str) -> list[tuple[Any, ...]]:
    """Run `statements`, then return the rows of `query`."""
    import asyncio

    import asyncpg

    from tests.conftest import PG_SERVER

    if engine == "sqlite":
        conn = sqlite3.connect(where)
        try:
            for statement in statements:
                conn.execute(statement)
            conn.commit()
            return [tuple(r) for r in conn.execute(query)]
        finally:
            conn.close()

    async def run() -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(f"{PG_SERVER}/{where}")
        try:
            for statement in statements:
                await conn.execute(statement)
            return [tuple(r) for r in await conn.fetch(query)]
        finally:
            await conn.close()

    return asyncio.run(run())


def test_the_parts_migration_goes_back_and_forth_keeping_answers(fresh_db: tuple[str, dict[str, str], str]) -> None:
    """Backwards from the parts migration keeps user and agent messages (their `content` is the
    text) and drops tool results, which the older version cannot read; forwards adds `parts` again."""
    engine, env, where = fresh_db
    piccolo_cli("migrations", "forwards", "all", env=env)
    ids = [str(uuid.uuid4()) for _ in range(5)]
    company, conversation, user_msg, agent_msg, tool_msg = ids
    parts = '[{"kind":"text","state":"complete","text":"hi"}]'
    _sql(
        engine,
        where,
        [
            f"INSERT INTO company (id, name, created_at) VALUES ('{company}', 'c', CURRENT_TIMESTAMP)",
            "INSERT INTO conversation (id, company, owner_id, last_message_at, created_at, updated_at) "
            f"VALUES ('{conversation}', '{company}', '{company}', {NOW}, {NOW}, {NOW})",
            *(
                "INSERT INTO message (id, conversation, role, content, status, created_at, parts) "
                f"VALUES ('{mid}', '{conversation}', '{role}', 'hi', 'complete', CURRENT_TIMESTAMP, {value})"
                for mid, role, value in [
                    (user_msg, "user", "NULL"),
                    (agent_msg, "agent", f"'{parts}'"),
                    (tool_msg, "tool", "'[]'"),
                ]
            ),
        ],
        "SELECT 1",
    )
    piccolo_cli("migrations", "backwards", "chatstream", f"--migration_id={PARTS_MIGRATION}", "--auto_agree", env=env)
    _, _, columns = _schema(engine, where)
    assert "parts" not in columns["message"]
    rows = _sql(engine, where, [], "SELECT role, content FROM message ORDER BY role")
    assert rows == [("agent", "hi"), ("user", "hi")]
    piccolo_cli("migrations", "forwards", "all", env=env)
    assert "parts" in _schema(engine, where)[2]["message"]
    assert _sql(engine, where, [], "SELECT role, parts FROM message ORDER BY role") == [("agent", None), ("user", None)]


def test_tables_match_migrations(tmp_path: Path) -> None:
    """The table classes declare nothing the migrations lack: auto-migration finds no change."""
    db = tmp_path / "auto.db"
    env = sqlite_env(db)
    piccolo_cli("migrations", "forwards", "all", env=env)
    folder = Path(__file__).resolve().parents[2] / "piccolo_migrations"
    before = set(folder.iterdir())
    try:
        result = piccolo_cli("migrations", "new", "chatstream", "--auto", env=env, check=False)
    finally:
        for created in set(folder.iterdir()) - before:  # a detected change must not leave a file behind
            created.unlink()
    assert "No changes detected" in result.stdout + result.stderr, result.stdout + result.stderr
