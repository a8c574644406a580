"""app/metrics.py without a server: what the answers observer counts, which failures are the
database's, the settings, and the directory `serve --workers N` gives its workers' figures.
(tests/integration/test_metrics.py scrapes real servers.)"""

from __future__ import annotations

import os
import sqlite3
import uuid
from pathlib import Path

import pytest
from asyncpg.exceptions import ConnectionDoesNotExistError, TooManyConnectionsError
from prometheus_client import REGISTRY

from app import metrics
from app.config import SettingsError, settings_from_env
from app.db import is_database_error
from app.streaming.observers import AnswerEnded, AnswerStarted
from app.tables import GenerationStatus


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def ended(status: GenerationStatus, code: str | None, *, tokens: int = 0, ttft_ms: int | None = 5) -> AnswerEnded:
    return AnswerEnded(uuid.uuid4(), uuid.uuid4(), None, "echo", status, ttft_ms, 0.5, tokens, code)


def test_the_observer_counts_answers_by_status_and_code() -> None:
    observer = metrics.AnswerMetrics()
    gid = uuid.uuid4()
    running, started = value("chatstream_answers_running"), value("chatstream_answers_started_total")
    done = value("chatstream_answers_ended_total", status="done", code="")
    cancelled = value("chatstream_answers_ended_total", status="cancelled", code="disconnected")
    tokens, ttft = value("chatstream_answer_tokens_total"), value("chatstream_answer_ttft_seconds_count")

    observer.answer_started(AnswerStarted(gid, uuid.uuid4(), None, "echo"))
    assert value("chatstream_answers_started_total") == started + 1
    assert value("chatstream_answers_running") == running + 1
    observer.answer_ended(ended(GenerationStatus.done, None, tokens=7))
    observer.answer_ended(ended(GenerationStatus.cancelled, "disconnected", ttft_ms=None))

    assert value("chatstream_answers_running") == running - 1
    assert value("chatstream_answers_ended_total", status="done", code="") == done + 1
    assert value("chatstream_answers_ended_total", status="cancelled", code="disconnected") == cancelled + 1
    assert value("chatstream_answer_tokens_total") == tokens + 7
    assert value("chatstream_answer_ttft_seconds_count") == ttft + 1  # an answer without a first token: none


def test_codes_that_are_not_identifiers_are_folded() -> None:
    """Label values stay a small set: a code is the app's own identifier, anything else is `other`."""
    before = value("chatstream_answers_ended_total", status="failed", code="other")
    metrics.AnswerMetrics().answer_ended(ended(GenerationStatus.failed, "a reason: with text " + "x" * 80))
    assert value("chatstream_answers_ended_total", status="failed", code="other") == before + 1


def test_an_answer_whose_outcome_was_not_stored_is_a_database_error() -> None:
    before = value("chatstream_database_errors_total", where="answer")
    metrics.AnswerMetrics().answer_ended(ended(GenerationStatus.done, "storage_failed"))
    assert value("chatstream_database_errors_total", where="answer") == before + 1


def test_readers_per_answer_is_the_peak_seen_while_it_ran() -> None:
    observer = metrics.AnswerMetrics()
    gid = uuid.uuid4()
    count, total = value("chatstream_readers_per_answer_count"), value("chatstream_readers_per_answer_sum")
    readers = value("chatstream_answer_readers")
    observer.answer_started(AnswerStarted(gid, uuid.uuid4(), None, "echo"))
    for now in (1, 2, 3):
        metrics.reader_attached(gid, now, produced_here=True)
    metrics.reader_attached(uuid.uuid4(), 9, produced_here=False)  # another process's answer: no peak kept
    assert value("chatstream_answer_readers") == readers + 4
    for _ in range(4):
        metrics.reader_detached()
    observer.answer_ended(AnswerEnded(gid, uuid.uuid4(), None, "echo", GenerationStatus.done, 1, 0.1, 1, None))
    assert value("chatstream_readers_per_answer_count") == count + 1
    assert value("chatstream_readers_per_answer_sum") == total + 3
    assert value("chatstream_answer_readers") == readers


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (sqlite3.OperationalError("database is locked"), True),
        (TooManyConnectionsError("too many"), True),
        (ConnectionDoesNotExistError("closed"), True),
        (ConnectionRefusedError(111, "refused"), True),
        (RuntimeError("wrapped"), False),
        (ValueError("a bug"), False),
    ],
)
def test_database_errors_are_told_apart(exc: BaseException, expected: bool) -> None:
    assert is_database_error(exc) is expected


