"""One kernel process and the server's link to it: its record, environment and log, the zmq
context and the bounds of what the server takes, the kernel's relay (start, connect), and the
monitors that tell a dropped connection."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import queue
import stat
import subprocess
import sys
import time
import uuid
import weakref
from pathlib import Path
from typing import Any

import zmq.asyncio
from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.kernelspec import KernelSpec
from jupyter_client.manager import AsyncKernelManager

from sandbox_env.errors import KernelStartError
from sandbox_env.kernels.jupyter import relay as zmq_relay
from sandbox_env.kernels.jupyter import sandbox
from sandbox_env.kernels.jupyter.limits import MB, Confinement
from sandbox_env.kernels.jupyter.seccomp import bpf_program as seccomp_bpf_program
from sandbox_env.kernels.jupyter.template import HOLD, ForkedProcess, fork_kernel, fork_relay, forked
from sandbox_env.kernels.jupyter.workdirs import fresh_dir

START_TIMEOUT_S = 30.0
SIGNAL_MAX = 64
# What the server takes from a kernel: messages of at most MESSAGE bytes, whatever the output limit
# (the kernel's start-up code sends streams in chunks of 64 K characters; a single display bigger
# than this costs the kernel), and RCVHWM of them queued per socket; a kernel sending a bigger one
# loses its connection (`disconnected`), the server no memory. The relay checks every message is
# cheap to parse first (`zmq_relay.check`): DRAIN bounds how many are read in a row between steps.
MESSAGE, RCVHWM, DRAIN = 4 * MB, 2, 64
# The server connects to a relay of the kernel's (`kernels/jupyter/relay.py`), never to the kernel: it takes
# messages of at most RELAY_FRAMES frames (a Jupyter message has 7 with its topic: no `buffers`
# are needed) and of at most the message bound in all; the relay lives in the kernel's confinement.
RELAY_FRAMES, RELAY_TASKS = 7 + 8, 4  # tasks: the relay's threads (main, zmq I/O, reaper)
RELAY_AS = 192 * MB  # the relay's address space without cgroups, on top of 4 messages in flight
_RELAY_SOURCE = Path(zmq_relay.__file__).read_text()
_ZMQ_CONTEXTS: dict[int, zmq.asyncio.Context] = {}


@dataclasses.dataclass
class KernelProcess:
    """One kernel process (a restart makes a new one) and everything attached to it."""

    km: AsyncKernelManager
    conf: Confinement
    proc: subprocess.Popen[bytes] | ForkedProcess | None = None
    kc: AsyncKernelClient | None = None
    sandboxed: bool = False  # proc is bwrap, which reports death by signal N as exit 128+N
    relay: subprocess.Popen[bytes] | ForkedProcess | None = None  # the server's only way to the kernel (zmq_relay)
    generation: int = 0
    holder: subprocess.Popen[bytes] | None = None  # forked kernels: bwrap, holding the sandbox they join

    def relay_status(self) -> int | None:
        """The relay's exit status (None: running)."""
        return self.relay.poll() if self.relay is not None else None

    def exit_status(self) -> int | None:
        """As Popen reports it: -N for death by signal N."""
        code = self.proc.poll() if self.proc is not None else -9
        if self.sandboxed and code is not None and 128 < code <= 128 + SIGNAL_MAX:
            return 128 - code
        return code


def kernel_env(root: Path, workdir: Path, token: str, *, isolated: bool) -> dict[str, str]:
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


