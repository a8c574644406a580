"""Database engine selection and lifecycle.

`piccolo_conf.py` asks :func:`engine_from_settings` for the engine, so the app,
the stock `piccolo` CLI and the tests all pick the same database.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from functools import cache
from typing import Any

import asyncpg
from piccolo.engine.base import Engine
from piccolo.engine.postgres import PostgresEngine
from piccolo.engine.sqlite import SQLiteEngine, TransactionType
from piccolo.table import Table
from piccolo.utils.sql_values import convert_to_sql_value

from app.config import Settings


def engine_from_settings(settings: Settings) -> Engine[Any]:
    """PostgreSQL (asyncpg) when `DATABASE_URL` is a postgres URL, else the SQLite file."""
    if settings.database_url:
        if not settings.is_postgres:
            raise ValueError(
                f"DATABASE_URL must start with postgresql:// (got {settings.database_url.split(':', 1)[0]}://); "
                "unset it to use the embedded SQLite database"
            )
        return PostgresEngine(config={"dsn": settings.database_url})
    # A busy timeout lets concurrent writers wait for the file lock instead of failing at once.
    return SQLiteEngine(path=settings.sqlite_path, timeout=10)


async def _keep_session(connection: Any) -> None:
    """Pool `reset` hook: the app leaves no session state (no LISTEN, locks, SETs) behind,
    so connections go back to the pool without asyncpg's reset round trip."""


async def open_pool(engine: Engine[Any]) -> None:
    """Start the connection pool (PostgreSQL); put SQLite in WAL mode, so readers never
    wait for a writer (it is a property of the file and stays)."""
    if isinstance(engine, PostgresEngine):
        await engine.start_connection_pool(min_size=1, max_size=10, reset=_keep_session)
    elif isinstance(engine, SQLiteEngine):
        await engine.run_ddl("PRAGMA journal_mode=WAL")


def write_transaction(engine: Engine[Any]) -> Any:
    """A transaction that writes. On SQLite it takes the write lock when it begins
    (`BEGIN IMMEDIATE`), so a concurrent writer waits for it (busy timeout) instead of
    failing at once when a read inside the transaction turns into a write."""
    if isinstance(engine, SQLiteEngine):
        return engine.transaction(transaction_type=TransactionType.immediate)
    return engine.transaction()


async def close_pool(engine: Engine[Any]) -> None:
    """Close the connection pool opened by :func:`open_pool`."""
    if isinstance(engine, PostgresEngine):
        await engine.close_connection_pool()


async def check_database(engine: Engine[Any]) -> None:
    """Raise if the database cannot answer a trivial query."""
    await engine.run_ddl("SELECT 1")


def is_unique_violation(exc: BaseException) -> bool:
    """True for a unique-constraint failure on either engine."""
    import sqlite3

    from asyncpg.exceptions import UniqueViolationError

    if isinstance(exc, UniqueViolationError):
        return True
    return isinstance(exc, sqlite3.IntegrityError) and "UNIQUE" in str(exc)


def is_foreign_key_violation(exc: BaseException) -> bool:
    """True when a write referenced a row that is gone (e.g. a conversation deleted meanwhile)."""
    import sqlite3

    from asyncpg.exceptions import ForeignKeyViolationError

    if isinstance(exc, ForeignKeyViolationError):
        return True
    return isinstance(exc, sqlite3.IntegrityError) and "FOREIGN KEY" in str(exc)


def is_missing_table(exc: BaseException) -> bool:
    """True when a query failed because the schema was never migrated."""
    import sqlite3

    from asyncpg.exceptions import UndefinedTableError

    if isinstance(exc, UndefinedTableError):
        return True
    return isinstance(exc, sqlite3.OperationalError) and "no such table" in str(exc)


# Statements every answer runs, written once instead of built by the ORM on every call:
# building them was about a third of an answer's CPU (docs/benchmarks.md). `Table.raw`
# still runs them through Piccolo (its transaction, its placeholders on either engine).


@cache
def columns_of(table: type[Table]) -> str:
    """The table's columns for a SELECT list, quoted: the same keys as `table.select()` gives."""
    return ",".join(f'"{column._meta.db_column_name}"' for column in table._meta.columns)


@cache
def insert_sql(table: type[Table]) -> str:
    """`INSERT` of one row, every column, its values as placeholders (see :func:`row_values`)."""
    marks = ",".join("{}" for _ in table._meta.columns)
    return f'INSERT INTO "{table._meta.tablename}" ({columns_of(table)}) VALUES ({marks})'


async def insert_row(row: Table) -> None:
    """Insert a new row, as `row.save()` does (every column, its defaults already filled in
    when the row object was made), from a statement written once per table."""
    await type(row).raw(insert_sql(type(row)), *row_values(row))
    row._exists_in_db = True


def on_postgres(table: type[Table]) -> bool:
    """True when `table` lives in PostgreSQL (which runs a data-modifying `WITH` as one
    atomic statement: what takes a transaction of several round trips on SQLite)."""
    return isinstance(table._meta.db, PostgresEngine)


def row_values(row: Table) -> list[Any]:
    """The row's values in column order, as :func:`insert_row` stores them."""
    table = type(row)
    return [convert_to_sql_value(value=row[column._meta.name], column=column) for column in table._meta.columns]


@cache
def insert_select_sql(table: type[Table], source: str) -> str:
    """PostgreSQL: `INSERT` one row of the given values for each row of `source` (a `WITH`
    name): none when `source` is empty. The values are cast, having no column to type them."""
    casts = ",".join(f"{{}}::{column.column_type}" for column in table._meta.columns)
    return f'INSERT INTO "{table._meta.tablename}" ({columns_of(table)}) SELECT {casts} FROM {source}'


# Seconds a client is asked to wait when the database cannot be reached.
OUTAGE_RETRY_AFTER = 5

# Failures that mean the database cannot be reached or is not taking work now (an outage,
# not a bug of ours): asyncpg's connection errors (class 08), a server shutting down or
# refusing connections (class 57, 53300), a connection lost mid-query, and SQLite's
# OperationalError (locked past the busy timeout, the file unreadable).
_OUTAGES: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InterfaceError,
    sqlite3.OperationalError,
    ConnectionError,
    TimeoutError,
)


# Any failure of the database or of the connection to it, on either engine (bugs included).
_DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    sqlite3.Error,
    asyncpg.PostgresError,
    asyncpg.exceptions.InterfaceError,
    ConnectionError,
)


def _with_causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and a few of the exceptions that caused it (a query error wrapped by a caller)."""
    error: BaseException | None = exc
    for _ in range(4):
        if error is None:
            return
        yield error
        error = error.__cause__ or error.__context__


def is_database_error(exc: BaseException) -> bool:
    """True for a failure of the database or of the connection to it (also as the cause of `exc`)."""
    return any(isinstance(error, _DATABASE_ERRORS) for error in _with_causes(exc))


def is_outage(exc: BaseException) -> bool:
    """True when `exc` (or what caused it) says the database is down or unreachable."""
    return any(isinstance(error, _OUTAGES) for error in _with_causes(exc))
