"""The server's side of the kernel template (`zygote.py`): starting it; the requests for a kernel
(into the sandbox a bwrap holder keeps), for a relay and for a program's process; the handle of a process it forked, which
stands in for `subprocess.Popen`.

One template per kind (kernels, relays, programs) per server process, started on first use and again
if it dies. Only a root server with cgroups uses it (`forked`): its kernels join the namespaces of
a sandbox that bwrap built and drop to the sandbox's uid themselves, and the cgroups are what finds
and kills every process of a kernel (a forked process carries the template's environment, not the
kernel's token).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from sandbox_env.errors import KernelStartError
from sandbox_env.kernels.jupyter import relay as zmq_relay
from sandbox_env.kernels.jupyter import sandbox
from sandbox_env.kernels.jupyter.limits import Confinement
from sandbox_env.kernels.jupyter.seccomp import bpf_program as seccomp_bpf_program

logger = logging.getLogger(__name__)

_SOURCE = (Path(__file__).parent / "zygote.py").read_text()  # not imported: it imports ipykernel
_RELAY_SOURCE = Path(zmq_relay.__file__).read_text()
START_TIMEOUT_S = 30.0
# Nothing of the server's environment: it is what a forked kernel's /proc/self/environ shows.
_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}


WAIT_SLICE_S = 0.05  # how long a blocking wait sleeps before it looks whether another thread collected


class ForkedProcess:
    """A process the template forked: signalled through its pidfd (never a reused pid), its exit
    status read from the pipe the template writes it to once it has reaped it.

    Thread-safe: a teardown waits for it in a worker thread while the event loop polls it. Its two
    descriptors are closed once, under the lock, and waiting polls a duplicate: a number closed
    under another thread's wait could be the next file the server opens (another process's
    status pipe), and reading or closing it would steal that."""

    def __init__(self, pid: int, pidfd: int, status: int, stdin: IO[bytes] | None = None) -> None:
        self.pid, self._pidfd, self._status = pid, pidfd, status
        self.stdin = stdin
        self.returncode: int | None = None
        self._lock = threading.Lock()
        self._wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []  # exited() waiting

    def poll(self) -> int | None:
        return self.wait(0.0, raises=False)

    async def exited(self) -> int:
        """Its status, as soon as the template (or its parent) writes it: no polling. (Another
        thread that collects the status first wakes this too.)"""
        fd = self._watch()
        if fd >= 0:
            loop = asyncio.get_running_loop()
            ready = loop.create_future()
            waker = (loop, ready)
            with self._lock:
                self._wakers.append(waker)
            loop.add_reader(fd, _settle, ready)
            try:
                await ready
            finally:
                loop.remove_reader(fd)
                os.close(fd)
                with self._lock, contextlib.suppress(ValueError):
                    self._wakers.remove(waker)
        code = self.wait(0.0, raises=False)
        return -signal.SIGKILL if code is None else code

    def wait(self, timeout: float | None = None, *, raises: bool = True) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (fd := self._watch()) >= 0:
            try:  # in slices: another thread may collect the status (then this pipe stays silent)
                left = WAIT_SLICE_S if deadline is None else min(WAIT_SLICE_S, max(0.0, deadline - time.monotonic()))
                ready = _readable(fd, left)
            finally:
                os.close(fd)
            if ready:
                self._collect()
            elif deadline is not None and time.monotonic() >= deadline:
                break
        if self.returncode is None and raises and timeout is not None:
            raise subprocess.TimeoutExpired(f"forked process {self.pid}", timeout)
        return self.returncode

    def _watch(self) -> int:
        """A duplicate of the status pipe to wait on, or -1 once the status is known."""
        with self._lock:
            return os.dup(self._status) if self.returncode is None and self._status >= 0 else -1

    def _collect(self) -> None:
        with self._lock:
            if self.returncode is None and self._status >= 0:
                data = os.read(self._status, 4)
                # no status: the template died, and this process with it (PDEATHSIG)
                self.returncode = struct.unpack("i", data)[0] if len(data) == 4 else -signal.SIGKILL
                self._close()
                for loop, ready in self._wakers:
                    with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits
                        loop.call_soon_threadsafe(_settle, ready)

    def kill(self) -> None:
        with self._lock:
            if self.returncode is None and self._pidfd >= 0:
                with contextlib.suppress(ProcessLookupError, OSError):
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        for name in ("_pidfd", "_status"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)

    def __del__(self) -> None:
        if hasattr(self, "_lock"):
            self.close()


def _settle(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


def _readable(fd: int, timeout: float | None) -> bool:
    """poll(), not select(): a server holding hundreds of kernels has descriptors past 1024,
    which select() refuses."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999))))


