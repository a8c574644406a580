"""Structured logs without a server: the JSON line formatter, request ids (which are taken,
which are replaced), the request line and header of the ASGI wrapper, the answer lines of the
generation observer, URLs made fit for a log, and the CHATSTREAM_LOG_FORMAT setting."""

from __future__ import annotations

import json
import logging
import sys
import uuid
from typing import Any, cast

import pytest
from litestar.types import Scope

from app.config import SettingsError, settings_from_env
from app.generation_log import GenerationLog
from app.logs import (
    REQUEST_ID_MAX,
    JsonFormatter,
    RequestIdFilter,
    WebSocketPathWithoutQuery,
    json_line,
    request_id_var,
    uvicorn_log_config,
    valid_request_id,
    without_credentials,
)
from app.request_log import request_id_of, with_request_log
from app.streaming.observers import AnswerEnded, AnswerStarted
from app.tables import GenerationStatus

pytestmark = pytest.mark.anyio


def record(msg: str = "hello %s", args: tuple[Any, ...] = ("world",), **extra: Any) -> logging.LogRecord:
    return logging.getLogger("chatstream.test").makeRecord(
        "chatstream.test", logging.INFO, __file__, 1, msg, args, None, extra=extra or None
    )


# -- request ids ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "0b6f9a52-3c1e-4d7a-9e8f-2a4b6c8d0e1f",  # a UUID
        "0b6f9a523c1e4d7a9e8f2a4b6c8d0e1f",
        "abc-123",
        "edge.node-7:42_a",
        "01HZX3J8Q6Y2M4V5W7T9K0B1C2",  # a ULID
        "a" * REQUEST_ID_MAX,
        b"bytes-from-a-header",
    ],
)
def test_sane_request_ids_are_taken(value: str | bytes) -> None:
    assert valid_request_id(value) == (value.decode() if isinstance(value, bytes) else value)


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        b"",
        "a" * (REQUEST_ID_MAX + 1),  # too long
        "two words",
        "line\nbreak",  # would forge a log line
        "id\r\nSet-Cookie: x=1",  # would forge a header
        "bad; <script>",
        '"quoted"',
        "-starts-with-a-dash",
        ".hidden",
        "naïve",
        "caf\xe9".encode("latin-1"),  # not ASCII
        "a/b",
        "{json}",
    ],
)
def test_other_request_ids_are_refused(value: str | bytes | None) -> None:
    assert valid_request_id(value) is None


def scope(headers: list[tuple[bytes, bytes]], kind: str = "http") -> Scope:
    fields = {"type": kind, "method": "GET", "path": "/api/me", "query_string": b"key=secret", "headers": headers}
    return cast("Scope", fields)


def test_a_request_keeps_its_sane_id_and_gets_a_new_one_otherwise() -> None:
    assert request_id_of(scope([(b"x-request-id", b"given-1")])) == "given-1"
    for headers in ([], [(b"x-request-id", b"bad id")], [(b"x-request-id", b"x" * 500)]):
        made = request_id_of(scope(headers))
        assert len(made) == 32 and int(made, 16) >= 0
    assert request_id_of(scope([])) != request_id_of(scope([]))


# -- the JSON line --------------------------------------------------------------------------------


def test_a_record_is_one_json_line_with_the_standard_fields() -> None:
    line = JsonFormatter().format(record())
    assert "\n" not in line
    data = json.loads(line)
    assert data["message"] == "hello world"
    assert data["level"] == "INFO" and data["logger"] == "chatstream.test"
    assert data["time"].endswith("Z") and "T" in data["time"]
    assert isinstance(data["pid"], int)
    assert "requestId" not in data  # outside a request


def test_extras_and_the_request_id_are_fields() -> None:
    gid = uuid.uuid4()
    token = request_id_var.set("req-1")
    try:
        data = json.loads(JsonFormatter().format(record(generationId=gid, tokens=3, ttftMs=None, color_message="x")))
    finally:
        request_id_var.reset(token)
    assert data["requestId"] == "req-1"
    assert data["generationId"] == str(gid) and data["tokens"] == 3 and data["ttftMs"] is None
    assert "color_message" not in data  # uvicorn's colored copy of the message


