"""The stock `piccolo` CLI builds, checks, removes and rebuilds the schema on both engines."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

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
