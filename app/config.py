"""Settings, read once from the environment.

Every knob is an environment variable so that the same code runs on a laptop
(nothing set: SQLite file, in-process everything) and behind a load balancer.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Annotated, Literal

import msgspec

from app.upstream_policy import UpstreamPolicy, parse_allow_list, parse_key_bindings

DEFAULT_SQLITE_PATH = "chatstream.db"


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Process-wide settings. Build with :func:`get_settings`; each field's variable is in `ENV`."""

    # `postgresql://…` selects PostgreSQL; unset selects the SQLite file below.
    database_url: str | None = None
    sqlite_path: str = DEFAULT_SQLITE_PATH
    # Where people reach the server; used for the printed login link.
    public_url: str | None = None
    # Bodies over this many bytes are refused with 413 before parsing.
    max_body_bytes: int = 256 * 1024
    # Session cookie. `Secure` only when asked: the embedded default serves plain HTTP.
    cookie_name: str = "chatstream_session"
    cookie_secure: bool = False
    # Lifetime of a browser session (and its cookie) in seconds; the server refuses it after.
    cookie_max_age: int = 7 * 24 * 3600
    # Seconds between re-checks of the credentials of open sockets and SSE streams (the
    # fallback when a revocation message is lost, and how an expired session is noticed).
    credential_recheck: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    # Seconds a process reuses an authenticated key or session for its next requests (0: look
    # it up every time). Revocation clears it at once on every process; this bounds a lost message.
    auth_cache_seconds: Annotated[float, msgspec.Meta(ge=0, le=60)] = 5.0
    # Signing secret of short-lived access tokens (`POST /api/tokens`, HS256 JWTs); at least
    # 32 characters, the same on every process and node. Unset: no tokens are issued or accepted.
    token_secret: str | None = None
    # Lifetime of an access token in seconds (a request may ask for less, never more).
    token_ttl: Annotated[int, msgspec.Meta(ge=60, le=86400)] = 900
    log_level: str = "INFO"
    # `text`: plain lines for people; `json`: one JSON object per line for log pipelines (app/logs.py).
    log_format: Literal["text", "json"] = "text"
    # Prometheus metrics at `/metrics` (app/metrics.py); off: no such route (404). With a
    # token, a scrape must send `Authorization: Bearer <token>` (else 401).
    metrics: bool = True
    metrics_token: str | None = None
    # Messages one API key may post per minute (HTTP and WebSocket `send` together; each
    # can start an answer), per server process.
    messages_per_minute: int = 60
    # What one API key / one company may hold open at once, per server process: WebSocket
    # sockets, SSE streams, and running answers it started (each holds a model connection).
    max_sockets_per_key: Annotated[int, msgspec.Meta(ge=1)] = 20
    max_sockets_per_company: Annotated[int, msgspec.Meta(ge=1)] = 1000
    max_streams_per_key: Annotated[int, msgspec.Meta(ge=1)] = 20
    max_streams_per_company: Annotated[int, msgspec.Meta(ge=1)] = 1000
    max_answers_per_key: Annotated[int, msgspec.Meta(ge=1)] = 10
    max_answers_per_company: Annotated[int, msgspec.Meta(ge=1)] = 100
    # Connections one process serves at once (uvicorn's limit_concurrency: past it, HTTP
    # requests get 503), and seconds a client has to send a request's headers, then its body.
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 2000
    # 0 turns a timeout off.
    header_timeout: Annotated[float, msgspec.Meta(ge=0)] = 10.0
    body_timeout: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    # Streaming policies (defaults; a POST may override them per answer, see StreamPolicy).
    disconnect_grace: float = 30.0
    partial: Literal["keep", "discard"] = "keep"
    if_busy: Literal["reject", "interrupt"] = "reject"
    # SSE sends a `: ping` comment after this many idle seconds.
    sse_ping_interval: float = 15.0
    # Events kept per generation for resuming readers, and how long an ended log stays.
    log_retain: int = 1000
    log_ttl: float = 300.0
    # Conversation events kept per conversation for subscribers coming back (`subscribe.since`),
    # and for how long after the conversation's latest event.
    conversation_log_retain: Annotated[int, msgspec.Meta(ge=1)] = 100
    conversation_log_ttl: Annotated[float, msgspec.Meta(gt=0)] = 3600.0
    # WebSocket: protocol pings (dead peers are closed), limits per socket, and how long a
    # peer may leave its outgoing queue full before it is told and closed with 1013.
    ws_ping_interval: float = 20.0
    ws_ping_timeout: float = 20.0
    ws_max_frame_bytes: int = 256 * 1024
    ws_max_subscriptions: int = 100
    ws_frames_per_minute: int = 600
    ws_send_timeout: float = 10.0
    # Seconds a peer may keep the server from sending anything (it stopped reading) before
    # the operating system drops the connection; 0 keeps the system's default (Linux only).
    tcp_user_timeout: float = 60.0
    # `chatstream serve`'s event loop and HTTP parser: `auto` runs uvloop + httptools when both
    # are installed (they are pinned, where they build), else asyncio + h11; `uvloop` requires
    # them; `asyncio` forces the plain stack (app/server.py).
    server_impl: Literal["auto", "uvloop", "asyncio"] = "auto"
    # Extra browser origins allowed to use the session cookie (REST writes, WebSocket
    # upgrades; comma-separated). The server's own origin is always allowed.
    allowed_origins: str = ""
    # Host names requests may be sent to besides the public URL's (loopback names when no
    # public URL is set), comma-separated: refuses DNS rebinding. `*` turns the check off.
    allowed_hosts: str = ""
    # Set: generations and conversation events go through this Redis, shared by every
    # process and node using the same database (see docs/deploy.md). Unset: in-process.
    redis_url: str | None = None
    # Prefix of every Redis key and channel: lets several deployments share one Redis.
    redis_prefix: str = "chatstream:"
    # Environment variables an `openai` agent may name as its API key, each bound to the
    # hosts its key may be sent to: `VAR=host[:port]|host2,VAR2=host3`. Agents are set up by
    # company admins: they may read no other variable, nor send a key anywhere else.
    model_key_vars: str = "OPENAI_API_KEY=api.openai.com"
    # Model servers may only be at public addresses, except these (comma-separated hosts,
    # IPs or CIDRs, each optionally `:port`; `[IPv6]:port`), e.g. `127.0.0.1:11434`.
    upstream_allow: str = ""
    # Connections to model servers one process holds at once (each running answer holds one).
    model_max_connections: Annotated[int, msgspec.Meta(ge=1)] = 100

    @property
    def upstream_policy(self) -> UpstreamPolicy:
        """`upstream_allow` and `model_key_vars`, parsed (ValueError if they cannot be)."""
        return UpstreamPolicy(
            allow=parse_allow_list(self.upstream_allow), key_hosts=parse_key_bindings(self.model_key_vars)
        )

    @property
    def is_postgres(self) -> bool:
        """True when the configured database is PostgreSQL."""
        return self.database_url is not None and self.database_url.startswith(("postgres://", "postgresql://"))