def log_tail(path: Path, size: int = 2000) -> str:
    """The end of a kernel's log (the code may have made it huge)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read(size).decode(errors="replace")
    except OSError:
        return ""


def zmq_context() -> zmq.asyncio.Context:
    """One context (one I/O thread), shared by the kernels of the process."""
    size = MESSAGE
    ctx = _ZMQ_CONTEXTS.get(size)
    if ctx is None or ctx.closed:
        ctx = _ZMQ_CONTEXTS[size] = zmq.asyncio.Context()
        ctx.setsockopt(zmq.MAXMSGSIZE, size)  # defaults for the sockets created from now on
        ctx.setsockopt(zmq.RCVHWM, RCVHWM)
    return ctx


def disconnected(kc: AsyncKernelClient) -> bool:
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


def unwatch(kc: AsyncKernelClient) -> None:
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


def socket_paths(km: AsyncKernelManager) -> list[Path]:
    info = km.get_connection_info()
    return [Path(f"{info['ip']}-{info[port]}") for port in
            ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")]


async def start_relay(root: Path, box: sandbox.Layout | None, gen: int, conf: Confinement,
                      log: int) -> tuple[subprocess.Popen[bytes] | ForkedProcess, dict[str, Any]]:
    """The kernel's relay (`kernels/jupyter/relay.py`), in the kernel's confinement: it binds its sockets in a
    folder of the server's (0700, hidden from the kernel under its tmpfs) and waits for the
    kernel's addresses. Returns the process and the client's connection info for its sockets."""
    folder = root / f"r{gen}"
    fresh_dir(folder)
    ports = {"shell": 1, "iopub": 2, "control": 3}
    front = {name: f"ipc://{folder}/r-{port}" for name, port in ports.items()}
    size = MESSAGE
    # paths relative to its working folder (this one): as the kernel's uid, it may not pass
    # the folders above the kernel's (e.g. a workdir_root under /root)
    config = {"front": {name: f"ipc://r-{port}" for name, port in ports.items()},
              "max_frames": RELAY_FRAMES, "max_bytes": size}
    drop = box is not None and os.geteuid() == 0 and box.uid != 0
    if drop:  # the relay binds as the kernel's uid: the folder is its own until sealed
        assert box is not None
        os.chown(root, 0, box.gid)  # traversable by the kernel's gid (the kernel, in its
        os.chmod(root, 0o710)  # own mount namespace, never sees this folder)
        os.chown(folder, box.uid, box.gid)
    if box is not None:  # it drops to the kernel's uid and loads its seccomp filter itself, once
        # its modules are imported (the interpreter may live in root's home) and before any thread
        config.update(uid=box.uid, gid=box.gid, seccomp=seccomp_bpf_program().hex())

    def preexec() -> None:
        conf.preexec()  # the kernel's cgroups (memory, pids, CPU) and rlimits
        if conf._dir("memory") is None:  # rlimits only: the relay's memory is bounded on its own
            import resource
            resource.setrlimit(resource.RLIMIT_AS, (RELAY_AS + 4 * size,) * 2)

    proc: subprocess.Popen[bytes] | ForkedProcess
    if forked(conf, box):
        proc = await fork_relay(conf, config, folder, log)
    else:
        proc = subprocess.Popen([sys.executable, "-I", "-c", _RELAY_SOURCE, json.dumps(config)],
                                stdin=subprocess.PIPE, stdout=log, stderr=log, cwd=str(folder),
                                env={"SANDBOX_ENV_KERNEL": conf.token}, preexec_fn=preexec, start_new_session=True)
    info = {"ip": f"{folder}/r", **{f"{name}_port": port for name, port in ports.items()},
            "stdin_port": 4, "hb_port": 5, "_front": front}
    return proc, info


async def spawn(cur: KernelProcess, command: list[str], env: dict[str, str], *, root: Path, workdir: Path,
                runtime: sandbox.Runtime | None, box: sandbox.Layout | None, run: Path) -> dict[str, Any]:
    """Start the kernel's relay, then the kernel (in the sandbox `box`, when there is one), both
    confined by `cur.conf` and logging to root/kernel.log; the relay's connection info."""
    km, conf, gen = cur.km, cur.conf, cur.generation
    args = command[4:]  # what follows `-m ipykernel_launcher`: the forked kernel's arguments
    with contextlib.ExitStack() as stack:
        if box is None:  # absolute interpreter path: never a shim on PATH
            launch: dict[str, Any] = {"env": env, "cwd": str(workdir)}
        else:
            assert runtime is not None
            km.write_connection_file()
            sandbox.hand_over(Path(km.connection_file), box)
            fd = stack.enter_context(sandbox.seccomp_fd())
            command = sandbox.sandbox_argv(runtime, box, command, env=env, seccomp=fd, run_dir=run)
            launch = {"env": {"PATH": "/usr/bin:/bin"}, "cwd": "/", "pass_fds": (fd,)}
        # In the sandbox a signal to bwrap would kill it: interrupts go over the control channel.
        km._kernel_spec = KernelSpec(argv=command, env={}, display_name="sandbox-env", language="python",
                                     interrupt_mode="signal" if box is None else "message")
        log = os.open(root / "kernel.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        stack.callback(os.close, log)
        cur.relay, front = await start_relay(root, box, gen, conf, log)  # starts while the kernel does
        if forked(conf, box):
            assert box is not None
            cur.holder = subprocess.Popen(sandbox.sandbox_argv(runtime, box, HOLD, env=env, seccomp=fd, run_dir=run),
                                          **launch, preexec_fn=conf.preexec, stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=log)
            args = [arg.replace("{connection_file}", km.connection_file) for arg in args]
            cur.proc = await fork_kernel(cur.holder, conf, box, env, workdir, args, log)
        else:
            await km.start_kernel(**launch, preexec_fn=conf.preexec, stdin=subprocess.DEVNULL,
                                  stdout=log, stderr=log)
    return front


async def connect(cur: KernelProcess, front: dict[str, Any], *, run: Path, box: sandbox.Layout | None) -> None:
    """Once the kernel process runs: attach it to its confinement, seal its sockets (in the sandbox),
    connect the client through the relay and wait for the kernel to answer."""
    km, conf = cur.km, cur.conf
    if cur.proc is None:
        cur.proc = km.provisioner.process  # type: ignore[union-attr]
    conf.attach(cur.proc.pid if cur.holder is None else cur.holder.pid)  # type: ignore[union-attr]
    if box is not None:
        await sandbox.seal(run, socket_paths(km), box, alive=lambda: cur.exit_status() is None,
                           timeout_s=START_TIMEOUT_S)
        if conf.version == "none":
            conf.measured_pid = sandbox.interpreter_pid(cur.proc.pid)  # type: ignore[union-attr]
    cur.kc = await connect_relay(cur, front, box)
    cur.kc.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)
    await ready(cur, START_TIMEOUT_S)


