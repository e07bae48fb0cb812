"""`run_program` where kernels are forked: a program's sandbox built before it is needed, with
the program's process waiting in it, forked from the program template.

A box is what bwrap built for one program and nothing else: its own confinement (cgroups), its
namespaces, a fresh workspace, /tmp and /dev/shm, held open by `sleep infinity` (`template.HOLD`),
exactly as a forked kernel's sandbox is. Into it the program template forks the program's
process, which joins the cgroups, drops every privilege as a forked kernel does and waits for its
source on a pipe: a run then costs a pipe write, not bwrap's start, cgroup moves and an
interpreter's start (about 100 ms here). A kernel that ran a program builds its next box in the
background (`Spare`). No box is used twice: its program's end destroys it. A box's program is
only forked while no process of the kernel runs (after `run_program` tore the kernel down: the
first run builds the holder meanwhile, the root one), and a box is thrown away before a kernel
starts again (`Spare.discard`): what the agent's code left behind never shares a moment, let
alone a sandbox, with a box a grader will run in.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import subprocess
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from sandbox_env.errors import KernelStartError
from sandbox_env.kernels.jupyter import sandbox
from sandbox_env.kernels.jupyter.limits import Confinement
from sandbox_env.kernels.jupyter.pipes import PipeReader, PipeWriter
from sandbox_env.kernels.jupyter.programs import run_watched
from sandbox_env.kernels.jupyter.template import HOLD, START_TIMEOUT_S, ForkedProcess, fork_program, held_pid
from sandbox_env.models import ExecutionResult


class Unforkable(KernelStartError):
    """The box got no cgroups after all (their creation failed): the program goes by exec."""


@dataclasses.dataclass
class Box:
    conf: Confinement
    holder: subprocess.Popen[bytes]
    proc: ForkedProcess  # the program's process (its parent, outside the cgroups, reports its status)
    job: int  # the write end of the pipe its source goes on
    stdio: list[int]  # the server's ends of its stdin, stdout and stderr

    def alive(self) -> bool:
        return self.holder.poll() is None and self.proc.poll() is None

    async def start(self, source: str) -> ForkedProgram:
        """The program runs `source` from now on; its pipes become streams (the box's no longer)."""
        job, self.job = self.job, -1
        data = source.encode()
        if len(data) <= PIPE_SIZE:  # an empty pipe takes it whole at once
            _write_all(job, data)
        else:
            # The thread owns `job` to its end, even past a cancelled run: closed here, under a
            # write in progress, its number would be the next file the server opens, and the
            # write would go on into that file once the box's destruction kills the reader.
            write = asyncio.get_running_loop().run_in_executor(None, _write_all, job, data)
            await asyncio.shield(write)
        stdio, self.stdio = self.stdio, []
        return ForkedProgram(self.proc, stdio)

    async def destroy(self) -> None:
        """Everything of it killed (its cgroups hold the bwrap, the holder and the program's tree),
        reaped, its cgroups removed. Shielded: a cancelled caller leaves nothing behind."""
        await asyncio.shield(asyncio.to_thread(self._destroy))

    def _destroy(self) -> None:
        self.conf.kill_all()
        with contextlib.suppress(OSError):
            self.holder.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.holder.wait(5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)  # its parent has reaped it
        self.conf.destroy()
        self.proc.close()
        for fd in [self.job, *self.stdio]:
            if fd >= 0:
                os.close(fd)
        self.job, self.stdio = -1, []


PIPE_SIZE = 1 << 16


def _write_all(fd: int, data: bytes) -> None:
    """`data` into the pipe `fd`, then `fd` closed (the program's EOF)."""
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BrokenPipeError:
        pass  # it died waiting (or its box was destroyed): its status says how
    finally:
        os.close(fd)


async def build(conf: Confinement, env: dict[str, str], runtime: sandbox.Runtime, layout: sandbox.Layout,
                workdir: Path, ready: asyncio.Event | None = None) -> Box:
    """A sandbox of `layout` in `conf` (created here), held open, its program's process waiting in
    it, forked only once `ready` is set (the kernel's processes are gone); destroyed again if this
    fails or is cancelled."""
    conf.create()
    holder: subprocess.Popen[bytes] | None = None
    try:
        if conf.version == "none":  # what kills a forked program's whole tree is its cgroups
            raise Unforkable("no cgroups for a program's box")
        with sandbox.seccomp_fd() as fd:
            # The holder stays root without a capability (not the sandbox's uid, unlike a kernel's):
            # the program cannot open its /proc files or signal it, as with bwrap's own init.
            holder = subprocess.Popen(sandbox.sandbox_argv(runtime, layout, HOLD, env=env, seccomp=fd, capless_root=True),
                                      env={"PATH": "/usr/bin:/bin"}, cwd="/", pass_fds=(fd,), preexec_fn=conf.preexec,
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        conf.attach(holder.pid)
        deadline = time.monotonic() + START_TIMEOUT_S
        while (pid := held_pid(holder.pid)) is None:
            if holder.poll() is not None or time.monotonic() > deadline:
                raise KernelStartError(f"a program's sandbox did not start (status {holder.poll()})")
            await asyncio.sleep(0.002)
        if ready is not None:  # the holder is root: only the program is of the kernel's uid
            await ready.wait()
        pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(4)]  # job, stdin, stdout, stderr
        theirs = [pipes[0][0], pipes[1][0], pipes[2][1], pipes[3][1]]
        ours = [pipes[0][1], pipes[1][1], pipes[2][0], pipes[3][0]]
        pidfd = os.pidfd_open(pid)
        try:
            proc = await fork_program(pidfd, conf, layout, env, workdir, theirs)
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        finally:
            for fd in (pidfd, *theirs):  # the template got copies: the program holds the only ones left
                os.close(fd)
        return Box(conf, holder, proc, ours[0], ours[1:])
    except BaseException:
        await asyncio.shield(asyncio.to_thread(_abandon, conf, holder))
        raise


def _abandon(conf: Confinement, holder: subprocess.Popen[bytes] | None) -> None:
    if holder is not None:
        with contextlib.suppress(OSError):
            holder.kill()
        holder.wait()
    conf.destroy()


class Spare:
    """At most one box built ahead for a kernel's next program: `take` it (or one built now),
    `refill` after a run, `discard` before a kernel starts again, `close` when the kernel closes."""

    def __init__(self, make: Callable[[asyncio.Event | None], Coroutine[Any, Any, Box]],
                 background: set[asyncio.Task[None]]) -> None:
        self._make = make
        self._next: asyncio.Task[Box] | None = None
        self._closed = False
        self.background = background  # where boxes are destroyed: the kernel's close() waits for them

    async def take(self, ready: asyncio.Event) -> Box:
        """The box built ahead, or one built now whose program is forked once `ready` is set."""
        task, self._next = self._next, None
        for _ in range(3):
            task = task or asyncio.ensure_future(self._make(ready))
            try:
                box = await asyncio.shield(task)
            except asyncio.CancelledError:
                self.abandon(task)
                raise
            if box.alive():
                return box
            dead = f"holder {box.holder.poll()}, program {box.proc.poll()}"
            await box.destroy()  # it died waiting (the host's OOM killer?): build another
            task = None
        raise KernelStartError(f"a program's sandbox died before its program ran ({dead})")

    def abandon(self, task: asyncio.Future[Box]) -> None:
        """A `take` or build nobody waits for any more: cancelled, and a box it got destroyed."""
        task.cancel()
        task.add_done_callback(self._destroy_result)

    def _destroy_result(self, task: asyncio.Future[Box]) -> None:
        if not task.cancelled() and task.exception() is None:
            self.destroy(task.result())

    def destroy(self, box: Box) -> asyncio.Task[None]:
        task = asyncio.ensure_future(box.destroy())
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    def refill(self, after: Awaitable[object]) -> None:
        """Build the next box once `after` (the last box's destruction) is done; none once closed
        (a run that outlived the kernel's close() ends without one)."""
        if self._next is None and not self._closed:
            self._next = asyncio.ensure_future(self._after(after))

    async def _after(self, after: Awaitable[object]) -> Box:
        with contextlib.suppress(Exception):
            await after
        return await self._make(None)

    async def close(self) -> None:
        self._closed = True
        await self.discard()

    async def discard(self) -> None:
        task, self._next = self._next, None
        if task is None:
            return
        try:
            box = await asyncio.shield(task)
        except asyncio.CancelledError:
            self.abandon(task)
            raise
        except Exception:  # noqa: BLE001 - a box that failed to build left nothing behind
            return
        await box.destroy()


async def run(spare: Spare, teardown: Callable[[], Awaitable[None]], source: str, stdin: bytes, timeout_s: float, *,
              keep: int, limit: int) -> ExecutionResult:
    """`source` run in the spare box (or one built now, while `teardown` kills the kernel's
    processes: its program's process is forked after that). The box is destroyed in the background (the
    kernel's close() and its uid's lease wait for it), the next one built after that (`Spare.refill`)."""
    stopped = asyncio.Event()
    taken = asyncio.ensure_future(spare.take(stopped))
    try:
        await teardown()
        stopped.set()
        box = await taken
    except BaseException:
        spare.abandon(taken)
        raise
    try:
        return await run_watched(box.conf, lambda: box.start(source), stdin, timeout_s, exit_by_signal=True,
                                 keep=keep, limit=limit)
    finally:
        # Reaping its processes (run_watched killed them, unless cancelled) and removing its
        # cgroups need not delay the result.
        spare.refill(after=spare.destroy(box))  # the next program's box, once nothing of this one is left


class ForkedProgram:
    """A forked program as `run_to_end` sees a subprocess (`programs.Running`): its pipes as
    streams (`pipes.py`: each descriptor closed once, whatever the event loop), its status;
    `_transport` closes the pipes, as an asyncio subprocess's does."""

    def __init__(self, proc: ForkedProcess, stdio: list[int]) -> None:
        self.proc = proc
        made: list[PipeWriter | PipeReader] = []
        try:
            writer = PipeWriter(stdio[0])
            made.append(writer)
            out = PipeReader(stdio[1])
            made.append(out)
            err = PipeReader(stdio[2])
            made.append(err)
        except BaseException:
            for pipe in made:
                pipe.close()
            for fd in stdio[len(made):]:
                os.close(fd)
            raise
        self.stdin: PipeWriter | None = writer
        self.stdout: asyncio.StreamReader | None = out.stream
        self.stderr: asyncio.StreamReader | None = err.stream
        self._transport = _Pipes([writer, out, err])

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def exited(self) -> Awaitable[int]:
        return self.proc.exited()


@dataclasses.dataclass
class _Pipes:
    pipes: list[PipeWriter | PipeReader]

    def close(self) -> None:
        for pipe in self.pipes:
            pipe.close()