# Environment variable of each setting.
ENV = {
    "database_url": "DATABASE_URL",
    "sqlite_path": "CHATSTREAM_SQLITE_PATH",
    "public_url": "CHATSTREAM_PUBLIC_URL",
    "max_body_bytes": "CHATSTREAM_MAX_BODY_BYTES",
    "cookie_secure": "CHATSTREAM_COOKIE_SECURE",
    "cookie_max_age": "CHATSTREAM_COOKIE_MAX_AGE",
    "credential_recheck": "CHATSTREAM_CREDENTIAL_RECHECK",
    "auth_cache_seconds": "CHATSTREAM_AUTH_CACHE_SECONDS",
    "token_secret": "CHATSTREAM_TOKEN_SECRET",
    "token_ttl": "CHATSTREAM_TOKEN_TTL",
    "log_level": "CHATSTREAM_LOG_LEVEL",
    "log_format": "CHATSTREAM_LOG_FORMAT",
    "metrics": "CHATSTREAM_METRICS",
    "metrics_token": "CHATSTREAM_METRICS_TOKEN",
    "messages_per_minute": "CHATSTREAM_MESSAGES_PER_MINUTE",
    "max_sockets_per_key": "CHATSTREAM_MAX_SOCKETS_PER_KEY",
    "max_sockets_per_company": "CHATSTREAM_MAX_SOCKETS_PER_COMPANY",
    "max_streams_per_key": "CHATSTREAM_MAX_STREAMS_PER_KEY",
    "max_streams_per_company": "CHATSTREAM_MAX_STREAMS_PER_COMPANY",
    "max_answers_per_key": "CHATSTREAM_MAX_ANSWERS_PER_KEY",
    "max_answers_per_company": "CHATSTREAM_MAX_ANSWERS_PER_COMPANY",
    "max_connections": "CHATSTREAM_MAX_CONNECTIONS",
    "header_timeout": "CHATSTREAM_HEADER_TIMEOUT",
    "body_timeout": "CHATSTREAM_BODY_TIMEOUT",
    "disconnect_grace": "CHATSTREAM_DISCONNECT_GRACE",
    "partial": "CHATSTREAM_PARTIAL",
    "if_busy": "CHATSTREAM_IF_BUSY",
    "sse_ping_interval": "CHATSTREAM_SSE_PING_INTERVAL",
    "log_retain": "CHATSTREAM_LOG_RETAIN",
    "log_ttl": "CHATSTREAM_LOG_TTL",
    "conversation_log_retain": "CHATSTREAM_CONVERSATION_LOG_RETAIN",
    "conversation_log_ttl": "CHATSTREAM_CONVERSATION_LOG_TTL",
    "ws_ping_interval": "CHATSTREAM_WS_PING_INTERVAL",
    "ws_ping_timeout": "CHATSTREAM_WS_PING_TIMEOUT",
    "ws_max_frame_bytes": "CHATSTREAM_WS_MAX_FRAME_BYTES",
    "ws_max_subscriptions": "CHATSTREAM_WS_MAX_SUBSCRIPTIONS",
    "ws_frames_per_minute": "CHATSTREAM_WS_FRAMES_PER_MINUTE",
    "ws_send_timeout": "CHATSTREAM_WS_SEND_TIMEOUT",
    "allowed_origins": "CHATSTREAM_ALLOWED_ORIGINS",
    "allowed_hosts": "CHATSTREAM_ALLOWED_HOSTS",
    "tcp_user_timeout": "CHATSTREAM_TCP_USER_TIMEOUT",
    "server_impl": "CHATSTREAM_SERVER_IMPL",
    "model_key_vars": "CHATSTREAM_MODEL_KEY_VARS",
    "upstream_allow": "CHATSTREAM_UPSTREAM_ALLOW",
    "model_max_connections": "CHATSTREAM_MODEL_MAX_CONNECTIONS",
    "redis_url": "REDIS_URL",
    "redis_prefix": "CHATSTREAM_REDIS_PREFIX",
}

