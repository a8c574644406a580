"""Indexes that Piccolo's table classes cannot declare (composite and partial).

Part of the initial schema: it runs right after the auto-generated migration
that creates the tables. The SQL is the same on PostgreSQL and SQLite.
"""

from piccolo.apps.migrations.auto.migration_manager import MigrationManager
from piccolo.engine import engine_finder

ID = "2026-11-25T07:51:32:112890"
VERSION = "1.38.0"
DESCRIPTION = "indexes piccolo cannot declare"

INDEXES = {
    # Message pages: WHERE conversation = ? ORDER BY created_at, id.
    "message_conversation_created_at": (
        "CREATE INDEX message_conversation_created_at ON message (conversation, created_at, id)"
    ),
    # A client's retry of the same send finds its first message instead of adding one.
    # (A unique index, not a constraint: SQLite cannot add constraints to a table.)
    "message_conversation_client_message_id": (
        "CREATE UNIQUE INDEX message_conversation_client_message_id ON message (conversation, client_message_id)"
    ),
    # Conversation lists: WHERE company = ? ORDER BY last_message_at DESC, id DESC.
    "conversation_company_last_message_at": (
        "CREATE INDEX conversation_company_last_message_at ON conversation (company, last_message_at, id)"
    ),
    # At most one running generation per conversation, enforced by the database.
    "generation_one_running_per_conversation": (
        "CREATE UNIQUE INDEX generation_one_running_per_conversation "
        "ON generation (conversation) WHERE status = 'running'"
    ),
}


async def forwards() -> MigrationManager:
    manager = MigrationManager(migration_id=ID, app_name="chatstream", description=DESCRIPTION)

    async def create_indexes() -> None:
        engine = engine_finder()
        assert engine is not None
        for sql in INDEXES.values():
            await engine.run_ddl(sql)

    async def drop_indexes() -> None:
        engine = engine_finder()
        assert engine is not None
        for name in INDEXES:
            await engine.run_ddl(f"DROP INDEX IF EXISTS {name}")

    manager.add_raw(create_indexes)
    manager.add_raw_backwards(drop_indexes)
    return manager
