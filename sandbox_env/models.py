"""Wire types: what crosses the WebSocket/HTTP boundary, shaped as OpenEnv's.

The observation on the wire carries exactly `stdout`, `stderr`, `exit_code` and `metadata`
(OpenEnv >= 0.4), so OpenEnv's strict `CodingEnv` client parses it; everything richer lives in
`metadata["execution"]` and is exposed as typed attributes by `CodeObservation.execution`.
Imports only pydantic and the standard library.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

EXECUTION_KEY = "execution"
GRADING_KEY = "grading"
TASK_KEY = "task"


class ExecStatus(str, Enum):
    """How one execution ended."""

    OK = "ok"
    ERROR = "error"  # the code raised
    TIMEOUT = "timeout"  # wall-time limit of the step
    OOM = "oom"  # memory limit
    KILLED = "killed"  # the interpreter was killed by a signal (crash, pid or CPU-time limit)
    OUTPUT_LIMIT = "output_limit"  # stopped for printing more than the policy allows


class ExceptionInfo(BaseModel):
    """An exception raised by the executed code; plain text, no ANSI codes."""

    type: str
    message: str
    traceback: str = ""


class DisplayOutput(BaseModel):
    """A rich output (Jupyter MIME bundle), e.g. `{"image/png": "<base64>", "text/plain": "..."}`."""

    kind: str = "display_data"  # display_data | execute_result
    data: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)


class ExecutionInfo(BaseModel):
    """What an execution produced beyond stdout, stderr and the exit code."""

    status: ExecStatus = ExecStatus.OK
    exception: ExceptionInfo | None = None
    wall_time_s: float = 0.0
    cpu_time_s: float | None = None
    peak_memory_mb: float | None = None
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    displays: list[DisplayOutput] = Field(default_factory=list)
    execution_count: int | None = None

    @property
    def truncated(self) -> bool:
        return self.stdout_truncated or self.stderr_truncated


class ExecutionResult(ExecutionInfo):
    """One execution as a kernel reports it."""

    stdout: str = ""
    stderr: str = ""
    exit_code: int = 0

    def info(self) -> ExecutionInfo:
        return ExecutionInfo.model_validate(self.model_dump(exclude={"stdout", "stderr", "exit_code"}))


class CodeAction(BaseModel):
    """Run `code` in the episode's interpreter (OpenEnv's CodeAction shape)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"code": "print(1 + 1)"}]},
    )

    code: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    # Grade the episode's submission (this `code` if non-empty, else every ok step's code) and end it.
    submit: bool = False


class TestStatus(str, Enum):
    """How one test of a grading ended."""

    __test__ = False  # not a pytest class

    PASSED = "passed"
    FAILED = "failed"
    ERROR = "error"
    TIMEOUT = "timeout"
    OOM = "oom"
    OUTPUT_LIMIT = "output_limit"
    COMPILE_ERROR = "compile_error"  # the submission did not compile (the message: the compiler's)


class TestResult(BaseModel):
    """One test's outcome; times are measured by the trusted grader (CPU: of the submission)."""

    __test__ = False

    name: str
    status: TestStatus
    message: str = ""
    wall_time_s: float = 0.0
    cpu_time_s: float | None = None


class Grading(BaseModel):
    """A submission graded against a task's tests.

    `status="infra_error"` means the sandbox or the service failed (not the code): `reward` is
    None and `retryable` True; never read it as a 0.
    """

    task_id: str
    status: Literal["graded", "infra_error"]
    reward: float | None
    passed: int = 0
    total: int = 0
    tests: list[TestResult] = Field(default_factory=list)
    error: str | None = None
    retryable: bool = False
    wall_time_s: float = 0.0


class CodeObservation(BaseModel):
    """The result of a reset or a step."""

    model_config = ConfigDict(extra="forbid")

    stdout: str = ""
    stderr: str = ""
    exit_code: int = 0
    metadata: dict[str, Any] = Field(default_factory=dict)
    reward: float | None = None
    done: bool = False

    @classmethod
    def from_result(cls, result: ExecutionResult, *, reward: float | None = None, done: bool = False,
                    **metadata: Any) -> CodeObservation:
        meta = {EXECUTION_KEY: result.info().model_dump(mode="json"), **metadata}
        return cls(stdout=result.stdout, stderr=result.stderr, exit_code=result.exit_code,
                   metadata=meta, reward=reward, done=done)

    @property
    def execution(self) -> ExecutionResult | None:
        """Typed view of the execution details, or None for observations without one (reset)."""
        info = self.metadata.get(EXECUTION_KEY)
        if info is None:
            return None
        return ExecutionResult(stdout=self.stdout, stderr=self.stderr, exit_code=self.exit_code, **info)

    @property
    def grading(self) -> Grading | None:
        """Typed view of the grading of a submit step, else None."""
        data = self.metadata.get(GRADING_KEY)
        return None if data is None else Grading.model_validate(data)

    @property
    def status(self) -> ExecStatus | None:
        execution = self.execution
        return execution.status if execution else None

    @property
    def exception(self) -> ExceptionInfo | None:
        execution = self.execution
        return execution.exception if execution else None

    def to_wire(self) -> dict[str, Any]:
        """OpenEnv payload: observation fields, with reward/done lifted beside them (>= 0.4 shape)."""
        payload: dict[str, Any] = {
            "observation": self.model_dump(mode="json", exclude={"reward", "done"}),
            "reward": self.reward,
            "done": self.done,
        }
        if self.metadata:
            payload["metadata"] = payload["observation"]["metadata"]
        return payload

    @classmethod
    def from_wire(cls, payload: dict[str, Any]) -> CodeObservation:
        obs = dict(payload.get("observation") or {})
        obs.setdefault("metadata", payload.get("metadata") or {})
        return cls(**obs, reward=payload.get("reward"), done=bool(payload.get("done", False)))