def test_a_database_error_behind_another_is_one() -> None:
    try:
        try:
            raise ConnectionRefusedError(111, "refused")
        except OSError as cause:
            raise RuntimeError("the query failed") from cause
    except RuntimeError as exc:
        assert is_database_error(exc)
        before = value("chatstream_database_errors_total", where="http")
        metrics.database_error("http", exc)
        metrics.database_error("http", ValueError("not the database"))
        assert value("chatstream_database_errors_total", where="http") == before + 1


def test_http_requests_are_counted_by_route_template() -> None:
    route = "/api/things/{thing_id}"
    before = value("chatstream_http_requests_total", method="GET", route=route, status="200")
    metrics.http_request("GET", route, 200, 0.01)
    metrics.http_request("GET", route, 200, 0.02)
    assert value("chatstream_http_requests_total", method="GET", route=route, status="200") == before + 2
    assert value("chatstream_http_request_duration_seconds_count", method="GET", route=route) >= 2


def test_the_settings() -> None:
    assert settings_from_env({}).metrics is True
    assert settings_from_env({}).metrics_token is None
    for word, flag in (("off", False), ("0", False), ("no", False), ("on", True), ("yes", True), ("true", True)):
        assert settings_from_env({"CHATSTREAM_METRICS": word}).metrics is flag
    assert settings_from_env({"CHATSTREAM_METRICS_TOKEN": " s3cret "}).metrics_token == "s3cret"
    with pytest.raises(SettingsError, match="CHATSTREAM_METRICS"):
        settings_from_env({"CHATSTREAM_METRICS": "maybe"})


def test_workers_get_a_fresh_directory_removed_at_the_end(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(metrics.MULTIPROCESS_DIR, raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # read TMPDIR again
    with metrics.shared_by_workers(True) as path:
        assert path is not None and os.environ[metrics.MULTIPROCESS_DIR] == path
        assert Path(path).parent == tmp_path and Path(path).is_dir()
        (Path(path) / "counter_1234.db").write_bytes(b"")
    assert metrics.MULTIPROCESS_DIR not in os.environ
    assert list(tmp_path.iterdir()) == []


def test_a_directory_the_operator_set_is_used_and_kept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    given = tmp_path / "prometheus"
    monkeypatch.setenv(metrics.MULTIPROCESS_DIR, str(given))
    with metrics.shared_by_workers(True) as path:
        assert path == str(given) and given.is_dir()
    assert os.environ[metrics.MULTIPROCESS_DIR] == str(given) and given.is_dir()


def test_no_directory_when_metrics_are_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(metrics.MULTIPROCESS_DIR, raising=False)
    with metrics.shared_by_workers(False) as path:
        assert path is None and metrics.MULTIPROCESS_DIR not in os.environ


def test_a_dead_workers_live_gauges_are_dropped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(metrics.MULTIPROCESS_DIR, str(tmp_path))
    for name in ("gauge_livesum_4242.db", "gauge_liveall_4242.db", "counter_4242.db", "gauge_livesum_7.db"):
        (tmp_path / name).write_bytes(b"")
    metrics.worker_ended(4242)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter_4242.db", "gauge_livesum_7.db"]


@pytest.mark.anyio
async def test_an_unreachable_redis_is_a_broker_error() -> None:
    from app.streaming.broker import BrokerUnavailable
    from app.streaming.redis_broker import RedisBroker
    from tests.integration.live_server import free_port

    broker = RedisBroker(f"redis://127.0.0.1:{free_port()}/0")  # nobody listens there
    before = value("chatstream_broker_errors_total", operation="command")
    try:
        with pytest.raises(BrokerUnavailable):
            await broker.ping()
    finally:
        await broker.close()
    assert value("chatstream_broker_errors_total", operation="command") == before + 1


def test_a_request_failing_on_the_database_is_counted() -> None:
    from types import SimpleNamespace
    from typing import Any, cast

    from app.exception_handlers import handle_unexpected

    request = cast(Any, SimpleNamespace(method="GET", url=SimpleNamespace(path="/api/me")))
    before = value("chatstream_database_errors_total", where="http")
    # The database failing is an outage (503, retry later); a bug is a 500. Only the first is counted.
    assert handle_unexpected(request, sqlite3.OperationalError("disk I/O error")).status_code == 503
    assert handle_unexpected(request, KeyError("a bug")).status_code == 500
    assert value("chatstream_database_errors_total", where="http") == before + 1
