"""Grade a submission against a task, in a kernel's sandbox, through the trusted grader program.

The server's side of the integrity design (the sandbox side is `inside/grader.py`): the job goes
to the grader on stdin at grade time only; the verdict is the grader's structured JSON, checked
here against the task (count and names of tests); anything else (no verdict, a garbled one, the
grader killed) makes every test an `error`: reward 0, never a pass. A backend failure is an
`infra_error` with reward None.
"""

from __future__ import annotations

import functools
import hmac
import importlib.util
import json
import logging
import marshal
import os
import time
import zlib
from typing import Any

from pydantic import ValidationError

from sandbox_env import languages
from sandbox_env.errors import KernelError, KernelUnavailableError
from sandbox_env.grading.rewards import reward_policy
from sandbox_env.grading.tasks import PytestTests, StdioTests, Task, test_count, test_names
from sandbox_env.inside import bundle, source
from sandbox_env.inside.grader_child import CODEC, HOST
from sandbox_env.inside.wire import KEY_SIZE, VERDICT, tag
from sandbox_env.kernels.base import Kernel
from sandbox_env.models import ExecStatus, Grading, TestResult, TestStatus

log = logging.getLogger(__name__)

STARTUP_S = 10.0  # interpreter starts, loading the submission, pytest collection
MAX_PROGRAM_S = 3600.0
PYTEST_BUDGET_TESTS = 50  # pytest files: the count is unknown before collection


@functools.lru_cache(maxsize=1)
def grader_program() -> str:
    """The program each grading runs: `procs` (for the dumpable switch it throws first), then the
    loader, which reads the preamble and the job from stdin."""
    return bundle("procs") + source("grader_loader")


@functools.lru_cache(maxsize=2)
def grader_preamble(stdio: bool) -> bytes:
    """The grader's first stdin section, the same at every grading, compressed: the bytecode magic,
    (wire, grader, CODEC, CODEC + HOST) compiled, and their sources (HOST is none for stdio tests)
    for an interpreter whose magic differs. The server compiles the grader's text; it never
    imports or runs it."""
    sources = {"wire": source("wire"), "grader": source("grader"), "codec": CODEC, "host": "" if stdio else HOST}
    # dont_inherit: this module's `from __future__ import annotations` is not the sandbox's
    codes = marshal.dumps((compile(sources["wire"], "<sandbox_env.inside.wire>", "exec", dont_inherit=True),
                           compile(sources["grader"], "<grader>", "exec", dont_inherit=True),
                           compile(CODEC, "<codec>", "exec", dont_inherit=True),
                           compile(CODEC + HOST, "<child>", "exec", dont_inherit=True) if sources["host"] else None))
    data = zlib.compress(marshal.dumps((importlib.util.MAGIC_NUMBER, codes, sources)), 1)
    return b"%012d" % len(data) + data


def grader_input(job: dict[str, Any]) -> bytes:
    """The grader's stdin: the preamble, then the job."""
    data = json.dumps(job).encode()
    return grader_preamble(job["spec"]["kind"] == "stdio") + b"%012d" % len(data) + data


def per_test_timeout(kernel: Kernel, task: Task) -> float:
    return float(task.timeout_s or kernel.policy.timeout_s)


def task_language(task: Task) -> str:
    """The language the submission is in: stdio tests name one; every other form is Python."""
    return task.tests.language if isinstance(task.tests, StdioTests) else languages.DEFAULT


def language_job(task: Task) -> dict[str, Any] | None:
    """The grader's commands for a stdio task's language; None: Python, run as the grader always has."""
    spec = task.tests
    if not isinstance(spec, StdioTests) or spec.language == languages.DEFAULT:
        return None
    return languages.get(spec.language).job(spec.compile_timeout_s)


def compile_budget(task: Task) -> float:
    spec = task.tests
    return spec.compile_timeout_s if isinstance(spec, StdioTests) and languages.get(spec.language).compiled else 0.0