def test_a_request_id_stamped_on_the_record_wins_over_the_context() -> None:
    made = record()
    token = request_id_var.set("when-logged")
    try:
        assert RequestIdFilter().filter(made)
    finally:
        request_id_var.reset(token)
    assert json.loads(JsonFormatter().format(made))["requestId"] == "when-logged"  # formatted elsewhere, later


def test_an_exception_is_one_field_and_the_line_stays_one_line() -> None:
    try:
        raise ValueError("broken\nacross lines")
    except ValueError:
        made = logging.getLogger("chatstream.test").makeRecord(
            "chatstream.test", logging.ERROR, __file__, 1, "failed:\n%s", ("two lines",), sys.exc_info()
        )
    line = JsonFormatter().format(made)
    assert line.count("\n") == 0
    data = json.loads(line)
    assert data["message"] == "failed:\ntwo lines"
    assert data["exception"].startswith("Traceback") and "ValueError: broken\nacross lines" in data["exception"]


def test_an_extra_json_cannot_take_is_written_as_text() -> None:
    class Odd:
        def __str__(self) -> str:
            return "odd thing"

    data = json.loads(JsonFormatter().format(record(thing=Odd())))
    assert data["thing"] == "odd thing"


def test_json_line_before_logging_is_set_up() -> None:
    data = json.loads(json_line("database: migrations applied", "chatstream.cli", companyId="c"))
    assert (data["logger"], data["level"], data["message"], data["companyId"]) == (
        "chatstream.cli",
        "INFO",
        "database: migrations applied",
        "c",
    )


def test_uvicorns_websocket_lines_lose_the_query_string() -> None:
    made = record('%s - "WebSocket %s" [accepted]', ("127.0.0.1:5000", "/api/ws?after=g.1&token=secret"))
    assert WebSocketPathWithoutQuery().filter(made)
    assert made.getMessage() == '127.0.0.1:5000 - "WebSocket /api/ws" [accepted]'


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:pw@api.example.com/v1/chat/completions", "https://api.example.com/v1/chat/completions"),
        ("http://127.0.0.1:11434/v1?api-key=secret#x", "http://127.0.0.1:11434/v1"),
        ("http://[::1]:8080/v1", "http://[::1]:8080/v1"),
        ("https://api.openai.com/v1", "https://api.openai.com/v1"),
    ],
)
def test_urls_in_log_lines_hold_no_credentials(url: str, shown: str) -> None:
    assert without_credentials(url) == shown


# -- settings ---------------------------------------------------------------------------------------


def test_log_format_is_text_unless_set_to_json() -> None:
    assert settings_from_env({}).log_format == "text"
    assert settings_from_env({"CHATSTREAM_LOG_FORMAT": " JSON "}).log_format == "json"
    with pytest.raises(SettingsError, match="CHATSTREAM_LOG_FORMAT='xml' is not valid"):
        settings_from_env({"CHATSTREAM_LOG_FORMAT": "xml"})


def test_uvicorn_gets_json_handlers_for_json_only() -> None:
    from uvicorn.config import LOGGING_CONFIG

    assert uvicorn_log_config(settings_from_env({})) is LOGGING_CONFIG
    config = uvicorn_log_config(settings_from_env({"CHATSTREAM_LOG_FORMAT": "json", "CHATSTREAM_LOG_LEVEL": "warning"}))
    assert config["formatters"]["default"]["()"] is JsonFormatter
    assert config["loggers"]["uvicorn.access"]["handlers"] == ["default"]
    assert config["root"] == {"handlers": ["default"], "level": "WARNING"}


# -- the request line and header ----------------------------------------------------------------------


class Sent:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def __call__(self, message: Any) -> None:
        self.messages.append(message)


async def nothing() -> Any:
    return {"type": "http.disconnect"}