# The shortest access token secret accepted (HS256 wants a key of at least 256 bits).
MIN_TOKEN_SECRET_CHARS = 32

# The former name of CHATSTREAM_ALLOWED_ORIGINS (it applied to WebSocket upgrades only).
LEGACY_ALLOWED_ORIGINS = "CHATSTREAM_WS_ALLOWED_ORIGINS"

_BOOL_WORDS = {"1": "true", "yes": "true", "on": "true", "0": "false", "no": "false", "off": "false"}


class SettingsError(ValueError):
    """An environment variable has a value that cannot be used; the message names it."""


def settings_from_env(env: dict[str, str] | None = None) -> Settings:
    """Build settings from an environment mapping (``os.environ`` by default)."""
    env = dict(os.environ if env is None else env)
    values = {field: env[var].strip() for field, var in ENV.items() if env.get(var, "").strip()}
    if "allowed_origins" not in values and env.get(LEGACY_ALLOWED_ORIGINS, "").strip():
        values["allowed_origins"] = env[LEGACY_ALLOWED_ORIGINS].strip()
    if "public_url" in values:
        values["public_url"] = values["public_url"].rstrip("/")
    for switch in ("cookie_secure", "metrics"):
        if switch in values:
            flag = values[switch].lower()
            values[switch] = _BOOL_WORDS.get(flag, flag)
    if "log_level" in values:
        values["log_level"] = values["log_level"].upper()
    if "log_format" in values:
        values["log_format"] = values["log_format"].lower()
    secret = values.get("token_secret")
    if secret is not None and len(secret) < MIN_TOKEN_SECRET_CHARS:  # never echo the secret itself
        raise SettingsError(
            f"{ENV['token_secret']} is too short: {len(secret)} characters, at least {MIN_TOKEN_SECRET_CHARS} "
            "(e.g. the output of `python -c 'import secrets; print(secrets.token_urlsafe(48))'`)"
        )
    try:
        # Environment values are strings: msgspec converts them to each field's type.
        settings = msgspec.convert(values, Settings, strict=False)
    except msgspec.ValidationError as exc:
        field = str(exc).rpartition("$.")[2].rstrip("`")
        variable = ENV.get(field, field)
        raise SettingsError(f"{variable}={values.get(field)!r} is not valid: {str(exc).split(' - at ')[0]}") from exc
    for field, parse in (("upstream_allow", parse_allow_list), ("model_key_vars", parse_key_bindings)):
        try:
            parse(getattr(settings, field))
        except ValueError as exc:
            raise SettingsError(f"{ENV[field]} is not valid: {exc}") from exc
    return settings


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    return settings_from_env()
