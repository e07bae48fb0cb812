"""SandboxFusion's `/submit`, the subset this server can honestly evaluate (docs/rl.md):

* dataset `sandbox_env`: one of this server's tasks (or `HumanEval/<n>`) by `id`, graded by the
  trusted grader exactly as `POST /grade` does;
* `CommonOJDataset` stdio problems whose row comes in `config.provided_data` (SandboxFusion's
  self-contained form): each case's stdin run, its stdout compared as SandboxFusion compares.

Everything else (SandboxFusion's own databases, its other dataset classes, custom extraction
logic) is a 400 saying so.
"""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import BaseModel, ValidationError

from sandbox_env.errors import InvalidRequestError, KernelError
from sandbox_env.models import Grading, TestStatus
from sandbox_env.server.sandboxfusion.schema import (
    CommandRunResult,
    CommandRunStatus,
    EvalResult,
    EvalTestCase,
    Extras,
    RunCodeResponse,
    RunStatus,
    TestConfig,
)

OWN_DATASET = "sandbox_env"
COMMON_OJ = "CommonOJDataset"
COMMON_OJ_DATASETS = frozenset({"code_contests"})  # registered to CommonOJDataset in SandboxFusion
STDIO_RUN_TIMEOUT_S = 20.0  # SandboxFusion's default for interpreted languages in stdio tests
FLOAT_REL_TOL = 1e-5
PYTHON_TAGS = frozenset({"python", "py", "python3", "py3"})
_FENCED = re.compile(r"```([^\n`]*)\n(.*?)```", re.DOTALL)
_OPENED = re.compile(r"```([^\n`]*)\n(.*)\Z", re.DOTALL)


class SubmitError(InvalidRequestError):
    """A `/submit` this server cannot evaluate; SandboxFusion answers those with 400."""

    http_status = 400


class StdioCase(BaseModel):
    """One CommonOJ case: `input["stdin"]` in, `output["stdout"]` expected."""

    input: dict[str, str]
    output: dict[str, str]


def dataset_kind(dataset: str, config: TestConfig) -> str:
    if dataset == OWN_DATASET or config.dataset_type == OWN_DATASET:
        return OWN_DATASET
    if dataset in COMMON_OJ_DATASETS or config.dataset_type == COMMON_OJ:
        return COMMON_OJ
    raise SubmitError(f"no eval class found for dataset {dataset!r}: this server evaluates dataset "
                      f"{OWN_DATASET!r} (its tasks by id) and dataset_type {COMMON_OJ!r} with the row in "
                      "config.provided_data")


def stdio_cases(config: TestConfig) -> list[StdioCase]:
    """The cases of a CommonOJ row sent in `provided_data`."""
    if config.custom_extract_logic:
        raise SubmitError("config.custom_extract_logic is not supported here (it runs code on the server)")
    if not config.language:
        raise SubmitError("config.language field must exist for CommonOJDataset, got None")
    row = config.provided_data
    if row is None:
        raise SubmitError("CommonOJDataset rows come from SandboxFusion's database, which this server does "
                          "not have: send the row in config.provided_data ({'id', 'test': [...]})")
    if not isinstance(row, dict) or not isinstance(row.get("test"), list):
        raise SubmitError("config.provided_data must be one row: a dict with 'test', a list of "
                          "{'input': {'stdin': ...}, 'output': {'stdout': ...}}")
    try:
        cases = [StdioCase.model_validate(case) for case in row["test"]]
    except ValidationError as exc:
        raise SubmitError(f"config.provided_data.test: {exc.errors(include_url=False, include_input=False)[:3]}") \
            from None
    for index, case in enumerate(cases):
        if "stdin" not in case.input or "stdout" not in case.output:
            raise SubmitError(f"config.provided_data.test[{index}]: give input.stdin and output.stdout "
                              "(files other than the standard streams are not supported)")
    if not cases:
        raise SubmitError("config.provided_data.test holds no cases")
    return cases


