"""The kernel template: one root process per server that has imported ipykernel once and forks
every kernel (and every relay) from that state, instead of starting an interpreter and importing
IPython again each time (about 0.5 s of CPU per kernel). Its pages are shared, copy-on-write, by
all the kernels it forked. Run as the program template (kind "program"), it imports a few standard
library modules instead and forks `run_program`'s processes into their boxes (`boxes.py`).

Run by the server as `python -I -c <this file> <config>`, with a control socket (`template.py`). Standard
library and the kernel's own packages only: no module of sandbox_env is imported, so a kernel's
memory holds nothing of the server's.

A kernel is forked in two steps. The first child (root, in the host's pid namespace) joins the
kernel's cgroups, then the namespaces of a holder process that bubblewrap built (`setns` through
the holder's pidfd: mount, pid, ipc, uts, net and cgroup at once), and forks the kernel, which is
then the sandbox's process like any other: it sets its rlimits, drops to the kernel's uid with no
capability, sets no_new_privs, loads the seccomp filter and only then runs ipykernel. The first
child stays as the kernel's parent and exits with its status (128+N for death by signal N, as
bwrap reports it). A relay is forked into the kernel's cgroups and drops its privileges itself.

Protocol (SOCK_SEQPACKET, one request at a time): a JSON request with its descriptors, answered by
`{"pid": N}` with the child's pidfd and the read end of a pipe that will hold its exit status (4
bytes, as `os.waitstatus_to_exitcode`; the template writes it once it has reaped the child, and a
kernel's first child writes its kernel's itself), or by `{"error": "..."}`.
"""

from __future__ import annotations

import array
import atexit
import builtins
import contextlib
import ctypes
import gc
import json
import os
import resource
import selectors
import signal
import socket
import struct
import sys
import types
from collections.abc import Callable
from typing import Any

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 1, 4, 24, 38, 22
SECCOMP_MODE_FILTER = 2
CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x2000000, 0x4000000, 0x8000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
SANDBOX_NAMESPACES = CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWPID | CLONE_NEWNET
MAX_FDS = 6
# What the server's programs (inside/: the grader, /run_code's) import, and what programs commonly
# spawn and parse with: the standard library only, imported once here (site's start-up is the rest).
PROGRAM_MODULES = ("base64", "ctypes", "fcntl", "hashlib", "hmac", "json", "marshal", "resource", "select",
                   "signal", "struct", "subprocess", "tempfile", "threading", "traceback", "types", "zlib")
MAX_FD = 1 << 16
libc = ctypes.CDLL(None, use_errno=True)


def check(result: int, what: str) -> None:
    if result != 0:
        raise OSError(ctypes.get_errno(), what)


def cgroup_files(paths: list[str]) -> list[int]:
    """The cgroups' `cgroup.procs`, opened while the host's /sys is still in sight."""
    return [os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC) for path in paths]


def join_cgroups(files: list[int]) -> None:
    for fd in files:
        os.write(fd, b"0")  # the writer itself
        os.close(fd)
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("500")  # if the host itself runs out of memory, go before the server
    except OSError:
        pass


def set_rlimits(limits: list[list[int]]) -> None:
    for which, soft, hard in limits:
        resource.setrlimit(which, (soft, hard))


