"""In-container program zygote: each program is a fork of a clean, pre-warmed interpreter.

`Supervisor.run_program` used to start `python3 -I` per program (about 9 ms here, plus the
program's own imports, twice per grading). The zygote is forked from the supervisor before the
runner reads any request, so its memory holds the runner's code and config only: never an
episode's code or output, never a program's source or input (those reach the program through pipes
the zygote only passes on). At its first program it imports a few common stdlib modules (idle
containers do not pay for them); after that it only forks. A program runs as `python3 -I -c`
would run it: its own session, `/workspace` as cwd, the minimal environment, fds 0-2 as given.

Episode code runs as the same uid and may kill or stop the zygote, but cannot read or drive it
(non-dumpable) nor talk to it (the supervisor alone holds the other end of its socket). The
supervisor resumes it before each program and replaces a dead one with a fresh `python3 -I`
running this file, so a killed zygote costs one interpreter start, never isolation. Its pid
cannot be taken over: it is the supervisor's child, a zombie until the supervisor reaps it.

Stdlib only; it reaches the container in the runner's bundle.
"""

from __future__ import annotations

import _socket
import array
import os
import select
import signal
import struct
import sys

from sandbox_env.inside.bundle import rebundle
from sandbox_env.inside.procs import exit_status, set_dumpable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

WORKSPACE = "/workspace"
PROGRAM_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": WORKSPACE, "LANG": "C.UTF-8", "TMPDIR": "/tmp"}
# The grader's own needs (ctypes for prctl) and what submissions import most.
PRELOAD = ("ctypes", "fcntl", "zlib", "typing", "re", "collections", "itertools", "functools", "math", "heapq",
           "string", "traceback")
FDS = 4  # a program's stdin, stdout, stderr and source pipes
# What a new `python3` sets up; every other signal has its default disposition.
PYTHON_SIGNALS = {signal.SIGINT: signal.default_int_handler, signal.SIGPIPE: signal.SIG_IGN,
                  signal.SIGXFSZ: signal.SIG_IGN}
EXIT = struct.Struct(">id")  # exit code (negative: killed by that signal), CPU seconds
SOCKET_FD = 3  # where a zygote started by exec finds its socket
WORKER = b"worker"  # a request for a REPL worker instead of a program
MODULES = ("sandbox_env.inside.bundle", "sandbox_env.inside.procs", __name__)


def send_fds(sock: Any, message: bytes, fds: list[int]) -> None:
    sock.sendmsg([message], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array.array("i", fds))])


def recv_fds(sock: Any, count: int) -> tuple[bytes, list[int]]:
    message, ancillary, _, _ = sock.recvmsg(64, _socket.CMSG_SPACE(count * 4))
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return message, list(fds)


def serve(sock: Any) -> None:
    """The zygote's loop: one program at a time, each reaped before the next request is read."""
    set_dumpable(False)  # a no-op when forked from the (non-dumpable) supervisor
    warm = False
    while True:
        try:
            message, fds = recv_fds(sock, FDS)
        except OSError:
            return
        if not message:
            return
        if len(fds) != FDS:
            for fd in fds:
                os.close(fd)
            continue
        if not warm:  # before a worker too: every recycled episode then starts from the same state
            warm = True
            warm_up()
        reap_strays()
        if message.startswith(WORKER):
            start_worker(sock, fds, message)
            reap_strays()
            continue
        pid = os.fork()
        if pid == 0:
            run_program(sock, *fds)
        for fd in fds:
            os.close(fd)
        sock.send(b"%d" % pid)
        _, status, usage = os.wait4(pid, 0)
        reap_strays()
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.waitstatus_to_exitcode(status)
        sock.send(EXIT.pack(code, usage.ru_utime + usage.ru_stime))


def reap_strays() -> None:
    """Children the zygote did not fork itself (a program's clone(CLONE_PARENT) makes them its
    siblings): reaped whenever no child of its own is due, or their zombies would hold the pids
    limit for the container's later programs and episodes."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def start_worker(sock: Any, fds: list[int], message: bytes) -> None:
    """Fork a REPL worker (`worker.Worker`) on these pipe ends (its commands, its results, stdout,
    stderr) and send its pid, or 0. It is forked by a child that exits at once: the worker is then
    the supervisor's (PID 1 adopts orphans), which reaps it and reads its CPU time as for any worker,
    and this process is free for the next program. `message`: b"worker <keep> <cpu seconds left or
    ->" (from the supervisor, the only one who can write to this socket)."""
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(report_r)
            worker = os.fork()
            if worker == 0:
                os.close(report_w)
                run_worker(sock, fds, message)
            os.write(report_w, b"%d" % worker)
        finally:
            os._exit(0)
    for fd in (report_w, *fds):
        os.close(fd)
    os.waitpid(pid, 0)  # once it is reaped, the worker's parent is PID 1
    reported = os.read(report_r, 32)
    os.close(report_r)
    sock.send(reported if reported.isdigit() else b"0")


def run_worker(sock: Any, fds: list[int], message: bytes) -> None:
    """In the forked worker: fds 1-4 as the supervisor's first worker has them, nothing else open
    but stdin (/dev/null), dumpable (nothing of this process is a secret); never returns."""
    import fcntl

    code = 70
    try:
        _, keep, cpu = message.split()
        sock.close()
        moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 16) for fd in fds]  # out of the targets' way
        for target, fd in zip((3, 4, 1, 2), moved):  # commands, results, stdout, stderr
            os.dup2(fd, target)
        os.closerange(5, os.sysconf("SC_OPEN_MAX"))
        set_dumpable(True)
        from sandbox_env.inside.worker import Worker  # the runner's bundle has it; a replacement zygote's has not

        Worker(3, 4, int(keep), None if cpu == b"-" else int(cpu)).loop()
        code = 0
    finally:
        os._exit(code)


