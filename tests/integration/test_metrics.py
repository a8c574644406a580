"""Prometheus metrics at `/metrics` (issue #18, point 2), scraped from a real `chatstream serve`
while answers run and after they end: answers started and ended by status, the time to first
token, duration and readers-per-answer histograms, tokens, open SSE streams, WebSockets and
readers going up and down, HTTP requests by route template and status. With `--workers 2` one
scrape sums both workers. `CHATSTREAM_METRICS=off` gives 404; `CHATSTREAM_METRICS_TOKEN` 401
without the token.

Figures of a server only grow over its life: every check compares two scrapes. Nothing waits
by sleeping: gauges are polled until they show what is expected, bounded by STEP.
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis
from httpx_sse import aconnect_sse
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect

from tests.factories import Tenant, make_tenant
from tests.integration.live_server import LiveServer
from tests.integration.wire_api import make_agent, new_conversation, post_message
from tests.redis_support import REDIS_URL

pytestmark = pytest.mark.anyio

STEP = 15.0  # the longest any wait may take before the test fails
MESSAGES_ROUTE = "/api/conversations/{conversation_id}/messages"
STREAM_ROUTE = "/api/conversations/{conversation_id}/stream"
CANCEL_ROUTE = "/api/generations/{generation_id}/cancel"


class Scrape:
    """One scrape of `/metrics`: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [
            (sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples named `name` that have these labels (others, e.g. `pid`, summed over)."""
        return sum(
            value
            for sample, have, value in self.samples
            if sample == name and all(have.get(k) == v for k, v in labels.items())
        )

    def label_values(self, name: str, label: str) -> set[str]:
        return {have[label] for sample, have, _ in self.samples if sample == name and label in have}


async def scrape(url: str, headers: dict[str, str] | None = None) -> Scrape:
    # A new connection each time: with several workers, any of them may answer.
    async with httpx.AsyncClient(base_url=url, timeout=STEP) as http:
        response = await http.get("/metrics", headers=headers or {})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        return Scrape(response.text)


async def scrape_until(url: str, condition: Callable[[Scrape], bool]) -> Scrape:
    """Scrape until `condition` holds (gauges follow connections closing on the server's side)."""
    with anyio.fail_after(STEP):
        while True:
            current = await scrape(url)
            if condition(current):
                return current
            await anyio.sleep(0.05)


async def until(condition: Callable[[], bool]) -> None:
    """Poll a condition nothing announces (a process's output), bounded by STEP."""
    with anyio.fail_after(STEP):
        while True:
            if condition():
                return
            await anyio.sleep(0.05)


def entries(path: Path) -> list[str]:
    return sorted(os.listdir(path))


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


@asynccontextmanager
async def sse_reader(
    url: str, tenant: Tenant, conversation_id: str, cursor: str | None = None
) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
    """An open SSE stream of the conversation (after `cursor`); yields its events as they come."""
    headers = {**tenant.headers("alice"), **({"Last-Event-ID": cursor} if cursor else {})}
    async with (
        httpx.AsyncClient(base_url=url, timeout=STEP) as http,
        aconnect_sse(http, "GET", f"/api/conversations/{conversation_id}/stream", headers=headers) as source,
    ):
        assert source.response.status_code == 200

        async def events() -> AsyncIterator[dict[str, Any]]:
            async for sse in source.aiter_sse():
                if sse.data:
                    yield json.loads(sse.data)

        yield events()


async def until_terminal(events: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    with anyio.fail_after(STEP):
        async for event in events:
            if event["type"] in ("done", "cancelled", "error"):
                return event
    raise AssertionError("the stream ended without a terminal event")


async def open_ws(url: str, tenant: Tenant) -> ClientConnection:
    ws = url.replace("http://", "ws://", 1) + "/api/ws"
    return await connect(ws, additional_headers=tenant.headers("alice"), proxy=None, close_timeout=1)


async def ws_until_terminal(socket: ClientConnection) -> dict[str, Any]:
    with anyio.fail_after(STEP):
        while True:
            frame: dict[str, Any] = json.loads(await socket.recv())
            if "seq" in frame and frame["type"] in ("done", "cancelled", "error"):
                return frame


# -- one server --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with LiveServer() as live:
        yield live


async def test_scraped_while_answers_run_and_after_they_end(server: LiveServer) -> None:
    tenant = await make_tenant()
    agent = await make_agent(tenant, pace=0.02)
    before = await scrape(server.url)
    async with httpx.AsyncClient(base_url=server.url, timeout=STEP) as http:
        by_sse, by_ws = await new_conversation(http, tenant, agent), await new_conversation(http, tenant, agent)
        socket = await open_ws(server.url, tenant)
        try:
            await socket.send(json.dumps({"type": "subscribe", "conversationId": by_ws, "ref": "s"}))
            while json.loads(await socket.recv()).get("ref") != "s":  # the ack: subscribed
                pass
            # Two answers of 200 words at 0.02 s a word: 4 s each, scraped while they run.
            await post_message(http, tenant, by_sse, words(200))
            await post_message(http, tenant, by_ws, words(200))
            async with sse_reader(server.url, tenant, by_sse) as events:
                running = await scrape_until(
                    server.url,
                    lambda s: s.value("chatstream_answer_readers") >= before.value("chatstream_answer_readers") + 2,
                )
                assert running.value("chatstream_answers_running") - before.value("chatstream_answers_running") == 2
                started = running.value("chatstream_answers_started_total")
                assert started - before.value("chatstream_answers_started_total") == 2
                assert running.value("chatstream_sse_streams_open") - before.value("chatstream_sse_streams_open") == 1
                assert running.value("chatstream_websockets_open") - before.value("chatstream_websockets_open") == 1
                ended = running.value("chatstream_answers_ended_total")
                assert ended == before.value("chatstream_answers_ended_total")  # neither has ended
                sse_end = await until_terminal(events)
            ws_end = await ws_until_terminal(socket)
        finally:
            await socket.close()
        # Something no route matches, and a request refused.
        assert (await http.get("/api/no-such-route", headers=tenant.headers("alice"))).status_code == 404
        assert (await http.get("/api/conversations")).status_code == 401
    assert sse_end["type"] == ws_end["type"] == "done"

    after = await scrape_until(
        server.url,
        lambda s: (
            s.value("chatstream_sse_streams_open") == before.value("chatstream_sse_streams_open")
            and s.value("chatstream_websockets_open") == before.value("chatstream_websockets_open")
            and s.value("chatstream_answer_readers") == before.value("chatstream_answer_readers")
        ),
    )

    def grew(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert after.value("chatstream_answers_running") == before.value("chatstream_answers_running")
    assert grew("chatstream_answers_ended_total", status="done", code="") == 2
    assert grew("chatstream_answers_ended_total") == 2
    assert grew("chatstream_answer_ttft_seconds_count") == 2
    assert grew("chatstream_answer_ttft_seconds_sum") > 0
    assert grew("chatstream_answer_duration_seconds_count", status="done") == 2
    # Each answer took at least its 200 paces.
    assert grew("chatstream_answer_duration_seconds_sum", status="done") >= 2 * 200 * 0.02
    assert grew("chatstream_answer_tokens_total") == sse_end["tokenCount"] + ws_end["tokenCount"] > 0
    # One reader each (the SSE stream, the WebSocket subscription).
    assert grew("chatstream_readers_per_answer_count") == 2
    assert grew("chatstream_readers_per_answer_sum") == 2
    assert grew("chatstream_http_requests_total", method="POST", route=MESSAGES_ROUTE, status="201") == 2
    assert grew("chatstream_http_requests_total", method="GET", route=STREAM_ROUTE, status="200") == 1
    assert grew("chatstream_http_requests_total", method="GET", route="/api/conversations", status="401") == 1
    assert grew("chatstream_http_request_duration_seconds_count", method="POST", route=MESSAGES_ROUTE) == 2
    assert grew("chatstream_http_requests_total", status="404") == 1
    # Route templates, never raw paths: no conversation id in any label.
    routes = after.label_values("chatstream_http_requests_total", "route")
    assert not [route for route in routes if by_sse in route or by_ws in route or "no-such-route" in route]
    assert grew("chatstream_database_errors_total") == 0
    assert grew("chatstream_broker_errors_total") == 0
    assert grew("chatstream_slow_readers_closed_total") == 0


async def test_a_cancelled_answer_is_counted_by_its_reason(server: LiveServer) -> None:
    tenant = await make_tenant()
    agent = await make_agent(tenant, pace=0.2)
    before = await scrape(server.url)
    async with httpx.AsyncClient(base_url=server.url, timeout=STEP) as http:
        cid = await new_conversation(http, tenant, agent)
        generation = (await post_message(http, tenant, cid, words(100)))["generation"]["id"]
        async with sse_reader(server.url, tenant, cid) as events:
            await scrape_until(
                server.url,
                lambda s: s.value("chatstream_answer_readers") > before.value("chatstream_answer_readers"),
            )
            cancelled = await http.post(f"/api/generations/{generation}/cancel", headers=tenant.headers("alice"))
            assert cancelled.status_code == 200, cancelled.text
            assert (await until_terminal(events))["type"] == "cancelled"
    after = await scrape_until(
        server.url,
        lambda s: (
            s.value("chatstream_answers_running") == before.value("chatstream_answers_running")
            and s.value("chatstream_sse_streams_open") == before.value("chatstream_sse_streams_open")
        ),
    )
    ended = after.value("chatstream_answers_ended_total", status="cancelled", code="user")
    assert ended - before.value("chatstream_answers_ended_total", status="cancelled", code="user") == 1
    done = after.value("chatstream_answers_ended_total", status="done")
    assert done == before.value("chatstream_answers_ended_total", status="done")
    counted = after.value("chatstream_http_requests_total", method="POST", route=CANCEL_ROUTE, status="200")
    assert counted - before.value("chatstream_http_requests_total", method="POST", route=CANCEL_ROUTE) == 1


async def test_metrics_need_no_api_key_and_are_not_in_the_openapi_document(server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=STEP) as http:
        response = await http.get("/metrics")  # no credentials at all
        assert response.status_code == 200
        assert "chatstream_answers_started_total" in response.text
        # Prometheus scrapes by address: the Host check of the API does not apply.
        assert (await http.get("/metrics", headers={"Host": "10.1.2.3:9000"})).status_code == 200
        document = (await http.get("/schema/openapi.json")).json()
        assert "/metrics" not in document["paths"]


# -- settings -----------------------------------------------------------------------------------------


async def test_metrics_off_is_404() -> None:
    with LiveServer({"CHATSTREAM_METRICS": "off"}) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=STEP) as http:
            response = await http.get("/metrics")
            assert response.status_code == 404
            assert response.json()["code"] == "not_found"
            assert (await http.get("/healthz")).status_code == 200


async def test_a_metrics_token_is_required_when_set() -> None:
    token = uuid.uuid4().hex
    with LiveServer({"CHATSTREAM_METRICS_TOKEN": token}) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=STEP) as http:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
                response = await http.get("/metrics", headers=headers)
                assert response.status_code == 401, headers
                assert response.json()["code"] == "unauthorized"
                assert response.headers["www-authenticate"] == "Bearer"
                assert token not in response.text
        scraped = await scrape(live.url, {"Authorization": f"Bearer {token}"})
        assert scraped.value("chatstream_http_requests_total", route="/metrics", status="401") == 3


# -- several workers ----------------------------------------------------------------------------------


async def test_one_scrape_sums_every_worker(tmp_path: Path) -> None:
    """`serve --workers 2`: both workers are in every scrape, whichever answers it, and the counts
    are the sums over both (each request went to one worker or the other). A worker that dies
    leaves its counts in the sums and its gauges out; the figures' directory goes at the end."""
    prefix = f"chatstream-test-{uuid.uuid4().hex[:12]}:"
    tenant = await make_tenant()
    agent = await make_agent(tenant, pace=0.01)
    # The supervisor makes the workers' directory in TMPDIR: here, to see it made and removed.
    env = {"REDIS_URL": REDIS_URL, "CHATSTREAM_REDIS_PREFIX": prefix, "TMPDIR": str(tmp_path)}
    live = LiveServer(env, ["--workers", "2"])
    try:
        with live:
            # uvicorn's parent says "running" before its workers are up: wait for both.
            await until(lambda: live.output().count("Application startup complete") >= 2)
            assert [name.startswith("chatstream-metrics-") for name in entries(tmp_path)] == [True]
            first = await scrape(live.url)
            workers = first.label_values("chatstream_worker_start_time_seconds", "pid")
            assert len(workers) == 2, first.text

            # 12 answers and 20 probes, each request on a new connection: the two workers share them.
            async with httpx.AsyncClient(base_url=live.url, timeout=STEP) as http:
                cid = await new_conversation(http, tenant, agent)
            for round_ in range(12):
                async with httpx.AsyncClient(base_url=live.url, timeout=STEP) as http:
                    posted = await post_message(http, tenant, cid, words(3))
                # From its start: it may have ended already (the stream then resumes it from its log).
                async with sse_reader(live.url, tenant, cid, f"{posted['generation']['id']}.0") as events:
                    end = await until_terminal(events)
                assert end["generationId"] == posted["generation"]["id"] and end["type"] == "done", round_
            for _ in range(20):
                async with httpx.AsyncClient(base_url=live.url, timeout=STEP) as http:
                    assert (await http.get("/healthz")).status_code == 200

            def settled(s: Scrape) -> bool:
                return s.value("chatstream_sse_streams_open") == 0 and s.value("chatstream_answers_running") == 0

            def has_every_figure(s: Scrape) -> None:
                assert s.value("chatstream_http_requests_total", route="/healthz", status="200") == 20
                assert s.value("chatstream_http_requests_total", route=MESSAGES_ROUTE, status="201") == 12
                assert s.value("chatstream_answers_started_total") == 12
                assert s.value("chatstream_answers_ended_total", status="done") == 12
                assert s.value("chatstream_answer_duration_seconds_count") == 12

            # Every scrape (each on a new connection, whichever worker answers) has every figure.
            for _ in range(6):
                has_every_figure(await scrape_until(live.url, settled))

            # A worker killed: the supervisor starts another; the dead one's gauges go, its counts stay.
            killed = min(workers)
            os.kill(int(killed), signal.SIGKILL)
            replaced = await scrape_until(
                live.url,
                lambda s: (
                    killed not in s.label_values("chatstream_worker_start_time_seconds", "pid")
                    and len(s.label_values("chatstream_worker_start_time_seconds", "pid")) == 2
                ),
            )
            has_every_figure(replaced)
        assert entries(tmp_path) == []  # the supervisor removed the workers' directory
    finally:
        with redis.Redis.from_url(REDIS_URL) as client:
            keys = list(client.scan_iter(match=f"{prefix}*"))
            if keys:
                client.unlink(*keys)
