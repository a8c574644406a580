"""Fill `chunk_count` of generations stored before it existed.

Until then every `token` event counted as one token, so chunk_count = token_count
keeps their terminal event's seq (token_count + 2) what readers were given.
"""

from piccolo.apps.migrations.auto.migration_manager import MigrationManager
from piccolo.engine import engine_finder

ID = "2026-11-25T10:30:43:698228"
VERSION = "1.38.0"
DESCRIPTION = "backfill generation chunk count"


async def forwards() -> MigrationManager:
    manager = MigrationManager(migration_id=ID, app_name="chatstream", description=DESCRIPTION)

    async def backfill_chunk_count() -> None:
        engine = engine_finder()
        assert engine is not None
        await engine.run_ddl("UPDATE generation SET chunk_count = token_count")

    manager.add_raw(backfill_chunk_count)
    return manager
