"""The benchmark (bench/run.py) in a tiny configuration: it runs end to end and its report is well formed.

5 streams x 5 tokens per run, every default scenario and transport, against a real
`chatstream serve` and the bare peers, on a temporary database of the run's PostgreSQL
server (the benchmark makes and drops it); then the `idle` scenario with 20 streams held
open per transport. Nothing here asserts a timing or a memory figure: only that every
stream got its whole answer (or stayed open), and that every figure is there, with the
right type and a sane value.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import PG_SERVER, ROOT

SCENARIOS = {"llm", "burst"}
TRANSPORTS = {"sse", "peer-sse", "ws", "peer-ws"}
STREAMS, TOKENS = 5, 5


def run_bench(report: Path, *options: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "bench.run",
        "--warmup=2",
        "--stream-timeout=60",
        f"--database-url={PG_SERVER}",
        f"--json={report}",
        *options,
    ]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def run_streaming_bench(report: Path) -> subprocess.CompletedProcess[str]:
    return run_bench(report, f"--streams={STREAMS}", f"--tokens={TOKENS}", "--pace-ms=5", "--settle=0.2")


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def test_tiny_benchmark_produces_a_well_formed_report(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    result = run_streaming_bench(report_path)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "| scenario | transport |" in result.stdout  # the Markdown table

    report = json.loads(report_path.read_text())
    assert report["command"].startswith("python -m bench.run ")
    assert report["machine"]["nproc"] >= 1 and report["machine"]["python"]
    assert report["config"]["database"] == "postgresql"

    runs = report["runs"]
    assert {(r["scenario"], r["transport"]) for r in runs} == {(s, t) for s in SCENARIOS for t in TRANSPORTS}
    for run in runs:
        where = f"{run['scenario']}/{run['transport']}"
        assert run["streams"] == STREAMS and run["tokens_per_stream"] == TOKENS, where
        assert run["ok_streams"] == STREAMS and run["failed_streams"] == 0 and run["errors"] == [], where
        assert run["delivered_tokens"] == STREAMS * TOKENS, where
        assert run["server_log_errors"] == 0, where
        for name in (
            "wall_s",
            "tokens_per_s",
            "itl_p50_ms",
            "itl_p99_ms",
            "ttft_p50_ms",
            "ttft_p99_ms",
            "server_cpu_s",
            "server_cpu_s_per_1k_tokens",
            "server_core_use",
            "server_core_peak",
            "client_cpu_s",
            "client_core_use",
            "client_core_peak",
        ):
            assert is_number(run[name]) and run[name] >= 0, (where, name, run[name])
        assert run["itl_p50_ms"] <= run["itl_p99_ms"] and run["ttft_p50_ms"] <= run["ttft_p99_ms"], where
        assert run["tokens_per_s"] > 0 and run["wall_s"] > 0, where
        if run["scenario"] == "llm":
            assert is_number(run["itl_p50_over_pace"]), where
        else:
            assert run["itl_p50_over_pace"] is None, where  # no pace to compare with
        chatstream = run["transport"] in ("sse", "ws")
        # PostgreSQL's own CPU is reported for chatstream (the peers have no database).
        assert is_number(run["db_cpu_s"]) if chatstream else run["db_cpu_s"] is None, where

    ratios = {(r["scenario"], r["transport"]): r for r in report["ratios"]}
    assert set(ratios) == {(s, t) for s in SCENARIOS for t in ("sse", "ws")}
    for (_scenario, transport), ratio in ratios.items():
        assert ratio["peer"] == f"peer-{transport}"
        # CPU time is counted in clock ticks: a tiny run may measure a peer at 0, leaving no ratio.
        assert ratio["cpu_per_token_ratio"] is None or is_number(ratio["cpu_per_token_ratio"])


IDLE_STREAMS = 20


def test_idle_scenario_reports_memory_per_open_stream(tmp_path: Path) -> None:
    report_path = tmp_path / "idle.json"
    result = run_bench(report_path, "--scenarios=idle", f"--streams={IDLE_STREAMS}", "--idle-settle=0.3")
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "| transport | streams | open |" in result.stdout and "| chatstream / bare peer |" in result.stdout

    report = json.loads(report_path.read_text())
    assert report["config"]["scenarios"] == ["idle"] and report["runs"] == []
    assert report["config"]["idle"]["pace_s"] == 60 and report["config"]["idle"]["disconnect_grace_s"] > 0

    idle = {r["transport"]: r for r in report["idle"]}
    assert set(idle) == TRANSPORTS
    for transport, run in idle.items():
        assert run["streams"] == IDLE_STREAMS and run["opened"] == IDLE_STREAMS, transport
        assert run["failed"] == 0 and run["errors"] == [] and run["ended_while_open"] == 0, transport
        for name in ("rss_before_kib", "rss_open_kib", "rss_closed_kib", "hwm_open_kib"):
            assert isinstance(run[name], int) and run[name] > 10_000, (transport, name, run[name])  # > 10 MiB
        assert run["hwm_open_kib"] >= run["rss_open_kib"], transport
        for name in ("rss_per_stream_kib", "anon_per_stream_kib"):  # tiny: pages may not even move
            assert is_number(run[name]), (transport, name, run[name])
        for name in ("open_s", "close_s", "open_server_cpu_s", "held_server_cpu_s"):
            assert is_number(run[name]) and run[name] >= 0, (transport, name, run[name])
        assert run["tokens_while_open"] >= 0, transport
        # The server held a socket per stream, with room for many more.
        assert run["server_fds_open"] >= IDLE_STREAMS, transport
        assert run["server_fd_limit"] is None or run["server_fd_limit"] >= IDLE_STREAMS + 1024, transport
        assert run["healthy_after"] and run["stopped_cleanly"] and run["server_log_errors"] == 0, transport
        if transport in ("sse", "ws"):  # every paused answer was cancelled once its reader left
            assert run["answers_after_close"] == {"cancelled": IDLE_STREAMS}, transport
        else:
            assert run["answers_after_close"] is None, transport

    ratios = {r["transport"]: r for r in report["idle_ratios"]}
    assert set(ratios) == {"sse", "ws"}
    for transport, ratio in ratios.items():
        assert ratio["peer"] == f"peer-{transport}" and ratio["target"] == 1.5
        # 20 streams may not move the peer's RSS by a page: then there is no ratio.
        assert ratio["rss_per_stream_ratio"] is None or is_number(ratio["rss_per_stream_ratio"])
        assert ratio["within_target"] in (None, True, False)
