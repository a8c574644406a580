"""Settings, read once from the environment.

Every knob is an environment variable so that the same code runs on a laptop
(nothing set: SQLite file, in-process everything) and behind a load balancer.
"""

from __future__ import annotations

import os
from functools import lru_cache

import msgspec

DEFAULT_SQLITE_PATH = "chatstream.db"


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Process-wide settings. Build with :func:`get_settings`."""

    # `postgresql://…` selects PostgreSQL; unset selects the SQLite file below.
    database_url: str | None = None
    sqlite_path: str = DEFAULT_SQLITE_PATH
    # Where people reach the server; used for the printed login link.
    public_url: str | None = None
    # Request limits. Bodies over `max_body_bytes` are refused with 413 before parsing.
    max_body_bytes: int = 256 * 1024
    max_content_chars: int = 50_000
    max_title_chars: int = 200
    # Session cookie. `Secure` is on unless explicitly turned off for plain-HTTP dev.
    cookie_name: str = "chatstream_session"
    cookie_secure: bool = False
    cookie_max_age: int = 30 * 24 * 3600
    log_level: str = "INFO"

    @property
    def is_postgres(self) -> bool:
        """True when the configured database is PostgreSQL."""
        return self.database_url is not None and self.database_url.startswith(("postgres://", "postgresql://"))


def _bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def settings_from_env(env: dict[str, str] | None = None) -> Settings:
    """Build settings from an environment mapping (``os.environ`` by default)."""
    env = dict(os.environ if env is None else env)
    values: dict[str, object] = {}
    if env.get("DATABASE_URL"):
        values["database_url"] = env["DATABASE_URL"]
    if env.get("CHATSTREAM_SQLITE_PATH"):
        values["sqlite_path"] = env["CHATSTREAM_SQLITE_PATH"]
    if env.get("CHATSTREAM_PUBLIC_URL"):
        values["public_url"] = env["CHATSTREAM_PUBLIC_URL"].rstrip("/")
    for name, key in (
        ("max_body_bytes", "CHATSTREAM_MAX_BODY_BYTES"),
        ("cookie_max_age", "CHATSTREAM_COOKIE_MAX_AGE"),
    ):
        if env.get(key):
            values[name] = int(env[key])
    if env.get("CHATSTREAM_COOKIE_SECURE"):
        values["cookie_secure"] = _bool(env["CHATSTREAM_COOKIE_SECURE"])
    if env.get("CHATSTREAM_LOG_LEVEL"):
        values["log_level"] = env["CHATSTREAM_LOG_LEVEL"].upper()
    return msgspec.convert(values, Settings)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    return settings_from_env()