async def test_an_http_response_gets_the_id_and_the_request_one_line(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str | None] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(request_id_var.get())
        scope["path_template"] = "/api/conversations/{conversation_id}"
        scope["user"] = type("P", (), {"company_id": "company-1"})()
        await send({"type": "http.response.start", "status": 201, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    sent = Sent()
    request = scope([(b"x-request-id", b"given-7")])
    request["path"] = "/api/conversations/abc"
    with caplog.at_level(logging.INFO, logger="chatstream.access"):
        await with_request_log(app)(request, nothing, sent)
    assert seen == ["given-7"] and request_id_var.get() is None  # set for the request only
    assert (b"x-request-id", b"given-7") in sent.messages[0]["headers"]
    [line] = [r for r in caplog.records if r.name == "chatstream.access"]
    fields = line.__dict__
    assert fields["method"] == "GET" and fields["status"] == 201 and fields["companyId"] == "company-1"
    assert fields["route"] == "/api/conversations/{conversation_id}" and fields["path"] == "/api/conversations/abc"
    assert "secret" not in line.getMessage() and "secret" not in json.dumps(fields, default=str)


async def test_a_websocket_handshake_gets_the_id(caplog: pytest.LogCaptureFixture) -> None:
    async def accepting(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "websocket.accept", "subprotocol": None, "headers": [(b"x-other", b"1")]})
        await send({"type": "websocket.close", "code": 1000})

    async def refusing(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "websocket.close", "code": 4401})

    with caplog.at_level(logging.INFO, logger="chatstream.access"):
        sent = Sent()
        await with_request_log(accepting)(scope([], "websocket"), nothing, sent)
        headers = dict(sent.messages[0]["headers"])
        assert headers[b"x-other"] == b"1" and len(headers[b"x-request-id"]) == 32
        await with_request_log(refusing)(scope([], "websocket"), nothing, Sent())
    statuses = [(r.__dict__["method"], r.__dict__["status"]) for r in caplog.records if r.name == "chatstream.access"]
    assert statuses == [("WEBSOCKET", 101), ("WEBSOCKET", 403)]


async def test_a_failing_app_is_logged_as_500_and_the_error_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("bug")

    with caplog.at_level(logging.INFO, logger="chatstream.access"), pytest.raises(RuntimeError):
        await with_request_log(broken)(scope([]), nothing, Sent())
    [line] = [r for r in caplog.records if r.name == "chatstream.access"]
    assert line.__dict__["status"] == 500 and line.levelno == logging.WARNING


# -- the answer lines ---------------------------------------------------------------------------------


def test_answer_lines_carry_ids_status_and_the_starting_request(caplog: pytest.LogCaptureFixture) -> None:
    gid, cid, company = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    log = GenerationLog()
    caplog.handler.addFilter(RequestIdFilter())  # as the JSON handler has: stamped when logged
    token = request_id_var.set("started-by")
    try:
        with caplog.at_level(logging.INFO, logger="chatstream.generations"):
            log.answer_started(AnswerStarted(gid, cid, company, "echo"))
            log.answer_ended(
                AnswerEnded(gid, cid, company, "openai", GenerationStatus.failed, None, 0.25, 0, "upstream_unreachable")
            )
            log.answer_ended(AnswerEnded(gid, cid, None, "echo", GenerationStatus.done, 12, 1.5, 40, None))
    finally:
        request_id_var.reset(token)
    start, failed, done = [json.loads(JsonFormatter().format(r)) for r in caplog.records]
    assert start["event"] == "generation.start" and start["adapter"] == "echo"
    assert (start["generationId"], start["conversationId"], start["companyId"]) == (str(gid), str(cid), str(company))
    assert start["requestId"] == failed["requestId"] == "started-by"
    assert failed["event"] == "generation.end" and failed["level"] == "WARNING"
    assert (failed["status"], failed["errorCode"], failed["ttftMs"], failed["tokens"]) == (
        "failed",
        "upstream_unreachable",
        None,
        0,
    )
    assert failed["durationMs"] == 250.0
    assert (done["status"], done["errorCode"], done["ttftMs"], done["tokens"], done["level"]) == (
        "done",
        None,
        12,
        40,
        "INFO",
    )
    assert done["companyId"] is None