def drop_privileges(uid: int, gid: int, seccomp: str, dumpable: bool) -> None:
    """As `setpriv --clear-groups --inh-caps=-all --bounding-set=-all --no-new-privs` then bwrap's
    `--seccomp` did: no group, no capability in any set, no way back, the kernel's filter."""
    last_cap = int(open("/proc/sys/kernel/cap_last_cap").read())
    for cap in range(last_cap + 1):
        check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), "PR_CAPBSET_DROP")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)  # clears the permitted, effective and ambient sets
    header = struct.pack("II", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    check(libc.capset(header, bytes(24)), "capset")  # inheritable too
    check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "PR_SET_PDEATHSIG")  # reset by setuid
    if dumpable:
        set_dumpable()
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
    program = bytes.fromhex(seccomp)

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(Prog(len(program) // 8, program)), 0, 0),
          "PR_SET_SECCOMP")


def set_dumpable() -> None:
    """setuid made it undumpable: its /proc files root's, unreadable (no exec'd process has that)."""
    check(libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "PR_SET_DUMPABLE")


def close_all_but(keep: list[int]) -> None:
    """Descriptors of the template (other children's status pipes, its wake-up pipe) stay behind."""
    start = 3
    for fd in sorted(k for k in keep if k >= 3):
        os.closerange(start, fd)
        start = fd + 1
    os.closerange(start, MAX_FD)


def standard_streams(stdin: int, log: int, keep: list[int] = []) -> None:  # noqa: B006 - never mutated
    os.dup2(stdin, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    close_all_but(keep)


def fresh_environment(env: dict[str, str]) -> None:
    """The child's own environment. (`random` reseeds itself in a forked child; the string hash
    seed and the address layout are the template's, the same for each kernel it forks.)"""
    os.environ.clear()
    os.environ.update(env)


def kernel(request: dict[str, Any], status: int, holder: int, log: int) -> None:
    into_sandbox(request, status, holder, [log], lambda: run_kernel(request, log))


def program(request: dict[str, Any], status: int, holder: int, job: int, stdin: int, stdout: int, stderr: int) -> None:
    into_sandbox(request, status, holder, [job, stdin, stdout, stderr],
                 lambda: run_program(request, job, stdin, stdout, stderr))


def into_sandbox(request: dict[str, Any], status: int, holder: int, held: list[int], run: Callable[[], None]) -> None:
    """The first child: into the holder's namespaces, then fork `run` (the kernel, the program),
    wait for it and write its status itself (the template may be gone by then). It stays out of
    the sandbox's cgroups: their teardown kills what runs there, and this process, not the host's
    init, reaps it."""
    files = cgroup_files(request["cgroups"])
    check(libc.setns(holder, SANDBOX_NAMESPACES), "setns")
    pid = os.fork()
    if pid == 0:
        try:
            join_cgroups(files)  # from inside: the pid namespace is the sandbox's now
            run()
        except BaseException as exc:  # noqa: BLE001 - told where its output goes (log, stderr)
            with contextlib.suppress(OSError):
                os.write(2, f"sandbox-env template: {request.get('op')}: {exc!r}\n".encode())
        finally:
            os._exit(70)
    for fd in (*files, *held, holder):
        os.close(fd)
    while True:
        try:
            _, waited = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(waited)
    code = 128 - code if code < 0 else code
    with contextlib.suppress(OSError):  # the server may have stopped listening
        os.write(status, struct.pack("i", code))
    os._exit(code)


def run_kernel(request: dict[str, Any], log: int) -> None:
    enter_sandbox(request, os.open("/dev/null", os.O_RDONLY), log)
    workdir = request["workdir"]
    sys.path.insert(0, workdir)  # as `python -m ipykernel_launcher` has it: modules written there import
    sys.argv = ["ipykernel_launcher", *request["argv"]]
    from ipykernel.kernelapp import IPKernelApp

    IPKernelApp.launch_instance(request["argv"])
    os._exit(0)


def enter_sandbox(request: dict[str, Any], stdin: int, stdout: int, keep: list[int] = [],  # noqa: B006
                  dumpable: bool = True) -> None:
    """What a kernel and a program do first in the sandbox: a session of their own, their streams,
    the rlimits, the sandbox's uid without privileges, their environment and workspace."""
    os.setsid()
    standard_streams(stdin, stdout, keep)
    set_rlimits(request["rlimits"])
    drop_privileges(request["uid"], request["gid"], request["seccomp"], dumpable)
    os.umask(0o022)
    fresh_environment(request["env"])
    workdir = request["workdir"]
    os.makedirs(workdir, mode=0o700, exist_ok=True)
    os.chdir(workdir)


def run_program(request: dict[str, Any], job: int, stdin: int, stdout: int, stderr: int) -> None:
    """`python3 -I -c source`, as far as the program can tell: fresh standard streams, argv, a
    `__main__` of its own, and the interpreter's exit (SystemExit, tracebacks, non-daemon threads,
    atexit, flushed streams). What it shares with the template: the preloaded modules (standard
    library only), the hash seed and the address layout (docs/jupyter-isolation.md).

    Forked when its sandbox is built, ahead of its run: it joins the cgroups (a cgroup v1 move
    costs tens of ms), drops its privileges, then waits for its source on `job` (from the server;
    EOF without one: the box was thrown away unused). Undumpable while it waits (its /proc files
    root's): no process of its uid, such as a kernel's relay torn down meanwhile, can write its
    memory before the server's program is in it."""
    err = os.dup(stderr)  # a copy that standard_streams keeps open: it points 2 at stdout
    enter_sandbox(request, stdin, stdout, keep=[err, job], dumpable=False)
    os.dup2(err, 2)
    os.close(err)
    chunks = []
    while chunk := os.read(job, 1 << 16):
        chunks.append(chunk)
    os.close(job)
    if not chunks:
        os._exit(0)
    source = b"".join(chunks).decode()
    set_dumpable()  # as an exec'd program is: its own /proc files readable
    for name, fd, mode in (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w")):
        old = getattr(sys, name)
        line = fd == 2 or os.isatty(fd)  # as the interpreter's own: stderr always line-buffered
        stream = open(fd, mode, 1 if line else -1, encoding=old.encoding, errors=old.errors,  # noqa: SIM115
                      closefd=False)
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)
    sys.argv = ["-c"]
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = main
    code = 0
    try:
        exec(compile(source, "<string>", "exec", dont_inherit=True), main.__dict__)  # noqa: S102 - the server's program
    except SystemExit as exc:
        code = exit_code(exc)
    except BaseException as exc:  # noqa: BLE001 - reported as the interpreter would, without this frame
        tb = exc.__traceback__.tb_next if exc.__traceback__ else None  # the program's frames only
        sys.excepthook(type(exc), exc.with_traceback(tb), tb)
        code = 1
    os._exit(finish(code))


def exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    with contextlib.suppress(Exception):
        print(exc.code, file=sys.stderr)
    return 1


def finish(code: int) -> int:
    """The interpreter's own end: wait for non-daemon threads, run atexit, flush the streams."""
    threading = sys.modules.get("threading")
    with contextlib.suppress(BaseException):
        if threading is not None:
            threading._shutdown()
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - e.g. a closed pipe: Python exits with 120
            code = code or 120
    return code


def relay(request: dict[str, Any], status: int, stdin: int, log: int) -> None:
    join_cgroups(cgroup_files(request["cgroups"]))
    if request["unshare_net"]:
        check(libc.unshare(CLONE_NEWNET), "unshare")  # as the kernel's: no interface at all
    set_rlimits(request["rlimits"])
    os.setsid()
    standard_streams(stdin, log, keep=[status])  # held: no status, no EOF while the relay runs
    os.chdir(request["cwd"])
    fresh_environment(request["env"])
    namespace: dict[str, Any] = {"__name__": "sandbox_env_relay"}
    exec(RELAY, namespace)  # noqa: S102 - the server's own relay source, compiled once at start
    os._exit(namespace["main"](["relay", json.dumps(request["config"])]))


def child(request: dict[str, Any], status: int, fds: list[int]) -> None:
    """In the forked child: never returns. It outlives the template if that dies: the server's own
    death still ends it (the sandbox's bwrap dies with the server, and with it every process of
    the sandbox; a relay ends when its stdin, the server's pipe, closes)."""
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        close_all_but([status, *fds])
        if request["op"] == "kernel":
            kernel(request, status, *fds)
        elif request["op"] == "program":
            program(request, status, *fds)
        elif request["op"] == "relay":
            relay(request, status, *fds)
    except BaseException as exc:  # noqa: BLE001 - told in the kernel's log
        os.write(2, f"sandbox-env kernel template: {request.get('op')}: {exc!r}\n".encode())
    os._exit(72)


def receive(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    fds = array.array("i")
    data, ancdata, _, _ = sock.recvmsg(1 << 20, socket.CMSG_LEN(MAX_FDS * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    return json.loads(data), list(fds)


def serve(sock: socket.socket) -> None:
    exits: dict[int, int] = {}  # child pid -> write end of its status pipe
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    gc.freeze()  # the imported objects stay on shared pages: the collector never writes them
    while True:
        for key, _ in selector.select():
            if key.fileobj == wake_r:
                while True:
                    try:
                        os.read(wake_r, 512)
                    except BlockingIOError:
                        break
                reap(exits)
                continue
            received = receive(sock)
            if received is None:
                return  # the server closed its end, or died; its children end with their episodes (see child)
            request, fds = received
            try:
                answer(sock, request, fds, exits)
            except Exception as exc:  # noqa: BLE001 - one bad request never ends the template
                with contextlib.suppress(OSError):
                    sock.send(json.dumps({"error": repr(exc)}).encode())
            finally:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)


def answer(sock: socket.socket, request: dict[str, Any], fds: list[int], exits: dict[int, int]) -> None:
    """Fork the child `request` asks for; its pidfd and status pipe go to the server."""
    read, write = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.fork()
    except OSError:
        os.close(read)
        os.close(write)
        raise
    if pid == 0:
        os.close(read)
        sock.close()
        exits.clear()  # other children's pids: a program can reach this frame (sys._getframe)
        child(request, write, fds)
    os.set_blocking(write, False)  # in the template only: a status write never blocks it
    pidfd = os.pidfd_open(pid)
    exits[pid] = write
    try:
        sock.sendmsg([json.dumps({"pid": pid}).encode()],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [pidfd, read]))])
    finally:
        os.close(pidfd)
        os.close(read)


def reap(exits: dict[int, int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        write = exits.pop(pid, None)
        if write is not None:
            with contextlib.suppress(OSError):  # non-blocking; the server may have closed its end
                os.write(write, struct.pack("i", os.waitstatus_to_exitcode(status)))
            os.close(write)


def preload(kind: str) -> None:
    """What every child of this kind would import: once, here."""
    if kind == "kernel":
        import ipykernel.debugger  # noqa: F401 - resolved by the kernel's traits at start: 60 ms each time
        import ipykernel.ipkernel  # noqa: F401
        import ipykernel.kernelapp  # noqa: F401
        import ipykernel.zmqshell  # noqa: F401
    if kind == "program":
        for name in PROGRAM_MODULES:
            __import__(name)
        return
    import zmq  # noqa: F401


if __name__ == "__main__":
    CONFIG = json.loads(sys.argv[1])
    RELAY = compile(CONFIG["relay_source"], "relay.py", "exec")
    preload(CONFIG["kind"])
    sys.dont_write_bytecode = True  # -I ignored PYTHONDONTWRITEBYTECODE
    control = socket.socket(fileno=CONFIG["control_fd"])
    control.send(json.dumps({"ready": os.getpid()}).encode())
    serve(control)
    os._exit(0)
