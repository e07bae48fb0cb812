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
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import os
import queue
import re
import stat
import subprocess
import sys
import tempfile
import time
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq.asyncio
from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.kernelspec import KernelSpec
from jupyter_client.manager import AsyncKernelManager

from sandbox_env.errors import KernelError, KernelStartError
from sandbox_env.inside.slate import empty
from sandbox_env.kernels.base import Kernel
from sandbox_env.kernels.jupyter import relay as zmq_relay
from sandbox_env.kernels.jupyter import sandbox
from sandbox_env.kernels.jupyter.config import JupyterConfig
from sandbox_env.kernels.jupyter.limits import MB, Confinement, Limits
from sandbox_env.kernels.jupyter.seccomp import bpf_program as seccomp_bpf_program
from sandbox_env.kernels.output import KernelAnomaly, StepCollector, check_reply, died, kernel_shim
from sandbox_env.kernels.programs import run_to_end
from sandbox_env.models import ExecStatus, ExecutionResult
from sandbox_env.policy import Policy

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0
SIGNAL_MAX = 64
POLL_S = 0.2  # how often a silent step checks that the kernel process is alive
# The policy's pids/open_files are what the code may use; ipykernel's own share comes on top
# (idle: 12 tasks, i.e. threads, and ~60 descriptors, mostly zmq; with less it cannot even start).
KERNEL_TASKS, KERNEL_FDS = 16, 96
KERNEL_ARGS = (
    "--HistoryManager.enabled=False",  # no sqlite writes (and no history thread) per step
    "--InteractiveShell.colors=NoColor",  # plain tracebacks
    "--InteractiveShell.xmode=Plain",  # Python-style, and fast on deep recursion (Context takes seconds)
    "--IPKernelApp.quiet=True",
)
# One expression, evaluated through user_expressions: no extra request, no history entry.
INSPECT_EXPR = (
    "__import__('base64').b64encode(__import__('json').dumps([(k, type(v).__name__, "
    "__import__('reprlib').repr(v)) for k, v in list(get_ipython().user_ns.items()) if not k.startswith('_') "
    "and k not in get_ipython().user_ns_hidden and not isinstance(v, type(__import__('sys')))]).encode())"
)
# What the server accepts back: the repr of base64 text, checked by one regex before any parsing
# (the kernel's code may have replaced json or base64 to answer anything).
INSPECT_REPLY = re.compile(r"b'([A-Za-z0-9+/]*={0,2})'")
INSPECT_MAX = 1 << 20


def _kernel_env(root: Path, workdir: Path, token: str, *, isolated: bool) -> dict[str, str]:
    """Built from scratch, so none of the server's variables (secrets) reach the kernel. In the
    sandbox the config dirs are read-only and the user site is off: no start-up file the code
    writes runs before the next kernel is ready."""
    config = root / "ro" if isolated else root
    env = {
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"]),
        "HOME": str(workdir),
        "TMPDIR": "/tmp" if isolated else str(root / "tmp"),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONNOUSERSITE": "1",
        "IPYTHONDIR": str(config / "ipython"),
        "JUPYTER_CONFIG_DIR": str(config / "jupyter"),
        "MPLCONFIGDIR": str(config / "mpl"),
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        "SANDBOX_ENV_KERNEL": token,  # lets the rlimit-only teardown find escaped processes
    }
    if isolated:
        env.update(USER="sandbox", LOGNAME="sandbox")
    return env


def _parse_variables(reply: dict[str, Any] | None, rows_max: int = 1000, chars: int = 1000) -> list[dict[str, str]]:
    """The rows of INSPECT_EXPR; whatever the kernel answered, a bounded list of strings."""
    try:
        text = reply["content"]["user_expressions"]["v"]["data"]["text/plain"]  # type: ignore[index]
        match = INSPECT_REPLY.fullmatch(text) if isinstance(text, str) and len(text) <= INSPECT_MAX else None
        rows = json.loads(base64.b64decode(match.group(1))) if match else []
        return [{"name": n[:chars], "type": t[:chars], "repr": r[:chars]} for n, t, r in rows[:rows_max]
                if isinstance(n, str) and isinstance(t, str) and isinstance(r, str)]
    except Exception:  # noqa: BLE001 - malformed, deep, huge: no variables
        return []


