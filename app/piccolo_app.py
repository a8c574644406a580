"""The Piccolo app: its tables and the top-level `piccolo_migrations/` folder."""

from pathlib import Path

from piccolo.conf.apps import AppConfig

from app.tables import TABLES

MIGRATIONS_FOLDER = Path(__file__).resolve().parent.parent / "piccolo_migrations"

APP_CONFIG = AppConfig(
    app_name="chatstream",
    migrations_folder_path=str(MIGRATIONS_FOLDER),
    table_classes=TABLES,
    migration_dependencies=[],
    commands=[],
)