async def ready(cur: KernelProcess, timeout_s: float) -> None:
    """The kernel answers kernel_info on shell, and its iopub reaches us: the status of that request
    arrived. (jupyter_client's wait_for_ready then waits 0.2 s for iopub to fall silent.)"""
    kc = cur.kc
    assert kc is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        msg_id = kc.kernel_info()
        until = min(deadline, loop.time() + 1.0)  # then ask again: iopub may have missed the first status
        answered = idle = False
        while not (answered and idle) and loop.time() < until:
            if cur.exit_status() is not None or cur.relay_status() is not None:
                raise KernelStartError("the kernel died before replying to kernel_info")
            with contextlib.suppress(queue.Empty):
                msg = await kc.get_shell_msg(timeout=0.01)
                answered = answered or msg["parent_header"].get("msg_id") == msg_id
            while True:
                try:
                    msg = await kc.get_iopub_msg(timeout=0.001)
                except queue.Empty:
                    break
                idle = idle or (msg["parent_header"].get("msg_id") == msg_id
                                and msg["msg_type"] == "status" and msg["content"].get("execution_state") == "idle")
        if answered and idle:
            return
        if loop.time() >= deadline:
            raise KernelStartError(f"the kernel did not answer within {timeout_s:g} s")


async def interrupt(cur: KernelProcess) -> None:
    """An interrupt request: over the control channel in the sandbox (a signal to bwrap would kill
    it, and a forked kernel has no launcher to signal), else SIGINT."""
    km = cur.km
    if cur.sandboxed and km._control_socket is not None:
        km.session.send(km._control_socket, km.session.msg("interrupt_request", content={}))
    else:
        await km.interrupt_kernel()


async def connect_relay(cur: KernelProcess, front: dict[str, Any], box: sandbox.Layout | None) -> AsyncKernelClient:
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
    ctx = zmq_context()
    if km._control_socket is not None:  # connected to the kernel itself by start_kernel
        km._control_socket.close(linger=0)
    km._control_socket = ctx.socket(zmq.DEALER)
    km._control_socket.rcvhwm = 1  # never read: the relay forwards no control reply
    km._control_socket.linger = 100
    km._control_socket.connect(front["_front"]["control"])
    ports = {k: v for k, v in front.items() if k != "_front"}
    return km.client(context=ctx, transport="ipc", **ports)