_swept_roots: set[str] = set()


def _sweep_workdirs(parent: str | None) -> None:
    """Once per directory: delete what servers that died without closing their kernels left there.

    Directories carry their server's pid (`sandbox-env-<pid>-*`); a kernel dies with its server
    (bwrap's --die-with-parent; ipykernel watches its parent when unisolated), its cgroups go in
    `limits.sweep_stale`.
    """
    base = Path(parent or tempfile.gettempdir())
    if str(base) in _swept_roots:
        return
    _swept_roots.add(str(base))
    for path in remove_workdirs(parent, lambda owner: not os.path.exists(f"/proc/{owner}")):
        logger.warning("removed %s, left by a server that is gone", path)


def remove_workdirs(parent: str | None, owned: Callable[[str], bool]) -> list[Path]:
    """Remove the kernels' work directories `sandbox-env-<pid>-*` under `parent` (default: the
    temp dir) whose server pid `owned` accepts (by the startup sweep and by the reaper)."""
    removed = []
    for path in Path(parent or tempfile.gettempdir()).glob("sandbox-env-*-*"):
        owner = path.name.split("-")[2]
        if owner.isdigit() and owned(owner) and path.is_dir() and not path.is_symlink():
            _remove(path)
            removed.append(path)
    return removed


# What the server takes from a kernel: messages of at most MESSAGE bytes, whatever the output limit
# (the kernel's start-up code sends streams in chunks of 64 K characters; a single display bigger
# than this costs the kernel), and RCVHWM of them queued per socket; a kernel sending a bigger one
# loses its connection (`_disconnected`), the server no memory. The relay checks every message is
# cheap to parse first (`zmq_relay.check`): DRAIN bounds how many are read in a row between steps.
MESSAGE, RCVHWM, DRAIN = 4 * MB, 2, 64
# The server connects to a relay of the kernel's (`kernels/jupyter/relay.py`), never to the kernel: it takes
# messages of at most RELAY_FRAMES frames (a Jupyter message has 7 with its topic: no `buffers`
# are needed) and of at most the message bound in all; the relay lives in the kernel's confinement.
RELAY_FRAMES, RELAY_TASKS = 7 + 8, 4  # tasks: the relay's threads (main, zmq I/O, reaper)
RELAY_AS = 192 * MB  # the relay's address space without cgroups, on top of 4 messages in flight
_RELAY_SOURCE = Path(zmq_relay.__file__).read_text()
_ZMQ_CONTEXTS: dict[int, zmq.asyncio.Context] = {}


def _zmq_context() -> zmq.asyncio.Context:
    """One context (one I/O thread), shared by the kernels of the process."""
    size = MESSAGE
    ctx = _ZMQ_CONTEXTS.get(size)
    if ctx is None or ctx.closed:
        ctx = _ZMQ_CONTEXTS[size] = zmq.asyncio.Context()
        ctx.setsockopt(zmq.MAXMSGSIZE, size)  # defaults for the sockets created from now on
        ctx.setsockopt(zmq.RCVHWM, RCVHWM)
    return ctx


def _disconnected(kc: AsyncKernelClient) -> bool:
    """True once the kernel's iopub or shell connection dropped (a message over the size bound,
    or a dead kernel); zmq would reconnect silently."""
    found = False
    for channel in (kc.iopub_channel, kc.shell_channel):
        sock = channel.socket
        if sock is None or sock.closed:
            continue
        watch = sock._monitor_socket  # set by get_monitor_socket: one per channel socket
        if watch is None:
            watch = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED, f"inproc://sandbox-env-{uuid.uuid4().hex}")
            weakref.finalize(sock, watch.close, 0)
        found = found or bool(watch.getsockopt(zmq.EVENTS) & zmq.POLLIN)
    return found


