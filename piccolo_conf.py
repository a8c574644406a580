"""Piccolo configuration, used by the app and by the stock `piccolo` CLI.

The engine follows `DATABASE_URL` (see app/config.py): PostgreSQL when set,
the SQLite file `./chatstream.db` otherwise.
"""

from piccolo.conf.apps import AppRegistry

from app.config import settings_from_env
from app.db import engine_from_settings

DB = engine_from_settings(settings_from_env())

APP_REGISTRY = AppRegistry(apps=["app.piccolo_app"])
