"""SandboxFusion's request and response shapes (bytedance/SandboxFusion `sandbox/server/sandbox_api.py`,
`sandbox/runners/types.py`, `sandbox/datasets/types.py`; see docs/rl.md), plus our extras.

Field names, defaults, status strings and nullability follow SandboxFusion's, so its clients (verl's
`sandbox_fusion` reward) parse our replies unchanged. What sandbox-env adds lives in one extra field,
`sandbox_env`, which those clients ignore. Unknown request fields are ignored, as there.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Every language SandboxFusion's `RunCodeRequest.language` accepts (and C, ours); anything else is a
# 422, as there.
Language = Literal["python", "c", "cpp", "nodejs", "go", "go_test", "java", "php", "csharp", "bash", "typescript",
                   "sql", "rust", "cuda", "lua", "R", "perl", "D_ut", "ruby", "scala", "julia", "pytest", "junit",
                   "kotlin_script", "jest", "verilog", "python_gpu", "lean", "swift", "racket"]
SUPPORTED_LANGUAGES = ("python", "c", "cpp", "nodejs", "bash", "rust")  # sandbox_env/languages.py


class RunStatus(str, Enum):
    """The reply's `status`: every stage finished with exit code 0; or some stage exceeded its time or
    exited non-zero; or the sandbox itself failed (never the code's fault)."""

    SUCCESS = "Success"
    FAILED = "Failed"
    SANDBOX_ERROR = "SandboxError"


class CommandRunStatus(str, Enum):
    """One stage's (compile, run) `status`. `Error`: the sandbox could not run it."""

    FINISHED = "Finished"
    ERROR = "Error"
    TIME_LIMIT_EXCEEDED = "TimeLimitExceeded"


class CommandRunResult(BaseModel):
    status: CommandRunStatus
    execution_time: float | None = None
    return_code: int | None = None
    stdout: str | None = None
    stderr: str | None = None


class RunCodeRequest(BaseModel):
    """`POST /run_code`: SandboxFusion's fields and defaults; `policy` is ours (SandboxFusion has none)."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"code": "print(input())", "language": "python", "stdin": "hello\n", "run_timeout": 5}]})

    code: str
    language: Language
    compile_timeout: float = Field(10, ge=0, description="compiled languages: wall time of the compile "
                                   "stage; at most the policy's timeout_s")
    run_timeout: float = Field(10, gt=0, description="wall time of the run; at most the policy's timeout_s")
    memory_limit_MB: int = Field(-1, description="address-space limit; <= 0 or above the policy: the policy's")
    stdin: str | None = None
    files: dict[str, str | None] = Field(default_factory=dict, description="path -> base64, written first")
    fetch_files: list[str] = Field(default_factory=list, description="paths read back after the run")
    policy: str | None = Field(None, description="sandbox-env: the policy to run under (the server's default)")


class Extras(BaseModel):
    """What sandbox-env says beyond SandboxFusion's fields (the reply's `sandbox_env`)."""

    outcome: str  # an ExecStatus value (ok, error, timeout, oom, killed, output_limit) or sandbox_error
    retryable: bool = False  # sandbox_error only: the same request may succeed later
    exit_code: int | None = None
    wall_time_s: float | None = None
    cpu_time_s: float | None = None
    peak_memory_mb: float | None = None
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    policy: str | None = None
    run_timeout_s: float | None = None  # the limit the run had (the request's, clamped to the policy's)
    memory_limit_mb: int | None = None  # likewise
    clamped: list[str] = Field(default_factory=list)  # request fields lowered to the policy's limit
    language: str | None = None  # the language run (sandbox_env/languages.py's name)
    compile_timeout_s: float | None = None  # compiled languages: the compile stage's limit (clamped)


class RunCodeResponse(BaseModel):
    status: RunStatus
    message: str = ""
    compile_result: CommandRunResult | None = None
    run_result: CommandRunResult | None = None
    executor_pod_name: str | None = None
    files: dict[str, str] = Field(default_factory=dict)
    sandbox_env: Extras | None = None


class TestConfig(BaseModel):
    """`SubmitRequest.config` (SandboxFusion's `TestConfig`)."""

    __test__ = False
    model_config = ConfigDict(extra="ignore")

    dataset_type: str | None = None
    language: Language | None = None
    locale: str | None = None
    is_fewshot: bool | None = None
    compile_timeout: float | None = Field(None, ge=0)
    run_timeout: float | None = Field(None, gt=0)
    custom_extract_logic: str | None = None
    provided_data: list[dict[str, Any]] | dict[str, Any] | None = None
    extra: dict[str, Any] = Field(default_factory=dict)


class SubmitRequest(BaseModel):
    """`POST /submit`; `policy` is ours."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"dataset": "sandbox_env", "id": "HumanEval/0", "completion": "```python\n...\n```", "config": {}},
        {"dataset": "my_oj", "id": 1, "completion": "```python\nprint(int(input()) * 2)\n```",
         "config": {"dataset_type": "CommonOJDataset", "language": "python", "provided_data": {
             "id": 1, "test": [{"input": {"stdin": "2\n"}, "output": {"stdout": "4\n"}}]}}}]})

    dataset: str
    id: int | str
    completion: str
    config: TestConfig
    policy: str | None = None


class EvalTestCase(BaseModel):
    passed: bool
    exec_info: RunCodeResponse
    test_info: dict[str, Any] | None = None


class EvalResult(BaseModel):
    id: int | str
    accepted: bool
    extracted_code: str
    full_code: str | None = None
    test_code: str | None = None
    tests: list[EvalTestCase]
    extracted_type: Literal["fenced", "incomplete_fenced", "heuristic", "empty"] | None = None
    extra: dict[str, Any] | None = None
