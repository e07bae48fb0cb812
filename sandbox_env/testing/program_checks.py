"""Checks of `Kernel.run_program` and of grading through it (`sandbox_env.grading.grade`, the
same trusted grader every backend runs)."""

from __future__ import annotations

from sandbox_env.grading.driver import grade
from sandbox_env.grading.tasks import Task, parse_task
from sandbox_env.kernels.base import Kernel
from sandbox_env.models import ExecStatus, TestStatus
from sandbox_env.testing.suite import Harness, check

# A program's exit, as `python3 -I -c` reports it: (source, status, exit code, text in stderr).
PROGRAM_EXITS = [
    ("print(6 * 7)", ExecStatus.OK, 0, ""),
    ("raise SystemExit(3)", ExecStatus.ERROR, 3, ""),
    ("import sys; sys.exit('bye')", ExecStatus.ERROR, 1, "bye"),
    ("exit()", ExecStatus.OK, 0, ""),
    ("raise ValueError('broken')", ExecStatus.ERROR, 1, "ValueError: broken"),
    ("import os; os.kill(os.getpid(), 9)", ExecStatus.KILLED, 137, ""),
    ("import atexit; atexit.register(print, 'at exit')", ExecStatus.OK, 0, ""),
]
SQUARE = parse_task({"id": "conformance/square", "timeout_s": 1, "tests": {
    "kind": "function", "entry_point": "square",
    "check": "def check(candidate):\n    assert candidate(3) == 9\n    assert candidate(-2) == 4\n"}})
DOUBLE = parse_task({"id": "conformance/double", "tests": {
    "kind": "stdio", "cases": [{"input": "2\n", "output": "4\n"}, {"input": "-5\n", "output": "-10\n"}]}})


@check()
async def program_exit_statuses(h: Harness) -> None:
    """One kernel runs many programs in a row, each ending as a fresh interpreter's would."""
    kernel = await h.kernel()
    for source, status, exit_code, stderr in PROGRAM_EXITS:
        result = await kernel.run_program(source, timeout_s=10)
        assert (result.status, result.exit_code) == (status, exit_code), (source, result)
        assert stderr in result.stderr, (source, result)
        if "atexit" in source or "6 * 7" in source:
            assert result.stdout == ("at exit\n" if "atexit" in source else "42\n"), (source, result)


@check()
async def program_stdin_and_isolated_mode(h: Harness) -> None:
    result = await (await h.kernel()).run_program(
        "import sys\nprint(sys.flags.isolated, __name__, repr(sys.stdin.read()))", stdin=b"fed on stdin",
        timeout_s=10)
    assert result.status is ExecStatus.OK and result.stdout == "1 __main__ 'fed on stdin'\n", result


@check()
async def program_clean_slate(h: Harness) -> None:
    """A program sees nothing of the steps or of earlier programs; the namespace is lost after it."""
    kernel = await h.kernel()
    await kernel.execute("kept = 1")
    first = await kernel.run_program("import os\nopen('planted', 'w').write('x')\nprint(os.listdir('.'))",
                                     timeout_s=10)
    assert first.stdout == "['planted']\n", first
    second = await kernel.run_program("import os\nprint(os.listdir('.'))", timeout_s=10)
    assert second.status is ExecStatus.OK and second.stdout == "[]\n", second
    after = await kernel.execute("print(kept)")
    assert after.exception is not None and after.exception.type == "NameError", after
    assert (await kernel.execute("print('back')")).stdout == "back\n"


@check()
async def program_past_its_limits(h: Harness) -> None:
    """A program that loops or floods is stopped, and the next one runs."""
    kernel = await h.kernel(output_limit_bytes=1_000_000)
    for source, status in [("while True: pass", ExecStatus.TIMEOUT),
                           ("import sys\nwhile True: sys.stdout.write('x' * 65536)", ExecStatus.OUTPUT_LIMIT)]:
        result = await kernel.run_program(source, timeout_s=1)
        assert result.status is status and result.exit_code != 0, (source, result)
        assert result.wall_time_s < 1 + 10, result
        again = await kernel.run_program("print('next')", timeout_s=10)
        assert again.status is ExecStatus.OK and again.stdout == "next\n", again


async def full_marks(kernel: Kernel, task: Task, submission: str, tests: int) -> None:
    """A right submission is graded, and passes every one of the task's `tests` tests."""
    good = await grade(kernel, task, submission)
    assert (good.status, good.reward, good.passed, good.total) == ("graded", 1.0, tests, tests), good


@check()
async def grading_function_tests(h: Harness) -> None:
    """A pass, a failure and a timeout, graded one after another on one kernel."""
    kernel = await h.kernel()
    await full_marks(kernel, SQUARE, "def square(x):\n    return x * x\n", tests=1)
    cheat = await grade(kernel, SQUARE, "class A:\n    __eq__ = lambda s, o: True\ndef square(x):\n    return A()\n")
    assert (cheat.status, cheat.reward) == ("graded", 0.0), cheat  # an object that equals anything
    assert [t.status for t in cheat.tests] in ([TestStatus.FAILED], [TestStatus.ERROR]), cheat
    looping = await grade(kernel, SQUARE, "def square(x):\n    while True: pass\n")
    assert [t.status for t in looping.tests] == [TestStatus.TIMEOUT], looping
    after = await kernel.execute("print('graded thrice')")
    assert after.stdout == "graded thrice\n", after


@check()
async def grading_stdio_tests(h: Harness) -> None:
    kernel = await h.kernel()
    await full_marks(kernel, DOUBLE, "print(int(input()) * 2)", tests=2)
    wrong = await grade(kernel, DOUBLE, "print(abs(int(input())) * 2)")
    assert (wrong.reward, wrong.passed) == (0.0, 1), wrong
