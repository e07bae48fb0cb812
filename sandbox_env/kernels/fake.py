"""The `fake` backend: an in-memory stand-in for tests. **IT IS NOT A SANDBOX.**

What httpx's MockTransport is to a real network: `FakeKernel` runs each step's code in THIS
process, in a worker thread, with a namespace per kernel, so the episode, the manager, the pool,
the grading path and your own code built on them can be tested in milliseconds with no Jupyter,
no Docker and no server. The code it runs has every right your process has (files, network,
environment, `os._exit`): give it only code you would run yourself. Threads and processes the
code starts are its own business: their output reaches your process's streams, and nothing stops
them.

What it emulates: stdout/stderr captured per step (the streams are routed per thread), the last
expression's value shown, exceptions with type, message and traceback, `SystemExit` statuses,
`input()` failing fast, output bounded and stopped at the policy's limit, a wall-time limit for
code that runs Python bytecode (an async exception, then the step is abandoned and the namespace
dropped after `interrupt_grace_s`), and `run_program` as a real `python3 -I` subprocess in an empty
temporary directory, so grading goes through the same trusted grader as on the real backends.
What it cannot do is declared in `capabilities` (empty: no memory or process limits, no killing
code blocked in C, nothing at the file-descriptor level); `sandbox_env.testing` skips exactly
those checks for it, and `sandbox-env serve` refuses it unless given `--allow-unisolated`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import linecache
import logging
import os
import signal
import sys
import tempfile
import time
from typing import Any, ClassVar

from sandbox_env.errors import KernelDiedError, KernelError
from sandbox_env.inside import snapshot
from sandbox_env.kernels.base import Kernel, KernelConfig
from sandbox_env.kernels.fake_step import Step, install_routers
from sandbox_env.kernels.inspection import parse_snapshot
from sandbox_env.kernels.programs import run_to_end
from sandbox_env.models import ExecStatus, ExecutionResult
from sandbox_env.policy import Policy

log = logging.getLogger(__name__)
_IDS = itertools.count(1)
_PROGRAM_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
POLL_S = 0.05  # how often an interrupt is raised again while the code has not stopped


class FakeKernel(Kernel):
    """In-process, unisolated stand-in for a kernel: for tests only, never for untrusted code.

    `crash()` simulates the interpreter dying from outside (the next step raises `KernelDiedError`),
    for testing what is built on top.
    """

    name = "fake"
    capabilities: ClassVar[frozenset[str]] = frozenset()  # not a sandbox: see the module docstring

    def __init__(self, policy: Policy, config: KernelConfig | None = None) -> None:
        super().__init__(policy, config)  # nothing to configure: the base's empty KernelConfig
        self.id = next(_IDS)
        self.namespace: dict[str, Any] = {}
        self._cells = itertools.count(1)
        self._filenames: list[str] = []
        self._lock = asyncio.Lock()
        self._started = self._closed = self._crashed = False
        self._running: tuple[Step, asyncio.Future[None]] | None = None
        self.cpu_time_s = 0.0

    @classmethod
    async def setup_backend(cls) -> dict[str, Any]:
        log.warning("the fake backend runs code in this process, unisolated: tests and trusted code only")
        return {"isolated": False}

    async def start(self) -> None:
        if self._closed:
            raise KernelError("kernel is closed")
        if not self._started:
            self._started = True
            self._fresh_namespace()

    def is_alive(self) -> bool:
        return self._started and not self._closed and not self._crashed

    def crash(self) -> None:
        """Simulate the interpreter dying from outside: `is_alive()` turns False, steps raise."""
        self._crashed = True

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._running is not None:  # a step in flight ends with the kernel, as on a real backend
            step, done = self._running
            step.capture.active = False
            step.interrupt()
            if not done.done():
                done.set_exception(KernelDiedError("the kernel was closed during the step"))
        self._forget_cells()
        self.namespace = {}

    async def execute(self, code: str, *, timeout_s: float | None = None) -> ExecutionResult:
        limit = self.policy.timeout_s if timeout_s is None else timeout_s
        async with self._lock:
            self._check_usable()
            install_routers()
            loop = asyncio.get_running_loop()
            done: asyncio.Future[None] = loop.create_future()
            filename = f"<fake-kernel-{self.id}-cell-{next(self._cells)}>"
            self._filenames.append(filename)
            step = Step(code, self.namespace, self.policy, filename, lambda: _resolve(loop, done))
            self._running = (step, done)
            started = time.perf_counter()
            step.start()
            try:
                timed_out = not await self._finished(done, limit)
                if timed_out and not await self._stop(step, done):
                    self._abandon(step)
            except asyncio.CancelledError:  # nobody waits for the step: stop it, leave nothing half-run
                step.interrupt()
                self._abandon(step, quiet=True)
                raise
            finally:
                self._running = None
            self.cpu_time_s += step.cpu_s
            result = step.outcome(timed_out=timed_out, wall_s=time.perf_counter() - started)
            self.snapshot = parse_snapshot(snapshot.encoded(self.namespace))  # as the real backends list it
            return result

    async def _finished(self, done: asyncio.Future[None], limit: float) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(done), limit)
        except TimeoutError:
            return False
        return True

    async def _stop(self, step: Step, done: asyncio.Future[None]) -> bool:
        """Interrupt the code, again every POLL_S (it may catch one), until the grace runs out."""
        deadline = time.monotonic() + self.policy.interrupt_grace_s
        while time.monotonic() < deadline:
            step.interrupt()
            if await self._finished(done, POLL_S):
                return True
        return False

    def _abandon(self, step: Step, *, quiet: bool = False) -> None:
        """The code is stuck where an interrupt does not reach (C, a sleep): leave its thread to
        end by itself, as a real backend would kill the interpreter, and start on a fresh namespace."""
        step.capture.active = False
        self._fresh_namespace()
        if quiet or step.finished:
            return
        log.warning("fake kernel %s: a step did not stop within %.1f s of its limit; its thread is left "
                    "running in the background", self.id, self.policy.interrupt_grace_s)

    async def run_program(self, source: str, *, stdin: bytes = b"", timeout_s: float) -> ExecutionResult:
        """`python3 -I -c source` as a subprocess (unconfined) in a fresh empty directory."""
        async with self._lock:
            self._check_usable()
            self._fresh_namespace()  # as on a real backend, the interpreter's namespace is lost
            with tempfile.TemporaryDirectory(prefix="sandbox-env-fake-") as workdir:
                env = {**_PROGRAM_ENV, "HOME": workdir, "TMPDIR": workdir}
                return await _run_program(source, stdin, timeout_s, workdir, env, self.policy)

    async def usage(self) -> dict[str, Any]:
        return {"memory_mb": None, "cpu_time_s": self.cpu_time_s}

    def _check_usable(self) -> None:
        if self._closed or not self._started:
            raise KernelDiedError("the kernel is closed" if self._closed else "the kernel was not started")
        if self._crashed:
            raise KernelDiedError("the fake kernel crashed (FakeKernel.crash())")

    def _fresh_namespace(self) -> None:
        self._forget_cells()
        self.namespace = {"__name__": "__main__", "__builtins__": __builtins__}

    def _forget_cells(self) -> None:
        for filename in self._filenames:
            linecache.cache.pop(filename, None)
        self._filenames.clear()


def _resolve(loop: asyncio.AbstractEventLoop, done: asyncio.Future[None]) -> None:
    """From the worker thread: wake the step's waiter (its loop may be gone: nobody waits then)."""
    def settle() -> None:
        if not done.done():
            done.set_result(None)

    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(settle)


async def _run_program(source: str, stdin: bytes, timeout_s: float, workdir: str, env: dict[str, str],
                       policy: Policy) -> ExecutionResult:
    """Run it in a session of its own (so its group can be killed); stdout is kept whole up to the
    output limit, as a verdict must not be cut."""
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-I", "-c", source, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=workdir, env=env, start_new_session=True)

    async def kill_group() -> None:  # and whatever it left in its group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    end = await run_to_end(proc, stdin, keep_stdout=policy.output_limit_bytes, keep_stderr=policy.output_bytes,
                           limit=policy.output_limit_bytes, timeout_s=timeout_s, stop=kill_group)
    code, status = end.code, end.status
    if status is None:
        status = ExecStatus.OK if code == 0 else ExecStatus.KILLED if code < 0 else ExecStatus.ERROR
    return ExecutionResult(status=status, exit_code=128 - code if code < 0 else code,
                           stdout=end.out.getvalue(), stderr=end.err.getvalue(), stdout_truncated=end.out.truncated,
                           stderr_truncated=end.err.truncated, wall_time_s=time.perf_counter() - started)
