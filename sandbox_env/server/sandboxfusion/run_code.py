"""One SandboxFusion `run_code` on a kernel: the request's limits against the policy, the program
(`inside/run_code.py`) run through `Kernel.run_program`, our outcome mapped onto SandboxFusion's
statuses (docs/rl.md has the table).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import posixpath
import secrets
from typing import Any

from sandbox_env import languages
from sandbox_env.errors import InvalidRequestError, KernelError, KernelUnavailableError
from sandbox_env.inside import source
from sandbox_env.inside.bounded import BoundedOutput
from sandbox_env.kernels.base import Kernel
from sandbox_env.models import ExecStatus, ExecutionResult
from sandbox_env.policy import Policy
from sandbox_env.server.sandboxfusion.schema import (
    SUPPORTED_LANGUAGES,
    CommandRunResult,
    CommandRunStatus,
    Extras,
    RunCodeResponse,
    RunStatus,
)

KILLED_CODE = 128 + 9  # a run stopped by us (output limit) reports what SIGKILL gives a shell
MAX_FILES = 256
STAGES_MARGIN_S = 2.0  # the stages' program: its start, writing the source, reporting


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one run gets: the request's limits, never laxer than the policy's."""

    run_timeout_s: float
    memory_mb: int | None  # an address-space limit below the policy's memory; None: the policy's only
    clamped: tuple[str, ...]
    compile_timeout_s: float = languages.COMPILE_TIMEOUT_S


def limits_for(policy: Policy, run_timeout: float, memory_limit_mb: int,
               compile_timeout: float | None = None) -> Limits:
    """A `run_timeout` above the policy's `timeout_s` is lowered to it (said in `clamped`); so is a
    `memory_limit_MB` above the policy's `memory_mb`. A lower one applies as given (SandboxFusion's
    own mechanism: an address-space rlimit); <= 0 means none (the policy's)."""
    clamped = []
    timeout = run_timeout
    if timeout > policy.timeout_s:
        timeout = policy.timeout_s
        clamped.append("run_timeout")
    memory: int | None = None
    if memory_limit_mb > policy.memory_mb:
        clamped.append("memory_limit_MB")
    elif memory_limit_mb > 0:
        memory = memory_limit_mb
    if compile_timeout is None:  # no compile stage
        return Limits(timeout, memory, tuple(clamped))
    if compile_timeout > policy.timeout_s or compile_timeout <= 0:  # a compile is no longer than a step
        compile_timeout = policy.timeout_s
        clamped.append("compile_timeout")
    return Limits(timeout, memory, tuple(clamped), compile_timeout)


def check_files(files: dict[str, str | None], fetch: list[str]) -> None:
    """422 for paths outside the working directory and for content that is not base64."""
    if len(files) > MAX_FILES or len(fetch) > MAX_FILES:
        raise InvalidRequestError(f"at most {MAX_FILES} files and {MAX_FILES} fetch_files")
    for path in [*files, *fetch]:
        norm = posixpath.normpath(path) if path else ""
        if not path or path.startswith("/") or norm == ".." or norm.startswith("../") or "\0" in path:
            raise InvalidRequestError(f"file path {path[:200]!r}: give a path relative to the working "
                                      "directory, inside it")
    for path, content in files.items():
        if content is None:
            continue
        try:
            base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequestError(f"files[{path[:200]!r}]: not base64") from None


def unsupported_language(language: str, reason: str | None = None) -> RunCodeResponse:
    """SandboxFusion's own reply for a run the sandbox cannot do: `SandboxError`, with the reason
    (for a known language whose toolchain is missing: how to add it)."""
    return RunCodeResponse(
        status=RunStatus.SANDBOX_ERROR,
        message=reason or (f"language {language!r} is not available on this server: sandbox-env runs "
                           f"{', '.join(SUPPORTED_LANGUAGES)} only (no {language} toolchain in its sandboxes)"),
        sandbox_env=Extras(outcome="unsupported_language"))


def sandbox_error(exc: KernelError, policy: Policy, limits: Limits) -> RunCodeResponse:
    retryable = exc.retryable and not isinstance(exc, KernelUnavailableError)
    return RunCodeResponse(status=RunStatus.SANDBOX_ERROR, message=f"sandbox-env: the sandbox failed: {exc.message}",
                           sandbox_env=Extras(outcome="sandbox_error", retryable=retryable, policy=policy.name,
                                              run_timeout_s=limits.run_timeout_s, memory_limit_mb=limits.memory_mb or policy.memory_mb,
                                              clamped=list(limits.clamped)))


def job_input(code: str, stdin: str | None, files: dict[str, str | None], fetch: list[str],
              memory_mb: int | None, mark: str, language: dict[str, Any] | None = None, *,
              run_timeout_s: float = 0.0, keep: int = 0) -> bytes:
    """The program's stdin: its job (length-prefixed JSON), then the request's stdin."""
    job = json.dumps({"code": code, "files": {k: v for k, v in files.items() if v is not None},
                      "fetch": fetch, "memory_mb": memory_mb or 0, "mark": mark, "language": language,
                      "run_timeout_s": run_timeout_s, "keep": keep}).encode()
    return b"%012d" % len(job) + job + (stdin or "").encode("utf-8", "surrogatepass")


