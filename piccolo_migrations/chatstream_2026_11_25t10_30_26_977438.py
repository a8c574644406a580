"""Generation: `chunk_count` (token events sent) apart from `token_count` (the model's own
count, from its usage report), and `finish_reason`.

The next migration fills `chunk_count` of existing rows (Piccolo runs a migration's raw
SQL before its column changes, so it cannot be done here).
"""

from piccolo.apps.migrations.auto.migration_manager import MigrationManager
from piccolo.columns.column_types import Integer, Varchar
from piccolo.columns.indexes import IndexMethod

ID = "2026-11-25T10:30:26:977438"
VERSION = "1.38.0"
DESCRIPTION = "generation chunk count and finish reason"


async def forwards() -> MigrationManager:
    manager = MigrationManager(migration_id=ID, app_name="chatstream", description=DESCRIPTION)

    manager.add_column(
        table_class_name="Generation",
        tablename="generation",
        column_name="chunk_count",
        db_column_name="chunk_count",
        column_class_name="Integer",
        column_class=Integer,
        params={
            "default": 0,
            "null": False,
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

    manager.add_column(
        table_class_name="Generation",
        tablename="generation",
        column_name="finish_reason",
        db_column_name="finish_reason",
        column_class_name="Varchar",
        column_class=Varchar,
        params={
            "length": 32,
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

    return manager