def _unwatch(kc: AsyncKernelClient) -> None:
    """Stop the channel sockets' monitors, then close their watches; before the sockets close.

    A socket closes in libzmq after `close()` returns, and until then it still sends its events:
    one sent to a watch already closed (as closing the socket's Python object did) blocks the
    context's I/O thread for good (libzmq #3575), with every kernel of the server on it. The
    relay's end, a moment later, is such an event."""
    for channel in (kc._iopub_channel, kc._shell_channel):  # the properties would open missing ones
        sock = getattr(channel, "socket", None)
        watch = getattr(sock, "_monitor_socket", None)
        if sock is None or watch is None:
            continue
        if not sock.closed:
            sock.disable_monitor()
        watch.close(0)


@dataclasses.dataclass
class _Process:
    """One kernel process (a restart makes a new one) and everything attached to it."""

    km: AsyncKernelManager
    conf: Confinement
    proc: subprocess.Popen[bytes] | None = None
    kc: AsyncKernelClient | None = None
    sandboxed: bool = False  # proc is bwrap, which reports death by signal N as exit 128+N
    relay: subprocess.Popen[bytes] | None = None  # the server's only way to the kernel (zmq_relay)
    generation: int = 0

    def relay_status(self) -> int | None:
        """The relay's exit status (None: running)."""
        return self.relay.poll() if self.relay is not None else None

    def exit_status(self) -> int | None:
        """As Popen reports it: -N for death by signal N."""
        code = self.proc.poll() if self.proc is not None else -9
        if self.sandboxed and code is not None and 128 < code <= 128 + SIGNAL_MAX:
            return 128 - code
        return code


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
        self._cur: _Process | None = None
        self._generation = 0
        self._lock = asyncio.Lock()
        self._restart: asyncio.Task[None] | None = None
        self._teardowns: set[asyncio.Task[None]] = set()
        self._note = ""  # told to the next step (the kernel died between steps)
        self._started = self._closed = False
        self._relaunch = False  # run_program stopped the kernel: the next step starts a fresh one
        self._program_running = False

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
            if str(self.config.workdir_root or tempfile.gettempdir()) not in _swept_roots:
                await asyncio.to_thread(_sweep_workdirs, self.config.workdir_root)
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
        self._generation += 1
        gen, box = self._generation, self._layout
        if box is None:
            for sub in ("work", "tmp", "run"):  # again on restarts: the code may have deleted them
                _fresh_dir(self.root / sub)
            run = self.root / "run"
        else:
            run = sandbox.run_dir(box, gen)
        limits = dataclasses.replace(Limits.from_policy(self.policy), pids=self.policy.pids + KERNEL_TASKS + RELAY_TASKS,
                                     open_files=self.policy.open_files + KERNEL_FDS)
        conf = Confinement(f"{self.id}-{gen}", limits, token=f"{self.id}-{gen}", use_cgroups=self.use_cgroups,
                           uid=None if box is None else box.uid)
        conf.create()
        km = AsyncKernelManager(transport="ipc", ip=str(run / (f"k{gen}" if box is None else "s")),
                                connection_file=str(run / f"kernel-{gen}.json"), context=_zmq_context())
        shim = self._startup_file()
        command = [sys.executable, "-s", "-m", "ipykernel_launcher", "-f", "{connection_file}", *KERNEL_ARGS,
                   f"--IPKernelApp.exec_lines=exec(open({str(shim)!r}).read())"]
        env = _kernel_env(self.root, self.workdir, conf.token, isolated=box is not None)
        self._cur = cur = _Process(km, conf, sandboxed=box is not None, generation=gen)
        t0 = time.perf_counter()
        try:
            with contextlib.ExitStack() as stack:
                if box is None:  # absolute interpreter path: never a shim on PATH
                    launch: dict[str, Any] = {"env": env, "cwd": str(self.workdir)}
                else:
                    assert self._runtime is not None
                    km.write_connection_file()
                    sandbox.hand_over(Path(km.connection_file), box)
                    fd = stack.enter_context(sandbox.seccomp_fd())
                    command = sandbox.sandbox_argv(self._runtime, box, command, env=env, seccomp=fd, run_dir=run)
                    launch = {"env": {"PATH": "/usr/bin:/bin"}, "cwd": "/", "pass_fds": (fd,)}
                # In the sandbox a signal to bwrap would kill it: interrupts go over the control channel.
                km._kernel_spec = KernelSpec(argv=command, env={}, display_name="sandbox-env", language="python",
                                             interrupt_mode="signal" if box is None else "message")
                log = os.open(self.root / "kernel.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                stack.callback(os.close, log)
                cur.relay, front = self._start_relay(gen, conf, log)  # starts while the kernel does
                await km.start_kernel(**launch, preexec_fn=conf.preexec, stdin=subprocess.DEVNULL,
                                      stdout=log, stderr=log)
            cur.proc = km.provisioner.process  # type: ignore[union-attr]
            conf.attach(cur.proc.pid)  # type: ignore[union-attr]
            if box is not None:
                await sandbox.seal(run, _socket_paths(km), box, alive=lambda: cur.exit_status() is None,
                                   timeout_s=START_TIMEOUT_S)
                if conf.version == "none":
                    conf.measured_pid = sandbox.interpreter_pid(cur.proc.pid)  # type: ignore[union-attr]
            cur.kc = await self._connect_relay(cur, front)
            cur.kc.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)
            await cur.kc.wait_for_ready(timeout=START_TIMEOUT_S)
        except Exception as exc:
            tail = _log_tail(self.root / "kernel.log")
            await self._teardown()
            raise KernelStartError(f"ipykernel failed to start: {exc!r}; its log ends with: {tail!r}") from exc
        logger.info("kernel %s-%d ready in %.0f ms (pid %s, limits: %s, %s)", self.id, gen,
                    (time.perf_counter() - t0) * 1000, cur.proc.pid, conf.mechanism,
                    "unisolated" if self._runtime is None else self._runtime.describe())

    def _start_relay(self, gen: int, conf: Confinement, log: int) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
        """The kernel's relay (`kernels/jupyter/relay.py`), in the kernel's confinement: it binds its sockets in a
        folder of the server's (0700, hidden from the kernel under its tmpfs) and waits for the
        kernel's addresses. Returns the process and the client's connection info for its sockets."""
        assert self.root is not None
        folder = self.root / f"r{gen}"
        _fresh_dir(folder)
        ports = {"shell": 1, "iopub": 2, "control": 3}
        front = {name: f"ipc://{folder}/r-{port}" for name, port in ports.items()}
        size = MESSAGE
        # paths relative to its working folder (this one): as the kernel's uid, it may not pass
        # the folders above the kernel's (e.g. a workdir_root under /root)
        config = {"front": {name: f"ipc://r-{port}" for name, port in ports.items()},
                  "max_frames": RELAY_FRAMES, "max_bytes": size}
        box = self._layout
        drop = box is not None and os.geteuid() == 0 and box.uid != 0
        if drop:  # the relay binds as the kernel's uid: the folder is its own until sealed
            assert box is not None
            os.chown(self.root, 0, box.gid)  # traversable by the kernel's gid (the kernel, in its
            os.chmod(self.root, 0o710)  # own mount namespace, never sees this folder)
            os.chown(folder, box.uid, box.gid)
        if box is not None:  # it drops to the kernel's uid and loads its seccomp filter itself, once
            # its modules are imported (the interpreter may live in root's home) and before any thread
            config.update(uid=box.uid, gid=box.gid, seccomp=seccomp_bpf_program().hex())

        def preexec() -> None:
            conf.preexec()  # the kernel's cgroups (memory, pids, CPU) and rlimits
            if conf._dir("memory") is None:  # rlimits only: the relay's memory is bounded on its own
                import resource
                resource.setrlimit(resource.RLIMIT_AS, (RELAY_AS + 4 * size,) * 2)

        proc = subprocess.Popen([sys.executable, "-I", "-c", _RELAY_SOURCE, json.dumps(config)],
                                stdin=subprocess.PIPE, stdout=log, stderr=log, cwd=str(folder),
                                env={"SANDBOX_ENV_KERNEL": conf.token}, preexec_fn=preexec, start_new_session=True)
        info = {"ip": f"{folder}/r", **{f"{name}_port": port for name, port in ports.items()},
                "stdin_port": 4, "hb_port": 5, "_front": front}
        return proc, info

    async def _connect_relay(self, cur: _Process, front: dict[str, Any]) -> AsyncKernelClient:
        """Once the kernel's sockets are sealed: the relay connects to them, the client (and the
        manager's control socket, for interrupts) to the relay."""
        relay, km = cur.relay, cur.km
        assert relay is not None and relay.stdin is not None
        paths = [Path(url.removeprefix("ipc://")) for url in front["_front"].values()]
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(map(sandbox._is_socket, paths)):  # bound long ago, unless it failed
            if relay.poll() is not None or time.monotonic() > deadline:
                raise KernelStartError(f"the message relay did not start (status {relay.poll()})")
            await asyncio.sleep(0.005)
        box = self._layout
        if box is not None and os.geteuid() == 0:  # sealed before the relay reads a kernel's byte
            folder = paths[0].parent
            os.chmod(folder, 0o711)
            os.chown(folder, 0, 0)
            for path in paths:
                found = os.lstat(path)
                if not stat.S_ISSOCK(found.st_mode) or found.st_uid != box.uid:
                    raise KernelStartError(f"unexpected file at the relay's socket path {str(path)!r}")
        info = km.get_connection_info()
        kernel = {name: "ipc://" + os.path.relpath(f"{info['ip']}-{info[f'{name}_port']}", paths[0].parent)
                  for name in ("shell", "iopub", "control")}  # from the relay's working folder
        relay.stdin.write(json.dumps(kernel).encode() + b"\n")
        relay.stdin.flush()
        ctx = _zmq_context()
        if km._control_socket is not None:  # connected to the kernel itself by start_kernel
            km._control_socket.close(linger=0)
        km._control_socket = ctx.socket(zmq.DEALER)
        km._control_socket.rcvhwm = 1  # never read: the relay forwards no control reply
        km._control_socket.linger = 100
        km._control_socket.connect(front["_front"]["control"])
        ports = {k: v for k, v in front.items() if k != "_front"}
        return km.client(context=ctx, transport="ipc", **ports)

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

    async def _destroy(self, cur: _Process) -> None:
        if cur.kc is not None:
            _unwatch(cur.kc)
            cur.kc.stop_channels()
        await asyncio.to_thread(cur.conf.kill_all)
        if cur.proc is not None:
            with contextlib.suppress(OSError):
                cur.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(cur.proc.wait, 5)  # reap it before removing its cgroups
        if cur.relay is not None:
            with contextlib.suppress(OSError):
                cur.relay.kill()
            with contextlib.suppress(OSError):
                cur.relay.stdin.close()  # type: ignore[union-attr]
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(cur.relay.wait, 5)
            if self.root is not None:
                await asyncio.to_thread(_remove, self.root / f"r{cur.generation}")
        await asyncio.to_thread(cur.conf.destroy)
        try:
            await cur.km.cleanup_resources()
        except Exception as exc:  # noqa: BLE001 - leftover socket files go with the root dir
            logger.debug("kernel %s cleanup: %s", self.id, exc)
        if self._layout is not None:  # this process's own folder: nothing of it runs any more
            await asyncio.to_thread(_remove, Path(cur.km.connection_file).parent)

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

    async def _ready(self) -> _Process:
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
            if self._teardowns:
                await asyncio.gather(*self._teardowns, return_exceptions=True)
        finally:
            if self.root is not None:
                await asyncio.to_thread(_remove, self.root)
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

    async def _run(self, cur: _Process, code: str, limit: float) -> ExecutionResult:
        loop = asyncio.get_running_loop()
        kc, conf = cur.kc, cur.conf
        assert kc is not None
        step = StepCollector(self.policy.output_bytes, self.policy.output_limit_bytes)
        if self._note:
            step.out.write("stderr", self._note)
            self._note = ""
        cpu0, oom0 = conf.cpu_time_s(), conf.oom_kills()
        conf.reset_peak()
        t0 = time.perf_counter()
        deadline = loop.time() + limit
        msg_id = kc.execute(code, silent=False, store_history=True, allow_stdin=False, stop_on_error=True)
        status: ExecStatus | None = None
        grace_until: float | None = None
        while True:
            now = loop.time()
            if grace_until is None and (now >= deadline or step.over_limit):
                status = ExecStatus.OUTPUT_LIMIT if step.over_limit else ExecStatus.TIMEOUT
                if status is ExecStatus.OUTPUT_LIMIT:
                    step.stop_capturing()
                grace_until = now + self.policy.interrupt_grace_s
                with contextlib.suppress(Exception):
                    await cur.km.interrupt_kernel()  # SIGINT to the kernel's process group
            elif grace_until is not None and now >= grace_until:
                break  # SIGINT ignored: kill
            end = deadline if grace_until is None else grace_until
            try:
                msg = await kc.get_iopub_msg(timeout=max(0.001, min(end - now, POLL_S)))
            except queue.Empty:
                if cur.exit_status() is not None or cur.relay_status() is not None or _disconnected(kc):
                    break
                continue
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self._cur is cur or (task is not None and task.cancelling()):
                    raise
                break  # close() shut the sockets under us: not our caller's cancellation
            except zmq.ZMQError as exc:  # the socket itself: ours, not the kernel's doing
                if self._cur is cur:
                    raise KernelError(f"lost the kernel's connection: {exc}") from exc
                break
            except Exception as exc:  # noqa: BLE001 - what the kernel sent does not parse
                step.anomaly = f"an unreadable message ({type(exc).__name__})"
                break
            await asyncio.sleep(0)  # a queue of ready messages never holds the event loop
            if step.add(msg, msg_id):
                break  # idle, exiting, or broken
        wall = time.perf_counter() - t0
        exit_status = await self._exit_status(cur, step) if self._cur is cur else cur.exit_status()
        reply = None
        if exit_status is None and step.idle and step.anomaly is None:
            try:
                reply = await self._reply(kc, msg_id, end=loop.time() + 1.0)
                if reply is None and status is None:  # an interrupt can cost the reply, nothing else
                    step.anomaly = "idle without a reply"
            except KernelAnomaly as exc:
                step.anomaly = str(exc)
        lost = exit_status is not None or not step.idle or step.anomaly is not None
        code: int | None = None
        if not lost:
            status = status or step.status_from(reply)
            if status in (ExecStatus.OK, ExecStatus.ERROR) and (conf.oom_kills() or 0) > (oom0 or 0):
                status = ExecStatus.OOM  # a child process hit the memory limit; the kernel survived
                step.out.write("stderr", "[sandbox-env] a process started by this step was killed: "
                               "out of memory.\n")
        elif self._cur is not cur:
            status = status or ExecStatus.KILLED
            step.out.write("stderr", "[sandbox-env] the kernel was shut down during the step.\n")
        elif step.anomaly is not None:
            status = ExecStatus.KILLED
            logger.warning("kernel %s broke the protocol (%s); replaced", self.id, step.anomaly)
            step.out.write("stderr", f"[sandbox-env] the kernel broke the message protocol ({step.anomaly}); "
                           "it was killed and restarted with an empty namespace.\n")
        elif step.exited:  # os._exit(n), told by the kernel, which now waits to be killed
            status = status or step.status_from(None)
            step.out.write("stderr", f"[sandbox-env] the interpreter exited (os._exit({step.exit_code})); "
                           "it was restarted with an empty namespace.\n")
        elif status is None and exit_status is not None:
            oom = (conf.oom_kills() or 0) > (oom0 or 0)
            status, code = (ExecStatus.OOM, 137) if oom else died(exit_status)
            step.out.write("stderr", f"[sandbox-env] the interpreter {'died' if exit_status < 0 or oom else 'exited'}"
                           f" (exit status {exit_status}{', out of memory' if oom else ''}); it was restarted "
                           "with an empty namespace.\n")
        else:
            status = status or ExecStatus.KILLED
            step.out.write("stderr", "[sandbox-env] the interpreter did not stop on interrupt; it was killed "
                           "and restarted with an empty namespace.\n")
        if status is ExecStatus.TIMEOUT:
            step.out.write("stderr", f"[sandbox-env] step timed out after {limit:g} s.\n")
        elif status is ExecStatus.OUTPUT_LIMIT:
            step.out.write("stderr", f"[sandbox-env] step stopped: output exceeded "
                           f"{self.policy.output_limit_bytes} bytes.\n")
        cpu1, peak = conf.cpu_time_s(), conf.peak_memory_bytes()
        if lost:
            await asyncio.to_thread(conf.kill_all)  # now, not later: nothing of it keeps running
            if not self._closed and self._cur is cur:
                self._schedule_restart()
        return step.result(status=status, wall=wall, exit_code=code,
                           cpu=None if cpu0 is None or cpu1 is None else max(0.0, cpu1 - cpu0),
                           peak_mb=None if peak is None else peak / MB)

    @staticmethod
    async def _exit_status(cur: _Process, step: StepCollector) -> int | None:
        """The kernel process's exit status (None: alive). A dropped connection with a live process
        is an anomaly, once the process had a moment to finish dying (its sockets close first)."""
        oversize = f"a message over {RELAY_FRAMES} frames or the size limit, or slow to parse"
        exit_status, relay = cur.exit_status(), cur.relay_status()
        if exit_status is None and step.anomaly is None and relay == zmq_relay.OVERSIZE:
            step.anomaly = oversize
            return None
        if exit_status is not None or step.anomaly is not None or cur.kc is None or (
                relay is None and not _disconnected(cur.kc)):
            return exit_status
        for _ in range(50):
            await asyncio.sleep(0.02)
            if (exit_status := cur.exit_status()) is not None:
                return exit_status
        relay = cur.relay_status()
        step.anomaly = (oversize if relay == zmq_relay.OVERSIZE else "a message over the size limit, or a dropped "
                        "connection" if relay in (None, zmq_relay.DROPPED) else f"its relay died (exit status {relay})")
        return None

    async def run_program(self, source: str, *, stdin: bytes = b"", timeout_s: float) -> ExecutionResult:
        """`python3 -I -c source` as the only process of this kernel's confinement: the kernel's
        whole tree is killed first; the program gets a sandbox of its own (a fresh workspace and
        /tmp; unisolated: the working directory and TMPDIR emptied before and after). The kernel
        itself is started again lazily, by the next step."""
        async with self._lock:
            await self._settled()  # no kernel is started just to be killed: the next step starts one
            assert self.root is not None and self.workdir is not None
            await self._teardown()  # every process of the kernel's cgroup/session, daemons included
            self._relaunch = True
            box = self._layout
            if box is None:
                await asyncio.to_thread(_empty, self.workdir, self.root / "tmp")
            self._generation += 1
            conf = Confinement(f"{self.id}-p{self._generation}", Limits.from_policy(self.policy),
                               token=f"{self.id}-p{self._generation}", use_cgroups=self.use_cgroups,
                               uid=None if box is None else box.uid)
            conf.create()
            command = [sys.executable, "-I", "-c", source]
            env = _kernel_env(self.root, self.workdir, conf.token, isolated=box is not None)
            self._program_running = True
            try:
                with contextlib.ExitStack() as stack:
                    launch: dict[str, Any] = {"cwd": self.workdir, "env": env}
                    if box is not None:
                        assert self._runtime is not None
                        fd = stack.enter_context(sandbox.seccomp_fd())
                        command = sandbox.sandbox_argv(self._runtime, box, command, env=env, seccomp=fd)
                        launch = {"cwd": Path("/"), "env": {"PATH": "/usr/bin:/bin"}, "pass_fds": (fd,),
                                  "exit_by_signal": True}
                    return await _run_confined(conf, command, stdin, timeout_s, **launch,
                                               keep=self.policy.output_bytes, limit=self.policy.output_limit_bytes)
            finally:
                await asyncio.to_thread(conf.kill_all)
                await asyncio.to_thread(conf.destroy)
                if box is None:
                    await asyncio.to_thread(_empty, self.workdir, self.root / "tmp")
                self._program_running = False
                self._free_lease()

    async def _reply(self, kc: AsyncKernelClient, msg_id: str, end: float) -> dict[str, Any] | None:
        """The execute_reply of `msg_id` (stale replies of interrupted steps are skipped); raises
        KernelAnomaly for a message that does not parse or does not fit."""
        loop = asyncio.get_running_loop()
        while (left := end - loop.time()) > 0:
            try:
                msg = await kc.get_shell_msg(timeout=left)
            except queue.Empty:
                return None
            except (asyncio.CancelledError, zmq.ZMQError):
                raise
            except Exception as exc:  # noqa: BLE001 - what the kernel sent does not parse
                raise KernelAnomaly(f"an unreadable reply ({type(exc).__name__})") from exc
            await asyncio.sleep(0)  # stale replies queued: one at a time
            if (reply := check_reply(msg, msg_id)) is not None:
                return reply
        return None

    async def inspect(self) -> dict[str, Any]:
        """Variables of the namespace and resource use, in one silent request."""
        async with self._lock:
            cur = await self._ready()
            assert cur.kc is not None
            msg_id = cur.kc.execute("", silent=True, store_history=False, allow_stdin=False,
                                    user_expressions={"v": INSPECT_EXPR})
            try:
                reply = await self._reply(cur.kc, msg_id, end=asyncio.get_running_loop().time() + 5.0)
            except KernelAnomaly as exc:  # the kernel is lost: the next step gets a fresh one
                logger.warning("kernel %s broke the protocol (%s); replaced", self.id, exc)
                reply = None
                if not self._closed and self._restart is None and self._cur is cur:
                    self._note = f"[sandbox-env] the kernel broke the message protocol ({exc}); it was restarted.\n"
                    self._schedule_restart()
            for _ in range(DRAIN):  # iopub is nobody's between steps: drop its status messages, or the
                try:  # kernel's iopub (which waits rather than drop) would stall once its queue is full
                    await cur.kc.get_iopub_msg(timeout=0)
                except queue.Empty:
                    break
                except (asyncio.CancelledError, zmq.ZMQError):
                    raise
                except Exception:  # noqa: BLE001, S112 - unreadable: dropped all the same
                    continue
                finally:
                    await asyncio.sleep(0)  # one message at a time; at most DRAIN (the rest: next step)
            memory = cur.conf.memory_bytes()
            return {"variables": _parse_variables(reply), "cpu_time_s": cur.conf.cpu_time_s(),
                    "memory_mb": None if memory is None else round(memory / MB, 1),
                    "pid": cur.proc.pid if cur.proc else None, "limits": cur.conf.mechanism}


