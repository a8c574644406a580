"""Log output: plain text (the default) or one JSON object per line (`CHATSTREAM_LOG_FORMAT=json`).

JSON lines carry `time`, `level`, `logger`, `message`, `pid`, the `requestId` of the request
being served (a context variable, copied into the tasks a request starts, so an answer's lines
carry the id of the request that started it), whatever fields the call passed as `extra`
(`generationId`, `status`, `ttftMs`, ...) and a failure's traceback as one `exception` field.
Our loggers (`chatstream.*`) and uvicorn's (`uvicorn.error`; its access log is replaced by the
request line of app/request_log.py) write the same lines, in every worker of `serve --workers N`.

Imports neither Litestar nor uvicorn at load (the streaming core uses it).

No log line may hold a token, an API key, a cookie or message content: callers log ids,
counts and codes, and URLs through :func:`without_credentials`.
"""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import msgspec

from app.config import Settings

if TYPE_CHECKING:
    from litestar.logging.config import LoggingConfig

# The id of the request this code runs for (set by app/request_log.py), None outside one.
request_id_var: ContextVar[str | None] = ContextVar("chatstream_request_id", default=None)

# An `X-Request-ID` we take as it is: what tracing systems and proxies send (UUIDs, hex, ULIDs,
# `<host>-<n>`), nothing that could forge a log line or a header. Anything else is replaced.
REQUEST_ID_MAX = 128
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")


def valid_request_id(value: str | bytes | None) -> str | None:
    """`value` when it is a usable request id (1 to 128 letters, digits, `.`, `_`, `:`, `-`,
    starting with a letter or digit), else None."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if not value or len(value) > REQUEST_ID_MAX or not _REQUEST_ID.fullmatch(value):
        return None
    return value


def new_request_id() -> str:
    """A fresh request id: 32 hex digits."""
    return uuid.uuid4().hex


def current_request_id() -> str | None:
    """The id of the request being served, if any."""
    return request_id_var.get()


def without_credentials(url: str) -> str:
    """`url` fit for a log line: no `user:password@`, no query string or fragment (either may
    hold a key)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host if port is None else f"{host}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


# -- JSON lines -----------------------------------------------------------------------------------

# Attributes every LogRecord has: everything else on a record came from a call's `extra`.
_RECORD_FIELDS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "request_id"}
# Extras that are not for the JSON line: uvicorn's colored copy of the message.
_SKIPPED_EXTRAS = frozenset({"color_message"})


def _encode_other(value: Any) -> Any:
    return str(value)


_encoder = msgspec.json.Encoder(enc_hook=_encode_other)


def utc_time(timestamp: float) -> str:
    """`2026-12-07T01:44:12.281Z`: ISO 8601, UTC, milliseconds."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": utc_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        request_id = getattr(record, "request_id", None) or current_request_id()
        if request_id:
            line["requestId"] = request_id
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and key not in _SKIPPED_EXTRAS and key not in line:
                line[key] = value
        if record.exc_info:
            line["exception"] = record.exc_text or self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        try:
            return _encoder.encode(line).decode()
        except (TypeError, ValueError, OverflowError):  # an extra msgspec cannot take: as text
            plain = {k: v if v is None or isinstance(v, str | int | float | bool) else str(v) for k, v in line.items()}
            return _encoder.encode(plain).decode()


class RequestIdFilter(logging.Filter):
    """Stamps each record with the current request id when it is made (before a queue or
    another thread could lose the context)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id()
        return True


class WebSocketPathWithoutQuery(logging.Filter):
    """uvicorn's WebSocket lines (`"WebSocket /api/ws?..." [accepted]`) name the path with its
    query string: keep the path only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and '"WebSocket %s"' in record.msg and isinstance(record.args, tuple):
            record.args = tuple(_path_only(a) for a in record.args)
        return True


def _path_only(arg: object) -> object:
    return arg.partition("?")[0] if isinstance(arg, str) and arg.startswith("/") else arg


_WS_PATH_FILTER = WebSocketPathWithoutQuery()


def json_line(message: str, logger: str, **fields: Any) -> str:
    """One JSON line at INFO, for output written before logging is set up (`serve`'s start)."""
    record = logging.makeLogRecord({"name": logger, "levelno": logging.INFO, "levelname": "INFO", "msg": message})
    record.__dict__.update(fields)
    return JsonFormatter().format(record)


def json_handler() -> logging.Handler:
    """A handler writing JSON lines to stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    return handler


def uvicorn_log_config(settings: Settings) -> dict[str, Any]:
    """uvicorn's `log_config` for `settings`: uvicorn's own for text; for JSON, uvicorn's
    loggers and the root logger write JSON lines. uvicorn sets it up in every worker it spawns."""
    if settings.log_format != "json":
        from uvicorn.config import LOGGING_CONFIG

        return LOGGING_CONFIG
    handler = {
        "class": "logging.StreamHandler",
        "formatter": "default",
        "filters": ["request_id"],
        "stream": "ext://sys.stderr",
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        # uvicorn sets `use_colors` on formatters named `default` and `access` when asked.
        "formatters": {"default": {"()": JsonFormatter}, "access": {"()": JsonFormatter}},
        "handlers": {"default": handler},
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"handlers": ["default"], "level": "INFO", "propagate": False},
        },
        "root": {"handlers": ["default"], "level": settings.log_level},
    }


def configure_logging(settings: Settings) -> None:
    """Set up logging for the app (called by `create_app`, in each worker).

    Text: Python's basic configuration (Litestar's logging config then takes the root logger
    over, as before). JSON: the root logger writes JSON lines (unless it already does, as under
    `chatstream serve`, whose uvicorn config set it up), and so do uvicorn's handlers, also when
    the app runs under a plain `uvicorn` command."""
    logging.getLogger("uvicorn.error").addFilter(_WS_PATH_FILTER)
    if settings.log_format != "json":
        logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return
    root = logging.getLogger()
    root.setLevel(settings.log_level)
    if not any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        root.addHandler(json_handler())
    for name in ("uvicorn", "uvicorn.access"):
        for handler in logging.getLogger(name).handlers:
            if not isinstance(handler.formatter, JsonFormatter):
                handler.setFormatter(JsonFormatter())
                handler.addFilter(RequestIdFilter())
    logging.captureWarnings(True)  # a warning printed as text would break the lines


def log_fields(**fields: Any) -> dict[str, Any]:
    """`extra` for a log call: the fields that are set (None left out)."""
    return {key: value for key, value in fields.items() if value is not None}


def litestar_logging_config(settings: Settings) -> LoggingConfig | None:
    """Litestar's `logging_config`: its default for text (it sets up the root logger), none for
    JSON (the root logger is already ours, see :func:`configure_logging`)."""
    from litestar.logging.config import LoggingConfig

    return None if settings.log_format == "json" else LoggingConfig()
