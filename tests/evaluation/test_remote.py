"""Remote mode: samples spread over real servers (`POST /grade`), with failover and dead servers."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from eval_helpers import EXAMPLE_PROBLEM, EXAMPLE_SAMPLES, write_jsonl

from sandbox_env.errors import PolicyNotFoundError
from sandbox_env.evaluation import evaluate

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def dead_url() -> str:
    """A loopback port nobody listens on: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_failover_spreads_work_and_survives_dead_servers(
        tmp_path: Path, docker_backend: str, live_server_factory: Callable[..., Any]) -> None:
    """Three servers: one never up, one stopped mid-run, one healthy; every sample is graded."""
    healthy = live_server_factory(backend=docker_backend, max_sessions=4, pool_size=2)
    doomed = live_server_factory(backend=docker_backend, max_sessions=4, pool_size=2)
    rows = [*EXAMPLE_SAMPLES, *[{"task_id": "test/0", "completion": f"    return {i % 2}"} for i in range(18)]]
    samples = write_jsonl(tmp_path / "samples.jsonl", rows)
    results = Path(f"{samples}_results.jsonl")

    def stop_doomed_after_some_results() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if results.is_file() and len(results.read_text().splitlines()) >= 4:
                break
            time.sleep(0.02)
        doomed.server.should_exit = True

    stopper = threading.Thread(target=stop_doomed_after_some_results, daemon=True)
    stopper.start()
    report = evaluate(samples, {"test/0": EXAMPLE_PROBLEM}, k=[1, 10],
                      servers=[dead_url(), doomed.url, healthy.url], workers=2, timeout_s=2.0,
                      retries=4, retry_delay_s=0.05)
    # (Both servers live in this process: the doomed one's shutdown also removes the healthy
    # one's containers, as the docker backend sweeps per process; retries absorb that too.)
    stopper.join()
    assert report.summary["counts"]["sandbox_error"] == 0, report.results
    statuses = [r["status"] for r in report.results]
    assert statuses[:6] == ["error", "timeout", "error", "passed", "passed", "passed"]
    assert statuses[6:] == ["failed", "passed"] * 9
    assert report.summary["pass@1"] == pytest.approx((3 + 9) / 24) and "pass@10" in report.summary
    assert report.exit_code == 0
    assert report.summary["config"]["servers"][2] == healthy.url and report.summary["config"]["backend"] is None

    # A policy the server does not have is a bad option for the whole run, not 24 sandbox errors.
    with pytest.raises(PolicyNotFoundError, match="nope"):
        evaluate(EXAMPLE_SAMPLES, {"test/0": EXAMPLE_PROBLEM}, servers=[healthy.url], policy="nope")


def test_no_reachable_server_gives_sandbox_errors_not_wrong_answers(tmp_path: Path) -> None:
    samples = write_jsonl(tmp_path / "samples.jsonl", EXAMPLE_SAMPLES)
    report = evaluate(samples, {"test/0": EXAMPLE_PROBLEM}, k=[1], servers=[dead_url(), dead_url()],
                      workers=2, retries=1, retry_delay_s=0.01, progress=True)  # the bar, forced on
    assert [r["status"] for r in report.results] == ["sandbox_error"] * 6
    assert all("ConnectError" in r["error"] or "unreachable" in r["error"] for r in report.results)
    assert report.summary["sandbox_errors"] == 6 and "pass@1" not in report.summary
    assert report.exit_code == 3
    # Resume grades sandbox errors again rather than keeping them.
    again = evaluate(samples, {"test/0": EXAMPLE_PROBLEM}, k=[1], servers=[dead_url()], retries=0,
                     retry_delay_s=0.01)
    assert again.summary["resumed"] == 0


def test_a_refused_token_stops_the_run_instead_of_failing_every_sample(
        tmp_path: Path, live_server_factory: Callable[..., Any]) -> None:
    from sandbox_env.errors import ConfigError

    server = live_server_factory(pool_size=0)
    samples = write_jsonl(tmp_path / "samples.jsonl", EXAMPLE_SAMPLES)
    with pytest.raises(ConfigError, match="refused the token"):
        evaluate(samples, {"test/0": EXAMPLE_PROBLEM}, servers=[server.url], token="not-the-token-at-all")
    # the token from the argument (as from SANDBOX_ENV_TOKEN) is sent to every server
    report = evaluate(samples, {"test/0": EXAMPLE_PROBLEM}, k=[1], servers=[server.url], token=server.token,
                      timeout_s=2.0)
    assert report.summary["counts"]["sandbox_error"] == 0, report.results