def _empty(*folders: Path) -> None:
    """Delete what is inside `folders`, however deep and never following symlinks; the folders stay
    (made anew when the code replaced one). Never raises for what the code did to its files."""
    for folder in folders:
        try:
            _fresh_dir(folder)
            empty(str(folder))
        except OSError as exc:
            logger.warning("could not empty %s: %r", folder, exc)


def _fresh_dir(path: Path) -> None:
    """`path` as a real folder: whatever the code put in its place (a symlink, a file) goes."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    path.mkdir(mode=0o700, exist_ok=True)


def _remove(path: Path) -> None:
    """Delete a folder and everything in it (iterative, two fds at most, no symlink followed)."""
    try:
        empty(str(path))
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("could not remove %s: %r", path, exc)


def _socket_paths(km: AsyncKernelManager) -> list[Path]:
    info = km.get_connection_info()
    return [Path(f"{info['ip']}-{info[port]}") for port in
            ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")]


def _log_tail(path: Path, size: int = 2000) -> str:
    """The end of a kernel's log (the code may have made it huge)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read(size).decode(errors="replace")
    except OSError:
        return ""


_warned_unisolated = False


def _warn_unisolated() -> None:
    global _warned_unisolated
    if not _warned_unisolated:
        _warned_unisolated = True
        logger.warning("jupyter kernels run WITHOUT isolation (jupyter_unisolated): trusted code only")


async def _run_confined(conf: Confinement, command: list[str], stdin: bytes, timeout_s: float, *, cwd: Path,
                        env: dict[str, str], keep: int, limit: int, pass_fds: tuple[int, ...] = (),
                        exit_by_signal: bool = False) -> ExecutionResult:
    """Run one confined program; stdout is kept whole up to `limit` (a verdict must not be cut).
    `exit_by_signal`: a launcher in between (bwrap) reports death by signal N as exit 128+N."""
    cpu0, oom0 = conf.cpu_time_s(), conf.oom_kills()
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(cwd),
        env=env, preexec_fn=conf.preexec, pass_fds=pass_fds)
    conf.attach(proc.pid)
    end = await run_to_end(proc, stdin, keep_stdout=limit, keep_stderr=keep, limit=limit, timeout_s=timeout_s,
                           stop=lambda: asyncio.to_thread(conf.kill_all))
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
