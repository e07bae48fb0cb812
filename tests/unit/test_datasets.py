"""Converters of published stdio benchmarks, on small hand-written rows in their formats."""

from __future__ import annotations

import base64
import json
import pickle
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from sandbox_env.grading.datasets import Converter, task_id
from sandbox_env.grading.tasks import load_tasks, parse_task

ROOT = Path(__file__).resolve().parents[2]

APPS_ROW = {
    "problem_id": 4321, "question": "Print the sum of two integers.", "difficulty": "introductory",
    "url": "https://example.invalid/p", "starter_code": "", "solutions": json.dumps(["print(1)"]),
    "input_output": json.dumps({"inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", ["7"]]}),
}
APPS_CALL_ROW = {**APPS_ROW, "problem_id": 1,
                 "input_output": json.dumps({"fn_name": "add", "inputs": [[1, 2]], "outputs": [[3]]})}
CC_ROW = {
    "name": "1548_E. Gregor and the Two Painters", "description": "Read n, print n * 2.",
    "public_tests": {"input": ["2\n"], "output": ["4\n"]},
    "private_tests": {"input": ["5\n"], "output": ["10\n"]},
    "generated_tests": {"input": ["0\n", "7\n"], "output": ["0\n", "14\n"]},
    "difficulty": 11, "cf_rating": 3400,
}
LCB_PUBLIC = json.dumps([{"input": "2\n", "output": "4\n", "testtype": "stdin"}])
LCB_ROW = {
    "question_id": "abc300_a", "question_title": "Double", "question_content": "Print twice n.",
    "platform": "atcoder", "contest_date": "2023-04-29T00:00:00", "difficulty": "easy",
    "starter_code": "", "metadata": "{}", "public_test_cases": LCB_PUBLIC,
    "private_test_cases": json.dumps([{"input": "9\n", "output": "18\n", "testtype": "stdin"}]),
}


def test_apps_stdio_rows_become_tasks_and_call_based_ones_are_skipped() -> None:
    conv = Converter("apps")
    [task] = list(conv.convert([APPS_ROW, APPS_CALL_ROW]))
    parsed = parse_task(task)
    assert parsed.id == "apps/4321" and parsed.tests.kind == "stdio"
    assert [(c.input, c.output) for c in parsed.tests.cases] == [("1 2\n", "3\n"), ("3 4\n", "7\n")]
    assert conv.skipped == {"apps: function-call tests (fn_name), not stdio": 1}


def test_codecontests_hides_private_and_generated_tests_and_shows_public_ones() -> None:
    [task] = list(Converter("codecontests").convert([CC_ROW]))
    parsed = parse_task(task)
    assert parsed.id == "codecontests/1548_E.-Gregor-and-the-Two-Painters"
    assert [c.input for c in parsed.tests.cases] == ["5\n", "0\n", "7\n"]
    assert parsed.public()["public_tests"] == [{"input": "2\n", "output": "4\n", "name": None}]


def test_livecodebench_reads_plain_json_tests_and_never_unpickles() -> None:
    conv = Converter("livecodebench")
    [task] = list(conv.convert([LCB_ROW]))
    assert [c["input"] for c in task["tests"]["cases"]] == ["9\n", "2\n"]

    class Boom:  # would run code if it were unpickled
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("unpickled!",))

    blob = base64.b64encode(zlib.compress(pickle.dumps(Boom()))).decode()
    [task] = list(conv.convert([{**LCB_ROW, "private_test_cases": blob}]))
    assert [c["input"] for c in task["tests"]["cases"]] == ["2\n"]  # the public test only
    assert conv.skipped == {"livecodebench: private tests pickled (not loaded; see docs/tasks.md)": 1}
    functional = json.dumps([{"input": "1", "output": "2", "testtype": "functional"}])
    assert list(conv.convert([{**LCB_ROW, "public_test_cases": functional}])) == []


def test_language_is_passed_through_and_ids_are_made_safe() -> None:
    [task] = list(Converter("codecontests", language="c").convert([CC_ROW]))
    assert task["tests"]["language"] == "c"
    assert task_id("x", "a b [c]") == "x/a-b-c"
    with pytest.raises(ValueError, match="unknown format"):
        Converter("mbpp")


def test_the_script_writes_a_task_file_the_server_loads(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in (APPS_ROW, APPS_CALL_ROW)) + "\n")
    out = tmp_path / "tasks.jsonl"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_stdio.py"), "apps", str(rows), str(out)],
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT)}, check=True)
    assert "1 tasks written" in done.stderr and "skipped 1" in done.stderr
    assert list(load_tasks(out)) == ["apps/4321"]