class EpisodeState(BaseModel):
    """Episode state; OpenEnv's `episode_id`/`step_count` plus CodingEnv's `last_exit_code`."""

    model_config = ConfigDict(extra="allow")

    episode_id: str | None = None
    step_count: int = 0
    last_exit_code: int = 0
    backend: str | None = None
    policy: str | None = None


class ResetRequest(BaseModel):
    """HTTP `POST /reset` body; extra keys are reset options."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{"seed": 0}]})

    seed: int | None = Field(default=None, ge=0)
    episode_id: str | None = Field(default=None, max_length=255)

    def reset_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `Episode.reset`: seed, episode_id and the extra keys as options."""
        options = {k: v for k, v in (self.model_extra or {}).items() if k.isidentifier() and k != "self"}
        return {"seed": self.seed, "episode_id": self.episode_id, **options}


class StepRequest(BaseModel):
    """HTTP `POST /step` body."""

    model_config = ConfigDict(
        extra="allow", json_schema_extra={"examples": [{"action": {"code": "print(1)"}}]}
    )

    action: dict[str, Any]
    timeout_s: float | None = Field(default=None, gt=0)
    request_id: str | None = Field(default=None, max_length=255)


class StepResponse(BaseModel):
    """HTTP `POST /reset` and `POST /step` reply."""

    model_config = ConfigDict(extra="forbid")

    observation: dict[str, Any]
    reward: float | None = None
    done: bool = False
    metadata: dict[str, Any] | None = None


class GradeRequest(BaseModel):
    """`POST /grade` body: a task (inline, or a task_id of the server) and a submission."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"task_id": "HumanEval/0", "submission": "def has_close_elements(numbers, threshold): ..."}]})

    task: dict[str, Any] | None = None
    task_id: str | None = Field(default=None, max_length=255)
    submission: str
    policy: str | None = Field(default=None, max_length=255)
    reward: str | None = Field(default=None, max_length=255, description="reward policy for this call")


class BatchItem(BaseModel):
    """One submission of a `POST /grade/batch`: its task (inline, or a task_id of the server)."""

    model_config = ConfigDict(extra="forbid")

    submission: str
    task: dict[str, Any] | None = None
    task_id: str | None = Field(default=None, max_length=255)
    reward: str | None = Field(default=None, max_length=255, description="reward policy (default: the batch's)")
    id: str | int | None = Field(default=None, description="the caller's label, echoed in its result line")

    @model_validator(mode="after")
    def _one_task(self) -> BatchItem:
        if (self.task is None) == (self.task_id is None):
            raise ValueError("give exactly one of task and task_id")
        if isinstance(self.id, str) and len(self.id) > 255:
            raise ValueError("id: at most 255 characters")
        return self


class BatchRequest(BaseModel):
    """`POST /grade/batch` body: many submissions, one NDJSON line back per item as it finishes."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"items": [
        {"task_id": "HumanEval/0", "submission": "def has_close_elements(numbers, threshold): ..."}]}]})

    items: list[BatchItem] = Field(min_length=1)
    policy: str | None = Field(default=None, max_length=255)
    reward: str | None = Field(default=None, max_length=255, description="reward policy of items without their own")
    parallel: int | None = Field(default=None, ge=1, description="most of this batch's gradings at once "
                                 "(never above the server's batch_parallel)")


class BatchLine(BaseModel):
    """One line of a batch's NDJSON stream: `result` (an item's Grading), `error` (an item that
    could not be graded: its task is unknown or invalid) or the final `summary`."""

    type: Literal["result", "error", "summary"]
    index: int | None = None
    id: str | int | None = None
    grading: Grading | None = None
    error: dict[str, Any] | None = None  # {"code", "message"} of the service error
    summary: BatchSummary | None = None


class BatchSummary(BaseModel):
    """The last line of a batch: what the server did. `gradings` counts the gradings run:
    identical items (task, submission, reward) share one."""

    items: int
    gradings: int = 0
    deduplicated: int = 0
    graded: int = 0
    infra_errors: int = 0
    errors: int = 0
    wall_time_s: float = 0.0


BatchLine.model_rebuild()
