"""`run_program`'s process: one program run to its end in a confinement (and sandbox) of its own,
its verdict read from its exit status and the confinement's counters. Started by bwrap here
(`run_sandboxed`), or forked into a sandbox built ahead (`boxes.py`)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sandbox_env.kernels.jupyter import sandbox, workdirs
from sandbox_env.kernels.jupyter.limits import Confinement
from sandbox_env.kernels.jupyter.process import SIGNAL_MAX
from sandbox_env.kernels.programs import Running, run_to_end
from sandbox_env.models import ExecStatus, ExecutionResult


async def run_confined(conf: Confinement, command: list[str], stdin: bytes, timeout_s: float, *, cwd: Path,
                       env: dict[str, str], keep: int, limit: int, pass_fds: tuple[int, ...] = (),
                       exit_by_signal: bool = False) -> ExecutionResult:
    """Run one confined program; stdout is kept whole up to `limit` (a verdict must not be cut).
    `exit_by_signal`: a launcher in between (bwrap) reports death by signal N as exit 128+N."""
    async def launch() -> Running:
        proc = await asyncio.create_subprocess_exec(
            *command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(cwd),
            env=env, preexec_fn=conf.preexec, pass_fds=pass_fds)
        conf.attach(proc.pid)
        return proc

    return await run_watched(conf, launch, stdin, timeout_s, keep=keep, limit=limit, exit_by_signal=exit_by_signal)


async def run_watched(conf: Confinement, launch: Callable[[], Awaitable[Running]], stdin: bytes, timeout_s: float, *,
                      keep: int, limit: int, exit_by_signal: bool) -> ExecutionResult:
    """The program `launch` starts in `conf`, run to its end; its verdict from its exit status and
    the confinement's counters."""
    cpu0, oom0 = conf.cpu_time_s(), conf.oom_kills()
    started = time.perf_counter()
    proc = await launch()
    tells = getattr(proc, "exited", None)  # a forked program's status comes on a pipe: no polling
    exited = tells() if tells is not None else None
    end = await run_to_end(proc, stdin, keep_stdout=limit, keep_stderr=keep, limit=limit, timeout_s=timeout_s,
                           stop=lambda: asyncio.to_thread(conf.kill_all), exited=exited)
    code, status = end.code, end.status
    if exit_by_signal and 128 < code <= 128 + SIGNAL_MAX:
        code = 128 - code
    if status is None:
        oom = code < 0 and (conf.oom_kills() or 0) > (oom0 or 0)
        status = (ExecStatus.OK if code == 0 else ExecStatus.OOM if oom else
                  ExecStatus.KILLED if code < 0 else ExecStatus.ERROR)
    cpu1 = conf.cpu_time_s()
    return ExecutionResult(status=status, exit_code=128 - code if code < 0 else code,
                           stdout=end.out.getvalue(), stderr=end.err.getvalue(),
                           stdout_truncated=end.out.truncated, stderr_truncated=end.err.truncated,
                           wall_time_s=time.perf_counter() - started,
                           cpu_time_s=None if cpu0 is None or cpu1 is None else max(0.0, cpu1 - cpu0))


async def run_sandboxed(conf: Confinement, command: list[str], env: dict[str, str], stdin: bytes, timeout_s: float, *,
                        workdir: Path, runtime: sandbox.Runtime | None, box: sandbox.Layout | None, keep: int,
                        limit: int) -> ExecutionResult:
    """`run_confined`, in the sandbox `box` (through bwrap) when there is one, else in `workdir`."""
    with contextlib.ExitStack() as stack:
        launch: dict[str, Any] = {"cwd": workdir, "env": env}
        if box is not None:
            assert runtime is not None
            fd = stack.enter_context(sandbox.seccomp_fd())
            command = sandbox.sandbox_argv(runtime, box, command, env=env, seccomp=fd)
            launch = {"cwd": Path("/"), "env": {"PATH": "/usr/bin:/bin"}, "pass_fds": (fd,),
                      "exit_by_signal": True}
        return await run_confined(conf, command, stdin, timeout_s, **launch, keep=keep, limit=limit)


async def run_exec(conf: Confinement, command: list[str], env: dict[str, str], stdin: bytes, timeout_s: float, *,
                   root: Path, workdir: Path, runtime: sandbox.Runtime | None, box: sandbox.Layout | None, keep: int,
                   limit: int) -> ExecutionResult:
    """`run_sandboxed` in `conf`, created here and destroyed after (unisolated: the working
    directory and TMPDIR emptied before and after)."""
    if box is None:
        await asyncio.to_thread(workdirs.empty_dirs, workdir, root / "tmp")
    conf.create()
    try:
        return await run_sandboxed(conf, command, env, stdin, timeout_s, workdir=workdir, runtime=runtime, box=box,
                                   keep=keep, limit=limit)
    finally:
        await asyncio.to_thread(conf.kill_all)
        await asyncio.to_thread(conf.destroy)
        if box is None:
            await asyncio.to_thread(workdirs.empty_dirs, workdir, root / "tmp")