async def grade(kernel: Kernel, task: Task, submission: str, *, reward: str | None = None) -> Grading:
    """Run the task's tests on `submission`; never raises for anything the submission does."""
    started = time.perf_counter()
    per_test = per_test_timeout(kernel, task)
    names = test_names(task)  # one list, used on both sides
    budget = min(MAX_PROGRAM_S, per_test * (test_count(task) or PYTEST_BUDGET_TESTS) + STARTUP_S + compile_budget(task))
    key = os.urandom(KEY_SIZE)  # the verdict's: stdout is reachable by more than the grader
    job = {"spec": task.tests.model_dump(mode="json"), "names": names, "key": key.hex(),
           "submission": submission, "timeout_s": per_test,
           "output_limit": kernel.policy.output_limit_bytes, "language": language_job(task),
           "prelude": task.prompt}  # a Python prompt's helpers run trusted, in the grader
    try:
        result = await kernel.run_program(grader_program(), stdin=grader_input(job), timeout_s=budget)
    except KernelError as exc:
        log.warning("grading %s: infrastructure failure: %s", task.id, exc)
        return Grading(task_id=task.id, status="infra_error", reward=None, error=str(exc),
                       retryable=not isinstance(exc, KernelUnavailableError) and exc.retryable,
                       wall_time_s=time.perf_counter() - started)
    if result.status is ExecStatus.OK and result.exit_code == 0:
        tests, problem = _verdict(result.stdout, task, names, key)
    else:  # a verdict counts only from a grader that finished: never from one stopped or killed
        tests, problem = [], "the grader did not finish"
    if problem is not None:
        message = f"{problem} (grader {result.status.value}, exit code {result.exit_code})"
        if result.status is ExecStatus.TIMEOUT:
            message = f"grading ran past its {budget:g} s budget"
        # the grader's stderr holds test output (hidden sources): logged, never returned
        log.info("grading %s: no usable verdict: %s: %s", task.id, message, result.stderr.strip()[-1000:])
        tests = [TestResult(name=n, status=TestStatus.ERROR, message=message) for n in names]
    value = reward_policy(reward or task.reward)(tests, task.weights)
    passed = sum(t.status is TestStatus.PASSED for t in tests)
    return Grading(task_id=task.id, status="graded", reward=value, passed=passed, total=len(tests),
                   tests=tests, error=problem, wall_time_s=time.perf_counter() - started)


def choose_reward(task: Task, requested: str | None, server_default: str | None) -> str:
    """The request's policy, else the task's own choice, else the server's, else binary."""
    if requested:
        return requested
    if "reward" in task.model_fields_set:
        return task.reward
    return server_default or task.reward


def _verdict(stdout: str, task: Task, names: list[str], key: bytes) -> tuple[list[TestResult], str | None]:
    """The grader's per-test results, or why there are none usable."""
    mac, _, body = stdout.partition("\n")
    if _claims_dumpable(stdout):  # said before the job (and key) was read: nothing to verify
        log.warning("grading %s: the grader could not make itself non-dumpable", task.id)
        return [], "the grader could not make itself non-dumpable"
    if not stdout.strip():
        return [], "the grader reported no verdict"
    if not body or not hmac.compare_digest(mac.encode(), tag(key, VERDICT, 0, body.encode()).hex().encode()):
        log.warning("grading %s: a verdict without the grading's tag", task.id)
        return [], "the grader's verdict is not authenticated"
    try:
        data = json.loads(body)
    except ValueError:
        return [], "the grader reported no verdict"
    if not isinstance(data, dict) or not isinstance(data.get("tests"), list):
        return [], "the grader's verdict is malformed"
    if data.get("hardened") is not True:  # dumpable: the submission could have read or driven it
        log.warning("grading %s: the grader could not make itself non-dumpable", task.id)
        return [], "the grader could not make itself non-dumpable"
    try:
        tests = [TestResult.model_validate(t) for t in data["tests"]]
    except ValidationError:
        return [], "the grader's verdict is malformed"
    if not isinstance(task.tests, PytestTests):
        if [t.name for t in tests] != names:
            return [], f"the grader reported {len(tests)} results for {len(names)} tests"
    elif not tests:
        return [], "the grader reported no tests"
    return tests, None


def _claims_dumpable(stdout: str) -> bool:
    try:
        data = json.loads(stdout)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("hardened") is False
