"""Settings from the environment, and the engine they select."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config import DEFAULT_SQLITE_PATH, Settings, settings_from_env
from app.db import engine_from_settings


def test_nothing_set_means_sqlite_default_file() -> None:
    """With no DATABASE_URL the embedded SQLite file `chatstream.db` is used."""
    settings = settings_from_env({})
    assert settings.database_url is None
    assert not settings.is_postgres
    assert settings.sqlite_path == DEFAULT_SQLITE_PATH == "chatstream.db"


def test_empty_database_url_counts_as_unset() -> None:
    """`DATABASE_URL=` (empty) is the same as not setting it."""
    settings = settings_from_env({"DATABASE_URL": ""})
    assert settings.database_url is None
    assert not settings.is_postgres


@pytest.mark.parametrize("url", ["postgresql://u:p@db:5432/chat", "postgres://u@localhost/chat"])
def test_postgres_database_url_selects_postgres(url: str) -> None:
    """A postgres URL is kept as is and selects PostgreSQL."""
    settings = settings_from_env({"DATABASE_URL": url})
    assert settings.database_url == url
    assert settings.is_postgres


def test_sqlite_path_can_be_overridden() -> None:
    """CHATSTREAM_SQLITE_PATH moves the SQLite file."""
    assert settings_from_env({"CHATSTREAM_SQLITE_PATH": "/data/x.db"}).sqlite_path == "/data/x.db"


def test_max_body_bytes_is_parsed_as_an_int() -> None:
    """CHATSTREAM_MAX_BODY_BYTES is read as a number of bytes."""
    assert settings_from_env({"CHATSTREAM_MAX_BODY_BYTES": "1024"}).max_body_bytes == 1024
    assert settings_from_env({}).max_body_bytes == 256 * 1024


def test_other_knobs_are_parsed() -> None:
    """Public URL loses its trailing slash; booleans and log level are normalised."""
    settings = settings_from_env(
        {
            "CHATSTREAM_PUBLIC_URL": "https://chat.example.com/",
            "CHATSTREAM_COOKIE_SECURE": "Yes",
            "CHATSTREAM_COOKIE_MAX_AGE": "60",
            "CHATSTREAM_LOG_LEVEL": "debug",
        }
    )
    assert settings.public_url == "https://chat.example.com"
    assert settings.cookie_secure is True
    assert settings.cookie_max_age == 60
    assert settings.log_level == "DEBUG"
    assert settings_from_env({"CHATSTREAM_COOKIE_SECURE": "off"}).cookie_secure is False


def test_settings_from_env_reads_the_given_mapping_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """An explicit mapping is used instead of os.environ (the test session sets DATABASE_URL)."""
    monkeypatch.setenv("CHATSTREAM_MAX_BODY_BYTES", "7")
    assert settings_from_env({}).max_body_bytes == 256 * 1024
    assert settings_from_env().max_body_bytes == 7


@pytest.mark.parametrize(
    "url",
    ["mysql://root:hunter2@db/chat", "sqlite:///tmp/x.db", "http://localhost", "postgresqlx://db/x"],
)
def test_engine_rejects_a_non_postgres_database_url(url: str) -> None:
    """A DATABASE_URL that is not postgres is refused with a clear ValueError (and no password echoed)."""
    with pytest.raises(ValueError, match="postgresql://") as info:
        engine_from_settings(Settings(database_url=url))
    message = str(info.value)
    assert url.split(":", 1)[0] in message
    assert "hunter2" not in message
    assert "unset" in message


def test_engine_without_database_url_is_sqlite_at_the_configured_path(tmp_path: Path) -> None:
    """Unset DATABASE_URL gives a SQLite engine on `sqlite_path`."""
    from piccolo.engine.sqlite import SQLiteEngine

    path = tmp_path / "chat.db"
    engine = engine_from_settings(settings_from_env({"CHATSTREAM_SQLITE_PATH": str(path)}))
    assert isinstance(engine, SQLiteEngine)
    assert engine.path == str(path)


def test_engine_default_sqlite_path_is_relative_chatstream_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing set the engine opens `./chatstream.db` in the working directory."""
    from piccolo.engine.sqlite import SQLiteEngine

    monkeypatch.chdir(tmp_path)
    engine = engine_from_settings(settings_from_env({}))
    assert isinstance(engine, SQLiteEngine)
    assert engine.path == "chatstream.db"