def warm_up() -> None:
    """What `python3 -I` has that the runner's `-S` interpreter lacks (site-packages, `exit`), and
    the modules programs import most."""
    try:
        import site

        site.main()
    except Exception:  # noqa: BLE001, S110 - a broken site-packages is the program's to meet
        pass
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError:
            pass


def run_program(sock: Any, stdin: int, stdout: int, stderr: int, source_fd: int) -> None:
    """In the forked program: become `python3 -I -c <source>`; never returns."""
    code = 1
    try:
        os.setsid()
        for number in range(1, signal.NSIG):  # the supervisor ignores many; a program starts as python3 would
            try:
                signal.signal(number, PYTHON_SIGNALS.get(number, signal.SIG_DFL))
            except (OSError, ValueError):
                pass  # SIGKILL, SIGSTOP, and numbers with no signal
        for target, fd in ((0, stdin), (1, stdout), (2, stderr)):
            os.dup2(fd, target)
        chunks = []
        while chunk := os.read(source_fd, 1 << 16):
            chunks.append(chunk)
        sock.close()
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        set_dumpable(True)  # as after exec, once nothing of the zygote is left in this process
        os.chdir(WORKSPACE)
        os.environ.clear()
        os.environ.update(PROGRAM_ENV)
        sys.argv[:] = ["-c"]
        code = execute(b"".join(chunks).decode())
    finally:
        os._exit(code)


def execute(source: str) -> int:
    """Run `source` as `__main__`; the exit code `python3 -c` would give."""
    import builtins
    import types

    main = types.ModuleType("__main__")
    main.__builtins__ = builtins  # type: ignore[attr-defined]
    sys.modules["__main__"] = main
    code = 0
    try:
        exec(compile(source, "<string>", "exec", dont_inherit=True), main.__dict__)  # noqa: S102 - the program to run
    except SystemExit as exc:
        code = exit_status(exc.code)
    except BaseException:  # noqa: BLE001 - reported as python3 would
        import traceback

        traceback.print_exc()
        code = 1
    for finish in ("threading", "atexit"):  # what interpreter shutdown does: join threads, exit hooks
        module = sys.modules.get(finish)
        try:
            if module is not None:
                module._shutdown() if finish == "threading" else module._run_exitfuncs()
        except BaseException:  # noqa: BLE001, S110 - shutdown errors do not change the exit code
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001, S110 - a closed or broken stream
            pass
    return code


class Zygote:
    """The supervisor's handle on its zygote."""

    def __init__(self, closing: tuple[int, ...]) -> None:
        self.pid = 0
        here, there = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            try:
                here.close()
                for fd in closing:
                    os.close(fd)
                serve(there)
            finally:
                os._exit(0)
        there.close()
        self.pid, self.sock = pid, here
        self.first = pid  # a zygote replaced since (`ensure`) was killed or tampered with

    def fds(self) -> tuple[int, ...]:
        """What a forked worker must close."""
        return (self.sock.fileno(),) if self.pid else ()

    def alive(self) -> bool:
        """Reaps a dead zygote (which frees its pid); resumes a stopped one."""
        if not self.pid:
            return False
        try:
            done, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            done = self.pid
        if done:
            self.pid = 0
            self.sock.close()
            return False
        os.kill(self.pid, signal.SIGCONT)  # undo a SIGSTOP from episode code
        return True

    def ensure(self) -> bool:
        """A live zygote: this one, or a fresh `python3 -I` running this file."""
        if self.alive():
            return True
        here, there = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
        try:
            actions = [(os.POSIX_SPAWN_OPEN, n, os.devnull, os.O_RDWR, 0) for n in (0, 1, 2)]
            actions.append((os.POSIX_SPAWN_DUP2, there.fileno(), SOCKET_FD))
            program = (f"{rebundle(*MODULES)}\nimport _socket\nfrom {__name__} import serve\n"
                       f"serve(_socket.socket(fileno={SOCKET_FD}))\n")
            self.pid = os.posix_spawn(sys.executable, [sys.executable, "-I", "-c", program], PROGRAM_ENV,
                                      file_actions=actions, setsid=True)
        except OSError:
            here.close()
            return False
        finally:
            there.close()
        self.sock = here
        return True

    def launch(self, fds: list[int], timeout: float, message: bytes = b"run") -> int:
        """Fork a program (or, with a `WORKER` message, a worker) on these pipe ends; its pid, or 0
        when the zygote does not answer."""
        try:
            send_fds(self.sock, message, fds)
            if select.select([self.sock], [], [], timeout)[0]:
                return int(self.sock.recv(32))
        except (OSError, ValueError):
            pass
        self.kill()
        return 0

    def wait(self, timeout: float) -> tuple[int, float] | None:
        """(exit code, CPU seconds) of the program launched last, once the zygote has reaped it;
        None while it runs, or when the zygote died with it (then `pid` is 0)."""
        try:
            if not select.select([self.sock], [], [], max(0.0, timeout))[0]:
                return None
            data = self.sock.recv(EXIT.size)
            if len(data) == EXIT.size:
                return EXIT.unpack(data)
        except OSError:
            pass
        self.kill()  # gone, or out of step with us
        return None

    def kill(self) -> None:
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except OSError:
                pass
            self.pid = 0
            self.sock.close()
