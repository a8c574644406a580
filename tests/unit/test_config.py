"""Settings from the environment, and the engine they select."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config import DEFAULT_SQLITE_PATH, Settings, SettingsError, settings_from_env
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


def test_session_lifetime_and_credential_recheck() -> None:
    """Sessions last 7 days and open connections re-check their credentials every 60 s by
    default; both can be set, and a re-check interval that is not positive is refused."""
    defaults = settings_from_env({})
    assert defaults.cookie_max_age == 7 * 24 * 3600 and defaults.credential_recheck == 60.0
    settings = settings_from_env({"CHATSTREAM_COOKIE_MAX_AGE": "3600", "CHATSTREAM_CREDENTIAL_RECHECK": "0.5"})
    assert settings.cookie_max_age == 3600 and settings.credential_recheck == 0.5
    for bad in ("0", "-1", "soon"):
        with pytest.raises(SettingsError, match="CHATSTREAM_CREDENTIAL_RECHECK"):
            settings_from_env({"CHATSTREAM_CREDENTIAL_RECHECK": bad})


def test_allowed_hosts_and_origins_with_the_former_origins_name() -> None:
    """`CHATSTREAM_ALLOWED_HOSTS` and `CHATSTREAM_ALLOWED_ORIGINS` default to empty; the former
    `CHATSTREAM_WS_ALLOWED_ORIGINS` still sets the origins, and the new name wins over it."""
    defaults = settings_from_env({})
    assert defaults.allowed_hosts == "" and defaults.allowed_origins == ""
    settings = settings_from_env(
        {"CHATSTREAM_ALLOWED_HOSTS": " chat.internal,* ", "CHATSTREAM_WS_ALLOWED_ORIGINS": "https://old.example"}
    )
    assert settings.allowed_hosts == "chat.internal,*" and settings.allowed_origins == "https://old.example"
    both = {"CHATSTREAM_ALLOWED_ORIGINS": "https://new.example", "CHATSTREAM_WS_ALLOWED_ORIGINS": "https://old.example"}
    assert settings_from_env(both).allowed_origins == "https://new.example"


def test_model_key_vars_bind_variables_to_hosts() -> None:
    """CHATSTREAM_MODEL_KEY_VARS: `VAR=host[:port]|host2,...`; by default OpenAI's key goes to OpenAI only."""
    from app.upstream_policy import HostPort

    assert settings_from_env({}).upstream_policy.key_hosts == {"OPENAI_API_KEY": (HostPort("api.openai.com"),)}
    policy = settings_from_env({"CHATSTREAM_MODEL_KEY_VARS": "A=h1|h2:8443,B=h3"}).upstream_policy
    assert policy.key_hosts == {"A": (HostPort("h1"), HostPort("h2", 8443)), "B": (HostPort("h3"),)}


def test_a_key_variable_without_hosts_stops_startup_saying_what_to_write() -> None:
    from app.config import SettingsError

    with pytest.raises(SettingsError, match=r"CHATSTREAM_MODEL_KEY_VARS.*OPENAI_API_KEY=api\.openai\.com"):
        settings_from_env({"CHATSTREAM_MODEL_KEY_VARS": "OPENAI_API_KEY"})


def test_upstream_allow_and_the_model_pool_are_parsed() -> None:
    """CHATSTREAM_UPSTREAM_ALLOW (empty: public addresses only) and CHATSTREAM_MODEL_MAX_CONNECTIONS."""
    import ipaddress

    from app.config import SettingsError

    assert settings_from_env({}).upstream_policy.allow == ()
    assert settings_from_env({}).model_max_connections == 100
    settings = settings_from_env(
        {"CHATSTREAM_UPSTREAM_ALLOW": "127.0.0.1:11434,10.0.0.0/8", "CHATSTREAM_MODEL_MAX_CONNECTIONS": "8"}
    )
    assert settings.model_max_connections == 8
    assert settings.upstream_policy.address_allowed("x", ipaddress.ip_address("127.0.0.1"), 11434)
    assert not settings.upstream_policy.address_allowed("x", ipaddress.ip_address("127.0.0.1"), 80)
    with pytest.raises(SettingsError, match="CHATSTREAM_UPSTREAM_ALLOW"):
        settings_from_env({"CHATSTREAM_UPSTREAM_ALLOW": "10.0.0.0/33"})
    with pytest.raises(SettingsError, match="CHATSTREAM_MODEL_MAX_CONNECTIONS"):
        settings_from_env({"CHATSTREAM_MODEL_MAX_CONNECTIONS": "0"})


def test_caps_and_connection_timeouts_are_parsed() -> None:
    """Per-key / per-company caps and the serve timeouts: sane defaults, numbers from the environment."""
    defaults = settings_from_env({})
    assert (defaults.max_sockets_per_key, defaults.max_sockets_per_company) == (20, 1000)
    assert (defaults.max_streams_per_key, defaults.max_streams_per_company) == (20, 1000)
    assert (defaults.max_answers_per_key, defaults.max_answers_per_company) == (10, 100)
    assert (defaults.max_connections, defaults.header_timeout, defaults.body_timeout) == (2000, 10.0, 30.0)
    settings = settings_from_env(
        {
            "CHATSTREAM_MAX_SOCKETS_PER_KEY": "3",
            "CHATSTREAM_MAX_STREAMS_PER_COMPANY": "7",
            "CHATSTREAM_MAX_ANSWERS_PER_KEY": "2",
            "CHATSTREAM_MAX_CONNECTIONS": "500",
            "CHATSTREAM_HEADER_TIMEOUT": "2.5",
            "CHATSTREAM_BODY_TIMEOUT": "0",
        }
    )
    assert (settings.max_sockets_per_key, settings.max_streams_per_company, settings.max_answers_per_key) == (3, 7, 2)
    assert (settings.max_connections, settings.header_timeout, settings.body_timeout) == (500, 2.5, 0.0)


@pytest.mark.parametrize(
    ("variable", "value"), [("CHATSTREAM_MAX_ANSWERS_PER_KEY", "0"), ("CHATSTREAM_HEADER_TIMEOUT", "-1")]
)
def test_a_cap_below_one_or_a_negative_timeout_is_refused(variable: str, value: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        settings_from_env({variable: value})