async def run(kernel: Kernel, code: str, *, stdin: str | None, files: dict[str, str | None],
              fetch: list[str], limits: Limits, language: str = languages.DEFAULT) -> RunCodeResponse:
    """Run `code` as SandboxFusion runs it: Python as `python <file>.py`, the files beside it;
    another language in stages (compile, run), each with its own limit, inside one program whose
    own limit (the kernel's) is their sum plus a margin: the stages' limits are the exact ones.
    `limits.compile_timeout_s`: from `limits_for` with the request's compile_timeout."""
    mark = f"--sandbox-env-fetched-files-{secrets.token_hex(16)}--"
    lang = languages.get(language)
    timeout, job = limits.run_timeout_s, None
    if lang.name != languages.DEFAULT:
        job = lang.job(limits.compile_timeout_s)
        timeout += (limits.compile_timeout_s if lang.compiled else 0.0) + STAGES_MARGIN_S
    try:
        result = await kernel.run_program(source("run_code"), timeout_s=timeout, stdin=job_input(
            code, stdin, files, fetch, limits.memory_mb, mark, job, run_timeout_s=limits.run_timeout_s,
            keep=kernel.policy.output_bytes))
    except KernelError as exc:
        return sandbox_error(exc, kernel.policy, limits)
    return to_response(result, kernel.policy, limits, mark if fetch or job else None, lang)


def clip(text: str, keep: int) -> tuple[str, bool]:
    """`text` cut to `keep` bytes (head and tail, as a step's output is), and whether it was."""
    if len(text) * 4 <= keep:
        return text, False
    buffer = BoundedOutput(keep)
    buffer.write(text)
    return buffer.getvalue(), buffer.truncated


def split_trailer(stderr: str, mark: str) -> tuple[str, dict[str, str], dict[str, Any] | None]:
    """stderr without the program's trailer; the fetched files and the stages' reports (None:
    no trailer, or one run without stages). The last trailer counts."""
    head, found, tail = stderr.rpartition("\n" + mark + "\n")
    if not found:
        return stderr, {}, None
    try:
        data = json.loads(tail)
    except ValueError:
        return stderr, {}, None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return stderr, {}, None
    stages = data.get("stages") if isinstance(data.get("stages"), dict) else None
    return head, {str(k): str(v) for k, v in data["files"].items()}, stages


def stage_result(report: dict[str, Any], policy: Policy) -> CommandRunResult:
    """A stage's report (from inside the sandbox) as SandboxFusion's `CommandRunResult`."""
    code = report.get("return_code")
    if isinstance(code, int) and code < 0:
        code = 128 - code  # killed by a signal: as a shell says it
    return CommandRunResult(status=CommandRunStatus(report.get("status", "Error")), return_code=code,
                            execution_time=report.get("execution_time"),
                            stdout=clip(str(report.get("stdout", "")), policy.output_bytes)[0] if "stdout" in report else None,
                            stderr=clip(str(report.get("stderr", "")), policy.output_bytes)[0] if "stderr" in report else None)


def to_response(result: ExecutionResult, policy: Policy, limits: Limits, mark: str | None,
                lang: languages.Language | None = None) -> RunCodeResponse:
    """Our outcome in SandboxFusion's terms. A timeout is `TimeLimitExceeded` (no return code);
    everything else the code did is `Finished` with its exit status (memory limit, a signal, the
    output limit: 128 + signal), and `Failed` unless that is 0. A compiled language's compile
    stage comes first: when it times out or exits non-zero, the reply is `Failed` with no run."""
    stderr, files, stages = split_trailer(result.stderr, mark) if mark else (result.stderr, {}, None)
    stdout, out_cut = clip(result.stdout, policy.output_bytes)
    stderr, err_cut = clip(stderr, policy.output_bytes)
    status = result.status
    compiled: CommandRunResult | None = None
    if lang is not None and lang.compiled:  # no stages: the program was stopped while it ran
        compiled = stage_result(stages["compile"], policy) if stages and "compile" in stages else \
            CommandRunResult(status=CommandRunStatus.FINISHED, return_code=0)
    ran = (stages or {}).get("run")
    extras = Extras(outcome=status.value, exit_code=result.exit_code, wall_time_s=result.wall_time_s,
                    cpu_time_s=result.cpu_time_s, peak_memory_mb=result.peak_memory_mb,
                    stdout_truncated=result.stdout_truncated or out_cut,
                    stderr_truncated=result.stderr_truncated or err_cut, policy=policy.name,
                    run_timeout_s=limits.run_timeout_s, memory_limit_mb=limits.memory_mb or policy.memory_mb,
                    clamped=list(limits.clamped), language=lang.name if lang else languages.DEFAULT,
                    compile_timeout_s=limits.compile_timeout_s if compiled else None)
    if compiled is not None and (compiled.status is not CommandRunStatus.FINISHED or compiled.return_code != 0):
        extras.outcome = "compile_error"
        return RunCodeResponse(status=RunStatus.FAILED, compile_result=compiled, files=files, sandbox_env=extras)
    if status is ExecStatus.TIMEOUT or (ran and ran.get("status") == CommandRunStatus.TIME_LIMIT_EXCEEDED.value):
        extras.outcome = ExecStatus.TIMEOUT.value
        run = CommandRunResult(status=CommandRunStatus.TIME_LIMIT_EXCEEDED,
                               execution_time=ran.get("execution_time") if ran else result.wall_time_s,
                               stdout=stdout, stderr=stderr)
        overall = RunStatus.FAILED
    else:
        code = result.exit_code
        if status is not ExecStatus.OK and code == 0:
            code = KILLED_CODE  # stopped by us as it ended: not a clean exit
        run = CommandRunResult(status=CommandRunStatus.FINISHED,
                               execution_time=ran.get("execution_time") if ran else result.wall_time_s,
                               return_code=code, stdout=stdout, stderr=stderr)
        overall = RunStatus.SUCCESS if code == 0 else RunStatus.FAILED
    return RunCodeResponse(status=overall, compile_result=compiled, run_result=run, files=files, sandbox_env=extras)
