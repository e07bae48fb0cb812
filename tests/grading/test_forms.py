"""Each test form with passing, failing, erroring and timing-out submissions; checkers end to end."""

from __future__ import annotations

from typing import Any

import pytest
from grading_helpers import GOOD_SQUARE, SQUARE, make_task

from sandbox_env.grading.driver import grade

pytestmark = [pytest.mark.docker, pytest.mark.asyncio(loop_scope="module")]


def statuses(grading: Any) -> list[str]:
    return [t.status.value for t in grading.tests]


@pytest.mark.parametrize(("submission", "expected"), [
    (GOOD_SQUARE, ["passed"]),
    ("def square(x):\n    return x + x\n", ["failed"]),
    ("def square(x):\n    return {}[x]\n", ["error"]),
    ("def square(x):\n    while True: pass\n", ["timeout"]),
    ("def squared(x):\n    return x * x\n", ["error"]),  # the entry point is missing
    ("def square(x) return\n", ["error"]),  # does not compile
])
async def test_function_form(grader_kernel: Any, submission: str, expected: list[str]) -> None:
    result = await grade(grader_kernel, SQUARE, submission)
    assert result.status == "graded" and statuses(result) == expected, result
    assert result.reward == (1.0 if expected == ["passed"] else 0.0)
    assert result.tests[0].cpu_time_s is not None or expected != ["passed"]


async def test_assert_form_each_statement_is_a_test(grader_kernel: Any) -> None:
    task = make_task({"kind": "asserts", "setup": "import math", "asserts": [
        "assert add(1, 2) == 3", "assert add(2, 2) == 5", "assert add('a', 1) == 'a1'",
        "assert slow() == 1", "assert math.isclose(add(0.1, 0.2), 0.3)"]}, timeout_s=1, reward="fraction")
    submission = "def add(a, b):\n    return a + b\ndef slow():\n    while True: pass\n"
    result = await grade(grader_kernel, task, submission)
    # after the timeout the submission is reloaded in a fresh process and later tests still run
    assert statuses(result) == ["passed", "failed", "error", "timeout", "passed"], result
    assert result.reward == pytest.approx(2 / 5)
    assert "TypeError" in result.tests[2].message


async def test_out_of_memory_is_its_own_status(grader_kernel: Any) -> None:
    task = make_task({"kind": "asserts", "asserts": ["assert hog() == 1", "assert ok() == 1"]}, timeout_s=10)
    submission = "def hog():\n    x = bytearray(1 << 31)\n    return 1\ndef ok():\n    return 1\n"
    result = await grade(grader_kernel, task, submission)
    assert statuses(result) in (["oom", "passed"], ["error", "passed"]), result  # MemoryError is an error


STDIO_SUM = {"kind": "stdio", "cases": [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5\n", "output": "10\n"}]}


@pytest.mark.parametrize(("submission", "expected"), [
    ("a, b = map(int, input().split())\nprint(a + b)\n", ["passed", "passed"]),
    ("a, b = map(int, input().split())\nprint(a * b)\n", ["failed", "failed"]),
    ("raise SystemExit('bad input')\n", ["error", "error"]),
    ("import time\ntime.sleep(30)\n", ["timeout", "timeout"]),
    ("while True: print('x' * 65536)\n", ["output_limit", "output_limit"]),
])
async def test_stdio_form(grader_kernel: Any, submission: str, expected: list[str]) -> None:
    result = await grade(grader_kernel, make_task(STDIO_SUM, timeout_s=1.5), submission)
    assert statuses(result) == expected, result


@pytest.mark.parametrize(("checker", "output", "expected", "extra", "ok"), [
    ("exact", "3\n", "3\n", {}, True),
    ("exact", "3 \n", "3\n", {}, False),  # trailing whitespace counts for exact
    ("exact", "3", "3\n", {}, False),  # so does the final newline
    ("whitespace", "3   4  \n\n", "3 4\n", {}, True),  # trailing whitespace and blank lines ignored
    ("whitespace", "1\n2", "1\n2\n", {}, True),  # missing final newline is fine
    ("whitespace", "1\n", "1\n2\n", {}, False),  # a missing last line is not
    ("float", "0.3333333\n", "0.33333333333\n", {"abs_tol": 1e-6}, True),
    ("float", "0.3334\n", "0.33333333333\n", {"abs_tol": 1e-6, "rel_tol": 1e-6}, False),
    ("float", "1000001\n", "1000000\n", {"abs_tol": 0, "rel_tol": 1e-5}, True),  # relative tolerance
    ("float", "1.0 2.0\n", "1.0\n", {}, False),  # missing token
    ("float", "nan\n", "1.0\n", {}, False),
    ("unordered_lines", "b\na\n", "a\nb\n", {}, True),
    ("unordered_lines", "a\n", "a\nb\n", {}, False),
    ("custom", "4\n", "2\n", {"checker_source": "def check(input, output, expected):\n"
                                 "    return int(output) == int(expected) ** 2\n"}, True),
    ("custom", "5\n", "2\n", {"checker_source": "def check(input, output, expected):\n"
                                 "    return int(output) == int(expected) ** 2, 'not the square'\n"}, False),
])
async def test_checkers(grader_kernel: Any, checker: str, output: str, expected: str, extra: dict[str, Any],
                        ok: bool) -> None:
    task = make_task({"kind": "stdio", "checker": checker, "cases": [{"input": "", "output": expected}], **extra})
    result = await grade(grader_kernel, task, f"import sys\nsys.stdout.write({output!r})\n")
    assert statuses(result) == (["passed"] if ok else ["failed"]), result


PYTEST_FILES = {"test_square.py": "import pytest\nfrom solution import square\n\n"
                "def test_small():\n    assert square(3) == 9\n\n"
                "@pytest.mark.parametrize('x', [0, 4])\ndef test_more(x):\n    assert square(x) == x * x\n\n"
                "def test_raises():\n    with pytest.raises(TypeError):\n        square('a')\n"}


@pytest.mark.parametrize(("submission", "expected"), [
    ("def square(x):\n    return x * x\n", {"passed"}),
    ("def square(x):\n    return 4\n", {"failed"}),
    ("def square(x):\n    while True: pass\n", {"timeout"}),
    ("class Big:\n    pass\ndef square(x):\n    return Big()\n", {"error"}),  # not plain data
])
async def test_pytest_form(grader_kernel: Any, submission: str, expected: set[str]) -> None:
    task = make_task({"kind": "pytest", "files": PYTEST_FILES}, timeout_s=1)
    result = await grade(grader_kernel, task, submission)
    if result.tests and "pytest is not available" in result.tests[0].message:
        pytest.skip("the sandbox image has no pytest (rebuild it: sandbox-env images build --force)")
    assert set(statuses(result)) == expected, result
    assert result.total == 4
    assert result.reward == (1.0 if expected == {"passed"} else 0.0)