def extract_code(completion: str, language: str | None = "python") -> tuple[str, str]:
    """The code of a completion, and how it was found: the first complete fenced block tagged with
    the language, else the first complete fenced block; else an unclosed block's text; else the
    completion itself (`heuristic`: SandboxFusion's heuristics are richer); `empty` if blank."""
    tags = PYTHON_TAGS if language in (None, "python") else frozenset({str(language).lower()})
    blocks = _FENCED.findall(completion)
    if blocks:
        tagged = [code for tag, code in blocks if tag.strip().lower() in tags]
        return (tagged or [blocks[0][1]])[0], "fenced"
    opened = _OPENED.search(completion)
    if opened:
        return opened.group(2), "incomplete_fenced"
    if completion.strip():
        return completion, "heuristic"
    return "", "empty"


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def stdout_matches(actual: str, expected: str, *, lower: bool = True) -> bool:
    """SandboxFusion's stdio comparison: both stripped and split into lines (one trailing blank line
    forgiven), the same number of lines, each equal once stripped (and lower-cased, by default), or
    both numbers within a relative tolerance of 1e-5."""
    got, want = actual.strip().split("\n"), expected.strip().split("\n")
    if len(got) - len(want) == 1 and got[-1] == "":
        got = got[:-1]
    if len(want) - len(got) == 1 and want[-1] == "":
        want = want[:-1]
    if len(got) != len(want):
        return False
    for line, model in zip(got, want, strict=True):
        if lower:
            line, model = line.lower(), model.lower()
        if line.strip() == model.strip():
            continue
        if _is_float(model) and _is_float(line):
            a, b = float(line), float(model)
            if math.isfinite(a) and math.isfinite(b) and abs(a - b) / max(abs(b), 1e-10) < FLOAT_REL_TOL:
                continue
        return False
    return True


def case_passed(response: RunCodeResponse, case: StdioCase) -> bool:
    if response.status is not RunStatus.SUCCESS or response.run_result is None:
        return False
    return stdout_matches(response.run_result.stdout or "", case.output["stdout"])


def graded_result(request_id: int | str, code: str, kind: str, grading: Grading) -> EvalResult:
    """A grading in SandboxFusion's terms: one test per test of the task. The grader reports each
    test's outcome, not a process's output, so `run_result` holds no stdout and stderr carries the
    test's message; an infrastructure failure is one `SandboxError` test."""
    extra: dict[str, Any] = {"sandbox_env": grading.model_dump(mode="json", exclude={"tests"})}
    if grading.status == "infra_error":
        info = RunCodeResponse(status=RunStatus.SANDBOX_ERROR, message=grading.error or "the sandbox failed",
                               sandbox_env=Extras(outcome="sandbox_error", retryable=grading.retryable))
        return EvalResult(id=request_id, accepted=False, extracted_code=code, extracted_type=kind,
                          tests=[EvalTestCase(passed=False, exec_info=info)], extra=extra)
    tests = []
    for test in grading.tests:
        passed = test.status is TestStatus.PASSED
        timeout = test.status is TestStatus.TIMEOUT
        run = CommandRunResult(status=CommandRunStatus.TIME_LIMIT_EXCEEDED if timeout else CommandRunStatus.FINISHED,
                               execution_time=test.wall_time_s, return_code=None if timeout else 0 if passed else 1,
                               stdout="", stderr=test.message)
        info = RunCodeResponse(status=RunStatus.SUCCESS if passed else RunStatus.FAILED, run_result=run,
                               sandbox_env=Extras(outcome=test.status.value, wall_time_s=test.wall_time_s,
                                                  cpu_time_s=test.cpu_time_s))
        tests.append(EvalTestCase(passed=passed, exec_info=info, test_info={"name": test.name}))
    accepted = bool(tests) and all(t.passed for t in tests)
    return EvalResult(id=request_id, accepted=accepted, extracted_code=code, extracted_type=kind,
                      tests=tests, extra=extra)


def kernel_failure(exc: KernelError) -> RunCodeResponse:
    return RunCodeResponse(status=RunStatus.SANDBOX_ERROR, message=f"sandbox-env: the sandbox failed: {exc.message}",
                           sandbox_env=Extras(outcome="sandbox_error", retryable=exc.retryable))