class Template:
    """The running template process and its control socket; requests are one at a time. `kind`:
    "kernel" (ipykernel imported), "relay" (zmq only) or "program" (`run_program`'s: the standard
    library only, nothing of a kernel's). Relays come from a template of their own:
    a forked child shares its template's stack canary, pointer guard and address layout, which a
    kernel can read in its own memory, and a relay parses what kernels send."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            # the server's pid names the template and everything forked from it (its command line)
            config = {"server": os.getpid(), "kind": self.kind, "control_fd": theirs.fileno(),
                      "relay_source": _RELAY_SOURCE}
            self._proc = subprocess.Popen([sys.executable, "-I", "-c", _SOURCE, json.dumps(config)],
                                          pass_fds=(theirs.fileno(),), env=_ENV, cwd="/", stdin=subprocess.DEVNULL,
                                          start_new_session=True)
        ours.settimeout(START_TIMEOUT_S)
        try:
            hello = ours.recv(4096)
        except OSError as exc:
            hello = repr(exc).encode()
        if not hello.startswith(b'{"ready"'):
            ours.close()
            self._proc.kill()
            self._proc.wait()
            raise KernelStartError(f"the kernel template did not start ({hello[:200]!r})")
        ours.settimeout(None)
        self._sock = ours
        logger.info("%s template started (pid %d)", self.kind, self._proc.pid)

    def _ensure(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            self._close()
            self._start()

    async def fork(self, request: dict[str, Any], fds: list[int]) -> ForkedProcess:
        """A child of the template, asked for off the event loop. `fds` (the request's descriptors)
        stay the caller's: the request carries copies of its own, so a caller cancelled meanwhile
        may close them. A child forked for a cancelled caller is killed."""
        copies = [os.dup(fd) for fd in fds]
        try:
            call = asyncio.ensure_future(asyncio.to_thread(self._fork, request, copies))
        except BaseException:
            for fd in copies:
                os.close(fd)
            raise
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            call.add_done_callback(_discard)
            raise

    def _fork(self, request: dict[str, Any], fds: list[int]) -> ForkedProcess:
        try:
            return self._ask(request, fds)
        finally:
            for fd in fds:
                os.close(fd)

    def _ask(self, request: dict[str, Any], fds: list[int]) -> ForkedProcess:
        with self._lock:
            self._ensure()
            assert self._sock is not None
            try:
                self._sock.sendmsg([json.dumps(request).encode()],
                                   [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                received = array.array("i")
                data, ancdata, _, _ = self._sock.recvmsg(65536, socket.CMSG_LEN(2 * received.itemsize))
            except OSError as exc:
                self._close()
                raise KernelStartError(f"the kernel template is gone: {exc!r}") from exc
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
        answer = json.loads(data or b'{"error": "no answer"}')
        if "pid" not in answer or len(received) != 2:
            for fd in received:
                os.close(fd)
            raise KernelStartError(f"the kernel template could not fork: {answer.get('error')}")
        return ForkedProcess(answer["pid"], received[0], received[1])

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            with contextlib.suppress(OSError):
                self._proc.kill()
            self._proc.wait()
            self._proc = None

    def close(self) -> None:
        with self._lock:
            self._close()


def _discard(call: asyncio.Future[ForkedProcess]) -> None:
    if not call.cancelled() and call.exception() is None:
        child = call.result()
        child.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(5)
        child.close()


_TEMPLATES = {kind: Template(kind) for kind in ("kernel", "relay", "program")}


def template(kind: str = "kernel") -> Template:
    return _TEMPLATES[kind]


# -- the requests: a kernel into a sandbox bwrap built, a relay into a kernel's confinement ------------

HOLD = ["sleep", "infinity"]  # what bwrap runs for a forked kernel: the sandbox lives while it does


def forked(conf: Confinement, box: sandbox.Layout | None) -> bool:
    """Kernels come from the template when the server is root and has cgroups (`template.py`)."""
    return box is not None and os.geteuid() == 0 and box.uid != 0 and conf.version != "none" and FORKING


FORKING = True  # tests switch it off to exercise the exec path


async def fork_relay(conf: Confinement, config: dict[str, Any], folder: Path, log: int) -> ForkedProcess:
    read, write = os.pipe()
    try:
        request = {"op": "relay", "cgroups": [str(d) for d in conf.dirs.values()], "rlimits": conf.rlimits(),
                   "cwd": str(folder), "env": {"SANDBOX_ENV_KERNEL": conf.token}, "config": config,
                   "unshare_net": conf.limits.network is False}
        proc = await template("relay").fork(request, [read, log])
    except BaseException:
        os.close(write)
        raise
    finally:
        os.close(read)
    proc.stdin = os.fdopen(write, "wb")
    return proc


async def fork_kernel(holder: subprocess.Popen[bytes], conf: Confinement, box: sandbox.Layout, env: dict[str, str],
                      workdir: Path, args: list[str], log: int) -> ForkedProcess:
    """Once bwrap has built the sandbox (its command runs): a kernel forked into it."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while (pid := held_pid(holder.pid)) is None:
        if holder.poll() is not None or time.monotonic() > deadline:
            raise KernelStartError(f"the kernel's sandbox did not start (status {holder.poll()})")
        await asyncio.sleep(0.002)
    pidfd = os.pidfd_open(pid)
    try:
        request = {"op": "kernel", "cgroups": [str(d) for d in conf.dirs.values()], "rlimits": conf.rlimits(),
                   "uid": box.uid, "gid": box.gid, "seccomp": seccomp_bpf_program().hex(), "env": env,
                   "workdir": str(workdir), "argv": args}
        return await template("kernel").fork(request, [pidfd, log])
    finally:
        os.close(pidfd)


async def fork_program(holder: int, conf: Confinement, box: sandbox.Layout, env: dict[str, str], workdir: Path,
                       fds: list[int]) -> ForkedProcess:
    """A program's process forked into the sandbox whose holder's pidfd is `holder` (`boxes.py`);
    `fds`: the read end of its job pipe, then its stdin, stdout and stderr (the child's ends)."""
    request = {"op": "program", "cgroups": [str(d) for d in conf.dirs.values()], "rlimits": conf.rlimits(),
               "uid": box.uid, "gid": box.gid, "seccomp": seccomp_bpf_program().hex(), "env": env,
               "workdir": str(workdir)}
    return await template("program").fork(request, [holder, *fds])


def held_pid(bwrap: int) -> int | None:
    """The pid of bwrap's command (below the sandbox's init) once it runs HOLD: the sandbox is built."""
    try:
        init = _children(bwrap)[0]
        pid = _children(init)[0]
        with open(f"/proc/{pid}/comm") as f:
            return pid if f.read().strip() == HOLD[0] else None
    except (OSError, IndexError, ValueError):
        return None


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]
