"""The embedded default backend: one local ipykernel per episode, driven through jupyter_client.

Isolation (`kernels/jupyter/sandbox.py`, docs/jupyter-isolation.md): each kernel, and each program it runs,
lives in a bubblewrap sandbox of its own (private mount, pid, ipc, uts, network and cgroup
namespaces, a read-only system, its own bounded tmpfs workspace and /tmp), as a uid of its own
with no capability, under no_new_privs and a seccomp filter. Confinement (`limits.py`): own
cgroups (memory+swap, pids, CPU quota) or rlimits, an environment built from scratch. The
wall-time limit is enforced from outside: an interrupt first, then SIGKILL of every process in the
kernel's cgroup and a fresh kernel (with a fresh workspace). Without bwrap the backend refuses to
start unless `jupyter_unisolated` says the code is trusted; the kernel then runs as the server's
user on the server's filesystem, as a plain subprocess.

Here: the kernel's lifecycle (start, restart, close) and its requests. The kernel process, its
relay and connection: `process.py`; a step's messages and verdict: `steps.py`; `run_program`'s
process: `programs.py`; the folders on the host: `workdirs.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from jupyter_client.manager import AsyncKernelManager

from sandbox_env.errors import KernelError, KernelStartError
from sandbox_env.kernels.base import Kernel
from sandbox_env.kernels.jupyter import boxes, sandbox, workdirs
from sandbox_env.kernels.jupyter.config import JupyterConfig
from sandbox_env.kernels.jupyter.limits import MB, Confinement, Limits
from sandbox_env.kernels.jupyter.process import RELAY_TASKS, KernelProcess, connect, kernel_env, log_tail, spawn, unwatch, zmq_context
from sandbox_env.kernels.jupyter.programs import run_exec
from sandbox_env.kernels.jupyter.steps import final_exit_status, read_reply, read_step, verdict
from sandbox_env.kernels.jupyter.template import forked
from sandbox_env.kernels.output import KernelAnomaly, StepCollector, kernel_shim
from sandbox_env.models import ExecStatus, ExecutionResult
from sandbox_env.policy import Policy

logger = logging.getLogger(__name__)

# The policy's pids/open_files are what the code may use; ipykernel's own share comes on top
# (idle: 12 tasks, i.e. threads, and ~60 descriptors, mostly zmq; with less it cannot even start).
KERNEL_TASKS, KERNEL_FDS = 16, 96
KERNEL_ARGS = (
    "--HistoryManager.enabled=False",  # no sqlite writes (and no history thread) per step
    "--InteractiveShell.colors=NoColor",  # plain tracebacks
    "--InteractiveShell.xmode=Plain",  # Python-style, and fast on deep recursion (Context takes seconds)
    "--IPKernelApp.quiet=True",
)


class JupyterKernel(Kernel):
    """A local ipykernel in its own cgroups, session and working directory."""

    name = "jupyter"
    use_cgroups = True  # tests switch it off to exercise the rlimit-only fallback

    config_class = JupyterConfig
    config: JupyterConfig

    def __init__(self, policy: Policy, config: JupyterConfig | None = None) -> None:
        super().__init__(policy, config)
        self.id = uuid.uuid4().hex[:12]
        self.root: Path | None = None  # private: sockets, logs, start-up code (and unisolated: TMPDIR, workdir)
        self.workdir: Path | None = None  # the kernel's HOME and cwd (in the sandbox: a path only there)
        self._runtime: sandbox.Runtime | None = None
        self._layout: sandbox.Layout | None = None  # None: unisolated
        self._lease: sandbox.UidLease | None = None
        self._cur: KernelProcess | None = None
        self._generation = 0
        self._lock = asyncio.Lock()
        self._restart: asyncio.Task[None] | None = None
        self._teardowns: set[asyncio.Task[None]] = set()
        self._note = ""  # told to the next step (the kernel died between steps)
        self._started = self._closed = False
        self._relaunch = False  # run_program stopped the kernel: the next step starts a fresh one
        self._program_running = False
        self._spare: boxes.Spare | None = None  # forked programs: the next one's sandbox, built ahead

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._closed:
            raise KernelError("kernel is closed")
        if self._started:
            return
        self._started = True
        try:
            if self.config.unisolated:
                _warn_unisolated()
            else:  # KernelStartError saying how to get isolation, when this machine has none
                self._runtime = await asyncio.to_thread(sandbox.runtime, self.config)
            if self.config.workdir_root:
                os.makedirs(self.config.workdir_root, exist_ok=True)
            if str(self.config.workdir_root or tempfile.gettempdir()) not in workdirs.swept_roots:
                await asyncio.to_thread(workdirs.sweep_workdirs, self.config.workdir_root)
            root = Path(tempfile.mkdtemp(prefix=f"sandbox-env-{os.getpid()}-", dir=self.config.workdir_root))
            self.root, self.workdir = root, root / "work"
            if self._runtime is not None:
                self._lease = sandbox.UidLease.take() if self._runtime.setpriv else None
                uid, gid = (self._lease.uid,) * 2 if self._lease else (os.geteuid(), os.getegid())
                self._layout = sandbox.Layout(root, uid, gid, workspace_mb=self.policy.workspace_mb,
                                              tmp_mb=self.policy.tmp_mb, network=self.policy.network)
                sandbox.prepare(self._layout)
            await self._launch()
        except BaseException:
            await self.close()
            raise

    async def _launch(self) -> None:
        """Start a kernel process: the first one, or a replacement with an empty namespace."""
        assert self.root is not None and self.workdir is not None
        if self._spare is not None:  # no program's box outlives the start of a kernel (boxes.py)
            await self._spare.discard()
        self._generation += 1
        gen, box = self._generation, self._layout
        if box is None:
            for sub in ("work", "tmp", "run"):  # again on restarts: the code may have deleted them
                workdirs.fresh_dir(self.root / sub)
            run = self.root / "run"
        else:
            run = sandbox.run_dir(box, gen)
        limits = dataclasses.replace(Limits.from_policy(self.policy), pids=self.policy.pids + KERNEL_TASKS + RELAY_TASKS,
                                     open_files=self.policy.open_files + KERNEL_FDS)
        conf = Confinement(f"{self.id}-{gen}", limits, token=f"{self.id}-{gen}", use_cgroups=self.use_cgroups,
                           uid=None if box is None else box.uid)
        conf.create()
        km = AsyncKernelManager(transport="ipc", ip=str(run / (f"k{gen}" if box is None else "s")),
                                connection_file=str(run / f"kernel-{gen}.json"), context=zmq_context())
        shim = self._startup_file()
        command = [sys.executable, "-s", "-m", "ipykernel_launcher", "-f", "{connection_file}", *KERNEL_ARGS,
                   f"--IPKernelApp.exec_lines=exec(open({str(shim)!r}).read())"]
        env = kernel_env(self.root, self.workdir, conf.token, isolated=box is not None)
        self._cur = cur = KernelProcess(km, conf, sandboxed=box is not None, generation=gen)
        t0 = time.perf_counter()
        try:
            front = await spawn(cur, command, env, root=self.root, workdir=self.workdir, runtime=self._runtime, box=box, run=run)
            await connect(cur, front, run=run, box=box)
        except Exception as exc:
            tail = log_tail(self.root / "kernel.log")
            await self._teardown()
            raise KernelStartError(f"ipykernel failed to start: {exc!r}; its log ends with: {tail!r}") from exc
        logger.info("kernel %s-%d ready in %.0f ms (pid %s, limits: %s, %s)", self.id, gen,
                    (time.perf_counter() - t0) * 1000, cur.proc.pid, conf.mechanism,
                    "unisolated" if self._runtime is None else self._runtime.describe())

    def _startup_file(self) -> Path:
        """The kernel's start-up code: read-only for the kernel (root's file on a read-only bind)."""
        assert self.root is not None
        shim = (self.root / "ro" if self._layout is not None else self.root) / "startup.py"
        if not shim.exists():
            shim.write_text(kernel_shim(self.policy.output_limit_bytes))
            shim.chmod(0o644)
        return shim

    async def _teardown(self) -> None:
        """Kill every process of the current kernel; release its sockets, cgroups and files.

        Shielded: a cancelled caller (e.g. close() cancelling a restart) must not leave a half-
        destroyed kernel behind; close() waits for every teardown still running.
        """
        cur, self._cur = self._cur, None
        if cur is None:
            return
        task = asyncio.create_task(self._destroy(cur))
        self._teardowns.add(task)
        task.add_done_callback(self._teardowns.discard)
        await asyncio.shield(task)

    async def _destroy(self, cur: KernelProcess) -> None:
        if cur.kc is not None:
            unwatch(cur.kc)
            cur.kc.stop_channels()
        await asyncio.to_thread(cur.conf.kill_all)
        if cur.proc is not None:
            with contextlib.suppress(OSError):
                cur.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(cur.proc.wait, 5)  # reap it before removing its cgroups
        if cur.holder is not None:
            with contextlib.suppress(OSError):
                cur.holder.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(cur.holder.wait, 5)
        if cur.relay is not None:
            with contextlib.suppress(OSError):
                cur.relay.kill()
            with contextlib.suppress(OSError):
                cur.relay.stdin.close()  # type: ignore[union-attr]
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(cur.relay.wait, 5)
            if self.root is not None:
                await asyncio.to_thread(workdirs.remove_dir, self.root / f"r{cur.generation}")
        await asyncio.to_thread(cur.conf.destroy)
        try:
            await cur.km.cleanup_resources()
        except Exception as exc:  # noqa: BLE001 - leftover socket files go with the root dir
            logger.debug("kernel %s cleanup: %s", self.id, exc)
        if self._layout is not None:  # this process's own folder: nothing of it runs any more
            await asyncio.to_thread(workdirs.remove_dir, Path(cur.km.connection_file).parent)

    def _schedule_restart(self) -> None:
        """Replace the kernel in the background, so the step that lost it returns at once."""
        async def restart() -> None:
            await self._teardown()
            if not self._closed:
                await self._launch()

        self._restart = asyncio.create_task(restart(), name=f"restart-kernel-{self.id}")

    async def _settled(self) -> None:
        """Open, with no restart pending."""
        if self._closed or not self._started:
            raise KernelError("kernel is closed" if self._closed else "kernel not started")
        if self._restart is not None:
            task, self._restart = self._restart, None
            await task

    async def _ready(self) -> KernelProcess:
        """The live kernel; waits for a pending restart and replaces a kernel that died idle."""
        await self._settled()
        if self._cur is None and self._relaunch:
            self._relaunch = False
            await self._launch()
        if self._cur is None or self._cur.exit_status() is not None or self._cur.relay_status() is not None:
            logger.warning("kernel %s died between steps; restarting", self.id)
            self._note = "[sandbox-env] the interpreter died after the previous step; its state is lost.\n"
            await self._teardown()
            await self._launch()
        assert self._cur is not None
        return self._cur

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.root is not None:
            # Synchronously, before the first await: the episode's files disappear from their path
            # at once, even when the caller does not wait for close() (a reset closes in the
            # background). Running processes keep their cwd; everything is deleted below.
            with contextlib.suppress(OSError):
                closing = self.root.with_name(self.root.name + ".closing")
                self.root.rename(closing)
                self.root, self.workdir = closing, closing / "work"
        try:
            if self._restart is not None:
                self._restart.cancel()
                with contextlib.suppress(BaseException):
                    await self._restart
            await self._teardown()
            if self._spare is not None:
                await self._spare.close()
            if self._teardowns:
                await asyncio.gather(*self._teardowns, return_exceptions=True)
        finally:
            if self.root is not None:
                await asyncio.to_thread(workdirs.remove_dir, self.root)
            self._free_lease()

    def _free_lease(self) -> None:
        """The uid goes back once closed and no process can be left running as it."""
        if self._lease is None or not self._closed or self._program_running:
            return
        lease, self._lease = self._lease, None
        pending = [t for t in self._teardowns if not t.done()]
        if pending:
            asyncio.gather(*pending, return_exceptions=True).add_done_callback(lambda _: lease.release())
        else:
            lease.release()

    def is_alive(self) -> bool:
        if self._closed or not self._started:
            return False
        return self._restart is not None or self._relaunch or (
            self._cur is not None and self._cur.exit_status() is None and self._cur.relay_status() is None)

    # -- execution -------------------------------------------------------------------------------

    async def execute(self, code: str, *, timeout_s: float | None = None) -> ExecutionResult:
        async with self._lock:
            cur = await self._ready()
            try:
                return await self._run(cur, code, timeout_s or self.policy.timeout_s)
            except asyncio.CancelledError:
                # The caller went away mid-step: do not let the code run on into the next step.
                if not self._closed and self._restart is None and self._cur is cur:
                    self._schedule_restart()
                raise

    async def _run(self, cur: KernelProcess, code: str, limit: float) -> ExecutionResult:
        loop = asyncio.get_running_loop()
        kc, conf = cur.kc, cur.conf
        assert kc is not None
        step = StepCollector(self.policy.output_bytes, self.policy.output_limit_bytes, live=self.live)
        if self._note:
            step.out.write("stderr", self._note)
            self._note = ""
        cpu0, oom0 = conf.cpu_time_s(), conf.oom_kills()
        conf.reset_peak()
        t0 = time.perf_counter()
        deadline = loop.time() + limit
        msg_id = kc.execute(code, silent=False, store_history=True, allow_stdin=False, stop_on_error=True)
        status = await read_step(cur, step, msg_id, deadline, self.policy.interrupt_grace_s, lambda: self._cur is cur)
        wall = time.perf_counter() - t0
        exit_status = await final_exit_status(cur, step) if self._cur is cur else cur.exit_status()
        reply = None
        if exit_status is None and step.idle and step.anomaly is None:
            try:
                reply = await read_reply(kc, msg_id, end=loop.time() + 1.0)
                if reply is None and status is None:  # an interrupt can cost the reply, nothing else
                    step.anomaly = "idle without a reply"
            except KernelAnomaly as exc:
                step.anomaly = str(exc)
        lost = exit_status is not None or not step.idle or step.anomaly is not None
        status, code = verdict(step, status, reply, exit_status, conf, oom0, lost=lost, replaced=self._cur is not cur,
                               kernel_id=self.id)
        if status is ExecStatus.TIMEOUT:
            step.out.write("stderr", f"[sandbox-env] step timed out after {limit:g} s.\n")
        elif status is ExecStatus.OUTPUT_LIMIT:
            step.out.write("stderr", f"[sandbox-env] step stopped: output exceeded "
                           f"{self.policy.output_limit_bytes} bytes.\n")
        cpu1, peak = conf.cpu_time_s(), conf.peak_memory_bytes()
        # a lost kernel is replaced: its successor's namespace is empty
        self.snapshot = {"variables": [], "total": 0, "truncated": False} if lost else step.snapshot
        if lost:
            await asyncio.to_thread(conf.kill_all)  # now, not later: nothing of it keeps running
            if not self._closed and self._cur is cur:
                self._schedule_restart()
        return step.result(status=status, wall=wall, exit_code=code,
                           cpu=None if cpu0 is None or cpu1 is None else max(0.0, cpu1 - cpu0),
                           peak_mb=None if peak is None else peak / MB)

    async def run_program(self, source: str, *, stdin: bytes = b"", timeout_s: float) -> ExecutionResult:
        """`python3 -I -c source` as the only process of a confinement and sandbox of its own (a
        fresh workspace and /tmp; unisolated: the working directory and TMPDIR emptied before and
        after); the kernel's whole tree is killed first. Forked from the program template into a
        sandbox built ahead where kernels are forked (`boxes.py`). The kernel itself is started
        again lazily, by the next step."""
        async with self._lock:
            await self._settled()  # no kernel is started just to be killed: the next step starts one
            assert self.root is not None and self.workdir is not None
            self._program_running = True
            try:
                if self._forks_programs():
                    assert self._spare is not None
                    with contextlib.suppress(boxes.Unforkable):
                        return await boxes.run(self._spare, self._stop_kernel, source, stdin, timeout_s,
                                               keep=self.policy.output_bytes, limit=self.policy.output_limit_bytes)
                return await self._run_exec(source, stdin, timeout_s)
            finally:
                self._program_running = False
                self._free_lease()

    def _forks_programs(self) -> bool:
        box = self._layout
        if box is None or not forked(Confinement("probe", Limits(), use_cgroups=self.use_cgroups), box):
            return False
        if self._spare is None:
            self._spare = boxes.Spare(self._new_box, self._teardowns)
        return True

    def _program_confinement(self) -> tuple[Confinement, dict[str, str]]:
        """A new confinement for one program, and the program's environment."""
        assert self.root is not None and self.workdir is not None
        self._generation += 1
        name = f"{self.id}-p{self._generation}"
        conf = Confinement(name, Limits.from_policy(self.policy), token=name, use_cgroups=self.use_cgroups,
                           uid=None if self._layout is None else self._layout.uid)
        return conf, kernel_env(self.root, self.workdir, conf.token, isolated=self._layout is not None)

    async def _new_box(self, ready: asyncio.Event | None) -> boxes.Box:
        assert self._runtime is not None and self._layout is not None and self.workdir is not None
        return await boxes.build(*self._program_confinement(), self._runtime, self._layout, self.workdir, ready)

    async def _stop_kernel(self) -> None:
        # First: a run cancelled during the teardown still leaves a fresh kernel to the next step
        # (not the note of a kernel that died between steps).
        self._relaunch = True
        await self._teardown()  # every process of the kernel's cgroup/session, daemons included

    async def _run_exec(self, source: str, stdin: bytes, timeout_s: float) -> ExecutionResult:
        assert self.root is not None and self.workdir is not None
        await self._stop_kernel()
        conf, env = self._program_confinement()
        return await run_exec(conf, [sys.executable, "-I", "-c", source], env, stdin, timeout_s, root=self.root,
                              workdir=self.workdir, runtime=self._runtime, box=self._layout,
                              keep=self.policy.output_bytes, limit=self.policy.output_limit_bytes)

    async def usage(self) -> dict[str, Any]:
        """The confinement's memory charge and CPU time: file reads, no request to the kernel."""
        cur = self._cur
        if cur is None:
            return {"memory_mb": None, "cpu_time_s": None}
        memory = cur.conf.memory_bytes()
        return {"memory_mb": None if memory is None else round(memory / MB, 1), "cpu_time_s": cur.conf.cpu_time_s()}

    async def inspect(self) -> dict[str, Any]:
        """The last step's snapshot of the namespace and resource use now: nothing is sent to the
        kernel and nothing waits for a running step (the snapshot came with the step's messages)."""
        cur = self._cur
        return {**await super().inspect(), "pid": cur.proc.pid if cur is not None and cur.proc else None,
                "limits": None if cur is None else cur.conf.mechanism}

    async def memory_bytes(self) -> int | None:
        """The confinement's charge: its cgroup's, else the kernel's RSS (a file read)."""
        cur = self._cur
        return None if cur is None else cur.conf.memory_bytes()


_warned_unisolated = False


def _warn_unisolated() -> None:
    global _warned_unisolated
    if not _warned_unisolated:
        _warned_unisolated = True
        logger.warning("jupyter kernels run WITHOUT isolation (jupyter_unisolated): trusted code only")
