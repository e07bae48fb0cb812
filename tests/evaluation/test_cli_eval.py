"""`sandbox-env eval`, run as a real subprocess: stdout summary, files, exit statuses."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from eval_helpers import EXAMPLE_SAMPLES, write_jsonl

_EXE = shutil.which("sandbox-env")
CLI = [_EXE] if _EXE else [sys.executable, "-m", "sandbox_env.cli"]


def sandbox_env(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.docker
@pytest.mark.slow
def test_eval_prints_the_summary_and_exits_0_then_2_on_a_bad_row(tmp_path: Path, example_problem: Path,
                                                                 docker_backend: str) -> None:
    samples = write_jsonl(tmp_path / "samples.jsonl", EXAMPLE_SAMPLES)
    out = sandbox_env("eval", str(samples), "--problems", str(example_problem), "--k", "1,10",
                      "--workers", "2", "--backend", docker_backend, "--timeout", "2")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["pass@1"] == pytest.approx(0.5) and "pass@10" not in summary
    assert summary["counts"]["passed"] == 3 and summary["counts"]["timeout"] == 1
    assert json.loads(Path(f"{samples}_summary.json").read_text()) == summary
    assert len(Path(f"{samples}_results.jsonl").read_text().splitlines()) == 6
    assert "\x1b[" not in out.stderr  # no progress bar when stderr is not a terminal

    # A malformed row is named, everything else is kept (resumed here), and the exit status is 2.
    write_jsonl(samples, [*EXAMPLE_SAMPLES, '{"task_id": "test/0", "completion": '])
    out = sandbox_env("eval", str(samples), "--problems", str(example_problem), "--k", "1",
                      "--backend", docker_backend, "--timeout", "2")
    assert out.returncode == 2, out.stderr
    assert f"{samples}:7:" in out.stderr
    summary = json.loads(out.stdout)
    assert summary["resumed"] == 6 and summary["n_samples"] == 6 and summary["n_input_errors"] == 1


def test_eval_input_errors_exit_2(tmp_path: Path, example_problem: Path) -> None:
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    out = sandbox_env("eval", str(empty), "--problems", str(example_problem))
    assert out.returncode == 2 and "no samples" in out.stderr and out.stdout == ""
    samples = write_jsonl(tmp_path / "samples.jsonl", EXAMPLE_SAMPLES)
    out = sandbox_env("eval", str(samples), "--problems", str(example_problem), "--k", "0")
    assert out.returncode == 2 and "k must be a positive integer" in out.stderr
    out = sandbox_env("eval", str(samples), "--problems", str(tmp_path / "missing.jsonl"))
    assert out.returncode == 2 and "missing.jsonl" in out.stderr
    out = sandbox_env("eval", str(samples), "--backend", "docker", "--server", "http://127.0.0.1:1")
    assert out.returncode == 2 and "not both" in out.stderr
