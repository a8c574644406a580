"""Prometheus metrics, served at `/metrics` (docs/deploy.md lists them, with alerts).

Everything is counted in this module: the rest of the app calls its small functions (or the
:class:`AnswerMetrics` observer the streaming core tells of each answer); the route and the
counting of HTTP requests are in app/metrics_http.py (this module imports no Litestar: the
streaming core uses it). Labelled series are
bound once (module constants, or a cache per label set), and nothing is counted per token:
an answer's tokens are added when it ends.

`chatstream serve --workers N` runs N processes: each writes its figures to files in one
directory (prometheus-client's multiprocess mode, `PROMETHEUS_MULTIPROC_DIR`), and whichever
worker answers a scrape reads them all, so one scrape gives the sum over every worker. The
supervisor makes that directory before it starts the workers (the variable must be set
before a worker imports prometheus-client: it picks its storage at import), marks a worker
that ends as dead (its gauges stop counting) and removes the directory when it stops; see
:func:`shared_by_workers`. A directory the operator sets is used as it is, and kept.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal
from uuid import UUID

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

from app.db import is_database_error

if TYPE_CHECKING:
    from app.streaming.observers import AnswerEnded, AnswerStarted

# No `*_created` series beside each counter and histogram (with several workers there are none either).
disable_created_metrics()  # type: ignore[no-untyped-call]

# Where the processes of `serve --workers N` keep their figures (prometheus-client's name).
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"

# -- answers (counted where they are produced) -----------------------------------------------

ANSWERS_STARTED = Counter("chatstream_answers_started", "Answers this server started producing.")
ANSWERS_ENDED = Counter(
    "chatstream_answers_ended",
    "Answers ended, by status (done, cancelled, failed, interrupted) and code: the error code "
    "of a failed answer, the reason of a cancelled one, empty for done.",
    ["status", "code"],
)
ANSWERS_RUNNING = Gauge("chatstream_answers_running", "Answers being produced now.", multiprocess_mode="livesum")
TTFT = Histogram(
    "chatstream_answer_ttft_seconds",
    "Time from an answer's start to its first answer event (the model's first token).",
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
DURATION = Histogram(
    "chatstream_answer_duration_seconds",
    "Time from an answer's start to its end, by status.",
    ["status"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
TOKENS = Counter(
    "chatstream_answer_tokens",
    "Tokens of ended answers (as the model counted them, else the pieces streamed).",
)

# -- readers, streams and sockets --------------------------------------------------------------

SSE_STREAMS = Gauge(
    "chatstream_sse_streams_open",
    "Event streams (SSE and AI SDK) open now, from their first byte to their end.",
    multiprocess_mode="livesum",
)
WEBSOCKETS = Gauge(
    "chatstream_websockets_open", "Authenticated WebSocket connections open now.", multiprocess_mode="livesum"
)
READERS = Gauge(
    "chatstream_answer_readers",
    "Readers (SSE streams, WebSocket subscriptions) following an answer now.",
    multiprocess_mode="livesum",
)
READERS_PER_ANSWER = Histogram(
    "chatstream_readers_per_answer",
    "The most readers an answer had at once, observed when it ends (readers of every process, "
    "counted whenever one joined on the producing process).",
    buckets=(0, 1, 2, 3, 5, 10, 25, 100),
)
SLOW_READERS_CLOSED = Counter(
    "chatstream_slow_readers_closed",
    "Connections closed because their client could not keep up (WebSocket close 1013 `too_slow`).",
    ["transport"],
)

# -- failures ------------------------------------------------------------------------------------

BrokerOperation = Literal["command", "reading", "subscription"]
BROKER_ERRORS = Counter(
    "chatstream_broker_errors",
    "Failures to reach the broker (Redis): commands, the reading loop, the pub/sub subscription.",
    ["operation"],
)
DatabaseErrorSite = Literal["http", "websocket", "answer"]
DATABASE_ERRORS = Counter(
    "chatstream_database_errors",
    "Database failures: of HTTP requests, of WebSocket frames, and answers whose outcome could not be stored.",
    ["where"],
)

# -- HTTP -----------------------------------------------------------------------------------------

HTTP_REQUESTS = Counter(
    "chatstream_http_requests",
    "HTTP requests answered, by method, route template (`unmatched` when no route matched) and status.",
    ["method", "route", "status"],
)
HTTP_DURATION = Histogram(
    "chatstream_http_request_duration_seconds",
    "Time to answer an HTTP request, to the end of its body (an event stream's whole life), by route.",
    ["method", "route"],
)
WORKER_START = Gauge(
    "chatstream_worker_start_time_seconds",
    "When each server process started serving (Unix time; with several workers, one series per live worker).",
    multiprocess_mode="liveall",
)

_BROKER_ERRORS = {operation: BROKER_ERRORS.labels(operation) for operation in ("command", "reading", "subscription")}
_DATABASE_ERRORS = {site: DATABASE_ERRORS.labels(site) for site in ("http", "websocket", "answer")}
_SLOW_WEBSOCKETS = SLOW_READERS_CLOSED.labels("websocket")
# Series bound once per label set (bounded: route templates, known methods, statuses).
_http_series: dict[tuple[str, str, int], tuple[Any, Any]] = {}
_ended_series: dict[tuple[str, str], tuple[Any, Any]] = {}
# Answers produced here that readers joined: the most readers each had at once.
_peak_readers: dict[UUID, int] = {}
_PEAKS_KEPT = 100_000  # bound, for answers that end without telling (cancelled before their first step)


# -- what the rest of the app calls ---------------------------------------------------------------


def sse_stream_opened() -> None:
    SSE_STREAMS.inc()


def sse_stream_closed() -> None:
    SSE_STREAMS.dec()


def websocket_opened() -> None:
    WEBSOCKETS.inc()


def websocket_closed() -> None:
    WEBSOCKETS.dec()


def slow_websocket_closed() -> None:
    _SLOW_WEBSOCKETS.inc()


def reader_attached(generation_id: UUID, readers: int, produced_here: bool) -> None:
    """A reader joined an answer, which now has `readers` readers (on every process)."""
    READERS.inc()
    if produced_here:
        if len(_peak_readers) >= _PEAKS_KEPT:
            _peak_readers.clear()
        if readers > _peak_readers.get(generation_id, 0):
            _peak_readers[generation_id] = readers


def reader_detached() -> None:
    READERS.dec()


def broker_error(operation: BrokerOperation) -> None:
    _BROKER_ERRORS[operation].inc()


def database_error(where: DatabaseErrorSite, exc: BaseException) -> None:
    """Count `exc` if it is a database failure (see :func:`app.db.is_database_error`)."""
    if is_database_error(exc):
        _DATABASE_ERRORS[where].inc()


class AnswerMetrics:
    """The streaming core's observer (app/streaming/observers.py): answers started and ended,
    time to first token, duration, tokens, readers per answer, outcomes that could not be stored."""

    def answer_started(self, event: AnswerStarted) -> None:
        ANSWERS_STARTED.inc()
        ANSWERS_RUNNING.inc()

    def answer_ended(self, event: AnswerEnded) -> None:
        ANSWERS_RUNNING.dec()
        status = str(event.status.value)
        code = event.error_code or ""
        if code and not (len(code) <= 64 and code.isascii() and code.replace("_", "a").isalnum()):
            code = "other"  # codes and reasons are the app's own identifiers; anything else is folded
        series = _ended_series.get((status, code))
        if series is None:
            series = _ended_series[status, code] = (ANSWERS_ENDED.labels(status, code), DURATION.labels(status))
        series[0].inc()
        series[1].observe(event.duration_s)
        if event.ttft_ms is not None:
            TTFT.observe(event.ttft_ms / 1000)
        if event.tokens > 0:
            TOKENS.inc(event.tokens)
        READERS_PER_ANSWER.observe(_peak_readers.pop(event.generation_id, 0))
        if event.error_code == "storage_failed":
            _DATABASE_ERRORS["answer"].inc()


def process_started() -> None:
    """This server process serves from now on."""
    WORKER_START.set(time.time())


def http_request(method: str, route: str, status: int, seconds: float) -> None:
    """An HTTP request was answered (see app/metrics_http.py)."""
    key = (method, route, status)
    series = _http_series.get(key)
    if series is None:
        series = _http_series[key] = (
            HTTP_REQUESTS.labels(method, route, str(status)),
            HTTP_DURATION.labels(method, route),
        )
    series[0].inc()
    series[1].observe(seconds)


def exposition() -> bytes:
    """Every metric in Prometheus's text format: this process's, or with several workers, the
    sum over all of them (read from their files)."""
    if os.environ.get(MULTIPROCESS_DIR):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)


# -- several workers (the supervisor of `serve --workers N`) ----------------------------------------


@contextlib.contextmanager
def shared_by_workers(enabled: bool) -> Iterator[str | None]:
    """Around the supervisor's run: a fresh directory for the workers' metric files, named in
    the environment the workers inherit, removed at the end. Yields the directory (None when
    metrics are off). A directory set by the operator is used and kept (it must start empty)."""
    if not enabled:
        yield None
        return
    given = os.environ.get(MULTIPROCESS_DIR)
    if given:
        os.makedirs(given, exist_ok=True)
        yield given
        return
    path = tempfile.mkdtemp(prefix="chatstream-metrics-")
    os.environ[MULTIPROCESS_DIR] = path
    try:
        yield path
    finally:
        os.environ.pop(MULTIPROCESS_DIR, None)
        shutil.rmtree(path, ignore_errors=True)


def worker_ended(pid: int | None) -> None:
    """A worker process ended: its gauges (open streams, sockets, running answers) stop counting;
    its counters stay in the sums."""
    path = os.environ.get(MULTIPROCESS_DIR)
    if path and pid:
        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
