"""Answers as typed parts: `message.parts` (JSON, null for user messages and older answers)
and the `tool` message role (a client's result for a tool call of the agent).

Backwards drops the column and the tool messages (the older version cannot read either)."""

from enum import Enum

from piccolo.apps.migrations.auto.migration_manager import MigrationManager
from piccolo.columns.column_types import JSON, Varchar
from piccolo.columns.indexes import IndexMethod
from piccolo.engine import engine_finder

ID = "2026-12-03T13:17:19:933039"
VERSION = "1.38.0"
DESCRIPTION = "message parts and tool messages"


async def forwards() -> MigrationManager:
    manager = MigrationManager(migration_id=ID, app_name="chatstream", description=DESCRIPTION)

    async def drop_tool_messages() -> None:
        engine = engine_finder()
        assert engine is not None
        await engine.run_ddl("DELETE FROM message WHERE role = 'tool'")

    manager.add_raw_backwards(drop_tool_messages)

    manager.add_column(
        table_class_name="Message",
        tablename="message",
        column_name="parts",
        db_column_name="parts",
        column_class_name="JSON",
        column_class=JSON,
        params={
            "default": None,
            "null": True,
            "primary_key": False,
            "unique": False,
            "index": False,
            "index_method": IndexMethod.btree,
            "choices": None,
            "db_column_name": None,
            "secret": False,
        },
        schema=None,
    )

    manager.alter_column(
        table_class_name="Message",
        tablename="message",
        column_name="role",
        db_column_name="role",
        params={"choices": Enum("MessageRole", {"user": "user", "agent": "agent", "tool": "tool"})},
        old_params={"choices": Enum("MessageRole", {"user": "user", "agent": "agent"})},
        column_class=Varchar,
        old_column_class=Varchar,
        schema=None,
    )

    return manager
