"""Remote mode: samples spread over real servers (`POST /grade`), with failover and dead servers."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from eval_helpers import EXAMPLE_PROBLEM, EXAMPLE_SAMPLES, write_jsonl

from sandbox_env.evaluation import evaluate

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def dead_url() -> str:
    """A loopback port nobody listens on: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_failover_spreads_work_and_survives_a_dead_server(
        tmp_path: Path, docker_backend: str, live_server_factory: Callable[..., Any]) -> None:
    server = live_server_factory(backend=docker_backend, max_sessions=4, pool_size=2)
    samples = write_jsonl(tmp_path / "samples.jsonl", EXAMPLE_SAMPLES * 2)
    report = evaluate(samples, {"test/0": EXAMPLE_PROBLEM}, k=[1, 10], servers=[dead_url(), server.url],
                      workers=2, timeout_s=2.0, retry_delay_s=0.05)
    assert report.summary["counts"]["sandbox_error"] == 0, report.results
    assert [r["status"] for r in report.results] == ["error", "timeout", "error", "passed", "passed", "passed"] * 2
    assert report.summary["pass@1"] == pytest.approx(0.5) and report.summary["pass@10"] == pytest.approx(1.0)
    assert report.exit_code == 0
    assert report.summary["config"]["servers"][1] == server.url and report.summary["config"]["backend"] is None


def test_no_reachable_server_gives_sandbox_errors_not_wrong_answers(tmp_path: Path) -> None:
    samples = write_jsonl(tmp_path / "samples.jsonl", EXAMPLE_SAMPLES)
    report = evaluate(samples, {"test/0": EXAMPLE_PROBLEM}, k=[1], servers=[dead_url(), dead_url()],
                      workers=2, retries=1, retry_delay_s=0.01)
    assert [r["status"] for r in report.results] == ["sandbox_error"] * 6
    assert all("ConnectError" in r["error"] or "unreachable" in r["error"] for r in report.results)
    assert report.summary["sandbox_errors"] == 6 and "pass@1" not in report.summary
    assert report.exit_code == 3
    # Resume grades sandbox errors again rather than keeping them.
    again = evaluate(samples, {"test/0": EXAMPLE_PROBLEM}, k=[1], servers=[dead_url()], retries=0,
                     retry_delay_s=0.01)
    assert again.summary["resumed"] == 0
