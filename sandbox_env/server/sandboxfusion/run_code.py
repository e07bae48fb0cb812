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


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one run gets: the request's limits, never laxer than the policy's."""

    run_timeout_s: float
    memory_mb: int | None  # an address-space limit below the policy's memory; None: the policy's only
    clamped: tuple[str, ...]


def limits_for(policy: Policy, run_timeout: float, memory_limit_mb: int) -> Limits:
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
    return Limits(timeout, memory, tuple(clamped))


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


def unsupported_language(language: str) -> RunCodeResponse:
    """SandboxFusion's own reply for a run the sandbox cannot do: `SandboxError`, with the reason."""
    return RunCodeResponse(
        status=RunStatus.SANDBOX_ERROR,
        message=(f"language {language!r} is not available on this server: sandbox-env runs "
                 f"{', '.join(SUPPORTED_LANGUAGES)} only (no {language} toolchain in its sandboxes)"),
        sandbox_env=Extras(outcome="unsupported_language"))


def sandbox_error(exc: KernelError, policy: Policy, limits: Limits) -> RunCodeResponse:
    retryable = exc.retryable and not isinstance(exc, KernelUnavailableError)
    return RunCodeResponse(status=RunStatus.SANDBOX_ERROR, message=f"sandbox-env: the sandbox failed: {exc.message}",
                           sandbox_env=Extras(outcome="sandbox_error", retryable=retryable, policy=policy.name,
                                              run_timeout_s=limits.run_timeout_s, memory_limit_mb=limits.memory_mb or policy.memory_mb,
                                              clamped=list(limits.clamped)))


def job_input(code: str, stdin: str | None, files: dict[str, str | None], fetch: list[str],
              memory_mb: int | None, mark: str) -> bytes:
    """The program's stdin: its job (length-prefixed JSON), then the request's stdin."""
    job = json.dumps({"code": code, "files": {k: v for k, v in files.items() if v is not None},
                      "fetch": fetch, "memory_mb": memory_mb or 0, "mark": mark}).encode()
    return b"%012d" % len(job) + job + (stdin or "").encode("utf-8", "surrogatepass")


async def run_python(kernel: Kernel, code: str, *, stdin: str | None, files: dict[str, str | None],
                     fetch: list[str], limits: Limits) -> RunCodeResponse:
    """Run `code` as SandboxFusion runs Python (`python <file>.py`, the files beside it)."""
    mark = f"--sandbox-env-fetched-files-{secrets.token_hex(16)}--"
    try:
        result = await kernel.run_program(source("run_code"), timeout_s=limits.run_timeout_s,
                                          stdin=job_input(code, stdin, files, fetch, limits.memory_mb, mark))
    except KernelError as exc:
        return sandbox_error(exc, kernel.policy, limits)
    return to_response(result, kernel.policy, limits, mark if fetch else None)


def clip(text: str, keep: int) -> tuple[str, bool]:
    """`text` cut to `keep` bytes (head and tail, as a step's output is), and whether it was."""
    if len(text) * 4 <= keep:
        return text, False
    buffer = BoundedOutput(keep)
    buffer.write(text)
    return buffer.getvalue(), buffer.truncated


def split_fetched(stderr: str, mark: str) -> tuple[str, dict[str, str]]:
    """stderr without the fetched files' trailer, and the files (the last trailer counts)."""
    head, found, tail = stderr.rpartition("\n" + mark + "\n")
    if not found:
        return stderr, {}
    try:
        files = json.loads(tail)
    except ValueError:
        return stderr, {}
    if not isinstance(files, dict):
        return stderr, {}
    return head, {str(k): str(v) for k, v in files.items()}


def to_response(result: ExecutionResult, policy: Policy, limits: Limits, mark: str | None) -> RunCodeResponse:
    """Our outcome in SandboxFusion's terms. A timeout is `TimeLimitExceeded` (no return code);
    everything else the code did is `Finished` with its exit status (memory limit, a signal, the
    output limit: 128 + signal), and `Failed` unless that is 0."""
    stderr, files = split_fetched(result.stderr, mark) if mark else (result.stderr, {})
    stdout, out_cut = clip(result.stdout, policy.output_bytes)
    stderr, err_cut = clip(stderr, policy.output_bytes)
    status = result.status
    if status is ExecStatus.TIMEOUT:
        run = CommandRunResult(status=CommandRunStatus.TIME_LIMIT_EXCEEDED, execution_time=result.wall_time_s,
                               stdout=stdout, stderr=stderr)
        overall = RunStatus.FAILED
    else:
        code = result.exit_code
        if status is not ExecStatus.OK and code == 0:
            code = KILLED_CODE  # stopped by us as it ended: not a clean exit
        run = CommandRunResult(status=CommandRunStatus.FINISHED, execution_time=result.wall_time_s,
                               return_code=code, stdout=stdout, stderr=stderr)
        overall = RunStatus.SUCCESS if code == 0 else RunStatus.FAILED
    extras = Extras(outcome=status.value, exit_code=result.exit_code, wall_time_s=result.wall_time_s,
                    cpu_time_s=result.cpu_time_s, peak_memory_mb=result.peak_memory_mb,
                    stdout_truncated=result.stdout_truncated or out_cut,
                    stderr_truncated=result.stderr_truncated or err_cut, policy=policy.name,
                    run_timeout_s=limits.run_timeout_s, memory_limit_mb=limits.memory_mb or policy.memory_mb,
                    clamped=list(limits.clamped))
    return RunCodeResponse(status=overall, run_result=run, files=files, sandbox_env=extras)
